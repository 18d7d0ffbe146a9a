import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

/// Issue 18 (encryption at rest) on the 3-node test bed: real agents, replicas on disk, FUSE
/// engines. A volume created with `encrypted: "true"` is encrypted by the engine on the attached
/// node before any block leaves it: a known plaintext written through ext4 is found on no
/// replica file of any node (while the same check finds it on a plain volume's replicas), and
/// the volume fails over, snapshots, restores, clones and grows with the same passphrase.
final class ClusterEncryptionTests: XCTestCase {
    var bed: Testbed!
    let mounts = TestMounts()
    let passphrase = ["passphrase": "correct horse battery staple"]

    override func tearDown() async throws {
        mounts.removeAll()
        if let problem = bed?.down(after: testRun) { XCTFail(problem) }
        bed = nil
    }

    func testKnownPlaintextReachesNoReplicaAndTheVolumeMovesSnapshotsClonesAndGrows() async throws {
        bed = try Testbed.up(nodes: 3)
        let size: Int64 = 128 << 20
        let encrypted = try await createVolume("enc", bytes: size, encrypted: true)
        let plain = try await createVolume("plain", bytes: size, encrypted: false)

        // A file of a distinctive marker through ext4 on both volumes.
        let marker = "cairn-known-plaintext-" + UUID().uuidString + "\n"
        let content = Array(String(repeating: marker, count: 4096).utf8)
        let onN1 = try await bed.attachBlock(encrypted, on: "n1", secrets: passphrase)
        let plainOnN1 = try await bed.attachBlock(plain, on: "n1")
        for (device, name) in [(onN1.target, "enc"), (plainOnN1.target, "plain")] {
            try BackgroundCommand.succeed(["mkfs.ext4", "-q", "-F", device])
            let fs = try mount(device, name: name)
            try VolumeIO.writeFile(fs + "/marker", content)
            try BackgroundCommand.succeed(["sync", "-f", fs + "/marker"])
            try unmount(fs)
        }
        // The control: the check finds the plaintext on every replica of the plain volume…
        for node in bed.nodes {
            XCTAssertFalse(try replicaFiles(containing: marker, node: node, volume: plain).isEmpty,
                           "the marker is not on \(node)'s replica of the plain volume: the check cannot see plaintext")
        }
        // …and on no replica file of the encrypted one.
        for node in bed.nodes {
            XCTAssertEqual(try replicaFiles(containing: marker, node: node, volume: encrypted), [],
                           "plaintext of the encrypted volume on \(node)'s replica")
        }
        try await bed.detach(plain, plainOnN1)
        _ = try await bed.controller.deleteVolume(CSI.delete(plain))

        // A snapshot (ciphertext, no key needed) and a clone of the attached volume.
        let snapshot = try await bed.controller.createSnapshot(CSI.snapshot(encrypted, name: "enc-snap")).snapshot
        XCTAssertTrue(snapshot.readyToUse)
        do {
            _ = try await bed.controller.createVolume(
                CSI.create(name: "restored-plain", access: .block, required: size, from: snapshot.snapshotID, parameters: ["replicas": "3"]))
            XCTFail("a plain volume was made from an encrypted snapshot")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .invalidArgument, error.message)
        }
        let restored = try await bed.controller.createVolume(
            CSI.create(name: "restored", access: .block, required: size, from: snapshot.snapshotID,
                       parameters: ["replicas": "3", "encrypted": "true"])).volume.volumeID
        let clone = try await bed.controller.createVolume(
            CSI.create(name: "clone", access: .block, required: size, from: encrypted, fromVolume: true,
                       parameters: ["replicas": "3", "encrypted": "true"])).volume.volumeID
        try await bed.detach(encrypted, onN1)

        // Another node: a wrong passphrase and a missing one fail NodeStage and format nothing.
        let published = try await bed.controller.controllerPublish(CSI.controllerPublish(encrypted, node: "n2", access: .block))
        let staging = bed.stateDir + "/mnt/\(encrypted)-n2-refused"
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        var stage = CSI.stage(encrypted, staging: staging, access: .block, publishContext: published.publishContext)
        stage.secrets = ["passphrase": "not the passphrase"]
        await expect(.failedPrecondition, containing: "does not unlock") { _ = try await self.bed.node("n2").nodeStage(stage) }
        stage.secrets = [:]
        await expect(.invalidArgument, containing: "passphrase") { _ = try await self.bed.node("n2").nodeStage(stage) }
        _ = try await bed.controller.controllerUnpublish(CSI.controllerUnpublish(encrypted, node: "n2"))

