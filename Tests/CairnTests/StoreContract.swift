import CairnCore
import Foundation
import XCTest

/// Behaviour every MetadataStore must have, run against SQLiteStore (SQLiteStoreTests) and a
/// real etcd (EtcdStoreTests) with the same bodies.
enum StoreContract {
    /// Whole seconds: the stores keep milliseconds, so a fresh Date() would not compare equal.
    static let when = Date(timeIntervalSince1970: 1_800_000_000)

    static func volume(_ id: String, name: String? = nil, mib: Int64 = 64, replicas: [ReplicaRecord]? = nil) -> VolumeRecord {
        VolumeRecord(id: id, name: name ?? "pvc-\(id)", capacityBytes: mib << 20, parameters: ["k": "v"], fsType: "ext4",
                     accessModes: [7], accessibleTopology: ["topology.cairn.dev/node": "node-a"], createdAt: when,
                     replicas: replicas)
    }

    static func publish(_ path: String, _ namespace: MountNamespace, volumeID: String = "vol-1") -> PublishRecord {
        PublishRecord(volumeID: volumeID, nodeID: "node-a", targetPath: path, stagingPath: "/stage",
                      accessType: .mount, readonly: false, accessMode: 7, mountFlags: [], targetNamespace: namespace,
                      createdAt: when)
    }

    static func stage(_ volumeID: String, _ nodeID: String) -> StageRecord {
        StageRecord(volumeID: volumeID, nodeID: nodeID, stagingPath: "/stage/\(volumeID)", accessType: .mount,
                    devicePath: "/dev/loop7", fsType: "ext4", mountFlags: ["noatime"], accessMode: 7, createdAt: when)
    }

    static func snapshotsAreUniqueByNameUpdatedListedInPagesAndDeleted(_ store: any MetadataStore) async throws {
        for id in ["snap-c", "snap-a", "snap-b"] {
            try await store.createSnapshot(SnapshotRecord(id: id, name: "name-\(id)", sourceVolumeID: "vol-1", sizeBytes: 64 << 20,
                                                          createdAt: when, holders: id == "snap-b" ? ["n1", "n2"] : nil))
        }
        await assertStatus(.alreadyExists) {
            try await store.createSnapshot(SnapshotRecord(id: "snap-z", name: "name-snap-a", sourceVolumeID: "vol-2", sizeBytes: 1))
        }
        await assertStatus(.alreadyExists) {
            try await store.createSnapshot(SnapshotRecord(id: "snap-a", name: "other", sourceVolumeID: "vol-2", sizeBytes: 1))
        }
        let maybeB = try await store.snapshot(named: "name-snap-b")
        var b = try XCTUnwrap(maybeB)
        XCTAssertEqual(b.holders, ["n1", "n2"])
        XCTAssertFalse(b.readyToUse)
        b.readyToUse = true
        try await store.updateSnapshot(b)
        let readBack = try await store.snapshot(id: "snap-b")
        XCTAssertEqual(readBack, b)
        await assertStatus(.notFound) {
            try await store.updateSnapshot(SnapshotRecord(id: "snap-nope", name: "x", sourceVolumeID: "v", sizeBytes: 1))
        }
        let all = try await store.listSnapshots(afterID: nil, limit: 0)
        XCTAssertEqual(all.map(\.id), ["snap-a", "snap-b", "snap-c"])
        let page = try await store.listSnapshots(afterID: "snap-a", limit: 1)
        XCTAssertEqual(page.map(\.id), ["snap-b"])
        try await store.deleteSnapshot(id: "snap-a")
        try await store.deleteSnapshot(id: "snap-a")  // idempotent
        let gone = try await store.snapshot(named: "name-snap-a")
        XCTAssertNil(gone)
        // The name is free again.
        try await store.createSnapshot(SnapshotRecord(id: "snap-d", name: "name-snap-a", sourceVolumeID: "vol-1", sizeBytes: 1))

        let group = GroupSnapshotRecord(id: "group-1", name: "g", snapshotIDs: ["snap-b", "snap-c"],
                                        sourceVolumeIDs: ["vol-1", "vol-2"], createdAt: when)
        try await store.createGroupSnapshot(group)
        await assertStatus(.alreadyExists) { try await store.createGroupSnapshot(group) }
        let maybeGroup = try await store.groupSnapshot(named: "g")
        var found = try XCTUnwrap(maybeGroup)
        XCTAssertEqual(found, group)
        found.readyToUse = true
        try await store.updateGroupSnapshot(found)
        let readyGroup = try await store.groupSnapshot(id: "group-1")
        XCTAssertEqual(readyGroup?.readyToUse, true)
        try await store.deleteGroupSnapshot(id: "group-1")
        let noGroup = try await store.groupSnapshot(id: "group-1")
        XCTAssertNil(noGroup)
    }

