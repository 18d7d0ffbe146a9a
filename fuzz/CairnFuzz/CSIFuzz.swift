import CSIProto
import CairnCSI
import CairnController
import CairnCore
import CairnNode
import CairnRPC
import CairnRoutes
import SwiftProtobuf

/// The `csi` target: every CSI RPC the plugin serves (Identity, Controller, GroupController,
/// Node), through the plugin's own method table (`Routes`): the request decoded by the
/// `Router`, then the service's handler with all its validation, over a vacant store, backing
/// and mounter (Vacant.swift), so that nothing a request asks for is done. Input:
/// `RouterFuzz`'s layout.
public enum CSIFuzz {
    public static let target = FuzzTarget(name: "csi", run: { fuzz.run($0) }, seeds: seeds)

    static let fuzz: RouterFuzz = {
        let locks = VolumeLocks()
        let controller = ControllerService(
            store: VacantStore(), backing: VacantBacking(), capacity: CapacityPolicy(poolBytes: 1 << 40),
            localNodeID: RouterFuzz.nodeID, localTopology: ["topology.cairn.dev/node": RouterFuzz.nodeID], locks: locks,
            logger: RouterFuzz.logger)
        let node = NodeService.vacant(locks: locks)
        let router = Router()
        Routes.identity(IdentityService(controllerService: true, groupControllerService: true), on: router)
        Routes.controller(controller, on: router)
        Routes.groupController(controller, on: router)
        Routes.node(node, on: router)
        return RouterFuzz(router)
    }()

