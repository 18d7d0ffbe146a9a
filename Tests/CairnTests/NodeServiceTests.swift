import CSIProto
import CairnCSI
import CairnCore
import CairnLocal
import CairnNode
import CairnStore
import Foundation
import Logging
import Synchronization
import XCTest

/// Node semantics against the real embedded store and file backing in a temp directory, with the
/// kernel replaced by an in-memory fake (NodeLinuxMounterTests exercises the real one as root).
final class NodeServiceTests: XCTestCase {
    var dir = ""
    var root = ""
    var staging = ""
    var store: SQLiteStore!
    var backing: LocalFileBacking!
    var mounter: NodeFakeMounter!
    var node: NodeService!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-node-\(UUID().uuidString)"
        root = dir + "/csi"
        staging = root + "/staging"
        for path in [root, staging, root + "/mount"] {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        }
        store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        backing = try LocalFileBacking(dataDir: dir + "/data")
        mounter = NodeFakeMounter()
        node = makeNode(mounter: mounter)
        try await createVolume("vol-1")
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func makeNode(mounter: NodeFakeMounter, locks: VolumeLocks = VolumeLocks()) -> NodeService {
        NodeService(nodeID: "node-a", topology: ["zone": "z1"], maxVolumesPerNode: 16, store: store,
                    backing: backing, mounter: mounter, pathRoots: [root], locks: locks,
                    logger: Logger(label: "test"))
    }

    func createVolume(_ id: String, modes: [AccessMode] = [.singleNodeWriter], fsType: String = "",
                      attachTo nodeID: String? = "node-a") async throws {
        let volume = VolumeRecord(id: id, name: "pvc-\(id)", capacityBytes: 64 << 20, parameters: [:], fsType: fsType,
                                  accessModes: modes.map(\.rawValue), accessibleTopology: [:])
        try await store.createVolume(volume)
        try backing.create(volume)
        if let nodeID {
            _ = try await store.attach(volumeID: id, nodeID: nodeID, readonly: false,
                                       accessMode: modes[0].rawValue, exclusive: true, nodeLimit: 0)
        }
    }

    // MARK: Request builders

    static func capability(_ mode: AccessMode = .singleNodeWriter, block: Bool = false, fs: String = "",
                           flags: [String] = []) -> Csi_V1_VolumeCapability {
        var c = Csi_V1_VolumeCapability()
        c.accessMode.mode = mode
        if block { c.block = .init() } else { c.mount = .with { $0.fsType = fs; $0.mountFlags = flags } }
        return c
    }

    func stageRequest(_ id: String = "vol-1", path: String? = nil,
                      capability: Csi_V1_VolumeCapability? = capability()) -> Csi_V1_NodeStageVolumeRequest {
        .with {
            $0.volumeID = id
            $0.stagingTargetPath = path ?? staging
            if let capability { $0.volumeCapability = capability }
            $0.publishContext = ["device": "/dev/mock"]
        }
    }

    func publishRequest(_ id: String = "vol-1", target: String = "target", readonly: Bool = false,
                        capability: Csi_V1_VolumeCapability? = capability(),
                        staging stagingPath: String? = nil) -> Csi_V1_NodePublishVolumeRequest {
        .with {
            $0.volumeID = id
            $0.targetPath = target.contains("/") ? target : root + "/mount/" + target
            $0.stagingTargetPath = stagingPath ?? staging
            if let capability { $0.volumeCapability = capability }
            $0.readonly = readonly
            $0.volumeContext = ["any": "thing"]
        }
    }

    func unpublishRequest(_ id: String = "vol-1", target: String = "target") -> Csi_V1_NodeUnpublishVolumeRequest {
        .with { $0.volumeID = id; $0.targetPath = target.contains("/") ? target : root + "/mount/" + target }
    }

    func unstageRequest(_ id: String = "vol-1", path: String? = nil) -> Csi_V1_NodeUnstageVolumeRequest {
        .with { $0.volumeID = id; $0.stagingTargetPath = path ?? staging }
    }

    func statsRequest(_ id: String = "vol-1", path: String) -> Csi_V1_NodeGetVolumeStatsRequest {
        .with { $0.volumeID = id; $0.volumePath = path }
    }


    // MARK: Validation

