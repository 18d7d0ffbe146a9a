import CairnCore
import CairnCrypto
import Foundation
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
    /// Where engines keep their FUSE descriptors across a restart of this process.
    public let keeper: FUSEKeeperClient?
    /// Connections a dead predecessor's engines left with the keeper, by volume, until an engine
    /// of the volume resumes them (or `releaseUnresumed` lets them go).
    private let kept = Mutex<[String: KeptFUSE]>([:])

    public init(logger: Logger, keeper: FUSEKeeperClient? = nil) {
        self.logger = logger
        self.keeper = keeper
    }

    /// At start-up, before anything looks for dead FUSE mounts: takes what the keeper holds for
    /// this data directory. Each such mount counts as live (not aborted, not detached) until its
    /// volume's engine resumes it or `releaseUnresumed` runs. Returns the volumes.
    @discardableResult
    public func adoptKeptConnections() -> [String] {
        guard let keeper else { return [] }
        let list = keeper.start()
        kept.withLock { kept in
            for (entry, fd) in list {
                kept[entry.volumeID] = KeptFUSE(entry: entry, fd: fd)
                DeadFUSEMounts.register(mountPoint: entry.mountPoint, connection: entry.connection)
            }
        }
        if !list.isEmpty {
            logger.notice("the FUSE keeper kept the connections of volumes staged before this process started; their engines resume them",
                          metadata: ["volumes": "\(list.map(\.0.volumeID).sorted())",
                                     "kernel.resend": "\(FUSEResume.kernelSupportsResend())"])
        }
        return list.map(\.0.volumeID)
    }

    /// The data key the keeper kept with an encrypted volume's connection (nil: none kept).
    public func keptKey(volumeID: String) -> VolumeDataKey? {
        kept.withLock { $0[volumeID]?.entry.dataKey }
    }

    /// After the node's records were restored: kept connections no engine resumed belong to
    /// volumes no longer staged here; the keeper lets go of them and they count as dead again.
    public func releaseUnresumed() -> [KeptConnection] {
        let left = kept.withLock { kept in
            defer { kept.removeAll() }
            return Array(kept.values)
        }
        for item in left {
            DeadFUSEMounts.unregister(mountPoint: item.entry.mountPoint)
            keeper?.drop(volumeID: item.entry.volumeID)
        }
        if !left.isEmpty {
            logger.warning("kept FUSE connections of volumes not staged here any more were let go",
                           metadata: ["volumes": "\(left.map(\.entry.volumeID).sorted())"])
        }
        return left.map(\.entry)
    }

    public func start(volumeID: String, sizeBytes: UInt64, epoch: UInt64, replicas: [EngineReplica], localNodeID: String,
                      mountDirectory: String,
                      connect: @escaping @Sendable (EngineReplica) throws -> any ReplicaIO,
                      markOutOfSync: @escaping @Sendable (_ nodeID: String, _ reason: String) throws -> Void,
                      recovery: EngineRecovery? = nil, cipher: VolumeCipher? = nil,
                      writeThrough: Bool = true) throws -> String {
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
            let resume = kept.withLock { $0.removeValue(forKey: volumeID) }
            let engine = VolumeEngine(volumeID: volumeID, sizeBytes: sizeBytes, epoch: epoch, replicas: replicas,
                                      localNodeID: localNodeID, mountDirectory: mountDirectory,
                                      connect: connect, markOutOfSync: markOutOfSync, recovery: recovery,
                                      keeper: keeper, resume: resume, cipher: cipher, writeThrough: writeThrough,
                                      logger: logger)
            let path: String
            do {
                path = try engine.start()
            } catch {
                // Failed before it reached the mount (the replicas): the kept connection waits
                // for the next attempt (NodeStage retries).
                if let unused = engine.takeUnusedResume() { kept.withLock { $0[volumeID] = unused } }
                engine.metrics.destroy()
                throw error
            }
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

    /// SIGTERM with volumes staged: every engine stops serving new requests and finishes the
    /// ones it serves (in parallel), leaving its FUSE connection to the keeper and the next
    /// process. Nothing is unmounted.
    public func handOverAll(timeout: Duration = .seconds(5)) {
        let all = engines.withLock { Array($0.values) }
        let group = DispatchGroup()
        for engine in all {
            group.enter()
            Thread.detachNewThread {
                engine.handOver(timeout: timeout)
                group.leave()
            }
        }
        group.wait()
    }

    public func stopAll() {
        engines.withLock { engines in
            for engine in engines.values { engine.stop() }
            engines.removeAll()
        }
    }
}
