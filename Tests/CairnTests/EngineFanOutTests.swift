@testable import CairnEngine
import Dispatch
import Synchronization
import XCTest

/// The engine's fan-out: every index runs exactly once, in parallel, and `run` returns only
/// after all of them — also from many threads at once and when helpers are all busy.
final class EngineFanOutTests: XCTestCase {
    func testEveryIndexRunsOnceFromManyThreads() {
        let runs = Mutex([Int: Int]())
        DispatchQueue.concurrentPerform(iterations: 64) { caller in
            for round in 0..<50 {
                let width = 1 + (caller + round) % 4
                let seen = Mutex(0)
                FanOut.shared.run(width) { i in
                    seen.withLock { $0 |= 1 << i }
                    runs.withLock { $0[i, default: 0] += 1 }
                }
                XCTAssertEqual(seen.withLock { $0 }, (1 << width) - 1, "run returned before every index ran")
            }
        }
        var expected = 0
        for caller in 0..<64 { for round in 0..<50 { expected += 1 + (caller + round) % 4 } }
        let total: Int = runs.withLock { $0.values.reduce(0, +) }
        XCTAssertEqual(total, expected)
    }

    func testIndexesRunInParallel() {
        // Three blocking calls of 200 ms each take about 200 ms, not 600.
        let start = DispatchTime.now()
        FanOut.shared.run(3) { _ in usleep(200_000) }
        let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        XCTAssertLessThan(elapsed, 0.5)
    }
}

/// The lock-free table of generations in flight: a flush's watermark never counts an op still
/// in flight as finished, whatever the interleaving.
final class InflightGenerationsTests: XCTestCase {
    func testTheWatermarkStaysBelowEveryGenerationInFlight() {
        let table = InflightGenerations()
        let counter = Atomic<UInt64>(1 << 44)
        // What each thread holds now (0: nothing), written before and cleared after its op.
        let holding = Mutex([UInt64](repeating: 0, count: 12))
        let stop = Atomic<Bool>(false)
        let violations = Atomic<Int>(0)
        let checks = Atomic<Int>(0)
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) {
            while !stop.load(ordering: .relaxed) {
                // Ops in flight before the watermark is taken, and still in flight after it.
                let before = holding.withLock { $0 }
                let mark = table.watermark(of: counter)
                let after = holding.withLock { $0 }
                for (b, a) in zip(before, after) where b != 0 && b == a && mark >= b {
                    violations.wrappingAdd(1, ordering: .relaxed)
                }
                checks.wrappingAdd(1, ordering: .relaxed)
            }
        }
        onThreads(12) { t in
            for _ in 0..<3000 {
                let (g, slot) = table.take(from: counter)
                holding.withLock { $0[t] = g }
                if g % 7 == 0 { sched_yield() }
                holding.withLock { $0[t] = 0 }
                table.finish(slot: slot)
            }
        }
        stop.store(true, ordering: .relaxed)
        group.wait()
        XCTAssertEqual(violations.load(ordering: .relaxed), 0)
        XCTAssertGreaterThan(checks.load(ordering: .relaxed), 10)
        XCTAssertEqual(table.watermark(of: counter), (1 << 44) + 12 * 3000, "nothing in flight: the counter itself")
        let (g, slot) = table.take(from: counter)
        XCTAssertEqual(table.watermark(of: counter), g - 1)
        table.finish(slot: slot)
    }
}
