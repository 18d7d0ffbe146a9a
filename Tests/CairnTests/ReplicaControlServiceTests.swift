import CairnCluster
import CairnCore
import CairnProto
import CairnReplica
import CairnReplicaControl
import CairnRPC
import CairnStore
import Foundation
import Logging
import Synchronization
import XCTest

/// The ReplicaControl service over a real GRPCServer on 127.0.0.1 in front of a real replica
/// server, and its client's fallback to the data protocol (a node of the previous release).
/// The servers and the directory are removed in tearDown, passed or not.
final class ReplicaControlServiceTests: XCTestCase {
    var dir = ""
    var replicaServer: ReplicaServer?
    var grpcServers: [GRPCServer] = []
    let logger = Logger(label: "replica-control-test")
    let size: UInt64 = 1 << 20
    /// Calls the control service answered (counted before each handler runs).
    let served = CallCount()

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-replica-control-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let server = try ReplicaServer(dataDir: dir, host: "127.0.0.1", port: 0, logger: logger)
        try server.start()
        replicaServer = server
    }

    override func tearDown() async throws {
        for server in grpcServers { await server.shutdown(grace: .seconds(1)) }
        grpcServers = []
        replicaServer?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// Serves `router` on a free TCP port of 127.0.0.1; its "host:port".
    private func serve(_ router: Router) throws -> String {
        for _ in 0..<20 {
            let port = Int.random(in: 20000..<60000)
            let server = GRPCServer(router: router, logger: logger)
            do {
                try server.start(endpoints: ["tcp://127.0.0.1:\(port)"])
            } catch {
                continue  // taken: try another
            }
            grpcServers.append(server)
            return "127.0.0.1:\(port)"
        }
        throw CairnError.unavailable("no free port for the control service")
    }

    /// The control service of `replicaServer` on a free port, counting the calls it takes.
    private func controlNode() throws -> ReplicaNode {
        let router = Router()
        ReplicaControlService(server: replicaServer!).register(on: router)
        let served = self.served
        router.precede(methodsWithPrefixes: ["/\(ReplicaControlService.serviceName)/"]) { served.add() }
        return ReplicaNode(nodeID: "n1", dataAddress: dataAddress, controlAddress: try serve(router))
    }

    private var dataAddress: String { "127.0.0.1:\(replicaServer!.boundPort)" }
    private var client: ReplicaControlClient { ReplicaControlClient(timeout: .seconds(20), logger: logger) }

    private func dataClient() throws -> ReplicaClient {
        try ReplicaClient.connect(host: "127.0.0.1", port: replicaServer!.boundPort)
    }

    func testCreateSnapshotCloneGrowAndDeleteGoOverGRPC() async throws {
        let node = try controlNode()
        try await client.createReplica(node, volumeID: "vol-a", sizeBytes: size)
        try await client.createReplica(node, volumeID: "vol-a", sizeBytes: size)  // idempotent
        let snap = try await client.snapshot(node, volumeID: "vol-a", snapshotID: "snap-1", epoch: 1)
        XCTAssertEqual(snap.size, size)
        let listed = try await client.listSnapshots(node, volumeID: "vol-a", epoch: 1)
        XCTAssertEqual(listed.map(\.id), ["snap-1"])
        XCTAssertEqual(listed.first?.size, size)

        try await client.cloneReplica(node, volumeID: "vol-b", sourceVolumeID: "vol-a", snapshotID: "snap-1", sizeBytes: size)
        try await client.growReplica(node, volumeID: "vol-b", sizeBytes: 2 * size, epoch: 1)
        let data = try dataClient()
        defer { data.close() }
        XCTAssertEqual(try data.status(volumeID: "vol-b", epoch: 1).size, 2 * size)

        try await client.deleteSnapshot(node, volumeID: "vol-a", snapshotID: "snap-1", epoch: 1)
        let afterDelete = try await client.listSnapshots(node, volumeID: "vol-a", epoch: 1)
        XCTAssertEqual(afterDelete, [])
        try await client.deleteReplica(node, volumeID: "vol-b")
        try await client.deleteReplica(node, volumeID: "vol-b")  // a missing replica is fine
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/replicas/vol-b"))
        XCTAssertEqual(served.value, 10, "every call went to the control service, none to the data ops")
    }

    func testStaleEpochIsFailedPrecondition() async throws {
        let node = try controlNode()
        try await client.createReplica(node, volumeID: "vol-a", sizeBytes: size)
        let data = try dataClient()
        defer { data.close() }
        _ = try data.claim(volumeID: "vol-a", epoch: 5)

        await assertStatus(.failedPrecondition) { try await self.client.growReplica(node, volumeID: "vol-a", sizeBytes: 2 * self.size, epoch: 4) }
        await assertStatus(.failedPrecondition) { try await self.client.snapshot(node, volumeID: "vol-a", snapshotID: "s", epoch: 4) }
        await assertStatus(.failedPrecondition) { try await self.client.deleteReplica(node, volumeID: "vol-a", epoch: 4) }
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/replicas/vol-a/superblock"), "a fenced sender deletes nothing")
        try await client.growReplica(node, volumeID: "vol-a", sizeBytes: 2 * size, epoch: 5)
    }

    func testErrorsCarryTheirStatus() async throws {
        let node = try controlNode()
        try await client.createReplica(node, volumeID: "vol-a", sizeBytes: size)
        await assertStatus(.alreadyExists) { try await self.client.createReplica(node, volumeID: "vol-a", sizeBytes: 2 * self.size) }
        await assertStatus(.notFound) { try await self.client.snapshot(node, volumeID: "vol-none", snapshotID: "s", epoch: 1) }
        await assertStatus(.notFound) {
            try await self.client.cloneReplica(node, volumeID: "vol-c", sourceVolumeID: "vol-a", snapshotID: "nope", sizeBytes: self.size)
        }
        await assertStatus(.invalidArgument) { try await self.client.createReplica(node, volumeID: "../x", sizeBytes: self.size) }
        // No engine runs the volume here: barrier requests are NOT_FOUND.
        await assertStatus(.notFound) { try await self.client.barrierSnapshot(node, volumeID: "vol-a", snapshotID: "s", epoch: 1) }
        await assertStatus(.notFound) { try await self.client.holdWrites(node, volumeID: "vol-a", hold: .seconds(5), epoch: 1) }
        let reply = await GRPCChannel(target: "tcp://" + node.controlAddress!).callRaw(
            ReplicaControlService.method("HoldWrites"),
            try Cairn_Agent_V1_HoldWritesRequest.with { $0.volumeID = "vol-a" }.serializedBytes(), timeout: .seconds(10))
        XCTAssertEqual(reply.code, .invalidArgument, "a hold without a timeout is refused: \(reply.message)")
    }

    func testHoldReleaseAndBarrierSnapshotReachTheEngine() async throws {
        let engine = RecordingEngine()
        replicaServer!.engineHooks = engine
        let node = try controlNode()
        try await client.holdWrites(node, volumeID: "vol-e", hold: .seconds(7), epoch: 3)
        let nodes = try await client.barrierSnapshot(node, volumeID: "vol-e", snapshotID: "snap-g", epoch: 3)
        try await client.releaseWrites(node, volumeID: "vol-e", epoch: 3)
        XCTAssertEqual(nodes, ["n1", "n2"])
        XCTAssertEqual(engine.calls, ["hold vol-e 7000ms epoch 3", "snapshot vol-e snap-g epoch 3", "release vol-e epoch 3"])
        engine.staleBelow = 4
        await assertStatus(.failedPrecondition) { try await self.client.releaseWrites(node, volumeID: "vol-e", epoch: 3) }
    }

    /// A node of the previous release: its record names no control address, so every
    /// operation goes over the data protocol's ops, with the same results and statuses.
    func testANodeWithoutAControlAddressIsControlledOverTheDataProtocol() async throws {
        let node = ReplicaNode(nodeID: "n1", dataAddress: dataAddress)
        try await assertFullCycleWorks(node)
        await assertStatus(.notFound) { try await self.client.snapshot(node, volumeID: "vol-none", snapshotID: "s", epoch: 1) }
        let data = try dataClient()
        defer { data.close() }
        _ = try data.claim(volumeID: "vol-a", epoch: 5)
        await assertStatus(.failedPrecondition) { try await self.client.growReplica(node, volumeID: "vol-a", sizeBytes: 4 * self.size, epoch: 4) }
    }

    /// A control address that answers UNIMPLEMENTED (a server without the service) or where
    /// nothing listens (UNAVAILABLE): the data protocol's op answers instead.
    func testUnimplementedOrUnreachableControlFallsBackToTheDataProtocol() async throws {
        let oldRelease = ReplicaNode(nodeID: "n1", dataAddress: dataAddress, controlAddress: try serve(Router()))
        try await assertFullCycleWorks(oldRelease)
        let nothingListens = ReplicaNode(nodeID: "n1", dataAddress: dataAddress, controlAddress: "127.0.0.1:1")
        try await client.createReplica(nothingListens, volumeID: "vol-z", sizeBytes: size)
        try await client.deleteReplica(nothingListens, volumeID: "vol-z")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/replicas/vol-z"))
    }

    /// The backing takes each node's control address from its record: a node that registered
    /// one is called over gRPC, one whose record has none (an earlier release) over the data ops.
    func testTheBackingUsesTheControlAddressOfTheNodeRecord() async throws {
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        let backing = try ReplicatedBacking(dataDir: dir + "/controller", nodeID: "ctl", store: store, logger: logger)
        let volume = { (id: String) in
            VolumeRecord(id: id, name: id, capacityBytes: Int64(self.size), parameters: [:], fsType: "", accessModes: [7],
                         accessibleTopology: [:], epoch: 1, replicas: [ReplicaRecord(nodeID: "n1", address: self.dataAddress)])
        }
        try await store.registerNode(NodeRecord(id: "n1", topology: [:], maxVolumes: 0, dataAddress: dataAddress))
        try await backing.create(volume("vol-old"))
        XCTAssertEqual(served.value, 0, "a record without a control address: the data op")

        let node = try controlNode()
        try await store.registerNode(NodeRecord(id: "n1", topology: [:], maxVolumes: 0, dataAddress: dataAddress,
                                                controlAddress: node.controlAddress))
        let recorded = try await store.node(id: "n1")
        XCTAssertEqual(recorded?.controlAddress, node.controlAddress)
        try await backing.create(volume("vol-new"))
        try await backing.grow(volume: volume("vol-new"), to: 2 * Int64(size))
        try await backing.delete(volume("vol-old"))
        XCTAssertEqual(served.value, 3, "a record with a control address: the service")
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/replicas/vol-new/superblock"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/replicas/vol-old"))
    }

    /// A node record written by an earlier release (no `controlAddress` key) still decodes.
    func testANodeRecordOfAnEarlierReleaseDecodes() throws {
        let old = #"{"id":"n1","topology":{},"maxVolumes":0,"registeredAt":0,"dataAddress":"10.0.0.1:7410"}"#
        let record = try JSONDecoder().decode(NodeRecord.self, from: Data(old.utf8))
        XCTAssertEqual(record.dataAddress, "10.0.0.1:7410")
        XCTAssertNil(record.controlAddress)
    }

    private func assertFullCycleWorks(_ node: ReplicaNode, file: StaticString = #filePath, line: UInt = #line) async throws {
        try await client.createReplica(node, volumeID: "vol-a", sizeBytes: size)
        try await client.snapshot(node, volumeID: "vol-a", snapshotID: "snap-1", epoch: 1)
        let listed = try await client.listSnapshots(node, volumeID: "vol-a", epoch: 1)
        XCTAssertEqual(listed.map(\.id), ["snap-1"], file: file, line: line)
        try await client.cloneReplica(node, volumeID: "vol-b", sourceVolumeID: "vol-a", snapshotID: "snap-1", sizeBytes: size)
        try await client.growReplica(node, volumeID: "vol-a", sizeBytes: 2 * size, epoch: 1)
        try await client.deleteSnapshot(node, volumeID: "vol-a", snapshotID: "snap-1", epoch: 1)
        try await client.deleteReplica(node, volumeID: "vol-b")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/replicas/vol-b"), file: file, line: line)
        XCTAssertEqual(served.value, 0, "no control service answered", file: file, line: line)
    }
}

