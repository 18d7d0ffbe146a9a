import CCryptoShim
import CairnCore
import CairnCrypto
import CairnStore
import Foundation
import Logging
import XCTest

/// The volume cipher and the data key's wrapping (docs/encryption.md).
final class VolumeEncryptionTests: XCTestCase {
    private func hex(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        var i = s.startIndex
        while i < s.endIndex {
            let j = s.index(i, offsetBy: 2)
            out.append(UInt8(s[i..<j], radix: 16)!)
            i = j
        }
        return out
    }

    /// IEEE 1619-2007 (XTS-AES) test vector 10: AES-256, data unit sequence number 0xff, 512
    /// bytes 00..ff twice. Checks the tweak's byte order (little-endian, as dm-crypt's plain64).
    func testXTSMatchesTheIEEE1619Vector() {
        let key = hex("2718281828459045235360287471352662497757247093699959574966967627"
                      + "3141592653589793238462643383279502884197169399375105820974944592")
        let plain = (0..<512).map { UInt8($0 & 0xff) }
        var out = [UInt8](repeating: 0, count: 512)
        var message = [CChar](repeating: 0, count: 256)
        XCTAssertEqual(ccrypto_xts(key, 1, 0, 0xff, 512, 1, plain, &out, &message, message.count), 0)
        XCTAssertEqual(Array(out.prefix(32)), hex("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"))
    }

