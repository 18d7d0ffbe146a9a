import CSIProto
import CairnCore
import Foundation
import XCTest

/// A volume's whole life through the real plugin, as a CO drives it:
/// CreateVolume → ControllerPublish → NodeStage → NodePublish → application I/O →
/// NodeUnpublish → NodeUnstage → ControllerUnpublish → DeleteVolume,
/// with a plugin restart (or a reboot-like loss of every mount and loop device) in the middle.
final class VolumeLifecycleTests: IntegrationTestCase {
    // MARK: Whole life with a plugin restart in the middle

    func testExt4VolumeKeepsItsDataAndStateAcrossAPluginRestartAndLeavesNothingBehind() async throws {
        try await lifeWithRestart(access: .mount(fsType: "ext4"), sizeMiB: 64)
    }

    func testXFSVolumeKeepsItsDataAndStateAcrossAPluginRestartAndLeavesNothingBehind() async throws {
        try await lifeWithRestart(access: .mount(fsType: "xfs"), sizeMiB: 300)
    }

    func testBlockVolumeKeepsItsDataAndStateAcrossAPluginRestartAndLeavesNothingBehind() async throws {
        try await lifeWithRestart(access: .block, sizeMiB: 64)
    }

    // MARK: A long mount table (issue 13)

    /// The kernel hands out /proc/self/mountinfo in pieces; a plugin that read only the first
    /// (about 4 KiB) never saw its own mounts at the end of a long table. Here the plugin runs
    /// in a mount namespace of its own holding 400 extra tmpfs mounts with long names (over
    /// 64 KiB of table, so even a 64 KiB read is not the whole of it), and a mount and a block
    /// volume each go through their whole life. The namespace, and every mount in it, ends with
    /// the plugin; the tear-down detaches the loop devices.
    func testWholeLifeWorksWhenThePluginsMountTableIsLargerThan64KiB() async throws {
        // The bulk lives on a tmpfs over /mnt inside the private namespace: nothing on the host.
        let script = """
            set -e
            mount -t tmpfs -o size=4m,mode=0700 cairn-it-bulk /mnt
            long=$(printf 'x%.0s' $(seq 1 200))
            for i in $(seq 1 400); do
                mkdir "/mnt/$i-$long"
                mount -t tmpfs -o size=4k cairn-it-bulk "/mnt/$i-$long"
            done
            exec "$@"
            """
        let plugin = try await startPlugin(launchPrefix: [
            "/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh",
        ])
        let pid = try XCTUnwrap(plugin.pid)
        XCTAssertEqual(plugin.mountTablePath, "/proc/\(pid)/mountinfo")
        let tableBytes = try ProcFile.bytes(plugin.mountTablePath).count
        XCTAssertGreaterThan(tableBytes, 64 << 10, "the plugin's mount table must be larger than 64 KiB for this test")
        XCTAssert(PluginProcess.mounts(under: [plugin.root]).isEmpty, "the plugin's mounts must stay in its own namespace")

        let csi = CSIClient(plugin: plugin)
        for access in [Access.mount(fsType: "ext4"), .block] {
            let placed = try await place(csi, plugin, name: "long-table-\(access.slug)-\(UUID().uuidString.prefix(8))",
                                         access: access, sizeMiB: 64)
            // The application's I/O, through the plugin's namespace (/proc/PID/root).
            var seen = placed
            seen.target = "/proc/\(pid)/root" + placed.target
            let payload = try writePayload(seen)
            XCTAssertEqual(try readPayload(seen, count: payload.count), payload, "the data written must read back")
            try await unplace(csi, plugin, placed, lastOne: false)
        }
        let left = plugin.mounts().map { "\($0.mountPoint)" } + plugin.loopDevices().map(\.device)
        XCTAssert(left.isEmpty, "after both volumes' whole lives the plugin left behind \(left)")
    }

    // MARK: Reboot-like loss of mounts and loop devices

    func testExt4VolumeIsReattachedAndRemountedWithItsDataAfterARebootLikeEvent() async throws {
        try await lifeWithReboot(access: .mount(fsType: "ext4"), sizeMiB: 64)
    }

    func testXFSVolumeIsReattachedAndRemountedWithItsDataAfterARebootLikeEvent() async throws {
        try await lifeWithReboot(access: .mount(fsType: "xfs"), sizeMiB: 300)
    }