final class CallCount: Sendable {
    private let count = Mutex(0)
    var value: Int { count.withLock { $0 } }
    func add() { count.withLock { $0 += 1 } }
}

/// An engine as the replica server's hooks reach it: records each call, refuses epochs below
/// `staleBelow`.
private final class RecordingEngine: ReplicaEngineHooks {
    private let state = Mutex((calls: [String](), staleBelow: UInt64(0)))
    var calls: [String] { state.withLock { $0.calls } }
    var staleBelow: UInt64 {
        get { state.withLock { $0.staleBelow } }
        set { state.withLock { $0.staleBelow = newValue } }
    }

    private func record(_ call: String, epoch: UInt64) throws {
        try state.withLock { s in
            guard epoch >= s.staleBelow else { throw ReplicaError.staleEpoch(seen: s.staleBelow, got: epoch) }
            s.calls.append(call)
        }
    }

    func snapshot(volume: String, snapshotID: String, epoch: UInt64) throws -> [String]? {
        try record("snapshot \(volume) \(snapshotID) epoch \(epoch)", epoch: epoch)
        return ["n1", "n2"]
    }

    func holdWrites(volume: String, timeout: Duration, epoch: UInt64) throws -> Bool {
        try record("hold \(volume) \(timeout.components.seconds * 1000)ms epoch \(epoch)", epoch: epoch)
        return true
    }

    func releaseWrites(volume: String, epoch: UInt64) throws -> Bool {
        try record("release \(volume) epoch \(epoch)", epoch: epoch)
        return true
    }
}
