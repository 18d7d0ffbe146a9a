import CSIProto
import CairnCore
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Issue 7 on the 3-node test bed: real node processes, replicas on disk, FUSE engines. The
/// snapshot of an attached volume is taken at the engine's write barrier (block level: the
/// filesystem on it is not frozen, so it is crash-consistent — its journal replays — like a
/// power cut); clones share the snapshot's layers; growth and QoS limits reach the engine.
final class ClusterSnapshotTests: XCTestCase {
    var bed: Testbed!
    let mounts = TestMounts()

    override func tearDown() async throws {
        mounts.removeAll()
        if let problem = bed?.down(after: testRun) { XCTFail(problem) }
        bed = nil
    }

    /// ext4 on a 3-replica volume under a file-churning load; a snapshot through the engine's
    /// barrier restores (on other nodes) to a filesystem that, once its journal has replayed,
    /// fscks clean and holds what was synced before; the restore and a clone of the live
    /// volume both diverge from their source.
    func testASnapshotUnderWritesRestoresCleanAndClonesDivergeFromTheirSource() async throws {
        bed = try Testbed.up(nodes: 3)
        let size: Int64 = 256 << 20
        let source = try await createVolume("src", bytes: size)
        let attached = try await bed.attachBlock(source, on: "n1")
        try BackgroundCommand.succeed(["mkfs.ext4", "-q", "-F", attached.target])
        let fs = try mount(attached.target, name: "src")
        let marker = VolumeIO.randomBytes(64 << 10)
        try VolumeIO.writeFile(fs + "/before", marker)
        try BackgroundCommand.succeed(["sync", "-f", fs + "/before"])

        let load = try BackgroundCommand(["bash", "-c", """
            cd \(fs) && while :; do
              for i in $(seq 1 30); do mkdir -p d$i && head -c $((RANDOM * 4)) /dev/urandom > d$i/f && sync d$i/f; done
              rm -rf d1 d2 d3 d4 d5 d6 d7 d8
            done
            """])
        defer { load.stop() }
        try await Task.sleep(for: .seconds(1))
        let started = Date()
        let snapshot = try await bed.controller.createSnapshot(CSI.snapshot(source, name: "under-load")).snapshot
        print("snapshot of an attached 3-replica volume under load: \(String(format: "%.0f", Date().timeIntervalSince(started) * 1000)) ms")
        XCTAssertTrue(snapshot.readyToUse)
        XCTAssertTrue(load.isRunning, "the load stopped at the snapshot: \(load.wait().output)")
        try await Task.sleep(for: .milliseconds(500))
        XCTAssertTrue(load.isRunning, "writes must go on after the barrier")
        load.stop()

        // Restore on n2 (its replicas are clones on the holder nodes: no copy).
        let restored = try await bed.controller.createVolume(
            CSI.create(name: "restored", access: .block, required: size, from: snapshot.snapshotID, parameters: ["replicas": "3"])).volume
        XCTAssertEqual(restored.contentSource.snapshot.snapshotID, snapshot.snapshotID)
        let copy = try await bed.attachBlock(restored.volumeID, on: "n2")
        let copyFS = try mount(copy.target, name: "restored")  // replays the journal
        XCTAssertEqual(try VolumeIO.readFile(copyFS + "/before"), marker, "the restore lost what was synced before the snapshot")
        try VolumeIO.writeFile(copyFS + "/only-in-the-copy", [1])
        try unmount(copyFS)
        let fsck = try BackgroundCommand(["e2fsck", "-f", "-n", copy.target]).wait()
        XCTAssertEqual(fsck.status, 0, "the restored filesystem is not clean after its journal replayed:\n\(fsck.output)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: fs + "/only-in-the-copy"), "a write to the restore reached its source")

        // A clone of the live, attached volume (a hidden snapshot at a barrier): block-level
        // divergence both ways.
        let clone = try await bed.controller.createVolume(
            CSI.create(name: "clone", access: .block, required: size, from: source, fromVolume: true, parameters: ["replicas": "3"])).volume
        let cloned = try await bed.attachBlock(clone.volumeID, on: "n3")
        let tail = size - (8 << 20)
        let before = try VolumeIO.readDevice(attached.target, at: tail, count: 1 << 20)
        try VolumeIO.writeDevice(cloned.target, at: tail, VolumeIO.randomBytes(1 << 20))
        XCTAssertEqual(try VolumeIO.readDevice(attached.target, at: tail, count: 1 << 20), before, "a write to the clone reached its source")
        let sourceWrite = VolumeIO.randomBytes(1 << 20)
        try unmount(fs)
        try VolumeIO.writeDevice(attached.target, at: tail + (2 << 20), sourceWrite)
        XCTAssertNotEqual(try VolumeIO.readDevice(cloned.target, at: tail + (2 << 20), count: 1 << 20), sourceWrite,
                          "a write to the source reached the clone")

        // Deletion: a volume with snapshots is refused (its replicas hold them), the clones go
        // first, then the snapshot, then the source.
        try await bed.detach(clone.volumeID, cloned)
        _ = try await bed.controller.deleteVolume(CSI.delete(clone.volumeID))
        try await bed.detach(restored.volumeID, copy)
        _ = try await bed.controller.deleteVolume(CSI.delete(restored.volumeID))
        try await bed.detach(source, attached)
        do {
            _ = try await bed.controller.deleteVolume(CSI.delete(source))
            XCTFail("a volume with a snapshot was deleted")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .failedPrecondition)
            XCTAssertTrue(error.message.contains(snapshot.snapshotID), error.message)
        }
        try await bed.controller.deleteSnapshot(snapshot.snapshotID)
        _ = try await bed.controller.deleteVolume(CSI.delete(source))
    }

