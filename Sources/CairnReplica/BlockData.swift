import CairnCore
import Glibc

/// A write's data in 4 KiB-aligned memory of its own, immutable once made: what a replica
/// server decodes a write request's data into, so the store writes it with O_DIRECT as it is —
/// one copy from the received bytes to the device request, not three (the decoder's buffer, an
/// array, an aligned copy). A value type over a shared, never-mutated buffer: copies are free.
public struct BlockData: Sendable, RandomAccessCollection, Equatable, ExpressibleByArrayLiteral, CustomStringConvertible {
    /// The memory alignment of every `BlockData` (O_DIRECT's).
    public static let alignment = 4096

    private final class Storage: @unchecked Sendable {
        /// The data (`count` bytes at the start of `memory`).
        let bytes: UnsafeMutableRawBufferPointer
        private let memory: UnsafeMutableRawBufferPointer

        init(count: Int) {
            memory = LargeBuffers.take(count)
            bytes = UnsafeMutableRawBufferPointer(rebasing: memory[0..<count])
        }

        deinit { LargeBuffers.give(memory) }
    }

    /// Nil when empty (no allocation).
    private let storage: Storage?

    /// A copy of `bytes` in aligned memory.
    public init(copying bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { storage = nil; return }
        let s = Storage(count: bytes.count)
        s.bytes.copyMemory(from: bytes)
        storage = s
    }

    /// A copy of `bytes` in aligned memory.
    public init(_ bytes: some Collection<UInt8>) {
        if let made = bytes.withContiguousStorageIfAvailable({ BlockData(copying: UnsafeRawBufferPointer($0)) }) {
            self = made
            return
        }
        let array = Array(bytes)
        self = array.withUnsafeBytes { BlockData(copying: $0) }
    }

    public init(arrayLiteral elements: UInt8...) { self.init(elements) }

    public var startIndex: Int { 0 }
    public var endIndex: Int { storage?.bytes.count ?? 0 }
    public subscript(position: Int) -> UInt8 {
        precondition(position >= 0 && position < endIndex, "BlockData index \(position) out of range 0..<\(endIndex)")
        return storage!.bytes[position]
    }

    /// The bytes, 4 KiB-aligned (an empty buffer when there are none).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        guard let storage else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
        return try body(UnsafeRawBufferPointer(storage.bytes))
    }

    public func withContiguousStorageIfAvailable<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R? {
        try withUnsafeBytes { raw in try body(raw.bindMemory(to: UInt8.self)) }
    }

    public static func == (lhs: BlockData, rhs: BlockData) -> Bool {
        lhs.storage === rhs.storage || lhs.withUnsafeBytes { a in rhs.withUnsafeBytes { b in same(a, b) } }
    }

    public static func == (lhs: BlockData, rhs: [UInt8]) -> Bool {
        lhs.withUnsafeBytes { a in rhs.withUnsafeBytes { b in same(a, b) } }
    }

    private static func same(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Bool {
        a.count == b.count && (a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0)
    }

    public static func == (lhs: [UInt8], rhs: BlockData) -> Bool { rhs == lhs }

    public var description: String { "\(count) bytes" }
}

/// Aligned buffers for large writes' data, kept for the next one: a 1 MiB allocation is an
/// mmap (glibc serves large requests so), and its first touch page-faults and zeroes 256
/// pages — in profiles of sequential writes that cost a replica server more than the copy
/// itself. Sizes over `small` up to `size` take a buffer of `size` from here; at most
/// `kept` are kept (16 MiB), the rest freed. Smaller ones come from malloc as usual.
enum LargeBuffers {
    static let size = 1 << 20
    static let small = 64 << 10
    static let kept = 16
    private static let free = PlainLocked<[UInt]>([])

    static func take(_ count: Int) -> UnsafeMutableRawBufferPointer {
        guard count > small, count <= size else {
            return .allocate(byteCount: count, alignment: BlockData.alignment)
        }
        if let address = free.withLock({ $0.popLast() }) {
            return UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: address), count: size)
        }
        return .allocate(byteCount: size, alignment: BlockData.alignment)
    }

    static func give(_ memory: UnsafeMutableRawBufferPointer) {
        if memory.count == size, let base = memory.baseAddress {
            let address = UInt(bitPattern: base)
            if free.withLock({ list -> Bool in
                guard list.count < kept else { return false }
                list.append(address)
                return true
            }) { return }
        }
        memory.deallocate()
    }
}
