import CSIProto
import CairnCore
import Foundation
import Logging

// NodeExpandVolume: the node's device and filesystem grown after ControllerExpandVolume.

extension NodeService {
    // MARK: NodeExpandVolume

    /// After ControllerExpandVolume grew the volume's storage: makes this node's device see the
    /// new size (replicated: the engine's file grows first) and grows the mounted filesystem
    /// online. Idempotent: a repeat finds nothing left to grow.
    public func nodeExpandVolume(_ request: Csi_V1_NodeExpandVolumeRequest) async throws -> Csi_V1_NodeExpandVolumeResponse {
        try Validate.volumeID(request.volumeID)
        guard !request.volumePath.isEmpty else { throw CairnError.invalidArgument("volume_path is required") }
        if request.capacityRange.requiredBytes < 0 || request.capacityRange.limitBytes < 0 {
            throw CairnError.invalidArgument("capacity_range bytes must not be negative")
        }
        let volumeID = request.volumeID
        let volume = try await requireVolume(volumeID)
        return try await locks.withLock(volumeID, operation: "NodeExpandVolume") {
            guard let stage = try await store.stage(volumeID: volumeID, nodeID: nodeID) else {
                throw CairnError.failedPrecondition(
                    "volume \(volumeID) is not staged on node \(nodeID); NodeStageVolume it before NodeExpandVolume")
            }
            let path = try Validate.absolutePath(request.volumePath, field: "volume_path")
            let targets = try await store.publishes(volumeID: volumeID).filter { $0.nodeID == nodeID }.map(\.targetPath)
            guard path == stage.stagingPath || targets.contains(path) else {
                throw CairnError.notFound(
                    "volume \(volumeID) is neither staged nor published at \"\(Validate.printable(request.volumePath))\" on node \(nodeID)")
            }
            try await backing.expandOnNode(volume)
            let fsType = stage.accessType == .block ? "" : stage.fsType
            let bytes = try await mounter.expand(device: stage.devicePath, fsType: fsType, mountPath: stage.stagingPath)
            let required = request.capacityRange.requiredBytes
            if required > bytes {
                throw CairnError.outOfRange(
                    "volume \(volumeID)'s device has \(bytes) bytes, less than the \(required) required: call ControllerExpandVolume first (the volume's record says \(volume.capacityBytes) bytes)")
            }
            logger.info("volume expanded on the node", metadata: [
                "volume.id": "\(volumeID)", "device": "\(stage.devicePath)", "volume.bytes": "\(bytes)",
                "fs.type": "\(fsType.isEmpty ? "block" : fsType)",
            ])
            var response = Csi_V1_NodeExpandVolumeResponse()
            response.capacityBytes = bytes
            return response
        }
    }
}