    /// fio writes and verifies a raw 3-replica volume while it grows; then an iopsLimit of
    /// 500, set on the live volume with ControllerModifyVolume, holds within 10% under fio.
    func testAVolumeGrowsWhileFioVerifiesAndAnIOPSLimitHoldsUnderFio() async throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/bin/fio"), "needs fio")
        bed = try Testbed.up(nodes: 3)
        let volume = try await createVolume("grow", bytes: 256 << 20)
        let attached = try await bed.attachBlock(volume, on: "n1")

        let fio = try BackgroundCommand(["fio", "--name=grow", "--filename=\(attached.target)", "--size=64m", "--rw=randwrite",
                                         "--bs=4k", "--ioengine=psync", "--direct=1", "--verify=crc32c", "--do_verify=1",
                                         "--verify_fatal=1", "--verify_state_save=0", "--thread", "--output-format=terse"])
        defer { fio.stop() }
        try await Task.sleep(for: .milliseconds(500))
        let grown: Int64 = 512 << 20
        let expanded = try await bed.controller.controllerExpand(volume, bytes: grown)
        XCTAssertEqual(expanded.capacityBytes, grown)
        let onNode = try await bed.node("n1").nodeExpand(volume, path: attached.target, bytes: grown)
        XCTAssertEqual(onNode.capacityBytes, grown)
        XCTAssertTrue(fio.isRunning, "fio finished before the growth: the test did not grow a volume in use")
        let verified = fio.wait()
        XCTAssertEqual(verified.status, 0, "fio (verify) failed across the growth:\n\(verified.output)")
        let size = try BackgroundCommand(["blockdev", "--getsize64", attached.target]).wait().output
        XCTAssertEqual(Int64(size.trimmingCharacters(in: .whitespacesAndNewlines)), grown, "the device did not grow")
        // The new space is usable: written and read back at the very end.
        let last = VolumeIO.randomBytes(1 << 20)
        try VolumeIO.writeDevice(attached.target, at: grown - (1 << 20), last)
        XCTAssertEqual(try VolumeIO.readDevice(attached.target, at: grown - (1 << 20), count: 1 << 20), last)

