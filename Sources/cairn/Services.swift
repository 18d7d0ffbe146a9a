import CairnCluster
import CairnCore
import CairnController
import CairnReplica
import CairnStore
import Dispatch
import Logging
import ServiceLifecycle

// The process's long-running parts as lifecycle services, all in `Serve`'s one ServiceGroup.
// The group starts them in the order listed there and, on SIGTERM/SIGINT, shuts them down in
// the reverse order, each after the previous one returned:
//
//   1. RPCServers          stop taking CSI and agent calls, drain those in flight
//   2. leadership          stop re-replication, give the leader lease up (a standby takes over)
//   3. sweeper             the node's orphaned-replica sweeper
//   4. enginesKept         hand the engines over: no new FUSE request served here, the running
//                          ones finish; their mounts outlive the process (the keeper)
//   5. replicaServer       stop serving this node's replicas to other nodes' engines
//   6. storeLeases         end the node registration's keep-alive and revoke it
//   7. observability       the --metrics-address listener (CairnObservability), first up and last
//                          down; the controller's cluster gauges stop with the background work

/// A service that logs its start and stop, for the start-up and shutdown sequence to read in
/// the log.
func logged(_ name: String, _ logger: Logger, _ body: () async throws -> Void) async rethrows {
    logger.info("service started", metadata: ["service": "\(name)"])
    defer { logger.info("service stopped", metadata: ["service": "\(name)"]) }
    try await body()
}

/// A loop that runs until cancelled; SIGTERM cancels it.
struct BackgroundLoop: Service {
    let name: String
    let logger: Logger
    let body: @Sendable () async -> Void

    func run() async throws {
        await logged(name, logger) {
            await cancelWhenGracefulShutdown { await body() }
        }
    }

    /// The controller's leadership (campaign, lead, campaign again on loss): cancelling it
    /// stops the leader-only work (re-replication) and revokes the lease, so a standby takes
    /// over at once instead of after the TTL.
    static func leadership(_ leadership: ControllerLeadership, logger: Logger) -> Self {
        Self(name: "leadership", logger: logger) { await leadership.run() }
    }

    /// Gives the process's freed heap back to the kernel after an idle spell
    /// (`IdleHeapTrimPolicy`); nothing when `CAIRN_IDLE_TRIM_SECONDS` is 0.
    static func idleHeapTrim(logger: Logger) -> Self? {
        let seconds = IdleHeapTrim.idleSeconds
        guard seconds > 0 else { return nil }
        return Self(name: "idle-heap-trim", logger: logger) {
            var policy = IdleHeapTrimPolicy(idleNanoseconds: UInt64(seconds * 1e9))
            let interval = min(5.0, max(0.5, seconds / 6))
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(interval))
                guard !Task.isCancelled else { return }
                guard policy.sample(time: monotonicNanoseconds(), cpu: IdleHeapTrim.processCPUNanoseconds()) else { continue }
                let (before, after) = IdleHeapTrim.trim()
                let mib = { (bytes: UInt64) in String(format: "%.1f", Double(bytes) / 1_048_576) }
                logger.log(level: before > after &+ (4 << 20) ? .info : .debug,
                           "idle: gave the heap's free pages back to the kernel",
                           metadata: ["rss.before_mib": "\(mib(before))", "rss.after_mib": "\(mib(after))",
                                      "idle_seconds": "\(seconds)"])
            }
        }
    }

    /// The node's sweeper of orphaned replicas.
    static func sweeper(_ sweeper: ReplicaSweeper, logger: Logger) -> Self {
        Self(name: "orphaned-replica-sweeper", logger: logger) { await sweeper.run() }
    }
}

/// Something already running (started before the group, because what follows needs it) that
/// only has to be ended on shutdown: `onShutdown` runs when SIGTERM reaches this service.
struct UntilShutdown: Service {
    let name: String
    let logger: Logger
    let onShutdown: @Sendable () async -> Void

    func run() async throws {
        await logged(name, logger) {
            try? await gracefulShutdown()
            await onShutdown()
        }
    }

    /// This node's replica server (listening before the node registers: its bound port is
    /// recorded). Stops accepting, lets running requests finish, closes the replicas cleanly.
    static func replicaServer(_ server: ReplicaServer, logger: Logger) -> Self {
        Self(name: "replica-server", logger: logger) {
            // stop() blocks until the server's threads end: off the cooperative pool.
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                DispatchQueue.global().async {
                    server.stop()
                    done.resume()
                }
            }
        }
    }

    /// The staged volumes' engines (FUSE servers, their recovery threads). Deliberately NOT
    /// stopped on SIGTERM: the FUSE keeper holds their connections (docs/design.md "Engines
    /// survive their process"), so the next process resumes them; stopping them would unmount
    /// the volumes under their users. They are *handed over* instead, before the replica server
    /// stops: no new request is served here, the ones being served finish, and the kernel keeps
    /// what arrives meanwhile for the next process (resent). A clean shutdown therefore leaves
    /// every staged volume's FUSE mount in place, exactly as a crash does — without recording
    /// this node's own replica out of sync because the replica server went first.
    static func enginesKept(_ backing: EngineHost?, logger: Logger) -> Self {
        Self(name: "engines", logger: logger) {
            logger.notice("handing the staged volumes' engines over to the next process: their mounts stay with the FUSE keeper")
            guard let backing else { return }
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                DispatchQueue.global().async {
                    backing.handOverEngines()
                    done.resume()
                }
            }
        }
    }

    /// The etcd leases this process keeps alive for its node registration: ended last, once
    /// nothing that needs the store runs any more, and revoked, so other nodes see this one
    /// gone at once (its replicas are then written around, not waited for).
    static func storeLeases(_ store: EtcdStore, logger: Logger) -> Self {
        Self(name: "store-leases", logger: logger) { await store.stop() }
    }
}
