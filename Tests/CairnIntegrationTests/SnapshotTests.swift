import CSIProto
import CairnCore
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Issue 7 on one machine, through the real plugin: snapshots taken under a running write
/// load restore to filesystems that fsck clean, clones diverge from their sources, group
/// snapshots, and online expansion while fio verifies its data.
final class SnapshotTests: IntegrationTestCase {
    func testAnExt4SnapshotTakenDuringWritesRestoresToAFilesystemThatFscksClean() async throws {
        try await snapshotUnderLoad(fsType: "ext4", sizeMiB: 128)
    }

    func testAnXFSSnapshotTakenDuringWritesRestoresToAFilesystemThatFscksClean() async throws {
        try await snapshotUnderLoad(fsType: "xfs", sizeMiB: 320)
    }

    func testACloneOfAVolumeDivergesWithoutTouchingItsSource() async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let access = Access.block
        let source = try await place(csi, plugin, name: "clone-src", access: access, sizeMiB: 64)
        let original = VolumeIO.randomBytes(1 << 20)
        try VolumeIO.writeDevice(source.target, at: 0, original)

        // A clone of the volume while it is in use (raw block: refused on one machine, which
        // has no barrier for it), then after it is unstaged.
        let early = CSI.create(name: "clone-early", access: access, required: 64 * CSI.mib, from: source.volume.volumeID, fromVolume: true)
        let refused = await expectStatus(.failedPrecondition, "clone of a staged raw block volume") { _ = try await csi.createVolume(early) }
        XCTAssertTrue(refused.message.contains("unstage"), "the refusal must say what to do: \(refused.message)")
        let listed = try await csi.listVolumes().entries.map(\.volume.volumeID)
        XCTAssertEqual(listed, [source.volume.volumeID], "a refused clone must leave no volume behind")

        try await csi.nodeUnpublish(CSI.unpublish(source.volume.volumeID, target: source.target))
        try await csi.nodeUnstage(CSI.unstage(source.volume.volumeID, staging: source.staging))
        let cloneRequest = CSI.create(name: "clone", access: access, required: 96 * CSI.mib, from: source.volume.volumeID, fromVolume: true)
        let clone = try await must("CreateVolume from a volume") { try await csi.createVolume(cloneRequest) }.volume
        XCTAssertEqual(clone.contentSource.volume.volumeID, source.volume.volumeID, "the response names the source")
        XCTAssertEqual(clone.capacityBytes, 96 * CSI.mib)
        let again = try await csi.createVolume(cloneRequest).volume
        XCTAssertEqual(again.volumeID, clone.volumeID, "CreateVolume from a source is idempotent by name")
        let hidden = try await csi.listSnapshots().entries
        XCTAssertTrue(hidden.isEmpty, "a clone of a volume leaves no snapshot to see: \(hidden.map(\.snapshot.snapshotID))")

