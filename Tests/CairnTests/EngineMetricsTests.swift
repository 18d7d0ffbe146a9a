@testable import CairnEngine
import CairnObservability
import Foundation
import Prometheus
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The engine's I/O as its volume's series show it (docs/metrics.md), over real FUSE and fake
/// replicas, into a fresh registry. Same fixture and cleanup as `EngineFUSETests`.
extension EngineFUSETests {
    func testTheEngineCountsItsIOThrottlingAndDropsItsSeriesWhenStopped() throws {
        let registry = PrometheusCollectorRegistry()
        let engine = makeEngine(fakes(3), metricsFactory: ProcessMetrics.factory(for: registry))
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        for i in 0..<20 { XCTAssertEqual(Self.write(fd, i * 4096, 4096, UInt8(i)), 0) }
        for i in 0..<5 { XCTAssertEqual(Self.read(fd, i * 4096, 4096).0, 0) }
        XCTAssertEqual(fsync(fd), 0)

        // 100 IOPS: past the 50 ms burst, each write waits its 10 ms turn.
        engine.setLimits(iopsLimit: 100, bandwidthLimit: 0)
        for i in 0..<30 { XCTAssertEqual(Self.write(fd, i * 4096, 4096, 7), 0) }
        engine.setLimits(iopsLimit: 0, bandwidthLimit: 0)

        let text = registry.emitToString()
        func value(_ series: String) -> Double? {
            text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.dropFirst(series.count + 1)) }
        }
        let volume = #"{volume="vol-a"}"#
        XCTAssertEqual(value("cairn_volume_write_ops_total\(volume)"), 50, text)
        XCTAssertEqual(value("cairn_volume_write_bytes_total\(volume)"), 50 * 4096)
        XCTAssertEqual(value("cairn_volume_write_latency_seconds_count\(volume)"), 50)
        XCTAssertEqual(value("cairn_volume_read_ops_total\(volume)"), 5)
        XCTAssertEqual(value("cairn_volume_read_bytes_total\(volume)"), 5 * 4096)
        XCTAssertGreaterThanOrEqual(value("cairn_volume_flush_ops_total\(volume)") ?? 0, 1, "fsync reaches the engine as a flush")
        let throttled = try XCTUnwrap(value("cairn_volume_qos_throttled_seconds_total\(volume)"))
        XCTAssertGreaterThan(throttled, 0.15, "25 writes past the burst wait about 10 ms each")
        XCTAssertLessThan(throttled, 2)

        engine.stop()
        XCTAssertFalse(registry.emitToString().contains("vol-a"), "a stopped engine's series stay:\n\(registry.emitToString())")
    }
}
