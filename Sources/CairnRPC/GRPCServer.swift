import CGRPCShim
import CairnCore
import CairnSecurity
import Foundation
import Logging
import Synchronization

/// A gRPC server over CGRPCShim that hands every unary call to a `Router`.
///
/// Each call is finished exactly once, by whichever comes first: the handler's result, the
/// client's deadline (DEADLINE_EXCEEDED) or cancellation by the client or shutdown (CANCELLED).
/// In the last two cases the handler is *not* cancelled: a storage operation abandoned halfway
/// (a filesystem mounted but not recorded) is worse than one finished late. It keeps its volume
/// lock until done, so the CO's retry gets ABORTED until then and the result afterwards.
public final class GRPCServer: Sendable {
    private let core: ServerCore
    private let handle = Mutex<ServerHandle?>(nil)
    private let tls: TLSCredentials?

    /// With `tls`, every endpoint serves mutual TLS: the server presents `tls.certFile` and
    /// requires a client certificate that verifies against `tls.caFile`; handlers see the
    /// caller's verified identity in `RPCContext.peer`. The files are read at `start`.
    public init(router: Router, logger: Logger, tls: TLSCredentials? = nil) {
        core = ServerCore(router: router, logger: logger)
        self.tls = tls
    }

    /// Binds every endpoint (`unix:///path`, `tcp://host:port`) and starts serving. Unix sockets
    /// get `socketMode` (0660 by default; the agent's socket is 0600, root only), applied through
    /// the umask while binding so the socket is never more open; a stale socket file from a
    /// previous run is replaced.
    public func start(endpoints: [String], socketMode: mode_t = 0o660) throws {
        for endpoint in endpoints {
            if let path = Endpoint.unixPath(endpoint) { try Endpoint.prepareSocketPath(path) }
        }
        var err = [CChar](repeating: 0, count: 512)
        let context = Unmanaged.passRetained(core).toOpaque()
        let oldMask = umask(~socketMode & 0o777)
        let server: OpaquePointer? = withCStrings(endpoints) { pointers in
            guard let tls else {
                return cgrpc_server_start(pointers, endpoints.count, nil, serverHandler, serverCancel, context, &err, err.count)
            }
            return tls.withFiles { files in
                cgrpc_server_start(pointers, endpoints.count, files, serverHandler, serverCancel, context, &err, err.count)
            }
        }
        umask(oldMask)
        guard let server else {
            Unmanaged<ServerCore>.fromOpaque(context).release()
            let reason = String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw CairnError.unavailable("cannot serve on \(endpoints.joined(separator: ", ")): \(reason)")
        }
        for endpoint in endpoints {
            if let path = Endpoint.unixPath(endpoint) { chmod(path, socketMode) }
        }
        handle.withLock { $0 = ServerHandle(pointer: server, context: context) }
        core.logger.info("serving gRPC", metadata: ["endpoints": "\(endpoints.joined(separator: ","))",
                                                    "tls": "\(tls.map { "mutual, \($0)" } ?? "none")"])
    }

    /// Stops accepting calls, waits up to `grace` for in-flight calls, cancels the rest.
    public func shutdown(grace: Duration = .seconds(10)) async {
        guard let h = handle.withLock({ state -> ServerHandle? in defer { state = nil }; return state }) else { return }
        let graceMS = Int64(grace.components.seconds * 1000 + grace.components.attoseconds / 1_000_000_000_000_000)
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            // Blocks until every call is finished: keep it off the cooperative pool.
            DispatchQueue.global().async {
                cgrpc_server_shutdown_and_destroy(h.pointer, graceMS)
                continuation.resume()
            }
        }
        Unmanaged<ServerCore>.fromOpaque(h.context).release()
        core.logger.info("gRPC server stopped")
    }
}

private struct ServerHandle: @unchecked Sendable {
    let pointer: OpaquePointer
    let context: UnsafeMutableRawPointer
}

/// A call handle from C++, valid until finished exactly once.
private final class InFlightCall: Sendable {
    private struct State: @unchecked Sendable {
        var pointer: OpaquePointer?
    }
    private let state: Mutex<State>

    init(pointer: OpaquePointer) { state = Mutex(State(pointer: pointer)) }

    /// Returns false when the call had already been finished.
    @discardableResult
    func finish(_ code: StatusCode, _ message: String, _ response: [UInt8]) -> Bool {
        guard let pointer = state.withLock({ s -> OpaquePointer? in defer { s.pointer = nil }; return s.pointer }) else {
            return false
        }
        response.withUnsafeBufferPointer { buffer in
            cgrpc_call_finish(pointer, code.rawValue, message, buffer.baseAddress, buffer.count)
        }
        return true
    }
}

final class ServerCore: Sendable {
    /// Every CSI call's duration by method and answer (docs/metrics.md); the agent's and
    /// ReplicaControl's calls pass through the same dispatch and are not counted here.
    static let csiOperations = TimerFamily(label: "cairn_csi_operations_seconds", labelNames: ["method", "grpc_status_code"])

