import CSIProto
import CairnCSI
import CairnController
import CairnCore
import CairnLocal
import CairnNode
import CairnStore
import Foundation
import Logging
import Synchronization
import XCTest

/// One machine's QoS: the io.max line a volume's limits become, what start-up decides from the
/// machine's cgroups (against a fake cgroup tree in a temp directory), and where NodeService and
/// ControllerService apply and remove limits (with a fake throttle; OneMachineQoSTests in the
/// integration tests measure the real one).
final class OneMachineQoSTests: XCTestCase {
    // MARK: io.max lines

    func testIOPSLimitIsTheSameOnEachDirectionAndBandwidthLikewise() throws {
        let both = IOMaxLine(major: 7, minor: 3, limits: try QoSLimits(["iopsLimit": "500", "bandwidthLimit": "100Mi"]))
        XCTAssertEqual(both.description, "7:3 rbps=104857600 wbps=104857600 riops=500 wiops=500")
        let iops = IOMaxLine(major: 7, minor: 3, limits: try QoSLimits(["iopsLimit": "1000"]))
        XCTAssertEqual(iops.description, "7:3 rbps=max wbps=max riops=1000 wiops=1000")
        let bandwidth = IOMaxLine(major: 259, minor: 12, limits: try QoSLimits(["bandwidthLimit": "20M"]))
        XCTAssertEqual(bandwidth.description, "259:12 rbps=20000000 wbps=20000000 riops=max wiops=max")
    }

    func testNoLimitAndZeroWriteMaxEverywhereWhichRemovesTheLine() throws {
        for raw in [[:], ["iopsLimit": "0"], ["iopsLimit": "0", "bandwidthLimit": "0"]] {
            let line = IOMaxLine(major: 7, minor: 0, limits: try QoSLimits(raw))
            XCTAssertTrue(line.isUnlimited, "\(raw)")
            XCTAssertEqual(line.description, "7:0 rbps=max wbps=max riops=max wiops=max", "\(raw)")
        }
        var volume = VolumeRecord(id: "vol-1", name: "v", capacityBytes: 1 << 24, parameters: [:], fsType: "",
                                  accessModes: [], accessibleTopology: [:])
        volume.mutableParameters = ["iopsLimit": "250"]
        XCTAssertEqual(IOMaxLine(major: 7, minor: 1, limits: QoSLimits(volume: volume)).writeIOPS, 250,
                       "the limits recorded on a volume are the ones applied")
    }

    func testParsesTheKernelsLinesAndSkipsWhatIsNotOne() {
        let text = """
            7:0 rbps=max wbps=max riops=max wiops=500
            8:16 rbps=2097152 wbps=max riops=120 wiops=max
            259:3 rbps=1 wbps=2 riops=3 wiops=4 future=9

            garbage
            7:x riops=1
            7:2 riops=abc
            """
        XCTAssertEqual(IOMaxLine.parse(text), [
            IOMaxLine(major: 7, minor: 0, writeIOPS: 500),
            IOMaxLine(major: 8, minor: 16, readIOPS: 120, readBytesPerSecond: 2_097_152),
            IOMaxLine(major: 259, minor: 3, readIOPS: 3, writeIOPS: 4, readBytesPerSecond: 1, writeBytesPerSecond: 2),
        ])
        let line = IOMaxLine(major: 7, minor: 9, readIOPS: 10, writeIOPS: 10, writeBytesPerSecond: 4096)
        XCTAssertEqual(IOMaxLine(parsing: Substring(line.description)), line, "what is written parses back")
    }

    // MARK: Start-up: can limits be enforced here?

    var dir = ""

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-qos-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    static func mount(_ point: String, fsType: String, superOptions: [String] = []) -> MountInfo {
        MountInfo(mountID: 30, parentID: 1, major: 0, minor: 30, root: "/", mountPoint: point, mountOptions: ["rw"],
                  optionalFields: [], fsType: fsType, source: fsType, superOptions: superOptions)
    }

