@testable import CairnEngine
import CairnCore
import CairnObservability
import CairnStore
import CoreMetrics
import Foundation
import Logging
import Prometheus
import XCTest

/// The instruments the libraries record into, each against a fresh registry (never the
/// process-wide bootstrap): the series they make, their values, and that they go away.
final class MetricsInstrumentTests: XCTestCase {
    /// The value of the one sample line that starts with `series` (name and labels), nil if none.
    func sample(_ text: String, _ series: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1))
        }
        return nil
    }

    func testAVolumesSeriesCountItsIOAndVanishWhenDestroyed() throws {
        let registry = PrometheusCollectorRegistry()
        let metrics = VolumeMetrics(volumeID: "vol-a", factory: ProcessMetrics.factory(for: registry))
        XCTAssertTrue(metrics.records)
        for _ in 0..<3 { metrics.write(bytes: 4096, since: metrics.start()) }
        metrics.read(bytes: 8192, since: metrics.start())
        metrics.flush(since: metrics.start())
        metrics.throttled(nanoseconds: 1_500_000_000)
        metrics.repairedBlocks.increment(by: 2)
        metrics.resyncBytes.increment(by: 1 << 20)
        metrics.fencingEvents.increment()
        let text = registry.emitToString()
        XCTAssertEqual(sample(text, #"cairn_volume_write_ops_total{volume="vol-a"}"#), 3)
        XCTAssertEqual(sample(text, #"cairn_volume_write_bytes_total{volume="vol-a"}"#), 3 * 4096)
        XCTAssertEqual(sample(text, #"cairn_volume_read_ops_total{volume="vol-a"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_volume_read_bytes_total{volume="vol-a"}"#), 8192)
        XCTAssertEqual(sample(text, #"cairn_volume_flush_ops_total{volume="vol-a"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_volume_write_latency_seconds_count{volume="vol-a"}"#), 3)
        // Back-to-back clock reads: every sample lands in the first bucket that is ≥ it, and
        // none is slower than the largest one.
        XCTAssertEqual(sample(text, #"cairn_volume_write_latency_seconds_bucket{volume="vol-a",le="10.0"}"#), 3)
        XCTAssertEqual(sample(text, #"cairn_volume_read_latency_seconds_count{volume="vol-a"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_volume_flush_latency_seconds_count{volume="vol-a"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_volume_qos_throttled_seconds_total{volume="vol-a"}"#), 1.5)
        XCTAssertEqual(sample(text, #"cairn_volume_repaired_blocks_total{volume="vol-a"}"#), 2)
        XCTAssertEqual(sample(text, #"cairn_volume_resync_bytes_total{volume="vol-a"}"#), Double(1 << 20))
        XCTAssertEqual(sample(text, #"cairn_volume_fencing_events_total{volume="vol-a"}"#), 1)

        metrics.destroy()
        metrics.destroy()  // idempotent: the engine's stop and a failed start may both call it
        XCTAssertFalse(registry.emitToString().contains("vol-a"), registry.emitToString())
    }

    func testWithoutABackendNothingIsRecordedAndNoClockIsRead() {
        let metrics = VolumeMetrics(volumeID: "vol-b", factory: NOOPMetricsHandler.instance)
        XCTAssertFalse(metrics.records)
        XCTAssertEqual(metrics.start(), 0)
    }

    func testFamiliesMakeOneSeriesPerLabelValues() {
        let registry = PrometheusCollectorRegistry()
        let factory = ProcessMetrics.factory(for: registry)
        let calls = TimerFamily(label: "cairn_csi_operations_seconds", labelNames: ["method", "grpc_status_code"], factory: factory)
        let conflicts = CounterFamily(label: "cairn_store_conflicts_total", labelNames: ["store"], factory: factory)
        calls.record(["/csi.v1.Node/NodeStageVolume", "OK"], since: MetricsClock.now())
        calls.record(["/csi.v1.Node/NodeStageVolume", "OK"], since: MetricsClock.now())
        calls.record(["/csi.v1.Node/NodeStageVolume", "ABORTED"], since: MetricsClock.now())
        conflicts.increment(["etcd"])
        let text = registry.emitToString()
        XCTAssertEqual(sample(text, #"cairn_csi_operations_seconds_count{method="/csi.v1.Node/NodeStageVolume",grpc_status_code="OK"}"#), 2)
        XCTAssertEqual(sample(text, #"cairn_csi_operations_seconds_count{method="/csi.v1.Node/NodeStageVolume",grpc_status_code="ABORTED"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_store_conflicts_total{store="etcd"}"#), 1)
    }

    func testClusterGaugesFollowTheStore() async throws {
        let dir = "/tmp/cairn-gauges-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let logger = Logger(label: "test")
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        for node in ["n1", "n2"] {
            try await store.registerNode(NodeRecord(id: node, topology: [:], maxVolumes: 0, capacityBytes: 8 << 30))
        }
        let resyncing = ResyncProgress(bytesTotal: 400, bytesDone: 100, bytesPerSecond: 10, startedAt: Date(), updatedAt: Date(),
                                       phase: "copy")
        try await store.createVolume(VolumeRecord(
            id: "vol-r", name: "pvc-r", capacityBytes: 1 << 30, parameters: [:], fsType: "", accessModes: [], accessibleTopology: [:],
            replicas: [ReplicaRecord(nodeID: "n1", address: "a:1"), ReplicaRecord(nodeID: "n2", address: "b:1"),
                       ReplicaRecord(nodeID: "n3", address: "c:1", inSync: false, resync: resyncing)]))
        let registry = PrometheusCollectorRegistry()
        let gauges = ClusterGauges(store: store, logger: logger, factory: ProcessMetrics.factory(for: registry))
        try await gauges.refresh()
        var text = registry.emitToString()
        XCTAssertEqual(sample(text, #"cairn_volume_replicas{volume="vol-r"}"#), 3)
        XCTAssertEqual(sample(text, #"cairn_volume_replicas_in_sync{volume="vol-r"}"#), 2)
        XCTAssertEqual(sample(text, #"cairn_volume_resync_remaining_bytes{volume="vol-r"}"#), 300)
        XCTAssertEqual(sample(text, #"cairn_volume_resync_progress_ratio{volume="vol-r"}"#), 2.25 / 3)
        XCTAssertEqual(sample(text, #"cairn_replica_in_sync{volume="vol-r",node="n3"}"#), 0)
        XCTAssertEqual(sample(text, #"cairn_replica_in_sync{volume="vol-r",node="n1"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_node_up{node="n1"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_node_up{node="n3"}"#), 0, "n3 holds a replica but is not registered: away")
        XCTAssertEqual(sample(text, #"cairn_node_capacity_bytes{node="n2"}"#), Double(8 << 30))
        XCTAssertEqual(sample(text, #"cairn_node_used_bytes{node="n2"}"#), Double(1 << 30))

        // Back in sync: the ratio is 1, nothing remains.
        _ = try await store.updateVolume(id: "vol-r", what: "test") { volume in
            volume.replicas![2].inSync = true
            volume.replicas![2].resync = nil
            return true
        }
        try await gauges.refresh()
        text = registry.emitToString()
        XCTAssertEqual(sample(text, #"cairn_volume_replicas_in_sync{volume="vol-r"}"#), 3)
        XCTAssertEqual(sample(text, #"cairn_volume_resync_progress_ratio{volume="vol-r"}"#), 1)
        XCTAssertEqual(sample(text, #"cairn_volume_resync_remaining_bytes{volume="vol-r"}"#), 0)

        // Deleted volume, removed node: their series go.
        try await store.deleteVolume(id: "vol-r", recordingReplicaDeletions: [])
        try await store.removeNode(id: "n2")
        try await gauges.refresh()
        text = registry.emitToString()
        XCTAssertFalse(text.contains("vol-r"), text)
        XCTAssertFalse(text.contains(#"node="n2""#), text)
        XCTAssertFalse(text.contains(#"node="n3""#), text)
        XCTAssertEqual(sample(text, #"cairn_node_up{node="n1"}"#), 1)
    }
}
