/// The leader lease one controller at a time holds (EtcdStore implements it over etcd): what
/// the controller's leadership (`ControllerLeadership`) needs, so it can be driven and tested
/// without knowing the store.
public protocol LeaderElection: Sendable {
    /// Returns once this process holds the lease as `leaderID` (kept alive in the background),
    /// waiting while another holds it. Cancellation ends the wait with CancellationError.
    func campaign(leaderID: String, ttl: Int) async throws

    /// Returns, with the reason, once this process no longer holds the lease it won: etcd let it
    /// expire (unreachable for longer than the TTL), or the leader key was deleted or is held
    /// by someone else. Cancellation ends the wait with CancellationError.
    func leadershipLost(leaderID: String) async throws -> String

    /// Gives the lease up (stops keeping it alive and revokes it, so a standby takes over at
    /// once); nothing when this process does not hold it.
    func resign(leaderID: String) async
}
