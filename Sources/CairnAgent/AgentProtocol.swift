import CairnCore
import CairnNode
import CairnProto

// The agent protocol (proto/cairn.proto) as the rest of Cairn sees it: the version, the method
// names, conversions between wire messages and CairnNode's types, and the one place where
// errors are put on and taken off the wire (AgentWire).
//
// This module owns the agent's side of the node/agent split. It may not decide CSI semantics
// (NodeService does) nor touch the kernel itself (LinuxMounter does, behind `Mounter`).

/// Version and method names of the agent protocol.
public enum AgentProtocol {
    /// Bumped on any change an older peer would misread (see proto/cairn.proto).
    public static let version: UInt32 = 2
    static let service = "/cairn.agent.v1.Agent/"

    /// The default agent socket.
    public static let defaultSocket = "/run/cairn/agent.sock"

    /// Full gRPC method names.
    public enum Method {
        public static let hello = service + "Hello"
        public static let attachLoop = service + "AttachLoop"
        public static let loopDevices = service + "LoopDevices"
        public static let detachLoop = service + "DetachLoop"
        public static let probe = service + "Probe"
        public static let makeFilesystem = service + "MakeFilesystem"
        public static let checkFilesystem = service + "CheckFilesystem"
        public static let mount = service + "Mount"
        public static let blockDeviceSize = service + "BlockDeviceSize"
        public static let expandFilesystem = service + "ExpandFilesystem"
        public static let namespaceOfProcess = service + "NamespaceOfProcess"
        public static let inspect = service + "Inspect"
        public static let makeTarget = service + "MakeTarget"
        public static let removeTarget = service + "RemoveTarget"
        public static let bindMount = service + "BindMount"
        public static let unmount = service + "Unmount"
        public static let mountTable = service + "MountTable"
        public static let filesystemStats = service + "FilesystemStats"
        public static let attachToProcess = service + "AttachToProcess"
        public static let detachFromProcess = service + "DetachFromProcess"
        public static let volumeFile = service + "VolumeFile"
        public static let activateVolume = service + "ActivateVolume"
        public static let deactivateVolume = service + "DeactivateVolume"
        public static let volumeCondition = service + "VolumeCondition"
        public static let expandVolumeOnNode = service + "ExpandVolumeOnNode"
    }

    /// `--agent-socket` spellings: an absolute path or a `unix://` endpoint → the endpoint.
    public static func endpoint(forSocket socket: String) throws -> String {
        if socket.hasPrefix("unix:") { return socket }
        guard socket.hasPrefix("/") else {
            throw CairnError.invalidArgument("--agent-socket \(socket) must be an absolute path (e.g. \(defaultSocket)) or unix:///path")
        }
        return "unix://" + socket
    }
}

// MARK: - Errors on the wire

/// How errors cross the agent socket. Every status the agent sends goes through `encode`, and
/// every status the client receives through `decode` — the only two places that know the
/// encoding:
/// - `MountNamespaceGone` travels as NOT_FOUND with the message
///   `cairn.agent/mount-namespace-gone pid=<pid>: <reason>` and comes back as MountNamespaceGone.
/// - The agent's own UNAVAILABLE statuses carry the prefix `agent: `, so the client can tell
///   them from gRPC's transport failures (agent not running, socket gone), which it rewrites
///   into "cannot reach the cairn agent at …".
/// - Everything else passes through with the agent's code and message.
public enum AgentWire {
    static let namespaceGonePrefix = "cairn.agent/mount-namespace-gone pid="
    static let agentUnavailablePrefix = "agent: "

    /// Server side: the error a handler's failure goes out as.
    public static func encode(_ error: any Error) -> CairnError {
        if let gone = error as? MountNamespaceGone {
            return CairnError(.notFound, "\(namespaceGonePrefix)\(gone.pid): \(gone.reason)")
        }
        let (code, message) = RPCStatus.from(error)
        if code == .unavailable { return CairnError(code, agentUnavailablePrefix + message) }
        return CairnError(code, message)
    }

    /// Client side: what a failed call to the agent at `endpoint` throws.
    public static func decode(_ error: CairnError, endpoint: String, method: String) -> any Error {
        switch error.code {
        case .notFound where error.message.hasPrefix(namespaceGonePrefix):
            let rest = error.message.dropFirst(namespaceGonePrefix.count)
            let colon = rest.firstIndex(of: ":") ?? rest.endIndex
            let pid = Int32(rest[..<colon]) ?? 0
            let reason = colon < rest.endIndex ? rest[rest.index(after: colon)...].trimmingPrefix(" ") : ""
            return MountNamespaceGone(pid: pid, reason: String(reason))
        case .unavailable where error.message.hasPrefix(agentUnavailablePrefix):
            return CairnError(.unavailable, String(error.message.dropFirst(agentUnavailablePrefix.count)))
        case .unavailable:
            return unreachable(endpoint, detail: error.message)
        case .deadlineExceeded:
            let name = method.split(separator: "/").last.map(String.init) ?? method
            return CairnError(.deadlineExceeded,
                              "the cairn agent at \(endpoint) did not finish \(name) in time (\(error.message)); it continues in the background, retry to get its result")
        default:
            return error
        }
    }

