import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

/// Issue 17's metrics on the test bed: every role serves `--metrics-address`; fio's IOPS agree
/// with the engine's counters; a killed replica node shows in the controller's in-sync gauge and
/// its return after the resync.
final class ClusterMetricsTests: XCTestCase {
    var bed: Testbed!

    /// Ports: the controller in the ctl namespace; each node's CSI node process and its agent
    /// (which runs the engines and the replica server) share the node's namespace.
    static let controllerPort = 9420, nodePort = 9421, agentPort = 9422

    override func setUp() async throws {
        bed = try Testbed.up(nodes: 3,
                             nodeArgs: ["--metrics-address", "0.0.0.0:\(Self.nodePort)"],
                             agentArgs: ["--metrics-address", "0.0.0.0:\(Self.agentPort)"],
                             controllerArgs: ["--metrics-address", "127.0.0.1:\(Self.controllerPort)"])
    }

    override func tearDown() async throws {
        if let bed { _ = bed.down(after: testRun) }
        bed = nil
    }

    /// GET `path` from a bed process's metrics listener, from inside its network namespace.
    func scrape(_ namespace: String, port: Int, _ path: String = "/metrics") throws -> String {
        try bed.exec(namespace, ["curl", "-sS", "--fail", "--max-time", "5", "http://127.0.0.1:\(port)\(path)"])
    }

    /// The engine-running process of `node`: its agent, or the node's one process.
    func enginePort() -> Int { bed.isSplit ? Self.agentPort : Self.nodePort }

    func controllerMetrics() throws -> String { try scrape("ctl", port: Self.controllerPort) }

