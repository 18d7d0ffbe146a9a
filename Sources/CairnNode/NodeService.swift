import CSIProto
import CairnCore
import Foundation
import Logging

/// CSI Node service: makes a volume attached to this node usable at the paths the CO asks for.
///
/// Stage attaches the volume's backing file as a loop device (direct I/O) and, for mount access,
/// puts a filesystem on it (only when it has none) and mounts it at the staging path. Publish
/// bind-mounts the staging directory (or the loop device node, for block access) at each target.
///
/// Every RPC reads the same way: validate → take the volume's lock (a concurrent call on the same
/// volume gets ABORTED) → return early when the work is already done, judged from the machine's
/// real state (mountinfo, loop devices), not only from the records → act → persist the record.
/// Records are the plugin's memory between calls; the kernel is the truth. After a reboot the
/// records survive but the loop devices and mounts do not, and a repeated NodeStageVolume
/// rebuilds them.
///
/// Owns: loop devices of volume backings, mounts at staging and target paths inside `pathRoots`,
/// StageRecord and PublishRecord rows of this node, and (one machine) the io.max lines of its
/// loop devices in the QoS cgroup. Never touches attachments or volumes.
public final class NodeService: Sendable {
    /// The topology segment every node reports; volumes are accessible from one node today.
    public static let topologyKey = "topology.cairn.dev/node"

    let nodeID: String
    let topology: [String: String]
    let maxVolumesPerNode: Int64
    let store: any MetadataStore
    let backing: any NodeBacking
    let mounter: any Mounter
    let pathRoots: [String]
    let locks: VolumeLocks
    let logger: Logger
    /// The process whose mount namespace targets are published into when a request names
    /// none (`--target-namespace-pid`); nil: the host's (the agent's) namespace.
    let defaultTargetPID: Int32?
    /// One machine (`--role all`): enforces volumes' QoS limits on their loop devices (cgroup v2
    /// io.max); nil where limits are not enforced this way (a cluster's engine does it).
    public let throttle: (any IOThrottle)?

    /// The volume_context / publish_context key that names the process (a container) whose
    /// mount namespace a target path belongs to.
    public static let namespacePIDKey = "cairn.dev/mount-namespace-pid"

    public init(nodeID: String, topology: [String: String], maxVolumesPerNode: Int64,
                store: any MetadataStore, backing: any NodeBacking, mounter: any Mounter,
                pathRoots: [String], locks: VolumeLocks, logger: Logger, defaultTargetPID: Int32? = nil,
                throttle: (any IOThrottle)? = nil) {
        self.defaultTargetPID = defaultTargetPID
        self.throttle = throttle
        self.nodeID = nodeID
        self.topology = topology
        self.maxVolumesPerNode = maxVolumesPerNode
        self.store = store
        self.backing = backing
        self.mounter = mounter
        self.pathRoots = pathRoots
        self.locks = locks
        self.logger = logger
    }


    // MARK: NodeGetCapabilities, NodeGetInfo

    public func nodeGetCapabilities(_ request: Csi_V1_NodeGetCapabilitiesRequest) async throws -> Csi_V1_NodeGetCapabilitiesResponse {
        let types: [Csi_V1_NodeServiceCapability.RPC.TypeEnum] = [
            .stageUnstageVolume, .getVolumeStats, .volumeCondition, .singleNodeMultiWriter, .expandVolume,
        ]
        var response = Csi_V1_NodeGetCapabilitiesResponse()
        response.capabilities = types.map { type in .with { $0.rpc = .with { $0.type = type } } }
        return response
    }

    public func nodeGetInfo(_ request: Csi_V1_NodeGetInfoRequest) async throws -> Csi_V1_NodeGetInfoResponse {
        var response = Csi_V1_NodeGetInfoResponse()
        response.nodeID = nodeID
        response.maxVolumesPerNode = max(0, maxVolumesPerNode)
        var segments = topology
        segments[Self.topologyKey] = nodeID
        response.accessibleTopology = .with { $0.segments = segments }
        return response
    }

    // MARK: Start-up

