import CSIProto
import CairnCSI
import CairnCore
import CairnLocal
import CairnNode
import CairnProcess
import CairnStore
import Foundation
import Logging
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// LinuxMounter and NodeService on the real kernel: loop devices, mkfs, mounts. Runs only as
/// root; every mount and loop device under the test's temp directory is removed in tearDown,
/// whether the test passed or not.
final class NodeLinuxMounterTests: XCTestCase {
    var dir = ""
    let logger = Logger(label: "test")

    override func setUp() async throws {
        try XCTSkipUnless(getuid() == 0, "needs root: loop devices and mounts")
        try XCTSkipUnless(FileManager.default.fileExists(atPath: "/dev/loop-control"), "needs the loop driver")
        dir = NSTemporaryDirectory() + "cairn-linux-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() async throws {
        guard !dir.isEmpty else { return }
        let realDir = Validate.realPath(dir) ?? dir
        // Innermost mounts first (mountinfo lists parents before children).
        let mounts = (try? await LinuxMounter(logger: logger).mountTable()) ?? []
        for mount in mounts.reversed() where Validate.isInside(mount.mountPoint, root: realDir) {
            let result = try? await Command.run(["umount", mount.mountPoint])
            if result?.status != 0 { _ = try? await Command.run(["umount", "-l", mount.mountPoint]) }
        }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        for name in names where name.hasPrefix("loop") {
            guard let backing = ProcFile.textIfReadable("/sys/block/\(name)/loop/backing_file"),
                  Validate.isInside(backing.trimmingCharacters(in: .whitespacesAndNewlines), root: realDir)
                    || backing.hasPrefix(realDir + "/") else { continue }
            _ = try? await Command.run(["losetup", "--detach", "/dev/\(name)"])
        }
        try? FileManager.default.removeItem(atPath: dir)
    }