    func testBlockVolumeIsReattachedWithItsDataAfterARebootLikeEvent() async throws {
        try await lifeWithReboot(access: .block, sizeMiB: 64)
    }

    // MARK: Scenarios

    func lifeWithRestart(access: Access, sizeMiB: Int64) async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let placed = try await place(csi, plugin, name: "life-\(access.slug)-\(UUID().uuidString.prefix(8))",
                                     access: access, sizeMiB: sizeMiB)

        let payload = try writePayload(placed)
        XCTAssertEqual(try readPayload(placed, count: payload.count), payload, "the data written must read back")
        let stats = try await must("NodeGetVolumeStats(\(placed.target))") {
            try await csi.nodeGetVolumeStats(CSI.stats(placed.volume.volumeID, path: placed.target))
        }
        XCTAssertFalse(stats.usage.isEmpty, "NodeGetVolumeStats must report at least one usage entry")

        let loopsBefore = plugin.loopDevices(backedUnder: placed.backingFile)
        let stagingMountsBefore = plugin.mounts(under: placed.staging).count
        XCTAssertEqual(loopsBefore.count, 1, "a staged volume has exactly one loop device: \(loopsBefore)")

        let exit = try await plugin.restart()
        XCTAssert(exit?.cleanZero ?? false, "cairn must exit 0 on SIGTERM; it ended with \(exit.map(String.init(describing:)) ?? "nothing")")

        // The controller's state survived.
        let listed = try await must("ListVolumes after restart") { try await csi.listVolumes() }
        let entry = listed.entries.first { $0.volume.volumeID == placed.volume.volumeID }
        XCTAssertNotNil(entry, "ListVolumes after a restart must still list \(placed.volume.volumeID)")
        XCTAssertEqual(entry?.status.publishedNodeIds, [plugin.nodeID], "ListVolumes published_node_ids after restart")
        let got = try await must("ControllerGetVolume after restart") {
            try await csi.controllerGetVolume(CSI.getVolume(placed.volume.volumeID))
        }
        XCTAssertEqual(got.volume.capacityBytes, sizeMiB * CSI.mib)
        XCTAssertEqual(got.status.publishedNodeIds, [plugin.nodeID], "ControllerGetVolume published_node_ids after restart")
        XCTAssertFalse(got.status.volumeCondition.abnormal, "volume condition after restart: \(got.status.volumeCondition.message)")

        // Repeating NodeStage / NodePublish with the same arguments is OK and changes nothing.
        _ = try await must("NodeStageVolume repeated after restart \(CSI.show(placed.stageRequest))") {
            try await csi.nodeStage(placed.stageRequest)
        }
        _ = try await must("NodePublishVolume repeated after restart \(CSI.show(placed.publishRequest))") {
            try await csi.nodePublish(placed.publishRequest)
        }
        XCTAssertEqual(plugin.loopDevices(backedUnder: placed.backingFile), loopsBefore,
                       "a repeated NodeStage must reuse the volume's loop device, not attach another")
        XCTAssertEqual(plugin.mounts(under: placed.staging).count, stagingMountsBefore,
                       "a repeated NodeStage must not stack mounts on the staging path")
        XCTAssertEqual(Self.mountsAt(placed.target, plugin).count, 1, "a repeated NodePublish must not stack mounts on the target")
        XCTAssertEqual(try readPayload(placed, count: payload.count), payload, "the data must read back after the restart")
        let statsAfter = try await must("NodeGetVolumeStats(\(placed.target)) after restart") {
            try await csi.nodeGetVolumeStats(CSI.stats(placed.volume.volumeID, path: placed.target))
        }
        XCTAssertFalse(statsAfter.volumeCondition.abnormal, "volume condition after restart: \(statsAfter.volumeCondition.message)")

