import CairnCSI
import CairnCore
import CairnNode
import CairnProto
import CairnRPC
import Foundation
import Logging
import SwiftProtobuf

/// What the agent agrees to touch, whoever asks: defence in depth behind the node role's own
/// validation, because the agent is root in the host's namespaces and its socket is the one door
/// to that power.
/// - Files attached as loop devices: `<data-dir>/volumes/<volume-id>.img` and, in cluster mode,
///   a running engine's `<data-dir>/engines/<volume-id>/volume` only (never an arbitrary file),
///   also after resolving symlinks. Loop devices may also be listed by `/volume`, the name a
///   detached engine file leaves on the devices still bound to it.
/// - Devices: loop devices (`/dev/loopN`) only.
/// - Host-namespace staging and target paths: under a `--path-root` (Validate.path), or under
///   a root's resolved form (the node resolves paths before binding, and a root may itself be a
///   symlink).
/// - Paths in a process's namespace: absolute and free of `.`/`..`; the helper that enters the
///   namespace refuses whatever escapes the process's root.
public struct AgentConfinement: Sendable {
    public let pathRoots: [String]
    public let volumesDirectory: String
    public let enginesDirectory: String?
    private let checkedRoots: [String]
    private let resolvedVolumesDirectory: String
    /// The name losetup shows for a device whose engine file's FUSE mount was detached.
    static let detachedEngineFile = "/volume"

    public init(pathRoots: [String], volumesDirectory: String, enginesDirectory: String? = nil) {
        self.pathRoots = pathRoots
        self.volumesDirectory = volumesDirectory
        self.enginesDirectory = enginesDirectory
        var roots = pathRoots
        for root in pathRoots {
            if let real = Validate.realPath(root), !roots.contains(real) { roots.append(real) }
        }
        checkedRoots = roots
        resolvedVolumesDirectory = Validate.realPath(volumesDirectory) ?? volumesDirectory
    }

    /// A staging or target path in the host's namespace.
    @discardableResult
    public func hostPath(_ path: String, field: String) throws -> String {
        try Validate.path(path, field: field, roots: checkedRoots)
    }

    /// A path in `namespace`: confined to the roots on the host, absolute elsewhere.
    @discardableResult
    public func path(_ path: String, in namespace: MountNamespace, field: String) throws -> String {
        switch namespace {
        case .host: return try hostPath(path, field: field)
        case .process: return try Validate.absolutePath(path, field: field)
        }
    }

    /// A volume's backing file: `<volumes directory>/<volume-id>.img`.
    @discardableResult
    public func backingFile(_ file: String, field: String = "file") throws -> String {
        let normalised = try Validate.absolutePath(file, field: field)
        if let enginesDirectory, let volumeID = Self.engineVolume(normalised, under: enginesDirectory) {
            try Validate.volumeID(volumeID)
            return normalised
        }
        let directory = (normalised as NSString).deletingLastPathComponent
        let name = (normalised as NSString).lastPathComponent
        let refusal = CairnError.invalidArgument(
            "\(field) \"\(Validate.printable(file))\" is not a volume file of this agent (\(volumesDirectory)/<volume-id>.img); the agent attaches nothing else. Run the node role with the same --data-dir as the agent")
        guard directory == volumesDirectory || directory == resolvedVolumesDirectory, name.hasSuffix(".img") else {
            throw refusal
        }
        guard (try? Validate.volumeID(String(name.dropLast(4)))) != nil else { throw refusal }
        if let real = Validate.realPath(normalised),
           (real as NSString).deletingLastPathComponent != resolvedVolumesDirectory {
            throw CairnError.invalidArgument(
                "\(field) \"\(Validate.printable(file))\" resolves through a symbolic link to \(real), outside \(volumesDirectory); the agent attaches volume files only")
        }
        return normalised
    }

