import CairnCore
import Foundation

// What `cairn … list|inspect --output json` prints: stable field names (camelCase), bytes as
// integers, times as ISO 8601, one JSON document per command. Built from the store's records
// only, so any machine that can read the store shows the same.

/// CSI access modes by their raw enum value (csi.proto VolumeCapability.AccessMode.Mode).
public enum AccessModeName {
    public static func of(_ raw: Int) -> String {
        switch raw {
        case 1: "single-node-writer"
        case 2: "single-node-reader-only"
        case 3: "multi-node-reader-only"
        case 4: "multi-node-single-writer"
        case 5: "multi-node-multi-writer"
        case 6: "single-node-single-writer"
        case 7: "single-node-multi-writer"
        default: "unknown(\(raw))"
        }
    }
}

public struct ResyncView: Codable, Sendable, Equatable {
    public var phase: String
    public var bytesDone: Int64
    public var bytesTotal: Int64
    public var percent: Double
    /// As the engine last recorded it.
    public var bytesPerSecond: Int64
    public var etaSeconds: Double?
    public var startedAt: Date
    public var updatedAt: Date

    public init(_ p: ResyncProgress) {
        phase = p.phase
        bytesDone = p.bytesDone
        bytesTotal = p.bytesTotal
        percent = p.percent
        bytesPerSecond = p.bytesPerSecond
        etaSeconds = p.etaSeconds
        startedAt = p.startedAt
        updatedAt = p.updatedAt
    }

    /// "copy 40.0% 412.0 MiB/1.0 GiB 48.0 MiB/s ETA 13s".
    public var summary: String {
        var text = "\(phase) \(Units.percent(percent)) \(Units.bytes(bytesDone))/\(Units.bytes(bytesTotal))"
        if bytesPerSecond > 0 { text += " \(Units.rate(Double(bytesPerSecond)))" }
        if let etaSeconds { text += " ETA \(Units.duration(etaSeconds))" }
        return text
    }
}

public struct ReplicaView: Codable, Sendable, Equatable {
    public var volumeID: String
    public var nodeID: String
    public var address: String
    public var inSync: Bool
    public var outOfSyncSince: Date?
    public var reason: String?
    public var resync: ResyncView?

    public init(volumeID: String, _ r: ReplicaRecord) {
        self.volumeID = volumeID
        nodeID = r.nodeID
        address = r.address
        inSync = r.inSync
        outOfSyncSince = r.outOfSyncSince
        reason = r.reason
        resync = r.resync.map(ResyncView.init)
    }

    /// "in sync", "out of sync 2m05s", "copy 40.0% … ETA 13s".
    public func state(now: Date = Date()) -> String {
        if inSync { return "in sync" }
        if let resync { return resync.summary }
        return "out of sync" + (outOfSyncSince.map { " " + Units.age(of: $0, now: now) } ?? "")
    }
}

public struct AttachmentView: Codable, Sendable, Equatable {
    public var nodeID: String
    public var epoch: UInt64
    public var readOnly: Bool
    public var accessMode: String
    public var createdAt: Date

    public init(_ a: AttachmentRecord) {
        nodeID = a.nodeID
        epoch = a.epoch.rawValue
        readOnly = a.readonly
        accessMode = AccessModeName.of(a.accessMode)
        createdAt = a.createdAt
    }
}

public struct SnapshotView: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var sourceVolumeID: String
    public var sizeBytes: Int64
    public var readyToUse: Bool
    public var createdAt: Date
    /// The nodes whose replica holds it; nil on one machine.
    public var holders: [String]?
    public var groupID: String?

    public init(_ s: SnapshotRecord) {
        id = s.id
        name = s.name
        sourceVolumeID = s.sourceVolumeID
        sizeBytes = s.sizeBytes
        readyToUse = s.readyToUse
        createdAt = s.createdAt
        holders = s.holders
        groupID = s.groupID
    }
}

