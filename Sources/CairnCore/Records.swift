import Foundation

/// The mount namespace a target path lives in: the host's (the agent's), or a running
/// process's — a container's — named by PID. `startTime` (field 22 of /proc/PID/stat) is
/// recorded with the PID so that a reused PID is never mistaken for the original process.
public enum MountNamespace: Codable, Sendable, Equatable, Hashable, CustomStringConvertible {
    case host
    case process(pid: Int32, startTime: UInt64)

    public var description: String {
        switch self {
        case .host: "host"
        case .process(let pid, _): "process \(pid)"
        }
    }

    /// A stable key for stores: "host" or "pid:<pid>:<start time>".
    public var key: String {
        switch self {
        case .host: "host"
        case .process(let pid, let start): "pid:\(pid):\(start)"
        }
    }
}

/// How a volume is consumed: a filesystem (mount) or a raw block device (block).
public enum AccessType: String, Codable, Sendable {
    case mount, block
}

/// A volume as the controller knows it. `epoch` is the fencing epoch: raised on every
/// ControllerPublish so that only the newest attachment can write (design invariant 2).
public struct VolumeRecord: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var capacityBytes: Int64
    public var parameters: [String: String]
    /// The filesystem the volume is formatted with on first stage ("" for block-only use).
    public var fsType: String
    /// CSI access modes (raw enum values) the volume was created for.
    public var accessModes: [Int]
    public var accessibleTopology: [String: String]
    public var epoch: FencingEpoch
    public var createdAt: Date
    /// The nodes holding a replica of the volume, and which of them are in sync; nil for a
    /// one-machine volume backed by a local file (and in records written before replication).
    public var replicas: [ReplicaRecord]?
    /// What the volume was created from (CreateVolume's volume_content_source); nil: empty.
    public var contentSource: ContentSource?
    /// ControllerModifyVolume's parameters (`iopsLimit`, `bandwidthLimit`): kept apart from
    /// `parameters`, which CreateVolume compares for idempotency and which never change.
    public var mutableParameters: [String: String]?
    /// The node whose controller created the volume, when that controller runs with
    /// `--list-scope node` (one controller per node, as Mesos's per-agent SLRP has it); nil otherwise.
    public var createdByNode: String?
    /// Set while a volume made from a content source is being filled (the record comes first,
    /// so that a CreateVolume cut off in the middle is finished by its repeat, and a
    /// DeleteVolume finds what it left); nil once the volume holds its content.
    public var contentPending: Bool?
    /// An encrypted volume's wrapped data key (docs/encryption.md); nil for a plain volume, and
    /// for an encrypted one until its first NodeStageVolume (or a CreateVolume with the secret).
    public var encryption: VolumeEncryption?
    /// While a cluster volume is being restored from a backup: the packs already written to every
    /// replica (a bitmap over the manifest's pack list, base64), so a CreateVolume repeated after
    /// the controller was cut off fetches only the rest (docs/backups.md); nil otherwise.
    public var restoredPacks: String?

    public init(id: String, name: String, capacityBytes: Int64, parameters: [String: String],
                fsType: String, accessModes: [Int], accessibleTopology: [String: String],
                epoch: FencingEpoch = 0, createdAt: Date = Date(), replicas: [ReplicaRecord]? = nil,
                contentSource: ContentSource? = nil, mutableParameters: [String: String]? = nil) {
        self.replicas = replicas
        self.contentSource = contentSource
        self.mutableParameters = mutableParameters
        self.id = id
        self.name = name
        self.capacityBytes = capacityBytes
        self.parameters = parameters
        self.fsType = fsType
        self.accessModes = accessModes
        self.accessibleTopology = accessibleTopology
        self.epoch = epoch
        self.createdAt = createdAt
    }
}

/// Where a volume's initial content came from.
public enum ContentSource: Codable, Sendable, Equatable, CustomStringConvertible {
    case snapshot(id: String)
    case volume(id: String)

