import CairnCore

/// A passphrase change (`cairn volume rekey`): the volume's data key is sealed again under the
/// new passphrase, in its record and in every snapshot of it that carries the same wrapping.
/// No block is rewritten. Clones and restored volumes have their own record: rekey them too.
public enum VolumeRekey {
    public struct Outcome: Sendable, Equatable {
        public var snapshots: Int
    }

    public static func rekey(store: any MetadataStore, volumeID: String, oldPassphrase: String,
                             newPassphrase: String) async throws -> Outcome {
        guard let volume = try await store.volume(id: volumeID) else {
            throw CairnError.notFound("volume \(volumeID) does not exist; `cairn volume list` shows the volumes")
        }
        guard volume.isEncrypted else {
            throw CairnError.failedPrecondition("volume \(volumeID) is not encrypted (it was created without \(EncryptionNames.parameter)=\"true\"); there is no key to rekey")
        }
        guard let old = volume.encryption else {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) has no key yet: it gets one at its first NodeStageVolume, with the passphrase that stage carries")
        }
        let new = try await offCooperativePool {
            try VolumeKeys.rewrap(old, volumeID: volumeID, oldPassphrase: oldPassphrase, newPassphrase: newPassphrase)
        }
        let changed = try await store.updateVolume(id: volumeID, what: "rekey volume \(volumeID)") { record in
            guard record.encryption == old else {
                throw CairnError.aborted("volume \(volumeID)'s wrapped key changed while it was rekeyed; run the command again")
            }
            record.encryption = new
            return true
        }
        guard changed else { throw CairnError.internal("the store did not record volume \(volumeID)'s new wrapped key") }
        var snapshots = 0
        for var snapshot in try await store.listSnapshots(afterID: nil, limit: 0)
        where snapshot.sourceVolumeID == volumeID && snapshot.encryption == old {
            snapshot.encryption = new
            try await store.updateSnapshot(snapshot)
            snapshots += 1
        }
        return Outcome(snapshots: snapshots)
    }
}
