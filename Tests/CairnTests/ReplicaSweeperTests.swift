import CairnCluster
import CairnCore
import CairnReplica
import CairnStore
import Foundation
import Logging
import XCTest

/// The node side of orphaned replicas against a real replica server and the SQLite store: a
/// pending deletion removes the replica and then itself; a replica the store lists in a live
/// volume is never removed.
final class ReplicaSweeperTests: XCTestCase {
    var dir = ""
    var store: SQLiteStore!
    var server: ReplicaServer!
    var sweeper: ReplicaSweeper!
    let logger = Logger(label: "test")

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-sweeper-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        server = try ReplicaServer(dataDir: dir, host: "127.0.0.1", port: 0, logger: logger)
        try server.start()
        sweeper = ReplicaSweeper(nodeID: "n3", store: store, dataDir: dir, address: "127.0.0.1:\(server.boundPort)", logger: logger)
    }

    override func tearDown() async throws {
        server?.stop()
        server = nil
        store = nil
        try? FileManager.default.removeItem(atPath: dir)
    }

    private func makeReplica(_ volumeID: String) throws {
        let client = try ReplicaClient(host: "127.0.0.1", port: server.boundPort)
        defer { client.close() }
        try client.create(volumeID: volumeID, sizeBytes: 16 << 20)
        XCTAssertTrue(exists(volumeID))
    }

    private func exists(_ volumeID: String) -> Bool {
        FileManager.default.fileExists(atPath: "\(dir)/replicas/\(volumeID)")
    }

    private func volume(_ id: String, on nodes: [String]) -> VolumeRecord {
        VolumeRecord(id: id, name: "pvc-\(id)", capacityBytes: 16 << 20, parameters: [:], fsType: "", accessModes: [7],
                     accessibleTopology: [:], replicas: nodes.map { ReplicaRecord(nodeID: $0, address: "10.0.0.1:7410") })
    }

    func testAPendingDeletionRemovesTheReplicaThenItself() async throws {
        try makeReplica("vol-gone")
        try await store.recordReplicaDeletions([
            ReplicaDeletion(nodeID: "n3", volumeID: "vol-gone", reason: "volume vol-gone deleted"),
            ReplicaDeletion(nodeID: "n3", volumeID: "vol-never-here", reason: "volume vol-never-here deleted"),
            ReplicaDeletion(nodeID: "n1", volumeID: "vol-other", reason: "another node's"),
        ])
        let outcome = try await sweeper.sweep()
        XCTAssertEqual(outcome, [.deleted(volumeID: "vol-gone"), .deleted(volumeID: "vol-never-here")])
        XCTAssertFalse(exists("vol-gone"))
        let left = try await store.replicaDeletions(nodeID: nil)
        XCTAssertEqual(left.map(\.nodeID), ["n1"], "only the other node's pending deletion stays")
        let again = try await sweeper.sweep()
        XCTAssertEqual(again, [])
    }

    func testAReplicaTheStoreListsInALiveVolumeIsKept() async throws {
        try makeReplica("vol-live")
        try makeReplica("vol-replaced")
        try await store.createVolume(volume("vol-live", on: ["n1", "n2", "n3"]))
        // Re-replication moved this one away from n3: the volume lives, without n3's replica.
        try await store.createVolume(volume("vol-replaced", on: ["n1", "n2", "n4"]))
        try await store.recordReplicaDeletions([
            ReplicaDeletion(nodeID: "n3", volumeID: "vol-live", reason: "a re-replication that never committed"),
            ReplicaDeletion(nodeID: "n3", volumeID: "vol-replaced", reason: "replaced by a new replica on n4"),
        ])
        let outcome = try await sweeper.sweep()
        XCTAssertEqual(outcome, [.kept(volumeID: "vol-live"), .deleted(volumeID: "vol-replaced")])
        XCTAssertTrue(exists("vol-live"), "a replica of a live volume was removed")
        XCTAssertFalse(exists("vol-replaced"))
        let left = try await store.replicaDeletions(nodeID: "n3")
        XCTAssertEqual(left, [])
    }

    func testADeletionThatFailsStaysPending() async throws {
        server.stop()  // the node's replica server is not answering
        try await store.recordReplicaDeletions([ReplicaDeletion(nodeID: "n3", volumeID: "vol-gone", reason: "volume vol-gone deleted")])
        let outcome = try await sweeper.sweep()
        XCTAssertEqual(outcome, [])
        let left = try await store.replicaDeletions(nodeID: "n3")
        XCTAssertEqual(left.map(\.volumeID), ["vol-gone"])
    }
}
