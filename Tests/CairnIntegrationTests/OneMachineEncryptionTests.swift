import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

/// Issue 18 on one machine (`cairn serve --role all`, SQLite): an encrypted volume is served
/// through an engine whose one replica is the volume's file, so the file — and the snapshots and
/// clones copied from it — hold ciphertext only; a wrong passphrase fails NodeStage and formats
/// nothing; online growth works through the engine.
final class OneMachineEncryptionTests: IntegrationTestCase {
    let passphrase = ["passphrase": "one machine, one passphrase"]

    func testAnEncryptedVolumeOnOneMachineKeepsOnlyCiphertextInItsFileAndSnapshots() async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let access = Access.mount(fsType: "ext4")
        let marker = "cairn-one-machine-plaintext-" + UUID().uuidString + "\n"
        let content = Array(String(repeating: marker, count: 2048).utf8)

        var ids: [String: String] = [:]
        for (name, encrypted) in [("enc", true), ("plain", false)] {
            let parameters = encrypted ? ["encrypted": "true"] : [:]
            let volume = try await csi.createVolume(CSI.create(name: name, access: access, required: 64 * CSI.mib, parameters: parameters)).volume
            ids[name] = volume.volumeID
            let staging = try await stage(csi, plugin, volume.volumeID, name: name, secrets: encrypted ? passphrase : [:])
            try VolumeIO.writeFile(staging + "/marker", content)
            try BackgroundCommand.succeed(["sync", "-f", staging + "/marker"])
        }
        let enc = ids["enc"]!, plain = ids["plain"]!
        XCTAssertFalse(try files(containing: marker, under: plugin.dataDir + "/volumes/\(plain).img").isEmpty,
                       "the plain volume's file does not hold the marker: the check cannot see plaintext")
        XCTAssertEqual(try files(containing: marker, under: plugin.dataDir + "/volumes/\(enc).img"), [])

        // A snapshot of the staged volume (the filesystem frozen for the copy), and its restore.
        let snapshot = try await csi.createSnapshot(CSI.snapshot(enc, name: "enc-snap")).snapshot
        XCTAssertTrue(snapshot.readyToUse)
        let restored = try await csi.createVolume(CSI.create(name: "restored", access: access, required: 64 * CSI.mib,
                                                             from: snapshot.snapshotID, parameters: ["encrypted": "true"])).volume.volumeID
        // A group snapshot's member carries the key too.
        let group = try await csi.createGroupSnapshot(name: "enc-group", volumes: [enc, plain]).groupSnapshot
        let member = try XCTUnwrap(group.snapshots.first { $0.sourceVolumeID == enc })
        let fromGroup = try await csi.createVolume(CSI.create(name: "from-group", access: access, required: 64 * CSI.mib,
                                                              from: member.snapshotID, parameters: ["encrypted": "true"])).volume.volumeID

        // Unstaged and grown (online ext4 growth needs CAP_SYS_RESOURCE, which the test's plugin
        // may lack; cluster mode's test grows online), then a wrong and a missing passphrase:
        // refused, nothing formatted.
        try await unstage(csi, plugin, enc, name: "enc")
        let grown: Int64 = 128 * CSI.mib
        _ = try await csi.controllerExpand(enc, bytes: grown)
        var request = stageRequest(enc, staging: plugin.stagingDir + "/enc")
        request.secrets = ["passphrase": "wrong"]
        let wrong = await expectStatus(.failedPrecondition, "NodeStage with a wrong passphrase") { _ = try await csi.nodeStage(request) }
        XCTAssertTrue(wrong.message.contains("does not unlock"), wrong.message)
        request.secrets = [:]
        await expectStatus(.invalidArgument, "NodeStage without a passphrase") { _ = try await csi.nodeStage(request) }
        request.secrets = passphrase
        _ = try await csi.nodeStage(request)
        XCTAssertEqual(try VolumeIO.readFile(plugin.stagingDir + "/enc/marker"), content, "the data did not survive the refused stages")
        let device = try Command.runBlocking(["findmnt", "-n", "-o", "SOURCE", plugin.stagingDir + "/enc"], timeout: .seconds(10))
            .stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let bytes = try Command.runBlocking(["blockdev", "--getsize64", device], timeout: .seconds(10)).stdout
        XCTAssertEqual(Int64(bytes.trimmingCharacters(in: .whitespacesAndNewlines)), grown, "the engine does not serve the grown size on \(device)")
        try await unstage(csi, plugin, enc, name: "enc")

        for (volume, name) in [(restored, "restored"), (fromGroup, "from-group")] {
            let staging = try await stage(csi, plugin, volume, name: name, secrets: passphrase)
            XCTAssertEqual(try VolumeIO.readFile(staging + "/marker"), content, "the \(name) volume does not read back")
            try await unstage(csi, plugin, volume, name: name)
        }

