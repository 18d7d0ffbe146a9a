import CairnCore
import CairnStore
import Foundation
import Logging
import XCTest

/// EtcdStore against a real etcd: one etcd for the class (each test under its own key
/// prefix), killed and removed in the class tearDown; the outage test starts its own.
final class EtcdStoreTests: XCTestCase {
    nonisolated(unsafe) static var server: EtcdTestServer?
    var stores: [EtcdStore] = []

    override func setUp() async throws {
        if Self.server == nil { Self.server = try await EtcdTestServer.start() }
    }

    override func tearDown() async throws {
        for store in stores { await store.stop() }
        stores = []
    }

    override class func tearDown() {
        server?.stop()
        server = nil
        super.tearDown()
    }

    func makeStore(nodeLeaseTTL: Int = 10) throws -> EtcdStore {
        let store = try XCTUnwrap(Self.server).store(nodeLeaseTTL: nodeLeaseTTL)
        stores.append(store)
        return store
    }

    // MARK: the behaviour shared with SQLiteStore

    func testOneVolumeAtTheSamePathInTwoContainersIsTwoPublishes() async throws {
        try await StoreContract.oneVolumeAtTheSamePathInTwoContainersIsTwoPublishes(makeStore())
    }

    func testVolumesAreCreatedFoundListedAndDeletedWithTheirRecords() async throws {
        try await StoreContract.volumesAreCreatedFoundListedAndDeletedWithTheirRecords(makeStore())
    }

    func testAttachRaisesTheEpochAndEnforcesExclusivityAndTheNodeLimit() async throws {
        try await StoreContract.attachRaisesTheEpochAndEnforcesExclusivityAndTheNodeLimit(makeStore())
    }

    func testConcurrentExclusiveAttachesOfOneVolumeHaveExactlyOneWinner() async throws {
        try await StoreContract.concurrentExclusiveAttachesOfOneVolumeHaveExactlyOneWinner(makeStore())
    }

    func testConcurrentAttachesFromTwoStoreInstancesHaveExactlyOneWinner() async throws {
        // Two processes' worth of clients: the conflict is decided by etcd, not by a local lock.
        let a = try makeStore()
        let b = try EtcdStore(endpoints: [XCTUnwrap(Self.server).clientURL], prefix: a.prefix, logger: Logger(label: "b"))
        try await a.createVolume(StoreContract.volume("vol-x"))
        func attach(_ store: EtcdStore, _ node: String) async -> Result<AttachmentRecord, any Error> {
            do {
                return .success(try await store.attach(volumeID: "vol-x", nodeID: node, readonly: false, accessMode: 7,
                                                       exclusive: true, nodeLimit: 0))
            } catch { return .failure(error) }
        }
        async let first = attach(a, "node-a")
        async let second = attach(b, "node-b")
        let results = await [first, second]
        XCTAssertEqual(results.filter { (try? $0.get()) != nil }.count, 1, "\(results)")
        let volume = try await a.volume(id: "vol-x")
        XCTAssertEqual(volume?.epoch, 1, "only the winner raised the epoch")
    }

    func testStagesAreKeptPerNode() async throws {
        try await StoreContract.stagesAreKeptPerNode(makeStore())
    }

    func testAReplicaLeavesTheInSyncSetOnlyUnderTheCurrentEpoch() async throws {
        try await StoreContract.aReplicaLeavesTheInSyncSetOnlyUnderTheCurrentEpoch(makeStore())
    }

    func testAReplicaRejoinsRecordsProgressAndIsReplacedOnlyOutOfSync() async throws {
        try await StoreContract.aReplicaRejoinsRecordsProgressAndIsReplacedOnlyOutOfSync(makeStore())
    }

    func testEventsAreKeptNewestLastAndBounded() async throws {
        try await StoreContract.eventsAreKeptNewestLastAndBounded(makeStore())
    }

    func testARemovedNodeCannotRegisterAgain() async throws {
        try await StoreContract.aRemovedNodeCannotRegisterAgain(makeStore())
    }

    func testReplicaDeletionsAreRecordedListedAndRemovedOnlyAsRead() async throws {
        try await StoreContract.replicaDeletionsAreRecordedListedAndRemovedOnlyAsRead(makeStore())
    }

    func testDeletingAVolumeRecordsItsReplicasDeletionsInTheSameStep() async throws {
        try await StoreContract.deletingAVolumeRecordsItsReplicasDeletionsInTheSameStep(makeStore())
    }

    func testRegisteredNodesAreLive() async throws {
        try await StoreContract.registeredNodesAreLive(makeStore())
    }

    func testSnapshotsAreUniqueByNameUpdatedListedInPagesAndDeleted() async throws {
        try await StoreContract.snapshotsAreUniqueByNameUpdatedListedInPagesAndDeleted(makeStore())
    }

    // MARK: leases

