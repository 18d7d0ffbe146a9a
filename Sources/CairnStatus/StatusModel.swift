import CairnCore
import Foundation

// The status API's documents (GET /api/v1/status and its parts; docs/status-page.md). JSON with
// camelCase keys and ISO 8601 dates, built by `ClusterStatusReader` from the cluster store.

/// Everything the status page shows, as of `generatedAt`.
public struct ClusterStatus: Codable, Sendable, Equatable {
    public var generatedAt: Date
    public var nodes: [NodeStatus]
    public var volumes: [VolumeStatus]
    /// Newest first.
    public var events: [ClusterEvent]
}

public struct NodeStatus: Codable, Sendable, Equatable {
    public var id: String
    public var state: NodeState
    /// The replica server's address (nil: the node serves no replicas, or is not live).
    public var dataAddress: String?
    /// Bytes the node offers for replicas (nil: not reported, or not live).
    public var capacityBytes: Int64?
    /// The sizes of the volumes whose replicas (or, on one machine, files) it holds.
    public var usedBytes: Int64
    public var replicas: Int
    public var topology: [String: String]
}

public struct VolumeStatus: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    public var sizeBytes: Int64
    public var epoch: UInt64
    public var condition: VolumeHealth.State
    /// The CSI volume condition's message (ControllerGetVolume says the same).
    public var message: String
    public var minInSync: Int
    /// Empty for a one-machine volume (a local file, no replicas).
    public var replicas: [ReplicaStatus]
    public var attachments: [AttachmentStatus]
    public var createdAt: Date
}

public struct ReplicaStatus: Codable, Sendable, Equatable {
    public var node: String
    public var nodeState: NodeState
    public var inSync: Bool
    public var outOfSyncSince: Date?
    public var reason: String?
    /// The resync bringing it back, while one is recorded.
    public var resync: ResyncStatus?
}

public struct ResyncStatus: Codable, Sendable, Equatable {
    /// diff, copy, joining, or "waiting: <why the last attempt failed>".
    public var phase: String
    /// Whether it is copying now (a fresh record, not waiting to retry).
    public var active: Bool
    public var bytesDone: Int64
    public var bytesTotal: Int64
    /// 0…100.
    public var percent: Double
    /// Bytes per second (`ResyncRates`); 0 when not known yet.
    public var bytesPerSecond: Double
    /// Seconds to go at that rate; nil while the rate is unknown.
    public var etaSeconds: Double?
    public var startedAt: Date
    public var updatedAt: Date
}

public struct AttachmentStatus: Codable, Sendable, Equatable {
    public var node: String
    public var epoch: UInt64
    public var readOnly: Bool
    public var since: Date
}

extension ClusterStatus {
    /// The API's encoding: sorted keys (stable output), ISO 8601 dates.
    public static func encoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }

    public static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}
