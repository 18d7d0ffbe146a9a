import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

/// Issue 15's attack: a process in a namespace on the bed's bridge (the controller's, a third
/// machine as far as the nodes go) that holds no valid certificate — or one of another cluster,
/// or a recording of a real session — tries hello, claim, read and write against every node's
/// data address (`Tests/intruder/replica-intruder.py`, no Cairn code). Every attempt must be
/// refused, each refusal logged with the intruder's address, and no replica may change: the
/// attached engine keeps serving.
final class DataPlaneAttackTests: XCTestCase {
    var bed: Testbed!
    var work = ""

    override func setUp() async throws {
        bed = try Testbed.up(nodes: 3)
        work = "/tmp/cairn-attack-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
    }

    override func tearDown() async throws {
        if let bed {
            if let run = testRun, run.failureCount + run.unexpectedExceptionCount > 0 {
                for name in bed.processNames { print("==> \(name).log\n" + bed.logTail(name, lines: 60)) }
            }
            bed.down()
        }
        bed = nil
        if !work.isEmpty { try? FileManager.default.removeItem(atPath: work) }
    }

    static var intruder: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("intruder/replica-intruder.py").path
    }

    /// Every JSON line the intruder printed, and its exit status.
    func intrude(_ arguments: [String]) throws -> (status: Int32, attempts: [[String: Any]]) {
        let result = try Command.runBlocking(["env", "PYTHONDONTWRITEBYTECODE=1", Testbed.script, "exec", "ctl",
                                              "python3", Self.intruder] + arguments, timeout: .seconds(120))
        let attempts = result.stdout.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
        return (result.status, attempts)
    }

    /// `cairn replica digest` of the volume on every node, as that node (its certificate).
    func digests(_ volume: String) throws -> [String: String] {
        var result: [String: String] = [:]
        for node in bed.nodes {
            guard let address = bed.dataAddress(node) else { continue }
            // "volume V replica at A: digest D over N blocks (M not zero) epoch E generation G": from "digest".
            let line = try bed.exec(node, [try PluginProcess.locateBinary(), "replica", "digest", volume, "--address", address])
            result[node] = line.range(of: "digest ").map { String(line[$0.lowerBound...]) }?
                .trimmingCharacters(in: .whitespacesAndNewlines) ?? line
        }
        return result
    }

    func refusals(in node: String) -> Int {
        let text = (try? String(contentsOfFile: bed.logPath(bed.engineProcess(node)), encoding: .utf8)) ?? ""
        return text.split(separator: "\n").filter { $0.contains("refused a replica connection") && $0.contains("10.77.0.1:") }.count
    }

    func testNobodyWithoutTheClustersCertificateReadsWritesOrFencesAReplica() async throws {
        let bytes: Int64 = 16 << 20
        let volume = try await bed.controller.createVolume(
            CSI.create(name: "attacked", access: .block, required: bytes, parameters: ["replicas": "3"])).volume.volumeID
        let attached = try await bed.attachBlock(volume, on: "n1")
        let block = BlockWriter.block(index: 0, sequence: 1)
        try BlockWriter.writeDirect(device: attached.target, index: 0, block: block)
        let before = try digests(volume)
        XCTAssertEqual(Set(before.values).count, 1, "the replicas differ before the attack: \(before)")

        // Another cluster's CA, and a certificate of it naming a node of this one.
        let cairn = try PluginProcess.locateBinary()
        _ = try Command.runBlocking([cairn, "ca", "init", "--dir", work + "/foreign-ca"], timeout: .seconds(30))
        _ = try Command.runBlocking([cairn, "cert", "issue", "n2", "--ca-dir", work + "/foreign-ca", "--out", work + "/foreign-n2"],
                                    timeout: .seconds(30))

        var attempts = 0
        for node in bed.nodes {
            guard let address = bed.dataAddress(node) else { XCTFail("no data address for \(node)"); continue }
            let before = refusals(in: node)
            var tries: [[String]] = [
                ["--as", "plain"],
                ["--as", "tls"],
                ["--as", "tls", "--cert", work + "/foreign-n2/tls.crt", "--key", work + "/foreign-n2/tls.key"],
            ]
            // A real session (the controller's `cairn replica digest`, relayed and recorded), replayed.
            let recording = work + "/session-\(node).bin"
            let relay = try BackgroundCommand(["env", "PYTHONDONTWRITEBYTECODE=1", Testbed.script, "exec", "ctl", "python3", Self.intruder,
                                               "--record", recording, "--listen", "7499", "--upstream", address])
            defer { relay.stop() }
            try await Task.sleep(for: .milliseconds(500))
            _ = try bed.exec("ctl", ["env", "CAIRN_TLS_DIR=\(bed.stateDir)/pki/controller", cairn, "replica", "digest", volume,
                                     "--address", "10.77.0.1:7499"])
            _ = relay.wait()  // the relay ends when both sides have closed: the recording is whole
            tries.append(["--as", "replay", "--replay", recording])
            for extra in tries {
                let (status, results) = try intrude(["--address", address, "--volume", volume] + extra)
                XCTAssertEqual(status, 0, "an attempt on \(node) as \(extra) was not refused: \(results)")
                XCTAssertFalse(results.isEmpty, "the intruder printed nothing for \(extra)")
                for r in results {
                    XCTAssertEqual(r["result"] as? String, "refused", "\(node) \(extra): \(r)")
                }
                attempts += results.count
            }
            // Every connection the intruder made is in the node's log with its address.
            let deadline = Date().addingTimeInterval(5)
            while refusals(in: node) - before < 4 * 3 + 1, Date() < deadline { try await Task.sleep(for: .milliseconds(100)) }
            XCTAssertGreaterThanOrEqual(refusals(in: node) - before, 4 * 3 + 1, "refusals logged by \(node) with the intruder's address")
        }
        XCTAssertGreaterThanOrEqual(attempts, 3 * 13)

        // Nothing changed on any replica, and the attached engine was not fenced.
        XCTAssertEqual(try digests(volume), before, "a replica changed")
        XCTAssertEqual(try BlockWriter.readDirect(device: attached.target, index: 0), block)
        let next = BlockWriter.block(index: 1, sequence: 2)
        try BlockWriter.writeDirect(device: attached.target, index: 1, block: next)
        XCTAssertEqual(try BlockWriter.readDirect(device: attached.target, index: 1), next)
        try await bed.detach(volume, attached)
    }
}
