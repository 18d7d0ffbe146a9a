import CSIProto
import CairnCSI
import CairnCore
import CairnProto
import CairnRPC
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The node role in its own mount namespace, the agent in the host's, a controller beside them
/// (SplitPlugin): CSI works through the split, the mounts land where the host sees them, the
/// agent's socket is root's alone, and a dead or restarted agent costs one UNAVAILABLE and
/// leaves nothing behind.
final class AgentSplitTests: IntegrationTestCase {
    private var splits: [SplitPlugin] = []

    /// A split plugin with `roles` started. Skips when not root or without unshare.
    func startSplit(_ roles: [SplitPlugin.Role] = SplitPlugin.Role.allCases) async throws -> SplitPlugin {
        if getuid() != 0 {
            throw XCTSkip("the split tests mount filesystems, attach loop devices and create mount namespaces: run them as root")
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/unshare") else {
            throw XCTSkip("unshare (util-linux) is needed to give the node role its own mount namespace")
        }
        let split = try SplitPlugin()
        splits.append(split)  // before starting: tearDown cleans up even if a start fails
        for role in roles { try await split.start(role) }
        return split
    }

    override func tearDown() async throws {
        let failed = (testRun?.totalFailureCount ?? 0) > 0
        let toClean = splits
        splits = []
        for split in toClean {
            for problem in await split.tearDown(testFailed: failed) { XCTFail("cleanup of \(split.root): \(problem)") }
        }
        try await super.tearDown()
    }

    // MARK: The whole life of a volume through the split

    func testNodeInItsOwnMountNamespacePublishesThroughTheAgentAndTheHostSeesTheTarget() async throws {
        let split = try await startSplit()
        let nodePID = try XCTUnwrap(split.pid(.node))
        XCTAssertNotEqual(try Self.mountNamespace(of: nodePID), try Self.mountNamespace(of: getpid()),
                          "the node role must run in its own mount namespace")

        for access in [Access.mount(fsType: "ext4"), .block] {
            let volume = try await placeVolume(split, name: "life-\(access.slug)", access: access)
            let target = try XCTUnwrap(volume.target)
            let hostMounts = PluginProcess.mounts(under: [target])
            XCTAssertEqual(hostMounts.count, 1,
                           "\(access): the published target must be mounted in the HOST's mount namespace (/proc/self/mountinfo): \(hostMounts)")

            // Write through the target as the workload would; read back beneath it.
            let payload = VolumeIO.randomBytes(64 * 1024)
            let device = try XCTUnwrap(PluginProcess.loopDevices(backedUnder: split.dataDir).first?.device,
                                       "\(access): the volume must have a loop device")
            switch access {
            case .mount:
                try VolumeIO.writeFile(target + "/payload", payload)
                XCTAssertEqual(try VolumeIO.readFile(volume.staging + "/payload"), payload,
                               "a file written at the target must be on the staged filesystem")
            case .block:
                try VolumeIO.writeDevice(target, at: 1 << 20, payload)
                XCTAssertEqual(try VolumeIO.readDevice(device, at: 1 << 20, count: payload.count), payload,
                               "bytes written at the block target must be on the volume's device")
            }
            let stats = try await must("NodeGetVolumeStats \(target)") {
                try await split.node("NodeGetVolumeStats", CSI.stats(volume.id, path: target),
                                     as: Csi_V1_NodeGetVolumeStatsResponse.self)
            }
            XCTAssertFalse(stats.volumeCondition.abnormal, "\(access): \(stats.volumeCondition.message)")

            try await unplaceVolume(split, volume)
            XCTAssertFalse(FileManager.default.fileExists(atPath: target), "\(access): NodeUnpublish must remove the target")
            XCTAssertEqual(split.leftovers(), [], "\(access): teardown through the split must leave nothing behind")
        }
    }

    // MARK: The agent's door

