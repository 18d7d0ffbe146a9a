import CSIProto
import CairnCSI
import CairnCore
import Foundation
import SwiftProtobuf

// CSI snapshots, clones, expansion and ControllerModifyVolume (docs/snapshots.md). Same shape
// as every handler: validate → lock (or ABORTED) → return early if done → act → persist.

extension ControllerService {
    static let snapshotIDPrefix = "snap-"

    // MARK: CreateSnapshot / DeleteSnapshot

    public func createSnapshot(_ request: Csi_V1_CreateSnapshotRequest) async throws -> Csi_V1_CreateSnapshotResponse {
        try Validate.volumeName(request.name)
        if request.sourceVolumeID.isEmpty { throw CairnError.invalidArgument("source_volume_id is required") }
        try Validate.volumeID(request.sourceVolumeID, field: "source_volume_id")
        try Self.checkSnapshotParameters(request.parameters)
        return try await locks.withLock("snapshot-name:\(request.name)", operation: "CreateSnapshot") {
            if let existing = try await store.snapshot(named: request.name), !existing.isHidden {
                guard existing.sourceVolumeID == request.sourceVolumeID else {
                    throw CairnError.alreadyExists(
                        "snapshot \"\(request.name)\" already exists for source volume \(existing.sourceVolumeID), not \(request.sourceVolumeID)")
                }
                if existing.readyToUse { return Self.snapshotResponse(existing) }
                // A CreateSnapshot interrupted after its record was written: finish that one.
                return Self.snapshotResponse(try await finishSnapshot(existing))
            }
            guard try await store.volume(id: request.sourceVolumeID) != nil else {
                throw CairnError.notFound("source volume \(request.sourceVolumeID) does not exist")
            }
            let snapshot = try await startSnapshot(name: request.name, of: request.sourceVolumeID, hidden: false)
            return Self.snapshotResponse(try await finishSnapshot(snapshot))
        }
    }

    static func checkSnapshotParameters(_ parameters: [String: String]) throws {
        for key in parameters.keys.sorted() where !VolumeParameters.ignoredPrefixes.contains(where: { key.hasPrefix($0) }) {
            throw CairnError.invalidArgument(
                "unknown snapshot parameter \"\(Validate.printable(key))\"; Cairn takes none (and ignores csi.storage.k8s.io/* keys)")
        }
    }

    /// Records the snapshot as not ready yet, before any data is taken: a crash from here on
    /// leaves a record that the repeated call (or DeleteSnapshot) finds.
    func startSnapshot(name: String, of volumeID: String, hidden: Bool) async throws -> SnapshotRecord {
        guard let volume = try await store.volume(id: volumeID) else {
            throw CairnError.notFound("source volume \(volumeID) does not exist")
        }
        let snapshot = SnapshotRecord(
            id: Self.snapshotIDPrefix + UUID().uuidString.lowercased(), name: name, sourceVolumeID: volume.id,
            sizeBytes: volume.capacityBytes, readyToUse: false, hidden: hidden ? true : nil, fsType: volume.fsType)
        try await store.createSnapshot(snapshot)
        return snapshot
    }

    /// Takes the snapshot's data under the source volume's lock (a concurrent publish, expand or
    /// delete of the source gets ABORTED instead of racing the barrier) and marks it ready.
    func finishSnapshot(_ pending: SnapshotRecord) async throws -> SnapshotRecord {
        try await locks.withLock(pending.sourceVolumeID, operation: "CreateSnapshot") {
            guard let volume = try await store.volume(id: pending.sourceVolumeID) else {
                try await store.deleteSnapshot(id: pending.id)
                throw CairnError.notFound("source volume \(pending.sourceVolumeID) was deleted before the snapshot was taken")
            }
            let started = ContinuousClock.now
            var snapshot = pending
            // Its blocks are the volume's ciphertext: a restore needs the same wrapped key.
            snapshot.encryption = volume.encryption
            do {
                snapshot.holders = try await backing.takeSnapshot(pending, of: volume, in: try await use(of: volume))
            } catch {
                // Nothing acknowledged depends on a half-taken snapshot: remove what was taken.
                do {
                    try await backing.deleteSnapshot(pending, source: volume)
                    try await store.deleteSnapshot(id: pending.id)
                } catch let cleanup {
                    logger.warning("could not remove a snapshot whose creation failed; CreateSnapshot with the same name finishes or DeleteSnapshot removes it",
                                   metadata: ["snapshot.id": "\(pending.id)", "error": "\(cleanup)"])
                }
                throw error
            }
            snapshot.readyToUse = true
            try await store.updateSnapshot(snapshot)
            logger.info("snapshot taken", metadata: [
                "snapshot.id": "\(snapshot.id)", "snapshot.name": "\(snapshot.name)", "volume.id": "\(volume.id)",
                "snapshot.bytes": "\(snapshot.sizeBytes)", "snapshot.holders": "\(snapshot.holders?.joined(separator: ",") ?? "local")",
                "duration": "\(ContinuousClock.now - started)",
            ])
            return snapshot
        }
    }

