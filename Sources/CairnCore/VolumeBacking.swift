import Foundation

/// Where a volume's bytes live, and how a node gets at them.
///
/// Two implementations: `LocalFileBacking` (one machine: a sparse file per volume, attached as a
/// loop device directly) and `ReplicatedBacking` (cluster mode, module CairnCluster: replicas on
/// several nodes; the node that stages the volume runs an engine that exposes it through FUSE as
/// one file). This is the controller's side; the node's is `NodeBacking` (both implement it),
/// so the controller and node services do not care which one they have.
public protocol VolumeBacking: Sendable {
    /// Creates the storage for `volume` (idempotent: an existing backing of the right size is kept).
    func create(_ volume: VolumeRecord) async throws
    /// Removes the storage. No error when it is already gone.
    func delete(_ volume: VolumeRecord) async throws
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

    // Snapshots, clones, growth (docs/snapshots.md)

    /// Takes `snapshot` of `volume`, crash-consistent (at a write barrier when the volume is in
    /// use). Idempotent by snapshot id. Returns the nodes holding it
    /// (replicated) or nil (one machine).
    func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]?
    /// Takes every member's snapshot at one write barrier across all their volumes (a group
    /// snapshot). Same order as `members`; each entry as `takeSnapshot` returns it.
    func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?]
    /// Removes the snapshot's data. No error when it is already gone; `source` is nil when the
    /// source volume was deleted.
    func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) async throws
    /// Instead of `create`: makes the storage of the new `volume` hold `snapshot`'s content
    /// (then zeros up to the volume's size). Idempotent.
    func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) async throws
    /// ControllerExpandVolume: grows the volume's storage to `volume.capacityBytes` (the record
    /// already says the new size). Idempotent.
    func expand(_ volume: VolumeRecord) async throws
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

/// Where a volume is in use when the controller acts on its data.
public struct VolumeUse: Sendable {
    /// The node it is published to (ControllerPublish), if any.
    public var attachedNode: String?
    /// One machine: its stage on this machine, if staged.
    public var localStage: StageRecord?

    public init(attachedNode: String? = nil, localStage: StageRecord? = nil) {
        self.attachedNode = attachedNode
        self.localStage = localStage
    }
}

/// One volume of a group snapshot.
public struct GroupSnapshotMember: Sendable {
    public var snapshot: SnapshotRecord
    public var volume: VolumeRecord
    public var use: VolumeUse

    public init(snapshot: SnapshotRecord, volume: VolumeRecord, use: VolumeUse) {
        self.snapshot = snapshot
        self.volume = volume
        self.use = use
    }
}

/// One sparse file per volume under `<data-dir>/volumes/`, one per snapshot under
/// `<data-dir>/snapshots/`. Ids are validated before they get here (`Validate.volumeID`), so
/// the joins below cannot leave the directories.
public struct LocalFileBacking: VolumeBacking, NodeBacking {
    public let directory: String
    public let snapshotDirectory: String

    public init(dataDir: String) throws {
        directory = dataDir + "/volumes"
        snapshotDirectory = dataDir + "/snapshots"
        for dir in [directory, snapshotDirectory] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        }
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

    public func activate(_ volume: VolumeRecord, epoch: FencingEpoch) throws -> String {
        try file(volumeID: volume.id)
    }

    public func deactivate(volumeID: String) {}

    public func expandOnNode(_ volume: VolumeRecord) {}  // `expand` grew the file already

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

// MARK: One machine: snapshots and clones as sparse copies

extension LocalFileBacking {
    public func snapshotFile(snapshotID: String) throws -> String {
        try Validate.volumeID(snapshotID)
        return "\(snapshotDirectory)/\(snapshotID).img"
    }

    /// A copy of the volume's file (`SparseCopy`: a clone where the filesystem shares extents,
    /// else a sparse copy). A volume staged with a filesystem is frozen (FIFREEZE: the
    /// filesystem flushes and blocks new writes) for the copy — the barrier.
    public func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]? {
        try await takeGroupSnapshot([GroupSnapshotMember(snapshot: snapshot, volume: volume, use: use)])[0]
    }

    /// Every staged member's filesystem is frozen before the first copy and thawed after the
    /// last, so the copies are of one instant across the volumes. A raw block volume in use has
    /// nothing to freeze: it can be taken only as a clone of its file (FICLONE, atomic against
    /// its writers: crash-consistent), so only where the data directory shares extents, and at
    /// most one per group (two clones are two instants).
    public func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?] {
        var frozen: [String] = []
        var blockInUse: [GroupSnapshotMember] = []
        for member in members {
            guard let stage = member.use.localStage else { continue }
            if stage.accessType == .mount { frozen.append(stage.stagingPath) } else { blockInUse.append(member) }
        }
        if let first = blockInUse.first {
            guard SparseCopy.canReflink(from: directory, into: snapshotDirectory) else {
                throw CairnError.failedPrecondition(
                    "volume \(first.volume.id) is staged for raw block access at \(first.use.localStage!.stagingPath), and this data directory's filesystem cannot clone files (no reflink: ext4): nothing can hold its writes for a crash-consistent copy. Stop the application and unstage the volume, then retry — or keep --data-dir on xfs with reflink or on btrfs")
            }
            guard blockInUse.count == 1 else {
                throw CairnError.failedPrecondition(
                    "volumes \(blockInUse.map(\.volume.id).joined(separator: ", ")) are staged for raw block access: on one machine only one of them can be cut at the group's instant. Unstage all but one, then retry")
            }
        }
        let inUse = Set(blockInUse.map(\.volume.id))
        try SparseCopy.frozen(mountPaths: frozen) {
            for member in members {
                let target = try snapshotFile(snapshotID: member.snapshot.id)
                if FileManager.default.fileExists(atPath: target) { continue }  // taken before: idempotent
                try SparseCopy.copy(from: try file(volumeID: member.volume.id), to: target, size: member.volume.capacityBytes,
                                    requireReflink: inUse.contains(member.volume.id))
            }
        }
        return members.map { _ in nil }
    }

    public func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) throws {
        let path = try snapshotFile(snapshotID: snapshot.id)
        if unlink(path) != 0 && errno != ENOENT { throw SystemError("unlink \(path)", errno: errno) }
    }

    /// A clone is a sparse copy of the snapshot's file, extended to the new size.
    public func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) throws {
        let target = try file(volumeID: volume.id)
        if !FileManager.default.fileExists(atPath: target) {
            let from = try snapshotFile(snapshotID: snapshot.id)
            guard FileManager.default.fileExists(atPath: from) else {
                throw CairnError.notFound("snapshot \(snapshot.id)'s data file \(from) is missing; delete the snapshot and take it again")
            }
            try SparseCopy.copy(from: from, to: target, size: snapshot.sizeBytes)
        }
        try create(volume)  // extends to the volume's size (sparse)
    }

    public func expand(_ volume: VolumeRecord) throws {
        try create(volume)  // ftruncate up to the new size; never shrinks
    }
}
