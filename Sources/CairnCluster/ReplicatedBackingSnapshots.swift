import CairnCore
import CairnEngine
import CairnReplica
import CairnReplicaControl
import Foundation
import Logging

// Snapshots, clones, growth and QoS of replicated volumes (issue 7): what the controller and
// the node service call. Every replica is reached through its node's ReplicaControl service
// (the data protocol's ops for a node of the previous release); a snapshot of an
// attached volume goes to the node running its engine (the write barrier), an unattached one
// (no writer) is taken on each in-sync replica directly.

/// The replica server's way to this node's engines (a barrier snapshot request).
final class EngineSnapshotHooks: ReplicaEngineHooks {
    let engines: EngineRegistry

    init(engines: EngineRegistry) { self.engines = engines }

    func snapshot(volume: String, snapshotID: String, epoch: UInt64) throws -> [String]? {
        guard let engine = try engine(volume, epoch: epoch) else { return nil }
        // Inside a group's hold the snapshot is taken at that barrier.
        return engine.writesHeld ? try engine.snapshotReplicas(id: snapshotID) : try engine.snapshot(id: snapshotID)
    }

    func holdWrites(volume: String, timeout: Duration, epoch: UInt64) throws -> Bool {
        guard let engine = try engine(volume, epoch: epoch) else { return false }
        try engine.holdWrites(timeout: timeout)
        return true
    }

    func releaseWrites(volume: String, epoch: UInt64) throws -> Bool {
        guard let engine = try engine(volume, epoch: epoch) else { return false }
        engine.releaseWrites()
        return true
    }

    /// The engine of `volume` here; a request older than its epoch is stale.
    private func engine(_ volume: String, epoch: UInt64) throws -> VolumeEngine? {
        guard let engine = engines.engine(volumeID: volume) else { return nil }
        guard epoch >= engine.epoch else { throw ReplicaError.staleEpoch(seen: engine.epoch, got: epoch) }
        return engine
    }
}

extension ReplicatedBacking {
    /// What this node's replica server hands barrier snapshots to (set by `serveLocalReplicas`).
    public var engineHooks: any ReplicaEngineHooks { EngineSnapshotHooks(engines: engineRegistry) }

    /// Takes snapshot `snapshotID` of `volume` and returns the node ids whose replicas hold it
    /// (idempotent by id). Attached (`attachedNode`): the request goes to that node's replica
    /// server with the barrier flag and its engine holds writes, flushes and snapshots every
    /// in-sync replica (one that fails is recorded out of sync, as for a failed write). Not
    /// attached: no writer exists, so each in-sync replica takes it directly with the volume's
    /// epoch; one that cannot is left out of the answer (and logged) but stays in sync — its data
    /// is whole, it only lacks the snapshot.
    public func snapshot(volume: VolumeRecord, snapshotID: String, attachedNode: String?) async throws -> [String] {
        try Validate.volumeID(snapshotID, field: "snapshot id")
        guard let replicas = volume.replicas, !replicas.isEmpty else {
            throw CairnError.failedPrecondition("volume \(volume.id) has no replicas; it was not created in cluster mode")
        }
        let epoch = volume.epoch.rawValue
        if let attachedNode {
            let node = try await engineNode(attachedNode, for: volume)
            let taken: [String]?
            do {
                taken = try await control.barrierSnapshot(node, volumeID: volume.id, snapshotID: snapshotID, epoch: epoch)
            } catch let error as CairnError where error.code == .notFound {
                taken = nil  // published but not staged yet: no engine, no writer
            } catch let error as CairnError where error.code == .failedPrecondition {
                throw CairnError.aborted("volume \(volume.id)'s attachment moved on while snapshotting (\(error.message)); retry")
            } catch {
                throw CairnError.unavailable("snapshot \(snapshotID) of volume \(volume.id) through node \(attachedNode) failed: \(error); retry")
            }
            if let taken { return taken }
            // Published there but not staged yet. Each replica is claimed with the
            // attachment's epoch before its snapshot: an engine of an older attachment still
            // running somewhere is fenced first (staging would do the same), so nothing writes.
            logger.info("the volume is published but no engine runs it yet: taking the snapshot on each in-sync replica after claiming it with the attachment's epoch",
                        metadata: ["volume.id": "\(volume.id)", "snapshot.id": "\(snapshotID)", "node.id": "\(attachedNode)"])
        }
        let claimFirst = attachedNode != nil
        let security = self.security
        var took: [String] = []
        var failures: [String] = []
        for replica in replicas where replica.inSync {
            do {
                if claimFirst {
                    // Claiming is the data protocol's (the engine's own first step).
                    try await offCooperativePool {
                        let client = try Self.connect(replica.address, volumeID: volume.id, nodeID: replica.nodeID, doing: "take snapshot \(snapshotID)",
                                                      security: security)
                        defer { client.close() }
                        _ = try client.claim(volumeID: volume.id, epoch: epoch)
                    }
                }
                try await control.snapshot(await replicaNode(replica), volumeID: volume.id, snapshotID: snapshotID, epoch: epoch)
                took.append(replica.nodeID)
            } catch {
                failures.append("\(replica.nodeID): \(error)")
                logger.warning("a replica of the detached volume did not take the snapshot; it stays in sync but lacks the snapshot",
                               metadata: ["volume.id": "\(volume.id)", "snapshot.id": "\(snapshotID)", "node.id": "\(replica.nodeID)", "error": "\(error)"])
            }
        }
        guard !took.isEmpty else {
            throw CairnError.unavailable("no in-sync replica of volume \(volume.id) took snapshot \(snapshotID) (\(failures.joined(separator: "; "))); retry")
        }
        return took
    }