        let onN2 = try await bed.attachBlock(encrypted, on: "n2", secrets: passphrase)
        let fs = try mount(onN2.target, name: "enc-n2")
        XCTAssertEqual(try VolumeIO.readFile(fs + "/marker"), content, "the encrypted volume does not read back on n2")

        // Online growth of the attached, mounted volume; the new space reads back what is written.
        let grown: Int64 = 256 << 20
        let expanded = try await bed.controller.controllerExpand(encrypted, bytes: grown)
        XCTAssertEqual(expanded.capacityBytes, grown)
        let expandedOnNode = try await bed.node("n2").nodeExpand(encrypted, path: onN2.target, bytes: grown)
        XCTAssertEqual(expandedOnNode.capacityBytes, grown)
        let tail = VolumeIO.randomBytes(1 << 20)
        try VolumeIO.writeDevice(onN2.target, at: grown - (1 << 20), tail)
        XCTAssertEqual(try VolumeIO.readDevice(onN2.target, at: grown - (1 << 20), count: 1 << 20), tail)
        XCTAssertEqual(try VolumeIO.readFile(fs + "/marker"), content)
        try unmount(fs)

        // The restore and the clone open with the source's passphrase.
        for (volume, name) in [(restored, "restored"), (clone, "clone")] {
            let attached = try await bed.attachBlock(volume, on: "n3", secrets: passphrase)
            let copy = try mount(attached.target, name: name)
            XCTAssertEqual(try VolumeIO.readFile(copy + "/marker"), content, "the \(name) does not read back")
            try unmount(copy)
            try await bed.detach(volume, attached)
        }
        try await bed.detach(encrypted, onN2)

