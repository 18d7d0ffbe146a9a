import CairnCore
import Foundation
import Logging
import Synchronization

/// Re-replication (docs/recovery.md): the controller replaces a replica whose node was removed
/// (`cairn node remove`) or has been away (not live) for longer than `timeout`, with a new,
/// empty replica on another eligible node; the engine of the attached node then copies it in
/// full and records it in sync. Runs on the leader only.
///
/// Never replaces the last in-sync replica. An in-sync replica on a removed or long-gone node
/// is first recorded out of sync (conditional on the volume's current epoch, like the engine's
/// own record), so no acknowledged write depends on it alone.
public final class ReplicaRepairer: Sendable {
    let controller: ControllerService
    let timeout: Duration
    let interval: Duration
    let logger: Logger
    /// When a volume last logged "no eligible node", to say it once a minute, not every pass.
    private let lastNoNode = Mutex<[String: ContinuousClock.Instant]>([:])
    /// When this controller first saw each node not live (forgotten when it is live again):
    /// an in-sync replica on a node away longer than the timeout is replaced too (an idle
    /// attached volume never writes, so its engine would not record the replica out of sync).
    private let awaySince = Mutex<[String: Date]>([:])

    public init(controller: ControllerService, timeout: Duration, interval: Duration = .seconds(5), logger: Logger) {
        self.controller = controller
        self.timeout = timeout
        self.interval = interval
        var logger = logger
        logger[metadataKey: "component"] = "re-replication"
        self.logger = logger
    }

