/// A digest of a volume's contents, block by block (crc32c of each 4 KiB block folded with
/// FNV-1a, 64 bits): two copies with the same digest hold the same bytes, with the odds of a
/// 64-bit hash. `cairn replica digest` prints it for one replica; tests compute it over the
/// volume as the application sees it and compare.
public struct VolumeDigest: Sendable, Equatable, CustomStringConvertible {
    public private(set) var value: UInt64 = 0xCBF2_9CE4_8422_2325
    public private(set) var blocks: UInt64 = 0
    /// Blocks that are not all zeros (by their crc32c).
    public private(set) var written: UInt64 = 0

    private static let zeroCRC = [UInt8](repeating: 0, count: 4096).withUnsafeBytes { CRC32C.checksum($0) }

    public init() {}

    /// Adds whole 4 KiB blocks, in order.
    public mutating func add(_ bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count % 4096 == 0, "the digest takes whole 4 KiB blocks")
        var offset = 0
        while offset < bytes.count {
            let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + 4096]))
            // A block of zeros has the zero block's crc (the converse fails once in 2^32: such
            // a block is counted as zeros, which only this statistic sees).
            if crc != Self.zeroCRC { written += 1 }
            for shift in stride(from: 0, to: 32, by: 8) {
                value = (value ^ UInt64((crc >> UInt32(shift)) & 0xFF)) &* 0x100_0000_01B3
            }
            blocks += 1
            offset += 4096
        }
    }

    public var hex: String {
        let s = String(value, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    public var description: String { "digest \(hex) over \(blocks) blocks (\(written) not zero)" }
}