    /// A fake cgroup v2 tree at `dir`: the root's controllers, and cgroups with or without io.max.
    func cgroupTree(controllers: String = "cpu io memory pids", cgroups: [String: Bool]) throws -> [MountInfo] {
        try controllers.write(toFile: dir + "/cgroup.controllers", atomically: true, encoding: .utf8)
        for (name, hasIOMax) in cgroups {
            try FileManager.default.createDirectory(atPath: dir + "/" + name, withIntermediateDirectories: true)
            if hasIOMax { try "".write(toFile: dir + "/" + name + "/io.max", atomically: true, encoding: .utf8) }
        }
        return [Self.mount("/proc", fsType: "proc"), Self.mount(dir, fsType: "cgroup2")]
    }

    func reason(_ availability: QoSCgroup.Availability, file: StaticString = #filePath, line: UInt = #line) -> String {
        switch availability {
        case .available(let found):
            XCTFail("expected enforcement to be unavailable, found \(found.cgroup)", file: file, line: line)
            return ""
        case .unavailable(let why): return why
        }
    }

    func cgroup(_ availability: QoSCgroup.Availability, file: StaticString = #filePath, line: UInt = #line) -> String? {
        switch availability {
        case .available(let found): return found.cgroup
        case .unavailable(let why):
            XCTFail("expected enforcement to be available: \(why)", file: file, line: line)
            return nil
        }
    }

    func testAutoFindsKubernetesSystemdThenCgroupfsThenMesos() throws {
        var mounts = try cgroupTree(cgroups: ["mesos": true, "kubepods": true])
        XCTAssertEqual(cgroup(QoSCgroup.locate(nil, mounts: mounts)), dir + "/kubepods")
        mounts = try cgroupTree(cgroups: ["kubepods.slice": true])
        XCTAssertEqual(cgroup(QoSCgroup.locate("auto", mounts: mounts)), dir + "/kubepods.slice")
        try FileManager.default.removeItem(atPath: dir + "/kubepods.slice")
        try FileManager.default.removeItem(atPath: dir + "/kubepods")
        XCTAssertEqual(cgroup(QoSCgroup.locate(nil, mounts: mounts)), dir + "/mesos")
        try FileManager.default.removeItem(atPath: dir + "/mesos")
        XCTAssertTrue(reason(QoSCgroup.locate(nil, mounts: mounts)).contains("pass --qos-cgroup PATH"))
    }

    func testAnExplicitCgroupIsAbsoluteOrRelativeToTheMountAndNeverTheRoot() throws {
        let mounts = try cgroupTree(cgroups: ["workloads/pods": true])
        XCTAssertEqual(cgroup(QoSCgroup.locate("workloads/pods", mounts: mounts)), dir + "/workloads/pods")
        XCTAssertEqual(cgroup(QoSCgroup.locate(dir + "/workloads/pods/", mounts: mounts)), dir + "/workloads/pods")
        XCTAssertTrue(reason(QoSCgroup.locate(dir, mounts: mounts)).contains("is the root cgroup, which has no io.max"))
        XCTAssertTrue(reason(QoSCgroup.locate("/elsewhere/x", mounts: mounts)).contains("is not under the cgroup v2 mount"))
        XCTAssertTrue(reason(QoSCgroup.locate("missing", mounts: mounts)).contains("does not exist"))
        XCTAssertEqual(reason(QoSCgroup.locate("none", mounts: mounts)), "--qos-cgroup none")
    }

    func testSaysWhatIsMissingCgroupV2TheIOControllerOrItsDelegation() throws {
        XCTAssertTrue(reason(QoSCgroup.locate(nil, mounts: [Self.mount("/proc", fsType: "proc")]))
            .contains("neither cgroup v2 nor a cgroup v1 blkio hierarchy is mounted"))
        // Neither the v2 io controller nor a v1 blkio hierarchy (a hybrid host is tested below).
        var mounts = try cgroupTree(controllers: "hugetlb", cgroups: ["kubepods": true])
        XCTAssertTrue(reason(QoSCgroup.locate(nil, mounts: mounts)).contains("has no io controller"))
        XCTAssertTrue(reason(QoSCgroup.locate("../x", mounts: mounts)).contains("has a .. component"))
        // io exists, but the parent does not hand it to the cgroup: no io.max there.
        mounts = try cgroupTree(cgroups: ["pods": false])
        XCTAssertTrue(reason(QoSCgroup.locate("pods", mounts: mounts)).contains("+io > \(dir)/cgroup.subtree_control"))
    }