    /// Where the volume is in use, for the backing's write barrier.
    func use(of volume: VolumeRecord) async throws -> VolumeUse {
        let attached = try await store.attachments(volumeID: volume.id).first?.nodeID
        let stage = cluster == nil ? try await store.stage(volumeID: volume.id, nodeID: localNodeID) : nil
        return VolumeUse(attachedNode: attached, localStage: stage)
    }

    static func snapshotResponse(_ snapshot: SnapshotRecord) -> Csi_V1_CreateSnapshotResponse {
        var response = Csi_V1_CreateSnapshotResponse()
        response.snapshot = csiSnapshot(snapshot)
        return response
    }

    static func csiSnapshot(_ snapshot: SnapshotRecord) -> Csi_V1_Snapshot {
        var s = Csi_V1_Snapshot()
        s.snapshotID = snapshot.id
        s.sourceVolumeID = snapshot.sourceVolumeID
        s.sizeBytes = snapshot.sizeBytes
        s.creationTime = Google_Protobuf_Timestamp(date: snapshot.createdAt)
        s.readyToUse = snapshot.readyToUse
        if let group = snapshot.groupID { s.groupSnapshotID = group }
        return s
    }

    static func csiSnapshot(_ reference: BackupReference, _ backup: BackupDescription) -> Csi_V1_Snapshot {
        .with {
            $0.snapshotID = reference.description
            $0.sourceVolumeID = backup.sourceVolumeID
            $0.sizeBytes = backup.sizeBytes
            $0.readyToUse = true
            $0.creationTime = Google_Protobuf_Timestamp(date: backup.createdAt)
        }
    }

    public func deleteSnapshot(_ request: Csi_V1_DeleteSnapshotRequest) async throws -> Csi_V1_DeleteSnapshotResponse {
        if request.snapshotID.isEmpty { throw CairnError.invalidArgument("snapshot_id is required") }
        if let reference = try BackupReference.parse(request.snapshotID) {
            // A backup as a snapshot (a VolumeSnapshotContent with deletionPolicy Delete).
            guard backups != nil else { return Csi_V1_DeleteSnapshotResponse() }
            try await locks.withLock(request.snapshotID, operation: "DeleteSnapshot") {
                try await backupSource(reference).delete(reference, secrets: request.secrets)
            }
            return Csi_V1_DeleteSnapshotResponse()
        }
        try Validate.volumeID(request.snapshotID, field: "snapshot_id")
        return try await locks.withLock(request.snapshotID, operation: "DeleteSnapshot") {
            guard let snapshot = try await store.snapshot(id: request.snapshotID), !snapshot.isHidden else {
                return Csi_V1_DeleteSnapshotResponse()
            }
            if let group = snapshot.groupID, try await store.groupSnapshot(id: group) != nil {
                throw CairnError.failedPrecondition(
                    "snapshot \(snapshot.id) belongs to group snapshot \(group); DeleteVolumeGroupSnapshot removes it with the group")
            }
            try await removeSnapshot(snapshot)
            return Csi_V1_DeleteSnapshotResponse()
        }
    }

    func removeSnapshot(_ snapshot: SnapshotRecord) async throws {
        let source = try await store.volume(id: snapshot.sourceVolumeID)
        try await backing.deleteSnapshot(snapshot, source: source)
        try await store.deleteSnapshot(id: snapshot.id)
        logger.info("snapshot deleted", metadata: ["snapshot.id": "\(snapshot.id)", "snapshot.name": "\(snapshot.name)",
                                                    "volume.id": "\(snapshot.sourceVolumeID)"])
    }

    // MARK: ListSnapshots / GetSnapshot

