// The caller's side of replica control: each operation goes to the node's ReplicaControl
// service over gRPC (async, with a deadline, statuses mapped once), and falls back to the data
// protocol's deprecated op when the node cannot take it — its record has no control address
// (a node of the previous release, during a rolling upgrade), or the call answers UNIMPLEMENTED
// (a server without the method) or UNAVAILABLE (nothing listens on the control port yet, or
// it is not open between the nodes). Every operation is idempotent, so a fallback after a call
// that did run is harmless. The fallback goes when the data ops do
// (docs/replica-control-service.md, "Migration").
//
// Errors are `CairnError`s carrying the status either way: the data protocol's reply statuses
// are mapped to the codes the service answers with (stale epoch FAILED_PRECONDITION, no
// replica or no engine NOT_FOUND, refused INVALID_ARGUMENT), a node that cannot be reached is
// UNAVAILABLE.

import CairnCore
import CairnProto
import CairnReplica
import CairnSecurity
import CairnRPC
import Dispatch
import Logging
import SwiftProtobuf
import Synchronization

/// How one node's replicas are reached: its replica server (always) and its control service
/// (nil when its record names none).
public struct ReplicaNode: Sendable, Equatable {
    public var nodeID: String
    /// "host:port" of the replica server (data protocol).
    public var dataAddress: String
    /// "host:port" of the ReplicaControl service.
    public var controlAddress: String?

    public init(nodeID: String, dataAddress: String, controlAddress: String? = nil) {
        self.nodeID = nodeID
        self.dataAddress = dataAddress
        self.controlAddress = controlAddress
    }
}

public final class ReplicaControlClient: Sendable {
    /// A snapshot's deletion merges layers and a barrier waits for in-flight writes and
    /// flushes: the deadline of every call (the data ops' timeout too).
    public let timeout: Duration
    private let logger: Logger
    /// The files of this process's identity for mutual TLS to the nodes' control services
    /// (`security.identity`); nil: plaintext.
    private let tls: TLSCredentials?
    /// One channel per control address and node, kept: calls are rare, nodes few, connections
    /// reused. A channel is dropped when its node is UNAVAILABLE, so the next one reads the TLS
    /// files again (a rotated certificate is used from the next reconnection).
    private let channels = Mutex<[String: GRPCChannel]>([:])

    /// How the data protocol's fallback connections authenticate.
    public let security: DataPlaneSecurity

    /// With an identity in `security`, every control call goes over mutual TLS too: the client
    /// presents its certificate, and the node's must verify against the identity's CA bundle and
    /// name the node id the caller means to reach (node certificates carry it as a DNS SAN), so
    /// a call for n2 never runs on another node that answers at n2's address.
    public init(timeout: Duration = .seconds(120), logger: Logger, security: DataPlaneSecurity = .insecure) {
        self.security = security
        self.timeout = timeout
        self.tls = security.identity.map { TLSCredentials($0.files) }
        self.logger = logger
    }

    public func createReplica(_ node: ReplicaNode, volumeID: String, sizeBytes: UInt64) async throws {
        let request = Cairn_Agent_V1_CreateReplicaRequest.with {
            $0.volumeID = volumeID
            $0.sizeBytes = sizeBytes
        }
        try await perform(node, "CreateReplica", request, as: Cairn_Agent_V1_CreateReplicaResponse.self,
                           volumeID: volumeID, doing: "create its replica") { try $0.create(volumeID: volumeID, sizeBytes: sizeBytes) }
    }

    /// Deletes the replica; `epoch` older than the replica's is refused (the controller's
    /// deletions pass the maximum).
    public func deleteReplica(_ node: ReplicaNode, volumeID: String, epoch: UInt64 = .max) async throws {
        let request = Cairn_Agent_V1_DeleteReplicaRequest.with {
            $0.volumeID = volumeID
            $0.epoch = epoch
        }
        try await perform(node, "DeleteReplica", request, as: Cairn_Agent_V1_DeleteReplicaResponse.self,
                           volumeID: volumeID, doing: "delete its replica") { try $0.delete(volumeID: volumeID, epoch: epoch) }
    }

    /// The node's replica takes snapshot `snapshotID` alone (nothing writes it, or the caller
    /// claimed it first). Returns the snapshot's size and generation.
    @discardableResult
    public func snapshot(_ node: ReplicaNode, volumeID: String, snapshotID: String, epoch: UInt64) async throws -> SnapshotEntry {
        let request = Cairn_Agent_V1_ReplicaSnapshotRequest.with {
            $0.volumeID = volumeID
            $0.snapshotID = snapshotID
            $0.epoch = epoch
        }
        let reply = try await call(node, "Snapshot", request, as: Cairn_Agent_V1_ReplicaSnapshotResponse.self,
                                   volumeID: volumeID, doing: "take snapshot \(snapshotID)") { client in
            let snap = try client.snapshot(volumeID: volumeID, snapshotID: snapshotID, epoch: epoch)
            return Cairn_Agent_V1_ReplicaSnapshotResponse.with {
                $0.sizeBytes = snap.size
                $0.generation = snap.generation
            }
        }
        return SnapshotEntry(id: snapshotID, size: reply.sizeBytes, generation: reply.generation)
    }