    func testMissingRequiredFieldsAreInvalidArgumentAndTouchNothing() async throws {
        let node = self.node!
        await assertStatus(.invalidArgument) { try await node.nodeStageVolume(self.stageRequest("")) }
        await assertStatus(.invalidArgument) { try await node.nodeStageVolume(self.stageRequest(path: "")) }
        await assertStatus(.invalidArgument) { try await node.nodeStageVolume(self.stageRequest(capability: nil)) }
        await assertStatus(.invalidArgument) {
            try await node.nodeStageVolume(self.stageRequest(capability: Self.capability(.unknown)))
        }
        await assertStatus(.invalidArgument) { try await node.nodeUnstageVolume(self.unstageRequest("")) }
        await assertStatus(.invalidArgument) { try await node.nodeUnstageVolume(self.unstageRequest(path: "")) }
        await assertStatus(.invalidArgument) { try await node.nodePublishVolume(self.publishRequest("")) }
        await assertStatus(.invalidArgument) { try await node.nodePublishVolume(.with { $0.volumeID = "fake-vol-id-1" }) }
        await assertStatus(.invalidArgument) { try await node.nodePublishVolume(self.publishRequest(capability: nil, staging: "")) }
        await assertStatus(.invalidArgument) { try await node.nodeUnpublishVolume(self.unpublishRequest("")) }
        await assertStatus(.invalidArgument) { try await node.nodeUnpublishVolume(.with { $0.volumeID = "vol-1" }) }
        await assertStatus(.invalidArgument) { try await node.nodeGetVolumeStats(self.statsRequest("", path: "some/path")) }
        await assertStatus(.invalidArgument) { try await node.nodeGetVolumeStats(.with { $0.volumeID = "vol-1" }) }
        await assertStatus(.invalidArgument) {
            try await node.nodeStageVolume(self.stageRequest(capability: Self.capability(flags: ["bind"])))
        }
        // CSI's table: STAGE_UNSTAGE_VOLUME advertised and no staging path → FAILED_PRECONDITION.
        await assertStatus(.failedPrecondition) { try await node.nodePublishVolume(self.publishRequest(staging: "")) }
        XCTAssertEqual(mounter.calls, [])
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/target"))
    }

    func testPathsOutsideTheRootsOrWithDotDotAreInvalidArgumentAndTouchNothing() async throws {
        let node = self.node!
        let bad = ["/etc/cairn", root + "/../escape", root + "/staging/./x", "relative/path", "/"]
        for path in bad {
            await assertStatus(.invalidArgument) { try await node.nodeStageVolume(self.stageRequest(path: path)) }
            await assertStatus(.invalidArgument) { try await node.nodeUnstageVolume(self.unstageRequest(path: path)) }
            await assertStatus(.invalidArgument) { try await node.nodePublishVolume(self.publishRequest(target: path)) }
            await assertStatus(.invalidArgument) { try await node.nodePublishVolume(self.publishRequest(staging: path)) }
            await assertStatus(.invalidArgument) { try await node.nodeUnpublishVolume(self.unpublishRequest(target: path)) }
        }
        // A symlink inside the root that points outside is refused too.
        try FileManager.default.createSymbolicLink(atPath: root + "/mount/link", withDestinationPath: "/tmp")
        await assertStatus(.invalidArgument) {
            try await node.nodePublishVolume(self.publishRequest(target: self.root + "/mount/link/target"))
        }
        await assertStatus(.invalidArgument) { try await node.nodeStageVolume(self.stageRequest("../vol-1")) }
        XCTAssertEqual(mounter.calls, [], "validation must happen before any kernel-facing work")
        let stageRecord = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertNil(stageRecord)
    }

    func testUnknownVolumeIsNotFound() async throws {
        let node = self.node!
        await assertStatus(.notFound) { try await node.nodeStageVolume(self.stageRequest("fake-vol-id-1")) }
        await assertStatus(.notFound) { try await node.nodeUnstageVolume(self.unstageRequest("fake-vol-id-1")) }
        await assertStatus(.notFound) { try await node.nodePublishVolume(self.publishRequest("fake-vol-id-1")) }
        await assertStatus(.notFound) { try await node.nodeUnpublishVolume(self.unpublishRequest("fake-vol-id-1")) }
        await assertStatus(.notFound) { try await node.nodeGetVolumeStats(self.statsRequest("fake-vol-id-1", path: "some/path")) }
        XCTAssertEqual(mounter.calls, [])
    }

    func testStageWithoutControllerPublishToThisNodeIsFailedPrecondition() async throws {
        try await createVolume("vol-2", attachTo: nil)
        try await createVolume("vol-3", attachTo: "node-b")
        let node = self.node!
        await assertStatus(.failedPrecondition) { try await node.nodeStageVolume(self.stageRequest("vol-2")) }
        await assertStatus(.failedPrecondition) { try await node.nodeStageVolume(self.stageRequest("vol-3")) }
        XCTAssertEqual(mounter.calls, [])
    }

    // MARK: Stage