    func testAgentSocketIsRootOnlyAndTheAgentRefusesAnythingOutsideItsVolumesAndRoots() async throws {
        let split = try await startSplit([.agent])
        var st = stat()
        XCTAssertEqual(stat(split.socketPath(.agent), &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFSOCK)
        XCTAssertEqual(st.st_mode & 0o777, 0o600, "the agent socket must be mode 0600 (root only), is \(String(st.st_mode & 0o777, radix: 8))")
        XCTAssertEqual(st.st_uid, 0, "the agent socket must belong to root")

        let agent = split.channel(.agent)
        let hello = try await agent.call("/cairn.agent.v1.Agent/Hello", Cairn_Agent_V1_HelloRequest.with { $0.protocolVersion = 2 },
                                         as: Cairn_Agent_V1_HelloResponse.self)
        XCTAssertEqual(hello.protocolVersion, 2)
        XCTAssertEqual(hello.nodeID, split.nodeID)
        let mismatch = await expectStatus(.failedPrecondition, "Hello with protocol version 99") {
            _ = try await agent.call("/cairn.agent.v1.Agent/Hello", Cairn_Agent_V1_HelloRequest.with { $0.protocolVersion = 99 },
                                     as: Cairn_Agent_V1_HelloResponse.self)
        }
        XCTAssert(mismatch.message.contains("protocol version 2") && mismatch.message.contains("99"), mismatch.message)

        let mountsBefore = Set(Self.hostMountIDs())
        let loopsBefore = Set(PluginProcess.loopDevices(backedUnder: "/").map(\.device))
        let host = Cairn_Agent_V1_MountNamespace.with { $0.host = .init() }
        let refusals: [(String, () async throws -> Void)] = [
            ("AttachLoop of /etc/passwd", {
                _ = try await agent.call("/cairn.agent.v1.Agent/AttachLoop", Cairn_Agent_V1_AttachLoopRequest.with { $0.file = "/etc/passwd" },
                                         as: Cairn_Agent_V1_AttachLoopResponse.self)
            }),
            ("AttachLoop of a .img outside the volumes directory", {
                _ = try await agent.call("/cairn.agent.v1.Agent/AttachLoop",
                                         Cairn_Agent_V1_AttachLoopRequest.with { $0.file = split.root + "/vol-x.img" },
                                         as: Cairn_Agent_V1_AttachLoopResponse.self)
            }),
            ("AttachLoop through ..", {
                _ = try await agent.call("/cairn.agent.v1.Agent/AttachLoop",
                                         Cairn_Agent_V1_AttachLoopRequest.with { $0.file = split.dataDir + "/volumes/../../../etc/x.img" },
                                         as: Cairn_Agent_V1_AttachLoopResponse.self)
            }),
            ("DetachLoop of a device that is not a loop device", {
                _ = try await agent.call("/cairn.agent.v1.Agent/DetachLoop", Cairn_Agent_V1_DetachLoopRequest.with { $0.device = "/dev/sda" },
                                         as: Cairn_Agent_V1_DetachLoopResponse.self)
            }),
            ("MakeFilesystem on /dev/sda1", {
                _ = try await agent.call("/cairn.agent.v1.Agent/MakeFilesystem", Cairn_Agent_V1_MakeFilesystemRequest.with {
                    $0.device = "/dev/sda1"
                    $0.fsType = "ext4"
                }, as: Cairn_Agent_V1_MakeFilesystemResponse.self)
            }),
            ("Mount at /etc", {
                _ = try await agent.call("/cairn.agent.v1.Agent/Mount", Cairn_Agent_V1_MountRequest.with {
                    $0.device = "/dev/loop0"
                    $0.target = "/etc"
                    $0.fsType = "ext4"
                }, as: Cairn_Agent_V1_MountResponse.self)
            }),
            ("BindMount of /etc into a path root", {
                _ = try await agent.call("/cairn.agent.v1.Agent/BindMount", Cairn_Agent_V1_BindMountRequest.with {
                    $0.source = "/etc"
                    $0.target = split.podsDir
                    $0.namespace = host
                }, as: Cairn_Agent_V1_BindMountResponse.self)
            }),
            ("MakeTarget in the host outside the path roots", {
                _ = try await agent.call("/cairn.agent.v1.Agent/MakeTarget", Cairn_Agent_V1_MakeTargetRequest.with {
                    $0.path = "/etc/cairn-must-not-exist"
                    $0.accessType = .mount
                    $0.namespace = host
                }, as: Cairn_Agent_V1_MakeTargetResponse.self)
            }),
            ("Inspect without a namespace", {
                _ = try await agent.call("/cairn.agent.v1.Agent/Inspect", Cairn_Agent_V1_InspectRequest.with { $0.path = split.podsDir },
                                         as: Cairn_Agent_V1_InspectResponse.self)
            }),
        ]
        for (what, call) in refusals {
            await expectStatus(.invalidArgument, what, call)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: "/etc/cairn-must-not-exist"))
        XCTAssertEqual(Set(Self.hostMountIDs()).subtracting(mountsBefore), [], "a refused request must mount nothing")
        XCTAssertEqual(Set(PluginProcess.loopDevices(backedUnder: "/").map(\.device)).subtracting(loopsBefore), [],
                       "a refused request must attach nothing")
    }

