import CairnController
import CairnCore
import CairnStore
import Foundation
import Logging
import Synchronization
import XCTest

/// ControllerLeadership against a real etcd: campaigning, leading (the leader-only work runs),
/// losing the lease (the work stops, the controller campaigns again) and a standby taking over.
/// Every leadership task is cancelled (a teardown block) and every store stopped in tearDown.
/// (In EtcdStoreTests: its class-wide etcd and its stores, stopped in its tearDown.)
extension EtcdStoreTests {
    /// Counts how often the leader-only work started and how many runs are going now.
    final class WorkCount: Sendable {
        let counts = Mutex<(started: Int, running: Int)>((0, 0))
        var started: Int { counts.withLock { $0.started } }
        var running: Int { counts.withLock { $0.running } }

        func work() async {
            counts.withLock { $0.started += 1; $0.running += 1 }
            defer { counts.withLock { $0.running -= 1 } }
            while !Task.isCancelled { try? await Task.sleep(for: .milliseconds(50)) }
        }
    }

    func leaderStore(_ server: EtcdTestServer, prefixOf other: EtcdStore? = nil) throws -> EtcdStore {
        let store = try other.map {
            try EtcdStore(endpoints: [server.clientURL], prefix: $0.prefix, logger: Logger(label: "second"))
        } ?? server.store()
        stores.append(store)
        return store
    }

    func lead(_ store: EtcdStore, _ id: String, ttl: Int = 2, work: WorkCount) -> (ControllerLeadership, Task<Void, Never>) {
        var logger = Logger(label: "leadership-test")
        logger.logLevel = .debug
        let leadership = ControllerLeadership(election: store, leaderID: id, ttl: ttl, gatesCSI: true, logger: logger) {
            await work.work()
        }
        let task = Task { await leadership.run() }
        addTeardownBlock {
            task.cancel()
            await task.value
        }
        return (leadership, task)
    }

    func waitUntil(_ what: String, within seconds: Double, _ condition: () -> Bool) async throws {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while !condition() {
            guard ContinuousClock.now < deadline else { return XCTFail("not within \(seconds) s: \(what)") }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    func testLeadershipAStandbyAnswersUnavailableUntilTheLeaderStopsThenLeadsAtOnce() async throws {
        let server = try XCTUnwrap(Self.server)
        let first = try leaderStore(server), second = try leaderStore(server, prefixOf: first)
        let firstWork = WorkCount(), secondWork = WorkCount()
        let (leader, leaderTask) = lead(first, "controller-1", work: firstWork)
        try await waitUntil("the first controller leads", within: 5) { leader.isLeading && firstWork.running == 1 }
        XCTAssertNoThrow(try leader.requireLeading())

        let (standby, _) = lead(second, "controller-2", work: secondWork)
        try await Task.sleep(for: .seconds(3))  // longer than the TTL: the lease is kept alive
        XCTAssertEqual(standby.phase, .campaigning)
        XCTAssertEqual(secondWork.started, 0, "a standby runs no leader-only work")
        XCTAssertThrowsError(try standby.requireLeading()) { error in
            XCTAssertEqual((error as? CairnError)?.code, .unavailable)
        }

        let stopped = ContinuousClock.now
        leaderTask.cancel()  // SIGTERM: the leader resigns (revokes its lease)
        await leaderTask.value
        XCTAssertEqual(leader.phase, .stopped)
        XCTAssertEqual(firstWork.running, 0, "the leader-only work stops with the leadership")
        try await waitUntil("the standby leads", within: 3) { standby.isLeading && secondWork.running == 1 }
        print("standby took over \(ContinuousClock.now - stopped) after the leader resigned")
    }

    func testLeadershipALeaderWhoseLeaseIsRevokedStopsItsWorkAndCampaignsAgain() async throws {
        let server = try XCTUnwrap(Self.server)
        let first = try leaderStore(server)
        let work = WorkCount()
        let (leader, _) = lead(first, "controller-1", work: work)
        try await waitUntil("the controller leads", within: 5) { leader.isLeading && work.running == 1 }

        // Behind its back: the lease is revoked, so etcd deletes the leader key.
        await first.resign(leaderID: "controller-1")
        try await waitUntil("the controller leads a second term", within: 5) { leader.terms == 2 && leader.isLeading }
        XCTAssertEqual(work.started, 2, "the work was stopped and started again with the new term")
        XCTAssertEqual(work.running, 1)
    }

    func testLeadershipALeaderCutOffFromEtcdForLongerThanTheTTLStopsActingAndLeadsAgainAfterwards() async throws {
        let own = try await EtcdTestServer.start()
        defer { own.stop() }
        let store = try leaderStore(own)
        let work = WorkCount()
        let (leader, _) = lead(store, "controller-1", work: work)
        try await waitUntil("the controller leads", within: 5) { leader.isLeading && work.running == 1 }

        kill(own.pid, SIGSTOP)  // etcd hangs: no renewal, no answer
        let cut = ContinuousClock.now
        try await waitUntil("the controller stops leading", within: 4) { !leader.isLeading && work.running == 0 }
        let stoppedAfter = ContinuousClock.now - cut
        XCTAssertLessThanOrEqual(stoppedAfter, .milliseconds(2800), "stops acting by the lease's deadline (TTL 2 s)")
        XCTAssertEqual(leader.phase, .campaigning)
        XCTAssertThrowsError(try leader.requireLeading())

        kill(own.pid, SIGCONT)
        try await waitUntil("the controller leads again", within: 20) { leader.isLeading && work.running == 1 }
        XCTAssertEqual(leader.terms, 2)
    }
}
