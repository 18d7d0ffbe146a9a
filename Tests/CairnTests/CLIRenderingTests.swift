import CairnCLI
import CairnCore
import CairnStore
import Foundation
import Logging
import XCTest

/// What the operator commands print: tables, units, progress bars, the watch's rate and ETA,
/// the JSON documents (read back), the doctor's lines.
final class CLIRenderingTests: XCTestCase {
    let t0 = Date(timeIntervalSince1970: 1_800_000_000)

    // MARK: Table

    func testATableSizesColumnsToTheirWidestCellAndAlignsNumbersRight() {
        var table = Table([.init("NODE"), .init("SIZE", .right), .init("REASON")])
        table.append(["n1", "1.0 GiB", ""])
        table.append(["node-long", "12 B", "away"])
        XCTAssertEqual(table.render(), """
            NODE          SIZE  REASON
            n1         1.0 GiB
            node-long     12 B  away

            """)
        XCTAssertFalse(table.render().split(separator: "\n").contains { $0.hasSuffix(" ") }, "trailing blanks")
    }

    func testAnEmptyTableIsItsHeader() {
        XCTAssertEqual(Table([.init("A"), .init("BB", .right)]).render(), "A  BB\n")
    }

    func testFieldsAlignTheirValues() {
        XCTAssertEqual(Table.fields([("size", "1.0 GiB"), ("condition", "healthy")]), "size:      1.0 GiB\ncondition: healthy\n")
    }

    // MARK: Units

    func testBytesUseBinaryUnitsWithOneDecimal() {
        XCTAssertEqual(Units.bytes(0), "0 B")
        XCTAssertEqual(Units.bytes(1023), "1023 B")
        XCTAssertEqual(Units.bytes(1024), "1.0 KiB")
        XCTAssertEqual(Units.bytes(1 << 30), "1.0 GiB")
        XCTAssertEqual(Units.bytes(1536 << 20), "1.5 GiB")
        XCTAssertEqual(Units.bytes(5 << 40), "5.0 TiB")
    }

    func testRatesAreBytesPerSecondAndNothingMovingIsZero() {
        XCTAssertEqual(Units.rate(20 * 1024 * 1024), "20.0 MiB/s")
        XCTAssertEqual(Units.rate(512), "512 B/s")
        XCTAssertEqual(Units.rate(0), "0 B/s")
        XCTAssertEqual(Units.rate(-3), "0 B/s")
        XCTAssertEqual(Units.rate(.nan), "0 B/s")
    }

    func testDurationsShowTheTwoLargestUnits() {
        XCTAssertEqual(Units.duration(0), "0s")
        XCTAssertEqual(Units.duration(44.6), "45s")
        XCTAssertEqual(Units.duration(125), "2m05s")
        XCTAssertEqual(Units.duration(3720), "1h02m")
        XCTAssertEqual(Units.duration(3 * 86400 + 4 * 3600 + 59), "3d04h")
        XCTAssertEqual(Units.duration(-5), "0s")
        XCTAssertEqual(Units.duration(.infinity), "-")
        XCTAssertEqual(Units.age(of: t0, now: t0.addingTimeInterval(90)), "1m30s")
        XCTAssertEqual(Units.age(of: t0.addingTimeInterval(10), now: t0), "0s", "a clock ahead is not a negative age")
        XCTAssertEqual(Units.percent(42.46), "42.5%")
        XCTAssertEqual(Units.percent(130), "100.0%")
    }

    // MARK: Progress bar

    func testAProgressBarFillsInProportionAndIsFullOnlyAtTheEnd() {
        XCTAssertEqual(ProgressBar.render(fraction: 0, width: 12), "[          ]")
        XCTAssertEqual(ProgressBar.render(fraction: 0.5, width: 12), "[=====>    ]")
        XCTAssertEqual(ProgressBar.render(fraction: 0.99, width: 12), "[=========>]")
        XCTAssertEqual(ProgressBar.render(fraction: 1, width: 12), "[==========]")
        XCTAssertEqual(ProgressBar.render(fraction: 0.01, width: 12), "[>         ]", "a started copy shows its head")
        XCTAssertEqual(ProgressBar.render(fraction: 7, width: 12), "[==========]")
        XCTAssertEqual(ProgressBar.render(fraction: -1, width: 12), "[          ]")
        for f in stride(from: 0.0, through: 1.0, by: 0.05) {
            XCTAssertEqual(ProgressBar.render(fraction: f, width: 32).count, 32, "width at \(f)")
        }
    }

