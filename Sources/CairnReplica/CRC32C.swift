internal import CCRC32C

/// CRC-32C (Castagnoli), the checksum of the replica format and the data protocol
/// (docs/replica-format.md). In C (`CCRC32C`): the CPU's crc32 instruction where there is one
/// (SSE4.2), slicing-by-8 otherwise; compiled optimised even in debug builds.
public enum CRC32C {
    /// Whether the hardware instruction is in use.
    public static var usesHardware: Bool { cairn_crc32c_hardware() != 0 }

    /// The checksum of `bytes`, continuing from `crc` (pass the previous result to chain).
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return crc }
        return cairn_crc32c(crc, base, bytes.count)
    }

    public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: crc) }
    }
}
