@testable import CairnController
import CairnCore
import CairnStore
import Foundation
import Logging
import Synchronization
import XCTest

/// Re-replication decisions against the real embedded store; the data protocol is a fake
/// backing that records which replicas it was asked to create and delete.
final class ReplicaRepairerTests: XCTestCase {
    final class RecordingBacking: VolumeBacking {
        let created = Mutex<[String]>([])
        let deleted = Mutex<[String]>([])
        let failDelete = true
        func create(_ volume: VolumeRecord) async throws {}
        func delete(_ volume: VolumeRecord) async throws {}
        func file(volumeID: String) throws -> String { "/nonexistent/\(volumeID)" }
        func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) async throws -> String { "" }
        func deactivate(volumeID: String) async throws {}
        func problem(_ volume: VolumeRecord) -> String? { nil }
        func healthy(_ volume: VolumeRecord) -> String { "healthy" }
        func createReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
            created.withLock { $0.append(replica.nodeID) }
        }
        func deleteReplica(_ volume: VolumeRecord, replica: ReplicaRecord) async throws {
            deleted.withLock { $0.append(replica.nodeID) }
            throw CairnError.unavailable("node \(replica.nodeID) is gone")
        }
        func takeSnapshot(_ snapshot: SnapshotRecord, of volume: VolumeRecord, in use: VolumeUse) async throws -> [String]? { nil }
        func deleteSnapshot(_ snapshot: SnapshotRecord, source: VolumeRecord?) async throws {}
        func takeGroupSnapshot(_ members: [GroupSnapshotMember]) async throws -> [[String]?] { members.map { _ in nil } }
        func createFromSnapshot(_ volume: VolumeRecord, snapshot: SnapshotRecord, source: VolumeRecord?) async throws {}
        func expand(_ volume: VolumeRecord) async throws {}
    }

    var dir = ""
    var store: SQLiteStore!
    var backing: RecordingBacking!
    var repairer: ReplicaRepairer!
    let logger = Logger(label: "test")

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-repair-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        for (i, zone) in ["a", "b", "c", "a"].enumerated() {
            try await store.registerNode(NodeRecord(id: "n\(i + 1)", topology: ["topology.cairn.dev/zone": zone], maxVolumes: 0,
                                                    dataAddress: "10.0.0.\(i + 1):7410", capacityBytes: 10 << 30))
        }
        backing = RecordingBacking()
        let controller = ControllerService(
            store: store, backing: backing, capacity: CapacityPolicy(poolBytes: 1 << 40), localNodeID: "ctl",
            localTopology: [:], locks: VolumeLocks(), logger: logger, cluster: ClusterConfig(defaultReplicas: 3))
        repairer = ReplicaRepairer(controller: controller, timeout: .seconds(60), logger: logger)
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func volume(_ id: String, replicas: [String]) async throws {
        let records = replicas.map { ReplicaRecord(nodeID: $0, address: "10.0.0.\($0.dropFirst()):7410") }
        try await store.createVolume(VolumeRecord(id: id, name: id, capacityBytes: 1 << 30, parameters: [:], fsType: "",
                                                  accessModes: [7], accessibleTopology: [:], replicas: records))
        _ = try await store.attach(volumeID: id, nodeID: replicas[0], readonly: false, accessMode: 7, exclusive: true, nodeLimit: 0)
    }

    /// The status page's events: a removal and the re-replication it causes; a node that holds
    /// replicas going away and coming back (each said once).
    func testRemovalReplacementAndANodeAwayAndBackAreRecordedAsEvents() async throws {
        try await volume("vol-e", replicas: ["n1", "n2", "n3"])
        try await store.removeNode(id: "n3")
        _ = try await repairer.scan()
        try await waitForEvents([.nodeRemoved, .replicaOutOfSync, .replicaReplaced])
        let replaced = try await store.recentEvents(limit: 10).first { $0.kind == .replicaReplaced }
        XCTAssertEqual(replaced?.volumeID, "vol-e")
        XCTAssertEqual(replaced?.nodeID, "n4")
        XCTAssertTrue(replaced?.message.contains("in place of node n3") == true, replaced?.message ?? "")

        // n5 holds a replica but is not registered: away; then it registers: back.
        try await volume("vol-f", replicas: ["n1", "n2", "n5"])
        _ = try await repairer.scan()
        _ = try await repairer.scan()
        try await waitForEvents([.nodeRemoved, .replicaOutOfSync, .replicaReplaced, .nodeAway])
        try await store.registerNode(NodeRecord(id: "n5", topology: [:], maxVolumes: 0, dataAddress: "10.0.0.5:7410"))
        _ = try await repairer.scan()
        _ = try await repairer.scan()
        try await waitForEvents([.nodeRemoved, .replicaOutOfSync, .replicaReplaced, .nodeAway, .nodeBack])
    }

    /// Events are appended in the background (each on its own, so in any order): waits until
    /// the log holds `kinds`.
    func waitForEvents(_ kinds: [ClusterEvent.Kind]) async throws {
        var seen: [ClusterEvent.Kind] = []
        for _ in 0..<100 {
            seen = try await store.recentEvents(limit: 50).map(\.kind)
            if seen.map(\.rawValue).sorted() == kinds.map(\.rawValue).sorted() { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        XCTFail("events \(seen), expected \(kinds)")
    }

    func testARemovedNodesReplicaMovesToTheOnlyEligibleNodeEvenWhenItWasInSync() async throws {
        try await volume("vol-1", replicas: ["n1", "n2", "n3"])
        try await store.removeNode(id: "n3")
        let done = try await repairer.scan()
        XCTAssertEqual(done, [.init(volumeID: "vol-1", oldNodeID: "n3", newNodeID: "n4")])
        let record = try await store.volume(id: "vol-1")
        XCTAssertEqual(record?.replicas?.map(\.nodeID), ["n1", "n2", "n4"])
        XCTAssertEqual(record?.replicas?.map(\.inSync), [true, true, false])
        XCTAssertEqual(backing.created.withLock { $0 }, ["n4"])
        XCTAssertEqual(backing.deleted.withLock { $0 }, ["n3"], "the old replica is deleted when its node answers")
        // Nothing left to do.
        let again = try await repairer.scan()
        XCTAssertEqual(again, [])
    }

    func testAnAwayNodeIsReplacedOnlyAfterTheTimeout() async throws {
        let since = Date()
        var replica = ReplicaRecord(nodeID: "n4", address: "10.0.0.4:7410")
        XCTAssertNil(repairer.reason(replica, removed: [], live: ["n1"], now: since), "in sync, just gone: not yet")
        XCTAssertNil(repairer.reason(replica, removed: [], live: ["n1"], now: since.addingTimeInterval(59), awaySince: since))
        XCTAssertNotNil(repairer.reason(replica, removed: [], live: ["n1"], now: since.addingTimeInterval(61), awaySince: since),
                        "an in-sync replica on a node away longer than the timeout (an idle volume) is replaced too")
        replica.inSync = false
        replica.outOfSyncSince = since
        XCTAssertNil(repairer.reason(replica, removed: [], live: ["n4"], now: since.addingTimeInterval(3600)), "live: it resyncs")
        XCTAssertNil(repairer.reason(replica, removed: [], live: [], now: since.addingTimeInterval(59)))
        let why = repairer.reason(replica, removed: [], live: [], now: since.addingTimeInterval(61))
        XCTAssertTrue(why?.contains("longer than the replica timeout of 60 s") == true, why ?? "nil")
        // Replacing it spreads over zones: n1 (a) and n2 (b) stay, n3 (zone c) wins over n4's zone a.
        try await volume("vol-2", replicas: ["n1", "n2", "n4"])
        try await store.markReplicaOutOfSync(volumeID: "vol-2", nodeID: "n4", epoch: 1, reason: "write failed")
        let done = try await repairer.replace("vol-2", "n4", why: why!)
        XCTAssertEqual(done, .init(volumeID: "vol-2", oldNodeID: "n4", newNodeID: "n3"))
    }

    func testTheOldReplicasDeletionIsLeftToItsNodeAndANodeStillToDeleteOneGetsNoNewOne() async throws {
        try await volume("vol-5", replicas: ["n1", "n2", "n3"])
        // n4 still has to delete an old replica of vol-5: a new one there could go with it.
        try await store.recordReplicaDeletions([ReplicaDeletion(nodeID: "n4", volumeID: "vol-5", reason: "replaced earlier")])
        try await store.removeNode(id: "n3")
        var done = try await repairer.scan()
        XCTAssertEqual(done, [])
        XCTAssertEqual(backing.created.withLock { $0 }, [])

        try await store.removeReplicaDeletion(nodeID: "n4", volumeID: "vol-5", token: nil)
        done = try await repairer.scan()
        XCTAssertEqual(done, [.init(volumeID: "vol-5", oldNodeID: "n3", newNodeID: "n4")])
        // The fake backing cannot reach n3: its replica's deletion stays recorded for n3.
        let pending = try await store.replicaDeletions(nodeID: nil)
        XCTAssertEqual(pending.map(\.nodeID), ["n3"])
        XCTAssertTrue(pending.first?.reason.contains("replaced by a new replica on n4") == true, pending.first?.reason ?? "")
    }

    func testTheLastInSyncReplicaIsNeverReplaced() async throws {
        try await volume("vol-3", replicas: ["n1", "n2"])
        try await store.markReplicaOutOfSync(volumeID: "vol-3", nodeID: "n2", epoch: 1, reason: "down")
        try await store.removeNode(id: "n1")
        let done = try await repairer.scan()
        // n2 (out of sync, live) stays; n1 is removed but the only in-sync replica: kept.
        XCTAssertEqual(done, [])
        let record = try await store.volume(id: "vol-3")
        XCTAssertEqual(record?.replicas?.map(\.nodeID), ["n1", "n2"])
    }

    func testNoEligibleNodeLeavesTheRecordAlone() async throws {
        try await volume("vol-4", replicas: ["n1", "n2", "n3"])
        try await store.removeNode(id: "n4")
        try await store.removeNode(id: "n3")
        let done = try await repairer.scan()
        XCTAssertEqual(done, [])
        let record = try await store.volume(id: "vol-4")
        XCTAssertEqual(record?.replicas?.map(\.nodeID), ["n1", "n2", "n3"])
        XCTAssertEqual(record?.replicas?[2].inSync, false, "recorded out of sync, waiting for a node")
    }
}
