import CairnCore
import Logging
import Synchronization

/// One controller acts at a time: this campaigns for the leader lease, runs the leader-only
/// work (re-replication) while it holds it, and when the lease is lost (etcd unreachable for
/// longer than the TTL, the key deleted or taken) stops that work and campaigns again — it never
/// carries on as if it still led. Runs until the calling task is cancelled (SIGTERM), then gives
/// the lease up so a standby takes over at once.
///
/// States: campaigning → leading → (lost) → campaigning …; `isLeading` is true only while
/// leading. `gatesCSI` (the controller role): Controller calls answer UNAVAILABLE while not
/// leading, and Probe says not ready, so a CO's sidecars wait on the standby (docs/design.md).
public final class ControllerLeadership: Sendable {
    public enum Phase: String, Sendable {
        case campaigning, leading, stopped
    }

    let election: any LeaderElection
    public let leaderID: String
    public let ttl: Int
    public let gatesCSI: Bool
    let leaderWork: @Sendable () async -> Void
    let logger: Logger
    private let state = Mutex<(phase: Phase, terms: Int)>((.campaigning, 0))

    /// - Parameters:
    ///   - ttl: the lease's TTL in seconds: how long a dead leader keeps it, so how soon a
    ///     standby takes over.
    ///   - leaderWork: runs while this process leads; cancelled when it stops leading.
    public init(election: any LeaderElection, leaderID: String, ttl: Int, gatesCSI: Bool, logger: Logger,
                leaderWork: @escaping @Sendable () async -> Void) {
        self.election = election
        self.leaderID = leaderID
        self.ttl = ttl
        self.gatesCSI = gatesCSI
        self.leaderWork = leaderWork
        var logger = logger
        logger[metadataKey: "component"] = "leadership"
        self.logger = logger
    }

    public var phase: Phase { state.withLock { $0.phase } }
    public var isLeading: Bool { phase == .leading }
    /// How many times this process has won the lease.
    public var terms: Int { state.withLock { $0.terms } }

    /// Throws UNAVAILABLE unless this process leads (only when it gates CSI).
    public func requireLeading() throws {
        guard gatesCSI, !isLeading else { return }
        throw CairnError.unavailable("this controller lost its leader lease (or has not won it yet); another controller serves")
    }

    /// Campaigns and leads until cancelled.
    public func run() async {
        defer { state.withLock { $0.phase = .stopped } }
        while !Task.isCancelled {
            logger.info("campaigning for the leader lease", metadata: ["leader": "\(leaderID)", "lease.ttl": "\(ttl)s"])
            do {
                try await election.campaign(leaderID: leaderID, ttl: ttl)
            } catch {
                if !Task.isCancelled {  // campaign retries etcd errors itself; anything else ends it
                    logger.error("campaigning for the leader lease failed", metadata: ["error": "\(error)"])
                }
                return
            }
            let term = state.withLock { s -> Int in
                s.phase = .leading
                s.terms += 1
                return s.terms
            }
            logger.notice("this controller leads", metadata: ["leader": "\(leaderID)", "term": "\(term)"])
            let lost = await lead()
            state.withLock { $0.phase = .campaigning }
            guard let lost else {
                await election.resign(leaderID: leaderID)
                return
            }
            logger.error("lost the leader lease: leader-only work stopped; campaigning again",
                         metadata: ["leader": "\(leaderID)", "reason": "\(lost)"])
            // Stop the old lease's keep-alive, should etcd still hold it: it is no longer ours to trust.
            await election.resign(leaderID: leaderID)
        }
    }

    /// Runs the leader-only work until the lease is lost (returns why) or the task is cancelled
    /// (returns nil); the work is cancelled and awaited either way.
    private func lead() async -> String? {
        await withTaskGroup(of: String?.self) { group in
            group.addTask {
                await self.leaderWork()
                return nil
            }
            group.addTask {
                do { return try await self.election.leadershipLost(leaderID: self.leaderID) } catch { return nil }
            }
            var reason: String?
            for await result in group {
                if let result {
                    reason = result
                    break
                }
                if Task.isCancelled { break }
            }
            group.cancelAll()
            await group.waitForAll()
            return Task.isCancelled ? nil : reason
        }
    }
}
