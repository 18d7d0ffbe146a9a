import CairnCore
import Foundation

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
        // A volume deleted while its restore from a backup was unfinished (docs/backups.md).
        unlink(path + ".restore-progress")
    }

    public func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) throws -> String {
        // An encrypted volume's file holds ciphertext: only an engine may serve it
        // (`LocalEngineBacking`, docs/encryption.md), never a loop device on the file itself.
        if volume.isEncrypted {
            throw CairnError.failedPrecondition(
                "volume \(volume.id) is encrypted: its file holds ciphertext and is served through an engine (cairn serve with --store sqlite does it); this backing cannot serve it")
        }
        return try file(volumeID: volume.id)
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