    // MARK: cgroup v1: the blkio throttle files

    static let blkioFiles = ["blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device",
                             "blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device"]

    /// A hybrid host: cgroup v2 at `dir`/unified with hugetlb only, and the v1 blkio hierarchy at
    /// `dir`/blkio whose cgroups (and root) have the throttle files — or not (`false`).
    func blkioTree(cgroups: [String: Bool]) throws -> [MountInfo] {
        try FileManager.default.createDirectory(atPath: dir + "/unified", withIntermediateDirectories: true)
        try "hugetlb\n".write(toFile: dir + "/unified/cgroup.controllers", atomically: true, encoding: .utf8)
        for (name, throttled) in cgroups.merging(["": true]) { a, _ in a } {
            let path = dir + "/blkio" + (name.isEmpty ? "" : "/" + name)
            try makeBlkioCgroup(path, throttled: throttled)
        }
        return [Self.mount("/proc", fsType: "proc"), Self.mount(dir + "/unified", fsType: "cgroup2"),
                Self.mount(dir + "/blkio", fsType: "cgroup", superOptions: ["rw", "blkio"])]
    }

    func makeBlkioCgroup(_ path: String, throttled: Bool = true) throws {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        try "".write(toFile: path + "/cgroup.procs", atomically: true, encoding: .utf8)
        if throttled {
            for file in Self.blkioFiles where !FileManager.default.fileExists(atPath: path + "/" + file) {
                try "".write(toFile: path + "/" + file, atomically: true, encoding: .utf8)
            }
        }
    }

    func testWithoutTheV2IOControllerTheV1BlkioHierarchyIsUsedAutoRelativeOrAbsolute() throws {
        let mounts = try blkioTree(cgroups: ["mesos": true, "kubepods": true, "kubepods/burstable": true, "bare": false])
        let blkio = dir + "/blkio"
        guard case .available(let found) = QoSCgroup.locate(nil, mounts: mounts) else { return XCTFail("auto found nothing") }
        XCTAssertEqual(found.cgroup, blkio + "/kubepods")
        XCTAssertEqual(found.mechanism, "cgroup v1 blkio throttle")
        XCTAssertTrue(found.needsReconciling, "v1 limits are per cgroup: new cgroups need their copy")
        XCTAssertEqual(cgroup(QoSCgroup.locate("kubepods/burstable/", mounts: mounts)), blkio + "/kubepods/burstable",
                       "a relative path is in the hierarchy that has the io controller")
        XCTAssertEqual(cgroup(QoSCgroup.locate(blkio + "/mesos", mounts: mounts)), blkio + "/mesos")
        XCTAssertEqual(cgroup(QoSCgroup.locate(blkio, mounts: mounts)), blkio, "the v1 root is allowed when named")
        XCTAssertTrue(reason(QoSCgroup.locate("bare", mounts: mounts)).contains("CONFIG_BLK_DEV_THROTTLING"))
        XCTAssertTrue(reason(QoSCgroup.locate("missing", mounts: mounts)).contains("does not exist in the cgroup v1 blkio hierarchy"))
        XCTAssertTrue(reason(QoSCgroup.locate(dir + "/unified/x", mounts: mounts))
            .contains("which has no io controller (cgroup.controllers: hugetlb): the io controller is cgroup v1 blkio at \(blkio)"),
                      "a path in the v2 hierarchy, which lacks io here")
        XCTAssertTrue(reason(QoSCgroup.locate("/elsewhere", mounts: mounts))
            .contains("is not under the cgroup v2 mount \(dir)/unified or the cgroup v1 blkio mount \(blkio)"))
        try FileManager.default.removeItem(atPath: blkio + "/kubepods")
        try FileManager.default.removeItem(atPath: blkio + "/mesos")
        XCTAssertTrue(reason(QoSCgroup.locate("auto", mounts: mounts)).contains("the io controller is cgroup v1 blkio at \(blkio)"),
                      "auto never takes the v1 root")
    }

