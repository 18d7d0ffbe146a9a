import CairnCore
import CairnNode
import CairnProto
import CairnRPC
import Foundation
import Logging
import SwiftProtobuf
import Synchronization

/// A connection to the cairn agent on this machine (its unix socket), shared by the node role
/// (through `AgentMounter`) and the operator CLI (hot-plug).
///
/// Before the first call — and again after the agent could not be reached — the client says
/// Hello and refuses an agent that speaks another protocol version. After a transport failure
/// the channel is replaced, so that a restarted agent is reached at once instead of after
/// gRPC's reconnect back-off. Nothing is retried blindly: a step whose answer was lost (the
/// agent died mid-call) fails with UNAVAILABLE and the CO's retry finds the work done or not.
public final class AgentClient: Sendable {
    public let endpoint: String
    let logger: Logger

    private struct State: Sendable {
        var channel: GRPCChannel
        var verified: Bool
    }
    private let state: Mutex<State>

    /// Answers from the host's tools can take two minutes (LinuxMounter.quickTimeout); the
    /// client waits a little longer so that the agent's own, more precise error arrives first.
    public static let quickTimeout: Duration = .seconds(150)
    /// mkfs and fsck of a large volume (Command.defaultTimeout is 30 minutes).
    public static let slowTimeout: Duration = .seconds(31 * 60)

    /// `socket`: an absolute path or a `unix://` endpoint.
    public init(socket: String, logger: Logger) throws {
        endpoint = try AgentProtocol.endpoint(forSocket: socket)
        self.logger = logger
        state = Mutex(State(channel: GRPCChannel(target: endpoint), verified: false))
    }

    /// Says Hello (whether or not it was said before) and returns the agent's answer.
    @discardableResult
    public func hello() async throws -> Cairn_Agent_V1_HelloResponse {
        var request = Cairn_Agent_V1_HelloRequest()
        request.protocolVersion = AgentProtocol.version
        request.clientVersion = CairnVersion.version
        var lastError: (any Error)?
        // Twice: the second time on a fresh channel, in case the first was in back-off.
        for attempt in 0..<2 {
            let channel = attempt == 0 ? currentChannel() : replaceChannel()
            do {
                let response = try await channel.call(AgentProtocol.Method.hello, request,
                                                      as: Cairn_Agent_V1_HelloResponse.self, timeout: .seconds(10))
                guard response.protocolVersion == AgentProtocol.version else {
                    throw CairnError.failedPrecondition(
                        "the cairn agent at \(endpoint) speaks agent protocol version \(response.protocolVersion) (cairn \(response.agentVersion)); this cairn (\(CairnVersion.version)) speaks version \(AgentProtocol.version): run the same cairn version for the node role and the agent")
                }
                state.withLock { $0.verified = true }
                return response
            } catch let error as CairnError {
                let decoded = AgentWire.decode(error, endpoint: endpoint, method: AgentProtocol.Method.hello)
                guard AgentWire.isUnreachable(decoded) else { throw decoded }
                lastError = decoded
            }
        }
        throw lastError!
    }

    /// One unary call to the agent; its errors come back as the agent sent them (AgentWire).
    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ method: String, _ request: Request, as: Response.Type = Response.self, timeout: Duration = quickTimeout
    ) async throws -> Response {
        if !state.withLock({ $0.verified }) { try await hello() }
        do {
            return try await currentChannel().call(method, request, as: Response.self, timeout: timeout)
        } catch let error as CairnError {
            let decoded = AgentWire.decode(error, endpoint: endpoint, method: method)
            if AgentWire.isUnreachable(decoded) {
                _ = replaceChannel()
                logger.warning("the cairn agent could not be reached", metadata: [
                    "agent.endpoint": "\(endpoint)", "rpc.method": "\(method)", "error": "\(error.message)",
                ])
            }
            throw decoded
        }
    }

    private func currentChannel() -> GRPCChannel { state.withLock { $0.channel } }

    private func replaceChannel() -> GRPCChannel {
        let fresh = GRPCChannel(target: endpoint)
        state.withLock {
            $0.channel = fresh
            $0.verified = false
        }
        return fresh
    }

    // MARK: Hot-plug

    public func attachToProcess(volumeID: String, pid: Int32, path: String, readOnly: Bool) async throws
        -> Cairn_Agent_V1_AttachToProcessResponse
    {
        try await call(AgentProtocol.Method.attachToProcess, Cairn_Agent_V1_AttachToProcessRequest.with {
            $0.volumeID = volumeID
            $0.pid = pid
            $0.path = path
            $0.readOnly = readOnly
        }, timeout: .seconds(10 * 60))
    }

    public func detachFromProcess(volumeID: String, pid: Int32, path: String) async throws
        -> Cairn_Agent_V1_DetachFromProcessResponse
    {
        try await call(AgentProtocol.Method.detachFromProcess, Cairn_Agent_V1_DetachFromProcessRequest.with {
            $0.volumeID = volumeID
            $0.pid = pid
            $0.path = path
        }, timeout: .seconds(10 * 60))
    }
}

/// The node role's `Mounter` when it runs apart from the agent: every method is one RPC to the
/// agent (proto/cairn.proto), which does the privileged work in the host's namespaces. The node
/// process itself touches no device and no mount.
public struct AgentMounter: Mounter {
    public let client: AgentClient

    public init(client: AgentClient) {
        self.client = client
    }

    public init(socket: String, logger: Logger) throws {
        client = try AgentClient(socket: socket, logger: logger)
    }

    typealias M = AgentProtocol.Method