    let router: Router
    let logger: Logger
    private let calls = Mutex<[UInt64: InFlightCall]>([:])

    init(router: Router, logger: Logger) {
        self.router = router
        self.logger = logger
    }

    func dispatch(call pointer: OpaquePointer, id: UInt64, method: String, request: [UInt8], deadlineMS: Int64,
                  peer: RPCPeer) {
        let call = InFlightCall(pointer: pointer)
        let start = ContinuousClock.now
        let deadline: ContinuousClock.Instant? = deadlineMS >= 0 ? start + .milliseconds(deadlineMS) : nil
        var callLogger = logger
        callLogger[metadataKey: "rpc.method"] = "\(method)"
        callLogger[metadataKey: "rpc.id"] = "\(id)"
        let context = RPCContext(method: method, deadline: deadline, logger: callLogger, peer: peer)
        calls.withLock { $0[id] = call }

        Task {
            var code = StatusCode.ok
            var message = ""
            var response: [UInt8] = []
            if let handler = router.handler(for: method) {
                let began = MetricsClock.now()
                do {
                    response = try await handler(request, context)
                } catch {
                    (code, message) = RPCStatus.from(error)
                }
                // Registered methods only: a client's made-up names never become series.
                if method.hasPrefix("/csi.v1.") {
                    Self.csiOperations.record([method, "\(code)"], since: began)
                }
            } else {
                code = .unimplemented
                message = "method \(method) is not implemented by \(CairnVersion.pluginName)"
            }
            let elapsed = ContinuousClock.now - start
            if call.finish(code, message, response) {
                callLogger.debug("rpc", metadata: [
                    "rpc.code": "\(code)", "rpc.ms": "\(elapsed.milliseconds)",
                ].merging(message.isEmpty ? [:] : ["rpc.error": "\(message)"]) { a, _ in a })
            } else {
                callLogger.info("rpc completed after its caller stopped waiting", metadata: [
                    "rpc.code": "\(code)", "rpc.ms": "\(elapsed.milliseconds)",
                ])
            }
            self.forget(id)
        }

        if let deadline {
            Task {
                try? await Task.sleep(until: deadline, clock: .continuous)
                if call.finish(.deadlineExceeded, "\(method) did not finish before the caller's deadline; it continues in the background, retry to get its result", []) {
                    callLogger.warning("rpc deadline exceeded", metadata: ["rpc.ms": "\(deadlineMS)"])
                }
            }
        }
    }

    func cancel(id: UInt64) {
        guard let call = calls.withLock({ $0[id] }) else { return }
        if call.finish(.cancelled, "the call was cancelled; the operation continues in the background, retry to get its result", []) {
            logger.info("rpc cancelled by the client or by shutdown; its operation runs to completion", metadata: ["rpc.id": "\(id)"])
        }
    }

    private func forget(_ id: UInt64) { _ = calls.withLock { $0.removeValue(forKey: id) } }
}

private let serverHandler: cgrpc_handler_fn = { context, call, id, method, methodLength, request, requestLength, deadlineMS in
    guard let context, let call else { return }
    let core = Unmanaged<ServerCore>.fromOpaque(context).takeUnretainedValue()
    let name = String(decoding: UnsafeRawBufferPointer(start: method, count: methodLength), as: UTF8.self)
    let bytes = requestLength == 0 ? [] : [UInt8](UnsafeBufferPointer(start: request, count: requestLength))
    let uris = callString(call, cgrpc_call_peer_uris).split(separator: "\n").map(String.init)
    let peer = RPCPeer(address: callString(call, cgrpc_call_peer), identity: uris.isEmpty ? nil : PeerIdentity(uris: uris))
    core.dispatch(call: call, id: id, method: name, request: bytes, deadlineMS: deadlineMS, peer: peer)
}

/// A string the shim writes about a call (its peer's address or identity).
private func callString(_ call: OpaquePointer, _ read: (OpaquePointer?, UnsafeMutablePointer<CChar>?, Int) -> Int) -> String {
    var buffer = [CChar](repeating: 0, count: 512)
    let length = read(call, &buffer, buffer.count)
    if length >= buffer.count {
        buffer = [CChar](repeating: 0, count: length + 1)
        _ = read(call, &buffer, buffer.count)
    }
    return String(cString: buffer)
}

private let serverCancel: cgrpc_cancel_fn = { context, id in
    guard let context else { return }
    Unmanaged<ServerCore>.fromOpaque(context).takeUnretainedValue().cancel(id: id)
}

extension Duration {
    var milliseconds: Int64 { components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000 }
}

func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
    let duplicated = strings.map { strdup($0) }
    defer { duplicated.forEach { free($0) } }
    let pointers = duplicated.map { UnsafePointer<CChar>($0) }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