    func testTheV2IOControllerWinsOverAV1BlkioMount() throws {
        var mounts = try cgroupTree(cgroups: ["kubepods": true])
        try makeBlkioCgroup(dir + "/v1blkio/kubepods")
        mounts.append(Self.mount(dir + "/v1blkio", fsType: "cgroup", superOptions: ["rw", "blkio"]))
        guard case .available(let found) = QoSCgroup.locate(nil, mounts: mounts) else { return XCTFail("auto found nothing") }
        XCTAssertEqual(found.cgroup, dir + "/kubepods")
        XCTAssertEqual(found.mechanism, "cgroup v2 io.max")
        XCTAssertFalse(found.needsReconciling, "v2 throttling is hierarchical")
    }

    func testV1RulesGoToTheCgroupAndEveryOneBelowNewOnesGetThemAndRemoveTakesThemAll() throws {
        _ = try blkioTree(cgroups: ["kubepods": true, "kubepods/pod1": true, "kubepods/pod1/ctr": true, "other": true])
        let top = dir + "/blkio/kubepods"
        let files = FakeBlkioFiles()
        let throttle = CgroupBlkioThrottle(cgroup: top, files: files)
        func rules(_ cgroup: String) throws -> [String] {
            try Self.blkioFiles.flatMap { file in
                try String(contentsOfFile: cgroup + "/" + file, encoding: .utf8).split(separator: "\n").map { "\(file.dropFirst(15)) \($0)" }
            }
        }

        let line = try throttle.apply(try QoSLimits(["iopsLimit": "500"]), major: 7, minor: 3)
        XCTAssertEqual(line.description, "7:3 rbps=max wbps=max riops=500 wiops=500")
        for cgroup in [top, top + "/pod1", top + "/pod1/ctr"] {
            XCTAssertEqual(try rules(cgroup), ["read_iops_device 7:3 500", "write_iops_device 7:3 500"], cgroup)
        }
        XCTAssertEqual(try rules(dir + "/blkio/other"), [], "cgroups outside the named one are left alone")
        XCTAssertEqual(try rules(dir + "/blkio"), [])
        XCTAssertEqual(try throttle.current(major: 7, minor: 3), IOMaxLine(major: 7, minor: 3, readIOPS: 500, writeIOPS: 500))

        // A container started after the limit was set: the reconciler gives it its copy, once.
        try makeBlkioCgroup(top + "/pod2")
        try makeBlkioCgroup(top + "/pod2/ctr")
        XCTAssertEqual(try throttle.reconcile(), 2, "pod2 and its container")
        XCTAssertEqual(try rules(top + "/pod2/ctr"), ["read_iops_device 7:3 500", "write_iops_device 7:3 500"])
        XCTAssertEqual(try throttle.reconcile(), 0, "nothing left to copy")

        // A change replaces every limit, everywhere: bandwidth only now.
        try throttle.apply(try QoSLimits(["bandwidthLimit": "1Mi"]), major: 7, minor: 3)
        XCTAssertEqual(try rules(top + "/pod1/ctr"), ["read_bps_device 7:3 1048576", "write_bps_device 7:3 1048576"])
        try throttle.apply(try QoSLimits(["iopsLimit": "100"]), major: 7, minor: 4)
        XCTAssertEqual(try throttle.current(major: 7, minor: 4)?.writeIOPS, 100)

        try throttle.remove(major: 7, minor: 3)
        for cgroup in [top, top + "/pod1", top + "/pod1/ctr", top + "/pod2", top + "/pod2/ctr"] {
            XCTAssertEqual(try rules(cgroup), ["read_iops_device 7:4 100", "write_iops_device 7:4 100"], "only 7:4 is left in \(cgroup)")
        }
        XCTAssertNil(try throttle.current(major: 7, minor: 3))
        try throttle.apply(try QoSLimits([:]), major: 7, minor: 4)
        XCTAssertEqual(try rules(top + "/pod2/ctr"), [], "no limit writes 0, which removes the rule")
        XCTAssertEqual(try throttle.reconcile(), 0, "no rules: nothing to copy")
    }

