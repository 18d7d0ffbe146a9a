import CairnCore

// VolumeBacking's snapshot, clone and growth calls for replicated volumes, on top of the
// replica layers and the engine barrier (ReplicatedBackingSnapshots.swift; docs/snapshots.md).
extension ReplicatedBacking {
    public func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]? {
        try await self.snapshot(volume: volume, snapshotID: snapshot.id, attachedNode: use.attachedNode)
    }

    public func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?] {
        let holders = try await groupSnapshot(members)
        return members.map { holders[$0.volume.id] }
    }

    /// The snapshot is a layer of its source's replicas: with the source gone (only a clone's
    /// hidden base can outlive it; the controller refuses to delete a volume with snapshots)
    /// there is nothing left to remove — the clones hold their own links to the layers.
    public func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) async throws {
        guard let source else { return }
        try await deleteSnapshot(volume: source, snapshotID: snapshot.id)
    }

    /// The new volume's replicas on the snapshot's holder nodes are clones (hard-linked layers,
    /// no copy); any beyond them are created empty and out of sync, and the engine copies them
    /// in full once the volume is staged.
    public func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) async throws {
        guard let source else {
            throw CairnError.failedPrecondition(
                "snapshot \(snapshot.id)'s source volume \(snapshot.sourceVolumeID) is gone, and the snapshot's layers with it; nothing is left to clone")
        }
        let holders = Set(snapshot.holders ?? [])
        var clones = volume
        clones.replicas = volume.replicas?.filter { holders.contains($0.nodeID) }
        try await clone(source: source, snapshotID: snapshot.id, into: clones)
        for replica in volume.replicas ?? [] where !holders.contains(replica.nodeID) {
            try await createReplica(volume, replica: replica)
        }
    }

    public func expand(_ volume: VolumeRecord) async throws {
        try await grow(volume: volume, to: volume.capacityBytes)
    }

    /// NodeExpandVolume: the controller grew the replicas; the engine here grows too, so the
    /// FUSE file (and then the loop device on it) shows the new size.
    public func expandOnNode(_ volume: VolumeRecord) async throws {
        guard let engine = engineRegistry.engine(volumeID: volume.id) else {
            throw CairnError.failedPrecondition("volume \(volume.id) has no engine running on node \(nodeID); stage it here before NodeExpandVolume")
        }
        try await offCooperativePool { try engine.grow(to: UInt64(volume.capacityBytes)) }
    }
}
