#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore

/// The replica's superblock (docs/replica-format.md, "Superblock"): one 4 KiB little-endian
/// record at `<replica>/superblock`, checksummed with CRC-32C and only ever replaced whole
/// (write temp + fsync + rename + fsync directory), so a crash leaves the old or the new one.
public struct Superblock: Sendable, Equatable {
    public static let magic: [UInt8] = Array("CAIRNRP1".utf8)
    /// Version 1: a replica closed cleanly (its journal is empty), which every Cairn reads.
    /// Version 2: a replica that is open or was not closed cleanly: its journal may hold writes
    /// that only it makes whole, so a build from before the journal refuses it rather than
    /// open it without them.
    public static let formatVersion: UInt32 = 1
    public static let journaledFormatVersion: UInt32 = 2
    public static let encodedSize = 4096
    public static let volumeIDCapacity = 128
    /// Fixed fields before the layer ids: magic, version, block size, volume id, size, epoch,
    /// flushed generation, clean, layer count.
    static let fixedSize = 8 + 4 + 4 + volumeIDCapacity + 8 + 8 + 8 + 1 + 4
    /// How many layer ids fit in 4 KiB with the trailing checksum.
    public static let maxLayers = (encodedSize - fixedSize - 4) / 8

    public var blockSize: UInt32
    public var volumeID: String
    public var size: UInt64
    public var epoch: UInt64
    public var flushedGeneration: UInt64
    public var clean: Bool
    /// Oldest first; the last is the writable head.
    public var layers: [UInt64]

    public init(blockSize: UInt32 = 4096, volumeID: String, size: UInt64, epoch: UInt64 = 0,
                flushedGeneration: UInt64 = 0, clean: Bool = false, layers: [UInt64] = [1]) {
        self.blockSize = blockSize
        self.volumeID = volumeID
        self.size = size
        self.epoch = epoch
        self.flushedGeneration = flushedGeneration
        self.clean = clean
        self.layers = layers
    }

    /// Whether `id` can be stored in the superblock: 1–128 bytes of UTF-8, no NUL.
    public static func isValidVolumeID(_ id: String) -> Bool {
        let bytes = Array(id.utf8)
        return !bytes.isEmpty && bytes.count <= volumeIDCapacity && !bytes.contains(0)
    }

    /// The 4 KiB on-disk image (zero padding after the checksum).
    public func encode() -> [UInt8] {
        precondition(Self.isValidVolumeID(volumeID), "volume id must be 1–128 bytes without NUL")
        precondition(!layers.isEmpty && layers.count <= Self.maxLayers, "layer chain out of bounds")
        var out: [UInt8] = []
        out.reserveCapacity(Self.encodedSize)
        out += Self.magic
        out.appendLE(clean ? Self.formatVersion : Self.journaledFormatVersion)
        out.appendLE(blockSize)
        let id = Array(volumeID.utf8)
        out += id + [UInt8](repeating: 0, count: Self.volumeIDCapacity - id.count)
        out.appendLE(size)
        out.appendLE(epoch)
        out.appendLE(flushedGeneration)
        out.append(clean ? 1 : 0)
        out.appendLE(UInt32(layers.count))
        for layer in layers { out.appendLE(layer) }
        let crc = out.withUnsafeBytes { CRC32C.checksum($0) }
        out.appendLE(crc)
        out += [UInt8](repeating: 0, count: Self.encodedSize - out.count)
        return out
    }

    /// Parses an on-disk image. Rejects a wrong magic, an unknown version, a bad checksum,
    /// an unsupported block size or (when `expectedVolumeID` is given) another volume's replica.
    public static func decode(_ bytes: [UInt8], expectedVolumeID: String? = nil) throws(ReplicaError) -> Superblock {
        guard bytes.count >= fixedSize + 4 else {
            throw .corruptSuperblock("superblock is \(bytes.count) bytes, shorter than its fixed fields")
        }
        guard Array(bytes[0..<8]) == magic else {
            throw .corruptSuperblock("bad magic (not a Cairn replica superblock)")
        }
        var r = LittleEndianReader(bytes: bytes, offset: 8)
        let version = r.u32()
        guard version == formatVersion || version == journaledFormatVersion else {
            throw .corruptSuperblock("unknown format version \(version) (this build reads \(formatVersion) and \(journaledFormatVersion))")
        }
        let blockSize = r.u32()
        let idBytes = Array(bytes[r.offset..<(r.offset + volumeIDCapacity)])
        r.offset += volumeIDCapacity
        let size = r.u64(), epoch = r.u64(), flushed = r.u64()
        let clean = bytes[r.offset]
        r.offset += 1
        let count = Int(r.u32())
        guard count >= 1, count <= maxLayers else {
            throw .corruptSuperblock("layer count \(count) out of bounds")
        }
        var layers: [UInt64] = []
        for _ in 0..<count { layers.append(r.u64()) }
        let crcEnd = r.offset
        let stored = r.u32()
        let computed = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<crcEnd])) }
        guard stored == computed else {
            throw .corruptSuperblock(
                "checksum mismatch (stored \(hex(stored)), computed \(hex(computed)))")
        }
        guard blockSize == 4096 else {
            throw .corruptSuperblock("unsupported block size \(blockSize)")
        }
        guard clean <= 1 else { throw .corruptSuperblock("clean flag is \(clean), not 0 or 1") }
        guard size % UInt64(blockSize) == 0 else {
            throw .corruptSuperblock("size \(size) is not a multiple of the block size")
        }
        let idLength = idBytes.firstIndex(of: 0) ?? idBytes.count
        guard idBytes[idLength...].allSatisfy({ $0 == 0 }),
              let volumeID = String(validating: idBytes[..<idLength], as: UTF8.self),
              isValidVolumeID(volumeID)
        else { throw .corruptSuperblock("volume id is not NUL-padded UTF-8") }
        if let expected = expectedVolumeID, expected != volumeID {
            throw .wrongVolume(expected: expected, found: volumeID)
        }
        return Superblock(blockSize: blockSize, volumeID: volumeID, size: size, epoch: epoch,
                          flushedGeneration: flushed, clean: clean == 1, layers: layers)
    }

    /// Reads and decodes `<directory>/superblock`.
    public static func read(directory: String, expectedVolumeID: String? = nil) throws -> Superblock {
        let path = directory + "/superblock"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            if e == ENOENT { throw ReplicaError.notFound("no replica superblock at \(path)") }
            throw SystemError("open \(path)", errno: e)
        }
        defer { _ = Glibc.close(fd) }
        var bytes = [UInt8](repeating: 0, count: encodedSize)
        let n = try bytes.withUnsafeMutableBytes { try FileIO.preadFully(fd, $0, offset: 0, path: path) }
        return try decode(Array(bytes[0..<n]), expectedVolumeID: expectedVolumeID)
    }

    /// Replaces `<directory>/superblock` atomically: write `superblock.tmp`, fsync it, rename it
    /// over the old one, fsync the directory (so the rename itself is durable).
    public func write(directory: String) throws {
        try FileIO.replaceAtomically(directory: directory, name: "superblock", with: encode())
    }
}

