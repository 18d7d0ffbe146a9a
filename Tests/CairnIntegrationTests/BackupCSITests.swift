import CSIProto
import CairnBackup
import CairnCore
import Foundation
import XCTest

/// Issue 18 through the real plugin and CLI on one machine: `cairn backup create` of a CSI
/// snapshot to a real S3-compatible server (moto), CreateVolume from `backup:<target>/<id>`
/// byte-identical to the snapshot, `cairn backup restore` SIGKILLed half-way and run again
/// fetching only what it had not finished, GetSnapshot of backup ids, and deletion.
final class BackupCSITests: IntegrationTestCase {
    func testABackupRestoresThroughCreateVolumeAndAKilledRestoreResumes() async throws {
        if getuid() != 0 { throw XCTSkip("integration tests mount filesystems and attach loop devices: run them as root") }
        let server = try await S3TestServer.start()
        defer { server.stop() }
        let client = try await server.client(bucket: "cairn-e2e", prefix: "site-a")
        let config = try server.writeTargets(bucket: "cairn-e2e", prefix: "site-a", parallelism: 1)
        defer { try? FileManager.default.removeItem(atPath: config) }

        let plugin = try await startPlugin(extraArguments: ["--backup-targets", config + "/targets.json"])
        let csi = CSIClient(plugin: plugin)
        let size: Int64 = 128 * CSI.mib
        let source = try await must("CreateVolume") {
            try await csi.createVolume(CSI.create(name: "bk-src", access: .block, required: size, limit: size))
        }.volume
        // Unstaged, the volume's data is its file: fill it like a database would.
        try BackupTests.databaseLike(plugin.volumesDir + "/\(source.volumeID).img", size: size, fill: 1)
        let snapshot = try await must("CreateSnapshot") { try await csi.createSnapshot(CSI.snapshot(source.volumeID, name: "bk-snap")) }.snapshot
        let snapshotFile = plugin.dataDir + "/snapshots/\(snapshot.snapshotID).img"
        let expected = try BackupTests.sha256(snapshotFile)

        // The CLI backs the snapshot up, with progress lines and a final document.
        let created = try cli(["backup", "create", "--snapshot", snapshot.snapshotID, "--id", "nightly", "--data-dir", plugin.dataDir] + flags(config, plugin))
        let done = try lastJSON(created)
        XCTAssertEqual(done["event"] as? String, "done", created)
        XCTAssertTrue(created.contains("\"event\":\"progress\""), "no progress lines: \(created)")
        let listed = try lastJSON(try cli(["backup", "list"] + flags(config, plugin)))
        XCTAssertEqual((listed["backups"] as? [[String: Any]])?.compactMap { $0["id"] as? String }, ["nightly"])

        // CSI: GetSnapshot knows it, a malformed or unknown one is refused as the spec says.
        let got = try await csi.getSnapshot("backup:offsite/nightly").snapshot
        XCTAssertTrue(got.readyToUse)
        XCTAssertEqual(got.sizeBytes, size)
        await expectStatus(.notFound, "GetSnapshot of a missing backup") { _ = try await csi.getSnapshot("backup:offsite/none") }
        await expectStatus(.invalidArgument, "CreateVolume from a malformed backup id") {
            _ = try await csi.createVolume(CSI.create(name: "bk-bad", access: .block, required: size, from: "backup:offsite"))
        }
        await expectStatus(.notFound, "CreateVolume from an unknown target") {
            _ = try await csi.createVolume(CSI.create(name: "bk-bad", access: .block, required: size, from: "backup:elsewhere/nightly"))
        }

        // CreateVolume from the backup: byte-identical to the snapshot it came from.
        let restoreRequest = CSI.create(name: "bk-restored", access: .block, required: size, from: "backup:offsite/nightly")
        let restored = try await must("CreateVolume from backup:offsite/nightly") { try await csi.createVolume(restoreRequest) }.volume
        XCTAssertEqual(restored.contentSource.snapshot.snapshotID, "backup:offsite/nightly")
        XCTAssertEqual(try BackupTests.sha256(plugin.volumesDir + "/\(restored.volumeID).img"), expected)
        let again = try await csi.createVolume(restoreRequest).volume
        XCTAssertEqual(again.volumeID, restored.volumeID, "CreateVolume from a backup is idempotent by name")

        // Mesos: a disk profile's parameter names the backup instead of a content source.
        let profiled = try await must("CreateVolume with restoreFrom") {
            try await csi.createVolume(CSI.create(name: "bk-profile", access: .block, required: size,
                                                  parameters: ["restoreFrom": "offsite/nightly"]))
        }.volume
        XCTAssertEqual(try BackupTests.sha256(plugin.volumesDir + "/\(profiled.volumeID).img"), expected)

        // The CLI's restore, SIGKILLed once some packs are recorded, then run again.
        let into = config + "/restore.img"
        let progress = into + ".restore-progress"
        let killed = Process()
        killed.executableURL = URL(fileURLWithPath: try PluginProcess.locateBinary())
        killed.arguments = ["backup", "restore", "nightly", "--to", into] + flags(config, plugin)
        killed.standardOutput = FileHandle.nullDevice
        killed.standardError = FileHandle.nullDevice
        try killed.run()
        let deadline = Date().addingTimeInterval(60)
        while killed.isRunning, Date() < deadline {
            let lines = ((try? String(contentsOfFile: progress, encoding: .utf8)) ?? "").split(separator: "\n").count
            if lines >= 5 { break }  // the header and four packs
            usleep(2000)
        }
        XCTAssertTrue(killed.isRunning, "the restore finished before it could be killed")
        kill(killed.processIdentifier, SIGKILL)
        killed.waitUntilExit()
        let recorded = try String(contentsOfFile: progress, encoding: .utf8).split(separator: "\n").count - 1
        let resumed = try lastJSON(try cli(["backup", "restore", "nightly", "--to", into] + flags(config, plugin)))
        let result = try XCTUnwrap(resumed["restore"] as? [String: Any])
        let traffic = try XCTUnwrap(resumed["traffic"] as? [String: Any])
        let fetched = try XCTUnwrap(result["packsFetched"] as? Int)
        XCTAssertEqual(result["packsAlreadyDone"] as? Int, recorded)
        XCTAssertEqual(traffic["gets"] as? Int, 1 + 2 * fetched, "the resumed restore fetched a pack it had")
        XCTAssertEqual(try BackupTests.sha256(into), expected)
        print("backup: CLI restore killed after \(recorded) packs; the second run fetched \(fetched)")

        // Retention: a second backup of the volume (from its file, as for a device), then keep
        // one: the older goes, and the newer still restores.
        _ = try cli(["backup", "create", "--file", snapshotFile, "--volume", source.volumeID, "--id", "later"] + flags(config, plugin))
        let pruned = try lastJSON(try cli(["backup", "prune", "--keep", "1", "--grace", "0s"] + flags(config, plugin)))
        XCTAssertEqual(pruned["removed"] as? [String], ["nightly"])
        let inspected = try lastJSON(try cli(["backup", "inspect", "later"] + flags(config, plugin)))
        XCTAssertEqual(inspected["parent"] as? String, "nightly")
        XCTAssertEqual(inspected["newBlocks"] as? Int, 0, "the same data again uploads nothing")
        _ = try cli(["backup", "restore", "later", "--to", config + "/later.img"] + flags(config, plugin))
        XCTAssertEqual(try BackupTests.sha256(config + "/later.img"), expected)

        // CSI sees the backup as a snapshot (ListSnapshots by id, as the external-snapshotter
        // checks a pre-provisioned VolumeSnapshotContent), and DeleteSnapshot deletes it (its
        // manifest; the packs after the grace period, collected here at once).
        var byID = Csi_V1_ListSnapshotsRequest()
        byID.snapshotID = "backup:offsite/later"
        let listedLater = try await csi.listSnapshots(byID).entries
        XCTAssertEqual(listedLater.map(\.snapshot.sourceVolumeID), [source.volumeID])
        XCTAssertTrue(listedLater.first?.snapshot.readyToUse ?? false)
        try await csi.deleteSnapshot("backup:offsite/later")
        try await csi.deleteSnapshot("backup:offsite/later")
        let listedAfterDelete = try await csi.listSnapshots(byID).entries
        XCTAssertEqual(listedAfterDelete.count, 0)
        let afterDelete = try lastJSON(try cli(["backup", "list"] + flags(config, plugin)))
        XCTAssertEqual((afterDelete["backups"] as? [[String: Any]])?.count, 0)
        // Garbage collection with no grace takes every object with it.
        _ = try cli(["backup", "prune", "--keep", "100", "--grace", "0s"] + flags(config, plugin))
        let left = try await client.list("")
        XCTAssertEqual(left.map(\.key), [])

        for id in [restored.volumeID, profiled.volumeID] { _ = try await csi.deleteVolume(CSI.delete(id)) }
        try await csi.deleteSnapshot(snapshot.snapshotID)
        _ = try await csi.deleteVolume(CSI.delete(source.volumeID))
    }

    func flags(_ config: String, _ plugin: PluginProcess) -> [String] { Self.flags(config) }

    static func flags(_ config: String) -> [String] {
        ["--backup-targets", config + "/targets.json", "--target", "offsite", "--output", "json"]
    }

    func cli(_ arguments: [String]) throws -> String { try Self.cli(arguments) }

    /// Runs the cairn executable; its standard output, or an error with both outputs.
    static func cli(_ arguments: [String]) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try PluginProcess.locateBinary())
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let errors = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0 else {
            throw CairnError.internal("cairn \(arguments.joined(separator: " ")) failed: \(text) \(String(decoding: errors, as: UTF8.self))")
        }
        return text
    }

    /// The output's last JSON document (progress lines come first, one per line).
    func lastJSON(_ text: String) throws -> [String: Any] { try Self.lastJSON(text) }

    static func lastJSON(_ text: String) throws -> [String: Any] {
        let start = text.range(of: "\n{\n", options: .backwards).map { text.index(after: $0.lowerBound) } ?? text.startIndex
        guard let object = try JSONSerialization.jsonObject(with: Data(text[start...].utf8)) as? [String: Any] else {
            throw CairnError.internal("not a JSON object: \(text)")
        }
        return object
    }
}
