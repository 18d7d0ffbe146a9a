#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CairnReplica
import Dispatch
import Foundation
import Logging
import Synchronization

// Recovery (docs/recovery.md): the engine of the attached node brings out-of-sync replicas
// back (delta resync: Resync.swift runs what ResyncPlan.swift lists), repairs corrupted blocks
// from another in-sync replica (on read: Repair.swift; in the background: Scrub.swift), and
// picks up replicas the controller re-created elsewhere. Here: what recovery needs from the
// store, the node's throttle, the per-engine recovery thread, and membership changes.

/// What the engine needs from the store and the node to recover replicas.
public struct EngineRecovery: Sendable {
    /// The volume's replicas as the store has them now, in sync or not (a re-replicated volume
    /// has a new one in place of the old). Called every `membershipInterval`.
    public var membership: @Sendable () throws -> [EngineReplica]
    /// One store transaction, conditional on the engine's epoch: the replica is in sync again.
    /// Throwing `EngineFenced` (or any fencing signal) says the epoch moved on.
    public var markInSync: @Sendable (_ nodeID: String) throws -> Void
    /// Best effort: the resync's progress for the record (nil once it is over).
    public var reportProgress: @Sendable (_ nodeID: String, _ progress: ResyncReport?) -> Void
    /// The node's resync bandwidth limit, shared by every engine on the node.
    public var throttle: ResyncThrottle
    /// Seconds before an unreachable or failed target is tried again (doubling up to 8×).
    public var retryInterval: Double
    public var membershipInterval: Double
    /// Bytes per second the scrub verifies on each in-sync replica; 0 = no scrub.
    public var scrubBytesPerSecond: UInt64
    /// Seconds between progress lines in the log (and progress records in the store).
    public var progressInterval: Double
    /// Best effort, must not block: an event for the status page (a repair, this engine fenced).
    public var report: @Sendable (ClusterEvent) -> Void = { _ in }

    public init(membership: @escaping @Sendable () throws -> [EngineReplica],
                markInSync: @escaping @Sendable (_ nodeID: String) throws -> Void,
                reportProgress: @escaping @Sendable (_ nodeID: String, _ progress: ResyncReport?) -> Void,
                throttle: ResyncThrottle, retryInterval: Double = 5, membershipInterval: Double = 2,
                scrubBytesPerSecond: UInt64 = 0, progressInterval: Double = 2) {
        self.membership = membership
        self.markInSync = markInSync
        self.reportProgress = reportProgress
        self.throttle = throttle
        self.retryInterval = retryInterval
        self.membershipInterval = membershipInterval
        self.scrubBytesPerSecond = scrubBytesPerSecond
        self.progressInterval = progressInterval
    }
}

/// A resync's progress, as the engine reports it.
public struct ResyncReport: Sendable, Equatable {
    public enum Phase: String, Sendable {
        /// Comparing block generations with the source.
        case diff
        /// Copying the blocks that differ.
        case copy
        /// Flushing the target and recording it in sync.
        case joining
        /// The last attempt failed; waiting to try again (`lastError` says why).
        case waiting
    }

    public var nodeID: String
    public var source: String
    public var phase: Phase
    /// Bytes to copy: exact for the part diffed so far, 1 MiB per differing region beyond it.
    public var bytesTotal: UInt64
    public var bytesDone: UInt64
    public var bytesPerSecond: UInt64
    public var startedAt: Date
    public var lastError: String?

    public var percent: Double { bytesTotal == 0 ? 100 : min(100, Double(bytesDone) * 100 / Double(bytesTotal)) }
    public var etaSeconds: Double? {
        guard bytesPerSecond > 0, bytesTotal >= bytesDone else { return nil }
        return Double(bytesTotal - bytesDone) / Double(bytesPerSecond)
    }
}

/// A token bucket over bytes, shared by the resyncs of one node: `take` sleeps long enough that
/// the long-run rate stays at `bytesPerSecond` (0 = unlimited), with bursts of at most 100 ms
/// worth of bytes.
public final class ResyncThrottle: Sendable {
    public let bytesPerSecond: UInt64
    /// Monotonic seconds at which the bytes taken so far are paid for.
    private let paidUntil = Mutex<Double>(0)

    public init(bytesPerSecond: UInt64) {
        self.bytesPerSecond = bytesPerSecond
    }