    /// The error for an agent that cannot be reached at all.
    public static func unreachable(_ endpoint: String, detail: String) -> CairnError {
        CairnError(.unavailable,
                   "cannot reach the cairn agent at \(endpoint): is `cairn serve --role agent` running? (\(detail))")
    }

    /// Whether `error` (as thrown by the client) means the agent could not be reached.
    public static func isUnreachable(_ error: any Error) -> Bool {
        guard let error = error as? CairnError else { return false }
        return error.code == .unavailable && error.message.hasPrefix("cannot reach the cairn agent")
    }
}

// MARK: - Conversions

extension Cairn_Agent_V1_MountNamespace {
    init(_ namespace: MountNamespace) {
        self.init()
        switch namespace {
        case .host:
            kind = .host(.init())
        case .process(let pid, let startTime):
            kind = .process(.with {
                $0.pid = pid
                $0.startTime = startTime
            })
        }
    }

    /// The namespace named, or INVALID_ARGUMENT when the message names none.
    func decoded(field: String = "namespace") throws -> MountNamespace {
        switch kind {
        case .host: return .host
        case .process(let p):
            guard p.pid > 0 else { throw CairnError.invalidArgument("\(field).process.pid must be a process id, not \(p.pid)") }
            return .process(pid: p.pid, startTime: p.startTime)
        case nil: throw CairnError.invalidArgument("\(field) is required (host or process)")
        }
    }
}

extension Cairn_Agent_V1_MountInfo {
    init(_ m: MountInfo) {
        self.init()
        mountID = Int64(m.mountID)
        parentID = Int64(m.parentID)
        major = m.major
        minor = m.minor
        root = m.root
        mountPoint = m.mountPoint
        mountOptions = m.mountOptions
        optionalFields = m.optionalFields
        fsType = m.fsType
        source = m.source
        superOptions = m.superOptions
    }

    var decoded: MountInfo {
        MountInfo(mountID: Int(mountID), parentID: Int(parentID), major: major, minor: minor, root: root,
                  mountPoint: mountPoint, mountOptions: mountOptions, optionalFields: optionalFields,
                  fsType: fsType, source: source, superOptions: superOptions)
    }
}

extension Cairn_Agent_V1_PathState {
    init(_ s: PathState) {
        self.init()
        kind = switch s.kind {
        case .missing: .missing
        case .directory: .directory
        case .emptyFile: .emptyFile
        case .file: .file
        case .blockDevice: .blockDevice
        case .other: .other
        }
        resolved = s.resolved
        isMountPoint = s.isMountPoint
    }

    var decoded: PathState {
        let k: PathKind = switch kind {
        case .missing: .missing
        case .directory: .directory
        case .emptyFile: .emptyFile
        case .file: .file
        case .blockDevice: .blockDevice
        case .other, .unspecified, .UNRECOGNIZED: .other
        }
        return PathState(kind: k, resolved: resolved, isMountPoint: isMountPoint)
    }
}

extension Cairn_Agent_V1_FilesystemStats {
    init(_ s: FilesystemStats) {
        self.init()
        totalBytes = s.totalBytes
        availableBytes = s.availableBytes
        usedBytes = s.usedBytes
        totalInodes = s.totalInodes
        freeInodes = s.freeInodes
        usedInodes = s.usedInodes
    }

    var decoded: FilesystemStats {
        FilesystemStats(totalBytes: totalBytes, availableBytes: availableBytes, usedBytes: usedBytes,
                        totalInodes: totalInodes, freeInodes: freeInodes, usedInodes: usedInodes)
    }
}

extension Cairn_Agent_V1_DeviceContent {
    init(_ c: DeviceContent) {
        self.init()
        switch c {
        case .empty: kind = .empty(.init())
        case .filesystem(let type): kind = .filesystem(type)
        case .other(let what): kind = .other(what)
        }
    }

    func decoded(device: String) throws -> DeviceContent {
        switch kind {
        case .empty: return .empty
        case .filesystem(let type): return .filesystem(type)
        case .other(let what): return .other(what)
        case nil:
            // Never guess "empty": that would let a caller format a device that holds data.
            throw CairnError.internal("the cairn agent's answer to Probe \(device) names no content; is it a newer, incompatible version?")
        }
    }
}

extension Cairn_Agent_V1_VolumeConditionResponse {
    init(_ c: BackingCondition) {
        self.init()
        abnormal = c.problem != nil
        problem = c.problem ?? ""
        healthy = c.healthy
        stageBlocked = c.stageBlocker != nil
        stageBlocker = c.stageBlocker ?? ""
    }

    var decoded: BackingCondition {
        BackingCondition(problem: abnormal ? problem : nil, healthy: healthy, stageBlocker: stageBlocked ? stageBlocker : nil)
    }
}

extension Cairn_Agent_V1_AccessType {
    init(_ a: AccessType) {
        self = a == .mount ? .mount : .block
    }

    func decoded(field: String = "access_type") throws -> AccessType {
        switch self {
        case .mount: return .mount
        case .block: return .block
        case .unspecified, .UNRECOGNIZED: throw CairnError.invalidArgument("\(field) must be MOUNT or BLOCK")
        }
    }
}