    // MARK: Condition

    func testAVolumesConditionFollowsItsReplicas() {
        var v = volume(replicas: [replica("n1"), replica("n2"), replica("n3")])
        XCTAssertEqual(VolumeHealth(v, at: t0).state, .healthy)
        v.replicas![2].inSync = false
        XCTAssertEqual(VolumeHealth(v, at: t0).state, .degraded, "out of sync, nothing copying")
        XCTAssertTrue(VolumeHealth(v, at: t0).message.contains("n3"), VolumeHealth(v, at: t0).message)
        v.replicas![2].resync = progress(done: 10, total: 100, phase: "copy")
        XCTAssertEqual(VolumeHealth(v, at: t0).state, .resyncing)
        v.replicas![2].resync?.phase = "waiting: connection refused"
        XCTAssertEqual(VolumeHealth(v, at: t0).state, .degraded, "a resync waiting to retry is not progress")
        v.parameters["minInSync"] = "3"
        XCTAssertEqual(VolumeHealth(v, at: t0).state, .faulted, "fewer in sync than minInSync refuses writes")
        v.replicas = v.replicas!.map { var r = $0; r.inSync = false; return r }
        XCTAssertEqual(VolumeHealth(v, at: t0).state, .faulted)
        XCTAssertEqual(VolumeHealth(volume(replicas: nil), at: t0).state, .healthy, "a local file")
    }

    // MARK: Watch

    func testTheWatchMeasuresTheRateBetweenRecordedProgressAndShowsAFullBarWhenBackInSync() {
        var watcher = VolumeWatcher()
        var v = volume(replicas: [replica("n1"), replica("n2", inSync: false)])
        v.replicas![1].resync = progress(done: 0, total: 400 << 20, bytesPerSecond: 7, at: t0)
        var s = watcher.sample(v, at: t0)
        XCTAssertEqual(s.replicas[1].bytesPerSecond, 7, "the engine's figure until two records")
        XCTAssertFalse(s.allInSync)
        XCTAssertFalse(s.replicas[0].tracked, "an in-sync replica that never left has no bar")

        v.replicas![1].resync = progress(done: 100 << 20, total: 400 << 20, bytesPerSecond: 7, at: t0.addingTimeInterval(2))
        s = watcher.sample(v, at: t0.addingTimeInterval(2))
        XCTAssertEqual(s.replicas[1].bytesPerSecond ?? 0, Double(50 << 20), accuracy: 1)
        XCTAssertEqual(s.replicas[1].etaSeconds ?? 0, 6, accuracy: 0.01)
        XCTAssertEqual(s.replicas[1].percent, 25)

        // Sampled again before the engine records: the rate stays, it does not read as a stall.
        s = watcher.sample(v, at: t0.addingTimeInterval(3))
        XCTAssertEqual(s.replicas[1].bytesPerSecond ?? 0, Double(50 << 20), accuracy: 1)

        let line = WatchRendering.replicaLine(s.replicas[1], barWidth: 12)
        XCTAssertEqual(line, "[==>       ]  25.0%  100.0 MiB/400.0 MiB  50.0 MiB/s  ETA 6s  copy")

        v.replicas![1] = replica("n2")
        s = watcher.sample(v, at: t0.addingTimeInterval(4))
        XCTAssertTrue(s.allInSync)
        XCTAssertEqual(s.replicas[1].percent, 100)
        XCTAssertEqual(s.replicas[1].phase, "in sync")
        XCTAssertTrue(WatchRendering.replicaLine(s.replicas[1], barWidth: 12).hasPrefix("[==========]  100.0%"))
        XCTAssertTrue(WatchRendering.screen(s, interval: 1).contains { $0.contains("100.0%") })
        XCTAssertEqual(WatchRendering.plainLines(s).count, 1, "one line per tracked replica")

        var local = VolumeWatcher()
        let file = local.sample(volume(replicas: nil), at: t0)
        XCTAssertTrue(file.allInSync)
        XCTAssertTrue(WatchRendering.plainLines(file)[0].hasSuffix("vol-a healthy 1/1 in sync"), WatchRendering.plainLines(file)[0])
        XCTAssertTrue(WatchRendering.screen(file, interval: 1).contains("a local file on one machine: nothing to resync"))
    }

