import CairnCore

/// Cluster mode's settings for the controller.
public struct ClusterConfig: Sendable {
    /// Replicas of a volume whose CreateVolume does not name `replicas`.
    public var defaultReplicas: Int
    /// `--list-scope node`: ListVolumes and GetCapacity answer for this controller's node only
    /// (see NodeScope.swift).
    public var scopedToNode: Bool
    /// Signs each attachment's claim grant (the controller's TLS identity); nil without data
    /// security.
    public var claimSigner: (any ClaimSigner)?

    public init(defaultReplicas: Int = 3, scopedToNode: Bool = false, claimSigner: (any ClaimSigner)? = nil) {
        self.claimSigner = claimSigner
        self.defaultReplicas = defaultReplicas
        self.scopedToNode = scopedToNode
    }
}

/// A live node that could hold a replica.
public struct PlacementCandidate: Sendable, Equatable {
    public var nodeID: String
    /// Where its replica server listens ("host:port"); nil when the node serves no data.
    public var address: String?
    public var topology: [String: String]
    public var capacityBytes: Int64
    /// Bytes already promised to replicas on the node.
    public var provisionedBytes: Int64

    public init(nodeID: String, address: String?, topology: [String: String], capacityBytes: Int64,
                provisionedBytes: Int64) {
        self.nodeID = nodeID
        self.address = address
        self.topology = topology
        self.capacityBytes = capacityBytes
        self.provisionedBytes = provisionedBytes
    }

    public var freeBytes: Int64 { address == nil ? 0 : capacityBytes - provisionedBytes }
}

/// Where a volume's replicas go: distinct nodes, spread over failure domains (zone first, then
/// rack), each with room for the whole volume; among equals, the node with the most free space.
public enum Placement {
    /// Topology labels that name failure domains, widest first.
    public static let domainKeys = ["topology.cairn.dev/zone", "topology.kubernetes.io/zone", "topology.cairn.dev/rack"]

    /// `preferred` names nodes (in order) that should hold a replica when they can — the CO's
    /// accessibility_requirements.preferred, e.g. the node Kubernetes scheduled the pod on, so
    /// that the engine finds a replica on its own node and reads locally.
    /// `alongside`: replicas that stay where they are (re-replication): the new ones spread
    /// away from their failure domains too.
    public static func choose(count: Int, size: Int64, candidates: [PlacementCandidate],
                              preferred: [String] = [], alongside: [PlacementCandidate] = []) throws -> [PlacementCandidate] {
        let eligible = candidates.filter { $0.address != nil && $0.freeBytes >= size }
        guard eligible.count >= count else {
            let reasons = candidates.sorted { $0.nodeID < $1.nodeID }.map { c -> String in
                if c.address == nil { return "\(c.nodeID): serves no replica data (no --data-address)" }
                return "\(c.nodeID): \(max(0, c.freeBytes)) bytes free"
            }
            throw CairnError.resourceExhausted(
                "cannot place \(count) replica\(count == 1 ? "" : "s") of \(size) bytes on distinct nodes: \(eligible.count) of \(candidates.count) live node\(candidates.count == 1 ? "" : "s") can hold one"
                + (reasons.isEmpty ? " (no node is registered: start the node agents)" : " (\(reasons.joined(separator: "; ")))")
                + "; ask for fewer replicas or a smaller volume, or add nodes")
        }
        var chosen: [PlacementCandidate] = []
        var left = eligible
        for nodeID in preferred where chosen.count < count {
            if let index = left.firstIndex(where: { $0.nodeID == nodeID }) { chosen.append(left.remove(at: index)) }
        }
        while chosen.count < count {
            // Lexicographic: fewest chosen sharing each failure domain (widest first), then most free.
            let placed = alongside + chosen
            let best = left.min { a, b in
                let sa = domainKeys.map { key in sharing(a, key, placed) }
                let sb = domainKeys.map { key in sharing(b, key, placed) }
                if sa != sb { return sa.lexicographicallyPrecedes(sb) }
                if a.freeBytes != b.freeBytes { return a.freeBytes > b.freeBytes }
                return a.nodeID < b.nodeID
            }!
            chosen.append(best)
            left.removeAll { $0.nodeID == best.nodeID }
        }
        return chosen
    }

    static func sharing(_ candidate: PlacementCandidate, _ key: String, _ chosen: [PlacementCandidate]) -> Int {
        guard let value = candidate.topology[key] else { return 0 }
        return chosen.filter { $0.topology[key] == value }.count
    }
}

extension ControllerService {
    /// The live nodes with what is already provisioned on each (every replica counts its volume's size).
    func placementCandidates() async throws -> [PlacementCandidate] {
        var provisioned: [String: Int64] = [:]
        for volume in try await store.listVolumes(afterID: nil, limit: 0) {
            for replica in volume.replicas ?? [] { provisioned[replica.nodeID, default: 0] += volume.capacityBytes }
        }
        // A removed node may still hold a lease for a moment (or re-register by mistake): never place on it.
        let removed = Set(try await store.removedNodes())
        return try await store.liveNodes().filter { !removed.contains($0.id) }.map { node in
            PlacementCandidate(nodeID: node.id, address: node.dataAddress, topology: node.topology,
                               capacityBytes: node.capacityBytes ?? 0, provisionedBytes: provisioned[node.id] ?? 0)
        }
    }
}