    static func oneVolumeAtTheSamePathInTwoContainersIsTwoPublishes(_ store: any MetadataStore) async throws {
        let a = publish("/data", .process(pid: 100, startTime: 1))
        let b = publish("/data", .process(pid: 200, startTime: 2))
        let host = publish("/var/lib/kubelet/pods/x/data", .host)
        for record in [a, b, host] { try await store.putPublish(record) }
        var all = try await store.publishes(volumeID: "vol-1")
        XCTAssertEqual(all.count, 3)
        XCTAssertEqual(all.last, host, "ordered by target path")
        try await store.removePublish(a)
        all = try await store.publishes(volumeID: "vol-1")
        XCTAssertEqual(Set(all.map(\.namespace)), [b.namespace, .host], "removing one container's target keeps the other's")
        try await store.removePublish(a)  // idempotent
    }

    static func volumesAreCreatedFoundListedAndDeletedWithTheirRecords(_ store: any MetadataStore) async throws {
        let replicas = [ReplicaRecord(nodeID: "node-a", address: "10.0.0.1:7000"),
                        ReplicaRecord(nodeID: "node-b", address: "10.0.0.2:7000")]
        let ids = ["vol-c", "vol-a", "vol-b"]
        for id in ids { try await store.createVolume(volume(id, replicas: id == "vol-b" ? replicas : nil)) }
        let found = try await store.volume(id: "vol-b")
        XCTAssertEqual(found, volume("vol-b", replicas: replicas))
        let byName = try await store.volume(named: "pvc-vol-a")
        XCTAssertEqual(byName?.id, "vol-a")
        let missing = try await store.volume(named: "nope")
        XCTAssertNil(missing)
        await assertStatus(.alreadyExists) { try await store.createVolume(volume("vol-a", name: "other")) }
        await assertStatus(.alreadyExists) { try await store.createVolume(volume("vol-z", name: "pvc-vol-a")) }

        let all = try await store.listVolumes(afterID: nil, limit: 0)
        XCTAssertEqual(all.map(\.id), ["vol-a", "vol-b", "vol-c"])
        let page1 = try await store.listVolumes(afterID: nil, limit: 2)
        XCTAssertEqual(page1.map(\.id), ["vol-a", "vol-b"])
        let page2 = try await store.listVolumes(afterID: "vol-b", limit: 2)
        XCTAssertEqual(page2.map(\.id), ["vol-c"])
        let afterDeleted = try await store.listVolumes(afterID: "vol-aa", limit: 0)
        XCTAssertEqual(afterDeleted.map(\.id), ["vol-b", "vol-c"], "a token survives the deletion of its volume")
        let provisioned = try await store.provisionedBytes()
        XCTAssertEqual(provisioned, 3 * (64 << 20))

        _ = try await store.attach(volumeID: "vol-a", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 0)
        try await store.putStage(stage("vol-a", "node-a"))
        try await store.putPublish(publish("/t", .host, volumeID: "vol-a"))
        try await store.deleteVolume(id: "vol-a")
        let gone = try await store.volume(id: "vol-a")
        XCTAssertNil(gone)
        let attachments = try await store.attachments(volumeID: "vol-a")
        let stages = try await store.stages(nodeID: "node-a")
        let publishes = try await store.publishes(volumeID: "vol-a")
        XCTAssertTrue(attachments.isEmpty && stages.isEmpty && publishes.isEmpty, "deleting a volume deletes its records")
        try await store.deleteVolume(id: "vol-a")  // idempotent
        try await store.createVolume(volume("vol-a2", name: "pvc-vol-a"))  // the name is free again
        let left = try await store.provisionedBytes()
        XCTAssertEqual(left, 3 * (64 << 20))
    }