    func testAV1CgroupThatCannotBeWrittenFailsTheCallButOneRemovedMeanwhileIsSkipped() throws {
        _ = try blkioTree(cgroups: ["pods": true, "pods/a": true, "pods/b": true])
        let files = FakeBlkioFiles()
        let throttle = CgroupBlkioThrottle(cgroup: dir + "/blkio/pods", files: files)
        files.failing = [dir + "/blkio/pods/a"]
        XCTAssertThrowsError(try throttle.apply(try QoSLimits(["iopsLimit": "5"]), major: 7, minor: 0))
        try FileManager.default.removeItem(atPath: dir + "/blkio/pods/a")
        XCTAssertNoThrow(try throttle.apply(try QoSLimits(["iopsLimit": "5"]), major: 7, minor: 0))
        files.failing = [dir + "/blkio/pods"]
        XCTAssertThrowsError(try throttle.apply(try QoSLimits(["iopsLimit": "6"]), major: 7, minor: 0))
    }

    // MARK: Node: applied at stage, removed before the device is detached

    func makeNode(throttle: FakeThrottle?) throws -> (NodeService, SQLiteStore, NodeFakeMounter, String) {
        let root = dir + "/csi"
        try FileManager.default.createDirectory(atPath: root + "/staging", withIntermediateDirectories: true)
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        let mounter = NodeFakeMounter()
        let node = NodeService(nodeID: "node-a", topology: [:], maxVolumesPerNode: 0, store: store,
                               backing: try LocalFileBacking(dataDir: dir + "/data"), mounter: mounter, pathRoots: [root],
                               locks: VolumeLocks(), logger: Logger(label: "test"), throttle: throttle)
        return (node, store, mounter, root)
    }

    func createAttached(_ store: SQLiteStore, limits: [String: String]?) async throws {
        var volume = VolumeRecord(id: "vol-1", name: "pvc-1", capacityBytes: 64 << 20, parameters: [:], fsType: "",
                                  accessModes: [AccessMode.singleNodeWriter.rawValue], accessibleTopology: [:])
        volume.mutableParameters = limits
        try await store.createVolume(volume)
        try LocalFileBacking(dataDir: dir + "/data").create(volume)
        _ = try await store.attach(volumeID: "vol-1", nodeID: "node-a", readonly: false,
                                   accessMode: AccessMode.singleNodeWriter.rawValue, exclusive: true, nodeLimit: 0)
    }