        _ = try await csi.nodeStage(source.stageRequest)
        _ = try await csi.nodePublish(source.publishRequest)
        let placedClone = try await placeExisting(csi, plugin, volume: clone, name: "clone", access: access)
        XCTAssertEqual(try VolumeIO.readDevice(placedClone.target, at: 0, count: original.count), original, "the clone starts as its source")
        let cloneData = VolumeIO.randomBytes(1 << 20)
        try VolumeIO.writeDevice(placedClone.target, at: 0, cloneData)
        let sourceData = VolumeIO.randomBytes(1 << 20)
        try VolumeIO.writeDevice(source.target, at: 4 << 20, sourceData)
        XCTAssertEqual(try VolumeIO.readDevice(source.target, at: 0, count: original.count), original,
                       "a write to the clone changed its source")
        XCTAssertEqual(try VolumeIO.readDevice(placedClone.target, at: 0, count: cloneData.count), cloneData)
        XCTAssertEqual(try VolumeIO.readDevice(placedClone.target, at: 4 << 20, count: sourceData.count), [UInt8](repeating: 0, count: sourceData.count),
                       "a write to the source reached the clone")
        try await unplace(csi, plugin, placedClone, lastOne: false)
        try await unplace(csi, plugin, source)
    }

    func testAGroupSnapshotFreezesEveryMemberAndRestoresEach() async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let access = Access.mount(fsType: "ext4")
        let a = try await place(csi, plugin, name: "group-a", access: access, sizeMiB: 64)
        let b = try await place(csi, plugin, name: "group-b", access: access, sizeMiB: 64)
        let payloadA = try writePayload(a)
        let payloadB = try writePayload(b)
        let group = try await must("CreateVolumeGroupSnapshot") {
            try await csi.createGroupSnapshot(name: "pair", volumes: [a.volume.volumeID, b.volume.volumeID])
        }.groupSnapshot
        XCTAssertTrue(group.readyToUse)
        XCTAssertEqual(Set(group.snapshots.map(\.sourceVolumeID)), [a.volume.volumeID, b.volume.volumeID])
        XCTAssertTrue(group.snapshots.allSatisfy { $0.groupSnapshotID == group.groupSnapshotID && $0.readyToUse })
        let again = try await csi.createGroupSnapshot(name: "pair", volumes: [b.volume.volumeID, a.volume.volumeID]).groupSnapshot
        XCTAssertEqual(again.groupSnapshotID, group.groupSnapshotID, "CreateVolumeGroupSnapshot is idempotent by name")
        await expectStatus(.alreadyExists, "same group name, other volumes") {
            _ = try await csi.createGroupSnapshot(name: "pair", volumes: [a.volume.volumeID])
        }
        // The writes go on after the barrier: the filesystems were thawed.
        try VolumeIO.writeFile(a.target + "/after", [1, 2, 3])

        for (member, payload) in [(a, payloadA), (b, payloadB)] {
            let snapshot = try XCTUnwrap(group.snapshots.first { $0.sourceVolumeID == member.volume.volumeID })
            await expectStatus(.failedPrecondition, "DeleteSnapshot of a group member") { try await csi.deleteSnapshot(snapshot.snapshotID) }
            let restored = try await csi.createVolume(CSI.create(name: "restored-\(member.volume.volumeID)", access: access,
                                                                 required: 64 * CSI.mib, from: snapshot.snapshotID)).volume
            try await fsckClean(plugin, volumeID: restored.volumeID, fsType: "ext4")
            let placed = try await placeExisting(csi, plugin, volume: restored, name: "restored-\(member.volume.volumeID)", access: access)
            XCTAssertEqual(try VolumeIO.readFile(placed.target + "/cairn-it-data.bin"), payload, "the group member restores its data")
            try await unplace(csi, plugin, placed, lastOne: false)
        }
        try await must("DeleteVolumeGroupSnapshot") { try await csi.deleteGroupSnapshot(group.groupSnapshotID) }
        let left = try await csi.listSnapshots().entries
        XCTAssertTrue(left.isEmpty, "the group's members go with it: \(left.map(\.snapshot.snapshotID))")
        let files = try FileManager.default.contentsOfDirectory(atPath: plugin.dataDir + "/snapshots")
        XCTAssertEqual(files, [], "snapshot data left behind")
        try await unplace(csi, plugin, a, lastOne: false)
        try await unplace(csi, plugin, b)
    }

    /// With the data directory on a filesystem that shares extents (xfs, reflink=1), a raw
    /// block volume in use is snapshotted and cloned as a clone of its file — atomic against
    /// its writers — instead of being refused; two such volumes in one group still are.
    func testOnAReflinkDataDirectoryABlockVolumeInUseIsSnapshottedAndCloned() async throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/sbin/mkfs.xfs"), "needs xfsprogs")
        let plugin = try await startPlugin { plugin in
            let image = plugin.root + "/data-xfs.img"
            try BackgroundCommand.succeed(["truncate", "-s", "1G", image])
            try BackgroundCommand.succeed(["mkfs.xfs", "-q", "-m", "reflink=1", image])
            try FileManager.default.createDirectory(atPath: plugin.dataDir, withIntermediateDirectories: true)
            try BackgroundCommand.succeed(["mount", "-o", "loop", image, plugin.dataDir])
        }
        let csi = CSIClient(plugin: plugin)
        let a = try await place(csi, plugin, name: "reflink-a", access: .block, sizeMiB: 64)
        let before = VolumeIO.randomBytes(1 << 20)
        try VolumeIO.writeDevice(a.target, at: 0, before)
        let snapshot = try await must("CreateSnapshot of a staged block volume") {
            try await csi.createSnapshot(CSI.snapshot(a.volume.volumeID, name: "reflinked"))
        }.snapshot
        try VolumeIO.writeDevice(a.target, at: 0, VolumeIO.randomBytes(1 << 20))
        let restored = try await csi.createVolume(CSI.create(name: "from-reflink", access: .block, required: 64 * CSI.mib,
                                                             from: snapshot.snapshotID)).volume
        let copy = try await placeExisting(csi, plugin, volume: restored, name: "from-reflink", access: .block)
        XCTAssertEqual(try VolumeIO.readDevice(copy.target, at: 0, count: before.count), before, "the snapshot is not of its instant")

        let b = try await place(csi, plugin, name: "reflink-b", access: .block, sizeMiB: 64)
        let refused = await expectStatus(.failedPrecondition, "a group of two raw block volumes in use") {
            _ = try await csi.createGroupSnapshot(name: "two-blocks", volumes: [a.volume.volumeID, b.volume.volumeID])
        }
        XCTAssertTrue(refused.message.contains("Unstage all but one"), refused.message)
        try await unplace(csi, plugin, b, lastOne: false)
        try await unplace(csi, plugin, copy, lastOne: false)
        try await must("DeleteSnapshot") { try await csi.deleteSnapshot(snapshot.snapshotID) }
        try await unplace(csi, plugin, a, lastOne: false)
    }

    /// xfs (ext4's online resize needs CAP_SYS_RESOURCE, which some sandboxes withhold; the
    /// unit tests cover it where it is granted): fio writes and verifies while the volume grows.
    func testAnXFSVolumeGrowsOnlineWhileFioRunsAndLosesNothing() async throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/bin/fio"), "needs fio")
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let placed = try await place(csi, plugin, name: "grow", access: .mount(fsType: "xfs"), sizeMiB: 320)
        let before = try statfsBytes(placed.target)
        let fio = try BackgroundCommand(["fio", "--name=grow", "--filename=\(placed.target)/fio.data", "--size=96m", "--rw=randwrite",
                                         "--bs=4k", "--ioengine=psync", "--direct=1", "--verify=crc32c", "--do_verify=1",
                                         "--verify_fatal=1", "--verify_state_save=0", "--loops=2", "--thread", "--output-format=terse"])
        defer { fio.stop() }
        try await Task.sleep(for: .milliseconds(500))
        let grown = 640 * CSI.mib
        let controller = try await must("ControllerExpandVolume") { try await csi.controllerExpand(placed.volume.volumeID, bytes: grown) }
        XCTAssertEqual(controller.capacityBytes, grown)
        XCTAssertTrue(controller.nodeExpansionRequired)
        let node = try await must("NodeExpandVolume") { try await csi.nodeExpand(placed.volume.volumeID, path: placed.target, bytes: grown) }
        XCTAssertEqual(node.capacityBytes, grown)
        XCTAssertTrue(fio.isRunning, "fio finished before the growth: the test did not grow a volume in use")
        let result = fio.wait()
        XCTAssertEqual(result.status, 0, "fio (verify) failed during the growth:\n\(result.output)")
        let after = try statfsBytes(placed.target)
        XCTAssertGreaterThan(after, before + 250 * CSI.mib, "the filesystem did not grow: \(before) → \(after) bytes")
        // Repeating both is harmless (the CO retries).
        _ = try await csi.controllerExpand(placed.volume.volumeID, bytes: grown)
        _ = try await csi.nodeExpand(placed.volume.volumeID, path: placed.target, bytes: grown)
        await expectStatus(.outOfRange, "NodeExpandVolume beyond the controller's size") {
            _ = try await csi.nodeExpand(placed.volume.volumeID, path: placed.target, bytes: 2 * grown)
        }
        let got = try await csi.controllerGetVolume(CSI.getVolume(placed.volume.volumeID))
        XCTAssertEqual(got.volume.capacityBytes, grown)
        try await unplace(csi, plugin, placed)
    }

    // MARK: Scenarios

    func snapshotUnderLoad(fsType: String, sizeMiB: Int64) async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let access = Access.mount(fsType: fsType)
        let placed = try await place(csi, plugin, name: "snap-\(fsType)", access: access, sizeMiB: sizeMiB)
        let payload = try writePayload(placed)
        // Data and metadata churn: files created, appended, fsynced and removed all the time.
        let load = try BackgroundCommand(["bash", "-c", """
            cd \(placed.target) && while :; do
              for i in $(seq 1 40); do mkdir -p d$i && head -c $((RANDOM * 4)) /dev/urandom > d$i/f && sync d$i/f; done
              rm -rf d1 d2 d3 d4 d5 d6 d7 d8 d9 d10
            done
            """])
        defer { load.stop() }
        try await Task.sleep(for: .milliseconds(700))
        let snapshot = try await must("CreateSnapshot under load") {
            try await csi.createSnapshot(CSI.snapshot(placed.volume.volumeID, name: "under-load"))
        }.snapshot
        XCTAssertTrue(load.isRunning, "the write load stopped before the snapshot: \(load.wait().output)")
        XCTAssertTrue(snapshot.readyToUse)
        XCTAssertEqual(snapshot.sizeBytes, sizeMiB * CSI.mib)
        XCTAssertEqual(snapshot.sourceVolumeID, placed.volume.volumeID)
        let repeated = try await csi.createSnapshot(CSI.snapshot(placed.volume.volumeID, name: "under-load")).snapshot
        XCTAssertEqual(repeated.snapshotID, snapshot.snapshotID, "CreateSnapshot is idempotent by name")
        try await Task.sleep(for: .milliseconds(300))
        XCTAssertTrue(load.isRunning, "writes must go on after the snapshot (the filesystem thawed)")
        load.stop()

        // Restore to a larger volume. ext4's freeze empties its journal, so the copy checks
        // clean as it is; xfs's leaves a log to replay (crash-consistent, as after a power
        // cut): its check follows the first mount.
        let restored = try await must("CreateVolume from the snapshot") {
            try await csi.createVolume(CSI.create(name: "restored-\(fsType)", access: access, required: (sizeMiB + 64) * CSI.mib,
                                                  from: snapshot.snapshotID))
        }.volume
        XCTAssertEqual(restored.contentSource.snapshot.snapshotID, snapshot.snapshotID)
        if fsType == "ext4" {
            // A mounted ext4 always has needs_recovery set; only a frozen one has a clean journal.
            let header = try BackgroundCommand(["dumpe2fs", "-h", plugin.volumesDir + "/" + restored.volumeID + ".img"]).wait().output
            let features = header.split(separator: "\n").first { $0.hasPrefix("Filesystem features:") } ?? ""
            XCTAssertFalse(features.contains("needs_recovery"), "the snapshot was not taken at a barrier (frozen filesystem): \(features)")
            try await fsckClean(plugin, volumeID: restored.volumeID, fsType: fsType)
        }
        await expectStatus(.invalidArgument, "restore to another filesystem") {
            _ = try await csi.createVolume(CSI.create(name: "wrong-fs", access: .mount(fsType: fsType == "xfs" ? "ext4" : "xfs"),
                                                      required: (sizeMiB + 64) * CSI.mib, from: snapshot.snapshotID))
        }
        let copy = try await placeExisting(csi, plugin, volume: restored, name: "restored-\(fsType)", access: access)
        XCTAssertEqual(try VolumeIO.readFile(copy.target + "/cairn-it-data.bin"), payload, "the restored volume holds the data")
        try VolumeIO.writeFile(copy.target + "/only-in-the-copy", [7])
        XCTAssertFalse(FileManager.default.fileExists(atPath: placed.target + "/only-in-the-copy"), "the restore touched its source")
        try await csi.nodeUnpublish(CSI.unpublish(restored.volumeID, target: copy.target))
        try await csi.nodeUnstage(CSI.unstage(restored.volumeID, staging: copy.staging))
        try await fsckClean(plugin, volumeID: restored.volumeID, fsType: fsType)
        _ = try await csi.nodeStage(copy.stageRequest)
        _ = try await csi.nodePublish(copy.publishRequest)
        try await unplace(csi, plugin, copy, lastOne: false)

        await expectStatus(.notFound, "restore from a missing snapshot") {
            _ = try await csi.createVolume(CSI.create(name: "none", access: access, required: sizeMiB * CSI.mib, from: "snap-missing"))
        }
        try await must("DeleteSnapshot") { try await csi.deleteSnapshot(snapshot.snapshotID) }
        try await must("DeleteSnapshot again") { try await csi.deleteSnapshot(snapshot.snapshotID) }
        try await unplace(csi, plugin, placed)
    }

    // MARK: Steps

    /// ControllerPublish → NodeStage → NodePublish of a volume that exists already.
    func placeExisting(_ csi: CSIClient, _ plugin: PluginProcess, volume: Csi_V1_Volume, name: String, access: Access) async throws -> Placed {
        let published = try await csi.controllerPublish(CSI.controllerPublish(volume.volumeID, node: plugin.nodeID, access: access,
                                                                              context: volume.volumeContext))
        let staging = plugin.stagingDir + "/" + name
        let podDir = plugin.podsDir + "/" + name
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: podDir, withIntermediateDirectories: true)
        let stage = CSI.stage(volume.volumeID, staging: staging, access: access, publishContext: published.publishContext,
                              volumeContext: volume.volumeContext)
        _ = try await must("NodeStageVolume \(volume.volumeID)") { try await csi.nodeStage(stage) }
        let publish = CSI.publish(volume.volumeID, staging: staging, target: podDir + "/target", access: access,
                                  publishContext: published.publishContext, volumeContext: volume.volumeContext)
        _ = try await must("NodePublishVolume \(volume.volumeID)") { try await csi.nodePublish(publish) }
        return Placed(volume: volume, access: access, staging: staging, target: podDir + "/target",
                      backingFile: plugin.volumesDir + "/" + volume.volumeID + ".img", stageRequest: stage, publishRequest: publish)
    }

    /// A read-only check of an unstaged volume's filesystem, on its backing file.
    func fsckClean(_ plugin: PluginProcess, volumeID: String, fsType: String) async throws {
        let file = plugin.volumesDir + "/" + volumeID + ".img"
        let check = fsType == "xfs" ? ["xfs_repair", "-n", "-f", file] : ["e2fsck", "-f", "-n", file]
        let result = try BackgroundCommand(check).wait()
        XCTAssertEqual(result.status, 0, "\(check.joined(separator: " ")) found problems in the restored volume:\n\(result.output)")
    }

    func statfsBytes(_ path: String) throws -> Int64 {
        var st = statvfs()
        guard statvfs(path, &st) == 0 else { throw SystemError("statvfs \(path)", errno: errno) }
        return Int64(st.f_blocks) * Int64(st.f_frsize)
    }
}