    func testARegistrationOutlivesItsTTLWhileKeptAliveAndExpiresAfterTheKeeperStops() async throws {
        let store = try makeStore(nodeLeaseTTL: 2)
        try await store.registerNode(NodeRecord(id: "node-a", topology: [:], maxVolumes: 0))
        try await Task.sleep(for: .seconds(4))
        var live = try await store.liveNodes()
        XCTAssertEqual(live.map(\.id), ["node-a"], "the keep-alive (a unary call on etcd's stream) renews the lease")

        await store.stop(revokingLeases: false)  // as if the process died
        live = try await store.liveNodes()
        XCTAssertEqual(live.map(\.id), ["node-a"], "still alive until the TTL runs out")
        let deadline = ContinuousClock.now + .seconds(8)
        while try await !store.liveNodes().isEmpty {
            XCTAssertLessThan(ContinuousClock.now, deadline, "the registration should expire within a few seconds of its 2 s TTL")
            if ContinuousClock.now >= deadline { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        let node = try await store.node(id: "node-a")
        XCTAssertNil(node)
    }

    func testStopRevokesTheRegistrationAtOnce() async throws {
        let store = try makeStore()
        try await store.registerNode(NodeRecord(id: "node-a", topology: [:], maxVolumes: 0))
        try await store.registerNode(NodeRecord(id: "node-a", topology: ["zone": "2"], maxVolumes: 0))  // refresh
        let refreshed = try await store.node(id: "node-a")
        XCTAssertEqual(refreshed?.topology, ["zone": "2"])
        await store.stop()
        let live = try await store.liveNodes()
        XCTAssertTrue(live.isEmpty)
    }

    func testASecondCandidateLeadsOnlyAfterTheFirstStops() async throws {
        let first = try makeStore()
        let second = try EtcdStore(endpoints: [XCTUnwrap(Self.server).clientURL], prefix: first.prefix,
                                   logger: Logger(label: "second"))
        stores.append(second)
        XCTAssertFalse(first.isLeader())
        try await first.campaign(leaderID: "controller-1", ttl: 2)
        XCTAssertTrue(first.isLeader())

        let waiting = Task { try await second.campaign(leaderID: "controller-2", ttl: 2) }
        try await Task.sleep(for: .seconds(3))  // longer than the TTL: the lease is being kept alive
        XCTAssertFalse(second.isLeader(), "the second candidate waits while the first holds the lease")
        XCTAssertTrue(first.isLeader())

        await first.stop()
        XCTAssertFalse(first.isLeader())
        let won = Task { try await waiting.value }
        let timeout = Task { try await Task.sleep(for: .seconds(10)); waiting.cancel() }
        try await won.value
        timeout.cancel()
        XCTAssertTrue(second.isLeader())
    }

    func testASecondCandidateLeadsAfterTheFirstDiesWithoutRevoking() async throws {
        let first = try makeStore()
        let second = try EtcdStore(endpoints: [XCTUnwrap(Self.server).clientURL], prefix: first.prefix,
                                   logger: Logger(label: "second"))
        stores.append(second)
        try await first.campaign(leaderID: "controller-1", ttl: 2)
        await first.stop(revokingLeases: false)
        let start = ContinuousClock.now
        try await second.campaign(leaderID: "controller-2", ttl: 2)
        XCTAssertTrue(second.isLeader())
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(6), "taken over once the dead leader's lease expired")
    }

    func testAnUnreachableFirstEndpointFailsOverToTheNext() async throws {
        let server = try XCTUnwrap(Self.server)
        let dead = "http://127.0.0.1:\(try EtcdTestServer.freePort())"
        let store = try server.store(endpoints: [dead, server.clientURL])
        stores.append(store)
        try await store.createVolume(StoreContract.volume("vol-1"))
        let found = try await store.volume(id: "vol-1")
        XCTAssertEqual(found?.id, "vol-1")
    }

    // MARK: outage

    func testCallsFailWithUnavailableAndAClearMessageWhenEtcdIsDown() async throws {
        let own = try await EtcdTestServer.start()
        defer { own.stop() }
        let store = try own.store()
        stores.append(store)
        try await store.createVolume(StoreContract.volume("vol-1"))
        own.stop()
        for call in [{ _ = try await store.volume(id: "vol-1") },
                     { try await store.createVolume(StoreContract.volume("vol-2")) },
                     { _ = try await store.attach(volumeID: "vol-1", nodeID: "n", readonly: false, accessMode: 7,
                                                  exclusive: true, nodeLimit: 0) }] as [() async throws -> Void] {
            do {
                try await call()
                XCTFail("expected UNAVAILABLE with etcd down")
            } catch let e as CairnError {
                XCTAssertEqual(e.code, .unavailable, e.message)
                XCTAssertTrue(e.message.contains("cannot reach etcd at \(own.clientURL)"), e.message)
                XCTAssertTrue(e.message.contains("check that etcd is running and reachable"), e.message)
            }
        }
    }

    func testEndpointsAreValidated() {
        for bad in ["https://127.0.0.1:2379", "127.0.0.1", "http://a:1/path"] {
            XCTAssertThrowsError(try EtcdStore(endpoints: [bad], logger: Logger(label: "t")), bad)
        }
        XCTAssertThrowsError(try EtcdStore(endpoints: [], logger: Logger(label: "t")))
    }
}