    /// 4 KiB units at offset 5 × 4096: the unit index is the tweak (the expected bytes come from
    /// Python's `cryptography` AES-XTS with tweak 5 and 6, little-endian), round trip, and a unit
    /// of zeros on the replica reads as zeros.
    func testCipherUsesTheUnitIndexAsTweak() throws {
        let cipher = try VolumeCipher(VolumeDataKey((0..<64).map { UInt8($0) }))
        let plain = (0..<8192).map { UInt8($0 % 251) }
        var sealed = [UInt8](repeating: 0, count: plain.count)
        try plain.withUnsafeBytes { p in
            try sealed.withUnsafeMutableBytes { try cipher.encrypt(offset: 5 * 4096, p, into: $0) }
        }
        XCTAssertEqual(Array(sealed[0..<32]), hex("f87ca2f29b117c1b024a6ec8e8c5994e76f7d16b43eed21e6936126969e00dab"))
        XCTAssertEqual(Array(sealed[4064..<4096]), hex("97e9898b6304ba6171381c89655941adaf565b31746b3579e8b2ddc11e567f8c"))
        XCTAssertEqual(Array(sealed[4096..<4128]), hex("eece3e1e4c6bc619948d1d5671eef92a16737d3087ab967f3c7ecb4ecfe872d7"))

        var opened = sealed
        try opened.withUnsafeMutableBytes { try cipher.decrypt(offset: 5 * 4096, $0) }
        XCTAssertEqual(opened, plain)
        // The same ciphertext at another offset does not decrypt to the plaintext.
        var moved = sealed
        try moved.withUnsafeMutableBytes { try cipher.decrypt(offset: 7 * 4096, $0) }
        XCTAssertNotEqual(Array(moved[0..<4096]), Array(plain[0..<4096]))

        // Never-written units (zeros on the replica) read as zeros; written zeros do not store zeros.
        var mixed = [UInt8](repeating: 0, count: 8192)
        mixed.replaceSubrange(4096..<8192, with: sealed[4096..<8192])
        try mixed.withUnsafeMutableBytes { try cipher.decrypt(offset: 5 * 4096, $0) }
        XCTAssertEqual(Array(mixed[0..<4096]), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(Array(mixed[4096..<8192]), Array(plain[4096..<8192]))
        let zeros = [UInt8](repeating: 0, count: 4096)
        var sealedZeros = zeros
        try zeros.withUnsafeBytes { z in try sealedZeros.withUnsafeMutableBytes { try cipher.encrypt(offset: 0, z, into: $0) } }
        XCTAssertNotEqual(sealedZeros, zeros)
    }

    func testAVolumeKeyIsSixtyFourBytes() {
        XCTAssertThrowsError(try VolumeCipher(VolumeDataKey([UInt8](repeating: 1, count: 32))))
    }

    /// The wrapping: the right passphrase unlocks the same key, a wrong one is FAILED_PRECONDITION,
    /// a rewrap keeps the data key (no data rewritten) and the old passphrase stops working.
    func testWrapUnwrapRewrap() throws {
        let (wrapped, key) = try VolumeKeys.create(passphrase: "correct horse", iterations: 1000)
        XCTAssertEqual(key.bytes.count, 64)
        XCTAssertEqual(wrapped.cipher, "aes-256-xts-plain64")
        XCTAssertEqual(wrapped.kdf, "pbkdf2-hmac-sha256")
        XCTAssertEqual(wrapped.wrap, "aes-256-gcm")
        XCTAssertFalse(wrapped.wrappedKey.contains(Data(key.bytes).base64EncodedString()))
        XCTAssertEqual(try VolumeKeys.unwrap(wrapped, passphrase: "correct horse", volumeID: "vol-1"), key)
        XCTAssertThrowsError(try VolumeKeys.unwrap(wrapped, passphrase: "correct horsf", volumeID: "vol-1")) { error in
            XCTAssertEqual((error as? CairnError)?.code, .failedPrecondition)
            XCTAssertTrue("\(error)".contains("does not unlock volume vol-1"), "\(error)")
        }
        XCTAssertThrowsError(try VolumeKeys.create(passphrase: "")) { error in
            XCTAssertEqual((error as? CairnError)?.code, .invalidArgument)
        }
        // A tampered record is detected, never used.
        var tampered = wrapped
        tampered.tag = Data(repeating: 0, count: 16).base64EncodedString()
        XCTAssertThrowsError(try VolumeKeys.unwrap(tampered, passphrase: "correct horse", volumeID: "vol-1"))

        let rekeyed = try VolumeKeys.rewrap(wrapped, volumeID: "vol-1", oldPassphrase: "correct horse", newPassphrase: "battery staple")
        XCTAssertNotEqual(rekeyed.salt, wrapped.salt)
        XCTAssertEqual(try VolumeKeys.unwrap(rekeyed, passphrase: "battery staple", volumeID: "vol-1"), key)
        XCTAssertThrowsError(try VolumeKeys.unwrap(rekeyed, passphrase: "correct horse", volumeID: "vol-1"))
        XCTAssertThrowsError(try VolumeKeys.rewrap(wrapped, volumeID: "vol-1", oldPassphrase: "wrong", newPassphrase: "x"))
    }

    /// The record is self-describing JSON (backups carry it as it is) and an old volume record
    /// without the field still decodes.
    func testRecordIsSelfDescribingJSON() throws {
        let (wrapped, _) = try VolumeKeys.create(passphrase: "p", iterations: 1000)
        var volume = VolumeRecord(id: "vol-1", name: "v", capacityBytes: 1 << 20, parameters: ["encrypted": "true"],
                                  fsType: "ext4", accessModes: [1], accessibleTopology: [:])
        volume.encryption = wrapped
        let json = try JSONEncoder().encode(volume)
        let text = String(decoding: json, as: UTF8.self)
        for field in ["version", "cipher", "unitBytes", "kdf", "iterations", "salt", "wrap", "nonce", "wrappedKey", "tag"] {
            XCTAssertTrue(text.contains("\"\(field)\""), field)
        }
        XCTAssertEqual(try JSONDecoder().decode(VolumeRecord.self, from: json), volume)
        XCTAssertTrue(volume.isEncrypted)
        volume.encryption = nil
        let plain = try JSONEncoder().encode(volume)
        XCTAssertNil(try JSONDecoder().decode(VolumeRecord.self, from: plain).encryption)
        XCTAssertEqual("\(VolumeDataKey([1, 2, 3]))", "VolumeDataKey(3 bytes, hidden)")
    }

    /// `cairn volume rekey`'s work in a real store: the volume and its snapshot are sealed under
    /// the new passphrase with the same data key (so every block stays readable); a wrong old
    /// passphrase changes nothing.
    func testRekeyRewrapsTheVolumeAndItsSnapshotsWithTheSameKey() async throws {
        let dir = NSTemporaryDirectory() + "cairn-rekey-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        let (wrapped, key) = try VolumeKeys.create(passphrase: "old", iterations: 1000)
        var volume = VolumeRecord(id: "vol-1", name: "v", capacityBytes: 1 << 20, parameters: ["encrypted": "true"],
                                  fsType: "ext4", accessModes: [1], accessibleTopology: [:])
        volume.encryption = wrapped
        try await store.createVolume(volume)
        var snapshot = SnapshotRecord(id: "snap-1", name: "s", sourceVolumeID: "vol-1", sizeBytes: 1 << 20, readyToUse: true)
        snapshot.encryption = wrapped
        try await store.createSnapshot(snapshot)

        do {
            _ = try await VolumeRekey.rekey(store: store, volumeID: "vol-1", oldPassphrase: "wrong", newPassphrase: "new")
            XCTFail("a wrong passphrase rekeyed the volume")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .failedPrecondition)
        }
        let unchanged = try await store.volume(id: "vol-1")?.encryption
        XCTAssertEqual(unchanged, wrapped)

        let outcome = try await VolumeRekey.rekey(store: store, volumeID: "vol-1", oldPassphrase: "old", newPassphrase: "new")
        XCTAssertEqual(outcome.snapshots, 1)
        let rekeyed = try await store.volume(id: "vol-1")!.encryption!
        XCTAssertEqual(try VolumeKeys.unwrap(rekeyed, passphrase: "new", volumeID: "vol-1"), key)
        XCTAssertThrowsError(try VolumeKeys.unwrap(rekeyed, passphrase: "old", volumeID: "vol-1"))
        let snapshotKey = try await store.snapshot(id: "snap-1")!.encryption!
        XCTAssertEqual(try VolumeKeys.unwrap(snapshotKey, passphrase: "new", volumeID: "vol-1"), key)

        var plain = volume
        plain.id = "vol-2"
        plain.name = "p"
        plain.parameters = [:]
        plain.encryption = nil
        try await store.createVolume(plain)
        do {
            _ = try await VolumeRekey.rekey(store: store, volumeID: "vol-2", oldPassphrase: "old", newPassphrase: "new")
            XCTFail("a plain volume was rekeyed")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .failedPrecondition)
        }
    }
}
