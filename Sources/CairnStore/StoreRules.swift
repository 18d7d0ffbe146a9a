import CairnCore
import Foundation

/// What both stores share, so that they keep the same documents and the same semantics.
enum StoreRules {
    /// Records are JSON with sorted keys and millisecond dates: the same bytes in SQLite and etcd.
    static func encode<T: Encodable>(_ value: T) throws -> Data {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .millisecondsSince1970
        encoder.outputFormatting = .sortedKeys
        return try encoder.encode(value)
    }

    static func decode<T: Decodable>(_ type: T.Type, _ data: Data) throws -> T {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .millisecondsSince1970
        return try decoder.decode(type, from: data)
    }

    /// `attach`'s preconditions. Both only get easier to meet when attachments go away, so a
    /// store need not detect concurrent deletions of the records they were checked against.
    static func checkAttach(volumeID: String, nodeID: String, volumeAttachments: [AttachmentRecord],
                            attachedToNode: Int64, exclusive: Bool, nodeLimit: Int64) throws {
        if exclusive, let other = volumeAttachments.first(where: { $0.nodeID != nodeID }) {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is published to node \(other.nodeID) with a single-node access mode; unpublish it there first")
        }
        if nodeLimit > 0, attachedToNode >= nodeLimit {
            throw CairnError.resourceExhausted(
                "node \(nodeID) already has \(attachedToNode) volumes attached, its limit (max_volumes_per_node); unpublish one first")
        }
    }

    static func volumeNotFound(_ id: String) -> CairnError {
        CairnError.notFound("volume \(id) does not exist")
    }

    static func nodeRemoved(_ id: String) -> CairnError {
        CairnError.failedPrecondition(
            "node \(id) was removed from the cluster (cairn node remove); its replicas were moved elsewhere. Give the machine a new --node-id to bring it back as a new node")
    }

    /// The event both stores record with `removeNode`, in the same transaction.
    static func nodeRemovedEvent(_ id: String) -> ClusterEvent {
        ClusterEvent(kind: .nodeRemoved, nodeID: id,
                     message: "node \(id) removed from the cluster (cairn node remove): its replicas are re-created on other nodes")
    }
}
