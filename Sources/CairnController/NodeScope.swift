import CairnCore

/// `--list-scope node` (cluster mode), for a CO that runs one controller per node and takes
/// what that controller reports for the node's own resources: Mesos's storage local resource
/// provider, one per agent, offers every volume ListVolumes returns and the pool GetCapacity
/// reports as disks of *that* agent. Unscoped, every agent would offer every volume of the
/// cluster and the whole cluster's capacity.
///
/// Scoped, a controller lists only the volumes created through it (`createdByNode`), places a
/// replica of each on its own node first (the task that uses it runs on this agent), and reports
/// as capacity the largest volume it could place now with one replica here. Pools of different
/// agents overlap (they share the other nodes' free space): a CreateVolume that no longer fits
/// fails with RESOURCE_EXHAUSTED, which Mesos does not retry.
extension ControllerService {
    var scopedToNode: Bool { cluster?.scopedToNode ?? false }

    /// The nodes placement tries first because of the scope: this controller's own.
    var scopePreferredNodes: [String] { scopedToNode ? [localNodeID] : [] }

    /// The volumes this controller answers for, in the store's order.
    func scoped(_ volumes: [VolumeRecord]) -> [VolumeRecord] {
        scopedToNode ? volumes.filter { $0.createdByNode == localNodeID } : volumes
    }

    /// The largest volume of `count` replicas with one on this node and the others on distinct
    /// other live nodes, in whole MiB; 0 when this node cannot hold a replica.
    func scopedCapacity(count: Int, candidates: [PlacementCandidate]) -> Int64 {
        guard let local = candidates.first(where: { $0.nodeID == localNodeID }) else { return 0 }
        let others = candidates.filter { $0.nodeID != localNodeID }.map(\.freeBytes).sorted(by: >)
        guard count >= 1, others.count >= count - 1 else { return 0 }
        let largest = count == 1 ? local.freeBytes : min(local.freeBytes, others[count - 2])
        return max(0, largest) / CapacityPolicy.mib * CapacityPolicy.mib
    }
}
