/// Cluster state. One protocol, two backends: embedded SQLite (one machine) and etcd v3
/// (clusters), with the same semantics.
///
/// Every mutating call is a single conditional transaction: it either applies completely or
/// throws without changing anything. Methods that can conflict throw CairnError with the
/// status the CSI caller should see (ALREADY_EXISTS, NOT_FOUND, FAILED_PRECONDITION).
public protocol MetadataStore: Sendable {
    // Nodes
    func registerNode(_ node: NodeRecord) async throws
    func node(id: String) async throws -> NodeRecord?
    /// Nodes that are alive, ordered by id: SQLite — every registered node; etcd — nodes whose
    /// registration lease is alive.
    func liveNodes() async throws -> [NodeRecord]

    // Volumes
    /// Inserts the volume; throws ALREADY_EXISTS when the name or id is taken.
    func createVolume(_ volume: VolumeRecord) async throws
    func volume(id: String) async throws -> VolumeRecord?
    func volume(named name: String) async throws -> VolumeRecord?
    /// Volumes ordered by id, strictly after `afterID`, at most `limit` (0 = no limit).
    func listVolumes(afterID: String?, limit: Int) async throws -> [VolumeRecord]
    /// Deletes the volume and every record that refers to it and, in the same transaction,
    /// records `replicaDeletions` (its replicas, which their nodes delete when the controller
    /// could not: nothing is lost if the controller dies between the two). No error if absent.
    func deleteVolume(id: String, recordingReplicaDeletions replicaDeletions: [ReplicaDeletion]) async throws
    func provisionedBytes() async throws -> Int64

    // Attachments (ControllerPublish)
    func attachments(volumeID: String) async throws -> [AttachmentRecord]
    /// Raises the volume's epoch and records the attachment with it, in one transaction.
    /// With `exclusive`, throws FAILED_PRECONDITION if another node holds an attachment; with
    /// `nodeLimit` > 0, RESOURCE_EXHAUSTED if the node already has that many volumes attached.
    /// Returns the stored attachment. `signer` signs the new epoch's grant inside the
    /// transaction, so the attachment is never stored without it.
    func attach(volumeID: String, nodeID: String, readonly: Bool, accessMode: Int,
                exclusive: Bool, nodeLimit: Int64, signer: (any ClaimSigner)?) async throws -> AttachmentRecord
    func detach(volumeID: String, nodeID: String) async throws

    // Replicas
    /// Removes a replica from the volume's in-sync set, in one transaction conditional on the
    /// volume's epoch still being `epoch` (FAILED_PRECONDITION "fenced: the volume's epoch is
    /// now N" otherwise; NOT_FOUND when the volume or that replica does not exist). Idempotent:
    /// already out of sync → no change, no error.
    func markReplicaOutOfSync(volumeID: String, nodeID: String, epoch: FencingEpoch, reason: String) async throws
    /// Runs `change` on the volume's record in one transaction and writes the record back when
    /// it returns true (false: nothing changes); returns that answer. NOT_FOUND without the
    /// volume. The building block of the replica operations below.
    func updateVolume(id: String, what: String, _ change: @escaping @Sendable (inout VolumeRecord) throws -> Bool) async throws -> Bool

    // Replica deletions (orphaned replicas, docs/recovery.md)
    /// Records pending deletions, replacing any recorded for the same node and volume.
    func recordReplicaDeletions(_ deletions: [ReplicaDeletion]) async throws
    /// The pending deletions of the node's replicas (nil: of every node), ordered by node, then volume.
    func replicaDeletions(nodeID: String?) async throws -> [ReplicaDeletion]
    /// Removes the pending deletion of the node's replica of the volume; with `token`, only if
    /// the recorded one still carries it (a newer recording stays). No error if absent.
    func removeReplicaDeletion(nodeID: String, volumeID: String, token: String?) async throws

    // Node removal
    /// Records that the node is gone for good (`cairn node remove`): its replicas are re-created
    /// elsewhere, and it may not register again. Idempotent.
    func removeNode(id: String) async throws
    /// The removed nodes' ids, sorted.
    func removedNodes() async throws -> [String]

