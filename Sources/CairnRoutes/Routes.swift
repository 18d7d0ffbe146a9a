import CSIProto
import CairnCSI
import CairnController
import CairnCore
import CairnNode
import CairnRPC

/// The CSI method table: full gRPC method names → service methods. The only place that knows
/// both the wire names and the services: the plugin serves it, and the fuzz harness
/// (fuzz/CairnFuzz) drives the same table.
public enum Routes {
    public static func identity(_ s: IdentityService, on r: Router) {
        r.register("/csi.v1.Identity/GetPluginInfo") { (q: Csi_V1_GetPluginInfoRequest, _) in try await s.getPluginInfo(q) }
        r.register("/csi.v1.Identity/GetPluginCapabilities") { (q: Csi_V1_GetPluginCapabilitiesRequest, _) in try await s.getPluginCapabilities(q) }
        r.register("/csi.v1.Identity/Probe") { (q: Csi_V1_ProbeRequest, _) in try await s.probe(q) }
    }

    public static func controller(_ s: ControllerService, on r: Router) {
        r.register("/csi.v1.Controller/CreateVolume") { (q: Csi_V1_CreateVolumeRequest, _) in try await s.createVolume(q) }
        r.register("/csi.v1.Controller/DeleteVolume") { (q: Csi_V1_DeleteVolumeRequest, _) in try await s.deleteVolume(q) }
        r.register("/csi.v1.Controller/ControllerPublishVolume") { (q: Csi_V1_ControllerPublishVolumeRequest, _) in try await s.controllerPublishVolume(q) }
        r.register("/csi.v1.Controller/ControllerUnpublishVolume") { (q: Csi_V1_ControllerUnpublishVolumeRequest, _) in try await s.controllerUnpublishVolume(q) }
        r.register("/csi.v1.Controller/ValidateVolumeCapabilities") { (q: Csi_V1_ValidateVolumeCapabilitiesRequest, _) in try await s.validateVolumeCapabilities(q) }
        r.register("/csi.v1.Controller/ListVolumes") { (q: Csi_V1_ListVolumesRequest, _) in try await s.listVolumes(q) }
        r.register("/csi.v1.Controller/GetCapacity") { (q: Csi_V1_GetCapacityRequest, _) in try await s.getCapacity(q) }
        r.register("/csi.v1.Controller/ControllerGetCapabilities") { (q: Csi_V1_ControllerGetCapabilitiesRequest, _) in try await s.controllerGetCapabilities(q) }
        r.register("/csi.v1.Controller/ControllerGetVolume") { (q: Csi_V1_ControllerGetVolumeRequest, _) in try await s.controllerGetVolume(q) }
        r.register("/csi.v1.Controller/CreateSnapshot") { (q: Csi_V1_CreateSnapshotRequest, _) in try await s.createSnapshot(q) }
        r.register("/csi.v1.Controller/DeleteSnapshot") { (q: Csi_V1_DeleteSnapshotRequest, _) in try await s.deleteSnapshot(q) }
        r.register("/csi.v1.Controller/ListSnapshots") { (q: Csi_V1_ListSnapshotsRequest, _) in try await s.listSnapshots(q) }
        r.register("/csi.v1.Controller/GetSnapshot") { (q: Csi_V1_GetSnapshotRequest, _) in try await s.getSnapshot(q) }
        r.register("/csi.v1.Controller/ControllerExpandVolume") { (q: Csi_V1_ControllerExpandVolumeRequest, _) in try await s.controllerExpandVolume(q) }
        r.register("/csi.v1.Controller/ControllerModifyVolume") { (q: Csi_V1_ControllerModifyVolumeRequest, _) in try await s.controllerModifyVolume(q) }
    }

    public static func groupController(_ s: ControllerService, on r: Router) {
        r.register("/csi.v1.GroupController/GroupControllerGetCapabilities") { (q: Csi_V1_GroupControllerGetCapabilitiesRequest, _) in try await s.groupControllerGetCapabilities(q) }
        r.register("/csi.v1.GroupController/CreateVolumeGroupSnapshot") { (q: Csi_V1_CreateVolumeGroupSnapshotRequest, _) in try await s.createVolumeGroupSnapshot(q) }
        r.register("/csi.v1.GroupController/DeleteVolumeGroupSnapshot") { (q: Csi_V1_DeleteVolumeGroupSnapshotRequest, _) in try await s.deleteVolumeGroupSnapshot(q) }
        r.register("/csi.v1.GroupController/GetVolumeGroupSnapshot") { (q: Csi_V1_GetVolumeGroupSnapshotRequest, _) in try await s.getVolumeGroupSnapshot(q) }
    }

    public static func node(_ s: NodeService, on r: Router) {
        r.register("/csi.v1.Node/NodeStageVolume") { (q: Csi_V1_NodeStageVolumeRequest, _) in try await s.nodeStageVolume(q) }
        r.register("/csi.v1.Node/NodeUnstageVolume") { (q: Csi_V1_NodeUnstageVolumeRequest, _) in try await s.nodeUnstageVolume(q) }
        r.register("/csi.v1.Node/NodePublishVolume") { (q: Csi_V1_NodePublishVolumeRequest, _) in try await s.nodePublishVolume(q) }
        r.register("/csi.v1.Node/NodeUnpublishVolume") { (q: Csi_V1_NodeUnpublishVolumeRequest, _) in try await s.nodeUnpublishVolume(q) }
        r.register("/csi.v1.Node/NodeGetVolumeStats") { (q: Csi_V1_NodeGetVolumeStatsRequest, _) in try await s.nodeGetVolumeStats(q) }
        r.register("/csi.v1.Node/NodeGetCapabilities") { (q: Csi_V1_NodeGetCapabilitiesRequest, _) in try await s.nodeGetCapabilities(q) }
        r.register("/csi.v1.Node/NodeGetInfo") { (q: Csi_V1_NodeGetInfoRequest, _) in try await s.nodeGetInfo(q) }
        r.register("/csi.v1.Node/NodeExpandVolume") { (q: Csi_V1_NodeExpandVolumeRequest, _) in try await s.nodeExpandVolume(q) }
    }
}
