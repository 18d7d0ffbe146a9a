import ArgumentParser
import CSIProto
import CairnCSI
import Foundation

/// `cairn-bench csi …`: single CSI calls (or a CO's chain of them) from the command line, for
/// scripts that drive the test bed the way a CO would (scripts/soak). Each prints what a script
/// needs (an id, an epoch) on stdout and fails with the gRPC status otherwise.
struct CSICommands: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "csi",
        abstract: "CSI calls as a CO makes them, one command each (used by scripts/soak).",
        subcommands: [CSICreate.self, CSIAttach.self, CSIDetach.self, CSIDelete.self, CSICondition.self, CSIExpand.self,
                      CSISnapshot.self, CSIDeleteSnapshot.self, CSIProbe.self])
}

/// `block` or a filesystem type (`ext4`, `xfs`).
struct AccessOption: ParsableArguments {
    @Option(help: "block, or the filesystem of a mount volume (ext4, xfs).") var access: String = "block"

    func capability() -> Csi_V1_VolumeCapability {
        var capability = Csi_V1_VolumeCapability()
        if access == "block" {
            capability.block = Csi_V1_VolumeCapability.BlockVolume()
        } else {
            var mount = Csi_V1_VolumeCapability.MountVolume()
            mount.fsType = access
            capability.mount = mount
        }
        var mode = Csi_V1_VolumeCapability.AccessMode()
        mode.mode = .singleNodeWriter
        capability.accessMode = mode
        return capability
    }
}

struct CSICreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "CreateVolume; prints the volume id.")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "Volume name.") var name: String
    @Option(name: .customLong("size-mib"), help: "Size in MiB.") var sizeMiB: Int64 = 64
    @Option(help: "Replicas.") var replicas: Int = 3
    @Option(help: "Node that gets a replica first (topology preference).") var preferredNode: String?
    @OptionGroup var access: AccessOption

    func run() async throws {
        var r = Csi_V1_CreateVolumeRequest()
        r.name = name
        r.volumeCapabilities = [access.capability()]
        r.capacityRange.requiredBytes = sizeMiB << 20
        r.parameters = ["replicas": String(replicas)]
        if let preferredNode {
            var topology = Csi_V1_Topology()
            topology.segments = ["topology.cairn.dev/node": preferredNode]
            r.accessibilityRequirements.preferred = [topology]
        }
        let response = try await CSIClient(endpoint: controller).call("Controller", "CreateVolume", r,
                                                                       as: Csi_V1_CreateVolumeResponse.self)
        print(response.volume.volumeID)
    }
}

/// ControllerPublish, NodeStage, NodePublish; prints the attachment's epoch.
struct CSIAttach: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attach", abstract: "ControllerPublish, NodeStage, NodePublish; prints the publish context's epoch.")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The node's CSI endpoint.") var node: String
    @Option(help: "The node's id.") var nodeID: String
    @Option(help: "The volume id.") var volume: String
    @Option(help: "Staging path (created).") var staging: String
    @Option(help: "Target path.") var target: String
    @OptionGroup var access: AccessOption

    func run() async throws {
        let attachment = Attachment(volume: volume, nodeID: nodeID, staging: staging, target: target,
                                    capability: access.capability())
        let context = try await attachment.publish(controller: CSIClient(endpoint: controller), node: CSIClient(endpoint: node))
        print(context["cairn.dev/epoch"] ?? "-")
    }
}

/// NodeUnpublish and NodeUnstage when --node is given (a dead node cannot), then ControllerUnpublish.
struct CSIDetach: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detach", abstract: "NodeUnpublish, NodeUnstage (with --node), ControllerUnpublish (unless --node-only).")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The node's CSI endpoint; leave out for a dead node.") var node: String?
    @Option(help: "The node's id.") var nodeID: String
    @Option(help: "The volume id.") var volume: String
    @Option(help: "Staging path.") var staging: String = ""
    @Option(help: "Target path.") var target: String = ""
    @Flag(help: "Only the node's calls, no ControllerUnpublish.") var nodeOnly = false

    func run() async throws {
        let attachment = Attachment(volume: volume, nodeID: nodeID, staging: staging, target: target)
        try await attachment.unpublish(controller: nodeOnly ? nil : CSIClient(endpoint: controller),
                                       node: node.map { CSIClient(endpoint: $0) })
    }
}

