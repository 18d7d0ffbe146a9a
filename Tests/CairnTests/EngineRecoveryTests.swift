import CairnCore
import CairnEngine
import CairnReplica
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Recovery in the engine (docs/recovery.md) over real FUSE and in-memory fake replicas: delta
/// resync and rejoin, writes during a resync, replicas re-created elsewhere, read repair, scrub,
/// and the resync throttle.
extension EngineFUSETests {
    /// Records what the engine asks of the store during recovery.
    final class RecoveryStore: Sendable {
        let inSync = Mutex<[String]>([])
        let progress = Mutex<[ResyncReport]>([])
        /// What the engine reported for the status page.
        let events = Mutex<[ClusterEvent]>([])
        let members: Mutex<[EngineReplica]>

        init(_ members: [EngineReplica]) { self.members = Mutex(members) }

        func hooks(rate: UInt64 = 0, scrub: UInt64 = 0) -> EngineRecovery {
            var hooks = EngineRecovery(
                membership: { [self] in members.withLock { $0 } },
                markInSync: { [self] node in inSync.withLock { $0.append(node) } },
                reportProgress: { [self] _, report in if let report { progress.withLock { $0.append(report) } } },
                throttle: ResyncThrottle(bytesPerSecond: rate), retryInterval: 0.2, membershipInterval: 0.2,
                scrubBytesPerSecond: scrub, progressInterval: 0.2)
            hooks.report = { [self] event in events.withLock { $0.append(event) } }
            return hooks
        }
    }

    func replicas(_ fakes: [FakeReplica], outOfSync: Set<String> = []) -> [EngineReplica] {
        fakes.enumerated().map {
            EngineReplica(nodeID: $1.nodeID, host: "127.0.0.1", port: UInt16(7000 + $0), inSync: !outOfSync.contains($1.nodeID))
        }
    }

    func waitUntil(_ seconds: Double, _ what: String, _ condition: () -> Bool) {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() {
            if Date() > deadline { return XCTFail("timed out after \(seconds) s waiting for \(what)") }
            usleep(20_000)
        }
    }

    func testResyncCopiesOnlyTheMissedBlocksReplacesUnacknowledgedOnesAndRejoins() throws {
        let fakes = fakes(3)
        let store = RecoveryStore(replicas(fakes))
        let engine = makeEngine(fakes, recovery: store.hooks())
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        XCTAssertEqual(Self.write(fd, 0, 1 << 20, 0x11), 0)
        fakes[2].fail(with: FakeFailure(description: "n3 is down"))
        // 100 blocks written while n3 is away, at scattered offsets.
        for i in 0..<100 { XCTAssertEqual(Self.write(fd, (i * 37 % 4000) * 4096 + (4 << 20), 4096, UInt8(i)), 0) }
        XCTAssertEqual(recorder.nodeIDs, ["n3"])
        // n3 also holds a write nobody acknowledged (block 3, newer than the source's).
        fakes[2].tamper(block: 3, byte: 0x99, generation: engine.state.generation)
        fakes[2].fail(with: nil)

        waitUntil(10, "n3 to rejoin") { store.inSync.withLock { $0 } == ["n3"] }
        XCTAssertEqual(engine.state.inSync, ["n1", "n2", "n3"])
        XCTAssertTrue(engine.state.outOfSync.isEmpty)
        XCTAssertEqual(fakes[2].bytes(0, Self.size) == fakes[0].bytes(0, Self.size), true, "n3 differs from n1 after the resync")
        let copied = fakes[2].state.withLock { $0.resyncBytes }
        XCTAssertEqual(copied, 101 * 4096, "only the 100 missed blocks and the unacknowledged one are copied")
        XCTAssertTrue(store.progress.withLock { $0 }.contains { $0.phase == .copy && $0.nodeID == "n3" })
        // A rejoined replica takes writes again.
        XCTAssertEqual(Self.write(fd, 8 << 20, 4096, 0x42), 0)
        XCTAssertEqual(fakes[2].bytes(8 << 20, 4096), [UInt8](repeating: 0x42, count: 4096))
    }