    // Events (the status page's recent events, `ClusterEvent`)
    /// Appends the event and drops the oldest beyond `ClusterEvent.retained`.
    func appendEvent(_ event: ClusterEvent) async throws
    /// The newest events, oldest first, at most `limit`.
    func recentEvents(limit: Int) async throws -> [ClusterEvent]

    // Snapshots
    /// Inserts the snapshot; ALREADY_EXISTS when its name or id is taken.
    func createSnapshot(_ snapshot: SnapshotRecord) async throws
    /// Replaces an existing snapshot's record (NOT_FOUND when absent).
    func updateSnapshot(_ snapshot: SnapshotRecord) async throws
    func snapshot(id: String) async throws -> SnapshotRecord?
    func snapshot(named name: String) async throws -> SnapshotRecord?
    /// Snapshots ordered by id, strictly after `afterID`, at most `limit` (0 = no limit),
    /// hidden ones included.
    func listSnapshots(afterID: String?, limit: Int) async throws -> [SnapshotRecord]
    /// No error if absent.
    func deleteSnapshot(id: String) async throws

    // Group snapshots
    /// Inserts the group; ALREADY_EXISTS when its name or id is taken.
    func createGroupSnapshot(_ group: GroupSnapshotRecord) async throws
    func updateGroupSnapshot(_ group: GroupSnapshotRecord) async throws
    func groupSnapshot(id: String) async throws -> GroupSnapshotRecord?
    func groupSnapshot(named name: String) async throws -> GroupSnapshotRecord?
    /// No error if absent.
    func deleteGroupSnapshot(id: String) async throws

    // Node-side records
    func stage(volumeID: String, nodeID: String) async throws -> StageRecord?
    func stages(nodeID: String) async throws -> [StageRecord]
    func putStage(_ record: StageRecord) async throws
    func removeStage(volumeID: String, nodeID: String) async throws
    func publishes(volumeID: String) async throws -> [PublishRecord]
    func putPublish(_ record: PublishRecord) async throws
    /// Removes the record of one target (keyed by volume, node, namespace and target path).
    func removePublish(_ record: PublishRecord) async throws
}

extension MetadataStore {
    /// `attach` without a grant (one machine, or data security off).
    public func attach(volumeID: String, nodeID: String, readonly: Bool, accessMode: Int,
                       exclusive: Bool, nodeLimit: Int64) async throws -> AttachmentRecord {
        try await attach(volumeID: volumeID, nodeID: nodeID, readonly: readonly, accessMode: accessMode,
                         exclusive: exclusive, nodeLimit: nodeLimit, signer: nil)
    }

    /// Deletes the volume and every record that refers to it. No error if absent.
    public func deleteVolume(id: String) async throws {
        try await deleteVolume(id: id, recordingReplicaDeletions: [])
    }

    /// The replica is in sync again: one transaction, conditional on the volume's epoch (the
    /// resyncing engine's) — FAILED_PRECONDITION "fenced: …" otherwise. Idempotent.
    public func markReplicaInSync(volumeID: String, nodeID: String, epoch: FencingEpoch) async throws {
        _ = try await updateVolume(id: volumeID, what: "mark replica \(nodeID) of volume \(volumeID) in sync") { volume in
            try volume.markReplicaInSync(nodeID: nodeID, epoch: epoch)
        }
    }

    /// Records (or clears, with nil) an out-of-sync replica's resync progress, under the same
    /// epoch condition.
    public func recordResyncProgress(volumeID: String, nodeID: String, epoch: FencingEpoch, progress: ResyncProgress?) async throws {
        _ = try await updateVolume(id: volumeID, what: "record resync progress of replica \(nodeID) of volume \(volumeID)") { volume in
            try volume.recordResyncProgress(nodeID: nodeID, epoch: epoch, progress: progress)
        }
    }

    /// Replaces an out-of-sync replica with a new one on another node (re-replication).
    public func replaceReplica(volumeID: String, oldNodeID: String, with replacement: ReplicaRecord) async throws {
        _ = try await updateVolume(id: volumeID, what: "replace replica \(oldNodeID) of volume \(volumeID)") { volume in
            try volume.replaceReplica(oldNodeID: oldNodeID, with: replacement)
            return true
        }
    }
}