        try await unplace(csi, plugin, placed)
    }

    func lifeWithReboot(access: Access, sizeMiB: Int64) async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let placed = try await place(csi, plugin, name: "reboot-\(access.slug)-\(UUID().uuidString.prefix(8))",
                                     access: access, sizeMiB: sizeMiB)
        let payload = try writePayload(placed)

        let loops = plugin.loopDevices(backedUnder: placed.backingFile)
        XCTAssertEqual(loops.count, 1, "a staged volume has exactly one loop device: \(loops)")
        var uuidBefore: String?
        if case .mount = access, let loop = loops.first {
            uuidBefore = try await VolumeIO.filesystemUUID(loop.device)
            XCTAssertNotNil(uuidBefore, "the staged device \(loop.device) should carry a filesystem")
        }

        let exit = await plugin.stop()
        XCTAssert(exit?.cleanZero ?? false, "cairn must exit 0 on SIGTERM; it ended with \(exit.map(String.init(describing:)) ?? "nothing")")

        // The "reboot": every mount and loop device is gone, the plugin's records are not.
        var lost = await PluginProcess.unmountAll(under: [placed.target])
        lost += await PluginProcess.unmountAll(under: [placed.staging])
        lost += await PluginProcess.detachLoops(backedUnder: placed.backingFile)
        XCTAssert(lost.isEmpty, "simulating the reboot failed: \(lost)")
        assertNoLeftovers(plugin, "after simulating the reboot")

        try await plugin.start()
        _ = try await must("NodeStageVolume after a reboot-like event \(CSI.show(placed.stageRequest))") {
            try await csi.nodeStage(placed.stageRequest)
        }
        let loopsAfter = plugin.loopDevices(backedUnder: placed.backingFile)
        XCTAssertEqual(loopsAfter.count, 1, "NodeStage after a reboot must attach the volume's file again: \(loopsAfter)")
        if case .mount = access {
            XCTAssertFalse(plugin.mounts(under: placed.staging).isEmpty, "NodeStage after a reboot must mount the staging path again")
            if let loop = loopsAfter.first {
                let uuidAfter = try await VolumeIO.filesystemUUID(loop.device)
                XCTAssertEqual(uuidAfter, uuidBefore, "the filesystem must be checked and mounted, not re-created")
            }
        }
        let stageLog = plugin.logSinceLastStart()
        XCTAssertFalse(stageLog.contains("mkfs"), "NodeStage after a reboot must not run mkfs on a volume that has a filesystem")
        if case .mount(let fs) = access, fs == "ext4" {
            XCTAssert(stageLog.contains("fsck.ext4"), "NodeStage after a reboot must fsck the ext4 filesystem before mounting it")
        }
        _ = try await must("NodePublishVolume after a reboot-like event \(CSI.show(placed.publishRequest))") {
            try await csi.nodePublish(placed.publishRequest)
        }
        XCTAssertEqual(Self.mountsAt(placed.target, plugin).count, 1, "NodePublish after a reboot must mount the target again")
        XCTAssertEqual(try readPayload(placed, count: payload.count), payload, "the data written before the reboot must still be there")

        try await unplace(csi, plugin, placed)
    }
}

/// The CO's steps, shared by the integration tests that need a volume in use.
extension IntegrationTestCase {
    // MARK: Steps

    struct Placed {
        var volume: Csi_V1_Volume
        var access: Access
        var staging: String
        var target: String
        var backingFile: String
        var stageRequest: Csi_V1_NodeStageVolumeRequest
        var publishRequest: Csi_V1_NodePublishVolumeRequest

        var isBlock: Bool { if case .block = access { true } else { false } }
        var dataFile: String { target + "/cairn-it-data.bin" }
    }

    static let blockOffset: Int64 = 4 << 20
    static let payloadBytes = 256 << 10

    static func mountsAt(_ path: String, _ plugin: PluginProcess) -> [MountEntry] {
        plugin.mounts(under: path).filter { $0.mountPoint == path }
    }

    /// CreateVolume → ControllerPublish → NodeStage → NodePublish, checking each step's effect.
    func place(_ csi: CSIClient, _ plugin: PluginProcess, name: String, access: Access, sizeMiB: Int64) async throws -> Placed {
        let size = sizeMiB * CSI.mib
        let create = CSI.create(name: name, access: access, required: size, limit: size)
        let volume = try await must("CreateVolume \(CSI.show(create))") { try await csi.createVolume(create) }.volume
        XCTAssertEqual(volume.capacityBytes, size, "CreateVolume with required=limit must give exactly that size")
        let backingFile = plugin.volumesDir + "/" + volume.volumeID + ".img"
        XCTAssert(FileManager.default.fileExists(atPath: backingFile), "CreateVolume should have made \(backingFile)")

        let controllerPublish = CSI.controllerPublish(volume.volumeID, node: plugin.nodeID, access: access,
                                                      context: volume.volumeContext)
        let published = try await must("ControllerPublishVolume \(CSI.show(controllerPublish))") {
            try await csi.controllerPublish(controllerPublish)
        }

        let staging = plugin.stagingDir + "/" + name
        let podDir = plugin.podsDir + "/" + name
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: podDir, withIntermediateDirectories: true)
        let target = podDir + "/target"  // the plugin creates it (directory or file), as CSI says