    public var description: String {
        switch self {
        case .snapshot(let id): "snapshot \(id)"
        case .volume(let id): "volume \(id)"
        }
    }

    /// A backup named as a snapshot (`backup:<target>/<id>`): restored, not cloned.
    public var isBackup: Bool {
        if case .snapshot(let id) = self { return id.hasPrefix(BackupReference.scheme) }
        return false
    }
}

/// A point-in-time, crash-consistent copy of a volume (CreateSnapshot).
///
/// Created `readyToUse == false` before any data is taken and set ready once every holder has
/// it, so a CreateSnapshot repeated after a crash finds the record and finishes the same
/// snapshot (the backing's snapshot step is idempotent by id) instead of leaking a second one.
public struct SnapshotRecord: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var sourceVolumeID: String
    /// The source volume's size when the snapshot was taken: the smallest volume it restores to.
    public var sizeBytes: Int64
    public var createdAt: Date
    public var readyToUse: Bool
    /// Replicated volumes: the nodes whose replica holds the snapshot (the in-sync replicas at
    /// the barrier). nil on one machine.
    public var holders: [String]?
    /// The group snapshot it belongs to, if any (GroupController).
    public var groupID: String?
    /// Taken by Cairn itself as the base of a clone of a volume (CreateVolume from a volume):
    /// never listed, deleted with the clone.
    public var hidden: Bool?
    /// The source volume's filesystem ("" for raw block): a volume restored from the snapshot
    /// has it already.
    public var fsType: String?
    /// The source volume's wrapped data key when it is encrypted: a volume restored from the
    /// snapshot takes it (its blocks are the source's ciphertext), even after the source is gone.
    public var encryption: VolumeEncryption?

    public init(id: String, name: String, sourceVolumeID: String, sizeBytes: Int64, createdAt: Date = Date(),
                readyToUse: Bool = false, holders: [String]? = nil, groupID: String? = nil, hidden: Bool? = nil,
                fsType: String? = nil) {
        self.fsType = fsType
        self.id = id
        self.name = name
        self.sourceVolumeID = sourceVolumeID
        self.sizeBytes = sizeBytes
        self.createdAt = createdAt
        self.readyToUse = readyToUse
        self.holders = holders
        self.groupID = groupID
        self.hidden = hidden
    }

    public var isHidden: Bool { hidden == true }

    /// The name of the hidden snapshot a clone of a volume is made from (CreateVolume with a
    /// volume as its source): taken at a barrier, deleted with the clone.
    public static func cloneBaseName(of cloneID: String) -> String { "clone-base-\(cloneID)" }
}

/// A crash-consistent snapshot of several volumes taken at one barrier (GroupController).
public struct GroupSnapshotRecord: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    /// The member snapshots' ids, in the order of the request's source volumes.
    public var snapshotIDs: [String]
    public var sourceVolumeIDs: [String]
    public var createdAt: Date
    public var readyToUse: Bool

    public init(id: String, name: String, snapshotIDs: [String], sourceVolumeIDs: [String],
                createdAt: Date = Date(), readyToUse: Bool = false) {
        self.id = id
        self.name = name
        self.snapshotIDs = snapshotIDs
        self.sourceVolumeIDs = sourceVolumeIDs
        self.createdAt = createdAt
        self.readyToUse = readyToUse
    }
}

/// One replica of a replicated volume. Writes are acknowledged only once every in-sync replica
/// has them; a replica leaves the in-sync set in the store (`markReplicaOutOfSync`) before any
/// write it missed is acknowledged (design invariant 1), and failover uses only in-sync ones.
public struct ReplicaRecord: Codable, Sendable, Equatable {
    public var nodeID: String
    /// "host:port" of the node's replica server (the data protocol).
    public var address: String
    public var inSync: Bool
    public var outOfSyncSince: Date?
    /// Why it left the in-sync set.
    public var reason: String?
    /// The resync bringing it back, as the attached node's engine last reported it.
    public var resync: ResyncProgress?

