import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

/// Issue 18's backups on the 3-node test bed: a real S3-compatible server (moto) inside the
/// controller's network namespace, `cairn backup create` of CSI snapshots read from a replica
/// over the data protocol (mutual TLS), and CreateVolume from `backup:offsite/<id>` written into
/// a new volume's three replicas by the controller.
final class ClusterBackupTests: XCTestCase {
    var bed: Testbed!
    var server: S3TestServer?
    var config = ""
    let mounts = TestMounts()
    let bucket = "cairn-bed"
    let passphrase = ["passphrase": "correct horse battery staple"]

    override func tearDown() async throws {
        mounts.removeAll()
        server?.stop()
        server = nil
        if let problem = bed?.down(after: testRun) { XCTFail(problem) }
        bed = nil
        if !config.isEmpty { try? FileManager.default.removeItem(atPath: config) }
    }

    /// A database-like volume (1 GiB unless CAIRN_BACKUP_TEST_MIB says otherwise): the first
    /// backup reads it all; after 1% of its pages change, the second reads and uploads about
    /// that much (the replicas' generations); CreateVolume from the second backup, with the
    /// controller SIGKILLed half-way and the call repeated, fetches only the packs it had not
    /// written and gives a volume byte-identical to the snapshot.
    func testAClusterSnapshotBacksUpByGenerationsAndRestoresIntoThreeReplicasResumingAfterAControllerKill() async throws {
        try await upWithServer()
        let mib = Int64(ProcessInfo.processInfo.environment["CAIRN_BACKUP_TEST_MIB"].flatMap { Int64($0) } ?? 1024)
        let size = mib << 20
        let volume = try await bed.controller.createVolume(
            CSI.create(name: "db", access: .block, required: size, parameters: ["replicas": "3"])).volume.volumeID
        let attached = try await bed.attachBlock(volume, on: "n1")
        try Self.databaseLike(attached.target, size: size, fill: 0.6)

        let first = try await bed.controller.createSnapshot(CSI.snapshot(volume, name: "db-1")).snapshot
        let b1 = try backup(snapshot: first.snapshotID, id: "b1")
        XCTAssertEqual(b1.backup["scannedBytes"] as? Int64, size, "a first backup reads the whole snapshot")

        let changed = try Self.changePages(attached.target, size: size, count: Int(size / 100) / 4096)
        let second = try await bed.controller.createSnapshot(CSI.snapshot(volume, name: "db-2")).snapshot
        let expected = try BackupTests.sha256(attached.target)
        let b2 = try backup(snapshot: second.snapshotID, id: "b2")
        let scanned = try XCTUnwrap(b2.backup["scannedBytes"] as? Int64)
        let sent = try XCTUnwrap(b2.traffic["bytesSent"] as? Int64)
        print("cluster backup: \(changed) bytes changed; the second backup read \(scanned) bytes from the replica and sent \(sent) bytes (\(String(format: "%.2f", Double(sent) / Double(changed)))× the change)")
        XCTAssertEqual(b2.backup["parent"] as? String, "b1")
        XCTAssertGreaterThanOrEqual(scanned, changed, "the backup missed changed blocks")
        XCTAssertLessThanOrEqual(scanned, changed + (1 << 20), "the backup read blocks the generations say did not change")
        XCTAssertLessThanOrEqual(sent, changed * 3 / 2, "the second backup uploaded more than 1.5× the change")
        try await bed.detach(volume, attached)

        // The restore, with the controller killed once a few packs are recorded in the volume.
        let request = CSI.create(name: "db-restored", access: .block, required: size, from: "backup:offsite/b2", parameters: ["replicas": "3"])
        let controller = bed.controller
        let cut = Task { try await controller.createVolume(request) }
        var recorded = 0
        let deadline = Date().addingTimeInterval(300)
        while recorded < 2, Date() < deadline {
            recorded = try restoredPacks(named: "db-restored")
            if recorded < 2 { try await Task.sleep(for: .milliseconds(100)) }
        }
        try bed.kill("controller")
        _ = try? await cut.value
        XCTAssertGreaterThanOrEqual(recorded, 2, "no pack of the restore was recorded in the volume before it ended")
        try bed.restart("controller")
        let restored = try await retryingUnavailable { try await self.bed.controller.createVolume(request) }.volume
        XCTAssertEqual(restored.contentSource.snapshot.snapshotID, "backup:offsite/b2")
        let log = try String(contentsOfFile: bed.logPath("controller"), encoding: .utf8)
        let line = try XCTUnwrap(log.split(separator: "\n").last { $0.contains("restored") && $0.contains(restored.volumeID) }, "no restored line")
        let already = try XCTUnwrap(Self.metadata(line, "restore.packs_already_done").flatMap { Int($0) })
        XCTAssertGreaterThanOrEqual(already, recorded, "the repeated CreateVolume fetched packs the cut one had written: \(line)")
        print("cluster restore: controller killed after \(recorded) packs; the repeat found \(already) done: \(line)")

        // Byte-identical to snapshot db-2, on another node.
        let onN2 = try await bed.attachBlock(restored.volumeID, on: "n2")
        XCTAssertEqual(try BackupTests.sha256(onN2.target), expected, "the restored volume differs from the snapshot it came from")
        try await bed.detach(restored.volumeID, onN2)
        _ = try await bed.controller.deleteVolume(CSI.delete(restored.volumeID))
        for s in [first, second] { try await bed.controller.deleteSnapshot(s.snapshotID) }
        _ = try await bed.controller.deleteVolume(CSI.delete(volume))
    }

