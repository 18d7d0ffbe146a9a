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

    /// Runs `body` on `count` threads of the pool at once (each job waits until all have
    /// started, so no thread takes two) and returns what each returned.
    private func onThreads<T: Sendable>(_ pool: WorkerPool, _ count: Int, _ body: @escaping @Sendable () -> T) -> [T] {
        let started = Atomic<Int>(0)
        let results = Mutex<[T]>([])
        let done = DispatchSemaphore(value: 0)
        for _ in 0..<count {
            pool.submit {
                started.wrappingAdd(1, ordering: .relaxed)
                let deadline = Date().addingTimeInterval(10)
                while started.load(ordering: .relaxed) < count, Date() < deadline { usleep(1_000) }
                let value = body()
                results.withLock { $0.append(value) }
                done.signal()
            }
        }
        for _ in 0..<count { done.wait() }
        return results.withLock { $0 }
    }

    /// A trickle of requests (one at a time, as a scrub or a single committer sends them) is run
    /// by the thread that went idle last, not by every thread in turn: the others stay idle
    /// for the idle time and give their scratch back. Woken in turn, all eight ran a job every
    /// 160 ms and none ever dropped its megabyte.
    func testATrickleOfJobsKeepsOneThreadWarmAndTheOthersGiveTheirScratchBack() throws {
        let pool = WorkerPool(idleSeconds: 0.3)
        try pool.start(threads: 8)
        defer { pool.shutdown() }
        let touched = onThreads(pool, 8) { Self.touchScratch() }
        XCTAssertEqual(touched.count, 8)
        XCTAssertTrue(touched.allSatisfy { $0 >= 1 << 20 }, "every thread's scratch is in use: \(touched)")
        var threads = Set<UInt>()
        let began = Date()
        while Date().timeIntervalSince(began) < 1.0 {
            threads.insert(onPool(pool) { UInt(pthread_self()) })
            usleep(20_000)
        }
        XCTAssertLessThanOrEqual(threads.count, 2, "one-at-a-time jobs ran on \(threads.count) of the 8 threads")
        let resident = onThreads(pool, 8) { AlignedScratch.residentBytes() }
        XCTAssertLessThanOrEqual(resident.filter { $0 > 0 }.count, 2,
                                 "only the warm thread keeps its scratch; resident bytes per thread: \(resident)")
        // Every thread still works, and many jobs at once all run.
        let ran = Atomic<Int>(0)
        let all = DispatchGroup()
        for _ in 0..<2_000 {
            all.enter()
            pool.submit {
                ran.wrappingAdd(1, ordering: .relaxed)
                all.leave()
            }
        }
        XCTAssertEqual(all.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(ran.load(ordering: .relaxed), 2_000)
    }
}