    /// The one place that knows how MountNamespaceGone travels: it leaves the agent as NOT_FOUND
    /// with a fixed prefix and reaches the CO, through the node, as the node's own status for it.
    func testAGoneMountNamespaceSurvivesTheWire() async throws {
        let split = try await startSplit()
        let dead = try Self.deadPID()
        let direct = await expectStatus(.notFound, "NamespaceOfProcess(\(dead)) at the agent") {
            _ = try await split.channel(.agent).call("/cairn.agent.v1.Agent/NamespaceOfProcess",
                                                     Cairn_Agent_V1_NamespaceOfProcessRequest.with { $0.pid = dead },
                                                     as: Cairn_Agent_V1_NamespaceOfProcessResponse.self)
        }
        XCTAssert(direct.message.hasPrefix("cairn.agent/mount-namespace-gone pid=\(dead):"), direct.message)

        let volume = try await placeVolume(split, name: "gone", access: .mount(fsType: "ext4"), publish: false)
        let target = split.podsDir + "/gone-container/target"
        let viaNode = await expectStatus(.invalidArgument, "NodePublish into the namespace of dead process \(dead)") {
            _ = try await split.node("NodePublishVolume", CSI.publish(volume.id, staging: volume.staging, target: "/data",
                                                                       access: volume.access,
                                                                       publishContext: volume.publishContext.merging(["cairn.dev/mount-namespace-pid": "\(dead)"]) { $1 }),
                                     as: Csi_V1_NodePublishVolumeResponse.self)
        }
        XCTAssert(viaNode.message.contains("mount namespace of process \(dead)"),
                  "the node must have received MountNamespaceGone, not a raw agent status: \(viaNode.message)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: target))
        try await unplaceVolume(split, volume)
        XCTAssertEqual(split.leftovers(), [])
    }

    // MARK: Agent down, agent killed

    func testNodeRoleWithTheAgentDownAnswersUnavailableNamingTheSocketAndRecoversWhenItStarts() async throws {
        let split = try await startSplit([.controller, .node])
        // Calls that need no privileged work still answer.
        let info = try await must("NodeGetInfo without an agent") {
            try await split.node("NodeGetInfo", Csi_V1_NodeGetInfoRequest(), as: Csi_V1_NodeGetInfoResponse.self)
        }
        XCTAssertEqual(info.nodeID, split.nodeID)

        let access = Access.mount(fsType: "ext4")
        let (id, context) = try await createAndAttach(split, name: "agent-down", access: access)
        let staging = split.stagingDir + "/agent-down"
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        let down = await expectStatus(.unavailable, "NodeStageVolume with the agent down") {
            _ = try await split.node("NodeStageVolume", CSI.stage(id, staging: staging, access: access, publishContext: context),
                                     as: Csi_V1_NodeStageVolumeResponse.self)
        }
        XCTAssert(down.message.contains("cannot reach the cairn agent at \(split.endpoint(.agent))"), down.message)
        XCTAssert(down.message.contains("is `cairn serve --role agent` running?"), down.message)
        XCTAssertEqual(split.leftovers(), [], "nothing may happen while the agent is down")

        try await split.start(.agent)
        _ = try await must("NodeStageVolume once the agent is up (no node restart)") {
            try await split.node("NodeStageVolume", CSI.stage(id, staging: staging, access: access, publishContext: context),
                                 as: Csi_V1_NodeStageVolumeResponse.self)
        }
        try await unplaceVolume(split, Placed(id: id, access: access, staging: staging, target: nil, publishContext: context))
        XCTAssertEqual(split.leftovers(), [])
    }

    func testAgentKilledAroundAndDuringAPublishThenRestartedTheNextPublishSucceedsAndNothingStaleIsLeft() async throws {
        let split = try await startSplit()
        let access = Access.mount(fsType: "ext4")
        let volume = try await placeVolume(split, name: "killed", access: access, publish: false,
                                           mode: .singleNodeMultiWriter)

        // 1. Killed right after NodeStage, between calls.
        await split.stop(.agent, signal: SIGKILL)
        let first = volume.publishRequest(target: split.podsDir + "/killed-1/target")
        try FileManager.default.createDirectory(atPath: split.podsDir + "/killed-1", withIntermediateDirectories: true)
        let down = await expectStatus(.unavailable, "NodePublish while the agent is dead") {
            _ = try await split.node("NodePublishVolume", first, as: Csi_V1_NodePublishVolumeResponse.self)
        }
        XCTAssert(down.message.contains("cannot reach the cairn agent"), down.message)
        try await split.start(.agent)
        _ = try await must("NodePublish after the agent restarted") {
            try await split.node("NodePublishVolume", first, as: Csi_V1_NodePublishVolumeResponse.self)
        }
        XCTAssertEqual(PluginProcess.mounts(under: [first.targetPath]).count, 1, "the host must see the target once")

        // 2. Killed while a NodePublish is in flight: as soon as the agent has created the
        // target, before (or while) it binds the volume there.
        let second = volume.publishRequest(target: split.podsDir + "/killed-2/target")
        try FileManager.default.createDirectory(atPath: split.podsDir + "/killed-2", withIntermediateDirectories: true)
        let nodeChannel = split.channel(.node)
        let answered = LockedBox(false)
        let inFlight = Task { () -> StatusCode in
            defer { answered.withLock { $0 = true } }
            do {
                _ = try await nodeChannel.call("/csi.v1.Node/NodePublishVolume", second, as: Csi_V1_NodePublishVolumeResponse.self)
                return .ok
            } catch let error as CairnError {
                return error.code
            } catch {
                return .unknown
            }
        }
        let agentPID = try XCTUnwrap(split.pid(.agent))
        let deadline = ContinuousClock.now + .seconds(10)
        while !FileManager.default.fileExists(atPath: second.targetPath) && !answered.withLock({ $0 })
                && ContinuousClock.now < deadline {
            usleep(100)
        }
        kill(agentPID, SIGKILL)
        let interrupted = await inFlight.value
        XCTAssert([.ok, .unavailable].contains(interrupted),
                  "a publish whose agent died must succeed or fail with UNAVAILABLE, got \(interrupted)")
        await split.stop(.agent)  // reap it
        try await split.start(.agent)
        _ = try await must("NodePublish repeated after the agent was killed mid-publish (it had answered \(interrupted))") {
            try await split.node("NodePublishVolume", second, as: Csi_V1_NodePublishVolumeResponse.self)
        }
        XCTAssertEqual(PluginProcess.mounts(under: [second.targetPath]).count, 1,
                       "exactly one mount at the target: a retry must not stack a second bind")

        // Teardown leaves no stale mount and no loop device.
        for request in [first, second] {
            _ = try await must("NodeUnpublish \(request.targetPath)") {
                try await split.node("NodeUnpublishVolume", CSI.unpublish(volume.id, target: request.targetPath),
                                     as: Csi_V1_NodeUnpublishVolumeResponse.self)
            }
        }
        try await unplaceVolume(split, volume)
        XCTAssertEqual(split.leftovers(), [], "after teardown no stale mount or loop device may be left")
    }

    // MARK: Helpers

    struct Placed {
        var id: String
        var access: Access
        var staging: String
        var target: String?
        var publishContext: [String: String]
        var mode: Csi_V1_VolumeCapability.AccessMode.Mode = .singleNodeWriter

        func publishRequest(target: String) -> Csi_V1_NodePublishVolumeRequest {
            var request = CSI.publish(id, staging: staging, target: target, access: access, publishContext: publishContext)
            request.volumeCapability = CSI.capability(access, mode: mode)
            return request
        }
    }

    func createAndAttach(_ split: SplitPlugin, name: String, access: Access,
                         mode: Csi_V1_VolumeCapability.AccessMode.Mode = .singleNodeWriter) async throws -> (String, [String: String]) {
        var create = CSI.create(name: name, access: access, required: 64 * CSI.mib)
        create.volumeCapabilities = [CSI.capability(access, mode: mode)]
        let created = try await must("CreateVolume \(name)") {
            try await split.controller("CreateVolume", create, as: Csi_V1_CreateVolumeResponse.self)
        }
        var publish = CSI.controllerPublish(created.volume.volumeID, node: split.nodeID, access: access)
        publish.volumeCapability = CSI.capability(access, mode: mode)
        let published = try await must("ControllerPublishVolume \(name)") {
            try await split.controller("ControllerPublishVolume", publish, as: Csi_V1_ControllerPublishVolumeResponse.self)
        }
        return (created.volume.volumeID, published.publishContext)
    }

    /// Create → ControllerPublish → NodeStage (→ NodePublish at pods/<name>/target).
    func placeVolume(_ split: SplitPlugin, name: String, access: Access, publish: Bool = true,
                     mode: Csi_V1_VolumeCapability.AccessMode.Mode = .singleNodeWriter) async throws -> Placed {
        let (id, context) = try await createAndAttach(split, name: name, access: access, mode: mode)
        let staging = split.stagingDir + "/" + name
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        var stage = CSI.stage(id, staging: staging, access: access, publishContext: context)
        stage.volumeCapability = CSI.capability(access, mode: mode)
        _ = try await must("NodeStageVolume \(name)") {
            try await split.node("NodeStageVolume", stage, as: Csi_V1_NodeStageVolumeResponse.self)
        }
        var placed = Placed(id: id, access: access, staging: staging, target: nil, publishContext: context, mode: mode)
        guard publish else { return placed }
        let target = split.podsDir + "/" + name + "/target"
        try FileManager.default.createDirectory(atPath: split.podsDir + "/" + name, withIntermediateDirectories: true)
        let request = placed.publishRequest(target: target)
        _ = try await must("NodePublishVolume \(name)") {
            try await split.node("NodePublishVolume", request, as: Csi_V1_NodePublishVolumeResponse.self)
        }
        placed.target = target
        return placed
    }

    /// NodeUnpublish (if published) → NodeUnstage → ControllerUnpublish → DeleteVolume.
    func unplaceVolume(_ split: SplitPlugin, _ placed: Placed) async throws {
        if let target = placed.target {
            _ = try await must("NodeUnpublishVolume \(target)") {
                try await split.node("NodeUnpublishVolume", CSI.unpublish(placed.id, target: target),
                                     as: Csi_V1_NodeUnpublishVolumeResponse.self)
            }
        }
        _ = try await must("NodeUnstageVolume \(placed.staging)") {
            try await split.node("NodeUnstageVolume", CSI.unstage(placed.id, staging: placed.staging),
                                 as: Csi_V1_NodeUnstageVolumeResponse.self)
        }
        _ = try await must("ControllerUnpublishVolume \(placed.id)") {
            try await split.controller("ControllerUnpublishVolume", CSI.controllerUnpublish(placed.id, node: split.nodeID),
                                       as: Csi_V1_ControllerUnpublishVolumeResponse.self)
        }
        _ = try await must("DeleteVolume \(placed.id)") {
            try await split.controller("DeleteVolume", CSI.delete(placed.id), as: Csi_V1_DeleteVolumeResponse.self)
        }
    }

    static func mountNamespace(of pid: Int32) throws -> String {
        try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/mnt")
    }

    static func hostMountIDs() -> [Int] {
        guard let text = ProcFile.textIfReadable("/proc/self/mountinfo") else { return [] }
        return text.split(separator: "\n").compactMap(MountEntry.init).map(\.mountID)
    }

    /// The PID of a process that has exited and been reaped.
    static func deadPID() throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/true")
        try p.run()
        p.waitUntilExit()
        return p.processIdentifier
    }
}
