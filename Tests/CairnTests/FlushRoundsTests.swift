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
}