    /// How to reach `node`, which runs `volume`'s engine: its replica's data address, or the
    /// one it registered (an attached node need not hold a replica), and its control address.
    func engineNode(_ node: String, for volume: VolumeRecord) async throws -> ReplicaNode {
        let record = try await store.node(id: node)
        let data = volume.replicas?.first(where: { $0.nodeID == node })?.address ?? record?.dataAddress
        guard let data else {
            throw CairnError.unavailable("volume \(volume.id) is attached to node \(node), whose replica server address is unknown (the node has not registered one); retry once it has")
        }
        return ReplicaNode(nodeID: node, dataAddress: data, controlAddress: record?.controlAddress)
    }

    /// Takes every member's snapshot at one barrier: holds the writes of each attached member's
    /// engine (on its node) first, then snapshots each member — attached ones inside the hold,
    /// detached ones directly on their in-sync replicas (nothing writes them) — and releases
    /// every hold, on failure too. A hold lapses by itself after `holdTimeout`, so a controller
    /// that dies in the middle cannot freeze the volumes. Returns the node ids holding each
    /// snapshot, by volume id.
    public func groupSnapshot(_ members: [GroupSnapshotMember], holdTimeout: Duration = .seconds(30)) async throws -> [String: [String]] {
        guard Set(members.map(\.volume.id)).count == members.count else {
            throw CairnError.invalidArgument("a group snapshot names a volume twice")
        }
        for member in members { try Validate.volumeID(member.snapshot.id, field: "snapshot id") }
        // The attached members whose writes are held, and the node holding them.
        var held: [(node: ReplicaNode, member: GroupSnapshotMember)] = []
        func releaseAll() async {
            for (node, member) in held {
                let epoch = member.volume.epoch.rawValue
                do {
                    try await control.releaseWrites(node, volumeID: member.volume.id, epoch: epoch)
                } catch {
                    logger.warning("could not release a group snapshot's write hold; it lapses by itself at its timeout",
                                   metadata: ["volume.id": "\(member.volume.id)", "node.id": "\(member.use.attachedNode ?? "")",
                                              "hold.timeout": "\(holdTimeout)", "error": "\(error)"])
                }
            }
            held = []
        }
        do {
            for member in members {
                guard let attached = member.use.attachedNode else { continue }
                let node = try await engineNode(attached, for: member.volume)
                let volumeID = member.volume.id, epoch = member.volume.epoch.rawValue
                do {
                    try await control.holdWrites(node, volumeID: volumeID, hold: holdTimeout, epoch: epoch)
                } catch {
                    throw CairnError.unavailable("could not hold the writes of volume \(volumeID) on node \(attached) for a group snapshot: \(error); retry")
                }
                held.append((node, member))
            }
            var nodes: [String: [String]] = [:]
            for member in members {
                let volumeID = member.volume.id, epoch = member.volume.epoch.rawValue, id = member.snapshot.id
                if let node = held.first(where: { $0.member.volume.id == volumeID })?.node {
                    nodes[volumeID] = try await control.barrierSnapshot(node, volumeID: volumeID, snapshotID: id, epoch: epoch)
                } else {
                    nodes[volumeID] = try await snapshot(volume: member.volume, snapshotID: id, attachedNode: nil)
                }
            }
            await releaseAll()
            return nodes
        } catch {
            await releaseAll()
            throw error
        }
    }

    /// Deletes snapshot `snapshotID` from every replica of `volume` that has it (idempotent: a
    /// replica without it answers ok). A node that cannot be reached keeps its copy, logged with
    /// what to do; the call succeeds anyway (the snapshot is gone from the volume's point of
    /// view, and a later delete — or the replica's deletion — removes the leftover).
    public func deleteSnapshot(volume: VolumeRecord, snapshotID: String) async throws {
        try Validate.volumeID(snapshotID, field: "snapshot id")
        let epoch = volume.epoch.rawValue
        for replica in volume.replicas ?? [] {
            do {
                try await control.deleteSnapshot(await replicaNode(replica), volumeID: volume.id, snapshotID: snapshotID, epoch: epoch)
            } catch let error as CairnError where error.code == .notFound {
                continue  // no replica there any more: nothing holds the snapshot
            } catch {
                logger.warning("could not delete the snapshot on a replica; it keeps the snapshot's layer until the snapshot is deleted again there (the same DeleteSnapshot, once the node is back) or the replica is deleted",
                               metadata: ["volume.id": "\(volume.id)", "snapshot.id": "\(snapshotID)", "node.id": "\(replica.nodeID)",
                                          "replica.dir": "<data-dir>/replicas/\(volume.id)", "error": "\(error)"])
            }
        }
    }

