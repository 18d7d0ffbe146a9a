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