        // Every replica, snapshot layer and clone on every node: ciphertext only.
        for node in bed.nodes {
            XCTAssertEqual(try replicaFiles(containing: marker, node: node, volume: nil), [],
                           "plaintext on \(node)'s replicas after the snapshot, restore, clone and growth")
        }
        // The passphrase is in no log of any process of the bed.
        for name in bed.processNames {
            let log = (try? String(contentsOfFile: bed.logPath(name), encoding: .utf8)) ?? ""
            XCTAssertFalse(log.isEmpty, "no log at \(bed.logPath(name))")
            XCTAssertFalse(log.contains(passphrase["passphrase"]!), "\(name)'s log holds the passphrase")
        }
        for volume in [clone, restored] { _ = try await bed.controller.deleteVolume(CSI.delete(volume)) }
        try await bed.controller.deleteSnapshot(snapshot.snapshotID)
        _ = try await bed.controller.deleteVolume(CSI.delete(encrypted))
    }

    /// The attached node's agent is SIGKILLed under checksummed O_DIRECT writes; the encrypted
    /// volume fails over to another node with the passphrase and every acknowledged write is
    /// there; the writer's blocks (each begins with a known magic) are on no replica in the clear.
    func testAnEncryptedVolumeFailsOverWithEveryAcknowledgedWrite() async throws {
        bed = try Testbed.up(nodes: 3)
        let bytes: Int64 = 64 << 20
        // The passphrase in CreateVolume's secrets (a provisioner secret): the key is made there,
        // and even the first NodeStage must bring the same passphrase.
        var create = CSI.create(name: "enc-failover", access: .block, required: bytes, parameters: ["replicas": "3", "encrypted": "true"])
        create.secrets = passphrase
        let volume = try await bed.controller.createVolume(create).volume.volumeID
        await expect(.failedPrecondition, containing: "does not unlock") {
            _ = try await self.bed.attachBlock(volume, on: "n1", secrets: ["passphrase": "another one"])
        }
        let first = try await bed.attachBlock(volume, on: "n1", secrets: passphrase)
        let writer = try BlockWriter(device: first.target, blocks: Int(bytes) / BlockWriter.blockSize)
        writer.start()
        try await writer.waitForAcknowledged(200)
        try bed.kill("n1")
        try await writer.waitUntilStopped(seconds: 30)
        let acknowledged = writer.acknowledged()
        XCTAssertGreaterThanOrEqual(acknowledged.count, 200)

        _ = try await bed.controller.controllerUnpublish(CSI.controllerUnpublish(volume, node: "n1"))
        let second = try await bed.attachBlock(volume, on: "n2", secrets: passphrase)
        try BlockWriter.verify(device: second.target, acknowledged: acknowledged)
        let magic = String(decoding: withUnsafeBytes(of: BlockWriter.magic.littleEndian) { Array($0) }, as: UTF8.self)
        XCTAssertEqual(magic, "KLBNRIAC")
        for node in ["n2", "n3"] {
            XCTAssertEqual(try replicaFiles(containing: magic, node: node, volume: volume), [],
                           "the writer's plaintext blocks are on \(node)'s replica")
        }
        try await bed.detach(volume, second)
    }

    /// The process running the engines (the agent) is SIGKILLed and started again under
    /// checksummed O_DIRECT writes: the FUSE keeper kept the data key with the connection, so the
    /// new engine decrypts and encrypts at once — no write fails, no NodeStage is needed, and
    /// every acknowledged block reads back.
    func testAnEncryptedVolumeServesOnAcrossAKillAndRestartOfItsEngineProcess() async throws {
        bed = try Testbed.up(nodes: 3)
        let bytes: Int64 = 64 << 20
        let volume = try await createVolume("enc-restart", bytes: bytes, encrypted: true)
        let attached = try await bed.attachBlock(volume, on: "n1", secrets: passphrase)
        let writer = try BlockWriter(device: attached.target, blocks: Int(bytes) / BlockWriter.blockSize)
        writer.start()
        try await writer.waitForAcknowledged(200)
        try bed.killEngineProcess("n1")
        try bed.restartEngineProcess("n1")
        try await writer.waitForAcknowledged(writer.acknowledgedCount + 300, seconds: 60)
        try await writer.stopAndVerify("a write failed across the restart of the encrypted volume's engine process")
        XCTAssertTrue(bed.logTail(bed.engineProcess("n1"), lines: 400).contains("resumed the volume's FUSE connection"),
                      "the engine did not resume the kept connection")
        try await bed.detach(volume, attached)
    }

    // MARK: Steps

    func createVolume(_ name: String, bytes: Int64, encrypted: Bool) async throws -> String {
        var parameters = ["replicas": "3"]
        if encrypted { parameters["encrypted"] = "true" }
        return try await bed.controller.createVolume(CSI.create(name: name, access: .block, required: bytes, parameters: parameters))
            .volume.volumeID
    }

    /// The files under `node`'s replicas directory (one volume's, or all) that hold `text`.
    func replicaFiles(containing text: String, node: String, volume: String?) throws -> [String] {
        let root = "\(bed.stateDir)/\(node)/replicas" + (volume.map { "/" + $0 } ?? "")
        guard FileManager.default.fileExists(atPath: root) else { throw FixtureError("no replicas at \(root)") }
        // -a reads the binary files as text, -F a fixed string; status 1: no match.
        let result = try Command.runBlocking(["env", "LC_ALL=C", "grep", "-rlaF", "--", text.trimmingCharacters(in: .newlines), root],
                                             timeout: .seconds(300))
        guard result.status == 0 || result.status == 1 else { throw FixtureError("grep failed (\(result.status)): \(result.output)") }
        return result.stdout.split(separator: "\n").map(String.init)
    }

    func expect(_ code: StatusCode, containing text: String, _ call: () async throws -> Void) async {
        do {
            try await call()
            XCTFail("expected \(code)")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, code, error.message)
            XCTAssertTrue(error.message.contains(text), error.message)
        } catch {
            XCTFail("unexpected \(error)")
        }
    }

    func mount(_ device: String, name: String) throws -> String {
        try mounts.mount(device, at: bed.stateDir + "/mnt/fs-\(name)")
    }

    func unmount(_ dir: String) throws { try mounts.unmount(dir) }
}