    static func seeds() -> [(name: String, bytes: [UInt8])] {
        let secrets = ["password": "0123456789abcdef", "key": "k"]
        let mount = Csi_V1_VolumeCapability.with {
            $0.mount = .with { $0.fsType = "ext4"; $0.mountFlags = ["noatime"] }
            $0.accessMode = .with { $0.mode = .singleNodeWriter }
        }
        let block = Csi_V1_VolumeCapability.with {
            $0.block = .init()
            $0.accessMode = .with { $0.mode = .multiNodeReaderOnly }
        }
        let volumeID = "pvc-0f1e2d3c"
        let staging = RouterFuzz.pathRoot + "/plugins/kubernetes.io/csi/cairn.dev/0123/globalmount"
        let target = RouterFuzz.pathRoot + "/pods/uid/volumes/kubernetes.io~csi/pvc-0f1e2d3c/mount"
        var seeds: [(name: String, bytes: [UInt8])] = []
        func add(_ method: String, _ request: some SwiftProtobuf.Message, _ variant: String = "") {
            seeds.append(fuzz.seed(method, request, variant))
        }
        // Every method with an empty request (what a confused client sends).
        for method in fuzz.methods { seeds.append(fuzz.seed(method, SwiftProtobuf.Google_Protobuf_Empty(), "-empty")) }
        add("/csi.v1.Controller/CreateVolume", Csi_V1_CreateVolumeRequest.with {
            $0.name = "pvc-0f1e2d3c-4b5a"
            $0.capacityRange = .with { $0.requiredBytes = 1 << 30; $0.limitBytes = 2 << 30 }
            $0.volumeCapabilities = [mount, block]
            $0.parameters = ["fsType": "xfs", "replicas": "1", "csi.storage.k8s.io/pvc/name": "data"]
            $0.secrets = secrets
            $0.volumeContentSource = .with { $0.snapshot = .with { $0.snapshotID = "snap-1" } }
            $0.accessibilityRequirements = .with { $0.requisite = [.with { $0.segments = ["topology.cairn.dev/node": RouterFuzz.nodeID] }] }
            $0.mutableParameters = ["iops": "1000"]
        })
        add("/csi.v1.Controller/DeleteVolume", Csi_V1_DeleteVolumeRequest.with { $0.volumeID = volumeID; $0.secrets = secrets })
        add("/csi.v1.Controller/ControllerPublishVolume", Csi_V1_ControllerPublishVolumeRequest.with {
            $0.volumeID = volumeID; $0.nodeID = RouterFuzz.nodeID; $0.volumeCapability = mount; $0.readonly = true
            $0.secrets = secrets; $0.volumeContext = ["cairn.dev/mount-namespace-pid": "4242"]
        })
        add("/csi.v1.Controller/ControllerUnpublishVolume", Csi_V1_ControllerUnpublishVolumeRequest.with {
            $0.volumeID = volumeID; $0.nodeID = RouterFuzz.nodeID; $0.secrets = secrets
        })
        add("/csi.v1.Controller/ValidateVolumeCapabilities", Csi_V1_ValidateVolumeCapabilitiesRequest.with {
            $0.volumeID = volumeID; $0.volumeCapabilities = [mount, block]; $0.parameters = ["fsType": "ext4"]; $0.secrets = secrets
        })
        add("/csi.v1.Controller/ListVolumes", Csi_V1_ListVolumesRequest.with { $0.maxEntries = 5; $0.startingToken = "vol-3" })
        add("/csi.v1.Controller/GetCapacity", Csi_V1_GetCapacityRequest.with {
            $0.volumeCapabilities = [mount]; $0.parameters = ["replicas": "1"]
            $0.accessibleTopology = .with { $0.segments = ["topology.cairn.dev/node": RouterFuzz.nodeID] }
        })
        add("/csi.v1.Controller/ControllerGetVolume", Csi_V1_ControllerGetVolumeRequest.with { $0.volumeID = volumeID })
        add("/csi.v1.Controller/CreateSnapshot", Csi_V1_CreateSnapshotRequest.with {
            $0.sourceVolumeID = volumeID; $0.name = "snapshot-1"; $0.secrets = secrets
            $0.parameters = ["csi.storage.k8s.io/volumesnapshot/name": "s"]
        })
        add("/csi.v1.Controller/DeleteSnapshot", Csi_V1_DeleteSnapshotRequest.with { $0.snapshotID = "snap-1"; $0.secrets = secrets })
        add("/csi.v1.Controller/ListSnapshots", Csi_V1_ListSnapshotsRequest.with {
            $0.maxEntries = 2; $0.sourceVolumeID = volumeID; $0.startingToken = "snap-2"; $0.secrets = secrets
        })
        add("/csi.v1.Controller/GetSnapshot", Csi_V1_GetSnapshotRequest.with { $0.snapshotID = "snap-1"; $0.secrets = secrets })
        add("/csi.v1.Controller/ControllerExpandVolume", Csi_V1_ControllerExpandVolumeRequest.with {
            $0.volumeID = volumeID; $0.capacityRange = .with { $0.requiredBytes = 4 << 30 }; $0.volumeCapability = mount
            $0.secrets = secrets
        })
        add("/csi.v1.Controller/ControllerModifyVolume", Csi_V1_ControllerModifyVolumeRequest.with {
            $0.volumeID = volumeID; $0.mutableParameters = ["iops": "500"]; $0.secrets = secrets
        })
        add("/csi.v1.GroupController/CreateVolumeGroupSnapshot", Csi_V1_CreateVolumeGroupSnapshotRequest.with {
            $0.name = "group-1"; $0.sourceVolumeIds = [volumeID, "pvc-2"]; $0.secrets = secrets
        })
        add("/csi.v1.GroupController/DeleteVolumeGroupSnapshot", Csi_V1_DeleteVolumeGroupSnapshotRequest.with {
            $0.groupSnapshotID = "group-1"; $0.snapshotIds = ["snap-1"]; $0.secrets = secrets
        })
        add("/csi.v1.GroupController/GetVolumeGroupSnapshot", Csi_V1_GetVolumeGroupSnapshotRequest.with {
            $0.groupSnapshotID = "group-1"; $0.snapshotIds = ["snap-1"]; $0.secrets = secrets
        })
        add("/csi.v1.Node/NodeStageVolume", Csi_V1_NodeStageVolumeRequest.with {
            $0.volumeID = volumeID; $0.stagingTargetPath = staging; $0.volumeCapability = mount
            $0.publishContext = ["epoch": "7"]; $0.secrets = secrets
        })
        add("/csi.v1.Node/NodeUnstageVolume", Csi_V1_NodeUnstageVolumeRequest.with { $0.volumeID = volumeID; $0.stagingTargetPath = staging })
        add("/csi.v1.Node/NodePublishVolume", Csi_V1_NodePublishVolumeRequest.with {
            $0.volumeID = volumeID; $0.stagingTargetPath = staging; $0.targetPath = target; $0.volumeCapability = mount
            $0.readonly = true; $0.secrets = secrets
        })
        add("/csi.v1.Node/NodePublishVolume", Csi_V1_NodePublishVolumeRequest.with {
            $0.volumeID = volumeID; $0.stagingTargetPath = staging; $0.targetPath = "/data"; $0.volumeCapability = block
            $0.publishContext = ["cairn.dev/mount-namespace-pid": "4242"]
        }, "-process")
        add("/csi.v1.Node/NodeUnpublishVolume", Csi_V1_NodeUnpublishVolumeRequest.with { $0.volumeID = volumeID; $0.targetPath = target })
        add("/csi.v1.Node/NodeGetVolumeStats", Csi_V1_NodeGetVolumeStatsRequest.with { $0.volumeID = volumeID; $0.volumePath = target })
        add("/csi.v1.Node/NodeExpandVolume", Csi_V1_NodeExpandVolumeRequest.with {
            $0.volumeID = volumeID; $0.volumePath = staging; $0.capacityRange = .with { $0.requiredBytes = 4 << 30 }
            $0.volumeCapability = mount; $0.secrets = secrets
        })
        return seeds
    }
}
