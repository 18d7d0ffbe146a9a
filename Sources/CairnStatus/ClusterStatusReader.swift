import CairnCore
import Foundation
import Synchronization

/// Builds the status page's `ClusterStatus` from the cluster store (nodes, volumes with their
/// replicas and attachments, recent events), keeping the resyncs' rate samples between reads.
///
/// A volume's `condition` is `VolumeRecord.health`; its `message` is the CSI volume
/// condition's (`describe`, the controller's own), so the page and ControllerGetVolume agree.
/// Reads are shared for `reuse` seconds: many open pages cost the store one read a second.
public final class ClusterStatusReader: Sendable {
    let store: any MetadataStore
    let describe: @Sendable (VolumeRecord) -> String
    /// The node that holds one-machine volumes (replicas nil); nil in cluster mode.
    let localNodeID: String?
    let reuse: TimeInterval
    let eventLimit: Int
    public let rates: ResyncRates
    private let last = Mutex<ClusterStatus?>(nil)

    public init(store: any MetadataStore, localNodeID: String? = nil, eventLimit: Int = 50, reuse: TimeInterval = 0.5,
                rates: ResyncRates = ResyncRates(), describe: @escaping @Sendable (VolumeRecord) -> String) {
        self.store = store
        self.describe = describe
        self.localNodeID = localNodeID
        self.reuse = reuse
        self.eventLimit = eventLimit
        self.rates = rates
    }

    public func status(now: Date = Date()) async throws -> ClusterStatus {
        if let recent = last.withLock({ $0 }), now.timeIntervalSince(recent.generatedAt) < reuse, now >= recent.generatedAt {
            return recent
        }
        let live = try await store.liveNodes()
        let removed = try await store.removedNodes()
        var volumes: [VolumeRecord] = []
        var after: String?
        while true {
            let page = try await store.listVolumes(afterID: after, limit: 500)
            guard let lastVolume = page.last else { break }
            volumes += page
            after = lastVolume.id
        }
        var attachments: [String: [AttachmentRecord]] = [:]
        for volume in volumes {
            attachments[volume.id] = try await store.attachments(volumeID: volume.id)
        }
        let events = try await store.recentEvents(limit: eventLimit)
        let status = build(now: now, live: live, removed: removed, volumes: volumes, attachments: attachments, events: events)
        last.withLock { $0 = status }
        return status
    }

    /// The document from what was read (no store access: the unit tests call it directly).
    func build(now: Date, live: [NodeRecord], removed: [String], volumes: [VolumeRecord],
               attachments: [String: [AttachmentRecord]], events: [ClusterEvent]) -> ClusterStatus {
        let removedSet = Set(removed)
        let liveByID = Dictionary(live.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        func state(_ node: String) -> NodeState {
            removedSet.contains(node) ? .removed : liveByID[node] != nil ? .live : .away
        }

        var used: [String: Int64] = [:]
        var replicaCount: [String: Int] = [:]
        var mentioned = Set<String>()
        var resyncs = Set<ResyncRates.Key>()
        var volumeStatuses: [VolumeStatus] = []
        for volume in volumes {
            let holders = volume.replicas?.map(\.nodeID) ?? localNodeID.map { [$0] } ?? []
            for node in holders {
                used[node, default: 0] += volume.capacityBytes
                replicaCount[node, default: 0] += 1
                mentioned.insert(node)
            }
            let replicas = (volume.replicas ?? []).map { replica -> ReplicaStatus in
                var resync: ResyncStatus?
                if !replica.inSync, let progress = replica.resync {
                    let key = ResyncRates.Key(volumeID: volume.id, nodeID: replica.nodeID)
                    resyncs.insert(key)
                    let estimate = rates.observe(volumeID: volume.id, nodeID: replica.nodeID, progress)
                    let active = progress.isActive(at: now)
                    resync = ResyncStatus(phase: progress.phase, active: active, bytesDone: progress.bytesDone,
                                          bytesTotal: progress.bytesTotal, percent: progress.percent,
                                          bytesPerSecond: active ? estimate.bytesPerSecond : 0,
                                          etaSeconds: active ? estimate.etaSeconds : nil,
                                          startedAt: progress.startedAt, updatedAt: progress.updatedAt)
                }
                return ReplicaStatus(node: replica.nodeID, nodeState: state(replica.nodeID), inSync: replica.inSync,
                                     outOfSyncSince: replica.outOfSyncSince, reason: replica.reason, resync: resync)
            }
            let attached = (attachments[volume.id] ?? []).map {
                AttachmentStatus(node: $0.nodeID, epoch: $0.epoch.rawValue, readOnly: $0.readonly, since: $0.createdAt)
            }
            mentioned.formUnion(attached.map(\.node))
            volumeStatuses.append(VolumeStatus(
                id: volume.id, name: volume.name, sizeBytes: volume.capacityBytes, epoch: volume.epoch.rawValue,
                condition: volume.health(at: now), message: describe(volume), minInSync: volume.minInSync,
                replicas: replicas, attachments: attached, createdAt: volume.createdAt))
        }
        rates.retain(resyncs)

        let nodeIDs = Set(liveByID.keys).union(removedSet).union(mentioned).sorted()
        let nodes = nodeIDs.map { id in
            let record = liveByID[id]
            return NodeStatus(id: id, state: state(id), dataAddress: record?.dataAddress, capacityBytes: record?.capacityBytes,
                              usedBytes: used[id] ?? 0, replicas: replicaCount[id] ?? 0, topology: record?.topology ?? [:])
        }
        return ClusterStatus(generatedAt: now, nodes: nodes, volumes: volumeStatuses, events: events.reversed())
    }
}