    func testStageAppliesTheRecordedLimitsAndUnstageRemovesThemBeforeDetaching() async throws {
        for block in [true, false] {
            try await tearDown()
            try await setUp()
            let throttle = FakeThrottle()
            let (node, store, mounter, root) = try makeNode(throttle: throttle)
            throttle.detachesSoFar = { mounter.count("detach") }
            try await createAttached(store, limits: ["iopsLimit": "500"])
            let stage = NodeServiceTests.capability(block: block)
            let request = Csi_V1_NodeStageVolumeRequest.with {
                $0.volumeID = "vol-1"; $0.stagingTargetPath = root + "/staging"; $0.volumeCapability = stage
            }
            _ = try await node.nodeStageVolume(request)
            XCTAssertEqual(throttle.events, ["apply /dev/loop0 iops=500 bytes=-"], "block=\(block)")
            _ = try await node.nodeStageVolume(request)
            XCTAssertEqual(throttle.events.count, 2, "a repeated NodeStage applies them again (a restore comes this way)")

            // What ControllerModifyVolume does on one machine: record, then apply to the device.
            _ = try await store.updateVolume(id: "vol-1", what: "test") { $0.mutableParameters = ["iopsLimit": "0"]; return true }
            let applied = try await node.applyRecordedLimits(volumeID: "vol-1")
            XCTAssertTrue(applied)
            XCTAssertEqual(throttle.events.last, "apply /dev/loop0 iops=0 bytes=-")

            _ = try await node.nodeUnstageVolume(.with { $0.volumeID = "vol-1"; $0.stagingTargetPath = root + "/staging" })
            XCTAssertEqual(throttle.events.last, "remove /dev/loop0 after 0 detaches", "limits go before the device is detached")
            XCTAssertEqual(mounter.loopCount, 0)
            let afterUnstage = try await node.applyRecordedLimits(volumeID: "vol-1")
            XCTAssertFalse(afterUnstage, "not staged: nothing to apply until NodeStage")
        }
    }

    func testAThrottleThatFailsFailsTheStageSoTheCORetries() async throws {
        let throttle = FakeThrottle()
        throttle.failing = true
        let (node, store, _, root) = try makeNode(throttle: throttle)
        try await createAttached(store, limits: ["bandwidthLimit": "1Mi"])
        await assertStatus(.internal) {
            _ = try await node.nodeStageVolume(.with {
                $0.volumeID = "vol-1"; $0.stagingTargetPath = root + "/staging"
                $0.volumeCapability = NodeServiceTests.capability(block: true)
            })
        }
    }

    // MARK: Controller: MODIFY_VOLUME only where limits are enforced

    func makeController(_ store: SQLiteStore, enforcement: FakeEnforcement?) throws -> ControllerService {
        ControllerService(store: store, backing: try LocalFileBacking(dataDir: dir + "/data"),
                          capacity: CapacityPolicy(poolBytes: 1 << 30), localNodeID: "node-a", localTopology: [:],
                          locks: VolumeLocks(), logger: Logger(label: "test"), localLimits: enforcement)
    }

    func createRequest(_ name: String, mutable: [String: String] = [:]) -> Csi_V1_CreateVolumeRequest {
        .with {
            $0.name = name
            $0.capacityRange.requiredBytes = 64 << 20
            $0.volumeCapabilities = [ControllerServiceTests.capability(block: true)]
            $0.mutableParameters = mutable
        }
    }

    func testOneMachineWithEnforcementOffersModifyRecordsAndAppliesAtOnce() async throws {
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        let enforcement = FakeEnforcement()
        let controller = try makeController(store, enforcement: enforcement)
        let caps = try await controller.controllerGetCapabilities(.init()).capabilities.map(\.rpc.type)
        XCTAssertTrue(caps.contains(.modifyVolume))

        let created = try await controller.createVolume(createRequest("qos", mutable: ["iopsLimit": "300"])).volume
        var record = try await store.volume(id: created.volumeID)
        XCTAssertEqual(record?.mutableParameters, ["iopsLimit": "300"], "CreateVolume's mutable_parameters are recorded")

        _ = try await controller.controllerModifyVolume(.with { $0.volumeID = created.volumeID; $0.mutableParameters = ["bandwidthLimit": "10Mi"] })
        record = try await store.volume(id: created.volumeID)
        XCTAssertEqual(record?.mutableParameters, ["iopsLimit": "300", "bandwidthLimit": "10485760"],
                       "keys not named are left as they are")
        XCTAssertEqual(enforcement.applied, [created.volumeID])
        _ = try await controller.controllerModifyVolume(.with { $0.volumeID = created.volumeID; $0.mutableParameters = ["bandwidthLimit": "10Mi"] })
        XCTAssertEqual(enforcement.applied.count, 2, "a repeat applies again (idempotent, and repairs a device that lost them)")

        await assertStatus(.invalidArgument) {
            _ = try await controller.controllerModifyVolume(.with { $0.volumeID = created.volumeID; $0.mutableParameters = ["iopsLimit": "fast"] })
        }
        await assertStatus(.notFound) {
            _ = try await controller.controllerModifyVolume(.with { $0.volumeID = "vol-00000000-0000-0000-0000-000000000000"; $0.mutableParameters = ["iopsLimit": "1"] })
        }
        XCTAssertEqual(enforcement.applied.count, 2, "refused calls apply nothing")
    }

