import CairnCore
import CairnObservability
@testable import CairnStatus
import CairnStore
import Foundation
import Hummingbird
import Logging
import Prometheus
import ServiceLifecycle
import XCTest
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The status page's model (conditions, rate and ETA, the document) and its routes over real
/// HTTP on loopback, on the `--metrics-address` listener the controller serves them on.
final class StatusTests: XCTestCase {
    let now = Date(timeIntervalSince1970: 1_800_000_000)

    func volume(_ replicas: [ReplicaRecord]?, minInSync: Int? = nil) -> VolumeRecord {
        VolumeRecord(id: "vol-s", name: "pvc-s", capacityBytes: 1 << 30,
                     parameters: minInSync.map { ["minInSync": String($0)] } ?? [:], fsType: "ext4",
                     accessModes: [1], accessibleTopology: [:], epoch: 3, createdAt: now, replicas: replicas)
    }

    func progress(done: Int64, total: Int64 = 1000, rate: Int64 = 0, started: TimeInterval = 0, at: TimeInterval,
                  phase: String = "copy") -> ResyncProgress {
        ResyncProgress(bytesTotal: total, bytesDone: done, bytesPerSecond: rate, startedAt: now.addingTimeInterval(started),
                       updatedAt: now.addingTimeInterval(at), phase: phase)
    }

    func out(_ node: String, _ resync: ResyncProgress? = nil) -> ReplicaRecord {
        ReplicaRecord(nodeID: node, address: "10.0.0.1:7410", inSync: false, outOfSyncSince: now, reason: "node away", resync: resync)
    }

    func inSync(_ node: String) -> ReplicaRecord { ReplicaRecord(nodeID: node, address: "10.0.0.1:7410") }

    // MARK: Conditions

    func testConditionFollowsTheReplicasAndTheirResync() {
        XCTAssertEqual(volume(nil).health(at: now), .healthy, "a one-machine volume has its one copy")
        XCTAssertEqual(volume([inSync("a"), inSync("b"), inSync("c")]).health(at: now), .healthy)
        XCTAssertEqual(volume([inSync("a"), inSync("b"), out("c")]).health(at: now), .degraded)
        XCTAssertEqual(volume([inSync("a"), inSync("b"), out("c", progress(done: 10, at: -1))]).health(at: now), .resyncing)
        XCTAssertEqual(volume([inSync("a"), inSync("b"), out("c", progress(done: 10, at: -1, phase: "waiting: connection refused"))])
                        .health(at: now), .degraded, "a resync waiting to retry copies nothing")
        XCTAssertEqual(volume([inSync("a"), inSync("b"), out("c", progress(done: 10, at: -60))]).health(at: now), .degraded,
                       "a progress record no engine refreshed is not a running resync")
        XCTAssertEqual(volume([out("a"), out("b")]).health(at: now), .faulted)
        XCTAssertEqual(volume([inSync("a"), out("b"), out("c")], minInSync: 2).health(at: now), .faulted,
                       "below minInSync the volume refuses writes")
    }

    // MARK: Rate and ETA

    func testRateAndETAComeFromSuccessiveProgressRecords() {
        let rates = ResyncRates(window: 20)
        // One record: only the engine's own rate is known.
        var estimate = rates.observe(volumeID: "v", nodeID: "c", progress(done: 100, rate: 50, at: 0))
        XCTAssertEqual(estimate.bytesPerSecond, 50)
        XCTAssertEqual(estimate.etaSeconds, 18)  // 900 left at 50/s
        // The same record read again adds nothing.
        estimate = rates.observe(volumeID: "v", nodeID: "c", progress(done: 100, rate: 50, at: 0))
        XCTAssertEqual(estimate.bytesPerSecond, 50)
        // Two seconds later 200 more bytes: 100/s measured, whatever the engine recorded.
        estimate = rates.observe(volumeID: "v", nodeID: "c", progress(done: 300, rate: 50, at: 2))
        XCTAssertEqual(estimate.bytesPerSecond, 100, accuracy: 0.001)
        XCTAssertEqual(estimate.etaSeconds!, 7, accuracy: 0.001)
        // The window slides: samples older than 20 s stop counting (one before it is kept).
        _ = rates.observe(volumeID: "v", nodeID: "c", progress(done: 320, at: 22))
        estimate = rates.observe(volumeID: "v", nodeID: "c", progress(done: 520, at: 24))
        XCTAssertEqual(estimate.bytesPerSecond, (520 - 300) / 22.0, accuracy: 0.001)
        // A new resync of the replica (another start) starts over from its own record.
        estimate = rates.observe(volumeID: "v", nodeID: "c", progress(done: 0, rate: 0, started: 30, at: 30))
        XCTAssertEqual(estimate.bytesPerSecond, 0)
        XCTAssertNil(estimate.etaSeconds, "no rate yet: no ETA")
        // Done: nothing to go.
        estimate = rates.observe(volumeID: "v", nodeID: "c", progress(done: 1000, started: 30, at: 40))
        XCTAssertEqual(estimate.etaSeconds, 0)
    }