    public func take(_ bytes: Int) {
        guard bytesPerSecond > 0, bytes > 0 else { return }
        let now = monotonicSeconds()
        let wait = paidUntil.withLock { paid in
            paid = max(paid, now - 0.1) + Double(bytes) / Double(bytesPerSecond)
            return paid - now
        }
        if wait > 0 { usleep(useconds_t(min(wait, 10) * 1_000_000)) }
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Why a resync stopped before the replica rejoined.
struct ResyncAborted: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The engine's recovery thread: polls the membership, resyncs out-of-sync replicas one at a
/// time (with backoff after a failure) and scrubs the in-sync ones between resyncs.
final class RecoveryDriver: @unchecked Sendable {
    private unowned let engine: VolumeEngine
    private let recovery: EngineRecovery
    private let stopping = Atomic<Bool>(false)
    private let done = DispatchSemaphore(value: 0)
    // Touched only by the driver thread.
    private var retryAt: [String: (at: Double, failures: Int)] = [:]
    private var nextPoll: Double = 0
    private var scrubCursor: UInt64 = 0
    private var scrubPassRepairs: UInt64 = 0
    /// The engine's count of application I/Os at the last scrub step (`foregroundOperations`).
    private var foregroundAtLastStep: UInt64 = 0
    private var settledThrough: UInt64 = 0

    init(engine: VolumeEngine, recovery: EngineRecovery) {
        self.engine = engine
        self.recovery = recovery
        let thread = Thread { [self] in
            self.run()
            self.done.signal()
        }
        thread.name = "cairn-recovery"
        thread.start()
    }

    var isStopping: Bool { stopping.load(ordering: .relaxed) }

    /// Stops the thread and waits for it (a resync in progress gives up its target).
    func stop() {
        stopping.store(true, ordering: .relaxed)
        engine.abortCatchingUp("the engine is stopping")
        done.wait()
    }

    private func run() {
        while !isStopping && !engine.fenced.load(ordering: .relaxed) {
            let now = monotonicSeconds()
            if now >= nextPoll {
                nextPoll = now + recovery.membershipInterval
                engine.refreshMembership(recovery)
                settledThrough = engine.settleActivity(after: settledThrough)
            }
            if let target = nextTarget(now: now) {
                do {
                    try engine.resync(target, recovery: recovery, driver: self)
                    retryAt[target.nodeID] = nil
                } catch {
                    let failures = (retryAt[target.nodeID]?.failures ?? 0) + 1
                    // Doubling, up to 8× the interval: a node that comes back is found within that.
                    let delay = recovery.retryInterval * pow(2, Double(min(failures - 1, 3)))
                    retryAt[target.nodeID] = (monotonicSeconds() + delay, failures)
                    if !isStopping {
                        engine.resyncFailed(target, error: error, retryIn: delay, recovery: recovery)
                    }
                }
                continue
            }
            if recovery.scrubBytesPerSecond > 0 {
                scrubStep()
            } else {
                pause(0.2)
            }
        }
    }

    /// Sleeps up to `seconds`, returning early when stopping.
    func pause(_ seconds: Double) {
        var left = seconds
        while left > 0 && !isStopping {
            let step = min(left, 0.1)
            usleep(useconds_t(step * 1_000_000))
            left -= step
        }
    }

    private func nextTarget(now: Double) -> EngineReplica? {
        let candidates = engine.sets.withLock { s in
            s.known.filter { r in s.outOfSync[r.nodeID] != nil && !s.catchingUp.contains { $0.nodeID == r.nodeID } }
        }
        return candidates.first { (retryAt[$0.nodeID]?.at ?? 0) <= now }
    }

    /// Chunks verified per step on an idle volume, and on one serving I/O.
    static let scrubChunkBlocks = 256
    static let busyScrubChunkBlocks = 64
    /// A volume that served I/O since the last step is scrubbed this many times slower.
    static let busyScrubSlowdown: UInt64 = 8

    /// Verifies the next chunk of every in-sync replica, repairs what is bad, then sleeps so
    /// that the scrub stays at its rate. Background reads share the disks with the application,
    /// and a 1 MiB verify read queued ahead of a commit's flush adds its whole service time to
    /// that commit: while the volume serves I/O the scrub yields — chunks of 256 KiB at an
    /// eighth of the rate (a busy volume is still verified, slowly); idle, it goes at full rate.
    private func scrubStep() {
        let foreground = engine.foregroundOperations
        let busy = foreground != foregroundAtLastStep
        foregroundAtLastStep = foreground
        let chunkBlocks = busy ? Self.busyScrubChunkBlocks : Self.scrubChunkBlocks
        let rate = busy ? max(recovery.scrubBytesPerSecond / Self.busyScrubSlowdown, 1) : recovery.scrubBytesPerSecond
        let blocks = engine.sizeBytes / UInt64(VolumeEngine.blockSize)
        if scrubCursor >= blocks {
            engine.scrubPasses.wrappingAdd(1, ordering: .relaxed)
            engine.logger.info("scrub pass complete", metadata: [
                "blocks": "\(blocks)", "repaired": "\(scrubPassRepairs)"])
            scrubCursor = 0
            scrubPassRepairs = 0
        }
        let first = scrubCursor
        let count = Int(min(UInt64(chunkBlocks), blocks - first))
        scrubCursor += UInt64(count)
        let started = monotonicSeconds()
        scrubPassRepairs += engine.scrub(firstBlock: first, count: count)
        engine.scrubbed.wrappingAdd(UInt64(count), ordering: .relaxed)
        if busy { engine.scrubbedWhileBusy.wrappingAdd(UInt64(count), ordering: .relaxed) }
        let budget = Double(count * VolumeEngine.blockSize) / Double(rate)
        pause(budget - (monotonicSeconds() - started))
    }
}

extension VolumeEngine {
    static let regionBlocks = 256
    static let maxSummaryCount = 4096
    static let maxGenerationsCount = 65_536
    static let copyRunBlocks = 256
    /// The target is flushed every this many bytes copied, so a resync interrupted by a crash of
    /// the target resumes from about there.
    static let flushEveryBytes: UInt64 = 256 << 20

    // MARK: Membership

    /// Changes the member sets, then waits until every write or trim that read the sets before
    /// the change has finished: after it returns, every I/O in flight sees the new sets.
    func changeMembers<T>(_ body: (inout Sets) -> T) -> T {
        let (result, parity) = sets.withLock { s in
            let result = body(&s)
            let parity = s.version & 1
            s.version += 1
            return (result, parity)
        }
        while (parity == 0 ? inflightEven.load(ordering: .acquiring) : inflightOdd.load(ordering: .acquiring)) != 0 {
            usleep(100)
        }
        return result
    }

    /// Makes every catching-up replica's resync stop (its next check sees the failure).
    func abortCatchingUp(_ reason: String) {
        let catching = sets.withLock { $0.catchingUp }
        for member in catching { member.catchUpFailure.withLock { $0 = $0 ?? reason } }
    }

    /// Reads the store's replica list: new replicas (re-created elsewhere by the controller)
    /// become resync targets; replicas no longer listed are forgotten.
    func refreshMembership(_ recovery: EngineRecovery) {
        let current: [EngineReplica]
        do {
            current = try recovery.membership()
        } catch {
            logger.notice("cannot read the volume's replicas from the store; keeping the last known list",
                          metadata: ["error": "\(error)"])
            return
        }
        guard !current.isEmpty else { return }
        var added: [String] = [], dropped: [String] = []
        sets.withLock { s in
            let ids = Set(current.map(\.nodeID))
            for replica in current where !s.known.contains(where: { $0.nodeID == replica.nodeID }) {
                added.append(replica.nodeID)
                if !s.inSync.contains(where: { $0.nodeID == replica.nodeID }) {
                    s.outOfSync[replica.nodeID] = replica.inSync
                        ? "listed in sync by the store but not served by this engine"
                        : "new replica: full copy pending"
                }
            }
            for replica in s.known where !ids.contains(replica.nodeID) {
                // The controller replaced it (it recorded it out of sync first, so acknowledged
                // writes never depended on it alone): stop sending it anything — but never
                // drop the last in-sync replica.
                if s.inSync.contains(where: { $0.nodeID == replica.nodeID }) {
                    guard s.inSync.count > 1 else { continue }
                    s.inSync.removeAll { $0.nodeID == replica.nodeID }
                }
                dropped.append(replica.nodeID)
                s.outOfSync[replica.nodeID] = nil
                for member in s.catchingUp where member.nodeID == replica.nodeID {
                    member.catchUpFailure.withLock { $0 = $0 ?? "the replica was removed from the volume" }
                }
            }
            s.known = current
        }
        if !added.isEmpty || !dropped.isEmpty {
            logger.info("the volume's replica list changed in the store", metadata: [
                "replicas.added": "\(added)", "replicas.dropped": "\(dropped)"])
        }
    }
}