        for path in [plugin.dataDir + "/volumes", plugin.dataDir + "/snapshots"] {
            // The plain volume's file and its group snapshot member hold the plaintext, rightly.
            let plainFiles = [plain] + group.snapshots.filter { $0.sourceVolumeID == plain }.map(\.snapshotID)
            let found = try files(containing: marker, under: path).filter { file in !plainFiles.contains { file.contains($0) } }
            XCTAssertEqual(found, [], "plaintext of an encrypted volume under \(path)")
        }
        try await unstage(csi, plugin, plain, name: "plain")
        for id in [enc, restored, fromGroup, plain] { _ = try await csi.controllerUnpublish(CSI.controllerUnpublish(id, node: plugin.nodeID)) }
        for id in [restored, fromGroup] { _ = try await csi.deleteVolume(CSI.delete(id)) }
        try await csi.deleteGroupSnapshot(group.groupSnapshotID)
        _ = try await csi.deleteVolume(CSI.delete(plain))
        try await csi.deleteSnapshot(snapshot.snapshotID)
        _ = try await csi.deleteVolume(CSI.delete(enc))
    }

    /// `cairn serve` SIGKILLed and started again under checksummed O_DIRECT writes to a staged
    /// encrypted block volume: the FUSE keeper kept the engine's connection and the data key, so
    /// the new process resumes it — no write fails, no NodeStage is needed (the CO would not
    /// repeat one), every acknowledged block reads back. Then the same after a graceful restart.
    func testAnEncryptedVolumeServesOnAcrossAKillAndARestartOfThePlugin() async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let size: Int64 = 64 * CSI.mib
        var create = CSI.create(name: "enc-restart", access: .block, required: size, parameters: ["encrypted": "true"])
        create.secrets = passphrase
        let volume = try await csi.createVolume(create).volume.volumeID
        let published = try await csi.controllerPublish(CSI.controllerPublish(volume, node: plugin.nodeID, access: .block))
        let staging = plugin.stagingDir + "/enc-restart"
        let podDir = plugin.podsDir + "/enc-restart"
        for dir in [staging, podDir] { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        let target = podDir + "/target"
        var stage = CSI.stage(volume, staging: staging, access: .block, publishContext: published.publishContext)
        stage.secrets = passphrase
        _ = try await csi.nodeStage(stage)
        _ = try await csi.nodePublish(CSI.publish(volume, staging: staging, target: target, access: .block,
                                                  publishContext: published.publishContext))

        let writer = try BlockWriter(device: target, blocks: Int(size) / BlockWriter.blockSize)
        writer.start()
        try await writer.waitForAcknowledged(200)
        await plugin.crash()
        try await plugin.start()
        try await writer.waitForAcknowledged(writer.acknowledgedCount + 300, seconds: 60)
        XCTAssertNil(writer.failure, "a write failed across the kill of cairn serve")
        try await plugin.restart()
        try await writer.waitForAcknowledged(writer.acknowledgedCount + 300, seconds: 60)
        try await writer.stopAndVerify("a write failed across the restarts of cairn serve serving the encrypted volume")
        XCTAssertTrue(plugin.logTail(lines: 400).contains("resumed the volume's FUSE connection"),
                      "the engine did not resume the kept connection: \(plugin.logTail(lines: 60))")
        let stats = try await csi.nodeGetVolumeStats(CSI.stats(volume, path: target))
        XCTAssertFalse(stats.volumeCondition.abnormal, stats.volumeCondition.message)

        _ = try await csi.nodeUnpublish(CSI.unpublish(volume, target: target))
        _ = try await csi.nodeUnstage(CSI.unstage(volume, staging: staging))
        _ = try await csi.controllerUnpublish(CSI.controllerUnpublish(volume, node: plugin.nodeID))
        _ = try await csi.deleteVolume(CSI.delete(volume))
    }

    /// A backup of an encrypted volume's snapshot (`cairn backup create`) holds no plaintext in
    /// any object of the bucket, while the same check finds it in a plain volume's backup; it
    /// restores (CreateVolume from `backup:offsite/<id>`) only into an encrypted volume, which
    /// opens with the source's passphrase.
    func testAnEncryptedVolumesBackupIsCiphertextAndRestoresWithItsPassphrase() async throws {
        let server = try await S3TestServer.start()
        defer { server.stop() }
        let client = try await server.client(bucket: "cairn-enc", prefix: "site")
        let config = try server.writeTargets(bucket: "cairn-enc", prefix: "site")
        defer { try? FileManager.default.removeItem(atPath: config) }
        let plugin = try await startPlugin(extraArguments: ["--backup-targets", config + "/targets.json"])
        let csi = CSIClient(plugin: plugin)
        let access = Access.mount(fsType: "ext4")
        // Each 4 KiB a marker, then random bytes: zstd keeps the marker as a literal.
        let marker = "cairn-backup-plaintext-" + UUID().uuidString
        var content: [UInt8] = []
        for _ in 0..<256 { content += Array(marker.utf8) + VolumeIO.randomBytes(4096 - marker.utf8.count) }

        var made: [String: (volume: String, snapshot: String, packs: [String])] = [:]
        for (name, encrypted) in [("plain", false), ("enc", true)] {
            let volume = try await csi.createVolume(CSI.create(name: name, access: access, required: 64 * CSI.mib,
                                                               parameters: encrypted ? ["encrypted": "true"] : [:])).volume.volumeID
            let staging = try await stage(csi, plugin, volume, name: name, secrets: encrypted ? passphrase : [:])
            try VolumeIO.writeFile(staging + "/marker", content)
            try BackgroundCommand.succeed(["sync", "-f", staging + "/marker"])
            let snapshot = try await csi.createSnapshot(CSI.snapshot(volume, name: name + "-snap")).snapshot.snapshotID
            try await unstage(csi, plugin, volume, name: name)
            _ = try BackupCSITests.cli(["backup", "create", "--snapshot", snapshot, "--id", name, "--data-dir", plugin.dataDir]
                                       + BackupCSITests.flags(config))
            let inspected = try BackupCSITests.lastJSON(try BackupCSITests.cli(["backup", "inspect", name] + BackupCSITests.flags(config)))
            XCTAssertEqual(inspected["encrypted"] as? Bool, encrypted)
            made[name] = (volume, snapshot, try XCTUnwrap(inspected["packNames"] as? [String]))
        }
        // Every object of the bucket, searched for the marker.
        let needle = Array(marker.utf8)
        var holding: [String] = []
        for object in try await client.list("") {
            let fetched = try await client.get(object.key)
            let bytes = try XCTUnwrap(fetched)
            if Self.contains(bytes, needle) { holding.append(object.key) }
        }
        XCTAssertFalse(holding.isEmpty, "the marker is in no object, not even the plain volume's backup: the check cannot see plaintext")
        for key in holding {
            XCTAssertFalse(made["enc"]!.packs.contains { key.hasSuffix("/" + $0) } || key.contains("backups/enc"),
                           "plaintext of the encrypted volume in backup object \(key)")
        }

        await expectStatus(.invalidArgument, "a plain volume from an encrypted volume's backup") {
            _ = try await csi.createVolume(CSI.create(name: "plain-from-enc", access: access, required: 64 * CSI.mib, from: "backup:offsite/enc"))
        }
        let restored = try await csi.createVolume(CSI.create(name: "enc-restored", access: access, required: 64 * CSI.mib,
                                                             from: "backup:offsite/enc", parameters: ["encrypted": "true"])).volume.volumeID
        let staging = try await stage(csi, plugin, restored, name: "enc-restored", secrets: passphrase)
        XCTAssertEqual(try VolumeIO.readFile(staging + "/marker"), content, "the restored encrypted volume does not read back")
        try await unstage(csi, plugin, restored, name: "enc-restored")
        for id in [restored, made["plain"]!.volume, made["enc"]!.volume] {
            _ = try await csi.controllerUnpublish(CSI.controllerUnpublish(id, node: plugin.nodeID))
        }
        for (_, m) in made { try await csi.deleteSnapshot(m.snapshot) }
        for id in [restored, made["plain"]!.volume, made["enc"]!.volume] { _ = try await csi.deleteVolume(CSI.delete(id)) }
    }

    // MARK: Steps

    func stageRequest(_ id: String, staging: String) -> Csi_V1_NodeStageVolumeRequest {
        CSI.stage(id, staging: staging, access: .mount(fsType: "ext4"))
    }

    func stage(_ csi: CSIClient, _ plugin: PluginProcess, _ id: String, name: String, secrets: [String: String]) async throws -> String {
        _ = try await csi.controllerPublish(CSI.controllerPublish(id, node: plugin.nodeID, access: .mount(fsType: "ext4")))
        let staging = plugin.stagingDir + "/" + name
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        var request = stageRequest(id, staging: staging)
        request.secrets = secrets
        _ = try await csi.nodeStage(request)
        return staging
    }

    func unstage(_ csi: CSIClient, _ plugin: PluginProcess, _ id: String, name: String) async throws {
        _ = try await csi.nodeUnstage(CSI.unstage(id, staging: plugin.stagingDir + "/" + name))
    }

    static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard let first = needle.first, haystack.count >= needle.count else { return false }
        var i = 0
        while i <= haystack.count - needle.count {
            if haystack[i] == first, haystack[i..<i + needle.count].elementsEqual(needle) { return true }
            i += 1
        }
        return false
    }

    /// The files under `path` (a file or a directory) that hold `text`.
    func files(containing text: String, under path: String) throws -> [String] {
        let result = try Command.runBlocking(["env", "LC_ALL=C", "grep", "-rlaF", "--", text.trimmingCharacters(in: .newlines), path],
                                             timeout: .seconds(300))
        guard result.status == 0 || result.status == 1 else { throw FixtureError("grep failed (\(result.status)): \(result.output)") }
        return result.stdout.split(separator: "\n").map(String.init)
    }
}