    public func listSnapshots(_ request: Csi_V1_ListSnapshotsRequest) async throws -> Csi_V1_ListSnapshotsResponse {
        if request.maxEntries < 0 { throw CairnError.invalidArgument("max_entries must not be negative") }
        if !request.startingToken.isEmpty && !Self.isToken(request.startingToken, prefix: Self.snapshotIDPrefix) {
            throw CairnError.aborted("starting_token \"\(Validate.printable(request.startingToken))\" was not issued by this plugin; list again from the start")
        }
        var response = Csi_V1_ListSnapshotsResponse()
        if !request.snapshotID.isEmpty, let reference = try? BackupReference.parse(request.snapshotID) {
            // A backup (the external-snapshotter checks a pre-provisioned content this way).
            guard backups != nil else { return response }
            do {
                let backup = try await backupSource(reference).describe(reference, secrets: request.secrets)
                if request.sourceVolumeID.isEmpty || request.sourceVolumeID == backup.sourceVolumeID {
                    response.entries = [.with { $0.snapshot = Self.csiSnapshot(reference, backup) }]
                }
            } catch let error as CairnError where error.code == .notFound {}
            return response
        }
        if !request.snapshotID.isEmpty {
            // One snapshot, or none: an id that names nothing is an empty list, not an error.
            if let snapshot = try await store.snapshot(id: request.snapshotID), !snapshot.isHidden,
               request.sourceVolumeID.isEmpty || snapshot.sourceVolumeID == request.sourceVolumeID {
                response.entries = [.with { $0.snapshot = Self.csiSnapshot(snapshot) }]
            }
            return response
        }
        // Snapshots are few next to volumes: filter after reading, page over what matches.
        let matching = try await store.listSnapshots(afterID: request.startingToken.isEmpty ? nil : request.startingToken, limit: 0)
            .filter { !$0.isHidden && (request.sourceVolumeID.isEmpty || $0.sourceVolumeID == request.sourceVolumeID) }
        let limit = Int(request.maxEntries)
        let shown = limit > 0 ? Array(matching.prefix(limit)) : matching
        response.entries = shown.map { snapshot in .with { $0.snapshot = Self.csiSnapshot(snapshot) } }
        if limit > 0 && matching.count > limit, let last = shown.last { response.nextToken = last.id }
        return response
    }

    public func getSnapshot(_ request: Csi_V1_GetSnapshotRequest) async throws -> Csi_V1_GetSnapshotResponse {
        if request.snapshotID.isEmpty { throw CairnError.invalidArgument("snapshot_id is required") }
        if let reference = try BackupReference.parse(request.snapshotID) {
            let backup = try await backupSource(reference).describe(reference, secrets: request.secrets)
            var response = Csi_V1_GetSnapshotResponse()
            response.snapshot = Self.csiSnapshot(reference, backup)
            return response
        }
        guard let snapshot = try await store.snapshot(id: request.snapshotID), !snapshot.isHidden else {
            throw CairnError.notFound("snapshot \(Validate.printable(request.snapshotID)) does not exist")
        }
        var response = Csi_V1_GetSnapshotResponse()
        response.snapshot = Self.csiSnapshot(snapshot)
        return response
    }

    // MARK: CreateVolume from a snapshot or a volume

    static func contentSource(_ request: Csi_V1_CreateVolumeRequest) throws -> ContentSource? {
        guard request.hasVolumeContentSource else { return nil }
        switch request.volumeContentSource.type {
        case .snapshot(let s):
            if s.snapshotID.isEmpty { throw CairnError.invalidArgument("volume_content_source.snapshot.snapshot_id is required") }
            return .snapshot(id: s.snapshotID)
        case .volume(let v):
            if v.volumeID.isEmpty { throw CairnError.invalidArgument("volume_content_source.volume.volume_id is required") }
            try Validate.volumeID(v.volumeID, field: "volume_content_source.volume.volume_id")
            return .volume(id: v.volumeID)
        case nil:
            throw CairnError.invalidArgument("volume_content_source names neither a snapshot nor a volume")
        }
    }