    public init(nodeID: String, address: String, inSync: Bool = true, outOfSyncSince: Date? = nil,
                reason: String? = nil, resync: ResyncProgress? = nil) {
        self.nodeID = nodeID
        self.address = address
        self.inSync = inSync
        self.outOfSyncSince = outOfSyncSince
        self.reason = reason
        self.resync = resync
    }
}

/// A replica that must go but whose node could not be asked (it was away): DeleteVolume and
/// re-replication record it, and the node deletes the replica itself when it runs again
/// (`ReplicaSweeper`), then removes the record. Keyed by node and volume.
public struct ReplicaDeletion: Codable, Sendable, Equatable {
    public var nodeID: String
    public var volumeID: String
    /// Why the replica goes ("volume deleted", "replaced by a new replica on n4").
    public var reason: String
    public var recordedAt: Date
    /// New at each recording, so a removal can be made conditional on the one that was read.
    public var token: String

    public init(nodeID: String, volumeID: String, reason: String, recordedAt: Date = Date(),
                token: String = UUID().uuidString.lowercased()) {
        self.nodeID = nodeID
        self.volumeID = volumeID
        self.reason = reason
        self.recordedAt = recordedAt
        self.token = token
    }
}

/// A resync's progress as recorded for operators (`cairn volume inspect`, volume conditions).
public struct ResyncProgress: Codable, Sendable, Equatable {
    public var bytesTotal: Int64
    public var bytesDone: Int64
    public var bytesPerSecond: Int64
    public var startedAt: Date
    public var updatedAt: Date
    /// diff, copy, joining, or "waiting: <why the last attempt failed>".
    public var phase: String

    public init(bytesTotal: Int64, bytesDone: Int64, bytesPerSecond: Int64, startedAt: Date, updatedAt: Date, phase: String) {
        self.bytesTotal = bytesTotal
        self.bytesDone = bytesDone
        self.bytesPerSecond = bytesPerSecond
        self.startedAt = startedAt
        self.updatedAt = updatedAt
        self.phase = phase
    }

    public var percent: Double { bytesTotal <= 0 ? 0 : min(100, Double(bytesDone) * 100 / Double(bytesTotal)) }
    public var etaSeconds: Double? {
        guard bytesPerSecond > 0, bytesTotal >= bytesDone else { return nil }
        return Double(bytesTotal - bytesDone) / Double(bytesPerSecond)
    }

    /// "copy 40% (412 MiB of 1.0 GiB), 48 MB/s, ETA 13 s".
    public var summary: String {
        var text = "\(phase) \(String(format: "%.0f", percent))% (\(Self.bytes(bytesDone)) of \(Self.bytes(bytesTotal)))"
        if bytesPerSecond > 0 { text += ", \(String(format: "%.0f", Double(bytesPerSecond) / 1e6)) MB/s" }
        if let eta = etaSeconds { text += ", ETA \(String(format: "%.0f", eta)) s" }
        return text
    }

    /// "1.5 GiB".
    public static func bytes(_ n: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n) B" : String(format: "%.1f %@", value, units[unit])
    }
}

extension VolumeRecord {
    /// The `minInSync` parameter (CreateVolume validated it): writes are refused while fewer
    /// replicas are in sync. 1 when the volume was created without it.
    public var minInSync: Int { parameters["minInSync"].flatMap { Int($0) } ?? 1 }

    /// The CreateVolume parameter choosing write-through (docs/engine.md, "Write-through volumes").
    public static let writeThroughParameter = "writeThrough"

    /// Every write durable when answered, and the loop device in write-through mode (the
    /// default); `writeThrough: "false"` makes writes durable at the application's flushes.
    public var writeThrough: Bool { parameters[Self.writeThroughParameter] != "false" }