    /// Scans every `interval` until the task is cancelled.
    public func run() async {
        logger.info("re-replication is on", metadata: [
            "replica.timeout": "\(timeout)", "interval": "\(interval)"])
        while !Task.isCancelled {
            do {
                _ = try await scan()
            } catch {
                logger.warning("re-replication pass failed; trying again", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// What one pass did: (volume, old node, new node) for each replacement.
    public struct Replacement: Sendable, Equatable {
        public var volumeID: String
        public var oldNodeID: String
        public var newNodeID: String
    }

    /// One pass over every replicated volume.
    public func scan(now: Date = Date()) async throws -> [Replacement] {
        let store = controller.store
        let removed = Set(try await store.removedNodes())
        let live = Set(try await store.liveNodes().map(\.id))
        let (away, back) = awaySince.withLock { away in
            let back = away.keys.filter { live.contains($0) }
            away = away.filter { !live.contains($0.key) }
            return (away, back)
        }
        for node in back.sorted() where !removed.contains(node) {
            store.recordEvent(ClusterEvent(kind: .nodeBack, nodeID: node, message: "node \(node) is live again"), logger: logger)
        }
        var seen = away
        var done: [Replacement] = []
        var after: String?
        while true {
            let page = try await store.listVolumes(afterID: after, limit: 100)
            guard let last = page.last else { break }
            after = last.id
            for volume in page where volume.replicas != nil {
                for replica in volume.replicas! {
                    if !live.contains(replica.nodeID) && seen[replica.nodeID] == nil { seen[replica.nodeID] = now }
                    guard let why = reason(replica, removed: removed, live: live, now: now, awaySince: seen[replica.nodeID])
                    else { continue }
                    if let replacement = try await replace(volume.id, replica.nodeID, why: why) {
                        done.append(replacement)
                    }
                }
            }
        }
        for (node, since) in seen.sorted(by: { $0.key < $1.key }) where away[node] == nil && !removed.contains(node) {
            store.recordEvent(ClusterEvent(kind: .nodeAway, nodeID: node,
                                           message: "node \(node) holds replicas but is not live (seen away since \(since.formatted(.iso8601)))"),
                              logger: logger)
        }
        awaySince.withLock { $0 = seen }
        return done
    }

    /// Why the replica must be replaced, or nil. `awaySince`: when this controller first saw
    /// the replica's node not live.
    func reason(_ replica: ReplicaRecord, removed: Set<String>, live: Set<String>, now: Date,
                awaySince: Date? = nil) -> String? {
        if removed.contains(replica.nodeID) { return "node \(replica.nodeID) was removed (cairn node remove)" }
        guard !live.contains(replica.nodeID) else { return nil }
        let seconds = Double(timeout.components.seconds) + Double(timeout.components.attoseconds) / 1e18
        // Out of sync: since the engine recorded it. In sync: since the node was seen away.
        let candidates = [replica.inSync ? nil : replica.outOfSyncSince, awaySince].compactMap { $0 }
        if let since = candidates.min(), now.timeIntervalSince(since) >= seconds {
            return "node \(replica.nodeID) has been away since \(since.formatted(.iso8601)), longer than the replica timeout of \(Int(seconds)) s"
        }
        return nil
    }

    /// Replaces the volume's replica on `oldNodeID` (re-reading the record under the volume's
    /// lock). nil when nothing was done (in progress elsewhere, no eligible node, last in-sync).
    func replace(_ volumeID: String, _ oldNodeID: String, why: String) async throws -> Replacement? {
        let store = controller.store
        do {
            return try await controller.locks.withLock(volumeID, operation: "re-replication") { () -> Replacement? in
                guard var volume = try await store.volume(id: volumeID), let replicas = volume.replicas,
                      let old = replicas.first(where: { $0.nodeID == oldNodeID }) else { return nil }
                if old.inSync {
                    guard replicas.filter(\.inSync).count > 1 else {
                        logger.warning("cannot re-replicate: it is the volume's last in-sync replica", metadata: [
                            "volume.id": "\(volumeID)", "replica.node": "\(oldNodeID)", "reason": "\(why)"])
                        return nil
                    }
                    try await store.markReplicaOutOfSync(volumeID: volumeID, nodeID: oldNodeID, epoch: volume.epoch,
                                                         reason: why)
                    store.recordEvent(ClusterEvent(kind: .replicaOutOfSync, volumeID: volumeID, nodeID: oldNodeID,
                                                   message: "node \(oldNodeID)'s replica left the in-sync set to be replaced: \(why)"),
                                      logger: logger)
                    guard let fresh = try await store.volume(id: volumeID) else { return nil }
                    volume = fresh
                }
                let holders = Set((volume.replicas ?? []).map(\.nodeID))
                let candidates = try await controller.placementCandidates()
                let removed = Set(try await store.removedNodes())
                let staying = candidates.filter { holders.contains($0.nodeID) && $0.nodeID != oldNodeID }
                // A node whose old replica of this volume is still to be deleted gets no new one:
                // its sweeper could remove the new replica along with the old.
                let deleting = Set(try await store.replicaDeletions(nodeID: nil).filter { $0.volumeID == volumeID }.map(\.nodeID))
                let eligible = candidates.filter {
                    !holders.contains($0.nodeID) && !removed.contains($0.nodeID) && !deleting.contains($0.nodeID)
                }
                let chosen: PlacementCandidate
                do {
                    chosen = try Placement.choose(count: 1, size: volume.capacityBytes, candidates: eligible,
                                                  alongside: staying)[0]
                } catch {
                    noEligibleNode(volumeID, oldNodeID, why: why, error: error)
                    return nil
                }
                let replacement = ReplicaRecord(nodeID: chosen.nodeID, address: chosen.address ?? "", inSync: false)
                try await controller.backing.createReplica(volume, replica: replacement)
                // The old replica's deletion is recorded before the record stops listing it, so a
                // controller that dies in between leaves nothing behind for good (while the volume
                // still lists the replica, its node drops the pending deletion and keeps it).
                try await store.recordReplicaDeletions([ReplicaDeletion(
                    nodeID: oldNodeID, volumeID: volumeID, reason: "replaced by a new replica on \(chosen.nodeID): \(why)")])
                try await store.replaceReplica(volumeID: volumeID, oldNodeID: oldNodeID, with: replacement)
                store.recordEvent(ClusterEvent(kind: .replicaReplaced, volumeID: volumeID, nodeID: chosen.nodeID,
                                               message: "replica re-created on node \(chosen.nodeID) in place of node \(oldNodeID)'s: \(why)"),
                                  logger: logger)
                logger.notice("replica re-created on another node; the attached engine copies it in full", metadata: [
                    "volume.id": "\(volumeID)", "replica.old": "\(oldNodeID)", "replica.new": "\(chosen.nodeID)",
                    "reason": "\(why)"])
                do {
                    // Deleted now, or recorded (again) for its node to delete when it returns.
                    try await controller.backing.deleteReplica(volume, replica: old)
                } catch {
                    logger.error("could not delete the replaced replica nor record its deletion; remove <data-dir>/replicas/\(volumeID) on that node by hand",
                                 metadata: ["volume.id": "\(volumeID)", "node.id": "\(oldNodeID)", "error": "\(error)"])
                }
                return Replacement(volumeID: volumeID, oldNodeID: oldNodeID, newNodeID: chosen.nodeID)
            }
        } catch let error as CairnError where error.code == .aborted {
            return nil  // a CSI call holds the volume: next pass
        }
    }

    private func noEligibleNode(_ volumeID: String, _ oldNodeID: String, why: String, error: any Error) {
        let now = ContinuousClock.now
        let say = lastNoNode.withLock { last in
            if let then = last[volumeID], now - then < .seconds(60) { return false }
            last[volumeID] = now
            return true
        }
        if say {
            logger.warning("cannot re-replicate: no eligible node for a new replica; trying again", metadata: [
                "volume.id": "\(volumeID)", "replica.node": "\(oldNodeID)", "reason": "\(why)", "error": "\(error)"])
        }
    }
}