    func testWritesDuringAResyncReachTheTargetAndNothingIsLost() throws {
        let fakes = fakes(3)
        let store = RecoveryStore(replicas(fakes))
        // 4 MB/s: copying 8 MiB takes about 2 s, long enough to write under it.
        let engine = makeEngine(fakes, recovery: store.hooks(rate: 4_000_000))
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        fakes[2].fail(with: FakeFailure(description: "n3 is down"))
        XCTAssertEqual(Self.write(fd, 0, 8 << 20, 0x21), 0)
        fakes[2].fail(with: nil)
        waitUntil(10, "the resync to start copying") { engine.state.resync?.phase == .copy }
        var written = 0
        while engine.state.resync != nil && written < 2000 {
            let block = Int.random(in: 0..<(16 << 20) / 4096)
            XCTAssertEqual(Self.write(fd, block * 4096, 4096, UInt8.random(in: 1...255)), 0)
            written += 1
        }
        waitUntil(20, "n3 to rejoin") { store.inSync.withLock { $0 } == ["n3"] }
        XCTAssertGreaterThan(written, 10, "no write happened during the resync")
        XCTAssertTrue(fakes[2].bytes(0, Self.size) == fakes[0].bytes(0, Self.size), "n3 differs from n1")
        XCTAssertTrue(fakes[1].bytes(0, Self.size) == fakes[0].bytes(0, Self.size), "n2 differs from n1")
    }

    func testAReplicaRecreatedElsewhereGetsAFullCopy() throws {
        let fakes = fakes(3)
        let spare = FakeReplica(nodeID: "n4", size: Self.size)
        let store = RecoveryStore(replicas(fakes))
        let engine = makeEngine(fakes, spares: [spare], recovery: store.hooks())
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        XCTAssertEqual(Self.write(fd, 0, 2 << 20, 0x31), 0)
        fakes[2].fail(with: FakeFailure(description: "n3's disk died"))
        XCTAssertEqual(Self.write(fd, 2 << 20, 1 << 20, 0x32), 0)
        // The controller replaces n3 with a new, empty replica on n4.
        store.members.withLock { $0 = Array($0.prefix(2)) + [EngineReplica(nodeID: "n4", host: "127.0.0.1", port: 7004, inSync: false)] }
        waitUntil(10, "n4 to join") { store.inSync.withLock { $0 } == ["n4"] }
        XCTAssertEqual(engine.state.inSync, ["n1", "n2", "n4"])
        XCTAssertNil(engine.state.outOfSync["n3"], "the replaced replica is forgotten")
        XCTAssertTrue(spare.bytes(0, Self.size) == fakes[0].bytes(0, Self.size))
        XCTAssertEqual(spare.state.withLock { $0.resyncBytes }, 3 << 20, "a full copy moves the written blocks only")
    }

    func testAReadOfACorruptedBlockIsAnsweredFromAnotherReplicaAndRepaired() throws {
        let fakes = fakes(2)
        let store = RecoveryStore(replicas(fakes))
        let engine = makeEngine(fakes, recovery: store.hooks())
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        XCTAssertEqual(Self.write(fd, 0, 64 << 10, 0x51), 0)
        fakes[0].tamper(block: 5, byte: 0xBA, corrupt: true)
        let (error, data) = Self.read(fd, 4 * 4096, 4 * 4096)
        XCTAssertEqual(error, 0)
        XCTAssertEqual(data, [UInt8](repeating: 0x51, count: 4 * 4096))
        XCTAssertEqual(engine.state.repairedBlocks, 1)
        XCTAssertEqual(fakes[0].bytes(5 * 4096, 4096), [UInt8](repeating: 0x51, count: 4096), "the bad copy was not rewritten")
        XCTAssertEqual(fakes[0].state.withLock { $0.repairs }, [5])
        XCTAssertTrue(recorder.nodeIDs.isEmpty, "a repaired replica stays in sync")
        // With no good copy anywhere the read fails instead of returning bad data.
        fakes[0].tamper(block: 9, byte: 0xBA, corrupt: true)
        fakes[1].tamper(block: 9, byte: 0xBB, corrupt: true)
        XCTAssertEqual(Self.read(fd, 9 * 4096, 4096).0, EIO)
        XCTAssertEqual(engine.state.unrepairableBlocks, 1)
    }