    func testAWatchSampleIsOneJSONLineThatReadsBack() throws {
        var watcher = VolumeWatcher()
        var v = volume(replicas: [replica("n1"), replica("n2", inSync: false)])
        v.replicas![1].resync = progress(done: 5, total: 10, at: t0)
        let sample = watcher.sample(v, at: t0)
        let line = try JSONOutput.encode(sample, pretty: false)
        XCTAssertFalse(line.contains("\n"))
        XCTAssertEqual(try JSONOutput.decoder().decode(WatchSample.self, from: Data(line.utf8)), sample)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        XCTAssertEqual(object["condition"] as? String, "resyncing")
        let replicas = try XCTUnwrap(object["replicas"] as? [[String: Any]])
        XCTAssertEqual(replicas[1]["percent"] as? Double, 50)
        XCTAssertEqual(replicas[1]["bytesTotal"] as? Int, 10)
    }

    // MARK: JSON documents

    func testTheInspectAndListDocumentsReadBackWithTheirFieldNames() throws {
        var v = volume(replicas: [replica("n1"), replica("n2", inSync: false)])
        v.replicas![1].resync = progress(done: 1 << 20, total: 4 << 20, at: t0)
        let attachment = AttachmentRecord(volumeID: v.id, nodeID: "n1", readonly: false, accessMode: 1, epoch: 3, createdAt: t0)
        let snapshots = [SnapshotRecord(id: "snap-1", name: "s1", sourceVolumeID: v.id, sizeBytes: v.capacityBytes, createdAt: t0,
                                        readyToUse: true, holders: ["n1"]),
                         SnapshotRecord(id: "snap-hidden", name: "h", sourceVolumeID: v.id, sizeBytes: 1, createdAt: t0, hidden: true)]
        let detail = VolumeDetail(v, attachments: [attachment], snapshots: snapshots)
        XCTAssertEqual(detail.snapshots.map(\.id), ["snap-1"], "a clone's hidden base snapshot is not shown")
        let text = try JSONOutput.encode(detail)
        XCTAssertEqual(try JSONOutput.decoder().decode(VolumeDetail.self, from: Data(text.utf8)), detail)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        for key in ["id", "name", "sizeBytes", "epoch", "accessModes", "condition", "replicas", "attachments", "snapshots", "createdAt"] {
            XCTAssertNotNil(object[key], "no \(key) in \(text)")
        }
        XCTAssertEqual((object["condition"] as? [String: Any])?["state"] as? String, "resyncing")
        XCTAssertEqual(((object["attachments"] as? [[String: Any]])?.first?["accessMode"]) as? String, "single-node-writer")
        XCTAssertEqual(((object["replicas"] as? [[String: Any]])?[1]["resync"] as? [String: Any])?["percent"] as? Double, 25)
        XCTAssertNil(object["encryption"], "a plain volume shows no encryption")
        // An encrypted volume: before its first stage, then with its wrapped key (never the key).
        var encrypted = v
        encrypted.parameters["encrypted"] = "true"
        XCTAssertEqual(VolumeDetail(encrypted, attachments: [], snapshots: []).encryption,
                       "no key yet: made at the first NodeStageVolume (secret `passphrase`)")
        encrypted.encryption = VolumeEncryption(iterations: 310_000, salt: "c2FsdA==", nonce: "bm9uY2U=", wrappedKey: "a2V5", tag: "dGFn")
        XCTAssertEqual(VolumeDetail(encrypted, attachments: [], snapshots: []).encryption,
                       "aes-256-xts-plain64, key wrapped with pbkdf2-hmac-sha256 (310000 iterations) and aes-256-gcm")

        let cluster = ClusterView(volumes: [v], attachments: [v.id: [attachment]],
                                  liveNodes: [NodeRecord(id: "n1", topology: [:], maxVolumes: 0, registeredAt: t0, dataAddress: "10.0.0.1:7410", capacityBytes: 10 << 30)],
                                  removedNodes: ["n9"], snapshots: snapshots)
        let nodes = cluster.nodes
        XCTAssertEqual(nodes.map(\.id), ["n1", "n2", "n9"])
        XCTAssertEqual(nodes.map(\.state), [.live, .away, .removed])
        XCTAssertEqual(nodes[0].provisionedBytes, v.capacityBytes)
        XCTAssertEqual(nodes[1].replicasInSync, 0)
        let list = try JSONOutput.encode(["nodes": nodes])
        XCTAssertEqual(try JSONOutput.decoder().decode([String: [NodeSummary]].self, from: Data(list.utf8))["nodes"], nodes)
        let node = try XCTUnwrap(cluster.node("n1"))
        XCTAssertEqual(node.attachedVolumes, [v.id])
        XCTAssertEqual(try JSONOutput.decoder().decode(NodeDetail.self, from: Data(try JSONOutput.encode(node).utf8)), node)
        XCTAssertNil(cluster.node("n7"))
    }

