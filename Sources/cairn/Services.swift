import CairnCluster
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
//   2. ControllerLeading   stop re-replication, give the leader lease up (a standby takes over)
//   3. BackgroundLoop      the node's orphaned-replica sweeper
//   4. ReplicaServing      stop serving this node's replicas to other nodes' engines
//   5. EnginesKept         nothing: the engines and their FUSE mounts outlive the process
//   6. StoreLeases         end the node registration's keep-alive and revoke it

/// A service that logs its start and stop, for the start-up and shutdown sequence to read in
/// the log.
func logged(_ name: String, _ logger: Logger, _ body: () async throws -> Void) async rethrows {
    logger.info("service started", metadata: ["service": "\(name)"])
    defer { logger.info("service stopped", metadata: ["service": "\(name)"]) }
    try await body()
}

/// The controller's leadership (campaign, lead, campaign again on loss); SIGTERM cancels it,
/// which stops the leader-only work and revokes the lease.
struct ControllerLeading: Service {
    let leadership: ControllerLeadership
    let logger: Logger

    func run() async throws {
        await logged("leadership", logger) {
            await cancelWhenGracefulShutdown { await leadership.run() }
        }
    }
}

/// A loop that runs until cancelled (ReplicaSweeper); SIGTERM cancels it.
struct BackgroundLoop: Service {
    let name: String
    let logger: Logger
    let body: @Sendable () async -> Void

    func run() async throws {
        await logged(name, logger) {
            await cancelWhenGracefulShutdown { await body() }
        }
    }
}

/// This node's replica server (already listening: its bound port is registered with the node).
/// On shutdown it stops accepting, lets running requests finish and closes the replicas cleanly.
struct ReplicaServing: Service {
    let server: ReplicaServer
    let logger: Logger

    func run() async throws {
        await logged("replica-server", logger) {
            try? await gracefulShutdown()
            // stop() blocks until the server's threads end: off the cooperative pool.
            await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
                DispatchQueue.global().async {
                    server.stop()
                    done.resume()
                }
            }
        }
    }
}

/// The staged volumes' engines (FUSE servers, their recovery threads). Deliberately NOT stopped
/// on SIGTERM: the FUSE keeper holds their connections (docs/design.md "Engines survive their
/// process"), so the next process resumes them; stopping them would unmount the volumes under
/// their users. A clean shutdown therefore leaves every staged volume's FUSE mount in place,
/// exactly as a crash does, and the kernel queues (or resends) the I/O in flight until the next
/// process takes the connections back. This service only says so in the log.
struct EnginesKept: Service {
    let backing: ReplicatedBacking
    let logger: Logger

    func run() async throws {
        await logged("engines", logger) {
            try? await gracefulShutdown()
            logger.notice("leaving the staged volumes' engines to the FUSE keeper: their mounts stay, the next process resumes them")
        }
    }
}

/// The etcd leases this process keeps alive for its node registration: ended last, once
/// nothing that needs the store runs any more, and revoked, so other nodes see this one gone at
/// once (its replicas are then written around, not waited for).
struct StoreLeases: Service {
    let store: EtcdStore
    let logger: Logger

    func run() async throws {
        await logged("store-leases", logger) {
            try? await gracefulShutdown()
            await store.stop()
        }
    }
}