/// A command run in the background, its output collected; stop() kills it and its children
/// (so a shell loop leaves nothing behind; run fio with --thread for the same reason).
final class BackgroundCommand: @unchecked Sendable {
    let process = Process()
    private let output = Pipe()
    private let lock = NSLock()
    private var collected = Data()
    /// Signalled when the reader has seen the end of the output (the command and every child
    /// holding the pipe exited). A readability handler can still be running, its bytes not yet
    /// appended, when the process is seen exiting: fast commands then lost their whole output.
    private let drained = DispatchSemaphore(value: 0)

    init(_ arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let handle = output.fileHandleForReading
        Thread.detachNewThread { [self] in
            while true {
                let data = handle.availableData
                if data.isEmpty { break }
                lock.lock()
                collected.append(data)
                lock.unlock()
            }
            drained.signal()
        }
    }
    /// Runs `arguments` to the end; throws with its output unless it exits 0.
    static func succeed(_ arguments: [String]) throws {
        let result = try BackgroundCommand(arguments).wait()
        guard result.status == 0 else {
            throw FixtureError("\(arguments.joined(separator: " ")) failed (\(result.status)): \(result.output)")
        }
    }

    var isRunning: Bool { process.isRunning }

    func stop() {
        guard process.isRunning else { return }
        let pid = process.processIdentifier
        kill(pid, SIGSTOP)  // no new children while they are killed
        let children = Process()
        children.executableURL = URL(fileURLWithPath: "/usr/bin/pkill")
        children.arguments = ["-KILL", "-P", String(pid)]
        try? children.run()
        children.waitUntilExit()
        kill(pid, SIGKILL)
        process.waitUntilExit()
    }

    func wait() -> (status: Int32, output: String) {
        process.waitUntilExit()
        // Our copy of the write end is closed by Process once the child started; the reader sees
        // EOF when the command (and any child it left holding the pipe) is gone.
        _ = drained.wait(timeout: .now() + 10)
        lock.lock()
        let text = String(decoding: collected, as: UTF8.self)
        lock.unlock()
        return (process.terminationStatus, text)
    }
}