public struct ConditionView: Codable, Sendable, Equatable {
    public var state: VolumeHealth.State
    public var replicasInSync: Int
    public var replicas: Int
    public var message: String

    public init(_ health: VolumeHealth) {
        state = health.state
        replicasInSync = health.inSync
        replicas = health.total
        message = health.message
    }
}

/// A row of `cairn volume list`.
public struct VolumeSummary: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var sizeBytes: Int64
    public var epoch: UInt64
    public var accessModes: [String]
    public var condition: ConditionView
    public var attachedTo: [String]
    public var createdAt: Date

    public init(_ v: VolumeRecord, attachments: [AttachmentRecord]) {
        id = v.id
        name = v.name
        sizeBytes = v.capacityBytes
        epoch = v.epoch.rawValue
        accessModes = v.accessModes.map(AccessModeName.of)
        condition = ConditionView(VolumeHealth(v))
        attachedTo = attachments.map(\.nodeID)
        createdAt = v.createdAt
    }
}

/// `cairn volume inspect`.
public struct VolumeDetail: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var sizeBytes: Int64
    /// "" for a volume used as a raw block device.
    public var fsType: String
    public var epoch: UInt64
    public var accessModes: [String]
    public var parameters: [String: String]
    public var mutableParameters: [String: String]
    public var minInSync: Int
    public var contentSource: String?
    /// An encrypted volume's cipher and key wrapping (docs/encryption.md); nil for a plain one.
    public var encryption: String?
    public var createdAt: Date
    public var condition: ConditionView
    /// nil for a one-machine volume (a local file).
    public var replicas: [ReplicaView]?
    public var attachments: [AttachmentView]
    public var snapshots: [SnapshotView]

    public init(_ v: VolumeRecord, attachments: [AttachmentRecord], snapshots: [SnapshotRecord]) {
        id = v.id
        name = v.name
        sizeBytes = v.capacityBytes
        fsType = v.fsType
        epoch = v.epoch.rawValue
        accessModes = v.accessModes.map(AccessModeName.of)
        parameters = v.parameters
        mutableParameters = v.mutableParameters ?? [:]
        minInSync = v.minInSync
        contentSource = v.contentSource?.description
        if v.isEncrypted {
            encryption = v.encryption.map {
                "\($0.cipher), key wrapped with \($0.kdf) (\($0.iterations) iterations) and \($0.wrap)"
            } ?? "no key yet: made at the first NodeStageVolume (secret `passphrase`)"
        }
        createdAt = v.createdAt
        condition = ConditionView(VolumeHealth(v))
        replicas = v.replicas?.map { ReplicaView(volumeID: v.id, $0) }
        self.attachments = attachments.map(AttachmentView.init)
        self.snapshots = snapshots.filter { $0.sourceVolumeID == v.id && !$0.isHidden }.map(SnapshotView.init)
    }
}

/// A row of `cairn node list`.
public struct NodeSummary: Codable, Sendable, Equatable {
    public var id: String
    public var state: NodeState
    public var dataAddress: String?
    public var controlAddress: String?
    /// What the node offers for replicas; nil when it does not report it.
    public var capacityBytes: Int64?
    /// The sizes of the volumes it holds a replica of (provisioned, not written).
    public var provisionedBytes: Int64
    public var replicas: Int
    public var replicasInSync: Int
    /// What a restart of its engine-running process costs the staged volumes.
    public var engineRestarts: String?

    public init(id: String, state: NodeState, record: NodeRecord?, held: [ReplicaView], volumes: [String: VolumeRecord]) {
        self.id = id
        self.state = state
        dataAddress = record?.dataAddress
        controlAddress = record?.controlAddress
        capacityBytes = record?.capacityBytes
        provisionedBytes = held.reduce(0) { $0 + (volumes[$1.volumeID]?.capacityBytes ?? 0) }
        replicas = held.count
        replicasInSync = held.filter(\.inSync).count
        engineRestarts = record?.engineRestarts
    }
}

