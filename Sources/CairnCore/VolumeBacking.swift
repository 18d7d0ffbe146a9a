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
    /// NodeExpandVolume, before the device and filesystem grow: makes `file(volumeID:)` on this
    /// node show the new size (replicated: the running engine grows). Idempotent.
    func expandOnNode(_ volume: VolumeRecord) async throws
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

    public func expandOnNode(_ volume: VolumeRecord) async throws {}
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
public struct LocalFileBacking: VolumeBacking {
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

// MARK: One machine: snapshots and clones as sparse copies

extension LocalFileBacking {
    public func snapshotFile(snapshotID: String) throws -> String {
        try Validate.volumeID(snapshotID)
        return "\(snapshotDirectory)/\(snapshotID).img"
    }

    /// A sparse copy of the volume's file. The file has no copy-on-write on ext4, so the copy
    /// must not race writes: a volume staged with a filesystem is frozen (FIFREEZE: the
    /// filesystem flushes and blocks new writes) for the copy's duration — the barrier — and a
    /// raw block volume in use is refused, since nothing can hold its writes.
    public func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]? {
        try await takeGroupSnapshot([GroupSnapshotMember(snapshot: snapshot, volume: volume, use: use)])[0]
    }

    /// Every staged member's filesystem is frozen before the first copy and thawed after the
    /// last, so the copies are of one instant across the volumes.
    public func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?] {
        var frozen: [String] = []
        for member in members {
            guard let stage = member.use.localStage else { continue }
            guard stage.accessType == .mount else {
                throw CairnError.failedPrecondition(
                    "volume \(member.volume.id) is staged for raw block access at \(stage.stagingPath); a one-machine volume has no write barrier for raw block devices, so a snapshot now would not be crash-consistent. Stop the application and unstage the volume, then retry")
            }
            frozen.append(stage.stagingPath)
        }
        try SparseCopy.frozen(mountPaths: frozen) {
            for member in members {
                let target = try snapshotFile(snapshotID: member.snapshot.id)
                if FileManager.default.fileExists(atPath: target) { continue }  // taken before: idempotent
                try SparseCopy.copy(from: try file(volumeID: member.volume.id), to: target, size: member.volume.capacityBytes)
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

/// Copies a file keeping its holes (SEEK_DATA/SEEK_HOLE; only data extents are read), into a temporary
/// file that is fsynced and renamed into place: the target is either whole or absent.
public enum SparseCopy {
    public static func copy(from source: String, to target: String, size: Int64) throws {
        let tmp = target + ".partial"
        let input = open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw SystemError("open \(source)", errno: errno) }
        defer { close(input) }
        let output = open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw SystemError("create \(tmp)", errno: errno) }
        var ok = false
        defer {
            close(output)
            if !ok { unlink(tmp) }
        }
        guard ftruncate(output, off_t(size)) == 0 else { throw SystemError("ftruncate \(tmp)", errno: errno) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        // Glibc hides these behind _GNU_SOURCE; the values are Linux's.
        let seekData: Int32 = 3, seekHole: Int32 = 4
        var offset: off_t = 0
        while offset < off_t(size) {
            let data = lseek(input, offset, seekData)
            if data < 0 {
                if errno == ENXIO { break }  // only a hole is left
                throw SystemError("lseek SEEK_DATA \(source)", errno: errno)
            }
            if data >= off_t(size) { break }
            var end = lseek(input, data, seekHole)
            if end < 0 { throw SystemError("lseek SEEK_HOLE \(source)", errno: errno) }
            end = min(end, off_t(size))
            var at = data
            while at < end {
                let n = pread(input, buffer.baseAddress, min(buffer.count, Int(end - at)), at)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw SystemError("read \(source)", errno: errno)
                }
                if n == 0 { break }
                var written = 0
                while written < n {
                    let w = pwrite(output, buffer.baseAddress! + written, n - written, at + off_t(written))
                    if w < 0 {
                        if errno == EINTR { continue }
                        throw SystemError("write \(tmp)", errno: errno)
                    }
                    written += w
                }
                at += off_t(n)
            }
            offset = end
        }
        guard fsync(output) == 0 else { throw SystemError("fsync \(tmp)", errno: errno) }
        guard rename(tmp, target) == 0 else { throw SystemError("rename \(tmp) → \(target)", errno: errno) }
        ok = true
        let dir = open((target as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
    }

    /// Runs `body` with the filesystems mounted at `mountPaths` frozen (FIFREEZE … FITHAW):
    /// each is consistent on its device and its writes wait until the thaw.
    public static func frozen<T>(mountPaths: [String], _ body: () throws -> T) throws -> T {
        let freeze: UInt = 0xC004_5877  // _IOWR('X', 119, int)
        let thaw: UInt = 0xC004_5878    // _IOWR('X', 120, int)
        var held: [Int32] = []
        defer {
            for fd in held.reversed() {
                var zero: Int32 = 0
                _ = ioctl(fd, thaw, &zero)
                close(fd)
            }
        }
        for path in Set(mountPaths).sorted() {
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw SystemError("open \(path) to freeze its filesystem", errno: errno) }
            var zero: Int32 = 0
            guard ioctl(fd, freeze, &zero) == 0 else {
                let e = errno
                close(fd)
                throw SystemError("FIFREEZE \(path)", errno: e)
            }
            held.append(fd)
        }
        return try body()
    }
}