struct CSIDelete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "DeleteVolume.")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The volume id.") var volume: String

    func run() async throws {
        try await deleteVolume(CSIClient(endpoint: controller), volume)
    }
}

/// ControllerExpandVolume, then NodeExpandVolume on the attached node when --node is given.
struct CSICondition: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "condition", abstract: "ControllerGetVolume; prints `normal: MESSAGE` or `abnormal: MESSAGE`.")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The volume id.") var volume: String

    func run() async throws {
        var r = Csi_V1_ControllerGetVolumeRequest()
        r.volumeID = volume
        let condition = try await CSIClient(endpoint: controller).call(
            "Controller", "ControllerGetVolume", r, as: Csi_V1_ControllerGetVolumeResponse.self).status.volumeCondition
        print("\(condition.abnormal ? "abnormal" : "normal"): \(condition.message)")
    }
}

struct CSIExpand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "expand", abstract: "ControllerExpandVolume, then NodeExpandVolume with --node; prints the new size in bytes.")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The attached node's CSI endpoint.") var node: String?
    @Option(help: "The volume id.") var volume: String
    @Option(name: .customLong("size-mib"), help: "New size in MiB.") var sizeMiB: Int64
    @Option(help: "The volume path on the node (target path).") var path: String = ""
    @Option(help: "The staging path on the node.") var staging: String = ""
    @OptionGroup var access: AccessOption

    func run() async throws {
        var ce = Csi_V1_ControllerExpandVolumeRequest()
        ce.volumeID = volume
        ce.capacityRange.requiredBytes = sizeMiB << 20
        ce.volumeCapability = access.capability()
        let expanded = try await CSIClient(endpoint: controller).call("Controller", "ControllerExpandVolume", ce,
                                                                      as: Csi_V1_ControllerExpandVolumeResponse.self)
        var bytes = expanded.capacityBytes
        if let node, expanded.nodeExpansionRequired {
            var ne = Csi_V1_NodeExpandVolumeRequest()
            ne.volumeID = volume
            ne.volumePath = path
            ne.stagingTargetPath = staging
            ne.capacityRange.requiredBytes = sizeMiB << 20
            ne.volumeCapability = access.capability()
            bytes = try await CSIClient(endpoint: node).call("Node", "NodeExpandVolume", ne,
                                                             as: Csi_V1_NodeExpandVolumeResponse.self).capacityBytes
        }
        print(bytes)
    }
}

struct CSISnapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "snapshot", abstract: "CreateSnapshot; prints the snapshot id.")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The source volume id.") var volume: String
    @Option(help: "Snapshot name.") var name: String

    func run() async throws {
        var r = Csi_V1_CreateSnapshotRequest()
        r.sourceVolumeID = volume
        r.name = name
        let response = try await CSIClient(endpoint: controller).call("Controller", "CreateSnapshot", r,
                                                                       as: Csi_V1_CreateSnapshotResponse.self)
        print(response.snapshot.snapshotID)
    }
}

struct CSIDeleteSnapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete-snapshot", abstract: "DeleteSnapshot.")
    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The snapshot id.") var snapshot: String

    func run() async throws {
        var r = Csi_V1_DeleteSnapshotRequest()
        r.snapshotID = snapshot
        _ = try await CSIClient(endpoint: controller).call("Controller", "DeleteSnapshot", r,
                                                           as: Csi_V1_DeleteSnapshotResponse.self)
    }
}

struct CSIProbe: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "probe", abstract: "Wait until an endpoint answers Probe.")
    @Option(help: "The CSI endpoint.") var endpoint: String
    @Option(help: "Seconds to wait.") var seconds: Int = 30

    func run() async throws {
        try await CSIClient(endpoint: endpoint).waitUntilServing(seconds: seconds)
    }
}