        let free = try iops(attached.target, seconds: 4)
        try await bed.controller.controllerModify(volume, ["iopsLimit": "500"])
        let deadline = Date().addingTimeInterval(15)
        while !bed.logTail(bed.engineProcess("n1"), lines: 200).contains("applied the volume's new QoS limits") {
            guard Date() < deadline else { return XCTFail("the engine did not apply the new limit in 15 s") }
            try await Task.sleep(for: .milliseconds(200))
        }
        let limited = try iops(attached.target, seconds: 6)
        print("fio random 4 KiB writes QD8 on a 3-replica volume: \(Int(free)) IOPS unlimited, \(String(format: "%.1f", limited)) IOPS with iopsLimit=500")
        XCTAssertGreaterThan(free, 750, "unlimited the volume does only \(Int(free)) IOPS: the limit cannot be told apart")
        XCTAssertEqual(limited, 500, accuracy: 50, "iopsLimit=500 gave \(limited) IOPS")
        try await bed.controller.controllerModify(volume, ["iopsLimit": "0"])
        try await bed.detach(volume, attached)
        _ = try await bed.controller.deleteVolume(CSI.delete(volume))
    }

    /// Two volumes attached on different nodes are snapshotted at one barrier (each engine
    /// holds its writes until both are sealed); each member restores what was written before.
    func testAGroupSnapshotOfVolumesOnTwoNodesRestoresEachMember() async throws {
        bed = try Testbed.up(nodes: 3)
        let size: Int64 = 64 << 20
        let a = try await createVolume("group-a", bytes: size)
        let b = try await createVolume("group-b", bytes: size)
        let onA = try await bed.attachBlock(a, on: "n1")
        let onB = try await bed.attachBlock(b, on: "n2")
        let before = [a: VolumeIO.randomBytes(1 << 20), b: VolumeIO.randomBytes(1 << 20)]
        try VolumeIO.writeDevice(onA.target, at: 0, before[a]!)
        try VolumeIO.writeDevice(onB.target, at: 0, before[b]!)
        let group = try await bed.controller.createGroupSnapshot(name: "pair", volumes: [a, b]).groupSnapshot
        XCTAssertTrue(group.readyToUse)
        XCTAssertEqual(group.snapshots.count, 2)
        for (device, volume) in [(onA.target, a), (onB.target, b)] {  // the holds were released
            try VolumeIO.writeDevice(device, at: 0, VolumeIO.randomBytes(1 << 20))
            XCTAssertNotEqual(try VolumeIO.readDevice(device, at: 0, count: 1 << 20), before[volume])
        }
        for member in group.snapshots {
            let restored = try await bed.controller.createVolume(
                CSI.create(name: "restored-\(member.sourceVolumeID)", access: .block, required: size, from: member.snapshotID,
                           parameters: ["replicas": "3"])).volume
            let attached = try await bed.attachBlock(restored.volumeID, on: "n3")
            XCTAssertEqual(try VolumeIO.readDevice(attached.target, at: 0, count: 1 << 20), before[member.sourceVolumeID],
                           "group member of \(member.sourceVolumeID) does not hold what was written before the barrier")
            try await bed.detach(restored.volumeID, attached)
            _ = try await bed.controller.deleteVolume(CSI.delete(restored.volumeID))
        }
        try await bed.controller.deleteGroupSnapshot(group.groupSnapshotID)
        try await bed.detach(a, onA)
        try await bed.detach(b, onB)
        for volume in [a, b] { _ = try await bed.controller.deleteVolume(CSI.delete(volume)) }
    }

    // MARK: Steps

    func createVolume(_ name: String, bytes: Int64) async throws -> String {
        try await bed.controller.createVolume(CSI.create(name: name, access: .block, required: bytes, parameters: ["replicas": "3"]))
            .volume.volumeID
    }

    func mount(_ device: String, name: String) throws -> String {
        try mounts.mount(device, at: bed.stateDir + "/mnt/fs-\(name)")
    }

    func unmount(_ dir: String) throws { try mounts.unmount(dir) }

    /// fio's random 4 KiB write IOPS on `device` over `seconds` (QD8, direct).
    func iops(_ device: String, seconds: Int) throws -> Double {
        let result = try BackgroundCommand(["fio", "--name=iops", "--filename=\(device)", "--size=128m", "--rw=randwrite", "--bs=4k",
                                            "--ioengine=libaio", "--iodepth=8", "--direct=1", "--time_based", "--runtime=\(seconds)",
                                            "--ramp_time=1", "--thread", "--output-format=json"]).wait()
        guard result.status == 0, let start = result.output.firstIndex(of: "{"),
              let json = try JSONSerialization.jsonObject(with: Data(result.output[start...].utf8)) as? [String: Any],
              let job = (json["jobs"] as? [[String: Any]])?.first, let write = job["write"] as? [String: Any],
              let value = write["iops"] as? Double else {
            throw FixtureError("fio failed or printed no IOPS (\(result.status)):\n\(result.output)")
        }
        return value
    }
}
