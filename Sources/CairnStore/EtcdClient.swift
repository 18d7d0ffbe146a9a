import CairnCore
import CairnRPC
import EtcdProto
import Foundation
import Logging
import SwiftProtobuf
import Synchronization

/// A small etcd v3 client over Cairn's unary gRPC channel: the KV and Lease calls the
/// `EtcdStore` needs. Several endpoints are tried in order, starting with the last one that
/// answered; a call moves on to the next endpoint when one is UNAVAILABLE (down, refusing
/// connections, or not yet in a quorum).
final class EtcdClient: Sendable {
    /// Endpoints as given (for messages), and as gRPC targets ("host:port").
    let endpoints: [String]
    private let targets: [String]
    private let channels: Mutex<[GRPCChannel]>
    private let preferred = Atomic<Int>(0)
    private let timeout: Duration

    init(endpoints: [String], timeout: Duration = .seconds(5)) throws {
        guard !endpoints.isEmpty else {
            throw CairnError.invalidArgument("no etcd endpoint given: name at least one, like http://127.0.0.1:2379")
        }
        self.endpoints = endpoints
        targets = try endpoints.map(Self.target)
        channels = Mutex(targets.map { GRPCChannel(target: $0) })
        self.timeout = timeout
    }

    /// "http://host:port", "host:port" → "host:port". TLS is not supported (yet).
    static func target(_ endpoint: String) throws -> String {
        var rest = Substring(endpoint)
        if rest.hasPrefix("http://") {
            rest = rest.dropFirst("http://".count)
        } else if rest.hasPrefix("https://") {
            throw CairnError.invalidArgument("etcd endpoint \(endpoint): TLS (https) is not supported; use http://")
        }
        while rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.isEmpty, !rest.contains("/"), rest.contains(":") else {
            throw CairnError.invalidArgument("etcd endpoint \"\(endpoint)\" is not host:port or http://host:port")
        }
        return String(rest)
    }

    var endpointList: String { endpoints.joined(separator: ",") }

    /// `timeout` (default: the client's) bounds each endpoint's attempt.
    func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ method: String, _ request: Request, as: Response.Type = Response.self, timeout: Duration? = nil
    ) async throws -> Response {
        let timeout = timeout ?? self.timeout
        let bytes: [UInt8] = try request.serializedBytes()
        let start = preferred.load(ordering: .relaxed)
        var reasons: [String] = []
        for step in 0..<targets.count {
            let index = (start + step) % targets.count
            let channel = channels.withLock { $0[index] }
            let reply = await channel.callRaw(method, bytes, timeout: timeout)
            switch reply.code {
            case .ok:
                if step != 0 { preferred.store(index, ordering: .relaxed) }
                do {
                    return try Response(serializedBytes: reply.response)
                } catch {
                    throw CairnError.internal("etcd at \(endpoints[index]) sent an undecodable \(method) reply: \(error)")
                }
            case .unavailable:
                // A fresh channel next time: no reconnect back-off after etcd comes back.
                channels.withLock { $0[index] = GRPCChannel(target: targets[index]) }
                reasons.append("\(endpoints[index]): \(reply.message)")
            case .deadlineExceeded:
                throw CairnError.unavailable(
                    "etcd at \(endpoints[index]) did not answer \(method) within \(timeout); check that etcd is healthy and has a quorum")
            case .resourceExhausted:
                throw CairnError.unavailable("etcd at \(endpoints[index]) refused \(method): \(reply.message) (is its space quota exhausted?)")
            default:
                throw CairnError.internal("etcd at \(endpoints[index]) refused \(method): \(reply.code) \(reply.message)")
            }
        }
        throw CairnError.unavailable(
            "cannot reach etcd at \(endpointList): \(reasons.joined(separator: "; ")); check that etcd is running and reachable")
    }

    // MARK: KV

    func get(_ key: String, timeout: Duration? = nil) async throws -> (kv: Etcdserverpb_KeyValue?, revision: Int64) {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(key.utf8)
        let response: Etcdserverpb_RangeResponse = try await call("/etcdserverpb.KV/Range", request, timeout: timeout)
        return (response.kvs.first, response.header.revision)
    }

    /// Keys in [from, end), in key order, at most `limit` (0 = all).
    func range(from: String, end: Data, limit: Int = 0, keysOnly: Bool = false) async throws
        -> (kvs: [Etcdserverpb_KeyValue], revision: Int64)
    {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data(from.utf8)
        request.rangeEnd = end
        request.limit = Int64(limit)
        request.keysOnly = keysOnly
        let response: Etcdserverpb_RangeResponse = try await call("/etcdserverpb.KV/Range", request)
        return (response.kvs, response.header.revision)
    }

    func txn(_ request: Etcdserverpb_TxnRequest) async throws -> Etcdserverpb_TxnResponse {
        try await call("/etcdserverpb.KV/Txn", request)
    }

    /// The first key after every key that starts with `prefix` (etcd's prefix range end).
    static func prefixEnd(_ prefix: String) -> Data {
        var bytes = Array(prefix.utf8)
        while let last = bytes.last {
            if last < 0xff {
                bytes[bytes.count - 1] = last + 1
                return Data(bytes)
            }
            bytes.removeLast()
        }
        return Data([0])  // every key
    }

    // MARK: leases

    func grantLease(ttl: Int) async throws -> Int64 {
        var request = Etcdserverpb_LeaseGrantRequest()
        request.ttl = Int64(ttl)
        let response: Etcdserverpb_LeaseGrantResponse = try await call("/etcdserverpb.Lease/LeaseGrant", request)
        guard response.error.isEmpty, response.id != 0 else {
            throw CairnError.unavailable("etcd at \(endpointList) granted no lease: \(response.error)")
        }
        return response.id
    }

    /// One keep-alive (a unary call on etcd's bidirectional stream: one request, half-close,
    /// one reply). Returns the lease's new TTL in seconds; 0 when the lease no longer exists.
    func keepAlive(lease: Int64) async throws -> Int64 {
        var request = Etcdserverpb_LeaseKeepAliveRequest()
        request.id = lease
        let response: Etcdserverpb_LeaseKeepAliveResponse = try await call("/etcdserverpb.Lease/LeaseKeepAlive", request)
        return max(response.ttl, 0)
    }

    /// Remaining TTL in seconds; 0 or less when the lease does not exist.
    func timeToLive(lease: Int64) async throws -> Int64 {
        var request = Etcdserverpb_LeaseTimeToLiveRequest()
        request.id = lease
        let response: Etcdserverpb_LeaseTimeToLiveResponse = try await call("/etcdserverpb.Lease/LeaseTimeToLive", request)
        return response.ttl
    }

    /// Revokes the lease (its keys go with it). A lease that is already gone is no error.
    func revokeLease(_ lease: Int64) async throws {
        var request = Etcdserverpb_LeaseRevokeRequest()
        request.id = lease
        do {
            let _: Etcdserverpb_LeaseRevokeResponse = try await call("/etcdserverpb.Lease/LeaseRevoke", request)
        } catch let e as CairnError where e.code == .internal && e.message.contains("NOT_FOUND") {
            return
        }
    }
}