    /// The value of the sample `series` (name with its labels exactly as exposed); nil if absent.
    func value(_ text: String, _ series: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// Polls the controller until `series` has `expected`, or fails after `seconds`.
    func waitForController(_ series: String, toBe expected: Double, seconds: Int, _ why: String) async throws {
        let deadline = ContinuousClock.now + .seconds(seconds)
        var last: Double?
        while ContinuousClock.now < deadline {
            last = value(try controllerMetrics(), series)
            if last == expected { return }
            try await Task.sleep(for: .seconds(1))
        }
        XCTFail("\(why): \(series) is \(last.map { "\($0)" } ?? "absent"), expected \(expected) within \(seconds) s")
    }

    struct FioRun {
        let iops: Double
        let ios: Double
        let seconds: Double
    }

    /// fio on the raw block device: 4 KiB random `rw` (randwrite or randread), direct I/O, QD 4
    /// through libaio, for `seconds`.
    func fio(_ rw: String, on device: String, seconds: Int) throws -> FioRun {
        let result = try Command.runBlocking([
            "fio", "--name=metrics", "--filename=\(device)", "--rw=\(rw)", "--bs=4k", "--size=128M", "--direct=1",
            "--ioengine=libaio", "--iodepth=4", "--numjobs=1", "--runtime=\(seconds)", "--time_based",
            "--output-format=json",
        ], timeout: .seconds(seconds + 60))
        XCTAssertEqual(result.status, 0, "fio \(rw) failed: \(result.output)")
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Fio.jsonPart(Data(result.stdout.utf8))) as? [String: Any])
        let job = try XCTUnwrap((json["jobs"] as? [[String: Any]])?.first, "fio printed no job: \(result.stdout)")
        let side = try XCTUnwrap(job[rw == "randwrite" ? "write" : "read"] as? [String: Any])
        let ios = try XCTUnwrap((side["total_ios"] as? NSNumber)?.doubleValue)
        let runtime = try XCTUnwrap((side["runtime"] as? NSNumber)?.doubleValue) / 1000
        let iops = try XCTUnwrap((side["iops"] as? NSNumber)?.doubleValue)
        return FioRun(iops: iops, ios: ios, seconds: runtime)
    }

    func testEveryRoleServesMetricsAndTheyFollowIOAndAKilledReplica() async throws {
        // Every role answers: the controller, each node's CSI node and its agent.
        XCTAssertEqual(try scrape("ctl", port: Self.controllerPort, "/healthz").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
        for node in bed.nodes {
            let engineSide = try scrape(node, port: enginePort())
            XCTAssertTrue(engineSide.contains("cairn_store_transaction_seconds_count{store=\"etcd\""), engineSide)
            if bed.isSplit {
                XCTAssertEqual(try scrape(node, port: Self.nodePort, "/healthz").trimmingCharacters(in: .whitespacesAndNewlines), "ok")
            }
        }

        // A 3-replica block volume attached on n1; the CSI calls show on the controller and the node.
        let bytes: Int64 = 256 << 20
        let volumeID = try await bed.controller.createVolume(
            CSI.create(name: "metrics", access: .block, required: bytes, parameters: ["replicas": "3"])).volume.volumeID
        let attached = try await bed.attachBlock(volumeID, on: "n1")
        let controllerText = try controllerMetrics()
        XCTAssertNotNil(value(controllerText, #"cairn_csi_operations_seconds_count{method="/csi.v1.Controller/CreateVolume",grpc_status_code="OK"}"#),
                        controllerText)
        let nodeText = try scrape("n1", port: Self.nodePort)
        XCTAssertNotNil(value(nodeText, #"cairn_csi_operations_seconds_count{method="/csi.v1.Node/NodeStageVolume",grpc_status_code="OK"}"#),
                        nodeText)
        try await waitForController(#"cairn_volume_replicas_in_sync{volume="\#(volumeID)"}"#, toBe: 3, seconds: 30,
                                    "a new volume's replicas are all in sync")
        XCTAssertEqual(value(try controllerMetrics(), #"cairn_volume_replicas{volume="\#(volumeID)"}"#), 3)
        XCTAssertEqual(value(try controllerMetrics(), #"cairn_node_up{node="n3"}"#), 1)

        // fio's IOPS against the engine's counters, for writes then reads.
        let label = #"{volume="\#(volumeID)"}"#
        for (rw, op) in [("randwrite", "write"), ("randread", "read")] {
            let before = try scrape("n1", port: enginePort())
            let run = try fio(rw, on: attached.target, seconds: 8)
            let after = try scrape("n1", port: enginePort())
            let ops = try XCTUnwrap(value(after, "cairn_volume_\(op)_ops_total\(label)"), after)
                - (value(before, "cairn_volume_\(op)_ops_total\(label)") ?? 0)
            let samples = try XCTUnwrap(value(after, "cairn_volume_\(op)_latency_seconds_count\(label)"), after)
                - (value(before, "cairn_volume_\(op)_latency_seconds_count\(label)") ?? 0)
            let counted = ops / run.seconds
            print("metrics \(rw): fio \(String(format: "%.0f", run.iops)) IOPS (\(Int(run.ios)) I/Os in \(run.seconds) s), engine counter \(String(format: "%.0f", counted)) IOPS (\(Int(ops)) ops), latency samples \(Int(samples))")
            XCTAssertGreaterThan(run.iops, 50, "fio \(rw) barely ran")
            XCTAssertEqual(counted, run.iops, accuracy: run.iops * 0.10, "\(rw): the engine's IOPS disagree with fio's by more than 10%")
            XCTAssertEqual(samples, ops, accuracy: ops * 0.01 + 1, "\(rw): every counted I/O has a latency sample")
            let bytesCounted = try XCTUnwrap(value(after, "cairn_volume_\(op)_bytes_total\(label)"))
                - (value(before, "cairn_volume_\(op)_bytes_total\(label)") ?? 0)
            XCTAssertEqual(bytesCounted, ops * 4096, accuracy: ops * 4096 * 0.01, "\(rw): 4 KiB per I/O")
        }
        // The other nodes' replica servers took the writes.
        let n2 = try scrape("n2", port: enginePort())
        XCTAssertGreaterThan(value(n2, #"cairn_replica_request_duration_seconds_count{op="write"}"#) ?? 0, 1000, n2)

        // n3 dies: the next writes record its replica out of sync; the controller's gauges show it.
        try bed.kill("n3")
        _ = try fio("randwrite", on: attached.target, seconds: 3)
        try await waitForController(#"cairn_volume_replicas_in_sync{volume="\#(volumeID)"}"#, toBe: 2, seconds: 60,
                                    "the killed node's replica left the in-sync set")
        XCTAssertEqual(value(try controllerMetrics(), #"cairn_replica_in_sync{volume="\#(volumeID)",node="n3"}"#), 0)
        try await waitForController(#"cairn_node_up{node="n3"}"#, toBe: 0, seconds: 60, "the killed node's lease expired")

        // n3 returns: the engine resyncs its replica, the gauge goes back to 3.
        let resyncedBefore = value(try scrape("n1", port: enginePort()), "cairn_volume_resync_bytes_total\(label)") ?? 0
        try bed.restart("n3")
        try await waitForController(#"cairn_volume_replicas_in_sync{volume="\#(volumeID)"}"#, toBe: 3, seconds: 180,
                                    "the returned node's replica was resynced")
        XCTAssertEqual(value(try controllerMetrics(), #"cairn_volume_resync_progress_ratio{volume="\#(volumeID)"}"#), 1)
        let resyncedAfter = value(try scrape("n1", port: enginePort()), "cairn_volume_resync_bytes_total\(label)") ?? 0
        XCTAssertGreaterThan(resyncedAfter, resyncedBefore, "the resync copied the blocks n3 missed")

        // Unstaged: the engine's series go with it.
        try await bed.detach(volumeID, attached)
        let unstaged = try scrape("n1", port: enginePort())
        XCTAssertFalse(unstaged.contains(volumeID), "an unstaged volume's series stay on the node:\n\(unstaged)")
        _ = try await bed.controller.deleteVolume(CSI.delete(volumeID))
        // Deleted: the controller drops the volume's gauges at its next refresh (every 5 s).
        let deadline = ContinuousClock.now + .seconds(30)
        while try controllerMetrics().contains(volumeID) && ContinuousClock.now < deadline {
            try await Task.sleep(for: .seconds(1))
        }
        XCTAssertFalse(try controllerMetrics().contains(volumeID), "a deleted volume's gauges stay on the controller")
    }
}