    /// `markReplicaOutOfSync`'s rule, shared by every store: fenced unless the volume's epoch is
    /// still `epoch`; NOT_FOUND without that replica. Returns false (and changes nothing) when
    /// the replica is already out of sync.
    public mutating func markReplicaOutOfSync(nodeID: String, epoch: FencingEpoch, reason: String,
                                              at now: Date = Date()) throws -> Bool {
        let index = try replicaIndex(nodeID: nodeID, epoch: epoch)
        guard replicas![index].inSync else { return false }
        replicas![index].inSync = false
        replicas![index].outOfSyncSince = now
        replicas![index].reason = reason
        return true
    }

    /// `markReplicaInSync`'s rule: the epoch and replica checks of `markReplicaOutOfSync`;
    /// clears the out-of-sync fields and the progress. False (no change) when already in sync.
    public mutating func markReplicaInSync(nodeID: String, epoch: FencingEpoch) throws -> Bool {
        let index = try replicaIndex(nodeID: nodeID, epoch: epoch)
        guard !replicas![index].inSync else { return false }
        replicas![index].inSync = true
        replicas![index].outOfSyncSince = nil
        replicas![index].reason = nil
        replicas![index].resync = nil
        return true
    }

    /// `recordResyncProgress`'s rule: only for an out-of-sync replica (false otherwise), under
    /// the same epoch check.
    public mutating func recordResyncProgress(nodeID: String, epoch: FencingEpoch, progress: ResyncProgress?) throws -> Bool {
        let index = try replicaIndex(nodeID: nodeID, epoch: epoch)
        guard !replicas![index].inSync, replicas![index].resync != progress else { return false }
        replicas![index].resync = progress
        return true
    }

    /// `replaceReplica`'s rule: only an out-of-sync replica is replaced, by one on a node that
    /// holds no replica of the volume; the new one starts out of sync (its resync copies all).
    public mutating func replaceReplica(oldNodeID: String, with replacement: ReplicaRecord, at now: Date = Date()) throws {
        guard let index = replicas?.firstIndex(where: { $0.nodeID == oldNodeID }) else {
            throw CairnError.notFound("volume \(id) has no replica on node \(oldNodeID)")
        }
        guard !replicas![index].inSync else {
            throw CairnError.failedPrecondition("volume \(id)'s replica on node \(oldNodeID) is in sync; only an out-of-sync replica is replaced")
        }
        guard !replicas!.contains(where: { $0.nodeID == replacement.nodeID }) else {
            throw CairnError.failedPrecondition("volume \(id) already has a replica on node \(replacement.nodeID)")
        }
        var new = replacement
        new.inSync = false
        new.outOfSyncSince = now
        new.reason = "new replica replacing \(oldNodeID)'s: full copy pending"
        new.resync = nil
        replicas![index] = new
    }

    private func replicaIndex(nodeID: String, epoch: FencingEpoch) throws -> Int {
        guard self.epoch == epoch else {
            throw CairnError.failedPrecondition(
                "fenced: the volume's epoch is now \(self.epoch) (the caller holds epoch \(epoch)); a newer attachment owns volume \(id)")
        }
        guard let index = replicas?.firstIndex(where: { $0.nodeID == nodeID }) else {
            throw CairnError.notFound("volume \(id) has no replica on node \(nodeID)")
        }
        return index
    }
}

/// ControllerPublish's record: the volume may be used by `nodeID`.
public struct AttachmentRecord: Codable, Sendable, Equatable {
    public var volumeID: String
    public var nodeID: String
    public var readonly: Bool
    /// CSI access mode (raw) of the capability it was published with.
    public var accessMode: Int
    public var epoch: FencingEpoch
    public var createdAt: Date
    /// The controller's signature of this attachment (nil without data security, or from a
    /// release before signed claims).
    public var grant: ClaimGrant?

