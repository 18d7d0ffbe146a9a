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
///
/// TLS (https:// endpoints): every channel verifies etcd's certificate against the CA bundle and
/// presents the client certificate, both read from their files when the channel is created —
/// at start, and again whenever an endpoint was UNAVAILABLE and its channel is replaced. So
/// rotated files take effect at the next reconnection; a channel that works keeps the identity
/// it was created with (etcd does not close established connections when a certificate it
/// issued expires).
final class EtcdClient: Sendable {
    /// Endpoints as given (for messages), and as gRPC targets ("host:port").
    let endpoints: [String]
    private let targets: [String]
    private let tls: TLSCredentials?
    private let channels: Mutex<[GRPCChannel]>
    private let preferred = Atomic<Int>(0)
    private let timeout: Duration

    init(endpoints: [String], tls: TLSCredentials? = nil, timeout: Duration = .seconds(5)) throws {
        guard !endpoints.isEmpty else {
            throw CairnError.invalidArgument("no etcd endpoint given: name at least one, like http://127.0.0.1:2379")
        }
        self.endpoints = endpoints
        let parsed = try endpoints.map(Self.target)
        let secure = Set(parsed.map(\.secure))
        guard secure.count == 1 else {
            throw CairnError.invalidArgument(
                "etcd endpoints \(endpoints.joined(separator: ",")) mix http:// and https://: an etcd cluster serves its clients one way, name them all with the same scheme")
        }
        if secure.contains(true), tls == nil {
            throw CairnError.invalidArgument(
                "etcd endpoint \(endpoints[0]) is https:// but no CA bundle is given to verify etcd's certificate: pass --etcd-ca FILE (and --etcd-cert FILE --etcd-key FILE when etcd requires client certificates)")
        }
        if secure.contains(false), tls != nil {
            throw CairnError.invalidArgument(
                "--etcd-ca/--etcd-cert/--etcd-key are for https:// endpoints, but \(endpoints[0]) is plaintext: use https:// to reach etcd over TLS")
        }
        targets = parsed.map(\.target)
        self.tls = tls
        try tls?.check()
        channels = Mutex(try targets.map { try Self.channel($0, tls: tls) })
        self.timeout = timeout
    }

    /// "http://host:port", "https://host:port", "host:port" → "host:port" and whether it is TLS.
    static func target(_ endpoint: String) throws -> (target: String, secure: Bool) {
        var rest = Substring(endpoint)
        var secure = false
        if rest.hasPrefix("http://") {
            rest = rest.dropFirst("http://".count)
        } else if rest.hasPrefix("https://") {
            rest = rest.dropFirst("https://".count)
            secure = true
        }
        while rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.isEmpty, !rest.contains("/"), rest.contains(":") else {
            throw CairnError.invalidArgument("etcd endpoint \"\(endpoint)\" is not host:port, http://host:port or https://host:port")
        }
        return (String(rest), secure)
    }

    /// A channel to `target`; over TLS, etcd's certificate must name the target's host.
    private static func channel(_ target: String, tls: TLSCredentials?) throws -> GRPCChannel {
        guard let tls else { return GRPCChannel(target: target) }
        do {
            return try GRPCChannel(target: target, tls: tls)
        } catch let error as CairnError {
            throw CairnError.invalidArgument("etcd client \(error.message)")
        }
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
                // A fresh channel next time: no reconnect back-off after etcd comes back, and
                // the TLS files read again (rotation). Files unusable right now (halfway through
                // a rotation) keep the old channel and say why.
                var reason = "\(endpoints[index]): \(reply.message)"
                do {
                    let fresh = try Self.channel(targets[index], tls: tls)
                    channels.withLock { $0[index] = fresh }
                } catch {
                    reason += " (and a new channel could not be made: \(error))"
                }
                reasons.append(reason)
            case .deadlineExceeded:
                throw CairnError.unavailable(
                    "etcd at \(endpoints[index]) did not answer \(method) within \(timeout); check that etcd is healthy and has a quorum")
            case .resourceExhausted:
                throw CairnError.unavailable("etcd at \(endpoints[index]) refused \(method): \(reply.message) (is its space quota exhausted?)")
            default:
                throw CairnError.internal("etcd at \(endpoints[index]) refused \(method): \(reply.code) \(reply.message)")
            }
        }
        if let tls, reasons.contains(where: { $0.contains("andshake") || $0.contains("CERTIFICATE") }) {
            throw CairnError.unavailable(
                "cannot reach etcd at \(endpointList) over TLS: \(reasons.joined(separator: "; ")); check that etcd's certificate is issued by a CA in \(tls.caFile) and names the endpoint's host, and that etcd accepts "
                + (tls.certFile.map { "the client certificate \($0)" } ?? "clients without a certificate (else pass --etcd-cert and --etcd-key)"))
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