    /// A file whose loop devices may be listed: a backing file, or `/volume`.
    public func listedFile(_ file: String) throws {
        if file != Self.detachedEngineFile { try backingFile(file) }
    }

    /// `<engines>/<volume-id>/volume` → the volume id (unchecked), else nil.
    static func engineVolume(_ path: String, under enginesDirectory: String) -> String? {
        let prefix = enginesDirectory + "/"
        guard path.hasPrefix(prefix), path.hasSuffix("/volume") else { return nil }
        let middle = path.dropFirst(prefix.count).dropLast("/volume".count)
        return middle.isEmpty || middle.contains("/") ? nil : String(middle)
    }

    /// A loop device node, `/dev/loopN`.
    @discardableResult
    public func loopDevice(_ device: String, field: String = "device") throws -> String {
        let number = device.hasPrefix("/dev/loop") ? device.dropFirst("/dev/loop".count) : ""
        guard !number.isEmpty, number.count <= 9, number.allSatisfy({ $0.isASCII && $0.isNumber }) else {
            throw CairnError.invalidArgument(
                "\(field) \"\(Validate.printable(device))\" is not a loop device (/dev/loopN); the agent works on volume loop devices only")
        }
        return device
    }

    /// The source of a bind mount (always in the host's namespace): a loop device (block
    /// access) or a staging directory under a path root (mount access).
    public func bindSource(_ source: String) throws {
        if source.hasPrefix("/dev/") {
            try loopDevice(source, field: "source")
        } else {
            try hostPath(source, field: "source")
        }
    }
}

/// Serves the agent protocol (proto/cairn.proto): every `Mounter` method forwarded to the
/// machine's Mounter (LinuxMounter in production) after the agent's own checks
/// (`AgentConfinement`), and hot-plug through a NodeService (the same one the CSI node service
/// uses in `--role all`, so its volume locks are shared), and the volume's backing on this
/// node (`backing`: the engines of replicated volumes run here, for a split node role's
/// `AgentBacking`), reading volume records from `store`.
///
/// Errors leave through `AgentWire.encode` only.
public final class AgentService: Sendable {
    let mounter: any Mounter
    let confinement: AgentConfinement
    let hotPlug: NodeService?
    let backing: (any NodeBacking)?
    let store: (any MetadataStore)?
    let nodeID: String
    let logger: Logger

    public init(mounter: any Mounter, confinement: AgentConfinement, hotPlug: NodeService?,
                backing: (any NodeBacking)? = nil, store: (any MetadataStore)? = nil, nodeID: String,
                logger: Logger) {
        self.mounter = mounter
        self.confinement = confinement
        self.hotPlug = hotPlug
        self.backing = backing
        self.store = store
        self.nodeID = nodeID
        self.logger = logger
    }

