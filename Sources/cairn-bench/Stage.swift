import ArgumentParser
import CSIProto
import Foundation

/// bench/run's way to set up the volumes fio runs on: CreateVolume, ControllerPublish and
/// NodeStage (ext4, mounted at --path), and the undo — with the same client as the timed calls,
/// so the benchmark needs no CSI command-line tool.
struct Stage: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create an ext4 volume, publish it to a node and stage it at a path; prints the volume id.")

    @Option(help: "The controller's CSI endpoint (unix:///…).") var controller: String
    @Option(help: "The node's CSI endpoint.") var node: String
    @Option(help: "The node's id (ControllerPublish's node_id).") var nodeID: String
    @Option(help: "Volume name.") var name: String
    @Option(help: "Replicas (the `replicas` parameter).") var replicas: Int = 1
    @Option(name: .customLong("size-mib"), help: "Volume size in MiB.") var sizeMiB: Int64 = 1024
    @Option(help: "The staging path (created; must be under the node's --path-root).") var path: String
    @Flag(help: "Create the volume with `encrypted: \"true\"` and stage it with the secret `passphrase` (docs/encryption.md).")
    var encrypted = false

    /// The benchmark's passphrase: what it measures is the cipher, not the secret.
    static let benchPassphrase = "cairn-bench-passphrase"

    func run() async throws {
        let controller = CSIClient(endpoint: self.controller)
        let node = CSIClient(endpoint: self.node)
        let volume = try await createVolume(controller, name: name, bytes: sizeMiB << 20, replicas: replicas,
                                            preferredNode: nodeID, parameters: encrypted ? ["encrypted": "true"] : [:])
        do {
            var cp = Csi_V1_ControllerPublishVolumeRequest()
            cp.volumeID = volume
            cp.nodeID = nodeID
            cp.volumeCapability = Requests.capability()
            let published = try await controller.call("Controller", "ControllerPublishVolume", cp,
                                                      as: Csi_V1_ControllerPublishVolumeResponse.self)
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            var stage = Csi_V1_NodeStageVolumeRequest()
            stage.volumeID = volume
            stage.stagingTargetPath = path
            stage.volumeCapability = Requests.capability()
            stage.publishContext = published.publishContext
            if encrypted { stage.secrets = ["passphrase": Self.benchPassphrase] }
            _ = try await node.call("Node", "NodeStageVolume", stage, as: Csi_V1_NodeStageVolumeResponse.self)
        } catch {
            try? await Unstage.undo(volume: volume, path: path, nodeID: nodeID, controller: controller, node: node)
            throw error
        }
        print(volume)
    }
}

struct Unstage: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Undo `stage`: NodeUnstage, ControllerUnpublish, DeleteVolume.")

    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The node's CSI endpoint.") var node: String
    @Option(help: "The node's id.") var nodeID: String
    @Option(help: "The volume id `stage` printed.") var volume: String
    @Option(help: "The staging path.") var path: String

    func run() async throws {
        try await Self.undo(volume: volume, path: path, nodeID: nodeID,
                            controller: CSIClient(endpoint: controller), node: CSIClient(endpoint: node))
    }

    static func undo(volume: String, path: String, nodeID: String, controller: CSIClient, node: CSIClient) async throws {
        var unstage = Csi_V1_NodeUnstageVolumeRequest()
        unstage.volumeID = volume
        unstage.stagingTargetPath = path
        _ = try await node.call("Node", "NodeUnstageVolume", unstage, as: Csi_V1_NodeUnstageVolumeResponse.self)
        var cu = Csi_V1_ControllerUnpublishVolumeRequest()
        cu.volumeID = volume
        cu.nodeID = nodeID
        _ = try await controller.call("Controller", "ControllerUnpublishVolume", cu,
                                      as: Csi_V1_ControllerUnpublishVolumeResponse.self)
        try await deleteVolume(controller, volume)
    }
}