    static func attachRaisesTheEpochAndEnforcesExclusivityAndTheNodeLimit(_ store: any MetadataStore) async throws {
        await assertStatus(.notFound) {
            try await store.attach(volumeID: "vol-none", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 0)
        }
        for id in ["vol-1", "vol-2", "vol-3"] { try await store.createVolume(volume(id)) }
        let first = try await store.attach(volumeID: "vol-1", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 2)
        XCTAssertEqual(first.epoch, 1)
        let again = try await store.attach(volumeID: "vol-1", nodeID: "node-a", readonly: true, accessMode: 7, exclusive: true, nodeLimit: 0)
        XCTAssertEqual(again.epoch, 2, "every attach raises the epoch")
        let stored = try await store.volume(id: "vol-1")
        XCTAssertEqual(stored?.epoch, 2)
        await assertStatus(.failedPrecondition) {
            try await store.attach(volumeID: "vol-1", nodeID: "node-b", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 0)
        }
        _ = try await store.attach(volumeID: "vol-1", nodeID: "node-b", readonly: true, accessMode: 3, exclusive: false, nodeLimit: 0)
        let both = try await store.attachments(volumeID: "vol-1")
        XCTAssertEqual(both.map(\.nodeID), ["node-a", "node-b"])
        XCTAssertEqual(both.first?.readonly, true, "a repeated attach replaces the record")

        _ = try await store.attach(volumeID: "vol-2", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 2)
        await assertStatus(.resourceExhausted) {
            try await store.attach(volumeID: "vol-3", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 2)
        }
        try await store.detach(volumeID: "vol-2", nodeID: "node-a")
        try await store.detach(volumeID: "vol-2", nodeID: "node-a")  // idempotent
        let third = try await store.attach(volumeID: "vol-3", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 2)
        XCTAssertEqual(third.epoch, 1)
        let afterDetach = try await store.attachments(volumeID: "vol-2")
        XCTAssertTrue(afterDetach.isEmpty)
    }

    static func concurrentExclusiveAttachesOfOneVolumeHaveExactlyOneWinner(_ store: any MetadataStore) async throws {
        for round in 0..<5 {
            let id = "vol-race-\(round)"
            try await store.createVolume(volume(id))
            let results = await withTaskGroup(of: Result<AttachmentRecord, any Error>.self) { group in
                for node in ["node-a", "node-b"] {
                    group.addTask {
                        do {
                            return .success(try await store.attach(volumeID: id, nodeID: node, readonly: false, accessMode: 7,
                                                                   exclusive: true, nodeLimit: 0))
                        } catch { return .failure(error) }
                    }
                }
                var all: [Result<AttachmentRecord, any Error>] = []
                for await r in group { all.append(r) }
                return all
            }
            let winners = results.compactMap { try? $0.get() }
            XCTAssertEqual(winners.count, 1, "round \(round): \(results)")
            for case .failure(let error) in results {
                XCTAssertEqual((error as? CairnError)?.code, .failedPrecondition, "\(error)")
            }
            let attachments = try await store.attachments(volumeID: id)
            XCTAssertEqual(attachments.map(\.nodeID), winners.map(\.nodeID))
        }
    }

    static func stagesAreKeptPerNode(_ store: any MetadataStore) async throws {
        try await store.putStage(stage("vol-2", "node-a"))
        try await store.putStage(stage("vol-1", "node-a"))
        try await store.putStage(stage("vol-1", "node-b"))
        let one = try await store.stage(volumeID: "vol-1", nodeID: "node-b")
        XCTAssertEqual(one, stage("vol-1", "node-b"))
        let onA = try await store.stages(nodeID: "node-a")
        XCTAssertEqual(onA.map(\.volumeID), ["vol-1", "vol-2"])
        try await store.removeStage(volumeID: "vol-1", nodeID: "node-a")
        try await store.removeStage(volumeID: "vol-1", nodeID: "node-a")
        let none = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertNil(none)
        let onB = try await store.stages(nodeID: "node-b")
        XCTAssertEqual(onB.count, 1)
    }

