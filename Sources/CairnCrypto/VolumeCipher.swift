import CCryptoShim
import CairnCore
import Foundation

/// An encrypted volume's data cipher: AES-256-XTS over 4 KiB units, the tweak the unit's index
/// in the volume (dm-crypt's `aes-xts-plain64` with 4096-byte sectors). OpenSSL does the work.
///
/// A unit that is all zeros on the replicas was never written (or was trimmed): it decrypts to
/// zeros, so an unwritten volume reads as zeros like a plain one. A written unit is never all
/// zeros (its ciphertext would have to be, a chance of 2^-32768).
public struct VolumeCipher: Sendable {
    public static let unitBytes = 4096
    /// The data key (the FUSE keeper keeps it with the volume's connection).
    public let key: VolumeDataKey

    public init(_ key: VolumeDataKey) throws {
        guard key.bytes.count == 64 else {
            throw CairnError.internal("an AES-256-XTS volume key is 64 bytes, not \(key.bytes.count)")
        }
        self.key = key
    }

    /// Encrypts whole units starting at byte `offset` of the volume from `plain` into `cipher`
    /// (same size, a multiple of 4 KiB; they may be the same memory).
    public func encrypt(offset: UInt64, _ plain: UnsafeRawBufferPointer, into cipher: UnsafeMutableRawBufferPointer) throws {
        try run(encrypt: true, offset: offset, plain, cipher)
    }

    /// Decrypts whole units in place (all-zero units stay zeros).
    public func decrypt(offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws {
        try run(encrypt: false, offset: offset, UnsafeRawBufferPointer(buffer), buffer)
    }

    private func run(encrypt: Bool, offset: UInt64, _ input: UnsafeRawBufferPointer, _ output: UnsafeMutableRawBufferPointer) throws {
        let unit = Self.unitBytes
        precondition(offset % UInt64(unit) == 0 && input.count % unit == 0 && output.count == input.count,
                     "volume encryption works on whole 4 KiB units")
        if input.isEmpty { return }
        var message = [CChar](repeating: 0, count: 256)
        let rc = key.bytes.withUnsafeBufferPointer { k in
            ccrypto_xts(k.baseAddress, encrypt ? 1 : 0, encrypt ? 0 : 1, offset / UInt64(unit), unit, input.count / unit,
                        input.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        output.baseAddress!.assumingMemoryBound(to: UInt8.self), &message, message.count)
        }
        guard rc == 0 else { throw CairnError.internal("volume encryption failed: \(cString(message))") }
    }
}

func cString(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