    /// Three fake replicas, an engine scrubbing at `rate` bytes a second, and its volume open.
    func scrubbing(rate: UInt64) throws -> (fakes: [FakeReplica], store: RecoveryStore, engine: VolumeEngine, fd: Int32) {
        let fakes = fakes(3)
        let store = RecoveryStore(replicas(fakes))
        let engine = makeEngine(fakes, recovery: store.hooks(scrub: rate))
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        return (fakes, store, engine, fd)
    }

    func testTheScrubFindsAndRepairsCorruptionOnAPeer() throws {
        let (fakes, store, engine, fd) = try scrubbing(rate: 256 << 20)
        XCTAssertEqual(Self.write(fd, 40 << 20, 1 << 20, 0x61), 0)
        let block = (40 << 20) / 4096 + 17
        fakes[1].tamper(block: block, byte: 0x00, corrupt: true)
        waitUntil(10, "the scrub to repair n2") { engine.state.repairedBlocks == 1 }
        XCTAssertEqual(fakes[1].bytes(block * 4096, 4096), [UInt8](repeating: 0x61, count: 4096))
        XCTAssertTrue(recorder.nodeIDs.isEmpty)
        let events = store.events.withLock { $0 }
        XCTAssertEqual(events.map(\.kind), [.repaired], "the status page hears of the repair")
        XCTAssertEqual(events.first?.nodeID, "n2")
        XCTAssertTrue(events.first?.message.contains("found by scrub") == true, events.first?.message ?? "")
    }

    /// The scrub's reads share the disks with the application's: while the volume serves I/O
    /// the scrub slows to an eighth of its rate (and still moves); idle, it runs at full rate.
    func testTheScrubYieldsToTheApplication() throws {
        let (_, _, engine, fd) = try scrubbing(rate: 16 << 20)
        func scrubbed(over seconds: Double) -> UInt64 {
            let before = engine.state.scrubbedBlocks
            usleep(useconds_t(seconds * 1e6))
            return engine.state.scrubbedBlocks - before
        }
        usleep(300_000)
        let idle = scrubbed(over: 1)
        XCTAssertEqual(engine.state.scrubbedWhileBusyBlocks, 0, "nothing ran: no step was counted busy")
        // An application writing without pause.
        let stop = Atomic<Bool>(false)
        let stopped = DispatchSemaphore(value: 0)
        Thread {
            var i = 0
            while !stop.load(ordering: .relaxed) {
                _ = Self.write(fd, (i % 64) * 4096, 4096, UInt8(truncatingIfNeeded: i))
                i += 1
            }
            stopped.signal()
        }.start()
        usleep(300_000)
        let busy = scrubbed(over: 1)
        stop.store(true, ordering: .relaxed)
        stopped.wait()
        XCTAssertGreaterThan(engine.state.scrubbedWhileBusyBlocks, 0)
        XCTAssertGreaterThan(busy, 0, "a busy volume is still scrubbed")
        XCTAssertGreaterThan(idle, 2 * 1024, "idle, the scrub runs near its 16 MiB/s (4,096 blocks a second): \(idle)")
        XCTAssertLessThan(busy * 3, idle, "busy, the scrub yields (an eighth of the rate): \(busy) blocks against \(idle) idle")
    }

    func testTheThrottleHoldsItsRate() {
        let throttle = ResyncThrottle(bytesPerSecond: 20_000_000)
        let start = Date()
        for _ in 0..<40 { throttle.take(1 << 20) }
        let rate = Double(40 << 20) / Date().timeIntervalSince(start)
        XCTAssertEqual(rate, 20_000_000, accuracy: 2_000_000, "rate \(rate) B/s is not within 10% of 20 MB/s")
    }
}
