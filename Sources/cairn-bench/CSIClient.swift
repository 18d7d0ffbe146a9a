import CSIProto
import CairnCSI
import CairnCore
import CairnRPC
import Foundation
import SwiftProtobuf

/// The CSI calls the benchmark makes, on one long-lived gRPC channel per endpoint (a CO keeps
/// its connection too: the numbers must not include connection or process start-up).
struct CSIClient: Sendable {
    let endpoint: String
    let channel: GRPCChannel

    init(endpoint: String) {
        self.endpoint = endpoint
        channel = GRPCChannel(target: endpoint)
    }

    func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ service: String, _ method: String, _ request: Request, as: Response.Type
    ) async throws -> Response {
        do {
            return try await channel.call("/csi.v1.\(service)/\(method)", request, as: Response.self)
        } catch let error as CairnError {
            throw BenchError("\(method) on \(endpoint) failed: \(error.code) \(error.message)")
        }
    }

    /// Waits until the endpoint answers Probe (used after a node restart).
    func waitUntilServing(seconds: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while true {
            let reply = await channel.callRaw("/csi.v1.Identity/Probe", try Csi_V1_ProbeRequest().serializedBytes(),
                                              timeout: .seconds(2))
            if reply.code == .ok { return }
            guard ContinuousClock.now < deadline else {
                throw BenchError("\(endpoint) did not answer Probe within \(seconds) s (last: \(reply.code) \(reply.message))")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }
}

/// A mount-access ext4 volume's requests, as a CO sends them.
enum Requests {
    static func capability() -> Csi_V1_VolumeCapability {
        var capability = Csi_V1_VolumeCapability()
        var mount = Csi_V1_VolumeCapability.MountVolume()
        mount.fsType = "ext4"
        capability.mount = mount
        var mode = Csi_V1_VolumeCapability.AccessMode()
        mode.mode = .singleNodeWriter
        capability.accessMode = mode
        return capability
    }

    /// `preferredNode`: the node the volume will be used on, as a CO with late binding says it
    /// (Kubernetes' WaitForFirstConsumer): Cairn puts a replica there first.
    static func create(name: String, bytes: Int64, replicas: Int, preferredNode: String? = nil,
                       parameters: [String: String] = [:]) -> Csi_V1_CreateVolumeRequest {
        var r = Csi_V1_CreateVolumeRequest()
        if let preferredNode {
            var topology = Csi_V1_Topology()
            topology.segments = ["topology.cairn.dev/node": preferredNode]
            r.accessibilityRequirements.preferred = [topology]
        }
        r.name = name
        r.volumeCapabilities = [capability()]
        var range = Csi_V1_CapacityRange()
        range.requiredBytes = bytes
        r.capacityRange = range
        r.parameters = parameters.merging(["replicas": String(replicas)]) { $1 }
        return r
    }
}

/// One attachment of a volume on a node: the three calls of the publish chain and their undo.
struct Attachment {
    let volume: String
    let nodeID: String
    let staging: String
    let target: String

    let capability: Csi_V1_VolumeCapability

    init(volume: String, nodeID: String, root: String) {
        self.init(volume: volume, nodeID: nodeID, staging: root + "/\(volume)-\(nodeID)/staging",
                  target: root + "/\(volume)-\(nodeID)/target")
    }

    init(volume: String, nodeID: String, staging: String, target: String,
         capability: Csi_V1_VolumeCapability = Requests.capability()) {
        self.volume = volume
        self.nodeID = nodeID
        self.staging = staging
        self.target = target
        self.capability = capability
    }

    /// ControllerPublish, NodeStage (formats the first time), NodePublish; the publish context.
    @discardableResult
    func publish(controller: CSIClient, node: CSIClient) async throws -> [String: String] {
        var cp = Csi_V1_ControllerPublishVolumeRequest()
        cp.volumeID = volume
        cp.nodeID = nodeID
        cp.volumeCapability = capability
        let published = try await controller.call("Controller", "ControllerPublishVolume", cp,
                                                  as: Csi_V1_ControllerPublishVolumeResponse.self)
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        var stage = Csi_V1_NodeStageVolumeRequest()
        stage.volumeID = volume
        stage.stagingTargetPath = staging
        stage.volumeCapability = capability
        stage.publishContext = published.publishContext
        _ = try await node.call("Node", "NodeStageVolume", stage, as: Csi_V1_NodeStageVolumeResponse.self)
        var pub = Csi_V1_NodePublishVolumeRequest()
        pub.volumeID = volume
        pub.stagingTargetPath = staging
        pub.targetPath = target
        pub.volumeCapability = capability
        pub.publishContext = published.publishContext
        _ = try await node.call("Node", "NodePublishVolume", pub, as: Csi_V1_NodePublishVolumeResponse.self)
        return published.publishContext
    }

    /// NodeUnpublish, NodeUnstage (only when `node` is given: a dead node cannot), ControllerUnpublish
    /// (only when `controller` is given: a CO cleaning up a node it already detached does not).
    func unpublish(controller: CSIClient?, node: CSIClient?) async throws {
        if let node {
            var unpub = Csi_V1_NodeUnpublishVolumeRequest()
            unpub.volumeID = volume
            unpub.targetPath = target
            _ = try await node.call("Node", "NodeUnpublishVolume", unpub, as: Csi_V1_NodeUnpublishVolumeResponse.self)
            var unstage = Csi_V1_NodeUnstageVolumeRequest()
            unstage.volumeID = volume
            unstage.stagingTargetPath = staging
            _ = try await node.call("Node", "NodeUnstageVolume", unstage, as: Csi_V1_NodeUnstageVolumeResponse.self)
        }
        guard let controller else { return }
        var cu = Csi_V1_ControllerUnpublishVolumeRequest()
        cu.volumeID = volume
        cu.nodeID = nodeID
        _ = try await controller.call("Controller", "ControllerUnpublishVolume", cu,
                                      as: Csi_V1_ControllerUnpublishVolumeResponse.self)
    }
}

func createVolume(_ controller: CSIClient, name: String, bytes: Int64, replicas: Int,
                  preferredNode: String? = nil, parameters: [String: String] = [:]) async throws -> String {
    try await controller.call("Controller", "CreateVolume",
                              Requests.create(name: name, bytes: bytes, replicas: replicas, preferredNode: preferredNode,
                                              parameters: parameters),
                              as: Csi_V1_CreateVolumeResponse.self).volume.volumeID
}

func deleteVolume(_ controller: CSIClient, _ id: String) async throws {
    var r = Csi_V1_DeleteVolumeRequest()
    r.volumeID = id
    _ = try await controller.call("Controller", "DeleteVolume", r, as: Csi_V1_DeleteVolumeResponse.self)
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