    /// The engine running the volume on the node takes snapshot `snapshotID` at its write
    /// barrier; the node ids holding it. NOT_FOUND when no engine runs the volume there.
    public func barrierSnapshot(_ node: ReplicaNode, volumeID: String, snapshotID: String, epoch: UInt64) async throws -> [String] {
        let request = Cairn_Agent_V1_ReplicaSnapshotRequest.with {
            $0.volumeID = volumeID
            $0.snapshotID = snapshotID
            $0.epoch = epoch
            $0.barrier = true
        }
        return try await call(node, "Snapshot", request, as: Cairn_Agent_V1_ReplicaSnapshotResponse.self,
                              volumeID: volumeID, doing: "take snapshot \(snapshotID)") { client in
            let nodes = try client.barrierSnapshot(volumeID: volumeID, snapshotID: snapshotID, epoch: epoch)
            return Cairn_Agent_V1_ReplicaSnapshotResponse.with { $0.nodes = nodes }
        }.nodes
    }

    public func deleteSnapshot(_ node: ReplicaNode, volumeID: String, snapshotID: String, epoch: UInt64) async throws {
        let request = Cairn_Agent_V1_DeleteReplicaSnapshotRequest.with {
            $0.volumeID = volumeID
            $0.snapshotID = snapshotID
            $0.epoch = epoch
        }
        try await perform(node, "DeleteSnapshot", request, as: Cairn_Agent_V1_DeleteReplicaSnapshotResponse.self,
                           volumeID: volumeID, doing: "delete snapshot \(snapshotID)") {
            try $0.deleteSnapshot(volumeID: volumeID, snapshotID: snapshotID, epoch: epoch)
        }
    }

    public func listSnapshots(_ node: ReplicaNode, volumeID: String, epoch: UInt64) async throws -> [SnapshotEntry] {
        let request = Cairn_Agent_V1_ListReplicaSnapshotsRequest.with {
            $0.volumeID = volumeID
            $0.epoch = epoch
        }
        let reply = try await call(node, "ListSnapshots", request, as: Cairn_Agent_V1_ListReplicaSnapshotsResponse.self,
                                   volumeID: volumeID, doing: "list its snapshots") { client in
            Cairn_Agent_V1_ListReplicaSnapshotsResponse(try client.listSnapshots(volumeID: volumeID, epoch: epoch))
        }
        return reply.entries
    }

    /// Creates replica `volumeID` on the node from snapshot `snapshotID` of its replica of
    /// `sourceVolumeID` (hard links, no copy); idempotent for the same size.
    public func cloneReplica(_ node: ReplicaNode, volumeID: String, sourceVolumeID: String, snapshotID: String,
                             sizeBytes: UInt64) async throws {
        let request = Cairn_Agent_V1_CloneReplicaRequest.with {
            $0.volumeID = volumeID
            $0.sourceVolumeID = sourceVolumeID
            $0.snapshotID = snapshotID
            $0.sizeBytes = sizeBytes
        }
        try await perform(node, "CloneReplica", request, as: Cairn_Agent_V1_CloneReplicaResponse.self,
                           volumeID: volumeID, doing: "clone snapshot \(snapshotID)") {
            try $0.clone(volumeID: volumeID, sourceVolumeID: sourceVolumeID, snapshotID: snapshotID, sizeBytes: sizeBytes)
        }
    }

    public func growReplica(_ node: ReplicaNode, volumeID: String, sizeBytes: UInt64, epoch: UInt64) async throws {
        let request = Cairn_Agent_V1_GrowReplicaRequest.with {
            $0.volumeID = volumeID
            $0.sizeBytes = sizeBytes
            $0.epoch = epoch
        }
        try await perform(node, "GrowReplica", request, as: Cairn_Agent_V1_GrowReplicaResponse.self,
                           volumeID: volumeID, doing: "grow its replica") {
            try $0.grow(volumeID: volumeID, sizeBytes: sizeBytes, epoch: epoch)
        }
    }

    /// Holds the writes of the engine running the volume on the node for at most `hold`.
    public func holdWrites(_ node: ReplicaNode, volumeID: String, hold: Duration, epoch: UInt64) async throws {
        let ms = hold.components.seconds * 1000 + hold.components.attoseconds / 1_000_000_000_000_000
        let request = Cairn_Agent_V1_HoldWritesRequest.with {
            $0.volumeID = volumeID
            $0.epoch = epoch
            $0.timeoutMs = min(UInt32(clamping: max(1, ms)), HoldWritesRequest.maxTimeoutMilliseconds)
        }
        try await perform(node, "HoldWrites", request, as: Cairn_Agent_V1_HoldWritesResponse.self,
                           volumeID: volumeID, doing: "hold its writes") {
            try $0.holdWrites(volumeID: volumeID, timeout: hold, epoch: epoch)
        }
    }