    /// Checks the source exists (NOT_FOUND) and is ready, and fits the new volume: raises `size`
    /// to the source's when smaller (OUT_OF_RANGE past `limit`) and takes the source's filesystem
    /// (INVALID_ARGUMENT when the request names another).
    func checkSource(_ source: ContentSource, size: inout Int64, limit: Int64, fsType: inout String,
                     secrets: [String: String] = [:]) async throws {
        let sourceBytes: Int64
        let sourceFs: String
        switch source {
        case .snapshot(let id):
            if let reference = try BackupReference.parse(id) {
                let backup = try await backupSource(reference).describe(reference, secrets: secrets)
                sourceBytes = backup.sizeBytes
                sourceFs = backup.fsType
                break
            }
            guard let snapshot = try await store.snapshot(id: id), !snapshot.isHidden else {
                throw CairnError.notFound("source snapshot \(Validate.printable(id)) does not exist")
            }
            guard snapshot.readyToUse else {
                throw CairnError.unavailable("source snapshot \(id) is not ready yet (its CreateSnapshot has not finished); retry")
            }
            sourceBytes = snapshot.sizeBytes
            sourceFs = snapshot.fsType ?? ""
        case .volume(let id):
            guard let volume = try await store.volume(id: id) else {
                throw CairnError.notFound("source volume \(id) does not exist")
            }
            sourceBytes = volume.capacityBytes
            sourceFs = volume.fsType
        }
        if size < sourceBytes {
            guard limit == 0 || limit >= sourceBytes else {
                throw CairnError.outOfRange(
                    "\(source) holds \(sourceBytes) bytes, more than capacity_range.limit_bytes \(limit); a volume is at least as large as its source")
            }
            size = sourceBytes
        }
        if !sourceFs.isEmpty {
            if !fsType.isEmpty && fsType != sourceFs {
                throw CairnError.invalidArgument("\(source) holds a \(sourceFs) filesystem; the new volume cannot be \(fsType)")
            }
            fsType = sourceFs
        }
    }

    /// The wrapped key a volume made from `source` takes (nil: none yet, or a plain source);
    /// INVALID_ARGUMENT unless the new volume is encrypted exactly when its source is.
    func sourceEncryption(_ source: ContentSource, encrypted: Bool, secrets: [String: String] = [:]) async throws -> VolumeEncryption? {
        let sourceEncrypted: Bool
        let encryption: VolumeEncryption?
        switch source {
        case .snapshot(let id):
            if let reference = try BackupReference.parse(id) {
                // The backup of an encrypted volume holds its ciphertext and its wrapped key.
                encryption = try await backupSource(reference).describe(reference, secrets: secrets).encryption
                sourceEncrypted = encryption != nil
                break
            }
            let snapshot = try await store.snapshot(id: id)
            var volume: VolumeRecord?
            if let snapshot { volume = try await store.volume(id: snapshot.sourceVolumeID) }
            encryption = snapshot?.encryption
            sourceEncrypted = encryption != nil || volume?.isEncrypted == true
        case .volume(let id):
            let volume = try await store.volume(id: id)
            encryption = volume?.encryption
            sourceEncrypted = volume?.isEncrypted == true
        }
        guard sourceEncrypted == encrypted else {
            throw CairnError.invalidArgument(sourceEncrypted
                ? "\(source) is encrypted: a volume made from it holds its ciphertext, so create it with \(EncryptionNames.parameter)=\"true\" (it uses the source's passphrase)"
                : "\(source) is not encrypted: a volume made from it would hold its plaintext; create it without \(EncryptionNames.parameter)=\"true\", or copy the data into a new encrypted volume")
        }
        return encryption
    }

    /// Fills a new volume (recorded with `contentPending`) from its source, then clears the mark.
    func fill(_ volume: VolumeRecord, from source: ContentSource, secrets: [String: String] = [:]) async throws {
        let encryption = try await createFromSource(volume, source: source, secrets: secrets)
        _ = try await store.updateVolume(id: volume.id, what: "finish creating volume \(volume.id) from \(source)") { record in
            guard record.contentPending != nil else { return false }
            record.contentPending = nil
            // The snapshot the blocks came from says which key encrypted them (the source may
            // have got its key after CreateVolume read it).
            if record.isEncrypted, let encryption { record.encryption = encryption }
            return true
        }
    }