    static func aReplicaLeavesTheInSyncSetOnlyUnderTheCurrentEpoch(_ store: any MetadataStore) async throws {
        let replicas = [ReplicaRecord(nodeID: "node-a", address: "10.0.0.1:7000"),
                        ReplicaRecord(nodeID: "node-b", address: "10.0.0.2:7000")]
        try await store.createVolume(volume("vol-r", replicas: replicas))
        try await store.createVolume(volume("vol-local"))
        _ = try await store.attach(volumeID: "vol-r", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 0)
        _ = try await store.attach(volumeID: "vol-r", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 0)

        await assertStatus(.failedPrecondition) {
            try await store.markReplicaOutOfSync(volumeID: "vol-r", nodeID: "node-b", epoch: 1, reason: "write timed out")
        }
        var current = try await store.volume(id: "vol-r")
        XCTAssertEqual(current?.replicas, replicas, "a fenced writer changes nothing")
        do {
            try await store.markReplicaOutOfSync(volumeID: "vol-r", nodeID: "node-b", epoch: 1, reason: "x")
        } catch let e as CairnError {
            XCTAssertTrue(e.message.contains("fenced: the volume's epoch is now 2"), e.message)
        }

        try await store.markReplicaOutOfSync(volumeID: "vol-r", nodeID: "node-b", epoch: 2, reason: "write timed out")
        current = try await store.volume(id: "vol-r")
        let b = current?.replicas?.first { $0.nodeID == "node-b" }
        XCTAssertEqual(b?.inSync, false)
        XCTAssertEqual(b?.reason, "write timed out")
        XCTAssertNotNil(b?.outOfSyncSince)
        XCTAssertEqual(current?.replicas?.first?.inSync, true, "the other replica stays in sync")
        XCTAssertEqual(current?.epoch, 2, "marking does not raise the epoch")

        try await store.markReplicaOutOfSync(volumeID: "vol-r", nodeID: "node-b", epoch: 2, reason: "again")
        let unchanged = try await store.volume(id: "vol-r")
        XCTAssertEqual(unchanged, current, "already out of sync: no change")

        await assertStatus(.notFound) {
            try await store.markReplicaOutOfSync(volumeID: "vol-r", nodeID: "node-c", epoch: 2, reason: "x")
        }
        await assertStatus(.notFound) {
            try await store.markReplicaOutOfSync(volumeID: "vol-none", nodeID: "node-a", epoch: 0, reason: "x")
        }
        await assertStatus(.notFound) {
            try await store.markReplicaOutOfSync(volumeID: "vol-local", nodeID: "node-a", epoch: 0, reason: "x")
        }
    }

