import CairnCore
import CairnCrypto
import CairnEngine
import CairnReplica
import CairnReplicaControl
import CairnRPC
import CairnSecurity
import Dispatch
import Foundation
import Logging
import Synchronization

/// Cluster mode's `VolumeBacking`: a volume is a set of replicas on distinct nodes (placed by the
/// controller, recorded in the volume's record), and the node that stages it runs a
/// `VolumeEngine` that exposes the volume through FUSE as `<data-dir>/engines/<id>/volume`.
///
/// Controller side: `create`/`delete` reach every replica's node through its ReplicaControl
/// service (the data protocol's ops for a node of the previous release: `ReplicaControlClient`).
/// Node side: `activate` starts the engine with the attachment's epoch (claiming the in-sync
/// replicas fences every older holder), `deactivate` stops it. The engine's only way to drop a
/// failed replica is `markReplicaOutOfSync` in the store, conditional on the epoch: if that
/// transaction does not commit, the write that found the failure is not acknowledged.
public final class ReplicatedBacking: VolumeBacking, NodeBacking, EngineHosting {
    let enginesDirectory: String
    let nodeID: String
    let store: any MetadataStore
    /// How this node's engines and the controller's fallback authenticate to replica servers.
    public let security: DataPlaneSecurity
    let logger: Logger
    /// The engines of the volumes staged on this node (idempotent per epoch).
    private let engines: EngineRegistry
    var engineRegistry: EngineRegistry { engines }
    /// This process's replica server, when it runs one: engines reach the local replica
    /// through it directly instead of over loopback TCP.
    private let localServer = Mutex<ReplicaServer?>(nil)
    /// This node's resync bandwidth limit, shared by every engine here.
    let throttle: ResyncThrottle
    let options: RecoveryOptions
    /// The control operations on other nodes' replicas (create, delete, snapshots, clone, grow).
    let control: ReplicaControlClient

    /// How the node's engines recover replicas (docs/recovery.md).
    public struct RecoveryOptions: Sendable {
        /// Resync bandwidth of the node in bytes per second; 0 = unlimited.
        public var rebuildBytesPerSecond: UInt64
        /// Bytes per second the scrub verifies on each replica of a staged volume; 0 = off.
        public var scrubBytesPerSecond: UInt64
        /// Seconds before a failed resync is tried again (doubling, up to a minute).
        public var retrySeconds: Double

        public init(rebuildBytesPerSecond: UInt64 = 0, scrubBytesPerSecond: UInt64 = 0, retrySeconds: Double = 5) {
            self.rebuildBytesPerSecond = rebuildBytesPerSecond
            self.scrubBytesPerSecond = scrubBytesPerSecond
            self.retrySeconds = retrySeconds
        }
    }

    public init(dataDir: String, nodeID: String, store: any MetadataStore, recovery: RecoveryOptions = RecoveryOptions(),
                keeper: FUSEKeeperClient? = nil, security: DataPlaneSecurity = .insecure, logger: Logger) throws {
        enginesDirectory = dataDir + "/engines"
        self.security = security
        self.nodeID = nodeID
        self.store = store
        self.logger = logger
        self.options = recovery
        self.throttle = ResyncThrottle(bytesPerSecond: recovery.rebuildBytesPerSecond)
        engines = EngineRegistry(logger: logger, keeper: keeper)
        control = ReplicaControlClient(logger: logger, security: security)
        try FileManager.default.createDirectory(atPath: enginesDirectory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
    }

    /// Engines started from now on read and write this node's replicas through `server`'s
    /// open stores (in process) rather than over TCP to it.
    public func serveLocalReplicas(from server: ReplicaServer) {
        localServer.withLock { $0 = server }
        // Barrier snapshots addressed to this node reach the engines it runs.
        server.engineHooks = engineHooks
        logger.info("engines reach this node's replicas in process", metadata: ["node.id": "\(nodeID)"])
    }

    // MARK: Controller side

    public func create(_ volume: VolumeRecord) async throws {
        guard let replicas = volume.replicas, !replicas.isEmpty else {
            throw CairnError.internal("volume \(volume.id) has no replicas placed; this is a controller bug")
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for replica in replicas {
                group.addTask { try await self.createReplica(volume, replica: replica) }
            }
            try await group.waitForAll()
        }
        logger.info("created the volume's replicas", metadata: [
            "volume.id": "\(volume.id)", "replicas": "\(replicas.map(\.nodeID).joined(separator: ","))",
        ])
    }

    public func createReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
        let node = await replicaNode(replica)
        do {
            try await control.createReplica(node, volumeID: volume.id, sizeBytes: UInt64(volume.capacityBytes))
        } catch let error as CairnError where error.code == .unavailable {
            throw error  // already says which node could not be reached
        } catch {
            throw CairnError.unavailable(
                "could not create volume \(volume.id)'s replica on node \(replica.nodeID) (\(replica.address)): \(error); check that node's agent log, or retry")
        }
    }

