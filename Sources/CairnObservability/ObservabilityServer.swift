import CairnCore
import Foundation
import Hummingbird
import Logging
import NIOCore
import Prometheus
import ServiceLifecycle

/// Adds routes to the observability listener (the controller's status page adds / and
/// /api/v1/ this way); called once, before the server starts.
public typealias RouteInstaller = @Sendable (Router<BasicRequestContext>) -> Void

/// The HTTP listener of `--metrics-address`: GET /metrics (the process's registry in the
/// Prometheus text format), GET /healthz, and whatever `routes` add. A lifecycle service: it
/// listens when the service group starts it and stops with the process (SIGTERM).
public struct ObservabilityServer: Service {
    public let address: MetricsAddress
    let logger: Logger
    let registry: PrometheusCollectorRegistry
    let routes: [RouteInstaller]
    let onListening: @Sendable (MetricsAddress) async -> Void

    /// `onListening` is told the bound address (the port chosen when `address` names port 0).
    public init(address: MetricsAddress, logger: Logger, registry: PrometheusCollectorRegistry,
                routes: [RouteInstaller] = [], onListening: @escaping @Sendable (MetricsAddress) async -> Void = { _ in }) {
        self.address = address
        self.logger = logger
        self.registry = registry
        self.routes = routes
        self.onListening = onListening
    }

    /// The router: /metrics, /healthz, then the installers' routes.
    public func router() -> Router<BasicRequestContext> {
        let router = Router()
        let registry = self.registry
        router.get("/metrics") { _, _ -> Response in
            let body = registry.emitToBuffer()
            return Response(status: .ok,
                            headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                            body: .init(byteBuffer: ByteBuffer(bytes: body)))
        }
        router.get("/healthz") { _, _ -> String in "ok\n" }
        for install in routes { install(router) }
        return router
    }

    public func run() async throws {
        let listening = ListeningFlag()
        let address = self.address
        let logger = self.logger
        let onListening = self.onListening
        let app = Application(
            router: router(),
            configuration: .init(address: .hostname(address.host, port: Int(address.port)), serverName: "cairn"),
            onServerRunning: { channel in
                let port = channel.localAddress?.port.map { UInt16($0) } ?? address.port
                let bound = MetricsAddress(host: address.host, port: port)
                listening.set()
                logger.info("serving metrics", metadata: ["metrics.address": "\(bound)"])
                await onListening(bound)
            },
            logger: logger)
        logger.info("service started", metadata: ["service": "observability"])
        defer { logger.info("service stopped", metadata: ["service": "observability"]) }
        do {
            try await app.run()
        } catch where !listening.isSet {
            throw ObservabilityServerError(address: address, underlying: error)
        }
    }
}

/// The observability listener could not start (most often: another process has the port).
public struct ObservabilityServerError: Error, CustomStringConvertible {
    public let address: MetricsAddress
    public let underlying: any Error

    public var description: String {
        let detail = "\(underlying)"
        if detail.contains("Address already in use") || detail.contains("errno: 98") {
            return "cannot serve metrics on --metrics-address \(address): another process listens on that port; stop it or choose another port"
        }
        return "cannot serve metrics on --metrics-address \(address): \(detail); check that the host is an address of this machine"
    }
}

/// Set once the server listens: a failure before that is a start-up error.
private final class ListeningFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

/// `--metrics-address`: HOST:PORT, [IPv6]:PORT; port 0 picks a free port (logged).
public struct MetricsAddress: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    public init(parsing text: String) throws {
        guard let (host, portText) = HostPort.split(text) else {
            throw CairnError.invalidArgument("--metrics-address \(text) is not HOST:PORT, e.g. 0.0.0.0:9420 (IPv6 in brackets: [::1]:9420)")
        }
        guard !host.isEmpty else {
            throw CairnError.invalidArgument("--metrics-address \(text) has no host: use 0.0.0.0:PORT to listen on every address")
        }
        guard let port = UInt16(portText) else {
            throw CairnError.invalidArgument("--metrics-address \(text) has no valid port (0–65535)")
        }
        self.init(host: String(host), port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