    func testStageFormatsOnceMountsAndIsIdempotent() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodeStageVolume(stageRequest())
        XCTAssertEqual(mounter.count("mkfs"), 1)
        XCTAssertEqual(mounter.count("attach"), 1)
        XCTAssertEqual(mounter.count("mount"), 1)
        let mounts = mounter.mounts(at: staging)
        XCTAssertEqual(mounts.count, 1)
        XCTAssertEqual(mounts.first?.source, "/dev/loop0")
        XCTAssertEqual(mounts.first?.fsType, "ext4")
        let record = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertEqual(record?.devicePath, "/dev/loop0")
        XCTAssertEqual(record?.fsType, "ext4")
        XCTAssertEqual(record?.stagingPath, staging)
    }

    func testAStageWhoseEngineFileWasDetachedIsUnstagedAndRestagedNotCalledStaged() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        mounter.detachBackingFile(of: "/dev/loop0")
        // A repeated NodeStage replaces the dead staging mount and loop device.
        _ = try await node.nodeStageVolume(stageRequest())
        XCTAssertEqual(mounter.mounts(at: staging).map(\.source), ["/dev/loop1"])
        XCTAssertEqual(mounter.count("detach /dev/loop0"), 1)
        let record = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertEqual(record?.devicePath, "/dev/loop1")
        // NodeUnstage finds a dead one too: the mount goes, the device is detached.
        mounter.detachBackingFile(of: "/dev/loop1")
        _ = try await node.nodeUnstageVolume(unstageRequest())
        XCTAssertTrue(mounter.mounts(at: staging).isEmpty, "the dead staging mount leaked")
        XCTAssertEqual(mounter.loopCount, 0)
        let after = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertNil(after)
    }

    func testStageUsesTheRequestedFilesystemAndMountFlags() async throws {
        _ = try await node.nodeStageVolume(stageRequest(capability: Self.capability(fs: "xfs", flags: ["noatime"])))
        XCTAssertEqual(mounter.calls.filter { $0.hasPrefix("mkfs") }, ["mkfs /dev/loop0 xfs"])
        XCTAssertEqual(mounter.mounts(at: staging).first?.fsType, "xfs")
        XCTAssertTrue(mounter.calls.contains("mount /dev/loop0 \(staging) xfs noatime"), "\(mounter.calls)")
    }

    func testRestageWithAnIncompatibleCapabilityIsAlreadyExists() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        let node = self.node!
        await assertStatus(.alreadyExists) { try await node.nodeStageVolume(self.stageRequest(capability: Self.capability(fs: "xfs"))) }
        await assertStatus(.alreadyExists) { try await node.nodeStageVolume(self.stageRequest(capability: Self.capability(block: true))) }
        await assertStatus(.alreadyExists) {
            try await node.nodeStageVolume(self.stageRequest(capability: Self.capability(flags: ["noatime"])))
        }
        await assertStatus(.alreadyExists) {
            try await node.nodeStageVolume(self.stageRequest(capability: Self.capability(.singleNodeReaderOnly)))
        }
        XCTAssertEqual(mounter.count("mkfs"), 1)
        XCTAssertEqual(mounter.mounts(at: staging).count, 1)
    }

    func testStageNeverReformatsAVolumeThatHoldsAnotherFilesystem() async throws {
        mounter.setContent(.filesystem("xfs"), file: try backing.file(volumeID: "vol-1"))
        let node = self.node!
        await assertStatus(.failedPrecondition) { try await node.nodeStageVolume(self.stageRequest()) }
        mounter.setContent(.other("a dos partition table"), file: try backing.file(volumeID: "vol-1"))
        await assertStatus(.failedPrecondition) { try await node.nodeStageVolume(self.stageRequest()) }
        XCTAssertEqual(mounter.count("mkfs"), 0)
        XCTAssertEqual(mounter.loopCount, 0, "a loop device attached by a failed stage is detached again")
        let stageRecord = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertNil(stageRecord)
        // With the filesystem it has, it stages (after a check).
        mounter.setContent(.filesystem("xfs"), file: try backing.file(volumeID: "vol-1"))
        _ = try await node.nodeStageVolume(stageRequest(capability: Self.capability(fs: "xfs")))
        XCTAssertEqual(mounter.count("fsck"), 1)
    }

    func testStageOfAVolumeCreatedWithAnotherFilesystemIsFailedPrecondition() async throws {
        try await createVolume("vol-x", fsType: "xfs")
        let node = self.node!
        await assertStatus(.failedPrecondition) {
            try await node.nodeStageVolume(self.stageRequest("vol-x", capability: Self.capability(fs: "ext4")))
        }
        _ = try await node.nodeStageVolume(stageRequest("vol-x", capability: Self.capability()))
        XCTAssertEqual(mounter.mounts(at: staging).first?.fsType, "xfs", "the volume's filesystem is the default")
    }

    func testStagingPathMustExist() async throws {
        let node = self.node!
        await assertStatus(.failedPrecondition) {
            try await node.nodeStageVolume(self.stageRequest(path: self.root + "/missing"))
        }
        XCTAssertEqual(mounter.count("attach"), 0)
    }

    func testConcurrentCallsOnOneVolumeAreAborted() async throws {
        let gate = NodeGate()
        let blocking = NodeFakeMounter(gate: gate)
        let node = makeNode(mounter: blocking)
        let request = stageRequest()
        let first = Task { try await node.nodeStageVolume(request) }
        try await gate.waitForArrival()
        await assertStatus(.aborted) { try await node.nodeStageVolume(request) }
        await assertStatus(.aborted) { try await node.nodeUnstageVolume(self.unstageRequest()) }
        await assertStatus(.aborted) { try await node.nodePublishVolume(self.publishRequest()) }
        await assertStatus(.aborted) { try await node.nodeUnpublishVolume(self.unpublishRequest()) }
        await gate.open()
        _ = try await first.value
        XCTAssertEqual(blocking.count("attach"), 1)
        XCTAssertEqual(blocking.mounts(at: staging).count, 1)
        // The lock is released: the next call goes through.
        _ = try await node.nodeStageVolume(request)
    }

    func testRestageAfterARebootReattachesWithoutReformatting() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest())
        mounter.reboot()
        // The CO must stage again first.
        let node = self.node!
        await assertStatus(.failedPrecondition) { try await node.nodePublishVolume(self.publishRequest()) }
        _ = try await node.nodeStageVolume(stageRequest())
        XCTAssertEqual(mounter.count("attach"), 2)
        XCTAssertEqual(mounter.count("mkfs"), 1, "the filesystem survives a reboot; it is checked, not recreated")
        XCTAssertEqual(mounter.count("fsck"), 1)
        XCTAssertEqual(mounter.mounts(at: staging).count, 1)
        _ = try await node.nodePublishVolume(publishRequest())
        XCTAssertEqual(mounter.mounts(at: root + "/mount/target").count, 1)
    }

    func testAPluginRestartReusesTheExistingLoopDevice() async throws {
        _ = try await node.nodeStageVolume(stageRequest(capability: Self.capability(block: true)))
        // The store forgot the stage (e.g. crash before persisting): the loop device is reused.
        try await store.removeStage(volumeID: "vol-1", nodeID: "node-a")
        let restarted = makeNode(mounter: mounter)
        await restarted.reconcile()
        _ = try await restarted.nodeStageVolume(stageRequest(capability: Self.capability(block: true)))
        XCTAssertEqual(mounter.count("attach"), 1)
        let adopted = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertEqual(adopted?.devicePath, "/dev/loop0")
    }

    // MARK: Unstage

    func testUnstageWithAPublishedTargetIsFailedPrecondition() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest())
        let node = self.node!
        await assertStatus(.failedPrecondition) { try await node.nodeUnstageVolume(self.unstageRequest()) }
        XCTAssertEqual(mounter.mounts(at: staging).count, 1)

        _ = try await node.nodeUnpublishVolume(unpublishRequest())
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/target"), "the SP removes the target it created")
        _ = try await node.nodeUnstageVolume(unstageRequest())
        XCTAssertEqual(mounter.mounts(at: staging).count, 0)
        XCTAssertEqual(mounter.loopCount, 0)
        XCTAssertTrue(FileManager.default.fileExists(atPath: staging), "the CO's staging directory is left in place")
        let stageRecord = try await store.stage(volumeID: "vol-1", nodeID: "node-a")
        XCTAssertNil(stageRecord)
        let publishes = try await store.publishes(volumeID: "vol-1")
        XCTAssertEqual(publishes, [])
    }

    func testUnpublishAndUnstageOfSomethingNeverDoneAreOK() async throws {
        _ = try await node.nodeUnpublishVolume(unpublishRequest())
        _ = try await node.nodeUnstageVolume(unstageRequest())
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest())
        for _ in 0..<3 { _ = try await node.nodeUnpublishVolume(unpublishRequest()) }
        for _ in 0..<3 { _ = try await node.nodeUnstageVolume(unstageRequest()) }
        XCTAssertEqual(mounter.count("unmount"), 2)
        XCTAssertEqual(mounter.count("detach"), 1)
    }

    func testUnstageLeavesAForeignMountAlone() async throws {
        mounter.addForeignMount(at: staging)
        _ = try await node.nodeUnstageVolume(unstageRequest())
        XCTAssertEqual(mounter.mounts(at: staging).count, 1)
        let node = self.node!
        await assertStatus(.failedPrecondition) { try await node.nodeStageVolume(self.stageRequest()) }
    }

    // MARK: Publish

    func testPublishReadonlyMakesAReadOnlyBindMount() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest(readonly: true))
        _ = try await node.nodePublishVolume(publishRequest(readonly: true))
        let target = root + "/mount/target"
        XCTAssertEqual(mounter.calls.filter { $0.hasPrefix("bind") }, ["bind \(staging) \(target) ro"])
        XCTAssertEqual(mounter.mounts(at: target).first?.isReadOnly, true)
        var isDirectory: ObjCBool = false
        XCTAssertTrue(FileManager.default.fileExists(atPath: target, isDirectory: &isDirectory) && isDirectory.boolValue)
        let node = self.node!
        await assertStatus(.alreadyExists) { try await node.nodePublishVolume(self.publishRequest(readonly: false)) }
        await assertStatus(.alreadyExists) {
            try await node.nodePublishVolume(self.publishRequest(readonly: true, capability: Self.capability(.singleNodeMultiWriter)))
        }
        // A reader-only access mode is read-only without the flag.
        _ = try await node.nodeUnpublishVolume(unpublishRequest(target: "target"))
        _ = try await node.nodePublishVolume(publishRequest(target: "reader", capability: Self.capability(.singleNodeReaderOnly)))
        XCTAssertEqual(mounter.mounts(at: root + "/mount/reader").first?.isReadOnly, true)
    }

    func testPublishCarriesOnlyPerMountFlagsToTheBind() async throws {
        _ = try await node.nodeStageVolume(stageRequest(capability: Self.capability(flags: ["noexec", "discard"])))
        _ = try await node.nodePublishVolume(publishRequest(capability: Self.capability(flags: ["noexec", "discard"])))
        XCTAssertEqual(mounter.calls.filter { $0.hasPrefix("bind") }, ["bind \(staging) \(root)/mount/target rw noexec"])
    }

    func testSingleNodeModesAllowOneTargetPerNode() async throws {
        try await createVolume("vol-s", modes: [.singleNodeSingleWriter])
        let cap = Self.capability(.singleNodeSingleWriter)
        _ = try await node.nodeStageVolume(stageRequest("vol-s", capability: cap))
        _ = try await node.nodePublishVolume(publishRequest("vol-s", target: "target", capability: cap))
        _ = try await node.nodePublishVolume(publishRequest("vol-s", target: "target", capability: cap))
        let node = self.node!
        await assertStatus(.failedPrecondition) {
            try await node.nodePublishVolume(self.publishRequest("vol-s", target: "other_target", capability: cap))
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/other_target"), "a refused publish leaves no target")
        // The spec's table refuses any different second target for non-multi modes, read-only too.
        await assertStatus(.failedPrecondition) {
            try await node.nodePublishVolume(self.publishRequest("vol-s", target: "reader", readonly: true, capability: cap))
        }
        await assertStatus(.failedPrecondition) {
            try await node.nodePublishVolume(self.publishRequest("vol-s", target: "legacy", capability: Self.capability(.singleNodeWriter)))
        }
        // Once the first target is gone, another may be published.
        _ = try await node.nodeUnpublishVolume(unpublishRequest("vol-s", target: "target"))
        _ = try await node.nodePublishVolume(publishRequest("vol-s", target: "other_target", capability: cap))
    }

    func testMultiWriterModesAllowSeveralWritableTargets() async throws {
        try await createVolume("vol-m", modes: [.singleNodeMultiWriter])
        let cap = Self.capability(.singleNodeMultiWriter)
        _ = try await node.nodeStageVolume(stageRequest("vol-m", capability: cap))
        _ = try await node.nodePublishVolume(publishRequest("vol-m", target: "a", capability: cap))
        _ = try await node.nodePublishVolume(publishRequest("vol-m", target: "b", capability: cap))
        let publishes = try await store.publishes(volumeID: "vol-m")
        XCTAssertEqual(publishes.count, 2)
    }

    func testPublishRequiresARealStage() async throws {
        let node = self.node!
        await assertStatus(.failedPrecondition) { try await node.nodePublishVolume(self.publishRequest()) }
        _ = try await node.nodeStageVolume(stageRequest())
        await assertStatus(.failedPrecondition) {
            try await node.nodePublishVolume(self.publishRequest(staging: self.root + "/other-staging"))
        }
        await assertStatus(.failedPrecondition) {
            try await node.nodePublishVolume(self.publishRequest(capability: Self.capability(block: true)))
        }
        // Record present but the staging mount vanished behind the plugin's back.
        mounter.removeMounts(at: staging)
        await assertStatus(.failedPrecondition) { try await node.nodePublishVolume(self.publishRequest()) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/target"))
    }

    func testAReadOnlyStageCannotBePublishedReadWrite() async throws {
        let reader = Self.capability(.singleNodeReaderOnly)
        _ = try await node.nodeStageVolume(stageRequest(capability: reader))
        XCTAssertEqual(mounter.mounts(at: staging).first?.isReadOnly, true)
        let node = self.node!
        await assertStatus(.failedPrecondition) { try await node.nodePublishVolume(self.publishRequest()) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/target"))
        _ = try await node.nodePublishVolume(publishRequest(capability: reader))
        XCTAssertEqual(mounter.mounts(at: root + "/mount/target").first?.isReadOnly, true)
    }

    func testPublishTargetParentMustExist() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        let node = self.node!
        await assertStatus(.failedPrecondition) {
            try await node.nodePublishVolume(self.publishRequest(target: self.root + "/mount/missing/target"))
        }
    }

    func testBlockAccessBindsTheDeviceOntoAFile() async throws {
        let cap = Self.capability(block: true)
        _ = try await node.nodeStageVolume(stageRequest(capability: cap))
        XCTAssertEqual(mounter.count("mount"), 0)
        XCTAssertEqual(mounter.count("mkfs"), 0)
        XCTAssertEqual(mounter.count("probe"), 0, "block access never looks for a filesystem")
        _ = try await node.nodePublishVolume(publishRequest(capability: cap))
        let target = root + "/mount/target"
        XCTAssertEqual(mounter.calls.filter { $0.hasPrefix("bind") }, ["bind /dev/loop0 \(target) rw"])
        var isDirectory: ObjCBool = true
        XCTAssertTrue(FileManager.default.fileExists(atPath: target, isDirectory: &isDirectory))
        XCTAssertFalse(isDirectory.boolValue, "block targets are files")
        let stats = try await node.nodeGetVolumeStats(statsRequest(path: target))
        XCTAssertEqual(stats.usage.map(\.total), [64 << 20])
        XCTAssertFalse(stats.volumeCondition.abnormal, stats.volumeCondition.message)
        _ = try await node.nodeUnpublishVolume(unpublishRequest())
        XCTAssertFalse(FileManager.default.fileExists(atPath: target))
        _ = try await node.nodeUnstageVolume(unstageRequest())
        XCTAssertEqual(mounter.loopCount, 0)
    }

    // MARK: Stats, capabilities, info

    func testVolumeStatsReportUsageAndCondition() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest())
        let target = root + "/mount/target"
        for path in [target, staging] {
            let stats = try await node.nodeGetVolumeStats(statsRequest(path: path))
            XCTAssertEqual(stats.usage.count, 2)
            XCTAssertEqual(stats.usage.first { $0.unit == .bytes }?.total, 60 << 20)
            XCTAssertEqual(stats.usage.first { $0.unit == .inodes }?.used, 11)
            XCTAssertTrue(stats.hasVolumeCondition)
            XCTAssertFalse(stats.volumeCondition.abnormal, stats.volumeCondition.message)
        }
        let node = self.node!
        await assertStatus(.notFound) { try await node.nodeGetVolumeStats(self.statsRequest(path: "some/path")) }
        await assertStatus(.notFound) { try await node.nodeGetVolumeStats(self.statsRequest(path: self.root + "/mount")) }
        await assertStatus(.notFound) { try await node.nodeGetVolumeStats(self.statsRequest(path: "/etc")) }

        // The mount disappears behind the plugin's back: still the volume's path, now abnormal.
        mounter.removeMounts(at: target)
        let gone = try await node.nodeGetVolumeStats(statsRequest(path: target))
        XCTAssertTrue(gone.volumeCondition.abnormal)
        XCTAssertTrue(gone.volumeCondition.message.contains(target), gone.volumeCondition.message)
        // The filesystem went read-only after I/O errors: abnormal.
        mounter.markReadOnly(at: staging)
        let readOnly = try await node.nodeGetVolumeStats(statsRequest(path: staging))
        XCTAssertTrue(readOnly.volumeCondition.abnormal)
        XCTAssertTrue(readOnly.volumeCondition.message.contains("read-only"), readOnly.volumeCondition.message)
    }

    func testCapabilitiesAndInfo() async throws {
        let caps = try await node.nodeGetCapabilities(.init()).capabilities.map(\.rpc.type)
        XCTAssertEqual(caps, [.stageUnstageVolume, .getVolumeStats, .volumeCondition, .singleNodeMultiWriter, .expandVolume])
        let info = try await node.nodeGetInfo(.init())
        XCTAssertEqual(info.nodeID, "node-a")
        XCTAssertEqual(info.maxVolumesPerNode, 16)
        XCTAssertEqual(info.accessibleTopology.segments, ["topology.cairn.dev/node": "node-a", "zone": "z1"])
    }

    // MARK: mountinfo

    func testMountInfoParserHandlesEscapesOptionalFieldsAndTheSeparator() {
        let sample = #"""
            22 27 0:21 / /proc rw,relatime - proc proc rw
            36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
            100 27 7:3 / /var/lib/cairn/staging/pv\040one\011tab rw,relatime shared:5 master:7 - ext4 /dev/loop3 rw
            101 27 0:6 /loop3 /var/lib/kubelet/pods/x/volumeDevices/back\134slash ro,nosuid - devtmpfs udev rw,size=10k
            102 27 0:50 / /weird\0 rw - tmpfs  rw
            garbage line
            """#
        let mounts = MountTable.parse(sample)
        XCTAssertEqual(mounts.count, 5)
        XCTAssertEqual(mounts[1].root, "/mnt1")
        XCTAssertEqual(mounts[1].optionalFields, ["master:1"])
        XCTAssertEqual(mounts[1].superOptions, ["rw", "errors=continue"])
        XCTAssertEqual(mounts[1].major, 98)
        let loop = mounts[2]
        XCTAssertEqual(loop.mountPoint, "/var/lib/cairn/staging/pv one\ttab")
        XCTAssertEqual(loop.optionalFields, ["shared:5", "master:7"])
        XCTAssertEqual(loop.fsType, "ext4")
        XCTAssertEqual(loop.source, "/dev/loop3")
        XCTAssertEqual(loop.major, 7)
        XCTAssertEqual(loop.minor, 3)
        XCTAssertEqual(loop.mountOptions, ["rw", "relatime"])
        XCTAssertFalse(loop.isReadOnly)
        let block = mounts[3]
        XCTAssertEqual(block.mountPoint, "/var/lib/kubelet/pods/x/volumeDevices/back\\slash")
        XCTAssertEqual(block.root, "/loop3")
        XCTAssertEqual(block.source, "udev")
        XCTAssertTrue(block.isReadOnly)
        XCTAssertEqual(mounts[4].mountPoint, "/weird\\0", "an incomplete escape is kept as is")
        XCTAssertEqual(mounts[4].source, "", "an empty source does not shift the fields")
        XCTAssertEqual(MountTable.unescape(#"a\040b\134\101"#), "a b\\A")
    }
}

// MARK: - Fakes

/// Lets a test hold an operation inside the mounter while it checks what concurrent calls see.
actor NodeGate {
    private var isOpen = false
    private var waiters: [CheckedContinuation<Void, Never>] = []
    private var arrivals = 0

    func pass() async {
        arrivals += 1
        if isOpen { return }
        await withCheckedContinuation { waiters.append($0) }
    }

    func open() {
        isOpen = true
        waiters.forEach { $0.resume() }
        waiters = []
    }

    func waitForArrival(timeout: Duration = .seconds(10)) async throws {
        let deadline = ContinuousClock.now + timeout
        while arrivals == 0 {
            guard ContinuousClock.now < deadline else { throw CairnError.internal("nothing reached the gate") }
            try await Task.sleep(for: .milliseconds(5))
        }
    }
}

/// An in-memory kernel: loop devices, device contents (keyed by backing file, so a filesystem
/// survives a "reboot"), and a mount table. Target and staging directories are real (temp dir).
final class NodeFakeMounter: Mounter {
    struct State {
        var loops: [String: String] = [:]  // device → backing file
        var nextLoop = 0
        var contents: [String: DeviceContent] = [:]  // backing file → content
        var mounts: [MountInfo] = []
        var nextMountID = 1000
        var calls: [String] = []
    }

    private let state = Mutex(State())
    private let gate: NodeGate?

    init(gate: NodeGate? = nil) {
        self.gate = gate
    }

    var calls: [String] { state.withLock { $0.calls } }
    var loopCount: Int { state.withLock { $0.loops.count } }
    func count(_ prefix: String) -> Int { calls.filter { $0 == prefix || $0.hasPrefix(prefix + " ") }.count }
    func mounts(at path: String) -> [MountInfo] { state.withLock { $0.mounts.filter { $0.mountPoint == path } } }
    func setContent(_ content: DeviceContent, file: String) { state.withLock { $0.contents[file] = content } }
    func removeMounts(at path: String) { state.withLock { $0.mounts.removeAll { $0.mountPoint == path } } }

    func markReadOnly(at path: String) {
        state.withLock { s in
            for i in s.mounts.indices where s.mounts[i].mountPoint == path { s.mounts[i].superOptions = ["ro"] }
        }
    }

    /// Everything the kernel held is gone; files (and the filesystems in them) remain.
    func reboot() {
        state.withLock { s in
            s.loops = [:]
            s.mounts = []
            s.nextLoop = 0
        }
    }

    /// The loop device's backing file was detached from under it (an engine's FUSE mount
    /// detached lazily): sysfs then names it by its path in the detached mount.
    func detachBackingFile(of device: String) {
        state.withLock { $0.loops[device] = "/volume" }
    }

    func addForeignMount(at path: String) {
        state.withLock { s in
            let foreign = Self.entry(&s, source: "/dev/sdz1", at: path, fsType: "ext4", readOnly: false, root: "/")
            s.mounts.append(foreign)
        }
    }

    private static func entry(_ s: inout State, source: String, at path: String, fsType: String, readOnly: Bool,
                              root: String, major: UInt32 = 7, minor: UInt32 = 0) -> MountInfo {
        s.nextMountID += 1
        return MountInfo(mountID: s.nextMountID, parentID: 1, major: major, minor: minor, root: root, mountPoint: path,
                         mountOptions: [readOnly ? "ro" : "rw", "relatime"], optionalFields: [], fsType: fsType,
                         source: source, superOptions: ["rw"])
    }

    private func record(_ call: String) { state.withLock { $0.calls.append(call) } }

    func attachLoop(file: String, readOnly: Bool) async throws -> String {
        record("attach \(file)\(readOnly ? " ro" : "")")
        if let gate { await gate.pass() }
        guard FileManager.default.fileExists(atPath: file) else { throw CairnError.internal("no such file \(file)") }
        return state.withLock { s in
            let device = "/dev/loop\(s.nextLoop)"
            s.nextLoop += 1
            s.loops[device] = file
            return device
        }
    }

    func loopDevices(backing file: String) async throws -> [String] {
        state.withLock { s in s.loops.filter { $0.value == file }.map(\.key).sorted() }
    }

    func detachLoop(device: String) async throws {
        record("detach \(device)")
        state.withLock { _ = $0.loops.removeValue(forKey: device) }
    }

    func probe(device: String) async throws -> DeviceContent {
        record("probe \(device)")
        return try state.withLock { s in
            guard let file = s.loops[device] else { throw CairnError.internal("no device \(device)") }
            return s.contents[file] ?? .empty
        }
    }

    func makeFilesystem(device: String, fsType: String) async throws {
        record("mkfs \(device) \(fsType)")
        try state.withLock { s in
            guard let file = s.loops[device] else { throw CairnError.internal("no device \(device)") }
            s.contents[file] = .filesystem(fsType)
        }
    }

    func checkFilesystem(device: String, fsType: String) async throws {
        record("fsck \(device) \(fsType)")
    }

    func mount(device: String, at target: String, fsType: String, options: [String]) async throws {
        record("mount \(device) \(target) \(fsType) \(options.joined(separator: ","))")
        try Self.requireExisting(target)
        state.withLock { s in
            let mount = Self.entry(&s, source: device, at: target, fsType: fsType, readOnly: options.contains("ro"), root: "/")
            s.mounts.append(mount)
        }
    }

    func namespace(ofProcess pid: Int32) async throws -> MountNamespace {
        throw MountNamespaceGone(pid: pid, reason: "does not exist (the fake has no processes)")
    }

    func inspect(_ path: String, in namespace: MountNamespace) async throws -> PathState {
        HostPaths.inspect(path, mountTable: state.withLock { $0.mounts })
    }

    func makeTarget(_ path: String, for access: AccessType, in namespace: MountNamespace) async throws -> Bool {
        try HostPaths.makeTarget(path, for: access)
    }

    func removeTarget(_ path: String, in namespace: MountNamespace) async throws -> Bool {
        try HostPaths.removeTarget(path)
    }

    func bindMount(source: String, at target: String, in namespace: MountNamespace, readOnly: Bool,
                   options: [String]) async throws {
        record((["bind", source, target, readOnly ? "ro" : "rw"] + options).joined(separator: " "))
        try Self.requireExisting(target)
        try state.withLock { s in
            if s.loops[source] != nil {
                let bind = Self.entry(&s, source: "udev", at: target, fsType: "devtmpfs", readOnly: readOnly,
                                      root: "/" + (source as NSString).lastPathComponent, major: 0, minor: 6)
                s.mounts.append(bind)
            } else if let top = s.mounts.last(where: { $0.mountPoint == source }) {
                var bind = Self.entry(&s, source: top.source, at: target, fsType: top.fsType, readOnly: readOnly, root: "/")
                bind.superOptions = top.superOptions
                s.mounts.append(bind)
            } else {
                throw CairnError.internal("fake bind of an unmounted source \(source)")
            }
        }
    }

    func unmount(_ target: String, in namespace: MountNamespace) async throws {
        record("unmount \(target)")
        try state.withLock { s in
            guard let index = s.mounts.lastIndex(where: { $0.mountPoint == target }) else {
                throw CairnError.internal("\(target) is not mounted")
            }
            s.mounts.remove(at: index)
        }
    }

    func mountTable(in namespace: MountNamespace) async throws -> [MountInfo] { state.withLock { $0.mounts } }

    func filesystemStats(path: String, in namespace: MountNamespace) async throws -> FilesystemStats {
        FilesystemStats(totalBytes: 60 << 20, availableBytes: 50 << 20, usedBytes: 10 << 20,
                        totalInodes: 16384, freeInodes: 16373, usedInodes: 11)
    }

    func blockDeviceSize(device: String) async throws -> Int64 { 64 << 20 }

    func expand(device: String, fsType: String, mountPath: String) async throws -> Int64 {
        record("expand \(device) \(fsType)")
        return 128 << 20
    }

    private static func requireExisting(_ path: String) throws {
        guard FileManager.default.fileExists(atPath: path) else { throw CairnError.internal("mount target \(path) does not exist") }
    }
}
