import Foundation

/// Where a volume's bytes live, and how a node gets at them.
///
/// Two implementations: `LocalFileBacking` (module CairnLocal, one machine: a sparse file per
/// volume, attached as a loop device directly) and `ReplicatedBacking` (cluster mode, module
/// CairnCluster: replicas on several nodes; the node that stages the volume runs an engine that
/// exposes it through FUSE as one file). This is the controller's side; the node's is `NodeBacking` (both implement it),
/// so the controller and node services do not care which one they have.
public protocol VolumeBacking: Sendable {
    /// Creates the storage for `volume` (idempotent: an existing backing of the right size is kept).
    func create(_ volume: VolumeRecord) async throws
    /// Removes the storage. No error when it is already gone.
    func delete(_ volume: VolumeRecord) async throws
    /// Health as CSI's VolumeCondition wants it: nil when healthy, else what is wrong.
    func problem(_ volume: VolumeRecord) -> String?
    /// A one-line description of the healthy state (e.g. which replicas are in sync).
    func healthy(_ volume: VolumeRecord) -> String
    /// Why the volume cannot be staged now, or nil. A degraded replicated volume can be: its
    /// condition is abnormal, yet it serves I/O from the replicas still in sync.
    func stageBlocker(_ volume: VolumeRecord) -> String?
    /// Re-replication: one new, empty replica on the node `replica` names (idempotent).
    func createReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws
    /// Re-replication: removes a replaced replica from its node (best effort).
    func deleteReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws

    // Snapshots, clones, growth (docs/snapshots.md)

    /// Takes `snapshot` of `volume`, crash-consistent (at a write barrier when the volume is in
    /// use). Idempotent by snapshot id. Returns the nodes holding it
    /// (replicated) or nil (one machine).
    func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]?
    /// Takes every member's snapshot at one write barrier across all their volumes (a group
    /// snapshot). Same order as `members`; each entry as `takeSnapshot` returns it.
    func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?]
    /// Removes the snapshot's data. No error when it is already gone; `source` is nil when the
    /// source volume was deleted.
    func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) async throws
    /// Instead of `create`: makes the storage of the new `volume` hold `snapshot`'s content
    /// (then zeros up to the volume's size). Idempotent.
    func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) async throws
    /// ControllerExpandVolume: grows the volume's storage to `volume.capacityBytes` (the record
    /// already says the new size). Idempotent.
    func expand(_ volume: VolumeRecord) async throws
}

extension VolumeBacking {
    public func stageBlocker(_ volume: VolumeRecord) -> String? { problem(volume) }

    /// Re-replication: creates one new, empty replica of `volume` on the node `replica` names.
    public func createReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
        throw CairnError.failedPrecondition("volume \(volume.id) is not replicated (one-machine store); there is no replica to re-create")
    }

    /// Re-replication: deletes a replaced replica (best effort: its node may be gone).
    public func deleteReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
        throw CairnError.failedPrecondition("volume \(volume.id) is not replicated (one-machine store)")
    }
}

/// Where a volume is in use when the controller acts on its data.
public struct VolumeUse: Sendable {
    /// The node it is published to (ControllerPublish), if any.
    public var attachedNode: String?
    /// One machine: its stage on this machine, if staged.
    public var localStage: StageRecord?

    public init(attachedNode: String? = nil, localStage: StageRecord? = nil) {
        self.attachedNode = attachedNode
        self.localStage = localStage
    }
}

/// One volume of a group snapshot.
public struct GroupSnapshotMember: Sendable {
    public var snapshot: SnapshotRecord
    public var volume: VolumeRecord
    public var use: VolumeUse

    public init(snapshot: SnapshotRecord, volume: VolumeRecord, use: VolumeUse) {
        self.snapshot = snapshot
        self.volume = volume
        self.use = use
    }
}
