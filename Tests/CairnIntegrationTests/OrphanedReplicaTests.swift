import CSIProto
import CairnCore
import Foundation
import XCTest

/// Orphaned replicas (docs/recovery.md) on the test bed: a replica whose node was away during
/// DeleteVolume is removed by that node when it returns, and the pending deletion with it; a
/// replica the store lists in a live volume is never removed, whatever is pending.
///
/// Run beside other engineers' beds with their own names, e.g.
/// `CAIRN_TESTBED_PREFIX=ctbo CAIRN_TESTBED_DIR=/run/cairn-testbed-orphans swift test --filter OrphanedReplicaTests`.
final class OrphanedReplicaTests: XCTestCase {
    var bed: Testbed!

    override func tearDown() async throws {
        if let problem = bed?.down(after: testRun) { XCTFail(problem) }
        bed = nil
    }

    func testAReplicaLeftOnANodeAwayDuringDeleteVolumeIsRemovedWhenItReturns() async throws {
        bed = try Testbed.up(nodes: 3)
        let volumeID = try await createVolume("orphan")
        for node in bed.nodes { XCTAssertTrue(replicaExists(volumeID, on: node), "no replica on \(node)") }

        try bed.kill("n3")
        _ = try await bed.controller.deleteVolume(CSI.delete(volumeID))
        XCTAssertFalse(replicaExists(volumeID, on: "n1"))
        XCTAssertFalse(replicaExists(volumeID, on: "n2"))
        XCTAssertTrue(replicaExists(volumeID, on: "n3"), "n3 was away: its replica cannot have gone yet")
        XCTAssertEqual(try pendingDeletions(on: "n3"), [volumeID])
        XCTAssertEqual(try pendingDeletions(on: "n1"), [], "a replica deleted at once leaves nothing pending")

        try bed.restart("n3")
        let deadline = Date().addingTimeInterval(60)
        while try replicaExists(volumeID, on: "n3") || !pendingDeletions(on: "n3").isEmpty {
            guard Date() < deadline else {
                throw FixtureError("n3's orphaned replica is still there 60 s after it returned (pending: \(try pendingDeletions(on: "n3")))")
            }
            try await Task.sleep(for: .milliseconds(250))
        }
        let log = try String(contentsOfFile: bed.logPath(bed.engineProcess("n3")), encoding: .utf8)
        XCTAssertTrue(log.contains("orphaned replica removed") && log.contains(volumeID), "n3 does not log the removal")
    }

    func testAReplicaOfALiveVolumeIsNeverRemoved() async throws {
        bed = try Testbed.up(nodes: 3)
        let volumeID = try await createVolume("live")
        // A deletion recorded for a replica the volume still lists (a re-replication that died
        // before it committed): n3 must keep the replica and drop the pending deletion.
        try bed.kill("n3")
        try putPendingDeletion(volumeID, on: "n3")
        try bed.restart("n3")
        let deadline = Date().addingTimeInterval(60)
        while try !pendingDeletions(on: "n3").isEmpty {
            guard Date() < deadline else { throw FixtureError("n3 did not settle its pending deletion in 60 s") }
            try await Task.sleep(for: .milliseconds(250))
        }
        XCTAssertTrue(replicaExists(volumeID, on: "n3"), "n3 removed a replica of a live volume")
        let got = try await bed.controller.controllerGetVolume(CSI.getVolume(volumeID))
        XCTAssertEqual(got.volume.volumeID, volumeID)
        let log = try String(contentsOfFile: bed.logPath(bed.engineProcess("n3")), encoding: .utf8)
        XCTAssertTrue(log.contains("kept a replica whose deletion was pending"), "n3 does not say it kept the replica")
        XCTAssertFalse(log.contains("orphaned replica removed"))
        _ = try await bed.controller.deleteVolume(CSI.delete(volumeID))
        for node in bed.nodes { XCTAssertFalse(replicaExists(volumeID, on: node), "\(node) keeps a replica of a deleted volume") }
    }

    // MARK: Helpers

    private func createVolume(_ name: String) async throws -> String {
        let response = try await bed.controller.createVolume(
            CSI.create(name: name, access: .block, required: 32 << 20, parameters: ["replicas": "3"]))
        return response.volume.volumeID
    }

    private func replicaExists(_ volumeID: String, on node: String) -> Bool {
        FileManager.default.fileExists(atPath: "\(bed.stateDir)/\(node)/replicas/\(volumeID)")
    }

    /// The volumes with a pending replica deletion for `node`, read from etcd's JSON gateway.
    private func pendingDeletions(on node: String) throws -> [String] {
        let prefix = "/cairn/replica-deletions/\(node)/"
        let end = "/cairn/replica-deletions/\(node)0"  // "/" + 1
        let body = try etcd("range", ["key": base64(prefix), "range_end": base64(end)])
        let kvs = body["kvs"] as? [[String: Any]] ?? []
        return kvs.compactMap { kv in
            (kv["key"] as? String).flatMap { Data(base64Encoded: $0) }.map { String(decoding: $0, as: UTF8.self).dropFirst(prefix.count) }
                .map(String.init)
        }
    }

    private func putPendingDeletion(_ volumeID: String, on node: String) throws {
        let record: [String: Any] = ["nodeID": node, "volumeID": volumeID, "reason": "planted by the test",
                                     "recordedAt": Int64(Date().timeIntervalSince1970 * 1000), "token": UUID().uuidString]
        let value = try JSONSerialization.data(withJSONObject: record, options: .sortedKeys)
        _ = try etcd("put", ["key": base64("/cairn/replica-deletions/\(node)/\(volumeID)"), "value": value.base64EncodedString()])
    }

    private func etcd(_ op: String, _ request: [String: String]) throws -> [String: Any] {
        let json = String(decoding: try JSONSerialization.data(withJSONObject: request), as: UTF8.self)
        let output = try bed.exec("ctl", ["curl", "-fsS", "--max-time", "5"] + bed.etcdCurlArguments + ["-X", "POST", "-d", json,
                                          "\(bed.etcdEndpoint)/v3/kv/\(op)"])
        guard let start = output.firstIndex(of: "{"),
              let body = try JSONSerialization.jsonObject(with: Data(output[start...].utf8)) as? [String: Any] else {
            throw FixtureError("etcd's answer to \(op) is not JSON: \(output)")
        }
        return body
    }

    private func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }
}