    public init(volumeID: String, nodeID: String, readonly: Bool, accessMode: Int, epoch: FencingEpoch,
                createdAt: Date = Date(), grant: ClaimGrant? = nil) {
        self.grant = grant
        self.volumeID = volumeID
        self.nodeID = nodeID
        self.readonly = readonly
        self.accessMode = accessMode
        self.epoch = epoch
        self.createdAt = createdAt
    }
}

/// A node that can attach volumes.
public struct NodeRecord: Codable, Sendable, Equatable {
    public var id: String
    public var topology: [String: String]
    public var maxVolumes: Int64
    public var registeredAt: Date
    /// "host:port" of the node's replica server (data protocol); nil for a node that serves none.
    public var dataAddress: String?
    /// Bytes the node offers for replicas; nil when not reported.
    public var capacityBytes: Int64?
    /// What a restart of the node's engine-running process costs its staged volumes, as that
    /// process found at start-up (FUSE keeper, kernel resend support); nil when it runs none.
    public var engineRestarts: String?
    /// "host:port" of the node's ReplicaControl gRPC service (beside the replica server); nil
    /// in a record of a node of an earlier release, whose replicas are then controlled through
    /// the data protocol's ops.
    public var controlAddress: String?

    public init(id: String, topology: [String: String], maxVolumes: Int64, registeredAt: Date = Date(),
                dataAddress: String? = nil, capacityBytes: Int64? = nil, controlAddress: String? = nil) {
        self.dataAddress = dataAddress
        self.controlAddress = controlAddress
        self.capacityBytes = capacityBytes
        self.id = id
        self.topology = topology
        self.maxVolumes = maxVolumes
        self.registeredAt = registeredAt
    }
}

/// NodeStageVolume's record: the volume's device on this node and where it is staged.
public struct StageRecord: Codable, Sendable, Equatable {
    public var volumeID: String
    public var nodeID: String
    public var stagingPath: String
    public var accessType: AccessType
    /// The block device (loop device) last attached for the volume.
    public var devicePath: String
    public var fsType: String
    public var mountFlags: [String]
    public var accessMode: Int
    /// Whether the stage itself is read-only (loop device attached read-only, filesystem mounted
    /// `ro`); nil in records written before this was recorded.
    public var readOnly: Bool?
    public var createdAt: Date

    public init(volumeID: String, nodeID: String, stagingPath: String, accessType: AccessType,
                devicePath: String, fsType: String, mountFlags: [String], accessMode: Int,
                createdAt: Date = Date()) {
        self.volumeID = volumeID
        self.nodeID = nodeID
        self.stagingPath = stagingPath
        self.accessType = accessType
        self.devicePath = devicePath
        self.fsType = fsType
        self.mountFlags = mountFlags
        self.accessMode = accessMode
        self.createdAt = createdAt
    }
}

/// NodePublishVolume's record: one target path the volume is bound to.
public struct PublishRecord: Codable, Sendable, Equatable {
    public var volumeID: String
    public var nodeID: String
    public var targetPath: String
    public var stagingPath: String
    public var accessType: AccessType
    public var readonly: Bool
    public var accessMode: Int
    public var mountFlags: [String]
    /// Where `targetPath` is (absent in records written before namespaces: the host).
    public var targetNamespace: MountNamespace?
    public var createdAt: Date

    public var namespace: MountNamespace { targetNamespace ?? .host }

    public init(volumeID: String, nodeID: String, targetPath: String, stagingPath: String,
                accessType: AccessType, readonly: Bool, accessMode: Int, mountFlags: [String],
                targetNamespace: MountNamespace = .host, createdAt: Date = Date()) {
        self.volumeID = volumeID
        self.nodeID = nodeID
        self.targetPath = targetPath
        self.stagingPath = stagingPath
        self.accessType = accessType
        self.readonly = readonly
        self.accessMode = accessMode
        self.mountFlags = mountFlags
        self.targetNamespace = targetNamespace == .host ? nil : targetNamespace
        self.createdAt = createdAt
    }
}