        let stage = CSI.stage(volume.volumeID, staging: staging, access: access,
                              publishContext: published.publishContext, volumeContext: volume.volumeContext)
        _ = try await must("NodeStageVolume \(CSI.show(stage))") { try await csi.nodeStage(stage) }
        XCTAssertEqual(plugin.loopDevices(backedUnder: backingFile).count, 1, "NodeStage should attach one loop device")
        if case .mount = access {
            XCTAssertFalse(plugin.mounts(under: staging).isEmpty, "NodeStage should mount the filesystem under \(staging)")
        }

        let publish = CSI.publish(volume.volumeID, staging: staging, target: target, access: access,
                                  publishContext: published.publishContext, volumeContext: volume.volumeContext)
        _ = try await must("NodePublishVolume \(CSI.show(publish))") { try await csi.nodePublish(publish) }
        XCTAssertEqual(Self.mountsAt(target, plugin).count, 1, "NodePublish should mount exactly once at \(target)")

        return Placed(volume: volume, access: access, staging: staging, target: target, backingFile: backingFile,
                      stageRequest: stage, publishRequest: publish)
    }

    func writePayload(_ placed: Placed) throws -> [UInt8] {
        let payload = VolumeIO.randomBytes(Self.payloadBytes)
        if placed.isBlock {
            try VolumeIO.writeDevice(placed.target, at: Self.blockOffset, payload)
        } else {
            try VolumeIO.writeFile(placed.dataFile, payload)
        }
        return payload
    }

    func readPayload(_ placed: Placed, count: Int) throws -> [UInt8] {
        placed.isBlock ? try VolumeIO.readDevice(placed.target, at: Self.blockOffset, count: count)
                       : try VolumeIO.readFile(placed.dataFile)
    }

    /// NodeUnpublish → NodeUnstage → ControllerUnpublish → DeleteVolume, checking that each step
    /// undoes exactly what its counterpart did, and (for the `lastOne` in use) that nothing of
    /// the test remains.
    func unplace(_ csi: CSIClient, _ plugin: PluginProcess, _ placed: Placed, lastOne: Bool = true) async throws {
        let id = placed.volume.volumeID
        _ = try await must("NodeUnpublishVolume(\(id), \(placed.target))") {
            try await csi.nodeUnpublish(CSI.unpublish(id, target: placed.target))
        }
        XCTAssert(Self.mountsAt(placed.target, plugin).isEmpty, "NodeUnpublish must unmount \(placed.target)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: placed.target), "NodeUnpublish must remove the target it created")

        _ = try await must("NodeUnstageVolume(\(id), \(placed.staging))") {
            try await csi.nodeUnstage(CSI.unstage(id, staging: placed.staging))
        }
        XCTAssert(plugin.mounts(under: placed.staging).isEmpty, "NodeUnstage must unmount everything under \(placed.staging)")
        XCTAssert(plugin.loopDevices(backedUnder: placed.backingFile).isEmpty, "NodeUnstage must detach the volume's loop device")
        let inside = (try? FileManager.default.contentsOfDirectory(atPath: placed.staging)) ?? []
        XCTAssert(inside.isEmpty, "NodeUnstage must leave the CO's staging directory empty; found \(inside)")

        _ = try await must("ControllerUnpublishVolume(\(id), \(plugin.nodeID))") {
            try await csi.controllerUnpublish(CSI.controllerUnpublish(id, node: plugin.nodeID))
        }
        let got = try await must("ControllerGetVolume after unpublish") { try await csi.controllerGetVolume(CSI.getVolume(id)) }
        XCTAssertEqual(got.status.publishedNodeIds, [], "published_node_ids after ControllerUnpublish")

        _ = try await must("DeleteVolume(\(id))") { try await csi.deleteVolume(CSI.delete(id)) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: placed.backingFile), "DeleteVolume must remove \(placed.backingFile)")
        let listed = try await must("ListVolumes after delete") { try await csi.listVolumes() }
        XCTAssertFalse(listed.entries.contains { $0.volume.volumeID == id }, "ListVolumes still lists \(id) after DeleteVolume")

        if lastOne { assertNoLeftovers(plugin, "after the volume's whole life") }
    }
}
