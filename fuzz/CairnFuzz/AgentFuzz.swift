import CairnAgent
import CairnCore
import CairnNode
import CairnProto
import CairnRPC
import SwiftProtobuf

/// The `agent` target: every RPC of the agent protocol (proto/cairn.proto, `cairn.agent.v1.Agent`)
/// as `AgentService` serves it — the request decoded by the `Router`, the agent's checks
/// (`AgentConfinement`, the namespace and access-type conversions, hot-plug's and the
/// backing's validation) and the error's way onto the wire (`AgentWire.encode`) — over a vacant
/// store, backing and mounter (Vacant.swift). Input: `RouterFuzz`'s layout.
public enum AgentFuzz {
    public static let target = FuzzTarget(name: "agent", run: { fuzz.run($0) }, seeds: seeds)

    static let fuzz: RouterFuzz = {
        let service = AgentService(
            mounter: VacantMounter(),
            confinement: AgentConfinement(pathRoots: [RouterFuzz.pathRoot], volumesDirectory: "/var/lib/cairn/volumes",
                                          enginesDirectory: "/var/lib/cairn/engines"),
            hotPlug: .vacant(), backing: VacantBacking(), store: VacantStore(), nodeID: RouterFuzz.nodeID,
            logger: RouterFuzz.logger)
        let router = Router()
        service.register(on: router)
        return RouterFuzz(router)
    }()

    static func seeds() -> [(name: String, bytes: [UInt8])] {
        typealias M = AgentProtocol.Method
        let host = Cairn_Agent_V1_MountNamespace.with { $0.host = .init() }
        let process = Cairn_Agent_V1_MountNamespace.with { $0.process = .with { $0.pid = 4242; $0.startTime = 123_456 } }
        let volumeFile = "/var/lib/cairn/volumes/pvc-0f1e2d3c.img"
        let staging = RouterFuzz.pathRoot + "/plugins/cairn.dev/pv/pvc-0f1e2d3c/globalmount"
        let target = RouterFuzz.pathRoot + "/pods/uid/volumes/kubernetes.io~csi/pvc-0f1e2d3c/mount"
        var seeds: [(name: String, bytes: [UInt8])] = []
        func add(_ method: String, _ request: some SwiftProtobuf.Message, _ variant: String = "") {
            seeds.append(fuzz.seed(method, request, variant))
        }
        add(M.hello, Cairn_Agent_V1_HelloRequest.with { $0.protocolVersion = AgentProtocol.version; $0.clientVersion = "0.1.0" })
        add(M.attachLoop, Cairn_Agent_V1_AttachLoopRequest.with { $0.file = volumeFile; $0.readOnly = true })
        add(M.attachLoop, Cairn_Agent_V1_AttachLoopRequest.with { $0.file = "/var/lib/cairn/engines/pvc-0f1e2d3c/volume" }, "-engine")
        add(M.loopDevices, Cairn_Agent_V1_LoopDevicesRequest.with { $0.file = volumeFile })
        add(M.detachLoop, Cairn_Agent_V1_DetachLoopRequest.with { $0.device = "/dev/loop7" })
        add(M.probe, Cairn_Agent_V1_ProbeRequest.with { $0.device = "/dev/loop7" })
        add(M.makeFilesystem, Cairn_Agent_V1_MakeFilesystemRequest.with { $0.device = "/dev/loop7"; $0.fsType = "ext4" })
        add(M.checkFilesystem, Cairn_Agent_V1_CheckFilesystemRequest.with { $0.device = "/dev/loop7"; $0.fsType = "xfs" })
        add(M.mount, Cairn_Agent_V1_MountRequest.with {
            $0.device = "/dev/loop7"; $0.target = staging; $0.fsType = "ext4"; $0.options = ["noatime", "ro"]
        })
        add(M.blockDeviceSize, Cairn_Agent_V1_BlockDeviceSizeRequest.with { $0.device = "/dev/loop7" })
        add(M.expandFilesystem, Cairn_Agent_V1_ExpandFilesystemRequest.with {
            $0.device = "/dev/loop7"; $0.fsType = "ext4"; $0.mountPath = staging
        })
        add(M.namespaceOfProcess, Cairn_Agent_V1_NamespaceOfProcessRequest.with { $0.pid = 4242 })
        add(M.inspect, Cairn_Agent_V1_InspectRequest.with { $0.path = target; $0.namespace = host })
        add(M.inspect, Cairn_Agent_V1_InspectRequest.with { $0.path = "/data"; $0.namespace = process }, "-process")
        add(M.makeTarget, Cairn_Agent_V1_MakeTargetRequest.with { $0.path = target; $0.namespace = host; $0.accessType = .mount })
        add(M.removeTarget, Cairn_Agent_V1_RemoveTargetRequest.with { $0.path = "/data"; $0.namespace = process })
        add(M.bindMount, Cairn_Agent_V1_BindMountRequest.with {
            $0.source = staging; $0.target = target; $0.namespace = host; $0.readOnly = true; $0.options = ["nosuid"]
        })
        add(M.bindMount, Cairn_Agent_V1_BindMountRequest.with { $0.source = "/dev/loop7"; $0.target = "/dev/xvda"; $0.namespace = process }, "-block")
        add(M.unmount, Cairn_Agent_V1_UnmountRequest.with { $0.target = target; $0.namespace = host })
        add(M.mountTable, Cairn_Agent_V1_MountTableRequest.with { $0.namespace = process })
        add(M.filesystemStats, Cairn_Agent_V1_FilesystemStatsRequest.with { $0.path = staging; $0.namespace = host })
        add(M.attachToProcess, Cairn_Agent_V1_AttachToProcessRequest.with {
            $0.volumeID = "pvc-0f1e2d3c"; $0.pid = 4242; $0.path = "/data"; $0.readOnly = true
        })
        add(M.detachFromProcess, Cairn_Agent_V1_DetachFromProcessRequest.with { $0.volumeID = "pvc-0f1e2d3c"; $0.pid = 4242; $0.path = "/data" })
        add(M.volumeFile, Cairn_Agent_V1_VolumeFileRequest.with { $0.volumeID = "pvc-0f1e2d3c" })
        add(M.activateVolume, Cairn_Agent_V1_ActivateVolumeRequest.with { $0.volumeID = "pvc-0f1e2d3c"; $0.epoch = 7 })
        add(M.deactivateVolume, Cairn_Agent_V1_DeactivateVolumeRequest.with { $0.volumeID = "pvc-0f1e2d3c" })
        add(M.volumeCondition, Cairn_Agent_V1_VolumeConditionRequest.with { $0.volumeID = "pvc-0f1e2d3c" })
        add(M.expandVolumeOnNode, Cairn_Agent_V1_ExpandVolumeOnNodeRequest.with { $0.volumeID = "pvc-0f1e2d3c" })
        return seeds
    }
}
