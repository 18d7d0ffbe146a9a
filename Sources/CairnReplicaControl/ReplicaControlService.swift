// The ReplicaControl gRPC service (proto/cairn.proto, docs/replica-control-service.md): the
// control operations on this node's replicas, served over TCP on the node's control address by
// the process that runs the replica server.
//
// Owns: decoding the requests into `ReplicaServer` calls, run off the cooperative pool (they
// block: a merge, a barrier).
// Does not own: the operations themselves (`ReplicaServer`'s control methods, which the data
// protocol's deprecated ops call too), the epoch rule (the store and the engine check it), the
// mapping of errors to statuses (`RPCStatus.from`: `ReplicaError` knows its status).

import CairnCore
import CairnProto
import CairnReplica
import CairnRPC
import Dispatch
import Logging

public final class ReplicaControlService: Sendable {
    /// The service's full name; its methods are "/\(serviceName)/CreateReplica" and so on.
    public static let serviceName = "cairn.agent.v1.ReplicaControl"

    /// The full gRPC method name of `method`.
    public static func method(_ method: String) -> String { "/\(serviceName)/\(method)" }

    private let server: ReplicaServer

    public init(server: ReplicaServer) {
        self.server = server
    }

    /// Registers every method; with `access` (mutual TLS), each call is authorized first.
    public func register(on router: Router, access: ReplicaControlAccess? = nil) {
        registerMethods(on: router)
        if let access {
            router.precede(methodsWithPrefixes: ["/\(Self.serviceName)/"]) { context in try access.authorize(context) }
        }
    }

    private func registerMethods(on router: Router) {
        router.register(Self.method("CreateReplica")) { (q: Cairn_Agent_V1_CreateReplicaRequest, _) in
            try await self.run { try $0.createReplica(volume: q.volumeID, size: q.sizeBytes) }
            return Cairn_Agent_V1_CreateReplicaResponse()
        }
        router.register(Self.method("DeleteReplica")) { (q: Cairn_Agent_V1_DeleteReplicaRequest, _) in
            try await self.run { try $0.deleteReplica(volume: q.volumeID, epoch: q.epoch) }
            return Cairn_Agent_V1_DeleteReplicaResponse()
        }
        router.register(Self.method("Snapshot")) { (q: Cairn_Agent_V1_ReplicaSnapshotRequest, _) in
            if q.barrier {
                let nodes = try await self.run { try $0.barrierSnapshot(volume: q.volumeID, snapshotID: q.snapshotID, epoch: q.epoch) }
                return Cairn_Agent_V1_ReplicaSnapshotResponse.with { $0.nodes = nodes }
            }
            let snap = try await self.run { try $0.snapshotReplica(volume: q.volumeID, snapshotID: q.snapshotID, epoch: q.epoch) }
            return Cairn_Agent_V1_ReplicaSnapshotResponse.with {
                $0.sizeBytes = snap.size
                $0.generation = snap.generation
            }
        }
        router.register(Self.method("DeleteSnapshot")) { (q: Cairn_Agent_V1_DeleteReplicaSnapshotRequest, _) in
            try await self.run { try $0.deleteSnapshot(volume: q.volumeID, snapshotID: q.snapshotID, epoch: q.epoch) }
            return Cairn_Agent_V1_DeleteReplicaSnapshotResponse()
        }
        router.register(Self.method("ListSnapshots")) { (q: Cairn_Agent_V1_ListReplicaSnapshotsRequest, _) in
            Cairn_Agent_V1_ListReplicaSnapshotsResponse(try await self.run { try $0.listSnapshots(volume: q.volumeID, epoch: q.epoch) })
        }
        router.register(Self.method("CloneReplica")) { (q: Cairn_Agent_V1_CloneReplicaRequest, _) in
            try await self.run {
                try $0.cloneReplica(volume: q.volumeID, source: q.sourceVolumeID, snapshotID: q.snapshotID, size: q.sizeBytes)
            }
            return Cairn_Agent_V1_CloneReplicaResponse()
        }
        router.register(Self.method("GrowReplica")) { (q: Cairn_Agent_V1_GrowReplicaRequest, _) in
            try await self.run { try $0.growReplica(volume: q.volumeID, size: q.sizeBytes, epoch: q.epoch) }
            return Cairn_Agent_V1_GrowReplicaResponse()
        }
        router.register(Self.method("HoldWrites")) { (q: Cairn_Agent_V1_HoldWritesRequest, _) in
            let limit = HoldWritesRequest.maxTimeoutMilliseconds
            guard q.timeoutMs > 0, q.timeoutMs <= limit else {
                throw CairnError.invalidArgument("a write hold needs a timeout of 1 to \(limit) ms, not \(q.timeoutMs): it lapses by itself so a caller that dies cannot freeze the volume")
            }
            try await self.run { try $0.holdWrites(volume: q.volumeID, timeout: .milliseconds(Int64(q.timeoutMs)), epoch: q.epoch) }
            return Cairn_Agent_V1_HoldWritesResponse()
        }
        router.register(Self.method("ReleaseWrites")) { (q: Cairn_Agent_V1_ReleaseWritesRequest, _) in
            try await self.run { try $0.releaseWrites(volume: q.volumeID, epoch: q.epoch) }
            return Cairn_Agent_V1_ReleaseWritesResponse()
        }
    }

    /// Runs a blocking replica operation on a dispatch thread.
    private func run<T: Sendable>(_ body: @escaping @Sendable (ReplicaServer) throws -> T) async throws -> T {
        let server = self.server
        return try await offCooperativePool { try body(server) }
    }
}

extension Cairn_Agent_V1_ListReplicaSnapshotsResponse {
    /// The response listing `entries` (the service's answer, and the data op's as the client
    /// hands it back).
    init(_ entries: [SnapshotEntry]) {
        self.init()
        snapshots = entries.map { entry in
            Cairn_Agent_V1_ReplicaSnapshotEntry.with {
                $0.snapshotID = entry.id
                $0.sizeBytes = entry.size
                $0.generation = entry.generation
            }
        }
    }

    /// The listed entries.
    var entries: [SnapshotEntry] { snapshots.map { SnapshotEntry(id: $0.snapshotID, size: $0.sizeBytes, generation: $0.generation) } }
}