    /// Compares this node's records with the machine after a (re)start and logs what no longer
    /// holds. Nothing is repaired here: the CO repeats NodeStageVolume/NodePublishVolume (Mesos
    /// after a reboot, Kubernetes continuously) and those calls rebuild what is missing.
    public func reconcile() async {
        do {
            let table = try await mounter.mountTable()
            let stages = try await store.stages(nodeID: nodeID)
            for stage in stages {
                let meta = metadata(stage.volumeID, path: stage.stagingPath).with("device", stage.devicePath)
                let devices = try await mounter.loopDevices(backing: try await backing.file(volumeID: stage.volumeID))
                if devices.isEmpty {
                    logger.warning("the loop device of a staged volume vanished (reboot?); the next NodeStageVolume re-attaches it",
                                   metadata: meta)
                } else if stage.accessType == .mount,
                          !(try await isStageLive(stage, devices: devices, table: table)) {
                    logger.warning("a staged volume is no longer mounted at its staging path; the next NodeStageVolume mounts it again",
                                   metadata: meta)
                } else {
                    logger.info("staged volume intact", metadata: meta)
                }
                for publish in try await store.publishes(volumeID: stage.volumeID) where publish.nodeID == nodeID {
                    if !((try? await isLive(publish)) ?? false) {
                        logger.warning("a published target is no longer mounted; the next NodePublishVolume mounts it again",
                                       metadata: metadata(stage.volumeID, path: publish.targetPath))
                    }
                }
            }
            logger.info("node records reconciled with the machine", metadata: ["node.id": "\(nodeID)", "stages": "\(stages.count)"])
        } catch {
            logger.error("could not reconcile node records with the machine", metadata: ["node.id": "\(nodeID)", "error": "\(error)"])
        }
    }

    // MARK: Helpers

    func requireVolume(_ volumeID: String) async throws -> VolumeRecord {
        guard let volume = try await store.volume(id: volumeID) else {
            throw CairnError.notFound("volume \(volumeID) does not exist")
        }
        return volume
    }

    /// Parses the namespace PID named in a request's context.
    static func namespacePID(_ text: String?) throws -> Int32? {
        guard let text, !text.isEmpty else { return nil }
        guard let pid = Int32(text), pid > 0 else {
            throw CairnError.invalidArgument("\(namespacePIDKey)=\"\(Validate.printable(text))\" is not a process id")
        }
        return pid
    }

    /// Whether `mount` is the volume: its loop device mounted (a filesystem or a bind of the
    /// staging directory shows the device as source), or the device node itself bind-mounted
    /// (block access: devtmpfs with the node's name as root).
    func usesVolume(_ mount: MountInfo, devices: [String]) -> Bool {
        if devices.contains(mount.source) { return true }
        if mount.fsType == "devtmpfs" || mount.fsType == "tmpfs" {
            return devices.contains { "/dev" + mount.root == $0 }
        }
        return false
    }

    /// Whether a recorded publish is still mounted, in its own namespace (false when that
    /// namespace is gone).
    func isLive(_ publish: PublishRecord) async throws -> Bool {
        do {
            let real = try await mounter.resolve(publish.targetPath, in: publish.namespace)
            return try await mounter.mountInfo(at: real, in: publish.namespace) != nil
        } catch is MountNamespaceGone {
            return false
        }
    }

    func isStageLive(_ stage: StageRecord, devices: [String], table: [MountInfo]) async throws -> Bool {
        switch stage.accessType {
        case .block: return devices.contains(stage.devicePath)
        case .mount:
            let real = try await mounter.resolve(stage.stagingPath)
            return table.contains { $0.mountPoint == real && usesVolume($0, devices: devices) }
        }
    }

    func metadata(_ volumeID: String, path: String) -> Logger.Metadata {
        ["volume.id": "\(volumeID)", "node.id": "\(nodeID)", "path": "\(path)"]
    }
}

extension Logger.Metadata {
    func with(_ key: String, _ value: String) -> Logger.Metadata {
        var copy = self
        copy[key] = "\(value)"
        return copy
    }
}