    /// Registers one handler per Agent RPC on `router`.
    public func register(on router: Router) {
        typealias M = AgentProtocol.Method
        let m = mounter
        let c = confinement

        serve(router, M.hello) { (q: Cairn_Agent_V1_HelloRequest) async throws -> Cairn_Agent_V1_HelloResponse in
            guard q.protocolVersion == AgentProtocol.version else {
                throw CairnError.failedPrecondition(
                    "this cairn agent speaks agent protocol version \(AgentProtocol.version) (cairn \(CairnVersion.version)); the client speaks version \(q.protocolVersion) (cairn \(q.clientVersion.isEmpty ? "unknown" : q.clientVersion)): run the same cairn version for the node role and the agent")
            }
            return .with {
                $0.protocolVersion = AgentProtocol.version
                $0.agentVersion = CairnVersion.version
                $0.nodeID = self.nodeID
            }
        }

        // Devices and filesystems.
        serve(router, M.attachLoop) { (q: Cairn_Agent_V1_AttachLoopRequest) async throws -> Cairn_Agent_V1_AttachLoopResponse in
            try c.backingFile(q.file)
            let device = try await m.attachLoop(file: q.file, readOnly: q.readOnly)
            return .with { $0.device = device }
        }
        serve(router, M.loopDevices) { (q: Cairn_Agent_V1_LoopDevicesRequest) async throws -> Cairn_Agent_V1_LoopDevicesResponse in
            try c.listedFile(q.file)
            let devices = try await m.loopDevices(backing: q.file)
            return .with { $0.devices = devices }
        }
        serve(router, M.detachLoop) { (q: Cairn_Agent_V1_DetachLoopRequest) async throws -> Cairn_Agent_V1_DetachLoopResponse in
            try await m.detachLoop(device: c.loopDevice(q.device))
            return Cairn_Agent_V1_DetachLoopResponse()
        }
        serve(router, M.probe) { (q: Cairn_Agent_V1_ProbeRequest) async throws -> Cairn_Agent_V1_ProbeResponse in
            let content = try await m.probe(device: c.loopDevice(q.device))
            return .with { $0.content = .init(content) }
        }
        serve(router, M.makeFilesystem) { (q: Cairn_Agent_V1_MakeFilesystemRequest) async throws -> Cairn_Agent_V1_MakeFilesystemResponse in
            try await m.makeFilesystem(device: c.loopDevice(q.device), fsType: Self.filesystem(q.fsType))
            return Cairn_Agent_V1_MakeFilesystemResponse()
        }
        serve(router, M.checkFilesystem) { (q: Cairn_Agent_V1_CheckFilesystemRequest) async throws -> Cairn_Agent_V1_CheckFilesystemResponse in
            try await m.checkFilesystem(device: c.loopDevice(q.device), fsType: Self.filesystem(q.fsType))
            return Cairn_Agent_V1_CheckFilesystemResponse()
        }
        serve(router, M.mount) { (q: Cairn_Agent_V1_MountRequest) async throws -> Cairn_Agent_V1_MountResponse in
            try c.loopDevice(q.device)
            try c.hostPath(q.target, field: "target")
            try await m.mount(device: q.device, at: q.target, fsType: Self.filesystem(q.fsType), options: q.options)
            return Cairn_Agent_V1_MountResponse()
        }
        serve(router, M.blockDeviceSize) { (q: Cairn_Agent_V1_BlockDeviceSizeRequest) async throws -> Cairn_Agent_V1_BlockDeviceSizeResponse in
            let bytes = try await m.blockDeviceSize(device: c.loopDevice(q.device))
            return .with { $0.bytes = bytes }
        }

        serve(router, M.expandFilesystem) { (q: Cairn_Agent_V1_ExpandFilesystemRequest) async throws -> Cairn_Agent_V1_ExpandFilesystemResponse in
            let device = try c.loopDevice(q.device)
            if !q.fsType.isEmpty { try c.hostPath(q.mountPath, field: "mount_path") }
            let bytes = try await m.expand(device: device, fsType: q.fsType.isEmpty ? "" : Self.filesystem(q.fsType),
                                           mountPath: q.mountPath)
            return .with { $0.deviceBytes = bytes }
        }

        // Paths and mounts in a namespace.
        serve(router, M.namespaceOfProcess) { (q: Cairn_Agent_V1_NamespaceOfProcessRequest) async throws -> Cairn_Agent_V1_NamespaceOfProcessResponse in
            let namespace = try await m.namespace(ofProcess: q.pid)
            return .with { $0.namespace = .init(namespace) }
        }
        serve(router, M.inspect) { (q: Cairn_Agent_V1_InspectRequest) async throws -> Cairn_Agent_V1_InspectResponse in
            let namespace = try q.namespace.decoded()
            let state = try await m.inspect(c.path(q.path, in: namespace, field: "path"), in: namespace)
            return .with { $0.state = .init(state) }
        }
        serve(router, M.makeTarget) { (q: Cairn_Agent_V1_MakeTargetRequest) async throws -> Cairn_Agent_V1_MakeTargetResponse in
            let namespace = try q.namespace.decoded()
            let created = try await m.makeTarget(c.path(q.path, in: namespace, field: "path"),
                                                 for: q.accessType.decoded(), in: namespace)
            return .with { $0.created = created }
        }
        serve(router, M.removeTarget) { (q: Cairn_Agent_V1_RemoveTargetRequest) async throws -> Cairn_Agent_V1_RemoveTargetResponse in
            let namespace = try q.namespace.decoded()
            let removed = try await m.removeTarget(c.path(q.path, in: namespace, field: "path"), in: namespace)
            return .with { $0.removed = removed }
        }
        serve(router, M.bindMount) { (q: Cairn_Agent_V1_BindMountRequest) async throws -> Cairn_Agent_V1_BindMountResponse in
            let namespace = try q.namespace.decoded()
            try c.bindSource(q.source)
            try await m.bindMount(source: q.source, at: c.path(q.target, in: namespace, field: "target"),
                                  in: namespace, readOnly: q.readOnly, options: q.options)
            return Cairn_Agent_V1_BindMountResponse()
        }
        serve(router, M.unmount) { (q: Cairn_Agent_V1_UnmountRequest) async throws -> Cairn_Agent_V1_UnmountResponse in
            let namespace = try q.namespace.decoded()
            try await m.unmount(c.path(q.target, in: namespace, field: "target"), in: namespace)
            return Cairn_Agent_V1_UnmountResponse()
        }
        serve(router, M.mountTable) { (q: Cairn_Agent_V1_MountTableRequest) async throws -> Cairn_Agent_V1_MountTableResponse in
            let mounts = try await m.mountTable(in: q.namespace.decoded())
            return .with { $0.mounts = mounts.map(Cairn_Agent_V1_MountInfo.init) }
        }
        serve(router, M.filesystemStats) { (q: Cairn_Agent_V1_FilesystemStatsRequest) async throws -> Cairn_Agent_V1_FilesystemStatsResponse in
            let namespace = try q.namespace.decoded()
            let stats = try await m.filesystemStats(path: c.path(q.path, in: namespace, field: "path"), in: namespace)
            return .with { $0.stats = .init(stats) }
        }

        registerBacking(on: router)

        // Hot-plug.
        serve(router, M.attachToProcess) { (q: Cairn_Agent_V1_AttachToProcessRequest) async throws -> Cairn_Agent_V1_AttachToProcessResponse in
            let result = try await self.requireHotPlug().attachToProcess(volumeID: q.volumeID, pid: q.pid, path: q.path,
                                                                         readOnly: q.readOnly)
            return .with {
                $0.accessType = .init(result.accessType)
                $0.readOnly = result.readOnly
            }
        }
        serve(router, M.detachFromProcess) { (q: Cairn_Agent_V1_DetachFromProcessRequest) async throws -> Cairn_Agent_V1_DetachFromProcessResponse in
            let result = try await self.requireHotPlug().detachFromProcess(volumeID: q.volumeID, pid: q.pid, path: q.path)
            return .with {
                $0.detached = result.detached
                $0.processGone = result.processGone
            }
        }
    }