    /// Creates the replicas of `into` (a new volume whose replicas the controller placed on nodes
    /// holding `snapshotID` of `source`) as clones of that snapshot: one per node, hard-linked
    /// on the node's disk, no data copied. Idempotent (a clone of the same size is accepted).
    public func clone(source: VolumeRecord, snapshotID: String, into volume: VolumeRecord) async throws {
        try Validate.volumeID(snapshotID, field: "snapshot id")
        guard let replicas = volume.replicas, !replicas.isEmpty else {
            throw CairnError.internal("volume \(volume.id) has no replicas placed; this is a controller bug")
        }
        let sourceNodes = Set((source.replicas ?? []).map(\.nodeID))
        for replica in replicas where !sourceNodes.contains(replica.nodeID) {
            throw CairnError.internal("clone \(volume.id)'s replica is placed on node \(replica.nodeID), which holds no replica of \(source.id); a clone must be placed on the nodes holding the snapshot (controller bug)")
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for replica in replicas {
                group.addTask {
                    do {
                        try await self.control.cloneReplica(await self.replicaNode(replica), volumeID: volume.id, sourceVolumeID: source.id,
                                                            snapshotID: snapshotID, sizeBytes: UInt64(volume.capacityBytes))
                    } catch let error as CairnError where error.code == .notFound {
                        throw CairnError.notFound("node \(replica.nodeID) has no snapshot \(snapshotID) of volume \(source.id) to clone (\(error.message))")
                    } catch let error as CairnError where error.code == .invalidArgument || error.code == .alreadyExists {
                        throw CairnError.invalidArgument("cannot clone snapshot \(snapshotID) into volume \(volume.id) on node \(replica.nodeID): \(error.message)")
                    } catch {
                        throw CairnError.unavailable("could not clone snapshot \(snapshotID) into volume \(volume.id) on node \(replica.nodeID): \(error); retry")
                    }
                }
            }
            try await group.waitForAll()
        }
        logger.info("cloned the volume's replicas from a snapshot", metadata: [
            "volume.id": "\(volume.id)", "clone.source": "\(source.id)", "snapshot.id": "\(snapshotID)",
            "replicas": "\(replicas.map(\.nodeID).joined(separator: ","))",
        ])
    }

    /// Grows every replica of `volume` to `sizeBytes`, then this node's engine for it if one
    /// runs here (which refreshes the FUSE file's size; the loop device is refreshed by the
    /// mounter's expand). An in-sync replica that cannot grow fails the call (retry); an
    /// out-of-sync one that cannot is logged and grows when its resync starts.
    public func grow(volume: VolumeRecord, to sizeBytes: Int64) async throws {
        guard sizeBytes > 0, sizeBytes % Int64(VolumeEngine.blockSize) == 0 else {
            throw CairnError.invalidArgument("size \(sizeBytes) is not a positive multiple of \(VolumeEngine.blockSize) bytes")
        }
        let epoch = volume.epoch.rawValue
        for replica in volume.replicas ?? [] {
            do {
                try await control.growReplica(await replicaNode(replica), volumeID: volume.id, sizeBytes: UInt64(sizeBytes), epoch: epoch)
            } catch where !replica.inSync {
                logger.warning("an out-of-sync replica could not grow now; its resync grows it", metadata: [
                    "volume.id": "\(volume.id)", "node.id": "\(replica.nodeID)", "error": "\(error)"])
            } catch let error as CairnError where error.code == .invalidArgument {
                throw CairnError.invalidArgument("cannot grow volume \(volume.id) to \(sizeBytes) bytes on node \(replica.nodeID): \(error.message)")
            } catch {
                throw CairnError.unavailable("could not grow volume \(volume.id)'s replica on node \(replica.nodeID): \(error); retry")
            }
        }
        if let engine = engineRegistry.engine(volumeID: volume.id) {
            try await offCooperativePool { try engine.grow(to: UInt64(sizeBytes)) }
        }
    }

    /// Applies QoS limits (0 = none) to the engine of `volumeID` running on this node. Returns
    /// false when none runs here (the limits then apply when it starts: `activate` reads them
    /// from the record's mutable parameters).
    @discardableResult
    public func setLimits(volumeID: String, iops: UInt64, bandwidth: UInt64) -> Bool {
        guard let engine = engineRegistry.engine(volumeID: volumeID) else { return false }
        engine.setLimits(iopsLimit: iops, bandwidthLimit: bandwidth)
        return true
    }

    /// The limits ControllerModifyVolume (or CreateVolume's mutable_parameters) recorded on the
    /// volume (`QoSLimits`: validated when stored; absent means no limit).
    static func limits(_ volume: VolumeRecord) -> (iops: UInt64, bandwidth: UInt64) {
        let limits = QoSLimits(volume: volume)
        return (limits.iops ?? 0, limits.bytesPerSecond ?? 0)
    }
}
