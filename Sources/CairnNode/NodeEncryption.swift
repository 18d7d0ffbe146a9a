import CairnCore
import CairnCrypto

// An encrypted volume's data key at NodeStageVolume (docs/encryption.md): unwrapped from the
// volume record with the passphrase in the stage's secrets, or — at the volume's first stage —
// made, wrapped and recorded. The key goes to the engine (`NodeBacking.activate`) and nowhere
// else; the passphrase is not kept.

extension NodeService {
    /// The data key for staging `volume`: nil for a plain volume, and for an encrypted one
    /// staged here before when the request carries no passphrase (a restore after a restart: the
    /// running engine has the key, or activation asks for NodeStage with the secret again).
    func dataKey(for volume: VolumeRecord, secrets: [String: String], stagedHere: Bool) async throws -> VolumeDataKey? {
        guard volume.isEncrypted else { return nil }
        guard let passphrase = secrets[EncryptionNames.passphraseSecret] else {
            if stagedHere { return nil }
            throw CairnError.invalidArgument(
                "volume \(volume.id) is encrypted: NodeStageVolume needs its passphrase in the secret `\(EncryptionNames.passphraseSecret)` (Kubernetes: the StorageClass parameters csi.storage.k8s.io/node-stage-secret-name and csi.storage.k8s.io/node-stage-secret-namespace name a Secret holding it)")
        }
        if let wrapped = volume.encryption {
            return try await offCooperativePool { try VolumeKeys.unwrap(wrapped, passphrase: passphrase, volumeID: volume.id) }
        }
        // A clone or restore holds its source's ciphertext: never a new key for it while its
        // source's is known (a new key would read the blocks as noise, and stage would format).
        if let inherited = try await sourceEncryption(of: volume) {
            _ = try await store.updateVolume(id: volume.id, what: "record volume \(volume.id)'s wrapped key from its source") { record in
                guard record.encryption == nil else { return false }
                record.encryption = inherited
                return true
            }
            let recorded = try await store.volume(id: volume.id)?.encryption ?? inherited
            return try await offCooperativePool { try VolumeKeys.unwrap(recorded, passphrase: passphrase, volumeID: volume.id) }
        }
        // The volume's first stage: a new key, recorded only if no other node recorded one
        // meanwhile (the store's transaction decides); the loser unwraps the winner's.
        let (made, key) = try await offCooperativePool { try VolumeKeys.create(passphrase: passphrase) }
        _ = try await store.updateVolume(id: volume.id, what: "record volume \(volume.id)'s wrapped key") { record in
            guard record.encryption == nil else { return false }
            record.encryption = made
            return true
        }
        guard let recorded = try await store.volume(id: volume.id)?.encryption else {
            throw CairnError.unavailable("volume \(volume.id)'s wrapped key did not reach the store; retry NodeStageVolume")
        }
        if recorded == made {
            logger.info("made and recorded the encrypted volume's wrapped key", metadata: ["volume.id": "\(volume.id)"])
            return key
        }
        return try await offCooperativePool { try VolumeKeys.unwrap(recorded, passphrase: passphrase, volumeID: volume.id) }
    }

    /// The wrapped key of the snapshot a clone or restore was made from (a clone of a volume:
    /// its hidden base snapshot), else its source volume's, or nil.
    private func sourceEncryption(of volume: VolumeRecord) async throws -> VolumeEncryption? {
        switch volume.contentSource {
        case nil:
            return nil
        case .snapshot(let id):
            // The data key never changes (a rekey only rewraps it): the source volume's
            // wrapping unlocks a snapshot that lacks its own.
            guard let snapshot = try await store.snapshot(id: id) else { return nil }
            if let own = snapshot.encryption { return own }
            return try await store.volume(id: snapshot.sourceVolumeID)?.encryption
        case .volume(let id):
            if let base = try await store.snapshot(named: SnapshotRecord.cloneBaseName(of: volume.id))?.encryption { return base }
            return try await store.volume(id: id)?.encryption
        }
    }
}
