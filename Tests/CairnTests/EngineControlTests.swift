import CairnCore
import CairnEngine
@testable import CairnReplica
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The engine's control operations over real FUSE (fake replicas): the snapshot write barrier,
/// online growth, QoS. Same fixture and cleanup as `EngineFUSETests` (every engine, mount, loop
/// device and open file is removed in its tearDown, passed or not).
extension EngineFUSETests {
    /// Writers that keep writing (each write to a block of its own) until stopped.
    final class Writers: @unchecked Sendable {
        let lock = NSLock()
        var stop = false
        var completed = 0
        var failures: [Int32] = []
        var running = 0
    }

    func startWriters(_ fd: Int32, threads: Int, blockSize: Int = 4096, region: Int = EngineFUSETests.size) -> Writers {
        let w = Writers()
        w.running = threads
        for t in 0..<threads {
            Thread.detachNewThread {
                var i = 0
                while !w.lock.withLock({ w.stop }) {
                    let slots = region / blockSize / threads
                    let offset = ((i % slots) * threads + t) * blockSize
                    let r = Self.write(fd, offset, blockSize, UInt8(truncatingIfNeeded: i &+ t))
                    w.lock.withLock { if r == 0 { w.completed += 1 } else { w.failures.append(r) } }
                    i += 1
                }
                w.lock.withLock { w.running -= 1 }
            }
        }
        return w
    }

    func stopWriters(_ w: Writers) {
        w.lock.withLock { w.stop = true }
        let deadline = Date().addingTimeInterval(30)
        while w.lock.withLock({ w.running }) > 0, Date() < deadline { usleep(1000) }
    }

    // MARK: the write barrier

    func testASnapshotIsACutNoWriteIsInFlightDuringItAndWritesResume() throws {
        let (engine, fakes, fd) = try mounted(2)
        // Slow writes, so that some are always in flight when the barrier comes.
        for fake in fakes { fake.onWrite.withLock { $0 = { usleep(500) } } }
        let writers = startWriters(fd, threads: 6)
        defer { stopWriters(writers) }
        usleep(200_000)
        var pauses: [Double] = []
        for n in 1...5 {
            let before = writers.lock.withLock { writers.completed }
            let start = DispatchTime.now()
            XCTAssertEqual(try engine.snapshot(id: "snap-\(n)"), ["n1", "n2"])
            pauses.append(Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e6)
            usleep(100_000)
            XCTAssertGreaterThan(writers.lock.withLock { writers.completed }, before, "writes resumed after snapshot \(n)")
        }
        stopWriters(writers)
        XCTAssertEqual(writers.lock.withLock { writers.failures }, [])
        let n1 = fakes[0].state.withLock { $0.snapshots }, n2 = fakes[1].state.withLock { $0.snapshots }
        XCTAssertEqual(n1.map(\.id), (1...5).map { "snap-\($0)" })
        XCTAssertEqual(n2.map(\.id), n1.map(\.id))
        for (a, b) in zip(n1, n2) {
            XCTAssertEqual(a.writesInFlight, 0, "a write was in flight on n1 during \(a.id)")
            XCTAssertEqual(b.writesInFlight, 0, "a write was in flight on n2 during \(b.id)")
            XCTAssertTrue(a.data == b.data, "\(a.id) differs between the replicas: not one cut")
        }
        XCTAssertFalse(engine.writesHeld)
        print(String(format: "snapshot barrier pause (2 fake replicas, 6 writers): min %.2f ms, max %.2f ms",
                     pauses.min() ?? 0, pauses.max() ?? 0))
    }