    // MARK: The document

    func testDocumentShowsNodeStatesUsageResyncAndNewestEventsFirst() async throws {
        let reader = ClusterStatusReader(store: try makeStore(), describe: { "message of \($0.id)" })
        var replicas = [inSync("n1"), inSync("n2"), out("n3", progress(done: 250, at: -1))]
        replicas[2].resync?.bytesPerSecond = 125
        let record = volume(replicas)
        let live = [NodeRecord(id: "n1", topology: ["zone": "a"], maxVolumes: 0, dataAddress: "10.0.0.11:7410", capacityBytes: 8 << 30),
                    NodeRecord(id: "n2", topology: [:], maxVolumes: 0, dataAddress: "10.0.0.12:7410", capacityBytes: 8 << 30)]
        let attachment = AttachmentRecord(volumeID: "vol-s", nodeID: "n1", readonly: false, accessMode: 1, epoch: 3, createdAt: now)
        let events = [ClusterEvent(time: now, kind: .replicaOutOfSync, volumeID: "vol-s", nodeID: "n3", message: "first"),
                      ClusterEvent(time: now.addingTimeInterval(1), kind: .nodeAway, nodeID: "n3", message: "second")]
        let status = reader.build(now: now, live: live, removed: ["n4"], volumes: [record],
                                  attachments: ["vol-s": [attachment]], events: events)

        XCTAssertEqual(status.nodes.map(\.id), ["n1", "n2", "n3", "n4"])
        XCTAssertEqual(status.nodes.map(\.state), [.live, .live, .away, .removed])
        XCTAssertEqual(status.nodes[0].usedBytes, 1 << 30)
        XCTAssertEqual(status.nodes[0].capacityBytes, 8 << 30)
        XCTAssertEqual(status.nodes[2].replicas, 1)
        XCTAssertNil(status.nodes[2].capacityBytes, "an away node's record is gone")

        let v = try XCTUnwrap(status.volumes.first)
        XCTAssertEqual(v.condition, .resyncing)
        XCTAssertEqual(v.message, "message of vol-s")
        XCTAssertEqual(v.epoch, 3)
        XCTAssertEqual(v.attachments, [AttachmentStatus(node: "n1", epoch: 3, readOnly: false, since: now)])
        XCTAssertEqual(v.replicas.map(\.inSync), [true, true, false])
        XCTAssertEqual(v.replicas[2].nodeState, .away)
        let resync = try XCTUnwrap(v.replicas[2].resync)
        XCTAssertEqual(resync.percent, 25)
        XCTAssertTrue(resync.active)
        XCTAssertEqual(resync.bytesPerSecond, 125)
        XCTAssertEqual(resync.etaSeconds, 6)
        XCTAssertEqual(status.events.map(\.message), ["second", "first"])

        // The JSON round-trips with the API's encoding.
        let data = try ClusterStatus.encoder().encode(status)
        XCTAssertEqual(try ClusterStatus.decoder().decode(ClusterStatus.self, from: data), status)
        let text = String(decoding: data, as: UTF8.self)
        XCTAssertTrue(text.contains(#""condition":"resyncing""#), text)
        XCTAssertTrue(text.contains(#""state":"away""#), text)
    }

    // MARK: Routes over HTTP

    func testRoutesServeThePageAndTheAPIOverLoopback() async throws {
        let store = try makeStore()
        try await store.registerNode(NodeRecord(id: "n1", topology: [:], maxVolumes: 0, capacityBytes: 4 << 30))
        try await store.createVolume(volume([inSync("n1"), out("n2")]))
        try await store.appendEvent(ClusterEvent(kind: .replicaOutOfSync, volumeID: "vol-s", nodeID: "n2", message: "n2 fell behind"))
        let reader = ClusterStatusReader(store: store, reuse: 0, describe: { "degraded: \($0.id)" })
        // The controller's listener: /metrics and /healthz, and the status page installed on it.
        let logger = Logger(label: "test")
        let (bound, continuation) = AsyncStream.makeStream(of: MetricsAddress.self)
        let server = ObservabilityServer(address: MetricsAddress(host: "127.0.0.1", port: 0), logger: logger,
                                         registry: PrometheusCollectorRegistry(),
                                         routes: [StatusRoutes.installer(reader, logger: logger)]) { continuation.yield($0) }
        let group = ServiceGroup(services: [server], logger: logger)
        let running = Task { try await group.run() }
        var iterator = bound.makeAsyncIterator()
        guard let address = await iterator.next() else { return XCTFail("the listener never started") }
        let base = "http://\(address)"
        do {
            try await checkRoutes(base)
        } catch {
            await group.triggerGracefulShutdown()
            throw error
        }
        await group.triggerGracefulShutdown()
        try await running.value
    }

    func checkRoutes(_ base: String) async throws {
        let (_, metrics) = try await get(base + "/metrics")
        XCTAssertEqual(metrics.statusCode, 200, "the metrics stay served beside the page")
        let (page, pageResponse) = try await get(base + "/")
        XCTAssertEqual(pageResponse.statusCode, 200)
        XCTAssertTrue(pageResponse.value(forHTTPHeaderField: "Content-Type")?.hasPrefix("text/html") == true)
        let html = String(decoding: page, as: UTF8.self)
        XCTAssertTrue(html.contains("api/v1/status") && html.contains("data-condition"), "the page polls the API")
        XCTAssertFalse(html.contains("http://") || html.contains("https://"), "the page fetches nothing from elsewhere")

        let (body, response) = try await get(base + "/api/v1/status")
        XCTAssertEqual(response.statusCode, 200)
        let status = try ClusterStatus.decoder().decode(ClusterStatus.self, from: body)
        XCTAssertEqual(status.volumes.map(\.id), ["vol-s"])
        XCTAssertEqual(status.volumes.first?.condition, .degraded)
        XCTAssertEqual(status.volumes.first?.message, "degraded: vol-s")
        XCTAssertEqual(status.nodes.map(\.state), [.live, .away])
        XCTAssertEqual(status.events.map(\.kind), [.replicaOutOfSync])

        let (one, oneResponse) = try await get(base + "/api/v1/volumes/vol-s")
        XCTAssertEqual(oneResponse.statusCode, 200)
        XCTAssertEqual(try ClusterStatus.decoder().decode(VolumeStatus.self, from: one).replicas.count, 2)
        let (missing, missingResponse) = try await get(base + "/api/v1/volumes/nope")
        XCTAssertEqual(missingResponse.statusCode, 404)
        XCTAssertTrue(String(decoding: missing, as: UTF8.self).contains("volume nope does not exist"))
        let (events, _) = try await get(base + "/api/v1/events")
        XCTAssertEqual(try ClusterStatus.decoder().decode([ClusterEvent].self, from: events).first?.message, "n2 fell behind")
    }

    // MARK: Helpers

    private var directories: [String] = []

    override func tearDown() {
        for directory in directories { try? FileManager.default.removeItem(atPath: directory) }
        directories = []
        super.tearDown()
    }

    func makeStore() throws -> SQLiteStore {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-status-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        directories.append(directory)
        return try SQLiteStore(path: directory + "/cairn.db", logger: Logger(label: "test"))
    }

    func get(_ url: String) async throws -> (Data, HTTPURLResponse) {
        var request = URLRequest(url: URL(string: url)!)
        request.timeoutInterval = 10
        let (data, response) = try await URLSession.shared.data(for: request)
        return (data, response as! HTTPURLResponse)
    }
}
