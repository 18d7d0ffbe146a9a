import CairnCore
import CairnNode

// What the services stand on while fuzzed: a store that holds nothing and takes nothing, a
// backing that does nothing, and a mounter that touches no kernel. Handlers run their real
// validation and then meet an empty world, so no input leaves state behind for the next one
// and nothing outside the process changes.

/// Holds no record; refuses every write (UNAVAILABLE).
struct VacantStore: MetadataStore {
    private func refuse() -> CairnError { CairnError(.unavailable, "fuzz: the vacant store takes no writes") }

    func registerNode(_ node: NodeRecord) async throws { throw refuse() }
    func node(id: String) async throws -> NodeRecord? { nil }
    func liveNodes() async throws -> [NodeRecord] { [] }
    func createVolume(_ volume: VolumeRecord) async throws { throw refuse() }
    func volume(id: String) async throws -> VolumeRecord? { nil }
    func volume(named name: String) async throws -> VolumeRecord? { nil }
    func listVolumes(afterID: String?, limit: Int) async throws -> [VolumeRecord] { [] }
    func deleteVolume(id: String, recordingReplicaDeletions replicaDeletions: [ReplicaDeletion]) async throws {}
    func provisionedBytes() async throws -> Int64 { 0 }
    func attachments(volumeID: String) async throws -> [AttachmentRecord] { [] }
    func attach(volumeID: String, nodeID: String, readonly: Bool, accessMode: Int,
                exclusive: Bool, nodeLimit: Int64, signer: (any ClaimSigner)?) async throws -> AttachmentRecord { throw refuse() }
    func detach(volumeID: String, nodeID: String) async throws {}
    func markReplicaOutOfSync(volumeID: String, nodeID: String, epoch: FencingEpoch, reason: String) async throws { throw refuse() }
    func updateVolume(id: String, what: String, _ change: @escaping @Sendable (inout VolumeRecord) throws -> Bool) async throws -> Bool {
        throw refuse()
    }
    func recordReplicaDeletions(_ deletions: [ReplicaDeletion]) async throws { throw refuse() }
    func replicaDeletions(nodeID: String?) async throws -> [ReplicaDeletion] { [] }
    func removeReplicaDeletion(nodeID: String, volumeID: String, token: String?) async throws {}
    func removeNode(id: String) async throws {}
    func removedNodes() async throws -> [String] { [] }
    func appendEvent(_ event: ClusterEvent) async throws { throw refuse() }
    func recentEvents(limit: Int) async throws -> [ClusterEvent] { [] }
    func createSnapshot(_ snapshot: SnapshotRecord) async throws { throw refuse() }
    func updateSnapshot(_ snapshot: SnapshotRecord) async throws { throw refuse() }
    func snapshot(id: String) async throws -> SnapshotRecord? { nil }
    func snapshot(named name: String) async throws -> SnapshotRecord? { nil }
    func listSnapshots(afterID: String?, limit: Int) async throws -> [SnapshotRecord] { [] }
    func deleteSnapshot(id: String) async throws {}
    func createGroupSnapshot(_ group: GroupSnapshotRecord) async throws { throw refuse() }
    func updateGroupSnapshot(_ group: GroupSnapshotRecord) async throws { throw refuse() }
    func groupSnapshot(id: String) async throws -> GroupSnapshotRecord? { nil }
    func groupSnapshot(named name: String) async throws -> GroupSnapshotRecord? { nil }
    func deleteGroupSnapshot(id: String) async throws {}
    func stage(volumeID: String, nodeID: String) async throws -> StageRecord? { nil }
    func stages(nodeID: String) async throws -> [StageRecord] { [] }
    func putStage(_ record: StageRecord) async throws { throw refuse() }
    func removeStage(volumeID: String, nodeID: String) async throws {}
    func publishes(volumeID: String) async throws -> [PublishRecord] { [] }
    func putPublish(_ record: PublishRecord) async throws { throw refuse() }
    func removePublish(_ record: PublishRecord) async throws {}
}

/// A volume backing that creates, copies and grows nothing.
struct VacantBacking: VolumeBacking, NodeBacking {
    func create(_ volume: VolumeRecord) async throws {}
    func delete(_ volume: VolumeRecord) async throws {}
    func problem(_ volume: VolumeRecord) -> String? { nil }
    func healthy(_ volume: VolumeRecord) -> String { "vacant" }
    func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]? { nil }
    func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?] { members.map { _ in nil } }
    func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) async throws {}
    func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) async throws {}
    func expand(_ volume: VolumeRecord) async throws {}

    func file(volumeID: String) async throws -> String { "/nonexistent/cairn-fuzz/\(volumeID).img" }
    func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) async throws -> String { try await file(volumeID: volume.id) }
    func deactivate(volumeID: String) async throws {}
    func condition(_ volume: VolumeRecord) async throws -> BackingCondition {
        BackingCondition(problem: nil, healthy: "vacant", stageBlocker: nil)
    }
    func expandOnNode(_ volume: VolumeRecord) async throws {}
}

/// A mounter that answers every call as if the machine had nothing on it, and changes nothing.
struct VacantMounter: Mounter {
    func attachLoop(file: String, readOnly: Bool) async throws -> String { "/dev/loop0" }
    func loopDevices(backing file: String) async throws -> [String] { [] }
    func detachLoop(device: String) async throws {}
    func probe(device: String) async throws -> DeviceContent { .empty }
    func makeFilesystem(device: String, fsType: String) async throws {}
    func checkFilesystem(device: String, fsType: String) async throws {}
    func mount(device: String, at target: String, fsType: String, options: [String]) async throws {}
    func blockDeviceSize(device: String) async throws -> Int64 { 0 }
    func expand(device: String, fsType: String, mountPath: String) async throws -> Int64 { 0 }
    func namespace(ofProcess pid: Int32) async throws -> MountNamespace {
        throw MountNamespaceGone(pid: pid, reason: "fuzz: no process runs here")
    }
    func inspect(_ path: String, in namespace: MountNamespace) async throws -> PathState {
        PathState(kind: .missing, resolved: path, isMountPoint: false)
    }
    func makeTarget(_ path: String, for access: AccessType, in namespace: MountNamespace) async throws -> Bool { true }
    func removeTarget(_ path: String, in namespace: MountNamespace) async throws -> Bool { false }
    func bindMount(source: String, at target: String, in namespace: MountNamespace, readOnly: Bool,
                   options: [String]) async throws {}
    func unmount(_ target: String, in namespace: MountNamespace) async throws {}
    func mountTable(in namespace: MountNamespace) async throws -> [MountInfo] { [] }
    func filesystemStats(path: String, in namespace: MountNamespace) async throws -> FilesystemStats {
        FilesystemStats(totalBytes: 0, availableBytes: 0, usedBytes: 0, totalInodes: 0, freeInodes: 0, usedInodes: 0)
    }
}

extension NodeService {
    /// A node service on the vacant store, backing and mounter.
    static func vacant(locks: VolumeLocks = VolumeLocks()) -> NodeService {
        NodeService(nodeID: RouterFuzz.nodeID, topology: ["topology.cairn.dev/node": RouterFuzz.nodeID], maxVolumesPerNode: 0,
                    store: VacantStore(), backing: VacantBacking(), mounter: VacantMounter(),
                    pathRoots: [RouterFuzz.pathRoot], locks: locks, logger: RouterFuzz.logger)
    }
}
