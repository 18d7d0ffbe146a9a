import CairnCore
import Logging
import SwiftProtobuf
import Synchronization

/// What a handler knows about its call besides the request.
public struct RPCContext: Sendable {
    public let method: String
    /// When the client gives up; nil when it set no deadline.
    public let deadline: ContinuousClock.Instant?
    public let logger: Logger

    public init(method: String, deadline: ContinuousClock.Instant?, logger: Logger) {
        self.method = method
        self.deadline = deadline
        self.logger = logger
    }
}

/// Maps full gRPC method names ("/csi.v1.Node/NodeStageVolume") to typed handlers.
/// Decoding failures become INVALID_ARGUMENT here, so handlers only ever see valid messages.
public final class Router: Sendable {
    public typealias RawHandler = @Sendable ([UInt8], RPCContext) async throws -> [UInt8]

    private let routes = Mutex<[String: RawHandler]>([:])

    public init() {}

    public func register<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ method: String,
        _ handler: @escaping @Sendable (Request, RPCContext) async throws -> Response
    ) {
        let raw: RawHandler = { bytes, context in
            let request: Request
            do {
                request = try Request(serializedBytes: bytes)
            } catch {
                throw CairnError.invalidArgument(
                    "the request is not a valid \(Request.protoMessageName) message (\(error)); is the client speaking CSI v1?")
            }
            let response = try await handler(request, context)
            return try response.serializedBytes()
        }
        routes.withLock { $0[method] = raw }
    }

    /// Makes `check` run before every handler registered so far whose method starts with one of
    /// `prefixes` (except those named in `except`); what it throws is the call's answer.
    public func precede(methodsWithPrefixes prefixes: [String], except: Set<String> = [],
                        with check: @escaping @Sendable () throws -> Void) {
        routes.withLock { routes in
            for (method, handler) in routes
            where !except.contains(method) && prefixes.contains(where: { method.hasPrefix($0) }) {
                routes[method] = { bytes, context in
                    try check()
                    return try await handler(bytes, context)
                }
            }
        }
    }

    public func handler(for method: String) -> RawHandler? {
        routes.withLock { $0[method] }
    }

    public var methods: [String] { routes.withLock { $0.keys.sorted() } }
}