    /// ClusterView reads a real store: the records a controller wrote, as `cairn … list` shows them.
    func testTheClusterViewReadsWhatAStoreHolds() async throws {
        let dir = NSTemporaryDirectory() + "cairn-cli-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        try await store.registerNode(NodeRecord(id: "n1", topology: ["zone": "a"], maxVolumes: 8, capacityBytes: 1 << 40))
        var v = volume(replicas: [replica("n1"), replica("n2", inSync: false)])
        try await store.createVolume(v)
        v.id = "vol-b"
        v.name = "b"
        v.replicas = nil
        try await store.createVolume(v)
        _ = try await store.attach(volumeID: "vol-b", nodeID: "n1", readonly: true, accessMode: 2, exclusive: false, nodeLimit: 0)
        try await store.createSnapshot(SnapshotRecord(id: "snap-1", name: "s", sourceVolumeID: "vol-a", sizeBytes: 1, readyToUse: true))

        for i in 0..<20 {
            v.id = "vol-c\(i)"
            v.name = "c\(i)"
            try await store.createVolume(v)
            _ = try await store.attach(volumeID: v.id, nodeID: "n\(i)", readonly: false, accessMode: 1, exclusive: false, nodeLimit: 0)
        }

        var cluster = try await ClusterView.read(from: store, snapshots: true)
        XCTAssertEqual(cluster.attachments.count, 22, "every volume's attachments, read 16 at a time")
        XCTAssertEqual((0..<20).map { cluster.attachments["vol-c\($0)"]?.map(\.nodeID) ?? [] }, (0..<20).map { ["n\($0)"] })
        cluster.volumes.removeAll { $0.id.hasPrefix("vol-c") }
        XCTAssertEqual(cluster.volumes.map(\.id), ["vol-a", "vol-b"])
        XCTAssertEqual(cluster.replicas.map(\.nodeID), ["n1", "n2"])
        XCTAssertEqual(cluster.nodes.map(\.state), [.live, .away])
        XCTAssertEqual(cluster.node("n1")?.attachedVolumes, ["vol-b"])
        XCTAssertEqual(cluster.node("n1")?.topology, ["zone": "a"])
        XCTAssertEqual(cluster.snapshots.map(\.id), ["snap-1"])
        let summaries = cluster.volumes.map { VolumeSummary($0, attachments: cluster.attachments[$0.id] ?? []) }
        XCTAssertEqual(summaries.map(\.condition.state), [.degraded, .healthy])
        XCTAssertEqual(summaries[1].attachedTo, ["n1"])
    }

    // MARK: Doctor

