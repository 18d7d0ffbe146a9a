import CairnCore
import Logging
import Synchronization

/// The engines of the volumes staged on this node, one per volume id.
///
/// `start` is idempotent (NodeStage is repeated after reboots and by retrying COs): the same
/// epoch returns the running engine's path; a higher epoch (a new publish, a failover back to
/// this node) stops the old engine and starts one with the new epoch; a lower one is refused.
/// Calls are serialized: starting an engine takes a moment, and two starts of one volume must
/// not race for its mount directory.
public final class EngineRegistry: Sendable {
    private let engines = Mutex<[String: VolumeEngine]>([:])
    private let logger: Logger

    public init(logger: Logger) {
        self.logger = logger
    }

    public func start(volumeID: String, sizeBytes: UInt64, epoch: UInt64, replicas: [EngineReplica], localNodeID: String,
                      mountDirectory: String,
                      connect: @escaping @Sendable (EngineReplica) throws -> any ReplicaIO,
                      markOutOfSync: @escaping @Sendable (_ nodeID: String, _ reason: String) throws -> Void,
                      recovery: EngineRecovery? = nil) throws -> String {
        try engines.withLock { engines in
            if let running = engines[volumeID] {
                if running.epoch == epoch && running.mountDirectory == mountDirectory {
                    return try running.start()
                }
                guard epoch > running.epoch else {
                    throw CairnError.failedPrecondition(
                        "volume \(volumeID) is served here with epoch \(running.epoch), newer than the requested \(epoch); the request is stale")
                }
                logger.info("restarting the volume engine with a newer epoch", metadata: [
                    "volume.id": "\(volumeID)", "epoch.old": "\(running.epoch)", "epoch.new": "\(epoch)"])
                running.stop()
                engines[volumeID] = nil
            }
            let engine = VolumeEngine(volumeID: volumeID, sizeBytes: sizeBytes, epoch: epoch, replicas: replicas,
                                      localNodeID: localNodeID, mountDirectory: mountDirectory,
                                      connect: connect, markOutOfSync: markOutOfSync, recovery: recovery,
                                      logger: logger)
            let path = try engine.start()
            engines[volumeID] = engine
            return path
        }
    }

    /// Stops and forgets the volume's engine; nothing to do if none runs.
    public func stop(volumeID: String) {
        engines.withLock { engines in
            engines.removeValue(forKey: volumeID)?.stop()
        }
    }

    /// The running engine of `volumeID`, for control operations (snapshot, grow, limits).
    public func engine(volumeID: String) -> VolumeEngine? {
        engines.withLock { $0[volumeID] }
    }

    public func state(volumeID: String) -> EngineState? {
        engines.withLock { $0[volumeID] }?.state
    }

    public var volumeIDs: [String] {
        engines.withLock { Array($0.keys) }.sorted()
    }

    public func stopAll() {
        engines.withLock { engines in
            for engine in engines.values { engine.stop() }
            engines.removeAll()
        }
    }
}