    func testOneMachineWithoutEnforcementOffersNoModifyAndRefusesMutableParameters() async throws {
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        let controller = try makeController(store, enforcement: nil)
        let caps = try await controller.controllerGetCapabilities(.init()).capabilities.map(\.rpc.type)
        XCTAssertFalse(caps.contains(.modifyVolume))
        await assertStatus(.invalidArgument) {
            _ = try await controller.createVolume(self.createRequest("qos", mutable: ["iopsLimit": "300"]))
        }
        let created = try await controller.createVolume(createRequest("plain")).volume
        await assertStatus(.unimplemented) {
            _ = try await controller.controllerModifyVolume(.with { $0.volumeID = created.volumeID; $0.mutableParameters = ["iopsLimit": "1"] })
        }
    }
}

/// Records what NodeService asks of the kernel's throttle.
final class FakeThrottle: IOThrottle, @unchecked Sendable {
    private let lock = Mutex<[String]>([])
    var failing = false
    /// How many loop devices were detached so far (to check the order of remove and detach).
    var detachesSoFar: () -> Int = { 0 }

    var events: [String] { lock.withLock { $0 } }
    var location: String { "/fake/cgroup/io.max" }

    func apply(_ limits: QoSLimits, device: String) throws -> IOMaxLine {
        if failing { throw SystemError("write to /fake/cgroup/io.max", errno: ENODEV) }
        lock.withLock { $0.append("apply \(device) iops=\(limits.iops.map(String.init) ?? "-") bytes=\(limits.bytesPerSecond.map(String.init) ?? "-")") }
        return IOMaxLine(major: 7, minor: 0, limits: limits)
    }

    func remove(device: String) throws {
        let detaches = detachesSoFar()
        lock.withLock { $0.append("remove \(device) after \(detaches) detaches") }
    }

    func current(device: String) throws -> IOMaxLine? { nil }
}

/// The node side ControllerModifyVolume reaches on one machine.
final class FakeEnforcement: LocalLimitEnforcement, @unchecked Sendable {
    private let lock = Mutex<[String]>([])
    var applied: [String] { lock.withLock { $0 } }

    func applyRecordedLimits(volumeID: String) async throws -> Bool {
        lock.withLock { $0.append(volumeID) }
        return true
    }
}

/// The kernel's behaviour of a blkio.throttle.*_device file over a plain file: a write of
/// "MAJ:MIN VALUE" sets that device's rule, VALUE 0 removes it.
final class FakeBlkioFiles: CgroupFiles, @unchecked Sendable {
    private let lock = Mutex(())
    /// Cgroups whose files refuse writes (EACCES).
    var failing: [String] = []

    func read(_ path: String) throws -> String { try String(contentsOfFile: path, encoding: .utf8) }

    func write(_ text: String, to path: String) throws {
        try lock.withLock { _ in
            if failing.contains((path as NSString).deletingLastPathComponent) { throw SystemError("open \(path)", errno: EACCES) }
            guard FileManager.default.fileExists(atPath: path) else { throw SystemError("open \(path)", errno: ENOENT) }
            let fields = text.split(separator: " ")
            guard fields.count == 2, UInt64(fields[1]) != nil else { throw SystemError("write \(text) to \(path)", errno: EINVAL) }
            var lines = try read(path).split(separator: "\n").map(String.init).filter { !$0.hasPrefix(fields[0] + " ") }
            if fields[1] != "0" { lines.append(text) }
            try lines.sorted().map { $0 + "\n" }.joined().write(toFile: path, atomically: true, encoding: .utf8)
        }
    }
}
