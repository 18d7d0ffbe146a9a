@testable import CairnEngine
import Dispatch
import Foundation
import Synchronization
import XCTest

/// FlushRounds (group commit of the engine's own flushes): a caller returns only after a round
/// that started after it arrived has finished — never covered by a round already running.
final class FlushRoundsTests: XCTestCase {
    func testEveryCallerIsCoveredByARoundThatStartedAfterItArrivedAndRoundsAreShared() {
        let rounds = FlushRounds()
        let written = Atomic<UInt64>(0)
        // What the last finished round saw when it started (rounds run one at a time).
        let seenByFinished = Atomic<UInt64>(0)
        let violations = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 16) { _ in
            for _ in 0..<200 {
                let mine = written.wrappingAdd(1, ordering: .sequentiallyConsistent).newValue
                let r = rounds.flush {
                    let seen = written.load(ordering: .sequentiallyConsistent)
                    usleep(50)
                    seenByFinished.store(seen, ordering: .sequentiallyConsistent)
                    return 0
                }
                XCTAssertEqual(r, 0)
                let seen = seenByFinished.load(ordering: .sequentiallyConsistent)
                if seen < mine { violations.withLock { $0.append("write \(mine) returned after a round that saw only \(seen)") } }
            }
        }
        XCTAssertEqual(violations.withLock { $0 }.prefix(5), [])
        let (ran, served) = rounds.counts
        XCTAssertEqual(served, 16 * 200)
        XCTAssertLessThan(ran, served, "no round was shared")
        print("flush rounds: \(ran) rounds for \(served) callers")
    }

    func testAFailedRoundFailsItsCallersAndTheNextRoundRunsAfresh() {
        let rounds = FlushRounds()
        XCTAssertEqual(rounds.flush { -5 }, -5)
        XCTAssertEqual(rounds.flush { 0 }, 0)
        XCTAssertEqual(rounds.counts.rounds, 2)
    }

    /// Callers that do not wait (`join`, a FUSE worker's deferred write) mixed with callers that
    /// do (`flush`): every one is answered exactly once, each by a round that started after it
    /// arrived, none is left behind when the rounds stop, and rounds are shared.
    func testCallersThatDoNotWaitAreEachAnsweredOnceByARoundThatStartedAfterThem() {
        let rounds = FlushRounds()
        let written = Atomic<UInt64>(0)
        let seenByRunning = Atomic<UInt64>(0)
        let answered = Atomic<Int>(0)
        let violations = Mutex<[String]>([])
        let all = DispatchGroup()
        let round: @Sendable () -> Int32 = {
            seenByRunning.store(written.load(ordering: .sequentiallyConsistent), ordering: .sequentiallyConsistent)
            usleep(50)
            return 0
        }
        DispatchQueue.concurrentPerform(iterations: 16) { thread in
            for i in 0..<200 {
                let mine = written.wrappingAdd(1, ordering: .sequentiallyConsistent).newValue
                if thread % 4 == 0 && i % 2 == 0 {
                    XCTAssertEqual(rounds.flush(round), 0)
                    let seen = seenByRunning.load(ordering: .sequentiallyConsistent)
                    if seen < mine { violations.withLock { $0.append("flush \(mine) returned after a round that saw \(seen)") } }
                    continue
                }
                all.enter()
                let once = Atomic<Int>(0)
                rounds.join({ r in
                    // The round that answers runs on this thread now: what it saw at its start.
                    let seen = seenByRunning.load(ordering: .sequentiallyConsistent)
                    if seen < mine { violations.withLock { $0.append("join \(mine) answered by a round that saw \(seen)") } }
                    if r != 0 { violations.withLock { $0.append("join \(mine) answered \(r)") } }
                    if once.wrappingAdd(1, ordering: .relaxed).oldValue != 0 {
                        violations.withLock { $0.append("join \(mine) answered twice") }
                    }
                    answered.wrappingAdd(1, ordering: .relaxed)
                    all.leave()
                }, round: round)
            }
        }
        XCTAssertEqual(all.wait(timeout: .now() + 30), .success, "a caller that did not wait was never answered")
        XCTAssertEqual(violations.withLock { $0 }.prefix(5), [])
        XCTAssertEqual(answered.load(ordering: .relaxed), 16 * 200 - 4 * 100)
        let (ran, served) = rounds.counts
        XCTAssertEqual(served, 16 * 200)
        XCTAssertLessThan(ran, served, "no round was shared")
    }

    func testAFailedRoundFailsTheCallersThatDidNotWait() {
        let rounds = FlushRounds()
        let results = Mutex<[Int32]>([])
        rounds.join({ r in results.withLock { $0.append(r) } }, round: { -5 })
        rounds.join({ r in results.withLock { $0.append(r) } }, round: { 0 })
        XCTAssertEqual(results.withLock { $0 }, [-5, 0])
    }
}
