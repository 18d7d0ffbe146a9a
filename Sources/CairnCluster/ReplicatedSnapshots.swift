import CairnCore

// Snapshots, clones and growth of replicated volumes: VolumeBacking's side of them, on top of
// the replica format's copy-on-write layers (docs/snapshots.md).
extension ReplicatedBacking {
    public func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]? {
        throw CairnError(.unimplemented, "snapshots of replicated volumes are not built yet")
    }

    public func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?] {
        throw CairnError(.unimplemented, "group snapshots of replicated volumes are not built yet")
    }

    public func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) async throws {
        throw CairnError(.unimplemented, "snapshots of replicated volumes are not built yet")
    }

    public func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) async throws {
        throw CairnError(.unimplemented, "clones of replicated volumes are not built yet")
    }

    public func expand(_ volume: VolumeRecord) async throws {
        throw CairnError(.unimplemented, "growth of replicated volumes is not built yet")
    }
}