    func testTheDoctorsReportHasAStatusOnEveryLineAndFailsOnAnyFail() throws {
        var report = DoctorReport(checks: [DoctorCheck("kernel", .ok, "Linux 6.9"),
                                           DoctorCheck("fuse.resend", .warn, "old kernel", fix: "upgrade")])
        XCTAssertTrue(report.ok)
        report.checks.append(DoctorCheck("loop", .fail, "no /dev/loop-control", fix: "modprobe loop"))
        XCTAssertFalse(report.ok)
        let lines = report.render().split(separator: "\n")
        XCTAssertEqual(lines.count, 4)
        XCTAssertEqual(String(lines[2]), "FAIL  loop         no /dev/loop-control — fix: modprobe loop")
        XCTAssertEqual(String(lines[0]), "ok    kernel       Linux 6.9")
        XCTAssertEqual(String(lines[3]), "not ready: 1 check failed, 1 warning")
        let json = try JSONOutput.encode(report)
        XCTAssertEqual(try JSONOutput.decoder().decode(DoctorReport.self, from: Data(json.utf8)), report)
        XCTAssertEqual((try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])?["ok"] as? Bool, false)
    }

    func testTheDoctorsRules() {
        XCTAssertEqual(DoctorRules.clockSkew(0.4, against: "etcd").status, .ok)
        XCTAssertEqual(DoctorRules.clockSkew(-5, against: "etcd").status, .warn)
        XCTAssertEqual(DoctorRules.clockSkew(120, against: "etcd").status, .fail)
        XCTAssertEqual(DoctorRules.freeSpace(path: "/d", free: 100 << 30, total: 200 << 30).status, .ok)
        XCTAssertEqual(DoctorRules.freeSpace(path: "/d", free: 5 << 30, total: 200 << 30).status, .warn)
        XCTAssertEqual(DoctorRules.freeSpace(path: "/d", free: 1 << 20, total: 200 << 30).status, .fail)
        XCTAssertEqual(DoctorRules.versionLine("mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0\n"), "mke2fs 1.47.0 (5-Feb-2023)")
        XCTAssertEqual(DoctorRules.versionLine("Usage: resize2fs [-d debug_flags] device\nresize2fs 1.47.0 (5-Feb-2023)"), "resize2fs 1.47.0 (5-Feb-2023)")
        XCTAssertEqual(DoctorRules.certificate("c", path: "/c.pem", notAfter: t0.addingTimeInterval(90 * 86400), now: t0).status, .ok)
        XCTAssertEqual(DoctorRules.certificate("c", path: "/c.pem", notAfter: t0.addingTimeInterval(86400), now: t0).status, .warn)
        XCTAssertEqual(DoctorRules.certificate("c", path: "/c.pem", notAfter: t0, now: t0).status, .fail)
        let headers = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Thu, 03 Dec 2026 00:41:07 GMT\r\n\r\n{}"
        XCTAssertEqual(DoctorRules.httpDate(in: headers)?.timeIntervalSince1970, 1_796_258_467)
        XCTAssertNil(DoctorRules.httpDate(in: "HTTP/1.1 200 OK\r\n\r\n"))
    }

    // MARK: Records

    func volume(replicas: [ReplicaRecord]?) -> VolumeRecord {
        VolumeRecord(id: "vol-a", name: "a", capacityBytes: 1 << 30, parameters: [:], fsType: "ext4", accessModes: [1],
                     accessibleTopology: [:], epoch: 3, createdAt: t0, replicas: replicas)
    }

    func replica(_ node: String, inSync: Bool = true) -> ReplicaRecord {
        ReplicaRecord(nodeID: node, address: "10.0.0.\(node.dropFirst()):7410", inSync: inSync,
                      outOfSyncSince: inSync ? nil : t0, reason: inSync ? nil : "node away")
    }

    func progress(done: Int64, total: Int64, bytesPerSecond: Int64 = 0, phase: String = "copy", at: Date? = nil) -> ResyncProgress {
        ResyncProgress(bytesTotal: total, bytesDone: done, bytesPerSecond: bytesPerSecond, startedAt: t0, updatedAt: at ?? t0, phase: phase)
    }
}