/// `cairn node inspect`.
public struct NodeDetail: Codable, Sendable, Equatable {
    public var node: NodeSummary
    public var topology: [String: String]
    public var maxVolumes: Int64?
    public var registeredAt: Date?
    public var replicas: [ReplicaView]
    /// Volumes published to this node (ControllerPublish), by id.
    public var attachedVolumes: [String]

    public init(_ summary: NodeSummary, record: NodeRecord?, held: [ReplicaView], attachedVolumes: [String]) {
        self.node = summary
        topology = record?.topology ?? [:]
        maxVolumes = record?.maxVolumes
        registeredAt = record?.registeredAt
        replicas = held
        self.attachedVolumes = attachedVolumes
    }
}

/// Everything the list commands need, read once from the store.
public struct ClusterView: Sendable {
    public var volumes: [VolumeRecord]
    public var attachments: [String: [AttachmentRecord]]
    public var liveNodes: [NodeRecord]
    public var removedNodes: [String]
    public var snapshots: [SnapshotRecord]

    public init(volumes: [VolumeRecord], attachments: [String: [AttachmentRecord]], liveNodes: [NodeRecord],
                removedNodes: [String], snapshots: [SnapshotRecord]) {
        self.volumes = volumes
        self.attachments = attachments
        self.liveNodes = liveNodes
        self.removedNodes = removedNodes
        self.snapshots = snapshots
    }

    public static func read(from store: any MetadataStore, snapshots withSnapshots: Bool = false) async throws -> ClusterView {
        let volumes = try await store.listVolumes(afterID: nil, limit: 0)
        // One read per volume: 16 in flight, so a cluster of thousands lists in seconds.
        let attachments = try await withThrowingTaskGroup(of: (String, [AttachmentRecord]).self) { group in
            var all: [String: [AttachmentRecord]] = [:]
            for (i, v) in volumes.enumerated() {
                if i >= 16, let (id, list) = try await group.next() { all[id] = list }
                group.addTask { (v.id, try await store.attachments(volumeID: v.id)) }
            }
            for try await (id, list) in group { all[id] = list }
            return all
        }
        return ClusterView(volumes: volumes, attachments: attachments, liveNodes: try await store.liveNodes(),
                           removedNodes: try await store.removedNodes(),
                           snapshots: withSnapshots ? try await store.listSnapshots(afterID: nil, limit: 0) : [])
    }

    public var replicas: [ReplicaView] {
        volumes.flatMap { v in (v.replicas ?? []).map { ReplicaView(volumeID: v.id, $0) } }
    }

    /// Live, away (holding replicas, not registered) and removed nodes, by id.
    public var nodes: [NodeSummary] {
        let all = replicas
        let byID = Dictionary(volumes.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        let ids = Set(liveNodes.map(\.id)).union(removedNodes).union(all.map(\.nodeID)).sorted()
        return ids.map { id in
            let record = liveNodes.first { $0.id == id }
            let state: NodeState = removedNodes.contains(id) ? .removed : record != nil ? .live : .away
            return NodeSummary(id: id, state: state, record: record, held: all.filter { $0.nodeID == id }, volumes: byID)
        }
    }

    public func node(_ id: String) -> NodeDetail? {
        guard let summary = nodes.first(where: { $0.id == id }) else { return nil }
        let held = replicas.filter { $0.nodeID == id }
        let attached = volumes.filter { v in (attachments[v.id] ?? []).contains { $0.nodeID == id } }.map(\.id)
        return NodeDetail(summary, record: liveNodes.first { $0.id == id }, held: held, attachedVolumes: attached)
    }
}

/// One JSON document: sorted keys, indented, ISO 8601 times.
public enum JSONOutput {
    public static func encode<T: Encodable>(_ value: T, pretty: Bool = true) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    /// The decoder that reads it back (tests, scripts written in Swift).
    public static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}