    /// How `replica`'s node is reached: its data address as placed, and the control address
    /// its record names (none when the record cannot be read: the data protocol then).
    func replicaNode(_ replica: ReplicaRecord) async -> ReplicaNode {
        await replicaNode(replica.nodeID, dataAddress: replica.address)
    }

    func replicaNode(_ nodeID: String, dataAddress: String) async -> ReplicaNode {
        let record = try? await store.node(id: nodeID)
        return ReplicaNode(nodeID: nodeID, dataAddress: dataAddress, controlAddress: record?.controlAddress)
    }

    /// Deletes the replica on its node; when the node cannot be asked (it is away), records the
    /// deletion in the store instead, and the node's `ReplicaSweeper` does it when it runs again.
    /// Either way no pending deletion is left behind a replica that is gone. Throws only when
    /// neither worked (the store is unreachable too).
    public func deleteReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
        try await deleteReplica(volume, replica: replica, reason: "replaced by re-replication")
    }

    func deleteReplica(_ volume: VolumeRecord, replica: ReplicaRecord, reason: String) async throws {
        do {
            try await control.deleteReplica(await replicaNode(replica), volumeID: volume.id)
        } catch {
            let pending = ReplicaDeletion(nodeID: replica.nodeID, volumeID: volume.id, reason: reason)
            do {
                try await store.recordReplicaDeletions([pending])
            } catch let recording {
                throw CairnError.unavailable(
                    "could not delete volume \(volume.id)'s replica on node \(replica.nodeID) (\(error)) nor record its deletion for that node (\(recording)); remove <data-dir>/replicas/\(volume.id) on that node by hand")
            }
            logger.warning("could not delete a replica; its node removes it when it runs again", metadata: [
                "volume.id": "\(volume.id)", "node.id": "\(replica.nodeID)", "reason": "\(reason)", "error": "\(error)"])
            return
        }
        // Done here: a deletion recorded earlier (DeleteVolume's transaction, re-replication) is moot.
        try? await store.removeReplicaDeletion(nodeID: replica.nodeID, volumeID: volume.id, token: nil)
    }

    public func delete(_ volume: VolumeRecord) async throws {
        for replica in volume.replicas ?? [] {
            do {
                try await deleteReplica(volume, replica: replica, reason: "volume \(volume.id) deleted")
            } catch {
                // The volume goes anyway: the replica holds disk space but no volume anyone can reach.
                logger.error("a replica of the deleted volume is orphaned", metadata: [
                    "volume.id": "\(volume.id)", "node.id": "\(replica.nodeID)", "error": "\(error)"])
            }
        }
    }

    // MARK: Node side

    public func file(volumeID: String) throws -> String {
        try Validate.volumeID(volumeID)
        return "\(enginesDirectory)/\(volumeID)/volume"
    }

    public func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) async throws -> String {
        try Validate.volumeID(volume.id)
        // Already serving this epoch: no store read. (A newer epoch restarts the engine: the registry.)
        if let running = engines.state(volumeID: volume.id), running.epoch == epoch.rawValue, let path = running.path {
            return path
        }
        // The freshest record: which replicas are in sync is the store's, not the caller's copy.
        let current = try await store.volume(id: volume.id) ?? volume
        guard let replicas = current.replicas else {
            throw CairnError.internal("volume \(volume.id) has no replicas; it was not created in cluster mode")
        }
        let inSync = replicas.filter(\.inSync)
        guard !inSync.isEmpty else {
            throw CairnError.failedPrecondition(
                "volume \(volume.id) has no replica in sync (\(replicas.map { "\($0.nodeID): \($0.reason ?? "out of sync")" }.joined(separator: "; "))); its data cannot be served until a replica that holds every acknowledged write returns")
        }
        // An encrypted volume's engine encrypts with the key NodeStage unwrapped: without it,
        // it must not serve (the replicas hold ciphertext), whatever restarted it.
        let cipher: VolumeCipher?
        if current.isEncrypted {
            // After a restart of this process, the FUSE keeper kept the key with the connection.
            guard let key = key ?? engines.keptKey(volumeID: volume.id) else {
                throw CairnError.failedPrecondition(
                    "volume \(volume.id) is encrypted and its key is not loaded on node \(nodeID) (the process serving it restarted, or no passphrase came): call NodeStageVolume with the secret `\(EncryptionNames.passphraseSecret)` again")
            }
            cipher = try VolumeCipher(key)
        } else {
            cipher = nil
        }
        // Every replica: the engine claims the in-sync ones and resyncs the others.
        let targets = try Self.engineReplicas(replicas)
        let store = self.store
        let volumeID = volume.id
        let localReplicas = localServer.withLock { $0 }
        let (engines, nodeID, security) = (self.engines, self.nodeID, self.security)
        let (sizeBytes, mountDirectory) = (UInt64(current.capacityBytes), "\(enginesDirectory)/\(volume.id)")
        let connect: @Sendable (EngineReplica) throws -> any ReplicaIO = { replica in
            if replica.nodeID == nodeID, let server = localReplicas {
                return try LocalReplicaIO(server: server, volumeID: volumeID)
            }
            return ClientReplicaIO(try ReplicaClient.connect(host: replica.host, port: replica.port, security: security,
                                                             expectedNode: replica.nodeID), grant: grant)
        }
        let logger = self.logger
        let markOutOfSync: @Sendable (String, String) throws -> Void = { failedNode, reason in
            do {
                try Self.waitFor(seconds: 15, what: "recording that node \(failedNode)'s replica is out of sync") {
                    try await store.markReplicaOutOfSync(volumeID: volumeID, nodeID: failedNode, epoch: epoch, reason: reason)
                }
                store.recordEvent(ClusterEvent(kind: .replicaOutOfSync, volumeID: volumeID, nodeID: failedNode,
                                               message: "node \(failedNode)'s replica left the in-sync set (engine on \(nodeID), epoch \(epoch)): \(reason)"),
                                  logger: logger)
            } catch let error as CairnError where error.code == .failedPrecondition {
                // The store's epoch moved on: another node holds the volume now.
                throw EngineFenced(error.message)
            } catch let error as CairnError where error.code == .notFound && error.message.contains("has no replica") {
                // The controller already replaced that replica (re-replication): it is not in
                // the volume's set any more, which is what recording it out of sync asks for.
                return
            }
        }
        let recovery = recoveryHooks(volumeID: volumeID, epoch: epoch)
        let limits = Self.limits(current)
        let minInSync = current.minInSync
        let writeThrough = current.writeThrough
        let file = try await offCooperativePool {
            let file = try engines.start(volumeID: volumeID, sizeBytes: sizeBytes, epoch: epoch.rawValue, replicas: targets,
                                         localNodeID: nodeID, mountDirectory: mountDirectory,
                                         connect: connect, markOutOfSync: markOutOfSync, recovery: recovery, cipher: cipher,
                                         writeThrough: writeThrough)
            if limits.iops > 0 || limits.bandwidth > 0 {
                engines.engine(volumeID: volumeID)?.setLimits(iopsLimit: limits.iops, bandwidthLimit: limits.bandwidth)
            }
            // Before the node attaches a loop device to the file: no I/O has reached it yet.
            engines.engine(volumeID: volumeID)?.setMinInSync(minInSync)
            return file
        }
        logger.info("the volume's engine is serving it", metadata: [
            "volume.id": "\(volume.id)", "volume.epoch": "\(epoch)", "file": "\(file)",
            "replicas": "\(inSync.map(\.nodeID).joined(separator: ","))",
        ])
        return file
    }

    static func engineReplicas(_ replicas: [ReplicaRecord]) throws -> [EngineReplica] {
        try replicas.map { r in
            let address = try ReplicaAddress(r.address)
            return EngineReplica(nodeID: r.nodeID, host: address.host, port: address.port, inSync: r.inSync)
        }
    }

    /// The engine's way to the store for recovery: the replica list (re-replication changes
    /// it), the rejoin transaction and progress records, all conditional on `epoch`.
    private func recoveryHooks(volumeID: String, epoch: FencingEpoch) -> EngineRecovery {
        let store = self.store
        let logger = self.logger
        let engines = self.engines
        var hooks = EngineRecovery(
            membership: {
                let record = Mutex<VolumeRecord?>(nil)
                try Self.waitFor(seconds: 15, what: "reading volume \(volumeID)'s replicas") {
                    let volume = try await store.volume(id: volumeID)
                    record.withLock { $0 = volume }
                }
                guard let volume = record.withLock({ $0 }), let replicas = volume.replicas else { return [] }
                // ControllerModifyVolume runs in the controller: its new limits reach this
                // engine through the record, read here every membership interval.
                if let engine = engines.engine(volumeID: volumeID) {
                    let wanted = Self.limits(volume)
                    if engine.limits != wanted {
                        engine.setLimits(iopsLimit: wanted.iops, bandwidthLimit: wanted.bandwidth)
                        logger.info("applied the volume's new QoS limits", metadata: [
                            "volume.id": "\(volumeID)", "limits.iops": "\(wanted.iops)", "limits.bandwidth": "\(wanted.bandwidth)"])
                    }
                }
                return try Self.engineReplicas(replicas)
            },
            markInSync: { node in
                do {
                    try Self.waitFor(seconds: 15, what: "recording that node \(node)'s replica is in sync again") {
                        try await store.markReplicaInSync(volumeID: volumeID, nodeID: node, epoch: epoch)
                    }
                    store.recordEvent(ClusterEvent(kind: .replicaInSync, volumeID: volumeID, nodeID: node,
                                                   message: "node \(node)'s replica is in sync again (resync done)"),
                                      logger: logger)
                } catch let error as CairnError where error.code == .failedPrecondition {
                    throw EngineFenced(error.message)
                }
            },
            reportProgress: { node, report in
                let progress = report.map(Self.progressRecord)
                Task {
                    do {
                        try await store.recordResyncProgress(volumeID: volumeID, nodeID: node, epoch: epoch, progress: progress)
                    } catch {
                        logger.debug("could not record resync progress", metadata: [
                            "volume.id": "\(volumeID)", "replica.node": "\(node)", "error": "\(error)"])
                    }
                }
            },
            throttle: throttle, retryInterval: options.retrySeconds,
            scrubBytesPerSecond: options.scrubBytesPerSecond)
        hooks.report = { event in store.recordEvent(event, logger: logger) }
        return hooks
    }

    static func progressRecord(_ report: ResyncReport) -> ResyncProgress {
        ResyncProgress(bytesTotal: Int64(report.bytesTotal), bytesDone: Int64(report.bytesDone),
                       bytesPerSecond: Int64(report.bytesPerSecond), startedAt: report.startedAt, updatedAt: Date(),
                       phase: report.phase.rawValue + (report.lastError.map { ": \($0)" } ?? ""))
    }

    public func deactivate(volumeID: String) async throws {
        try Validate.volumeID(volumeID)
        let (engines, logger) = (self.engines, self.logger)
        let mountDirectory = "\(enginesDirectory)/\(volumeID)"
        if engines.state(volumeID: volumeID) != nil {
            await offCooperativePool { engines.stop(volumeID: volumeID) }
            logger.info("stopped the volume's engine", metadata: ["volume.id": "\(volumeID)"])
        }
        // A killed process's engine left its mount here (NodeUnstage after a crash): the node
        // has detached the loop devices on it by now, so it goes too.
        try await offCooperativePool {
            _ = try DeadFUSEMounts.detach(under: mountDirectory, exactly: true, logger: logger)
        }
    }

    /// The engines' process-level duties (hand-over, the directory lock, recovery at start).
    public var engineHost: EngineHost { EngineHost(engines: engines, enginesDirectory: enginesDirectory, logger: logger) }

    // MARK: Condition

    /// The node's view: the volume's replicas as the controller sees them, and whether this
    /// process's engine serves it (NodeGetVolumeStats reports a staged volume no engine serves
    /// as abnormal).
    public func condition(_ volume: VolumeRecord) -> BackingCondition {
        let problems = [problem(volume), servingProblem(volumeID: volume.id)].compactMap { $0 }
        return BackingCondition(problem: problems.isEmpty ? nil : problems.joined(separator: "; "),
                                healthy: healthy(volume), stageBlocker: stageBlocker(volume))
    }

    func servingProblem(volumeID: String) -> String? {
        guard let state = engines.state(volumeID: volumeID), state.path != nil else {
            return "no engine serves volume \(volumeID) on this node (its process restarted and the FUSE connection could not be resumed, or the engine failed to start): I/O on its device fails; NodeStageVolume starts it again, or unstage and stage the volume"
        }
        if state.fenced {
            return "this node's engine was fenced (a replica has seen a newer epoch: the volume is attached elsewhere now); every I/O here fails: unpublish and unstage it on this node"
        }
        return nil
    }

    public func problem(_ volume: VolumeRecord) -> String? {
        if let blocker = stageBlocker(volume) { return blocker }
        guard let replicas = volume.replicas else { return nil }
        let out = replicas.filter { !$0.inSync }
        guard !out.isEmpty else { return nil }
        let inSync = replicas.filter(\.inSync)
        let refused = inSync.count < volume.minInSync
            ? "writes refused: minInSync=\(volume.minInSync) but only \(inSync.count) replica\(inSync.count == 1 ? " is" : "s are") in sync (they are served again once a replica is back in sync); "
            : ""
        return refused + "degraded: \(inSync.count) of \(replicas.count) replicas in sync (\(inSync.map(\.nodeID).joined(separator: ", "))); out of sync: "
            + out.map { r in
                "\(r.nodeID)" + (r.outOfSyncSince.map { " since \(Self.timestamp($0))" } ?? "") + (r.reason.map { ": \($0)" } ?? "")
                    + (r.resync.map { "; resyncing: \($0.summary)" } ?? "")
            }.joined(separator: "; ") + repairs(volume.id)
    }

    public func stageBlocker(_ volume: VolumeRecord) -> String? {
        guard let replicas = volume.replicas else { return "volume \(volume.id) was not created in cluster mode (no replicas)" }
        if !replicas.contains(where: \.inSync) { return "no replica of volume \(volume.id) is in sync" }
        if let running = engines.state(volumeID: volume.id), running.fenced {
            return "this node's engine for volume \(volume.id) was fenced: another node holds a newer epoch than \(running.epoch); unstage it here"
        }
        return nil
    }

    public func healthy(_ volume: VolumeRecord) -> String {
        let replicas = volume.replicas ?? []
        return "healthy: \(replicas.count) of \(replicas.count) replicas in sync (\(replicas.map(\.nodeID).joined(separator: ", ")))"
            + repairs(volume.id)
    }

    /// What this node's engine repaired, when it serves the volume ("" otherwise).
    private func repairs(_ volumeID: String) -> String {
        guard let state = engines.state(volumeID: volumeID) else { return "" }
        var parts: [String] = []
        if state.repairedBlocks > 0 { parts.append("repaired \(state.repairedBlocks) corrupted block\(state.repairedBlocks == 1 ? "" : "s") from another replica") }
        if state.unrepairableBlocks > 0 { parts.append("\(state.unrepairableBlocks) corrupted block(s) had no good copy (reads of them fail)") }
        if state.scrubPasses > 0 { parts.append("\(state.scrubPasses) scrub pass\(state.scrubPasses == 1 ? "" : "es") complete") }
        return parts.isEmpty ? "" : "; " + parts.joined(separator: "; ")
    }

    // MARK: Helpers

    static func connect(_ address: String, volumeID: String, nodeID: String, doing: String,
                        security: DataPlaneSecurity) throws -> ReplicaClient {
        do {
            let parsed = try ReplicaAddress(address)
            return try ReplicaClient.connect(host: parsed.host, port: parsed.port, security: security, expectedNode: nodeID)
        } catch {
            throw CairnError.unavailable(
                "cannot reach node \(nodeID)'s replica server at \(address) to \(doing) for volume \(volumeID): \(error); check that its agent runs and the address is reachable")
        }
    }

    static func timestamp(_ date: Date) -> String {
        date.formatted(.iso8601)
    }

    /// Runs async store work from a blocking thread (a FUSE worker), with a deadline: a write
    /// must not hang forever on a store that went away.
    static func waitFor(seconds: Int, what: String, _ work: @escaping @Sendable () async throws -> Void) throws {
        let result = Mutex<Result<Void, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task {
            let outcome: Result<Void, any Error>
            do { try await work(); outcome = .success(()) } catch { outcome = .failure(error) }
            result.withLock { $0 = outcome }
            done.signal()
        }
        if done.wait(timeout: .now() + .seconds(seconds)) == .timedOut {
            throw CairnError.unavailable("the metadata store did not answer within \(seconds) s while \(what)")
        }
        try result.withLock { $0 }!.get()
    }
}