    static func aReplicaRejoinsRecordsProgressAndIsReplacedOnlyOutOfSync(_ store: any MetadataStore) async throws {
        let replicas = [ReplicaRecord(nodeID: "node-a", address: "10.0.0.1:7000"),
                        ReplicaRecord(nodeID: "node-b", address: "10.0.0.2:7000")]
        try await store.createVolume(volume("vol-j", replicas: replicas))
        _ = try await store.attach(volumeID: "vol-j", nodeID: "node-a", readonly: false, accessMode: 7, exclusive: true, nodeLimit: 0)
        try await store.markReplicaOutOfSync(volumeID: "vol-j", nodeID: "node-b", epoch: 1, reason: "node down")
        let progress = ResyncProgress(bytesTotal: 100 << 20, bytesDone: 40 << 20, bytesPerSecond: 50_000_000,
                                      startedAt: when, updatedAt: when, phase: "copy")
        try await store.recordResyncProgress(volumeID: "vol-j", nodeID: "node-b", epoch: 1, progress: progress)
        var current = try await store.volume(id: "vol-j")
        XCTAssertEqual(current?.replicas?[1].resync, progress)
        XCTAssertTrue(progress.summary.contains("40%"), progress.summary)
        await assertStatus(.failedPrecondition) {
            try await store.markReplicaInSync(volumeID: "vol-j", nodeID: "node-b", epoch: 0)
        }
        await assertStatus(.notFound) { try await store.markReplicaInSync(volumeID: "vol-j", nodeID: "node-z", epoch: 1) }
        try await store.markReplicaInSync(volumeID: "vol-j", nodeID: "node-b", epoch: 1)
        current = try await store.volume(id: "vol-j")
        XCTAssertEqual(current?.replicas, replicas, "in sync again: no reason, no date, no progress")
        try await store.markReplicaInSync(volumeID: "vol-j", nodeID: "node-b", epoch: 1)  // idempotent
        // Progress is only for an out-of-sync replica.
        try await store.recordResyncProgress(volumeID: "vol-j", nodeID: "node-b", epoch: 1, progress: progress)
        let afterJoin = try await store.volume(id: "vol-j")
        XCTAssertNil(afterJoin?.replicas?[1].resync)

        // Replacement: never an in-sync replica, never onto a node that holds one.
        let c = ReplicaRecord(nodeID: "node-c", address: "10.0.0.3:7000")
        await assertStatus(.failedPrecondition) { try await store.replaceReplica(volumeID: "vol-j", oldNodeID: "node-b", with: c) }
        try await store.markReplicaOutOfSync(volumeID: "vol-j", nodeID: "node-b", epoch: 1, reason: "disk gone")
        await assertStatus(.failedPrecondition) {
            try await store.replaceReplica(volumeID: "vol-j", oldNodeID: "node-b", with: ReplicaRecord(nodeID: "node-a", address: "x"))
        }
        try await store.replaceReplica(volumeID: "vol-j", oldNodeID: "node-b", with: c)
        current = try await store.volume(id: "vol-j")
        XCTAssertEqual(current?.replicas?.map(\.nodeID), ["node-a", "node-c"])
        XCTAssertEqual(current?.replicas?[1].inSync, false)
        XCTAssertTrue(current?.replicas?[1].reason?.contains("replacing node-b") == true, current?.replicas?[1].reason ?? "")
    }

    static func aRemovedNodeCannotRegisterAgain(_ store: any MetadataStore) async throws {
        try await store.registerNode(NodeRecord(id: "node-r", topology: [:], maxVolumes: 0, registeredAt: when))
        try await store.removeNode(id: "node-r")
        try await store.removeNode(id: "node-r")  // idempotent
        let removed = try await store.removedNodes()
        XCTAssertEqual(removed, ["node-r"])
        let live = try await store.liveNodes()
        XCTAssertFalse(live.contains { $0.id == "node-r" })
        await assertStatus(.failedPrecondition) {
            try await store.registerNode(NodeRecord(id: "node-r", topology: [:], maxVolumes: 0, registeredAt: when))
        }
    }

    /// The event log: oldest first, bounded to the newest `ClusterEvent.retained`; removing a
    /// node records one event however often it is repeated.
    static func eventsAreKeptNewestLastAndBounded(_ store: any MetadataStore) async throws {
        try await store.registerNode(NodeRecord(id: "node-e", topology: [:], maxVolumes: 0, registeredAt: when))
        try await store.removeNode(id: "node-e")
        try await store.removeNode(id: "node-e")
        var events = try await store.recentEvents(limit: 10)
        XCTAssertEqual(events.map(\.kind), [.nodeRemoved])
        XCTAssertEqual(events.first?.nodeID, "node-e")

        let start = Date(timeIntervalSince1970: 1_800_000_000)
        for i in 0..<(ClusterEvent.retained + 5) {
            try await store.appendEvent(ClusterEvent(time: start.addingTimeInterval(Double(i)), kind: .replicaOutOfSync,
                                                     volumeID: "vol-e", nodeID: "node-\(i)", message: "event \(i)"))
        }
        events = try await store.recentEvents(limit: 3)
        XCTAssertEqual(events.map(\.message), ["event \(ClusterEvent.retained + 2)", "event \(ClusterEvent.retained + 3)",
                                               "event \(ClusterEvent.retained + 4)"])
        XCTAssertEqual(events.last?.time, start.addingTimeInterval(Double(ClusterEvent.retained + 4)))
        let all = try await store.recentEvents(limit: 1000)
        XCTAssertEqual(all.count, ClusterEvent.retained, "the log is bounded")
        XCTAssertEqual(all.first?.message, "event 5", "the oldest went first")
    }