    func testReadsGoOnWhileWritesAreHeldAndAHeldWriteCompletesOnRelease() throws {
        let (engine, _, fd) = try mounted(1)
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x11), 0)
        try engine.holdWrites(timeout: .seconds(20))
        defer { engine.releaseWrites() }
        XCTAssertThrowsError(try engine.holdWrites(timeout: .seconds(1))) { error in
            XCTAssertEqual((error as? CairnError)?.code, .aborted)
        }
        let (readError, data) = Self.read(fd, 0, 4096)
        XCTAssertEqual(readError, 0)
        XCTAssertEqual(data, [UInt8](repeating: 0x11, count: 4096), "reads are served during a hold")
        let result = Mutex<Int32?>(nil)
        Thread.detachNewThread { let r = Self.write(fd, 4096, 4096, 0x22); result.withLock { $0 = r } }
        usleep(300_000)
        XCTAssertNil(result.withLock { $0 }, "a write completed while writes were held")
        engine.releaseWrites()
        let deadline = Date().addingTimeInterval(10)
        while result.withLock({ $0 }) == nil, Date() < deadline { usleep(1000) }
        XCTAssertEqual(result.withLock { $0 }, 0)
        XCTAssertThrowsError(try engine.snapshotReplicas(id: "x")) { error in
            XCTAssertEqual((error as? CairnError)?.code, .failedPrecondition, "snapshotReplicas needs a hold")
        }
    }

    func testAHoldReleasesItselfAfterItsTimeout() throws {
        let (engine, _, fd) = try mounted(1)
        let start = DispatchTime.now()
        try engine.holdWrites(timeout: .milliseconds(400))
        defer { engine.releaseWrites() }
        // The coordinator "crashed": nobody releases. The write waits out the hold, then goes.
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x33), 0)
        let waited = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        XCTAssertGreaterThanOrEqual(waited, 0.35, "the write did not wait for the hold")
        XCTAssertLessThan(waited, 10)
        XCTAssertFalse(engine.writesHeld)
        // A new hold can be taken after a lapsed one.
        try engine.holdWrites(timeout: .seconds(5))
        engine.releaseWrites()
    }

    func testAGroupSnapshotHoldsEveryVolumeAtOneBarrier() throws {
        let (a, aFakes, aFD) = try mounted(2)
        let bFakes = fakes(2)
        let b = makeEngine(bFakes, name: "vol-b")
        let bFD = try Self.open(try b.start())
        openFiles.append(bFD)
        let aWriters = startWriters(aFD, threads: 3), bWriters = startWriters(bFD, threads: 3)
        defer { stopWriters(aWriters); stopWriters(bWriters) }
        usleep(100_000)
        // One barrier over both volumes: hold each, snapshot each, release each.
        try a.holdWrites(timeout: .seconds(20))
        defer { a.releaseWrites() }
        try b.holdWrites(timeout: .seconds(20))
        defer { b.releaseWrites() }
        // What reached the replicas (a writer's own count may lag behind its write's return).
        func reached(_ fakes: [FakeReplica]) -> Int { fakes[0].state.withLock { $0.writes.count } }
        let (aBefore, bBefore) = (reached(aFakes), reached(bFakes))
        XCTAssertEqual(try a.snapshotReplicas(id: "group-1"), ["n1", "n2"])
        XCTAssertEqual(try b.snapshotReplicas(id: "group-1"), ["n1", "n2"])
        usleep(50_000)
        XCTAssertEqual(reached(aFakes), aBefore, "a write to vol-a reached a replica inside the group barrier")
        XCTAssertEqual(reached(bFakes), bBefore, "a write to vol-b reached a replica inside the group barrier")
        a.releaseWrites()
        b.releaseWrites()
        // (The first write after a snapshot makes each fake copy its 64 MiB volume: ~100 ms.)
        let deadline = Date().addingTimeInterval(10)
        while (reached(aFakes) == aBefore || reached(bFakes) == bBefore) && Date() < deadline { usleep(1000) }
        XCTAssertGreaterThan(reached(aFakes), aBefore, "writes to vol-a resumed")
        XCTAssertGreaterThan(reached(bFakes), bBefore, "writes to vol-b resumed")
        for fakes in [aFakes, bFakes] {
            let snaps = fakes.map { $0.state.withLock { $0.snapshots } }
            XCTAssertEqual(snaps.map { $0.map(\.id) }, [["group-1"], ["group-1"]])
            XCTAssertTrue(snaps[0][0].data == snaps[1][0].data, "one cut on both replicas")
        }
    }

    func testAReplicaFailingTheSnapshotIsRecordedOutOfSyncAndTheOthersKeepIt() throws {
        let (engine, fakes, fd) = try mounted(2)
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x44), 0)
        fakes[1].state.withLock { $0.snapshotFailure = FakeFailure(description: "disk full") }
        XCTAssertEqual(try engine.snapshot(id: "s"), ["n1"])
        XCTAssertEqual(recorder.nodeIDs, ["n2"], "recorded out of sync like a failed write")
        XCTAssertEqual(engine.state.inSync, ["n1"])
        XCTAssertEqual(fakes[0].state.withLock { $0.snapshots.map(\.id) }, ["s"])
        // The last in-sync replica failing: the snapshot fails and nothing is recorded.
        fakes[0].state.withLock { $0.snapshotFailure = FakeFailure(description: "disk full") }
        XCTAssertThrowsError(try engine.snapshot(id: "t"))
        XCTAssertEqual(recorder.nodeIDs, ["n2"])
        XCTAssertFalse(engine.writesHeld, "a failed snapshot releases the hold")
        XCTAssertEqual(Self.write(fd, 4096, 4096, 0x45), 0)
    }

    // MARK: growth

    func testGrowOnlineOverFUSEAndALoopDeviceSeesTheNewSize() throws {
        let (engine, fakes, fd) = try mounted(2)
        let path = engine.path
        let device = output(["losetup", "--direct-io=on", "-f", "--show", path])
        XCTAssertTrue(device.hasPrefix("/dev/loop"), "losetup: \(device)")
        guard device.hasPrefix("/dev/loop") else { return }
        loopDevices.append(device)
        XCTAssertEqual(output(["blockdev", "--getsize64", device]), "\(Self.size)")
        XCTAssertEqual(Self.write(fd, Self.size, 4096, 0x55), ENOSPC, "beyond the end before growing")

        try engine.grow(to: UInt64(2 * Self.size))
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(Int(st.st_size), 2 * Self.size, "the kernel sees the new size at once")
        XCTAssertEqual(fakes.map { $0.state.withLock { $0.grows } }, [[UInt64(2 * Self.size)], [UInt64(2 * Self.size)]])
        XCTAssertEqual(Self.write(fd, Self.size, 4096, 0x55), 0)
        XCTAssertEqual(fakes[1].bytes(Self.size, 4096), [UInt8](repeating: 0x55, count: 4096))
        XCTAssertEqual(run(["losetup", "-c", device]), 0)
        XCTAssertEqual(output(["blockdev", "--getsize64", device]), "\(2 * Self.size)")

        XCTAssertNoThrow(try engine.grow(to: UInt64(2 * Self.size)), "the same size is a no-op")
        XCTAssertThrowsError(try engine.grow(to: UInt64(Self.size))) { error in
            XCTAssertEqual((error as? CairnError)?.code, .invalidArgument)
        }
        XCTAssertEqual(run(["losetup", "-d", device]), 0)
        loopDevices.removeAll()
    }

    // MARK: QoS

    /// Achieved rate of `writers` over [warmup, warmup+seconds].
    private func measure(_ fd: Int32, threads: Int, blockSize: Int, warmup: Double, seconds: Double) -> (rate: Double, failures: [Int32]) {
        let w = startWriters(fd, threads: threads, blockSize: blockSize)
        usleep(UInt32(warmup * 1e6))
        let (c0, t0) = (w.lock.withLock { w.completed }, DispatchTime.now().uptimeNanoseconds)
        usleep(UInt32(seconds * 1e6))
        let (c1, t1) = (w.lock.withLock { w.completed }, DispatchTime.now().uptimeNanoseconds)
        stopWriters(w)
        return (Double(c1 - c0) / (Double(t1 - t0) / 1e9), w.lock.withLock { w.failures })
    }

    func testAnIOPSLimitHoldsWithinTenPercentAndLimitsChangeWhileIORuns() throws {
        let (engine, _, fd) = try mounted(1)
        // The same load without a limit: it could go far faster than the limit.
        let unlimited = measure(fd, threads: 8, blockSize: 4096, warmup: 0.2, seconds: 1)
        XCTAssertGreaterThan(unlimited.rate, 1500, "the unthrottled load is too slow to show a 500 IOPS limit")
        engine.setLimits(iopsLimit: 500, bandwidthLimit: 0)
        XCTAssertEqual(engine.limits.iops, 500)
        let limited = measure(fd, threads: 8, blockSize: 4096, warmup: 0.5, seconds: 4)
        XCTAssertEqual(limited.failures, [])
        XCTAssertEqual(limited.rate, 500, accuracy: 50, "achieved \(limited.rate) IOPS against a limit of 500")
        // Raised while writers run (the measurement starts after the change).
        engine.setLimits(iopsLimit: 1000, bandwidthLimit: 0)
        let raised = measure(fd, threads: 8, blockSize: 4096, warmup: 0.3, seconds: 2)
        XCTAssertEqual(raised.rate, 1000, accuracy: 100)
        engine.setLimits(iopsLimit: 0, bandwidthLimit: 0)
        let lifted = measure(fd, threads: 8, blockSize: 4096, warmup: 0.2, seconds: 1)
        XCTAssertGreaterThan(lifted.rate, 1500)
        print(String(format: "QoS: unlimited %.0f IOPS; limit 500 → %.1f IOPS; limit 1000 → %.1f IOPS; lifted %.0f IOPS",
                     unlimited.rate, limited.rate, raised.rate, lifted.rate))
    }

    func testABandwidthLimitCountsBytes() throws {
        let (engine, _, fd) = try mounted(1)
        engine.setLimits(iopsLimit: 0, bandwidthLimit: 16 << 20)
        // 1 MiB writes: 16 per second under a 16 MiB/s limit.
        let limited = measure(fd, threads: 4, blockSize: 1 << 20, warmup: 0.5, seconds: 3)
        XCTAssertEqual(limited.failures, [])
        XCTAssertEqual(limited.rate, 16, accuracy: 1.6, "achieved \(limited.rate) MiB/s against 16 MiB/s")
        print(String(format: "QoS: bandwidth limit 16 MiB/s with 1 MiB writes → %.2f MiB/s", limited.rate))
    }
}
