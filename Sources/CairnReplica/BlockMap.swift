#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore

/// One block's entry in a layer's block map (docs/replica-format.md, "Block map entry"):
/// 16 little-endian bytes — generation u64, crc32c u32, flags u32. The all-zero entry (what a
/// hole in the sparse `blockmap` file reads as) means "not present in this layer".
public struct BlockMapEntry: Sendable, Equatable {
    public static let encodedSize = 16
    public static let trimmedFlag: UInt32 = 1 << 0
    public static let absent = BlockMapEntry(generation: 0, crc: 0, flags: 0)

    /// Generation of the write that last wrote the block in this layer; 0 = not present.
    public var generation: UInt64
    /// CRC-32C of the block's 4 KiB of data.
    public var crc: UInt32
    public var flags: UInt32

    public init(generation: UInt64, crc: UInt32, flags: UInt32 = 0) {
        self.generation = generation
        self.crc = crc
        self.flags = flags
    }

    public var isPresent: Bool { generation != 0 }
    public var isTrimmed: Bool { flags & Self.trimmedFlag != 0 }

    func encode(into p: UnsafeMutableRawPointer) {
        p.storeBytes(of: generation.littleEndian, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: crc.littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt32.self)
    }

    static func decode(from p: UnsafeRawPointer) -> BlockMapEntry {
        BlockMapEntry(generation: UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
                      crc: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                      flags: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
    }
}

/// A layer's `blockmap` file: entry i at byte offset i*16. The file is sparse and sized to the
/// volume, so unwritten regions cost nothing and read as absent entries. Buffered I/O (entries
/// are far smaller than a page); `sync()` is the fdatasync that makes written entries durable.
/// Reads and writes of disjoint entries may run concurrently (plain pread/pwrite); the owning
/// `ReplicaStore` serializes access to the same entries and resizing.
final class BlockMap {
    let fd: Int32
    let path: String
    /// A read-only shared mapping of the whole file (nil if mmap failed): entries are read from
    /// it without a system call per I/O. Writes still go through pwrite — the page cache keeps
    /// the two coherent — so a full disk fails a write with ENOSPC rather than raising SIGBUS
    /// on a page fault. Remapped when the file grows (under the store's exclusive lock).
    private var mapping: UnsafeRawPointer?
    private var mappedLength = 0

    /// Opens (or with `create`, creates — empty, refusing nothing) the blockmap file.
    init(path: String, create: Bool) throws {
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_TRUNC : 0)
        let fd = open(path, flags, 0o600)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        self.fd = fd
        self.path = path
        var st = stat()
        if fstat(fd, &st) == 0 { remap(length: Int(st.st_size)) }
    }

    deinit {
        unmap()
        _ = Glibc.close(fd)
    }

    private func unmap() {
        if let mapping { _ = munmap(UnsafeMutableRawPointer(mutating: mapping), mappedLength) }
        mapping = nil
        mappedLength = 0
    }

    private func remap(length: Int) {
        unmap()
        guard length > 0 else { return }
        let p = mmap(nil, length, PROT_READ, MAP_SHARED, fd, 0)
        guard let p, p != UnsafeMutableRawPointer(bitPattern: -1) else { return }  // reads fall back to pread
        mapping = UnsafeRawPointer(p)
        mappedLength = length
    }