    /// Fills the new volume's storage from its source, instead of `backing.create`. Idempotent:
    /// a repeat after an interruption redoes or finishes each step. Returns the wrapped key of
    /// the snapshot the blocks came from (nil: a plain source, one never staged, or a backup).
    @discardableResult
    func createFromSource(_ volume: VolumeRecord, source: ContentSource, secrets: [String: String] = [:]) async throws -> VolumeEncryption? {
        switch source {
        case .snapshot(let id):
            if let reference = try BackupReference.parse(id) {
                try await backing.create(volume)
                try await backupSource(reference).restore(reference, into: volume, secrets: secrets)
                return nil
            }
            guard let snapshot = try await store.snapshot(id: id) else {
                throw CairnError.notFound("source snapshot \(id) was deleted meanwhile")
            }
            try await backing.createFromSnapshot(volume, snapshot: snapshot, source: try await store.volume(id: snapshot.sourceVolumeID))
            return snapshot.encryption
        case .volume(let id):
            // A clone of a volume is a clone of a snapshot taken now, at a barrier if it is in
            // use. Cluster mode keeps that snapshot (hidden; the clone shares its layers) until
            // the clone is deleted; on one machine the clone is a copy and it goes at once.
            let baseName = SnapshotRecord.cloneBaseName(of: volume.id)
            let snapshot: SnapshotRecord
            if let existing = try await store.snapshot(named: baseName) {
                snapshot = existing.readyToUse ? existing : try await finishSnapshot(existing)
            } else {
                snapshot = try await finishSnapshot(try await startSnapshot(name: baseName, of: id, hidden: true))
            }
            do {
                try await backing.createFromSnapshot(volume, snapshot: snapshot, source: try await store.volume(id: id))
            } catch {
                try? await removeSnapshot(snapshot)
                throw error
            }
            if cluster == nil { try await removeSnapshot(snapshot) }
            return snapshot.encryption
        }
    }

    /// The configured backup targets, or NOT_FOUND for a `backup:` source without any.
    func backupSource(_ reference: BackupReference) throws -> any BackupSource {
        guard let backups else {
            throw CairnError.notFound("source snapshot \(reference) does not exist: this plugin has no backup targets (start it with --backup-targets FILE)")
        }
        return backups
    }

    /// DeleteVolume: the hidden snapshot a clone of a volume was made from goes with the clone.
    func removeCloneBase(of volume: VolumeRecord) async throws {
        guard case .volume = volume.contentSource,
              let base = try await store.snapshot(named: SnapshotRecord.cloneBaseName(of: volume.id)), base.isHidden else { return }
        try await removeSnapshot(base)
    }

    /// Snapshots of `volume` that users can see (ListSnapshots), by id.
    func visibleSnapshots(of volumeID: String) async throws -> [SnapshotRecord] {
        try await store.listSnapshots(afterID: nil, limit: 0).filter { $0.sourceVolumeID == volumeID && !$0.isHidden }
    }

    // MARK: ControllerExpandVolume

    public func controllerExpandVolume(_ request: Csi_V1_ControllerExpandVolumeRequest) async throws -> Csi_V1_ControllerExpandVolumeResponse {
        try Validate.volumeID(request.volumeID)
        guard request.hasCapacityRange else { throw CairnError.invalidArgument("capacity_range is required") }
        if request.hasVolumeCapability {
            _ = try AccessRules.parse(request.volumeCapability, field: "volume_capability")
        }
        return try await locks.withLock(request.volumeID, operation: "ControllerExpandVolume") {
            guard var volume = try await store.volume(id: request.volumeID) else {
                throw CairnError.notFound("volume \(request.volumeID) does not exist")
            }
            let wanted = try capacity.size(required: request.capacityRange.requiredBytes,
                                           limit: request.capacityRange.limitBytes, fsType: volume.fsType)
            var response = Csi_V1_ControllerExpandVolumeResponse()
            response.nodeExpansionRequired = true
            let limit = request.capacityRange.limitBytes
            if wanted <= volume.capacityBytes {
                // Already this large (a repeated call) or larger: volumes never shrink.
                if limit > 0 && volume.capacityBytes > limit {
                    throw CairnError.outOfRange(
                        "volume \(volume.id) already has \(volume.capacityBytes) bytes, more than limit_bytes \(limit); volumes cannot shrink")
                }
                try await backing.expand(volume)  // finishes a growth interrupted after the record
                response.capacityBytes = volume.capacityBytes
                return response
            }
            if cluster == nil {
                let provisioned = try await store.provisionedBytes()
                guard capacity.fits(wanted - volume.capacityBytes, provisioned: provisioned) else {
                    throw CairnError.resourceExhausted(
                        "not enough capacity to grow volume \(volume.id) to \(wanted) bytes: \(capacity.poolBytes - provisioned) bytes are free on node \(localNodeID)")
                }
            }
            let old = volume.capacityBytes
            volume.capacityBytes = wanted
            try await backing.expand(volume)
            _ = try await store.updateVolume(id: volume.id, what: "expand volume \(volume.id)") { record in
                guard record.capacityBytes < wanted else { return false }
                record.capacityBytes = wanted
                return true
            }
            logger.info("volume expanded", metadata: ["volume.id": "\(volume.id)", "volume.bytes": "\(wanted)",
                                                      "volume.previous_bytes": "\(old)"])
            response.capacityBytes = wanted
            return response
        }
    }

