/// The node side of a volume's backing: what NodeService needs to turn an attached volume into
/// a file it can attach as a loop device on this machine.
///
/// Three implementations: `LocalFileBacking` (module CairnLocal, one machine: the volume's
/// sparse file), `ReplicatedBacking` (cluster mode: the engine, in the process that runs it) and
/// `AgentBacking` (module CairnAgent: the node role of a split node, which runs no engine and
/// asks the agent over its socket — so the CSI node process can die and restart at any moment
/// without touching a volume's I/O). The controller side (create, delete, snapshots, replicas,
/// growth) stays on `VolumeBacking`.
///
/// Every method may cross a process boundary, hence async and throwing; every one is idempotent.
public protocol NodeBacking: Sendable {
    /// The file a node attaches as a loop device (for a replicated volume it exists only while
    /// the volume is active on this node).
    func file(volumeID: String) async throws -> String
    /// Makes `file(volumeID:)` usable on this node for a writer holding `epoch` (replicated:
    /// starts the engine, which claims the replicas with the epoch and so fences older holders).
    /// Returns the file. `grant` is the controller's signature of that epoch for this node
    /// (the attachment's), which every replica's claim carries; a backing that reads the
    /// attachment itself (the agent's) ignores it. `key` is an encrypted volume's data key,
    /// unwrapped by NodeStage (docs/encryption.md): the engine encrypts with it; an encrypted
    /// volume without it is refused unless its engine already runs here.
    func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) async throws -> String
    /// Undoes `activate` once no loop device uses the file any more.
    func deactivate(volumeID: String) async throws
    /// The volume's health on this node, as CSI's VolumeCondition and NodeStage want it.
    func condition(_ volume: VolumeRecord) async throws -> BackingCondition
    /// NodeExpandVolume, before the device and filesystem grow: makes `file(volumeID:)` on this
    /// node show the new size (replicated: the running engine grows).
    func expandOnNode(_ volume: VolumeRecord) async throws
}

/// A volume's condition as the node reports it.
public struct BackingCondition: Sendable, Equatable {
    /// Nil when healthy, else what is wrong.
    public var problem: String?
    /// A one-line description of the healthy state (e.g. which replicas are in sync).
    public var healthy: String
    /// Why the volume cannot be staged now, or nil. A degraded replicated volume can be: its
    /// condition is abnormal, yet it serves I/O from the replicas still in sync.
    public var stageBlocker: String?

    public init(problem: String?, healthy: String, stageBlocker: String?) {
        self.problem = problem
        self.healthy = healthy
        self.stageBlocker = stageBlocker
    }
}

extension NodeBacking where Self: VolumeBacking {
    /// A backing that serves both sides in one process reports the controller's view.
    public func condition(_ volume: VolumeRecord) -> BackingCondition {
        BackingCondition(problem: problem(volume), healthy: healthy(volume), stageBlocker: stageBlocker(volume))
    }
}

extension NodeBacking {
    /// `activate` without a grant (one machine, tests, data security off).
    public func activate(_ volume: VolumeRecord, epoch: FencingEpoch, key: VolumeDataKey? = nil) async throws -> String {
        try await activate(volume, epoch: epoch, grant: nil, key: key)
    }

    /// `activate` of the attachment `attachment` (its epoch and grant).
    public func activate(_ volume: VolumeRecord, attachment: AttachmentRecord, key: VolumeDataKey? = nil) async throws -> String {
        try await activate(volume, epoch: attachment.epoch, grant: attachment.grant, key: key)
    }
}