    /// Sizes the file for `blocks` entries (sparse extension; never shrinks).
    func ensureCapacity(blocks: UInt64) throws {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("fstat \(path)", errno: errno) }
        let want = off_t(blocks) * off_t(BlockMapEntry.encodedSize)
        if st.st_size < want {
            guard ftruncate(fd, want) == 0 else { throw SystemError("ftruncate \(path)", errno: errno) }
        }
        if Int(max(want, st.st_size)) != mappedLength { remap(length: Int(max(want, st.st_size))) }
    }

    /// The entries for blocks `first ..< first+count`.
    func read(first: UInt64, count: Int) throws -> [BlockMapEntry] {
        let bytes = count * BlockMapEntry.encodedSize
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 16)
        defer { buffer.deallocate() }
        let n = try FileIO.preadFully(fd, buffer, offset: first * UInt64(BlockMapEntry.encodedSize), path: path)
        // Past the end of the file (cannot happen for in-range blocks) reads as absent.
        if n < bytes { buffer.baseAddress!.advanced(by: n).initializeMemory(as: UInt8.self, repeating: 0, count: bytes - n) }
        return (0..<count).map { BlockMapEntry.decode(from: buffer.baseAddress! + $0 * BlockMapEntry.encodedSize) }
    }

    func read(block: UInt64) throws -> BlockMapEntry { try read(first: block, count: 1)[0] }

    /// The entries for blocks `first ..< first+entries.count`, into `entries` (initialized).
    func read(first: UInt64, into entries: UnsafeMutableBufferPointer<BlockMapEntry>) throws {
        let bytes = entries.count * BlockMapEntry.encodedSize
        let start = Int(clamping: first) &* BlockMapEntry.encodedSize
        if let mapping, start >= 0, start + bytes <= mappedLength {
            for i in 0..<entries.count {
                entries.initializeElement(at: i, to: BlockMapEntry.decode(from: mapping + start + i * BlockMapEntry.encodedSize))
            }
            return
        }
        try withUnsafeTemporaryAllocation(byteCount: bytes, alignment: 16) { buffer in
            let n = try FileIO.preadFully(fd, buffer, offset: first * UInt64(BlockMapEntry.encodedSize), path: path)
            if n < bytes { buffer.baseAddress!.advanced(by: n).initializeMemory(as: UInt8.self, repeating: 0, count: bytes - n) }
            for i in 0..<entries.count {
                entries.initializeElement(at: i, to: BlockMapEntry.decode(from: buffer.baseAddress! + i * BlockMapEntry.encodedSize))
            }
        }
    }

    /// Writes `entries` for blocks `first ..< first+entries.count` in one pwrite.
    func write(first: UInt64, _ entries: [BlockMapEntry]) throws {
        try entries.withUnsafeBufferPointer { try write(first: first, $0) }
    }

    func write(first: UInt64, _ entries: UnsafeBufferPointer<BlockMapEntry>) throws {
        let bytes = entries.count * BlockMapEntry.encodedSize
        try withUnsafeTemporaryAllocation(byteCount: bytes, alignment: 16) { buffer in
            for (i, e) in entries.enumerated() { e.encode(into: buffer.baseAddress! + i * BlockMapEntry.encodedSize) }
            try FileIO.pwriteFully(fd, UnsafeRawBufferPointer(buffer), offset: first * UInt64(BlockMapEntry.encodedSize), path: path)
        }
    }

    /// Calls `body(block, entry)` for every present entry of blocks `0 ..< blocks`, reading in
    /// 1 MiB chunks (65,536 entries) and skipping the file's holes (FileIO.SEEK_DATA), so a scan of a
    /// mostly unwritten volume costs what was written, not the volume's size.
    func forEachPresent(blocks: UInt64, _ body: (UInt64, BlockMapEntry) throws -> Void) throws {
        let chunk: UInt64 = 65_536
        let entrySize = UInt64(BlockMapEntry.encodedSize)
        var first: UInt64 = 0
        while first < blocks {
            let data = lseek(fd, off_t(first * entrySize), FileIO.SEEK_DATA)
            if data < 0 {
                if errno == ENXIO { return }  // no data after this point: the rest is absent
                if errno != EINVAL { throw SystemError("lseek SEEK_DATA \(path)", errno: errno) }
            } else if UInt64(data) / entrySize > first {
                first = UInt64(data) / entrySize
                if first >= blocks { return }
            }
            let count = Int(min(chunk, blocks - first))
            for (i, e) in try read(first: first, count: count).enumerated() where e.isPresent {
                try body(first + UInt64(i), e)
            }
            first += UInt64(count)
        }
    }

    func sync() throws {
        guard fdatasync(fd) == 0 else { throw SystemError("fdatasync \(path)", errno: errno) }
    }
}