    // MARK: ControllerModifyVolume

    public func controllerModifyVolume(_ request: Csi_V1_ControllerModifyVolumeRequest) async throws -> Csi_V1_ControllerModifyVolumeResponse {
        try Validate.volumeID(request.volumeID)
        guard enforcesLimits else {
            throw CairnError(.unimplemented, "ControllerModifyVolume is not offered: \(Self.noEnforcement)")
        }
        let limits = try QoSLimits(request.mutableParameters)
        return try await locks.withLock(request.volumeID, operation: "ControllerModifyVolume") {
            guard try await store.volume(id: request.volumeID) != nil else {
                throw CairnError.notFound("volume \(request.volumeID) does not exist")
            }
            let changed = try await store.updateVolume(id: request.volumeID, what: "modify volume \(request.volumeID)") { volume in
                var merged = volume.mutableParameters ?? [:]
                for (key, value) in limits.stored { merged[key] = value }
                guard merged != (volume.mutableParameters ?? [:]) else { return false }
                volume.mutableParameters = merged
                return true
            }
            if let localLimits {
                // One machine: the node is this process; the device takes the recorded limits now
                // (also when unchanged: a repeat repairs a device that lost them).
                let staged = try await localLimits.applyRecordedLimits(volumeID: request.volumeID)
                if changed {
                    logger.info(staged ? "volume limits changed and applied to its device" : "volume limits changed; NodeStage applies them",
                                metadata: ["volume.id": "\(request.volumeID)", "limits": "\(limits.stored)"])
                }
            } else if changed {
                logger.info("volume limits changed; the engine applies them within its membership interval (2 s)",
                            metadata: ["volume.id": "\(request.volumeID)", "limits": "\(limits.stored)"])
            }
            return Csi_V1_ControllerModifyVolumeResponse()
        }
    }
}

extension ControllerService {
    /// Cluster mode: a clone's replicas go on the nodes whose replicas hold the source's data
    /// (its layers are hard-linked there, not copied), up to `count`. If fewer hold it, the
    /// rest are new, empty replicas on other nodes, out of sync: the engine copies them in full
    /// once the clone is staged, as after re-replication.
    func cloneReplicas(source: ContentSource, count: Int) async throws -> [ReplicaRecord] {
        let holders: [String]
        switch source {
        case .snapshot(let id):
            holders = try await store.snapshot(id: id)?.holders ?? []
        case .volume(let id):
            holders = try await store.volume(id: id)?.replicas?.filter(\.inSync).map(\.nodeID) ?? []
        }
        let candidates = try await placementCandidates()
        var replicas: [ReplicaRecord] = []
        for nodeID in holders.prefix(count) {
            guard let node = candidates.first(where: { $0.nodeID == nodeID }), let address = node.address else {
                throw CairnError.unavailable(
                    "node \(nodeID), which holds \(source)'s data, is not live; a clone is made on the nodes that hold its source. Retry when it is back")
            }
            replicas.append(ReplicaRecord(nodeID: nodeID, address: address, inSync: true))
        }
        guard !replicas.isEmpty else {
            throw CairnError.failedPrecondition("\(source) is held by no replica; it cannot be cloned")
        }
        if replicas.count < count {
            let others = candidates.filter { c in !replicas.contains { $0.nodeID == c.nodeID } }
            let extra = (try? Placement.choose(count: count - replicas.count, size: 0, candidates: others, preferred: [])) ?? []
            for node in extra {
                replicas.append(ReplicaRecord(nodeID: node.nodeID, address: node.address ?? "", inSync: false,
                                              outOfSyncSince: Date(), reason: "new replica of a clone: full copy pending"))
            }
        }
        return replicas
    }
}
