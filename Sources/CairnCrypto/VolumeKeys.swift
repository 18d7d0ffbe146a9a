import CCryptoShim
import CairnCore
import Dispatch
import Foundation

/// An encrypted volume's data key and its wrapping (docs/encryption.md): a random 64-byte key per
/// volume, sealed with AES-256-GCM under a key-encryption key that PBKDF2-HMAC-SHA256 derives
/// from the passphrase and a random salt. A wrong passphrase fails the GCM tag: it is detected,
/// never used. Changing the passphrase (`rewrap`) reseals the same data key: no data is rewritten.
public enum VolumeKeys {
    /// PBKDF2 iterations for new wrappings (each NodeStage of the volume derives once).
    public static let defaultIterations = 310_000
    /// What the seal binds besides the key: the layout, so a record cannot be replayed as another.
    static let additionalData = Array("cairn volume key v1 aes-256-xts-plain64".utf8)

    /// A new data key and its wrapping under `passphrase`.
    public static func create(passphrase: String, iterations: Int = defaultIterations) throws -> (VolumeEncryption, VolumeDataKey) {
        let key = VolumeDataKey(try random(64))
        return (try wrap(key, passphrase: passphrase, iterations: iterations), key)
    }

    /// Seals `key` under `passphrase` with a fresh salt and nonce.
    public static func wrap(_ key: VolumeDataKey, passphrase: String, iterations: Int = defaultIterations) throws -> VolumeEncryption {
        try checkPassphrase(passphrase)
        let salt = try random(16)
        let nonce = try random(12)
        var kek = try derive(passphrase: passphrase, salt: salt, iterations: iterations)
        defer { kek.withUnsafeMutableBytes { ccrypto_cleanse($0.baseAddress, $0.count) } }
        var sealed = [UInt8](repeating: 0, count: key.bytes.count)
        var tag = [UInt8](repeating: 0, count: 16)
        var message = [CChar](repeating: 0, count: 256)
        let rc = ccrypto_gcm_seal(kek, nonce, additionalData, additionalData.count, key.bytes, key.bytes.count,
                                  &sealed, &tag, &message, message.count)
        guard rc == 0 else { throw CairnError.internal("cannot wrap the volume key: \(cString(message))") }
        return VolumeEncryption(iterations: iterations, salt: Data(salt).base64EncodedString(),
                                nonce: Data(nonce).base64EncodedString(), wrappedKey: Data(sealed).base64EncodedString(),
                                tag: Data(tag).base64EncodedString())
    }

    /// The data key of `encryption`, unlocked with `passphrase`; FAILED_PRECONDITION when the
    /// passphrase does not unlock it.
    public static func unwrap(_ encryption: VolumeEncryption, passphrase: String, volumeID: String) throws -> VolumeDataKey {
        guard encryption.version == VolumeEncryption.currentVersion, encryption.cipher == VolumeEncryption.xtsPlain64,
              encryption.unitBytes == VolumeCipher.unitBytes, encryption.kdf == VolumeEncryption.pbkdf2,
              encryption.wrap == VolumeEncryption.gcm else {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is encrypted with version \(encryption.version), \(encryption.cipher) (\(encryption.unitBytes)-byte units), \(encryption.kdf) and \(encryption.wrap), which this cairn cannot unlock; run a cairn release that supports it")
        }
        guard let salt = Data(base64Encoded: encryption.salt), let nonce = Data(base64Encoded: encryption.nonce),
              let sealed = Data(base64Encoded: encryption.wrappedKey), let tag = Data(base64Encoded: encryption.tag),
              nonce.count == 12, tag.count == 16, sealed.count == 64, (1...10_000_000).contains(encryption.iterations) else {
            throw CairnError.failedPrecondition(
                "volume \(volumeID)'s wrapped key in the store is damaged (salt, nonce, key or tag); it cannot be unlocked — restore the volume record from a backup")
        }
        var kek = try derive(passphrase: passphrase, salt: [UInt8](salt), iterations: encryption.iterations)
        defer { kek.withUnsafeMutableBytes { ccrypto_cleanse($0.baseAddress, $0.count) } }
        var key = [UInt8](repeating: 0, count: sealed.count)
        var message = [CChar](repeating: 0, count: 256)
        let rc = ccrypto_gcm_open(kek, [UInt8](nonce), additionalData, additionalData.count, [UInt8](sealed), sealed.count,
                                  [UInt8](tag), &key, &message, message.count)
        switch rc {
        case 0: return VolumeDataKey(key)
        case 1:
            throw CairnError.failedPrecondition(
                "the passphrase in secret `\(EncryptionNames.passphraseSecret)` does not unlock volume \(volumeID): its data stays as it is, nothing was formatted; pass the passphrase the volume was first staged with (or rekey it with `cairn volume rekey`)")
        default:
            throw CairnError.internal("cannot unwrap volume \(volumeID)'s key: \(cString(message))")
        }
    }

    /// Seals the same data key under `newPassphrase` (after checking `oldPassphrase` unlocks it).
    public static func rewrap(_ encryption: VolumeEncryption, volumeID: String, oldPassphrase: String,
                              newPassphrase: String) throws -> VolumeEncryption {
        let key = try unwrap(encryption, passphrase: oldPassphrase, volumeID: volumeID)
        return try wrap(key, passphrase: newPassphrase, iterations: max(encryption.iterations, defaultIterations))
    }

    static func checkPassphrase(_ passphrase: String) throws {
        guard !passphrase.isEmpty else {
            throw CairnError.invalidArgument("secret `\(EncryptionNames.passphraseSecret)` is empty; an encrypted volume needs a passphrase")
        }
    }

    static func derive(passphrase: String, salt: [UInt8], iterations: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var message = [CChar](repeating: 0, count: 256)
        let bytes = Array(passphrase.utf8)
        let rc = ccrypto_pbkdf2_sha256(bytes, bytes.count, salt, salt.count, UInt32(iterations), &out, out.count, &message, message.count)
        guard rc == 0 else { throw CairnError.internal("cannot derive the key-encryption key: \(cString(message))") }
        return out
    }

    static func random(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var message = [CChar](repeating: 0, count: 256)
        guard ccrypto_random(&out, count, &message, message.count) == 0 else {
            throw CairnError.internal("cannot draw random bytes: \(cString(message))")
        }
        return out
    }
}