    /// An encrypted volume's backup holds ciphertext only (a known plaintext written through ext4
    /// is in no object, while the same check finds it in a plain volume's backup) and its wrapped
    /// key: it restores only into an encrypted volume, which opens with the source's passphrase.
    func testAnEncryptedVolumesBackupHoldsNoPlaintextAndRestoresWithItsPassphrase() async throws {
        try await upWithServer()
        let size: Int64 = 64 << 20
        // Each 4 KiB a marker then random bytes: zstd keeps the marker as a literal, so the check
        // can find it in a plain backup.
        let marker = "cairn-backup-plaintext-" + UUID().uuidString
        var content: [UInt8] = []
        for _ in 0..<256 { content += Array(marker.utf8) + VolumeIO.randomBytes(4096 - marker.utf8.count) }
        var volumes: [String: String] = [:]
        for (name, encrypted) in [("plain", false), ("sealed", true)] {
            var parameters = ["replicas": "3"]
            if encrypted { parameters["encrypted"] = "true" }
            let volume = try await bed.controller.createVolume(CSI.create(name: name, access: .block, required: size, parameters: parameters)).volume.volumeID
            volumes[name] = volume
            let attached = try await bed.attachBlock(volume, on: "n1", secrets: encrypted ? passphrase : [:])
            try BackgroundCommand.succeed(["mkfs.ext4", "-q", "-F", attached.target])
            let fs = try mounts.mount(attached.target, at: bed.stateDir + "/mnt/fs-\(name)")
            try VolumeIO.writeFile(fs + "/marker", content)
            try mounts.unmount(fs)
            let snapshot = try await bed.controller.createSnapshot(CSI.snapshot(volume, name: name + "-snap")).snapshot
            let made = try backup(snapshot: snapshot.snapshotID, id: name)
            XCTAssertEqual(made.backup["encrypted"] as? Bool, encrypted)
            try await bed.detach(volume, attached)
        }
        let objects = config + "/objects"
        try FileManager.default.createDirectory(atPath: objects, withIntermediateDirectories: true)
        let stored = try XCTUnwrap(server).download(bucket: bucket, into: objects)
        XCTAssertGreaterThan(stored, 0)
        let found = try Self.files(containing: marker, under: objects)
        XCTAssertFalse(found.isEmpty, "the marker is in no object, not even the plain volume's backup: the check cannot see plaintext")
        // Both backups share no pack: the encrypted one's packs are those only it names.
        let sealedPacks = try packs(of: "sealed")
        let plainPacks = try packs(of: "plain")
        XCTAssertTrue(sealedPacks.isDisjoint(with: plainPacks))
        for file in found {
            XCTAssertFalse(sealedPacks.contains { file.hasSuffix("/" + $0) }, "plaintext of the encrypted volume in backup object \(file)")
        }
        XCTAssertFalse(found.contains { $0.contains("/backups/") && $0.contains("sealed") }, "plaintext in the encrypted backup's manifest")

        do {
            _ = try await bed.controller.createVolume(CSI.create(name: "plain-from-sealed", access: .block, required: size,
                                                                 from: "backup:offsite/sealed", parameters: ["replicas": "3"]))
            XCTFail("a plain volume was made from an encrypted volume's backup")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .invalidArgument, error.message)
        }
        let restored = try await bed.controller.createVolume(
            CSI.create(name: "sealed-restored", access: .block, required: size, from: "backup:offsite/sealed",
                       parameters: ["replicas": "3", "encrypted": "true"])).volume.volumeID
        let attached = try await bed.attachBlock(restored, on: "n3", secrets: passphrase)
        let fs = try mounts.mount(attached.target, at: bed.stateDir + "/mnt/fs-restored")
        XCTAssertEqual(try VolumeIO.readFile(fs + "/marker"), content, "the restored encrypted volume does not read back")
        try mounts.unmount(fs)
        try await bed.detach(restored, attached)
        _ = try await bed.controller.deleteVolume(CSI.delete(restored))
    }

    // MARK: Steps

    /// The bed with `--backup-targets` on its controller, and moto inside the controller's
    /// network namespace (the bed's processes reach it; the targets file is written first, its
    /// credentials once the server has made them).
    func upWithServer() async throws {
        config = NSTemporaryDirectory() + "cairn-bed-backup-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: config, withIntermediateDirectories: true)
        let port = try S3TestServer.freePort()
        let host = "10.77.0.1"
        let targets = """
            {"targets": {"offsite": {"endpoint": "http://\(host):\(port)", "bucket": "\(bucket)", "region": "us-east-1",
                                     "prefix": "bed", "credentialsFile": "\(config)/credentials"}}}
            """
        try targets.write(toFile: config + "/targets.json", atomically: true, encoding: .utf8)
        bed = try Testbed.up(nodes: 3, controllerArgs: ["--backup-targets", config + "/targets.json"])
        let s3 = try await S3TestServer.start(namespace: Testbed.namespacePrefix + "ctl", host: host, port: port, bucket: bucket)
        server = s3
        try "aws_access_key_id = \(s3.accessKeyID)\naws_secret_access_key = \(s3.secretAccessKey)\n"
            .write(toFile: config + "/credentials", atomically: true, encoding: .utf8)
    }

    /// `cairn backup create` in the controller's namespace, as its identity (etcd and replicas).
    func backup(snapshot: String, id: String) throws -> (backup: [String: Any], traffic: [String: Any]) {
        let output = try bed.exec("ctl", [try PluginProcess.locateBinary(), "backup", "create", "--snapshot", snapshot, "--id", id,
                                          "--backup-targets", config + "/targets.json", "--target", "offsite", "--output", "json"]
                                  + bed.etcdArguments)
        let done = try BackupCSITests.lastJSON(output)
        XCTAssertEqual(done["event"] as? String, "done", output)
        return (try XCTUnwrap(done["backup"] as? [String: Any]), try XCTUnwrap(done["traffic"] as? [String: Any]))
    }

    /// The packs backup `id` names (`cairn backup inspect`).
    func packs(of id: String) throws -> Set<String> {
        let output = try bed.exec("ctl", [try PluginProcess.locateBinary(), "backup", "inspect", id,
                                          "--backup-targets", config + "/targets.json", "--target", "offsite", "--output", "json"])
        let object = try BackupCSITests.lastJSON(output)
        return Set(try XCTUnwrap(object["packNames"] as? [String], "no packs in \(output)"))
    }

    /// How many packs the volume named `name` records as restored (its etcd record).
    func restoredPacks(named name: String) throws -> Int {
        let request = ["key": Data("/cairn/volumes/".utf8).base64EncodedString(),
                       "range_end": Data("/cairn/volumes0".utf8).base64EncodedString()]
        let json = String(decoding: try JSONSerialization.data(withJSONObject: request), as: UTF8.self)
        let output = try bed.exec("ctl", ["curl", "-fsS", "--max-time", "5"] + bed.etcdCurlArguments
                                  + ["-X", "POST", "-d", json, "\(bed.etcdEndpoint)/v3/kv/range"])
        guard let start = output.firstIndex(of: "{"),
              let body = try JSONSerialization.jsonObject(with: Data(output[start...].utf8)) as? [String: Any] else { return 0 }
        for kv in body["kvs"] as? [[String: Any]] ?? [] {
            guard let value = (kv["value"] as? String).flatMap({ Data(base64Encoded: $0) }),
                  let record = try? JSONSerialization.jsonObject(with: value) as? [String: Any], record["name"] as? String == name
            else { continue }
            guard let bitmap = (record["restoredPacks"] as? String).flatMap({ Data(base64Encoded: $0) }) else { return 0 }
            return bitmap.reduce(0) { $0 + $1.nonzeroBitCount }
        }
        return 0
    }

    func retryingUnavailable<T>(_ call: () async throws -> T) async throws -> T {
        let deadline = Date().addingTimeInterval(60)
        while true {
            do { return try await call() } catch let error as CairnError where error.code == .unavailable && Date() < deadline {
                try await Task.sleep(for: .milliseconds(500))
            }
        }
    }

    /// `key=value` of a log line.
    static func metadata(_ line: Substring, _ key: String) -> String? {
        guard let range = line.range(of: key + "=") else { return nil }
        return String(line[range.upperBound...].prefix { $0 != " " })
    }

    /// Files under `root` holding `text` (grep -rlaF).
    static func files(containing text: String, under root: String) throws -> [String] {
        let result = try Command.runBlocking(["env", "LC_ALL=C", "grep", "-rlaF", "--", text, root], timeout: .seconds(120))
        guard result.status == 0 || result.status == 1 else { throw FixtureError("grep failed (\(result.status)): \(result.output)") }
        return result.stdout.split(separator: "\n").map(String.init)
    }

    /// A database's pages on a block device: the first `fill` of them half rows (random), half
    /// free space (zeros); synced.
    static func databaseLike(_ device: String, size: Int64, fill: Double) throws {
        let fd = open(device, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(device)", errno: errno) }
        defer { close(fd) }
        let used = Int64(Double(size) * fill) / 4096 * 4096
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var at: Int64 = 0
        while at < used {
            let n = Int(min(Int64(chunk.count), used - at))
            chunk.withUnsafeMutableBytes { raw in
                for page in stride(from: 0, to: n, by: 4096) {
                    BackupTests.random(raw.baseAddress! + page, 2048)
                    memset(raw.baseAddress! + page + 2048, 0, 2048)
                }
            }
            guard chunk.withUnsafeBytes({ pwrite(fd, $0.baseAddress, n, off_t(at)) }) == n else { throw SystemError("pwrite \(device)", errno: errno) }
            at += Int64(n)
        }
        guard fsync(fd) == 0 else { throw SystemError("fsync \(device)", errno: errno) }
    }

    /// Rewrites `count` distinct random pages of the device (synced); returns the bytes changed.
    static func changePages(_ device: String, size: Int64, count: Int) throws -> Int64 {
        let fd = open(device, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(device)", errno: errno) }
        defer { close(fd) }
        var pages = Set<Int64>()
        var rng = SystemRandomNumberGenerator()
        while pages.count < count { pages.insert(Int64.random(in: 0..<(size / 4096), using: &rng)) }
        var page = [UInt8](repeating: 0, count: 4096)
        for p in pages {
            page.withUnsafeMutableBytes { BackupTests.random($0.baseAddress!, 2048) }
            guard page.withUnsafeBytes({ pwrite(fd, $0.baseAddress, 4096, off_t(p * 4096)) }) == 4096 else { throw SystemError("pwrite \(device)", errno: errno) }
        }
        guard fsync(fd) == 0 else { throw SystemError("fsync \(device)", errno: errno) }
        return Int64(count) * 4096
    }
}
