import CairnCore
import XCTest

/// When a process gives its freed heap back (`IdleHeapTrimPolicy`): only after the idle time
/// with almost no CPU, once per idle spell, and again only after work.
final class IdleHeapTrimPolicyTests: XCTestCase {
    private let second: UInt64 = 1_000_000_000

    /// Feeds samples every 5 s; `busy(t)` says how much CPU (ns) each interval used.
    private func run(_ policy: inout IdleHeapTrimPolicy, from start: UInt64, seconds: UInt64, cpu: inout UInt64,
                     perInterval: UInt64) -> [UInt64] {
        var trims: [UInt64] = []
        for t in stride(from: start, through: start + seconds, by: 5) {
            cpu += perInterval
            if policy.sample(time: t * second, cpu: cpu) { trims.append(t) }
        }
        return trims
    }

    func testAProcessIdleForTheIdleTimeAfterWorkIsTrimmedOnce() {
        var policy = IdleHeapTrimPolicy(idleNanoseconds: 30 * second)
        var cpu: UInt64 = 0
        // Busy: a whole CPU for a minute.
        XCTAssertEqual(run(&policy, from: 0, seconds: 60, cpu: &cpu, perInterval: 5 * second), [])
        // Idle: 10 ms of CPU per 5 s (0.2%). The window must first hold no busy interval.
        let idle = run(&policy, from: 65, seconds: 120, cpu: &cpu, perInterval: 10_000_000)
        XCTAssertEqual(idle.count, 1, "one trim per idle spell")
        XCTAssertEqual(idle.first ?? 0, 90, "30 s after the last busy interval, not before")
        // Work again, then idle again: trimmed again.
        XCTAssertEqual(run(&policy, from: 190, seconds: 20, cpu: &cpu, perInterval: 2 * second), [])
        let again = run(&policy, from: 215, seconds: 60, cpu: &cpu, perInterval: 10_000_000)
        XCTAssertEqual(again.count, 1)
    }

    func testAProcessThatNeverRestsIsNeverTrimmed() {
        var policy = IdleHeapTrimPolicy(idleNanoseconds: 30 * second)
        var cpu: UInt64 = 0
        // 5% of a CPU all along: above the 2% that counts as idle.
        XCTAssertEqual(run(&policy, from: 0, seconds: 600, cpu: &cpu, perInterval: 250_000_000), [])
    }

    func testAShortPauseIsNotAnIdleSpell() {
        var policy = IdleHeapTrimPolicy(idleNanoseconds: 30 * second)
        var cpu: UInt64 = 0
        var trims: [UInt64] = []
        // 20 s idle, then 5 s busy, over and over: never 30 s idle.
        for cycle in UInt64(0)..<10 {
            trims += run(&policy, from: cycle * 25, seconds: 15, cpu: &cpu, perInterval: 1_000_000)
            cpu += 4 * second
            if policy.sample(time: (cycle * 25 + 20) * second, cpu: cpu) { trims.append(cycle * 25 + 20) }
        }
        XCTAssertEqual(trims, [])
    }

    func testAProcessIdleFromItsStartIsTrimmedOnceForItsStartUp() {
        var policy = IdleHeapTrimPolicy(idleNanoseconds: 30 * second)
        var cpu: UInt64 = 0
        XCTAssertEqual(run(&policy, from: 0, seconds: 300, cpu: &cpu, perInterval: 1_000_000), [30])
    }
}
