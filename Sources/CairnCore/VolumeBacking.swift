import Foundation

/// Where a volume's bytes live, and how a node gets at them.
///
/// Two implementations: `LocalFileBacking` (one machine: a sparse file per volume, attached as a
/// loop device directly) and `ReplicatedBacking` (cluster mode, module CairnCluster: replicas on
/// several nodes; the node that stages the volume runs an engine that exposes it through FUSE as
/// one file). Either way the node attaches `file(volumeID:)` as a loop device, so the controller
/// and node services do not care which one they have.
public protocol VolumeBacking: Sendable {
    /// Creates the storage for `volume` (idempotent: an existing backing of the right size is kept).
    func create(_ volume: VolumeRecord) async throws
    /// Removes the storage. No error when it is already gone.
    func delete(_ volume: VolumeRecord) async throws
    /// The file a node attaches as a loop device (it exists only while the volume is active on
    /// this node, for a replicated volume).
    func file(volumeID: String) throws -> String
    /// Makes `file(volumeID:)` usable on this node for a writer holding `epoch` (replicated:
    /// starts the engine, which claims the replicas with the epoch and so fences older holders).
    /// Idempotent. Returns the file.
    func activate(_ volume: VolumeRecord, epoch: Int64) async throws -> String
    /// Undoes `activate` once no loop device uses the file any more. Idempotent.
    func deactivate(volumeID: String) async throws
    /// Health as CSI's VolumeCondition wants it: nil when healthy, else what is wrong.
    func problem(_ volume: VolumeRecord) -> String?
    /// A one-line description of the healthy state (e.g. which replicas are in sync).
    func healthy(_ volume: VolumeRecord) -> String
    /// Why the volume cannot be staged now, or nil. A degraded replicated volume can be: its
    /// condition is abnormal, yet it serves I/O from the replicas still in sync.
    func stageBlocker(_ volume: VolumeRecord) -> String?
    /// Re-replication: one new, empty replica on the node `replica` names (idempotent).
    func createReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws
    /// Re-replication: removes a replaced replica from its node (best effort).
    func deleteReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws
}

extension VolumeBacking {
    public func stageBlocker(_ volume: VolumeRecord) -> String? { problem(volume) }

    /// Re-replication: creates one new, empty replica of `volume` on the node `replica` names.
    public func createReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
        throw CairnError.failedPrecondition("volume \(volume.id) is not replicated (one-machine store); there is no replica to re-create")
    }

    /// Re-replication: deletes a replaced replica (best effort: its node may be gone).
    public func deleteReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
        throw CairnError.failedPrecondition("volume \(volume.id) is not replicated (one-machine store)")
    }
}

/// One sparse file per volume under `<data-dir>/volumes/`. Volume ids are validated before
/// they get here (`Validate.volumeID`), so the join below cannot leave the directory.
public struct LocalFileBacking: VolumeBacking {
    public let directory: String

    public init(dataDir: String) throws {
        directory = dataDir + "/volumes"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
    }

    public func file(volumeID: String) throws -> String {
        try Validate.volumeID(volumeID)
        return "\(directory)/\(volumeID).img"
    }

    public func create(_ volume: VolumeRecord) throws {
        let path = try file(volumeID: volume.id)
        let fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("fstat \(path)", errno: errno) }
        if st.st_size < volume.capacityBytes {
            // Sparse: blocks are allocated on first write (thin provisioning).
            guard ftruncate(fd, off_t(volume.capacityBytes)) == 0 else {
                throw SystemError("ftruncate \(path) to \(volume.capacityBytes) bytes", errno: errno)
            }
        }
        guard fsync(fd) == 0 else { throw SystemError("fsync \(path)", errno: errno) }
    }

    public func delete(_ volume: VolumeRecord) throws {
        let path = try file(volumeID: volume.id)
        if unlink(path) != 0 && errno != ENOENT { throw SystemError("unlink \(path)", errno: errno) }
    }

    public func activate(_ volume: VolumeRecord, epoch: Int64) throws -> String {
        try file(volumeID: volume.id)
    }

    public func deactivate(volumeID: String) {}

    public func healthy(_ volume: VolumeRecord) -> String {
        "healthy: 1 of 1 replicas in sync (a local file)"
    }

    public func problem(_ volume: VolumeRecord) -> String? {
        let expectedBytes = volume.capacityBytes
        guard let path = try? file(volumeID: volume.id) else { return "invalid volume id" }
        var st = stat()
        if stat(path, &st) != 0 {
            return "the volume's backing file \(path) is missing (\(String(cString: strerror(errno))))"
        }
        if st.st_size < expectedBytes {
            return "the volume's backing file is \(st.st_size) bytes, expected \(expectedBytes)"
        }
        return nil
    }
}
