import CairnCore
import Foundation

// Where a backup reads a snapshot and where a restore writes a volume (docs/backups.md):
// a block file or device on one machine; a cluster snapshot on a replica and a new volume's
// replicas (CairnCluster's `ReplicaSnapshotSource` and `ReplicaRestoreSink`).

/// Which generations a source's blocks carry: those of volume incarnation `lineage` (its id and
/// creation time: a volume deleted and made again with the same id numbers from 1 again), up to
/// `generation`, the snapshot's. A backup made against a parent of the same lineage reads only
/// the blocks whose generation is above the parent's.
public struct SourceGenerations: Sendable, Equatable {
    public var lineage: String
    public var generation: UInt64

    public init(lineage: String, generation: UInt64) {
        self.lineage = lineage
        self.generation = generation
    }
}

/// A snapshot's blocks, read by a backup.
public protocol BackupBlockSource: Sendable {
    /// nil: the source knows no generations, so every block is read and hashed.
    var generations: SourceGenerations? { get }
    /// Most blocks one `changed` call covers.
    var changedWindow: Int { get }
    /// The snapshot's `count` bytes (a multiple of 4 KiB) at `offset`.
    func read(offset: Int64, count: Int) async throws -> [UInt8]
    /// Per block `firstBlock ..< firstBlock + count`: whether it was written or trimmed at a
    /// generation above `since` (only asked when `generations` is not nil).
    func changed(since: UInt64, firstBlock: Int64, count: Int) async throws -> [Bool]
}

/// Where a restore writes. Called from several packs' tasks at once.
public protocol RestoreSink: Sendable {
    /// Writes `data` (a multiple of 4 KiB) at `offset`.
    func write(_ data: [UInt8], offset: Int64) async throws
    /// Everything written so far is durable.
    func sync() async throws
}

/// What a restore has finished, so a restore cut off and run again fetches only the packs it had
/// not finished. Packs are numbered by their place in the manifest's list.
public protocol RestoreJournal: Sendable {
    /// The packs an earlier run of this restore of `backupID` finished (empty: none, and the
    /// journal now belongs to this restore). FAILED_PRECONDITION when it records another backup.
    func begin(backupID: String) async throws -> Set<Int>
    /// Pack `number`'s blocks are durable in the sink.
    func finished(pack number: Int) async throws
    /// The restore is complete: the journal goes.
    func complete() async throws
}

/// A block file or device, read with pread. No generations: every block is hashed.
public struct FileBlockSource: BackupBlockSource {
    let fd: FileDescriptorBox
    public let path: String

    public init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CairnError.notFound("cannot read the snapshot's data at \(path): \(String(cString: strerror(errno)))") }
        self.fd = FileDescriptorBox(fd)
        self.path = path
    }

    public var generations: SourceGenerations? { nil }
    public var changedWindow: Int { 256 }

    public func read(offset: Int64, count: Int) async throws -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            try BackupTarget.readFully(fd.fd, UnsafeMutableRawBufferPointer(buffer), count: count, offset: offset, path: path)
            initialized = count
        }
    }

    public func changed(since: UInt64, firstBlock: Int64, count: Int) async throws -> [Bool] {
        Array(repeating: true, count: count)
    }
}

/// A block file (made, sparse, when missing) or device, written with pwrite.
public struct FileRestoreSink: RestoreSink {
    let fd: FileDescriptorBox
    public let path: String

    /// Opens `path`, and sizes a regular file shorter than `sizeBytes` up to it.
    public init(path: String, sizeBytes: Int64) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CairnError.unavailable("cannot open \(path) to restore into: \(String(cString: strerror(errno)))") }
        self.fd = FileDescriptorBox(fd)
        self.path = path
        var st = stat()
        if fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, st.st_size < sizeBytes {
            guard ftruncate(fd, off_t(sizeBytes)) == 0 else {
                throw CairnError.resourceExhausted("cannot size \(path) to \(sizeBytes) bytes: \(String(cString: strerror(errno)))")
            }
        }
    }

    public func write(_ data: [UInt8], offset: Int64) async throws {
        try data.withUnsafeBytes { try BackupTarget.writeFully(fd.fd, $0, offset: offset, path: path) }
    }

    public func sync() async throws {
        guard fdatasync(fd.fd) == 0 else { throw CairnError.unavailable("cannot flush \(path): \(String(cString: strerror(errno)))") }
    }
}

/// The restore's progress in a file beside its target: `restore <id>`, then one finished pack
/// number per line, each appended and synced.
public struct FileRestoreJournal: RestoreJournal {
    public let path: String

    public init(path: String) {
        self.path = path
    }

    public func begin(backupID: String) async throws -> Set<Int> {
        if FileManager.default.fileExists(atPath: path), let text = try? String(contentsOfFile: path, encoding: .utf8) {
            let lines = text.split(separator: "\n").map(String.init)
            guard lines.first == "restore \(backupID)" else {
                throw CairnError.failedPrecondition("\(path) records a restore of another backup (\(lines.first ?? "")); remove it to restore \(backupID) from the start")
            }
            return Set(lines.dropFirst().compactMap { Int($0) })
        }
        try "restore \(backupID)\n".write(toFile: path, atomically: true, encoding: .utf8)
        return []
    }

    public func finished(pack number: Int) async throws {
        let fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC)
        guard fd >= 0 else { throw CairnError.unavailable("cannot write the restore's progress to \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let line = Array("\(number)\n".utf8)
        guard line.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) == line.count, fdatasync(fd) == 0 else {
            throw CairnError.unavailable("cannot record the restore's progress in \(path): \(String(cString: strerror(errno)))")
        }
    }

    public func complete() async throws {
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// A file descriptor closed when the last copy of the value that holds it goes.
final class FileDescriptorBox: Sendable {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    deinit { close(fd) }
}