private func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }

extension Array where Element == UInt8 {
    mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }
}

struct LittleEndianReader {
    let bytes: [UInt8]
    var offset: Int

    mutating func u32() -> UInt32 { read(UInt32.self) }
    mutating func u64() -> UInt64 { read(UInt64.self) }

    private mutating func read<T: FixedWidthInteger>(_: T.Type) -> T {
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(bytes[offset + i]) << (8 * i) }
        offset += MemoryLayout<T>.size
        return v
    }
}

/// The POSIX calls of the store, each retrying EINTR and short transfers.
enum FileIO {
    /// Reads up to `buffer.count` bytes at `offset`; returns how many (fewer only at end of file).
    static func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, offset: UInt64,
                           path: String) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("pread \(path)", errno: errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    static func pwriteFully(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: UInt64,
                            path: String) throws {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("pwrite \(path)", errno: errno)
            }
            done += n
        }
    }

    /// Constants and calls Swift's Glibc module does not import (they sit behind _GNU_SOURCE),
    /// spelled out here rather than in a C target: the values are Linux ABI.
    #if arch(x86_64) || arch(i386)
    static let O_DIRECT: Int32 = 0o40000
    #else
    static let O_DIRECT: Int32 = 0o200000  // aarch64, arm, riscv64
    #endif
    static let SEEK_DATA: Int32 = 3
    static let FALLOC_FL_KEEP_SIZE: Int32 = 0x01
    static let FALLOC_FL_PUNCH_HOLE: Int32 = 0x02

    private typealias FallocateFunction = @convention(c) (Int32, Int32, off_t, off_t) -> Int32
    /// glibc's fallocate(2) wrapper, looked up once (it is declared only under _GNU_SOURCE).
    private static let fallocateFunction: FallocateFunction? = {
        guard let symbol = dlsym(nil, "fallocate") else { return nil }
        return unsafeBitCast(symbol, to: FallocateFunction.self)
    }()

    /// fallocate(2); fails with EOPNOTSUPP where the function cannot be found.
    static func fallocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) -> Int32 {
        guard let f = fallocateFunction else {
            errno = EOPNOTSUPP
            return -1
        }
        while true {
            let r = f(fd, mode, off_t(offset), off_t(length))
            if r == 0 || errno != EINTR { return r }
        }
    }

    /// Replaces `<directory>/<name>` with `bytes` so that a crash leaves the old or the new file,
    /// never a torn one: write `<name>.tmp`, fsync it, rename it over, fsync the directory.
    static func replaceAtomically(directory: String, name: String, with bytes: [UInt8]) throws {
        let path = directory + "/" + name
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError("open \(tmp)", errno: errno) }
        do {
            try bytes.withUnsafeBytes { try pwriteFully(fd, $0, offset: 0, path: tmp) }
            guard fsync(fd) == 0 else { throw SystemError("fsync \(tmp)", errno: errno) }
        } catch {
            _ = Glibc.close(fd)
            _ = unlink(tmp)
            throw error
        }
        _ = Glibc.close(fd)
        guard rename(tmp, path) == 0 else { throw SystemError("rename \(tmp)", errno: errno) }
        try fsyncDirectory(directory)
    }

    static func fsyncDirectory(_ directory: String) throws {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open directory \(directory)", errno: errno) }
        defer { _ = Glibc.close(fd) }
        guard fsync(fd) == 0 else { throw SystemError("fsync directory \(directory)", errno: errno) }
    }
}
