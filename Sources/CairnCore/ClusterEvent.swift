import Foundation
import Logging

/// Something an operator wants to see happened to a volume or a node (the status page's recent
/// events): a failover or fence, a replica leaving or rejoining the in-sync set, a repair, a node
/// going away, coming back or being removed, a replica re-created elsewhere.
///
/// The store keeps the newest `ClusterEvent.retained` of them (`MetadataStore.appendEvent`).
/// Recording one is best effort and never on the I/O path: `MetadataStore.recordEvent` appends
/// in the background and only logs a failure.
public struct ClusterEvent: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// The volume was attached with a new epoch: every older writer is fenced.
        case attached
        /// An engine found a newer epoch and stopped serving its volume.
        case fenced
        /// A replica left the in-sync set.
        case replicaOutOfSync = "replica-out-of-sync"
        /// A resync finished: the replica is in sync again.
        case replicaInSync = "replica-in-sync"
        /// Corrupted blocks were rewritten from another replica (scrub or read).
        case repaired
        /// Re-replication put a new replica on another node in place of an old one.
        case replicaReplaced = "replica-replaced"
        case nodeAway = "node-away"
        case nodeBack = "node-back"
        case nodeRemoved = "node-removed"
    }

    public var time: Date
    public var kind: Kind
    public var volumeID: String?
    public var nodeID: String?
    public var message: String

    public init(time: Date = Date(), kind: Kind, volumeID: String? = nil, nodeID: String? = nil, message: String) {
        self.time = time
        self.kind = kind
        self.volumeID = volumeID
        self.nodeID = nodeID
        self.message = message
    }

    /// How many events a store keeps: the oldest go as new ones come.
    public static let retained = 200
}

extension MetadataStore {
    /// Appends `event` in the background, off the caller's path: a failure is logged, never
    /// thrown (an event is for operators; no I/O or CSI call waits for it or fails with it).
    public func recordEvent(_ event: ClusterEvent, logger: Logger) {
        Task {
            do {
                try await appendEvent(event)
            } catch {
                logger.warning("could not record an event for the status page (it is missing from its recent events; nothing else is affected)",
                               metadata: ["event.kind": "\(event.kind.rawValue)", "event.message": "\(event.message)",
                                          "error": "\(error)"])
            }
        }
    }
}