    /// The volume's backing on this node (AgentBacking's side).
    private func registerBacking(on router: Router) {
        typealias M = AgentProtocol.Method
        serve(router, M.volumeFile) { (q: Cairn_Agent_V1_VolumeFileRequest) async throws -> Cairn_Agent_V1_VolumeFileResponse in
            try Validate.volumeID(q.volumeID, field: "volume_id")
            let file = try await self.requireBacking().file(volumeID: q.volumeID)
            return .with { $0.file = file }
        }
        serve(router, M.activateVolume) { (q: Cairn_Agent_V1_ActivateVolumeRequest) async throws -> Cairn_Agent_V1_ActivateVolumeResponse in
            let (volume, attachment) = try await self.attachedVolume(q.volumeID)
            // The epoch comes from this agent's store, never from the caller: it is what fences.
            guard attachment.epoch == FencingEpoch(UInt64(bitPattern: q.epoch)) else {
                throw CairnError.failedPrecondition(
                    "volume \(q.volumeID) is attached to node \(self.nodeID) with epoch \(attachment.epoch.rawValue), not \(q.epoch); the request is stale, retry NodeStageVolume")
            }
            let key = q.dataKey.isEmpty ? nil : VolumeDataKey([UInt8](q.dataKey))
            let file = try await self.requireBacking().activate(volume, attachment: attachment, key: key)
            return .with { $0.file = file }
        }
        serve(router, M.deactivateVolume) { (q: Cairn_Agent_V1_DeactivateVolumeRequest) async throws -> Cairn_Agent_V1_DeactivateVolumeResponse in
            try Validate.volumeID(q.volumeID, field: "volume_id")
            try await self.requireBacking().deactivate(volumeID: q.volumeID)
            return Cairn_Agent_V1_DeactivateVolumeResponse()
        }
        serve(router, M.volumeCondition) { (q: Cairn_Agent_V1_VolumeConditionRequest) async throws -> Cairn_Agent_V1_VolumeConditionResponse in
            let volume = try await self.volume(q.volumeID)
            return .init(try await self.requireBacking().condition(volume))
        }
        serve(router, M.expandVolumeOnNode) { (q: Cairn_Agent_V1_ExpandVolumeOnNodeRequest) async throws -> Cairn_Agent_V1_ExpandVolumeOnNodeResponse in
            let (volume, _) = try await self.attachedVolume(q.volumeID)
            try await self.requireBacking().expandOnNode(volume)
            return Cairn_Agent_V1_ExpandVolumeOnNodeResponse()
        }
    }