    public func attachLoop(file: String, readOnly: Bool) async throws -> String {
        try await client.call(M.attachLoop, Cairn_Agent_V1_AttachLoopRequest.with {
            $0.file = file
            $0.readOnly = readOnly
        }, as: Cairn_Agent_V1_AttachLoopResponse.self).device
    }

    public func loopDevices(backing file: String) async throws -> [String] {
        try await client.call(M.loopDevices, Cairn_Agent_V1_LoopDevicesRequest.with { $0.file = file },
                              as: Cairn_Agent_V1_LoopDevicesResponse.self).devices
    }

    public func detachLoop(device: String) async throws {
        _ = try await client.call(M.detachLoop, Cairn_Agent_V1_DetachLoopRequest.with { $0.device = device },
                                  as: Cairn_Agent_V1_DetachLoopResponse.self)
    }

    public func probe(device: String) async throws -> DeviceContent {
        try await client.call(M.probe, Cairn_Agent_V1_ProbeRequest.with { $0.device = device },
                              as: Cairn_Agent_V1_ProbeResponse.self).content.decoded(device: device)
    }

    public func makeFilesystem(device: String, fsType: String) async throws {
        _ = try await client.call(M.makeFilesystem, Cairn_Agent_V1_MakeFilesystemRequest.with {
            $0.device = device
            $0.fsType = fsType
        }, as: Cairn_Agent_V1_MakeFilesystemResponse.self, timeout: AgentClient.slowTimeout)
    }

    public func checkFilesystem(device: String, fsType: String) async throws {
        _ = try await client.call(M.checkFilesystem, Cairn_Agent_V1_CheckFilesystemRequest.with {
            $0.device = device
            $0.fsType = fsType
        }, as: Cairn_Agent_V1_CheckFilesystemResponse.self, timeout: AgentClient.slowTimeout)
    }

    public func mount(device: String, at target: String, fsType: String, options: [String]) async throws {
        _ = try await client.call(M.mount, Cairn_Agent_V1_MountRequest.with {
            $0.device = device
            $0.target = target
            $0.fsType = fsType
            $0.options = options
        }, as: Cairn_Agent_V1_MountResponse.self)
    }

    public func expand(device: String, fsType: String, mountPath: String) async throws -> Int64 {
        try await client.call(M.expandFilesystem, Cairn_Agent_V1_ExpandFilesystemRequest.with {
            $0.device = device
            $0.fsType = fsType
            $0.mountPath = mountPath
        }, as: Cairn_Agent_V1_ExpandFilesystemResponse.self).deviceBytes
    }

    public func blockDeviceSize(device: String) async throws -> Int64 {
        try await client.call(M.blockDeviceSize, Cairn_Agent_V1_BlockDeviceSizeRequest.with { $0.device = device },
                              as: Cairn_Agent_V1_BlockDeviceSizeResponse.self).bytes
    }

    public func namespace(ofProcess pid: Int32) async throws -> MountNamespace {
        let response = try await client.call(M.namespaceOfProcess, Cairn_Agent_V1_NamespaceOfProcessRequest.with { $0.pid = pid },
                                             as: Cairn_Agent_V1_NamespaceOfProcessResponse.self)
        return try response.namespace.decoded()
    }

    public func inspect(_ path: String, in namespace: MountNamespace) async throws -> PathState {
        try await client.call(M.inspect, Cairn_Agent_V1_InspectRequest.with {
            $0.path = path
            $0.namespace = .init(namespace)
        }, as: Cairn_Agent_V1_InspectResponse.self).state.decoded
    }

    public func makeTarget(_ path: String, for access: AccessType, in namespace: MountNamespace) async throws -> Bool {
        try await client.call(M.makeTarget, Cairn_Agent_V1_MakeTargetRequest.with {
            $0.path = path
            $0.accessType = .init(access)
            $0.namespace = .init(namespace)
        }, as: Cairn_Agent_V1_MakeTargetResponse.self).created
    }

    public func removeTarget(_ path: String, in namespace: MountNamespace) async throws -> Bool {
        try await client.call(M.removeTarget, Cairn_Agent_V1_RemoveTargetRequest.with {
            $0.path = path
            $0.namespace = .init(namespace)
        }, as: Cairn_Agent_V1_RemoveTargetResponse.self).removed
    }

    public func bindMount(source: String, at target: String, in namespace: MountNamespace, readOnly: Bool,
                          options: [String]) async throws {
        _ = try await client.call(M.bindMount, Cairn_Agent_V1_BindMountRequest.with {
            $0.source = source
            $0.target = target
            $0.namespace = .init(namespace)
            $0.readOnly = readOnly
            $0.options = options
        }, as: Cairn_Agent_V1_BindMountResponse.self)
    }

    public func unmount(_ target: String, in namespace: MountNamespace) async throws {
        _ = try await client.call(M.unmount, Cairn_Agent_V1_UnmountRequest.with {
            $0.target = target
            $0.namespace = .init(namespace)
        }, as: Cairn_Agent_V1_UnmountResponse.self)
    }

    public func mountTable(in namespace: MountNamespace) async throws -> [MountInfo] {
        try await client.call(M.mountTable, Cairn_Agent_V1_MountTableRequest.with { $0.namespace = .init(namespace) },
                              as: Cairn_Agent_V1_MountTableResponse.self).mounts.map(\.decoded)
    }

    public func filesystemStats(path: String, in namespace: MountNamespace) async throws -> FilesystemStats {
        try await client.call(M.filesystemStats, Cairn_Agent_V1_FilesystemStatsRequest.with {
            $0.path = path
            $0.namespace = .init(namespace)
        }, as: Cairn_Agent_V1_FilesystemStatsResponse.self).stats.decoded
    }
}