    public func releaseWrites(_ node: ReplicaNode, volumeID: String, epoch: UInt64) async throws {
        let request = Cairn_Agent_V1_ReleaseWritesRequest.with {
            $0.volumeID = volumeID
            $0.epoch = epoch
        }
        try await perform(node, "ReleaseWrites", request, as: Cairn_Agent_V1_ReleaseWritesResponse.self,
                           volumeID: volumeID, doing: "release its writes") {
            try $0.releaseWrites(volumeID: volumeID, epoch: epoch)
        }
    }

    // MARK: the call and its fallback

    /// Calls `method` on the node's control service, or runs `fallback` over the data protocol
    /// when the node cannot take it (see the file's header).
    private func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ node: ReplicaNode, _ method: String, _ request: Request, as: Response.Type,
        volumeID: String, doing: String, fallback: @escaping @Sendable (ReplicaClient) throws -> Response
    ) async throws -> Response {
        if let control = node.controlAddress {
            do {
                return try await channel(control, node: node.nodeID).call(ReplicaControlService.method(method), request,
                                                                          as: Response.self, timeout: timeout)
            } catch let error as CairnError where error.code == .unimplemented || error.code == .unavailable {
                if error.code == .unavailable { dropChannel(control, node: node.nodeID) }
                logger.info("the node's replica control service cannot take the call; using the data protocol's op", metadata: [
                    "node.id": "\(node.nodeID)", "replica.control": "\(control)", "rpc.method": "\(method)",
                    "volume.id": "\(volumeID)", "error": "\(error)"])
            }
        }
        return try await dataOp(node, volumeID: volumeID, doing: doing, fallback)
    }

    /// `call` for a method whose response is empty (the data op's fallback returns nothing).
    private func perform<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
        _ node: ReplicaNode, _ method: String, _ request: Request, as: Response.Type,
        volumeID: String, doing: String, fallback: @escaping @Sendable (ReplicaClient) throws -> Void
    ) async throws {
        _ = try await call(node, method, request, as: Response.self, volumeID: volumeID, doing: doing) {
            try fallback($0)
            return Response()
        }
    }

    private func channel(_ address: String, node: String) throws -> GRPCChannel {
        let key = node + "@" + address
        return try channels.withLock { open in
            if let channel = open[key] { return channel }
            let channel: GRPCChannel
            if let tls {
                do {
                    channel = try GRPCChannel(target: "tcp://" + address, tls: tls, serverName: node)
                } catch let error as CairnError {
                    throw CairnError.failedPrecondition("cannot call node \(node)'s replica control at \(address): \(error.message)")
                }
            } else {
                channel = GRPCChannel(target: "tcp://" + address)
            }
            open[key] = channel
            return channel
        }
    }

    private func dropChannel(_ address: String, node: String) {
        _ = channels.withLock { $0.removeValue(forKey: node + "@" + address) }
    }

    /// Runs `body` over one data-protocol connection to the node, on a dispatch thread.
    private func dataOp<T: Sendable>(_ node: ReplicaNode, volumeID: String, doing: String,
                                     _ body: @escaping @Sendable (ReplicaClient) throws -> T) async throws -> T {
        let (timeout, security) = (self.timeout, self.security)
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(with: Result {
                    let client: ReplicaClient
                    do {
                        let parsed = try ReplicaAddress(node.dataAddress)
                        client = try ReplicaClient.connect(host: parsed.host, port: parsed.port, requestTimeout: timeout,
                                                                security: security, expectedNode: node.nodeID)
                    } catch {
                        throw CairnError.unavailable(
                            "cannot reach node \(node.nodeID)'s replica server at \(node.dataAddress) to \(doing) for volume \(volumeID): \(error); check that its agent runs and the address is reachable")
                    }
                    defer { client.close() }
                    do {
                        return try body(client)
                    } catch let error as ReplicaClientError {
                        throw Self.status(of: error)
                    }
                })
            }
        }
    }

    /// A data-protocol failure as the status the control service answers the same failure with.
    static func status(of error: ReplicaClientError) -> CairnError {
        switch error {
        case let .remote(status, message):
            let code: StatusCode = switch status {
            case .ok: .unknown
            case .staleEpoch: .failedPrecondition
            case .checksumMismatch: .dataLoss
            case .outOfRange: .outOfRange
            case .notFound: .notFound
            case .badRequest: .invalidArgument
            case .ioError: .internal
            }
            return CairnError(code, message)
        case let .damagedBlock(_, message):
            return CairnError(.dataLoss, message)
        case .connection, .timeout:
            return CairnError(.unavailable, error.description)
        }
    }
}