    func sparseFile(_ name: String, bytes: Int64) throws -> String {
        let path = dir + "/" + name
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: nil))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.truncate(atOffset: UInt64(bytes))
        try handle.close()
        return path
    }

    /// A NodeService on the real kernel, over a real store, with one volume attached to it.
    func realNode(volumeID: String, mib: Int64) async throws
        -> (root: String, staging: String, backing: LocalFileBacking, mounter: LinuxMounter, node: NodeService)
    {
        let root = try mkdir("csi")
        let staging = try mkdir("csi/staging")
        _ = try mkdir("csi/mount")
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        let backing = try LocalFileBacking(dataDir: dir + "/data")
        let mounter = LinuxMounter(logger: logger)
        let node = NodeService(nodeID: "node-a", topology: [:], maxVolumesPerNode: 0, store: store, backing: backing,
                               mounter: mounter, pathRoots: [root], locks: VolumeLocks(), logger: logger)
        let volume = VolumeRecord(id: volumeID, name: "pvc-\(volumeID)", capacityBytes: mib << 20, parameters: [:], fsType: "",
                                  accessModes: [AccessMode.singleNodeWriter.rawValue], accessibleTopology: [:])
        try await store.createVolume(volume)
        try backing.create(volume)
        _ = try await store.attach(volumeID: volumeID, nodeID: "node-a", readonly: false,
                                   accessMode: AccessMode.singleNodeWriter.rawValue, exclusive: true, nodeLimit: 0)
        return (root, staging, backing, mounter, node)
    }

    func mkdir(_ name: String) throws -> String {
        let path = dir + "/" + name
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return Validate.realPath(path) ?? path
    }

    func testLoopExt4MountReadOnlyBindWriteAndReadBack() async throws {
        let mounter = LinuxMounter(logger: logger)
        let file = try sparseFile("vol.img", bytes: 64 << 20)
        let stage = try mkdir("stage dir")  // a space: mountinfo escapes it as \040
        let target = try mkdir("target")

        let device = try await mounter.attachLoop(file: file, readOnly: false)
        XCTAssertTrue(device.hasPrefix("/dev/loop"), device)
        let found = try await mounter.loopDevices(backing: file)
        XCTAssertEqual(found, [device])
        let size = try await mounter.blockDeviceSize(device: device)
        XCTAssertEqual(size, 64 << 20)
        let empty = try await mounter.probe(device: device)
        XCTAssertEqual(empty, .empty)

        try await mounter.makeFilesystem(device: device, fsType: "ext4")
        let probed = try await mounter.probe(device: device)
        XCTAssertEqual(probed, .filesystem("ext4"))
        try await mounter.checkFilesystem(device: device, fsType: "ext4")

        try await mounter.mount(device: device, at: stage, fsType: "ext4", options: ["noatime"])
        let staged = try await mounter.mountInfo(at: stage)
        XCTAssertEqual(staged?.source, device)
        XCTAssertEqual(staged?.fsType, "ext4")
        XCTAssertEqual(staged?.root, "/")
        XCTAssertEqual(staged?.isReadOnly, false)
        XCTAssertTrue(staged?.mountOptions.contains("noatime") == true, "\(String(describing: staged))")

        try await mounter.bindMount(source: stage, at: target, in: .host, readOnly: true, options: ["nosuid"])
        let bound = try await mounter.mountInfo(at: target)
        XCTAssertEqual(bound?.source, device)
        XCTAssertEqual(bound?.isReadOnly, true)
        XCTAssertTrue(bound?.mountOptions.contains("nosuid") == true)

        try "hello".write(toFile: stage + "/greeting", atomically: false, encoding: .utf8)
        XCTAssertEqual(try String(contentsOfFile: target + "/greeting", encoding: .utf8), "hello")
        XCTAssertFalse(FileManager.default.createFile(atPath: target + "/nope", contents: Data("x".utf8)),
                       "the read-only bind refuses writes")

        let stats = try await mounter.filesystemStats(path: target, in: .host)
        XCTAssertGreaterThan(stats.totalBytes, 50 << 20)
        XCTAssertLessThanOrEqual(stats.availableBytes, stats.totalBytes)
        XCTAssertGreaterThan(stats.usedInodes, 0)

        try await mounter.unmount(target, in: .host)
        let afterTarget = try await mounter.mountInfo(at: target)
        XCTAssertNil(afterTarget)
        try await mounter.unmount(stage, in: .host)
        try await mounter.detachLoop(device: device)
        try await mounter.detachLoop(device: device)  // idempotent
        let remaining = try await mounter.loopDevices(backing: file)
        XCTAssertEqual(remaining, [])
    }

    func testFsckRefusesAnExt4ItCannotRepairUnattended() async throws {
        let mounter = LinuxMounter(logger: logger)
        let file = try sparseFile("vol.img", bytes: 32 << 20)
        let device = try await mounter.attachLoop(file: file, readOnly: false)
        try await mounter.makeFilesystem(device: device, fsType: "ext4")
        // Clear the root inode and mark the filesystem unclean: `fsck -p` stops with
        // "UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY" (exit 4).
        try await Command.check(["debugfs", "-w", "-R", "clri <2>", device])
        try await Command.check(["debugfs", "-w", "-R", "ssv state 0", device])
        do {
            try await mounter.checkFilesystem(device: device, fsType: "ext4")
            XCTFail("a damaged filesystem must not pass the check")
        } catch let e as CairnError {
            XCTAssertEqual(e.code, .failedPrecondition)
            XCTAssertTrue(e.message.contains(device), e.message)
        }
        try await mounter.detachLoop(device: device)
    }

    func testXfsFormatsAndMounts() async throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/sbin/mkfs.xfs")
                          || FileManager.default.isExecutableFile(atPath: "/sbin/mkfs.xfs"), "xfsprogs not installed")
        let mounter = LinuxMounter(logger: logger)
        let file = try sparseFile("xfs.img", bytes: 320 << 20)  // mkfs.xfs wants at least 300 MiB
        let stage = try mkdir("xfs-stage")
        let device = try await mounter.attachLoop(file: file, readOnly: false)
        try await mounter.makeFilesystem(device: device, fsType: "xfs")
        let probed = try await mounter.probe(device: device)
        XCTAssertEqual(probed, .filesystem("xfs"))
        try await mounter.checkFilesystem(device: device, fsType: "xfs")
        try await mounter.mount(device: device, at: stage, fsType: "xfs", options: [])
        let mounted = try await mounter.mountInfo(at: stage)
        XCTAssertEqual(mounted?.fsType, "xfs")
        try await mounter.unmount(stage, in: .host)
        try await mounter.detachLoop(device: device)
    }

    /// The whole node lifecycle on the real kernel, including a reboot-like loss of every mount
    /// and loop device, after which a repeated NodeStageVolume finds the data intact.
    func testNodeServiceLifecycleOnTheRealKernel() async throws {
        let (root, staging, backing, mounter, node) = try await realNode(volumeID: "vol-1", mib: 64)
        let capability = Csi_V1_VolumeCapability.with {
            $0.accessMode.mode = .singleNodeMultiWriter  // two targets (rw and ro) on one node
            $0.mount = .init()
        }
        let stage = Csi_V1_NodeStageVolumeRequest.with {
            $0.volumeID = "vol-1"
            $0.stagingTargetPath = staging
            $0.volumeCapability = capability
        }
        func publish(_ name: String, readonly: Bool) -> Csi_V1_NodePublishVolumeRequest {
            .with {
                $0.volumeID = "vol-1"
                $0.stagingTargetPath = staging
                $0.targetPath = root + "/mount/" + name
                $0.volumeCapability = capability
                $0.readonly = readonly
            }
        }
        func unpublish(_ name: String) -> Csi_V1_NodeUnpublishVolumeRequest {
            .with { $0.volumeID = "vol-1"; $0.targetPath = root + "/mount/" + name }
        }
        let unstage = Csi_V1_NodeUnstageVolumeRequest.with { $0.volumeID = "vol-1"; $0.stagingTargetPath = staging }

        _ = try await node.nodeStageVolume(stage)
        _ = try await node.nodeStageVolume(stage)
        _ = try await node.nodePublishVolume(publish("rw", readonly: false))
        _ = try await node.nodePublishVolume(publish("rw", readonly: false))
        _ = try await node.nodePublishVolume(publish("ro", readonly: true))
        try "data".write(toFile: root + "/mount/rw/file", atomically: false, encoding: .utf8)
        XCTAssertEqual(try String(contentsOfFile: root + "/mount/ro/file", encoding: .utf8), "data")
        XCTAssertFalse(FileManager.default.createFile(atPath: root + "/mount/ro/other", contents: Data()))

        let stats = try await node.nodeGetVolumeStats(.with { $0.volumeID = "vol-1"; $0.volumePath = root + "/mount/rw" })
        XCTAssertEqual(stats.usage.count, 2)
        XCTAssertFalse(stats.volumeCondition.abnormal, stats.volumeCondition.message)

        do {
            _ = try await node.nodeUnstageVolume(unstage)
            XCTFail("unstage while published must fail")
        } catch let e as CairnError {
            XCTAssertEqual(e.code, .failedPrecondition)
        }

        // Reboot-like event: every mount and loop device vanishes; the records stay.
        for target in [root + "/mount/ro", root + "/mount/rw", staging] { try await mounter.unmount(target, in: .host) }
        for device in try await mounter.loopDevices(backing: try backing.file(volumeID: "vol-1")) {
            try await mounter.detachLoop(device: device)
        }
        await node.reconcile()
        let gone = try await node.nodeGetVolumeStats(.with { $0.volumeID = "vol-1"; $0.volumePath = root + "/mount/rw" })
        XCTAssertTrue(gone.volumeCondition.abnormal)

        _ = try await node.nodeStageVolume(stage)
        _ = try await node.nodePublishVolume(publish("rw", readonly: false))
        XCTAssertEqual(try String(contentsOfFile: root + "/mount/rw/file", encoding: .utf8), "data",
                       "re-staging after a reboot keeps the data (no reformat)")

        _ = try await node.nodeUnpublishVolume(unpublish("rw"))
        _ = try await node.nodeUnpublishVolume(unpublish("ro"))
        _ = try await node.nodeUnpublishVolume(unpublish("rw"))
        _ = try await node.nodeUnstageVolume(unstage)
        _ = try await node.nodeUnstageVolume(unstage)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/rw"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/ro"))
        let left = try await mounter.loopDevices(backing: try backing.file(volumeID: "vol-1"))
        XCTAssertEqual(left, [])
        let mountsLeft = try await mounter.mountTable().filter { Validate.isInside($0.mountPoint, root: root) }
        XCTAssertEqual(mountsLeft, [])
    }

    func testBlockAccessOnTheRealKernel() async throws {
        let (root, staging, backing, mounter, node) = try await realNode(volumeID: "vol-b", mib: 32)
        let capability = Csi_V1_VolumeCapability.with {
            $0.accessMode.mode = .singleNodeWriter
            $0.block = .init()
        }
        let target = root + "/mount/dev"
        _ = try await node.nodeStageVolume(.with {
            $0.volumeID = "vol-b"; $0.stagingTargetPath = staging; $0.volumeCapability = capability
        })
        _ = try await node.nodePublishVolume(.with {
            $0.volumeID = "vol-b"; $0.stagingTargetPath = staging; $0.targetPath = target; $0.volumeCapability = capability
        })
        // The target is the device: writes through it land in the backing file.
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: target))
        try handle.seek(toOffset: 1 << 20)
        try handle.write(contentsOf: Data("block!".utf8))
        try handle.synchronize()
        try handle.close()
        let stats = try await node.nodeGetVolumeStats(.with { $0.volumeID = "vol-b"; $0.volumePath = target })
        XCTAssertEqual(stats.usage.first?.total, 32 << 20)
        _ = try await node.nodeUnpublishVolume(.with { $0.volumeID = "vol-b"; $0.targetPath = target })
        _ = try await node.nodeUnstageVolume(.with { $0.volumeID = "vol-b"; $0.stagingTargetPath = staging })
        XCTAssertFalse(FileManager.default.fileExists(atPath: target))
        let backingFile = try FileHandle(forReadingFrom: URL(fileURLWithPath: try backing.file(volumeID: "vol-b")))
        try backingFile.seek(toOffset: 1 << 20)
        XCTAssertEqual(try backingFile.read(upToCount: 6), Data("block!".utf8))
        try backingFile.close()
        let left = try await mounter.loopDevices(backing: try backing.file(volumeID: "vol-b"))
        XCTAssertEqual(left, [])
    }
}