    private func requireBacking() throws -> any NodeBacking {
        guard let backing else {
            throw CairnError.unimplemented("this cairn agent was started without a node store; it runs no volume's backing")
        }
        return backing
    }

    /// The volume's record from the agent's own store connection: the freshest, whatever the
    /// node role read.
    private func volume(_ volumeID: String) async throws -> VolumeRecord {
        try Validate.volumeID(volumeID, field: "volume_id")
        guard let store else {
            throw CairnError.unimplemented("this cairn agent was started without a node store; it runs no volume's backing")
        }
        guard let volume = try await store.volume(id: volumeID) else {
            throw CairnError.notFound("volume \(volumeID) does not exist")
        }
        return volume
    }

    /// Defence in depth: the agent starts or grows an engine only for a volume the controller
    /// attached to this node.
    private func attachedVolume(_ volumeID: String) async throws -> (VolumeRecord, AttachmentRecord) {
        let volume = try await volume(volumeID)
        guard let attachment = try await store!.attachments(volumeID: volumeID).first(where: { $0.nodeID == nodeID }) else {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is not attached to node \(nodeID); call ControllerPublishVolume for this node first")
        }
        return (volume, attachment)
    }

    private func requireHotPlug() throws -> NodeService {
        guard let hotPlug else {
            throw CairnError.unimplemented("this cairn agent was started without a node store; hot-plug is not available")
        }
        return hotPlug
    }

    private static func filesystem(_ fsType: String) throws -> String {
        guard AccessRules.supportedFilesystems.contains(fsType) else {
            throw CairnError.invalidArgument(
                "fs_type \"\(Validate.printable(fsType))\" is not supported; use one of \(AccessRules.supportedFilesystems.joined(separator: ", "))")
        }
        return fsType
    }

    /// Registers a handler whose errors leave through AgentWire.encode.
    private func serve<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ router: Router, _ method: String, _ body: @escaping @Sendable (Request) async throws -> Response
    ) {
        router.register(method) { (request: Request, _: RPCContext) async throws -> Response in
            do {
                return try await body(request)
            } catch {
                throw AgentWire.encode(error)
            }
        }
    }
}