    static func replicaDeletionsAreRecordedListedAndRemovedOnlyAsRead(_ store: any MetadataStore) async throws {
        let a2 = ReplicaDeletion(nodeID: "node-a", volumeID: "vol-2", reason: "volume vol-2 deleted", recordedAt: when)
        let a1 = ReplicaDeletion(nodeID: "node-a", volumeID: "vol-1", reason: "replaced", recordedAt: when)
        let b1 = ReplicaDeletion(nodeID: "node-b", volumeID: "vol-1", reason: "replaced", recordedAt: when)
        try await store.recordReplicaDeletions([a2, b1, a1])
        var onA = try await store.replicaDeletions(nodeID: "node-a")
        XCTAssertEqual(onA, [a1, a2])
        var all = try await store.replicaDeletions(nodeID: nil)
        XCTAssertEqual(all, [a1, a2, b1])
        let none = try await store.replicaDeletions(nodeID: "node")  // a prefix of node ids, not a node
        XCTAssertEqual(none, [])

        // Recording again replaces; a removal conditional on the older recording leaves the newer.
        let a1Again = ReplicaDeletion(nodeID: "node-a", volumeID: "vol-1", reason: "replaced again", recordedAt: when)
        try await store.recordReplicaDeletions([a1Again])
        try await store.removeReplicaDeletion(nodeID: "node-a", volumeID: "vol-1", token: a1.token)
        onA = try await store.replicaDeletions(nodeID: "node-a")
        XCTAssertEqual(onA, [a1Again, a2])
        try await store.removeReplicaDeletion(nodeID: "node-a", volumeID: "vol-1", token: a1Again.token)
        try await store.removeReplicaDeletion(nodeID: "node-b", volumeID: "vol-1", token: nil)
        try await store.removeReplicaDeletion(nodeID: "node-c", volumeID: "vol-9", token: "absent")  // no error
        try await store.removeReplicaDeletion(nodeID: "node-c", volumeID: "vol-9", token: nil)
        all = try await store.replicaDeletions(nodeID: nil)
        XCTAssertEqual(all, [a2])
    }

    static func deletingAVolumeRecordsItsReplicasDeletionsInTheSameStep(_ store: any MetadataStore) async throws {
        let replicas = [ReplicaRecord(nodeID: "node-a", address: "10.0.0.1:7000"), ReplicaRecord(nodeID: "node-b", address: "10.0.0.2:7000")]
        try await store.createVolume(volume("vol-d", replicas: replicas))
        let pending = replicas.map { ReplicaDeletion(nodeID: $0.nodeID, volumeID: "vol-d", reason: "volume vol-d deleted", recordedAt: when) }
        try await store.deleteVolume(id: "vol-d", recordingReplicaDeletions: pending)
        let gone = try await store.volume(id: "vol-d")
        XCTAssertNil(gone)
        let all = try await store.replicaDeletions(nodeID: nil)
        XCTAssertEqual(all, pending)
        // The plain deletion records none, and an absent volume is no error either way.
        try await store.deleteVolume(id: "vol-d")
        try await store.deleteVolume(id: "vol-absent", recordingReplicaDeletions: [])
        let still = try await store.replicaDeletions(nodeID: nil)
        XCTAssertEqual(still, pending)
    }

    static func registeredNodesAreLive(_ store: any MetadataStore) async throws {
        let b = NodeRecord(id: "node-b", topology: ["zone": "2"], maxVolumes: 0, registeredAt: when)
        let a = NodeRecord(id: "node-a", topology: ["zone": "1"], maxVolumes: 8, registeredAt: when,
                           dataAddress: "10.0.0.1:7000", capacityBytes: 1 << 40)
        try await store.registerNode(b)
        try await store.registerNode(a)
        let live = try await store.liveNodes()
        XCTAssertEqual(live, [a, b])
        let one = try await store.node(id: "node-a")
        XCTAssertEqual(one, a)
        let none = try await store.node(id: "node-z")
        XCTAssertNil(none)
    }
}
