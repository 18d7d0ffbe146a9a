import CairnObservability
import CoreMetrics
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Glibc
import Hummingbird
import Logging
import Prometheus
import ServiceLifecycle
import XCTest

/// The `--metrics-address` listener over loopback: real HTTP GETs against a fresh registry (the
/// process-wide bootstrap is never touched, so tests cannot double-bootstrap).
final class ObservabilityServerTests: XCTestCase {
    let logger = Logger(label: "test")

    /// Runs `server` in a service group, hands `body` the bound address, then shuts it down.
    func withServer(_ registry: PrometheusCollectorRegistry, routes: [RouteInstaller] = [],
                    _ body: (MetricsAddress) async throws -> Void) async throws {
        let (bound, continuation) = AsyncStream.makeStream(of: MetricsAddress.self)
        let server = ObservabilityServer(address: MetricsAddress(host: "127.0.0.1", port: 0), logger: logger,
                                         registry: registry, routes: routes) { continuation.yield($0) }
        let group = ServiceGroup(services: [server], logger: logger)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            var iterator = bound.makeAsyncIterator()
            guard let address = await iterator.next() else { return XCTFail("the server never listened") }
            do { try await body(address) } catch {
                await group.triggerGracefulShutdown()
                throw error
            }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
    }

    func get(_ address: MetricsAddress, _ path: String) async throws -> (status: Int, type: String, body: String) {
        let (data, response) = try await URLSession.shared.data(from: URL(string: "http://\(address)\(path)")!)
        let http = response as! HTTPURLResponse
        return (http.statusCode, http.value(forHTTPHeaderField: "Content-Type") ?? "", String(decoding: data, as: UTF8.self))
    }

    func testMetricsEndpointRendersTheRegistryInPrometheusTextFormat() async throws {
        let registry = PrometheusCollectorRegistry()
        let factory = ProcessMetrics.factory(for: registry)
        let writes = CoreMetrics.Counter(label: "cairn_volume_write_ops_total", dimensions: [("volume", "pvc-1")], factory: factory)
        let latency = CoreMetrics.Timer(label: "cairn_volume_write_latency_seconds", dimensions: [("volume", "pvc-1")], factory: factory)
        writes.increment(by: 3)
        latency.recordNanoseconds(120_000)  // 120 µs: in the 250 µs bucket, not the 100 µs one
        try await withServer(registry) { address in
            let (status, type, body) = try await get(address, "/metrics")
            XCTAssertEqual(status, 200)
            XCTAssertTrue(type.hasPrefix("text/plain; version=0.0.4"), type)
            XCTAssertTrue(body.contains("# TYPE cairn_volume_write_ops_total counter"), body)
            XCTAssertTrue(body.contains(#"cairn_volume_write_ops_total{volume="pvc-1"} 3"#), body)
            XCTAssertTrue(body.contains(#"cairn_volume_write_latency_seconds_bucket{volume="pvc-1",le="0.0001"} 0"#), body)
            XCTAssertTrue(body.contains(#"cairn_volume_write_latency_seconds_bucket{volume="pvc-1",le="0.00025"} 1"#), body)
            XCTAssertTrue(body.contains(#"cairn_volume_write_latency_seconds_bucket{volume="pvc-1",le="10.0"} 1"#), body)
            XCTAssertTrue(body.contains(#"cairn_volume_write_latency_seconds_count{volume="pvc-1"} 1"#), body)

            // A destroyed series (an unstaged volume's) is gone from the next scrape.
            writes.destroy()
            latency.destroy()
            let after = try await get(address, "/metrics").body
            XCTAssertFalse(after.contains("pvc-1"), after)
        }
    }

    func testHealthzAndInstalledRoutesAnswer() async throws {
        let extra: RouteInstaller = { router in router.get("/api/v1/ping") { _, _ in "pong" } }
        try await withServer(PrometheusCollectorRegistry(), routes: [extra]) { address in
            let health = try await get(address, "/healthz")
            XCTAssertEqual(health.status, 200)
            XCTAssertEqual(health.body, "ok\n")
            let ping = try await get(address, "/api/v1/ping")
            XCTAssertEqual(ping.body, "pong")
            let missing = try await get(address, "/nope")
            XCTAssertEqual(missing.status, 404)
        }
    }

    func testAPortInUseIsAStartUpErrorThatSaysSo() async throws {
        // Hold a listening socket on a loopback port, then ask the server for the same one.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        XCTAssertEqual(bound, 0)
        XCTAssertEqual(listen(fd, 1), 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        let port = UInt16(bigEndian: addr.sin_port)
        let server = ObservabilityServer(address: MetricsAddress(host: "127.0.0.1", port: port), logger: logger,
                                         registry: PrometheusCollectorRegistry())
        do {
            try await server.run()
            XCTFail("the server started on a port another socket listens on")
        } catch let error as ObservabilityServerError {
            XCTAssertTrue(error.description.contains("another process listens on that port"), error.description)
            XCTAssertTrue(error.description.contains("127.0.0.1:\(port)"), error.description)
        }
    }

    func testMetricsAddressParsing() throws {
        XCTAssertEqual(try MetricsAddress(parsing: "0.0.0.0:9420"), MetricsAddress(host: "0.0.0.0", port: 9420))
        XCTAssertEqual(try MetricsAddress(parsing: "[::1]:9420"), MetricsAddress(host: "::1", port: 9420))
        XCTAssertEqual(MetricsAddress(host: "::1", port: 9420).description, "[::1]:9420")
        for bad in ["9420", ":9420", "host:", "host:70000", "host:port", "::1:9420", "[::1]9420"] {
            XCTAssertThrowsError(try MetricsAddress(parsing: bad), bad)
        }
    }
}
