// The engine's control operations that act on running I/O: the snapshot write barrier and QoS
// limits (docs/engine.md, "Snapshots" and "QoS"). Online growth is in VolumeEngine.swift (it
// needs the FUSE session).

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CairnReplica
import Logging
import Synchronization

private func nanoseconds(_ d: Duration) -> UInt64 {
    let (s, atto) = d.components
    guard s >= 0 else { return 0 }
    return UInt64(s) * 1_000_000_000 + UInt64(atto / 1_000_000_000)
}

private func sleepNanoseconds(_ ns: UInt64) {
    var request = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

extension VolumeEngine {
    // MARK: the write barrier

    /// How long a held writer sleeps between looks at the gate. A hold lasts one flush and one
    /// snapshot per replica (milliseconds), so polling is cheaper than a condition variable the
    /// hot path would have to signal.
    static let gatePollNanoseconds: UInt64 = 100_000

    /// Every write, trim and flush passes here. Open gate: two atomic operations, no lock. The
    /// writer registers first and looks second; `holdWrites` closes first and counts second
    /// (both sequentially consistent), so either the holder sees the writer in flight and waits
    /// for it, or the writer sees the hold and backs out.
    @inline(__always)
    func enterGate() {
        while true {
            gatedInFlight.wrappingAdd(1, ordering: .sequentiallyConsistent)
            let deadline = holdDeadline.load(ordering: .sequentiallyConsistent)
            if deadline == 0 { return }
            gatedInFlight.wrappingSubtract(1, ordering: .sequentiallyConsistent)
            waitAtGate(deadline)
        }
    }

    @inline(__always)
    func leaveGate() {
        gatedInFlight.wrappingSubtract(1, ordering: .releasing)
    }

    private func waitAtGate(_ deadline: UInt64) {
        if monotonicNanoseconds() >= deadline {
            lapse(deadline)
        } else {
            sleepNanoseconds(Self.gatePollNanoseconds)
        }
    }

    /// Opens a hold whose deadline passed: its coordinator crashed or forgot to release.
    private func lapse(_ deadline: UInt64) {
        if holdDeadline.compareExchange(expected: deadline, desired: 0, ordering: .sequentiallyConsistent).exchanged {
            logger.warning("a write hold lapsed after its timeout; writes resume (the snapshot coordinator did not release it)")
        }
    }

    /// Holds new writes, trims and flushes (reads go on) and returns once every one in flight has
    /// finished. The hold releases itself after `timeout` (counted from now), so a coordinator
    /// that crashes between hold and release can never freeze the volume. Throws ABORTED when
    /// another hold is in place, UNAVAILABLE (and releases) when the writes in flight do not
    /// finish within the timeout.
    public func holdWrites(timeout: Duration) throws {
        let deadline = monotonicNanoseconds() + max(nanoseconds(timeout), 1)
        while true {
            let current = holdDeadline.load(ordering: .sequentiallyConsistent)
            if current != 0, monotonicNanoseconds() < current {
                throw CairnError.aborted("writes to volume \(volumeID) are already held (another snapshot is in progress); retry")
            }
            if holdDeadline.compareExchange(expected: current, desired: deadline, ordering: .sequentiallyConsistent).exchanged { break }
        }
        while gatedInFlight.load(ordering: .sequentiallyConsistent) > 0 {
            if monotonicNanoseconds() >= deadline {
                releaseWrites()
                throw CairnError.unavailable(
                    "the writes in flight on volume \(volumeID) did not finish within the hold's timeout (\(timeout)); a replica may be stuck — retry")
            }
            sleepNanoseconds(20_000)
        }
    }

    /// Releases the hold (writes resume). Harmless without one.
    public func releaseWrites() {
        holdDeadline.store(0, ordering: .sequentiallyConsistent)
    }

    /// Whether a hold is in place now.
    public var writesHeld: Bool {
        let deadline = holdDeadline.load(ordering: .sequentiallyConsistent)
        return deadline != 0 && monotonicNanoseconds() < deadline
    }

    /// Inside a hold: flushes every in-sync replica and takes snapshot `id` on each (in
    /// parallel). A replica that fails is recorded out of sync exactly like one that fails a
    /// write (it must not serve the snapshot's volume later as if it held the snapshot); the
    /// snapshot succeeds when at least one in-sync replica took it. Returns the node ids that
    /// hold it. Catching-up replicas (resync targets) do not get it.
    public func snapshotReplicas(id: String) throws -> [String] {
        guard writesHeld else {
            throw CairnError.failedPrecondition("snapshot \(id) of volume \(volumeID) needs the writes held first (holdWrites)")
        }
        if fenced.load(ordering: .acquiring) {
            throw CairnError.failedPrecondition("the engine for volume \(volumeID) was fenced (the volume is attached elsewhere); snapshot it there")
        }
        let members = sets.withLock { $0.inSync }
        guard !members.isEmpty else { throw CairnError.unavailable("volume \(volumeID) has no in-sync replica to snapshot") }
        let volumeID = volumeID, epoch = epoch
        let outcomes = Mutex([(any Error)?](repeating: nil, count: members.count))
        FanOut.shared.run(members.count) { i in
            do {
                try members[i].io.flush(volumeID: volumeID, epoch: epoch)
                try members[i].io.snapshot(volumeID: volumeID, snapshotID: id, epoch: epoch)
            } catch {
                outcomes.withLock { $0[i] = error }
            }
        }
        let results = outcomes.withLock { $0 }
        var failures: [(Member, any Error)] = []
        var took: [String] = []
        for (i, member) in members.enumerated() {
            if let error = results[i] { failures.append((member, error)) } else { took.append(member.nodeID) }
        }
        if !failures.isEmpty, !settle(failures, succeeded: took.count, what: "snapshot \(id)") {
            throw CairnError.unavailable(
                "snapshot \(id) of volume \(volumeID) failed (\(failures.map { "\($0.0.nodeID): \($0.1)" }.joined(separator: "; ")))")
        }
        logger.info("volume snapshot taken", metadata: ["snapshot.id": "\(id)", "snapshot.nodes": "\(took)"])
        return took
    }

    /// Takes snapshot `id` on every in-sync replica behind the write barrier: holds writes
    /// (for at most `holdTimeout`), flushes and snapshots each replica, releases. Returns the
    /// node ids that hold the snapshot.
    public func snapshot(id: String, holdTimeout: Duration = .seconds(30)) throws -> [String] {
        let started = monotonicNanoseconds()
        try holdWrites(timeout: holdTimeout)
        defer {
            releaseWrites()
            logger.debug("write barrier released", metadata: [
                "snapshot.id": "\(id)", "barrier.pause_ms": "\(Double(monotonicNanoseconds() - started) / 1e6)"])
        }
        return try snapshotReplicas(id: id)
    }

    // MARK: QoS

    /// Limits the volume's I/O (0 = no limit), effective for the next request; may change while
    /// I/O runs. Reads and writes both count; each FUSE request costs one operation and its
    /// length in bytes (a 1 MiB write: 1 op and 1 MiB). Trims and flushes are not limited.
    public func setLimits(iopsLimit: UInt64, bandwidthLimit: UInt64) {
        limiter.set(iops: iopsLimit, bandwidth: bandwidthLimit)
        logger.info("volume I/O limits set", metadata: ["qos.iops": "\(iopsLimit)", "qos.bandwidth": "\(bandwidthLimit)"])
    }

    public var limits: (iops: UInt64, bandwidth: UInt64) { limiter.limits }
}

/// Two token buckets (operations and bytes) as a virtual clock each (GCRA): a request takes its
/// cost from the clock at once and sleeps until the clock, less the burst allowance, reaches
/// now. Slots are handed out by the clock, not by wake-up times, so late wake-ups of a loaded
/// machine do not lower the rate as long as requests are queued. Unlimited: one relaxed load.
final class IOLimiter: Sendable {
    /// How far ahead of the rate a quiet volume may run (50 ms of its budget).
    static let burstNanoseconds: UInt64 = 50_000_000

    private struct Buckets {
        var iops: UInt64 = 0
        var bandwidth: UInt64 = 0
        /// Virtual clocks (monotonic ns): when the budget spent so far is paid off.
        var opClock: UInt64 = 0
        var byteClock: UInt64 = 0
    }

    private let active = Atomic<Bool>(false)
    private let buckets = Mutex(Buckets())

    var limits: (iops: UInt64, bandwidth: UInt64) { buckets.withLock { ($0.iops, $0.bandwidth) } }

    func set(iops: UInt64, bandwidth: UInt64) {
        buckets.withLock { b in
            b.iops = iops
            b.bandwidth = bandwidth
            // Debt under the old limits is forgiven: the new ones start from now.
            let now = monotonicNanoseconds()
            b.opClock = now
            b.byteClock = now
        }
        active.store(iops > 0 || bandwidth > 0, ordering: .releasing)
    }

    /// Waits as long as the limits say; returns the nanoseconds waited.
    @inline(__always)
    func admit(bytes: Int) -> UInt64 {
        guard active.load(ordering: .relaxed) else { return 0 }
        return admitLimited(bytes: bytes)
    }

    private func admitLimited(bytes: Int) -> UInt64 {
        let wait: UInt64 = buckets.withLock { b in
            let now = monotonicNanoseconds()
            var wait: UInt64 = 0
            func take(_ clock: inout UInt64, cost: UInt64) {
                clock = max(clock, now) &+ cost
                if clock > now &+ Self.burstNanoseconds { wait = max(wait, clock - now - Self.burstNanoseconds) }
            }
            if b.iops > 0 { take(&b.opClock, cost: 1_000_000_000 / b.iops) }
            if b.bandwidth > 0 {
                take(&b.byteClock, cost: UInt64((Double(bytes) * 1e9 / Double(b.bandwidth)).rounded(.up)))
            }
            return wait
        }
        if wait > 0 { sleepNanoseconds(wait) }
        return wait
    }
}
