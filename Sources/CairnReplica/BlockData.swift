import Glibc

/// A write's data in 4 KiB-aligned memory of its own, immutable once made: what a replica
/// server decodes a write request's data into, so the store writes it with O_DIRECT as it is —
/// one copy from the received bytes to the device request, not three (the decoder's buffer, an
/// array, an aligned copy). A value type over a shared, never-mutated buffer: copies are free.
public struct BlockData: Sendable, RandomAccessCollection, Equatable, ExpressibleByArrayLiteral, CustomStringConvertible {
    /// The memory alignment of every `BlockData` (O_DIRECT's).
    public static let alignment = 4096

    private final class Storage: @unchecked Sendable {
        let bytes: UnsafeMutableRawBufferPointer

        init(count: Int) {
            bytes = .allocate(byteCount: count, alignment: BlockData.alignment)
        }

        deinit { bytes.deallocate() }
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
        guard lhs.count == rhs.count else { return false }
        if lhs.storage === rhs.storage { return true }
        return lhs.withUnsafeBytes { a in rhs.withUnsafeBytes { b in a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 } }
    }

    public static func == (lhs: BlockData, rhs: [UInt8]) -> Bool {
        guard lhs.count == rhs.count else { return false }
        return lhs.withUnsafeBytes { a in rhs.withUnsafeBytes { b in a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 } }
    }

    public static func == (lhs: [UInt8], rhs: BlockData) -> Bool { rhs == lhs }

    public var description: String { "\(count) bytes" }
}
