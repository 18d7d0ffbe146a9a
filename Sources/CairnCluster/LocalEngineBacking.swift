import CairnCore
import CairnCrypto
import CairnEngine
import CairnLocal
import Foundation
import Logging

/// One machine's backing (`--store sqlite`) with encrypted volumes (docs/encryption.md, "One
/// machine"): a plain volume stays a loop device on its sparse file (`LocalFileBacking`, every
/// call delegated); an encrypted volume's file holds ciphertext and is served through an engine
/// whose one replica is that file (`FileReplicaIO`): the loop device sits on the engine's FUSE
/// file `<data-dir>/engines/<id>/volume`, and the engine encrypts every block before it reaches
/// the file. Snapshots, clones and growth stay the file backing's (they copy and extend
/// ciphertext); `<data-dir>/volumes/<id>.encrypted` marks the volumes served through an engine.
/// As in a cluster, the FUSE keeper holds each engine's connection and data key, so a restart of
/// `cairn serve` resumes an encrypted volume's I/O without a new NodeStage (`EngineHost`).
public final class LocalEngineBacking: VolumeBacking, NodeBacking, EngineHosting {
    public let files: LocalFileBacking
    let engines: EngineRegistry
    let enginesDirectory: String
    let nodeID: String
    let logger: Logger

    public init(files: LocalFileBacking, dataDir: String, nodeID: String, keeper: FUSEKeeperClient? = nil, logger: Logger) throws {
        self.files = files
        self.enginesDirectory = dataDir + "/engines"
        self.nodeID = nodeID
        self.logger = logger
        self.engines = EngineRegistry(logger: logger, keeper: keeper)
        try FileManager.default.createDirectory(atPath: enginesDirectory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
    }

    public var engineHost: EngineHost { EngineHost(engines: engines, enginesDirectory: enginesDirectory, logger: logger) }

    func marker(_ volumeID: String) throws -> String {
        try Validate.volumeID(volumeID)
        return "\(files.directory)/\(volumeID).encrypted"
    }

    func isEngineServed(_ volumeID: String) -> Bool {
        (try? marker(volumeID)).map { FileManager.default.fileExists(atPath: $0) } ?? false
    }

    private func mark(_ volume: VolumeRecord) throws {
        guard volume.isEncrypted else { return }
        let path = try marker(volume.id)
        guard FileManager.default.createFile(atPath: path, contents: nil, attributes: [.posixPermissions: 0o600]) else {
            throw CairnError.internal("cannot create \(path)")
        }
    }

    // MARK: Controller side (the file backing's, plus the marker)

    public func create(_ volume: VolumeRecord) async throws {
        try files.create(volume)
        try mark(volume)
    }

    public func delete(_ volume: VolumeRecord) async throws {
        try files.delete(volume)
        let path = try marker(volume.id)
        if unlink(path) != 0 && errno != ENOENT { throw SystemError("unlink \(path)", errno: errno) }
    }

    public func problem(_ volume: VolumeRecord) -> String? { files.problem(volume) }
    public func healthy(_ volume: VolumeRecord) -> String { files.healthy(volume) }

    public func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]? {
        try await files.takeSnapshot(snapshot, of: volume, in: use)
    }

    public func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?] {
        try await files.takeGroupSnapshot(members)
    }

    public func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) async throws {
        try files.deleteSnapshot(snapshot, source: source)
    }

    public func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) async throws {
        try files.createFromSnapshot(volume, snapshot: snapshot, source: source)
        try mark(volume)
    }

    public func expand(_ volume: VolumeRecord) async throws { try files.expand(volume) }

    // MARK: Node side

    public func file(volumeID: String) throws -> String {
        isEngineServed(volumeID) ? "\(enginesDirectory)/\(volumeID)/volume" : try files.file(volumeID: volumeID)
    }

    public func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) async throws -> String {
        guard volume.isEncrypted, isEngineServed(volume.id) else {
            return try files.activate(volume, epoch: epoch, grant: grant, key: key)
        }
        if let running = engines.state(volumeID: volume.id), running.epoch == epoch.rawValue, let path = running.path {
            return path
        }
        // After a restart of this process, the FUSE keeper kept the key with the connection.
        guard let key = key ?? engines.keptKey(volumeID: volume.id) else {
            throw CairnError.failedPrecondition(
                "volume \(volume.id) is encrypted and its key is not loaded on node \(nodeID) (the process serving it restarted, or no passphrase came): call NodeStageVolume with the secret `\(EncryptionNames.passphraseSecret)` again")
        }
        let cipher = try VolumeCipher(key)
        let image = try files.file(volumeID: volume.id)
        let (engines, nodeID, volumeID, writeThrough) = (self.engines, self.nodeID, volume.id, volume.writeThrough)
        let (size, mountDirectory) = (UInt64(volume.capacityBytes), "\(enginesDirectory)/\(volume.id)")
        let replica = EngineReplica(nodeID: nodeID, host: "localhost", port: 0, inSync: true)
        let file = try await offCooperativePool {
            try engines.start(volumeID: volumeID, sizeBytes: size, epoch: epoch.rawValue, replicas: [replica],
                              localNodeID: nodeID, mountDirectory: mountDirectory,
                              connect: { _ in try FileReplicaIO(path: image) },
                              markOutOfSync: { node, reason in
                                  throw CairnError.internal("volume \(volumeID)'s only copy (\(node)) failed: \(reason)")
                              },
                              cipher: cipher, writeThrough: writeThrough)
        }
        logger.info("the encrypted volume's engine is serving it", metadata: ["volume.id": "\(volume.id)", "file": "\(file)"])
        return file
    }

    public func deactivate(volumeID: String) async throws {
        guard isEngineServed(volumeID) else { return try files.deactivate(volumeID: volumeID) }
        let (engines, logger) = (self.engines, self.logger)
        let mountDirectory = "\(enginesDirectory)/\(volumeID)"
        if engines.state(volumeID: volumeID) != nil {
            await offCooperativePool { engines.stop(volumeID: volumeID) }
        }
        try await offCooperativePool {
            _ = try DeadFUSEMounts.detach(under: mountDirectory, exactly: true, logger: logger)
        }
    }

    public func condition(_ volume: VolumeRecord) async throws -> BackingCondition {
        files.condition(volume)
    }

    public func expandOnNode(_ volume: VolumeRecord) async throws {
        guard isEngineServed(volume.id) else { return files.expandOnNode(volume) }
        guard let engine = engines.engine(volumeID: volume.id) else {
            throw CairnError.failedPrecondition("volume \(volume.id) has no engine running on node \(nodeID); stage it here before NodeExpandVolume")
        }
        try await offCooperativePool { try engine.grow(to: UInt64(volume.capacityBytes)) }
    }
}
