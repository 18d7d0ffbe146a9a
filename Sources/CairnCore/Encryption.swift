import Foundation

/// How an encrypted volume's data key is kept (docs/encryption.md): the volume's random 64-byte
/// AES-256-XTS key, sealed with AES-256-GCM under a key derived from the passphrase (the CSI
/// secret `passphrase`) by PBKDF2-HMAC-SHA256. Stored on the volume record (and copied onto its
/// snapshots and clones); never the key itself. Self-describing, so that a backup carries it as
/// opaque JSON and a later release can read an older version.
public struct VolumeEncryption: Codable, Sendable, Equatable {
    /// This layout's version (1).
    public var version: Int
    /// The data cipher: "aes-256-xts-plain64" — one XTS data unit per `unitBytes` of the volume,
    /// the tweak the unit's index as a 16-byte little-endian number.
    public var cipher: String
    public var unitBytes: Int
    /// The key derivation: "pbkdf2-hmac-sha256", its iteration count and salt (base64).
    public var kdf: String
    public var iterations: Int
    public var salt: String
    /// The wrapping: "aes-256-gcm" over the data key, its nonce, sealed key and tag (base64).
    public var wrap: String
    public var nonce: String
    public var wrappedKey: String
    public var tag: String

    public static let currentVersion = 1
    public static let xtsPlain64 = "aes-256-xts-plain64"
    public static let pbkdf2 = "pbkdf2-hmac-sha256"
    public static let gcm = "aes-256-gcm"

    public init(version: Int = VolumeEncryption.currentVersion, cipher: String = VolumeEncryption.xtsPlain64,
                unitBytes: Int = 4096, kdf: String = VolumeEncryption.pbkdf2, iterations: Int, salt: String,
                wrap: String = VolumeEncryption.gcm, nonce: String, wrappedKey: String, tag: String) {
        self.version = version
        self.cipher = cipher
        self.unitBytes = unitBytes
        self.kdf = kdf
        self.iterations = iterations
        self.salt = salt
        self.wrap = wrap
        self.nonce = nonce
        self.wrappedKey = wrappedKey
        self.tag = tag
    }
}

/// A volume's unwrapped data key (64 bytes: AES-256-XTS's two keys). Lives only in the memory of
/// the node that stages the volume; never logged (its description hides it), never stored.
/// Codable (base64) only for the FUSE keeper's socket, which holds it in memory with the
/// volume's connection across a restart of the engines' process.
public struct VolumeDataKey: Sendable, Equatable, Codable, CustomStringConvertible, CustomDebugStringConvertible {
    public let bytes: [UInt8]

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let data = Data(base64Encoded: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "a volume key is base64"))
        }
        bytes = [UInt8](data)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(Data(bytes).base64EncodedString())
    }

    public var description: String { "VolumeDataKey(\(bytes.count) bytes, hidden)" }
    public var debugDescription: String { description }
}

/// StorageClass parameter and CSI secret names of encryption.
public enum EncryptionNames {
    /// CreateVolume parameter: "true" encrypts the volume, "false" (the default) does not.
    public static let parameter = "encrypted"
    /// The CSI secret (NodeStageVolume's; CreateVolume's, optionally) holding the passphrase.
    public static let passphraseSecret = "passphrase"
}

extension VolumeRecord {
    /// The volume was created with `encrypted: "true"`.
    public var isEncrypted: Bool { parameters[EncryptionNames.parameter] == "true" }
}
