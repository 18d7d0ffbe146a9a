import CairnCore
import CairnReplica
import CairnReplicaControl
import CairnRPC
import CairnSecurity
import Foundation
import Logging

/// Node side of orphaned replicas (docs/recovery.md, "Orphaned replicas"): deletes this node's
/// replicas whose deletion the controller recorded in the store because the node was away
/// (DeleteVolume, re-replication), then removes those records. Runs in the process that serves
/// the node's replicas, once at start and then every `interval`.
///
/// Safety: a replica the store lists as part of a live volume is never deleted — its pending
/// deletion is dropped instead (the volume exists again with this replica, or a re-replication
/// was recorded but never committed). The deletion goes through this node's own replica server
/// (ReplicaControl's idempotent DeleteReplica), so it cannot race an open replica there.
public final class ReplicaSweeper: Sendable {
    let nodeID: String
    let store: any MetadataStore
    /// This node's replica server and control service, as this process reaches them.
    let node: ReplicaNode
    let control: ReplicaControlClient
    let replicasDirectory: String
    let interval: Duration
    let logger: Logger

    public init(nodeID: String, store: any MetadataStore, dataDir: String, address: String, controlAddress: String? = nil,
                interval: Duration = .seconds(30), security: DataPlaneSecurity = .insecure, logger: Logger) {
        self.nodeID = nodeID
        self.store = store
        self.node = ReplicaNode(nodeID: nodeID, dataAddress: address, controlAddress: controlAddress)
        self.control = ReplicaControlClient(logger: logger, security: security)
        self.replicasDirectory = dataDir + "/replicas"
        self.interval = interval
        var logger = logger
        logger[metadataKey: "component"] = "orphaned-replicas"
        self.logger = logger
    }

    /// Sweeps now and then every `interval` until the task is cancelled.
    public func run() async {
        var first = true
        while !Task.isCancelled {
            do {
                _ = try await sweep()
                if first { try await reportUnknownReplicas() }
                first = false
            } catch {
                logger.warning("could not look for orphaned replicas; trying again", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: interval)
        }
    }

    /// What one pass did with each pending deletion.
    public enum Outcome: Sendable, Equatable {
        /// The replica was deleted (or was already gone).
        case deleted(volumeID: String)
        /// The store lists the replica in a live volume: kept, and the pending deletion dropped.
        case kept(volumeID: String)
    }

    /// One pass over this node's pending deletions. A deletion that fails stays pending (logged)
    /// and the pass goes on with the next.
    public func sweep() async throws -> [Outcome] {
        var done: [Outcome] = []
        for pending in try await store.replicaDeletions(nodeID: nodeID) {
            do {
                done.append(try await settle(pending))
            } catch {
                logger.warning("could not delete an orphaned replica; trying again later", metadata: [
                    "volume.id": "\(pending.volumeID)", "reason": "\(pending.reason)", "error": "\(error)"])
            }
        }
        return done
    }

    private func settle(_ pending: ReplicaDeletion) async throws -> Outcome {
        let volumeID = pending.volumeID
        try Validate.volumeID(volumeID)
        if let volume = try await store.volume(id: volumeID),
           volume.replicas?.contains(where: { $0.nodeID == nodeID }) == true {
            try await store.removeReplicaDeletion(nodeID: nodeID, volumeID: volumeID, token: pending.token)
            logger.notice("kept a replica whose deletion was pending: the store lists it in the volume", metadata: [
                "volume.id": "\(volumeID)", "reason": "\(pending.reason)"])
            return .kept(volumeID: volumeID)
        }
        let existed = FileManager.default.fileExists(atPath: "\(replicasDirectory)/\(volumeID)")
        try await control.deleteReplica(node, volumeID: volumeID)
        // Conditional on the record read: a newer recording (the controller met this node away
        // again meanwhile) stays for the next pass, which finds the replica gone.
        try await store.removeReplicaDeletion(nodeID: nodeID, volumeID: volumeID, token: pending.token)
        logger.info(existed ? "orphaned replica removed" : "orphaned replica was already gone", metadata: [
            "volume.id": "\(volumeID)", "reason": "\(pending.reason)",
            "recorded_at": "\(ReplicatedBacking.timestamp(pending.recordedAt))"])
        return .deleted(volumeID: volumeID)
    }

    /// Replica directories of volumes the store does not know, with no pending deletion: only
    /// reported (a warning each), never deleted. Such a directory is left by a controller that died
    /// between creating replicas and recording the volume, or whose pending deletion could not be
    /// written; but a CreateVolume in progress looks the same, and so does every replica when the
    /// node is pointed at the wrong store (etcd prefix), so removing them is an operator's call.
    public func reportUnknownReplicas() async throws {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: replicasDirectory)) ?? []
        for volumeID in names.sorted() where (try? Validate.volumeID(volumeID)) != nil {
            guard try await store.volume(id: volumeID) == nil else { continue }
            logger.warning("replica of a volume the store does not know; if no CreateVolume of it is in progress, remove the directory by hand", metadata: [
                "volume.id": "\(volumeID)", "replica.dir": "\(replicasDirectory)/\(volumeID)"])
        }
    }
}
