@testable import CairnReplica
import Dispatch
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// A replica server's worker threads each keep a 1 MiB scratch buffer for O_DIRECT (a scrub's
/// verify reads touch all of it); a thread that has had no job for the idle time gives its
/// pages back (docs/engine.md, "Idle volumes give their buffers back").
final class ReplicaScratchIdleTests: XCTestCase {
    /// Runs `body` on the pool and waits for it.
    private func onPool<T: Sendable>(_ pool: WorkerPool, _ body: @escaping @Sendable () -> T) -> T {
        let result = Mutex<T?>(nil)
        let done = DispatchSemaphore(value: 0)
        pool.submit {
            let value = body()
            result.withLock { $0 = value }
            done.signal()
        }
        done.wait()
        return result.withLock { $0! }
    }

    private static func touchScratch() -> Int {
        let buffer = AlignedScratch.buffer(1 << 20)
        memset(buffer.baseAddress!, 7, buffer.count)
        return AlignedScratch.residentBytes()
    }

    func testAPoolThreadIdleForTheIdleTimeGivesItsScratchBack() throws {
        let pool = WorkerPool(idleSeconds: 0.05)
        try pool.start(threads: 1)
        defer { pool.shutdown() }
        XCTAssertGreaterThanOrEqual(onPool(pool) { Self.touchScratch() }, 1 << 20)
        usleep(400_000)
        let (resident, firstByte) = onPool(pool) { () -> (Int, UInt8) in
            let resident = AlignedScratch.residentBytes()
            // Still usable: the mapping stayed, its pages come back zeroed.
            let buffer = AlignedScratch.buffer(4096)
            return (resident, buffer.load(as: UInt8.self))
        }
        XCTAssertEqual(resident, 0, "the idle thread's scratch pages went back")
        XCTAssertEqual(firstByte, 0)
        XCTAssertGreaterThanOrEqual(onPool(pool) { Self.touchScratch() }, 1 << 20, "and it is used again as before")
    }

    func testWithoutAnIdleTimeAPoolThreadKeepsItsScratch() throws {
        let pool = WorkerPool(idleSeconds: 0)
        try pool.start(threads: 1)
        defer { pool.shutdown() }
        XCTAssertGreaterThanOrEqual(onPool(pool) { Self.touchScratch() }, 1 << 20)
        usleep(300_000)
        XCTAssertGreaterThanOrEqual(onPool(pool) { AlignedScratch.residentBytes() }, 1 << 20)
    }

    /// Jobs spaced closer than the idle time: the scratch stays (no page faults per request).
    func testAPoolThreadBusyMoreOftenThanTheIdleTimeKeepsItsScratch() throws {
        let pool = WorkerPool(idleSeconds: 0.5)
        try pool.start(threads: 1)
        defer { pool.shutdown() }
        XCTAssertGreaterThanOrEqual(onPool(pool) { Self.touchScratch() }, 1 << 20)
        for _ in 0..<5 {
            usleep(100_000)
            XCTAssertGreaterThanOrEqual(onPool(pool) { AlignedScratch.residentBytes() }, 1 << 20)
        }
    }
}
