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
// back (delta resync), repairs corrupted blocks from another in-sync replica (on read and by a
// background scrub), and picks up replicas the controller re-created elsewhere.

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

    /// Verifies the next chunk of every in-sync replica, repairs what is bad, then sleeps so
    /// that the scrub stays at its rate.
    private func scrubStep() {
        let chunkBlocks = 256
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
        let budget = Double(count * VolumeEngine.blockSize) / Double(recovery.scrubBytesPerSecond)
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

    // MARK: Delta resync

    /// Brings `replica` back into the in-sync set (docs/recovery.md, "Delta resync"): claim it,
    /// add it to the fan-out as catching up, copy the blocks whose generations differ from the
    /// source's, then — flushed — record it in sync in one store transaction.
    func resync(_ replica: EngineReplica, recovery: EngineRecovery, driver: RecoveryDriver) throws {
        let started = Date()
        let io: any ReplicaIO
        let status: ReplicaStatus
        do {
            io = try connect(replica)
        } catch {
            throw ResyncAborted("cannot connect: \(error)")
        }
        do {
            status = try io.claim(volumeID: volumeID, epoch: epoch)
        } catch {
            io.close()
            if isFencing(error) { fence(by: replica.nodeID, error: error) }
            throw ResyncAborted("cannot claim it with epoch \(epoch): \(error)")
        }
        let wanted = max(sizeBytes, replicaSize.load(ordering: .relaxed))
        if status.size < wanted {
            // The target missed an online growth while it was away (or an expansion that was
            // cut off grew the others): it catches up on that too.
            do {
                try io.grow(volumeID: volumeID, sizeBytes: wanted, epoch: epoch)
            } catch {
                io.close()
                throw ResyncAborted("it holds \(status.size) bytes, less than the \(wanted) the other replicas hold, and cannot grow: \(error)")
            }
        }
        let member = Member(replica: replica, io: io)
        let wireBefore = io.wireBytes
        // From here every new write and trim reaches the target; `reserved` is a generation no
        // write uses, above everything the target holds: a target block newer than the source's
        // (its own unacknowledged write from before it left) is replaced at `reserved`.
        let reserved: UInt64 = changeMembers { s in
            s.catchingUp.append(member)
            var current = generation.load(ordering: .relaxed)
            while current < status.highestGeneration {
                let (exchanged, original) = generation.compareExchange(
                    expected: current, desired: status.highestGeneration, ordering: .relaxed)
                if exchanged { break }
                current = original
            }
            return generation.wrappingAdd(1, ordering: .relaxed).newValue
        }
        func giveUp() {
            sets.withLock { s in s.catchingUp.removeAll { $0 === member } }
            io.close()
        }
        guard let source = sets.withLock({ $0.inSync.first }) else {
            giveUp()
            throw ResyncAborted("no in-sync replica to copy from")
        }
        var progress = ResyncReport(nodeID: replica.nodeID, source: source.nodeID, phase: .diff, bytesTotal: 0,
                                    bytesDone: 0, bytesPerSecond: 0, startedAt: started)
        var reporter = ProgressReporter(engine: self, recovery: recovery)
        reporter.update(progress, force: true)
        logger.info("resync started", metadata: [
            "replica.node": "\(replica.nodeID)", "source": "\(source.nodeID)",
            "target.generation": "\(status.highestGeneration)", "reserved.generation": "\(reserved)"])

        func check() throws {
            if driver.isStopping { throw ResyncAborted("the engine is stopping") }
            if fenced.load(ordering: .relaxed) { throw ResyncAborted("the engine was fenced") }
            if let failure = member.catchUpFailure.withLock({ $0 }) { throw ResyncAborted(failure) }
        }

        var copiedBlocks: UInt64 = 0
        do {
            let blocks = sizeBytes / UInt64(Self.blockSize)
            let regions = (blocks + UInt64(Self.regionBlocks) - 1) / UInt64(Self.regionBlocks)
            // Summaries first (cheap): which regions differ at all.
            var differing: [UInt64] = []
            var region: UInt64 = 0
            while region < regions {
                try check()
                let count = Int(min(UInt64(Self.maxSummaryCount), regions - region))
                let a = try source.io.generationSummary(volumeID: volumeID, firstRegion: region, count: count, epoch: epoch)
                let b = try io.generationSummary(volumeID: volumeID, firstRegion: region, count: count, epoch: epoch)
                for i in 0..<count where a[i] != b[i] { differing.append(region + UInt64(i)) }
                region += UInt64(count)
            }
            let regionBytes = UInt64(Self.regionBlocks * Self.blockSize)
            progress.bytesTotal = UInt64(differing.count) * regionBytes
            progress.phase = .copy
            reporter.update(progress, force: true)
            var sinceFlush: UInt64 = 0
            var index = 0
            var exactSoFar: UInt64 = 0
            var rateWindow = (at: monotonicSeconds(), bytes: UInt64(0))
            // Runs of consecutive differing regions, up to `maxGenerationsCount` blocks each.
            while index < differing.count {
                var end = index + 1
                while end < differing.count && differing[end] == differing[end - 1] + 1
                        && (end - index) * Self.regionBlocks < Self.maxGenerationsCount { end += 1 }
                let firstBlock = differing[index] * UInt64(Self.regionBlocks)
                let count = Int(min(UInt64((end - index) * Self.regionBlocks), blocks - firstBlock))
                try check()
                let plan = try diff(source: source, target: io, firstBlock: firstBlock, count: count, reserved: reserved)
                exactSoFar += plan.reduce(0) { $0 + UInt64($1.count * Self.blockSize) }
                progress.bytesTotal = exactSoFar + UInt64(differing.count - end) * regionBytes + 0
                progress.bytesTotal = max(progress.bytesTotal, progress.bytesDone)
                for run in plan {
                    try check()
                    let bytes = run.count * Self.blockSize
                    let offset = run.firstBlock * UInt64(Self.blockSize)
                    if run.trimmed {
                        _ = try io.trimIfNewer(volumeID: volumeID, offset: offset, length: UInt64(bytes),
                                               generation: run.generation, epoch: epoch)
                    } else {
                        recovery.throttle.take(bytes)
                        try check()
                        try withCopyBuffer(bytes) { buffer in
                            try source.io.read(volumeID: volumeID, offset: offset, into: buffer, epoch: epoch)
                            _ = try io.writeIfNewer(volumeID: volumeID, offset: offset, data: UnsafeRawBufferPointer(buffer),
                                                    generation: run.generation, epoch: epoch)
                        }
                        sinceFlush += UInt64(bytes)
                    }
                    copiedBlocks += UInt64(run.count)
                    progress.bytesDone += UInt64(bytes)
                    let now = monotonicSeconds()
                    if now - rateWindow.at >= 1 {
                        progress.bytesPerSecond = UInt64(Double(progress.bytesDone - rateWindow.bytes) / (now - rateWindow.at))
                        rateWindow = (now, progress.bytesDone)
                    }
                    reporter.update(progress)
                    if sinceFlush >= Self.flushEveryBytes {
                        try io.flush(volumeID: volumeID, epoch: epoch)
                        sinceFlush = 0
                    }
                }
                index = end
            }
            // Blocks a repair could not rewrite (equal generations, bad data): copied over at
            // `reserved`, above the damaged copy's generation and below every later write.
            let damagedBlocks = sets.withLock { $0.damaged[replica.nodeID] ?? [] }.sorted()
            for block in damagedBlocks {
                try check()
                recovery.throttle.take(Self.blockSize)
                let offset = block * UInt64(Self.blockSize)
                try withCopyBuffer(Self.blockSize) { buffer in
                    try source.io.read(volumeID: volumeID, offset: offset, into: buffer, epoch: epoch)
                    _ = try io.writeIfNewer(volumeID: volumeID, offset: offset, data: UnsafeRawBufferPointer(buffer),
                                            generation: reserved, epoch: epoch)
                }
                copiedBlocks += 1
            }
            progress.bytesTotal = progress.bytesDone
            progress.phase = .joining
            reporter.update(progress, force: true)
            try check()
        } catch {
            giveUp()
            progress.lastError = "\(error)"
            throw error
        }

        // Rejoin: the target becomes a full member (its failures now fail writes), every I/O
        // that saw it as catching up has finished, it is flushed, and one store transaction —
        // serialized with a concurrent failure of it by `recordedOut` — records it in sync.
        changeMembers { s in
            s.catchingUp.removeAll { $0 === member }
            s.inSync.append(member)
        }
        func leaveInSyncSet() {
            sets.withLock { s in s.inSync.removeAll { $0 === member } }
            io.close()
        }
        do {
            if let failure = member.catchUpFailure.withLock({ $0 }) { throw ResyncAborted(failure) }
            try io.flush(volumeID: volumeID, epoch: epoch)
            try member.recordedOut.withLock { recorded in
                if recorded { throw ResyncAborted("it failed while joining") }
                do {
                    try recovery.markInSync(replica.nodeID)
                } catch {
                    if isFencing(error) { fence(by: "the store", error: error) }
                    throw ResyncAborted("the store did not record it in sync: \(error)")
                }
            }
        } catch {
            // Still out of sync in the store: acknowledged writes never depended on it.
            if !member.recordedOut.withLock({ $0 }) { leaveInSyncSet() }
            throw error
        }
        sets.withLock { s in
            s.outOfSync[replica.nodeID] = nil
            s.resync = nil
            s.damaged[replica.nodeID] = nil
            if replica.nodeID == localNodeID, let i = s.inSync.firstIndex(where: { $0 === member }) {
                s.inSync.remove(at: i)
                s.inSync.insert(member, at: 0)
            }
            if let i = s.known.firstIndex(where: { $0.nodeID == replica.nodeID }) { s.known[i].inSync = true }
        }
        recovery.reportProgress(replica.nodeID, nil)
        // Compared whole against the source: whatever it had before a restart is settled.
        _ = try? io.activity(volumeID: volumeID, cleanThrough: 0, converged: true, epoch: epoch)
        let wire = io.wireBytes
        let seconds = Date().timeIntervalSince(started)
        logger.info("resync complete: the replica is in sync again", metadata: [
            "replica.node": "\(replica.nodeID)", "source": "\(source.nodeID)",
            "copied.blocks": "\(copiedBlocks)", "copied.bytes": "\(copiedBlocks * UInt64(Self.blockSize))",
            "wire.sent": "\(wire.sent &- wireBefore.sent)", "wire.received": "\(wire.received &- wireBefore.received)",
            "seconds": "\(String(format: "%.1f", seconds))"])
    }

    func resyncFailed(_ replica: EngineReplica, error: any Error, retryIn: Double, recovery: EngineRecovery) {
        let report: ResyncReport? = sets.withLock { s in
            guard var r = s.resync, r.nodeID == replica.nodeID else { return nil }
            r.phase = .waiting
            r.lastError = "\(error)"
            s.resync = r
            return r
        }
        if let report { recovery.reportProgress(replica.nodeID, report) }
        logger.warning("resync stopped; it will be tried again", metadata: [
            "replica.node": "\(replica.nodeID)", "error": "\(error)",
            "retry.seconds": "\(String(format: "%.0f", retryIn))"])
    }

    /// One run of blocks to copy: consecutive, same generation to carry, all data or all trims.
    struct CopyRun: Equatable {
        var firstBlock: UInt64
        var count: Int
        var generation: UInt64
        var trimmed: Bool
    }

    /// Compares the generations of `count` blocks from `firstBlock` and lists what to copy.
    ///
    /// A block is copied when the two differ: at the source's generation when the source's is
    /// newer; at `reserved` when the target's is newer but not above `reserved` (the target's
    /// own write that was never acknowledged: replaced by the source's version). A target block
    /// above `reserved` came from a write after the resync began and is left alone.
    func diff(source: Member, target: any ReplicaIO, firstBlock: UInt64, count: Int, reserved: UInt64) throws -> [CopyRun] {
        let a = try source.io.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
        let b = try target.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
        return Self.plan(source: a, target: b, firstBlock: firstBlock, reserved: reserved)
    }

    static func plan(source a: [UInt64], target b: [UInt64], firstBlock: UInt64, reserved: UInt64) -> [CopyRun] {
        var runs: [CopyRun] = []
        for i in 0..<min(a.count, b.count) where a[i] != b[i] {
            let sourceGeneration = BlockGenerations.generation(a[i])
            let targetGeneration = BlockGenerations.generation(b[i])
            let carry: UInt64
            if sourceGeneration > targetGeneration {
                carry = sourceGeneration
            } else if targetGeneration < reserved {
                carry = reserved
            } else {
                continue
            }
            // Never-written source blocks are copied as trims: they read as zeros.
            let trimmed = a[i] & BlockGenerations.trimmedBit != 0 || sourceGeneration == 0
            let block = firstBlock + UInt64(i)
            if var last = runs.last, last.firstBlock + UInt64(last.count) == block, last.generation == carry,
               last.trimmed == trimmed, last.count < copyRunBlocks {
                last.count += 1
                runs[runs.count - 1] = last
            } else {
                runs.append(CopyRun(firstBlock: block, count: 1, generation: carry, trimmed: trimmed))
            }
        }
        return runs
    }

    private func withCopyBuffer<T>(_ bytes: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: Self.blockSize)
        defer { buffer.deallocate() }
        return try body(buffer)
    }

    // MARK: Repair and scrub

    /// A read found corrupted data on `damaged`: read the same blocks from another in-sync
    /// replica into `buffer` (answering the read), then rewrite the bad blocks on `damaged`.
    /// 0, or -EIO when no replica holds a good copy.
    func readRepairing(damaged: Member, error: any Error, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Int32 {
        let firstBlock = offset / UInt64(Self.blockSize)
        let count = buffer.count / Self.blockSize
        logger.error("corrupted data detected on read; reading it from another replica", metadata: [
            "replica.node": "\(damaged.nodeID)", "offset": "\(offset)", "error": "\(error)"])
        var tried: [ObjectIdentifier] = [ObjectIdentifier(damaged)]
        while true {
            guard let good = sets.withLock({ s in s.inSync.first { !tried.contains(ObjectIdentifier($0)) } }) else {
                unrepairable.wrappingAdd(UInt64(count), ordering: .relaxed)
                logger.critical("no in-sync replica holds a good copy of these blocks; the read fails with EIO", metadata: [
                    "offset": "\(offset)", "length": "\(buffer.count)", "damaged": "\(damaged.nodeID)"])
                return -EIO
            }
            tried.append(ObjectIdentifier(good))
            do {
                // Generations before data: a write racing with this read lands at a higher
                // generation, so repairing at the generation read first never undoes it.
                let generations = try good.io.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
                try good.io.read(volumeID: volumeID, offset: offset, into: buffer, epoch: epoch)
                repair(damaged, firstBlock: firstBlock, generations: generations,
                       data: UnsafeRawBufferPointer(buffer), from: good, reason: "read")
                return 0
            } catch where damagedBlock(error) != nil && !isFencing(error) {
                logger.error("the other replica's copy is corrupted too", metadata: ["replica.node": "\(good.nodeID)"])
                continue
            } catch {
                if !settle([(good, error)], succeeded: 0, what: "read at offset \(offset)", allowIfNoneSucceeded: true) {
                    return -EIO
                }
            }
        }
    }

    /// Rewrites the blocks of `damaged` in the range that do not verify with the good data
    /// (`data`, `generations` from `good`). Returns the blocks repaired. A replica that cannot
    /// take the repair is recorded out of sync (its resync then replaces its copy).
    @discardableResult
    func repair(_ damaged: Member, firstBlock: UInt64, generations: [UInt64], data: UnsafeRawBufferPointer,
                from good: Member, reason: String) -> UInt64 {
        do {
            let bad = try damaged.io.verify(volumeID: volumeID, firstBlock: firstBlock, count: generations.count, epoch: epoch)
            var repairedHere: UInt64 = 0
            for block in bad {
                let i = Int(block - firstBlock)
                guard i >= 0, i < generations.count else { continue }
                let generation = BlockGenerations.generation(generations[i])
                let slice = UnsafeRawBufferPointer(rebasing: data[(i * Self.blockSize)..<((i + 1) * Self.blockSize)])
                if generation == 0 || generations[i] & BlockGenerations.trimmedBit != 0 {
                    // The good copy reads as zeros: the block was trimmed or never written.
                    _ = try damaged.io.repairWrite(volumeID: volumeID, offset: block * UInt64(Self.blockSize), data: slice,
                                                   generation: max(generation, 1), epoch: epoch)
                } else {
                    _ = try damaged.io.repairWrite(volumeID: volumeID, offset: block * UInt64(Self.blockSize), data: slice,
                                                   generation: generation, epoch: epoch)
                }
                repairedHere += 1
                logger.warning("repaired a corrupted block from another replica", metadata: [
                    "replica.node": "\(damaged.nodeID)", "block": "\(block)", "generation": "\(generation)",
                    "source": "\(good.nodeID)", "found.by": "\(reason)"])
            }
            repaired.wrappingAdd(repairedHere, ordering: .relaxed)
            return repairedHere
        } catch {
            if isFencing(error) {
                fence(by: damaged.nodeID, error: error)
                return 0
            }
            logger.error("cannot repair the replica's corrupted blocks; recording it out of sync so that it is rebuilt", metadata: [
                "replica.node": "\(damaged.nodeID)", "error": "\(error)"])
            sets.withLock { s in
                for i in generations.indices { s.damaged[damaged.nodeID, default: []].insert(firstBlock + UInt64(i)) }
            }
            _ = recordOutOfSync(damaged, reason: "corrupted blocks could not be repaired: \(error)")
            return 0
        }
    }

    /// Verifies blocks `firstBlock ..< firstBlock+count` on every in-sync replica and repairs
    /// what is bad from another one. Returns the blocks repaired.
    func scrub(firstBlock: UInt64, count: Int) -> UInt64 {
        let members = sets.withLock { $0.inSync }
        var total: UInt64 = 0
        for member in members {
            let bad: [UInt64]
            do {
                bad = try member.io.verify(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
            } catch {
                if isFencing(error) { fence(by: member.nodeID, error: error); return total }
                logger.notice("scrub could not verify a replica", metadata: ["replica.node": "\(member.nodeID)", "error": "\(error)"])
                continue
            }
            guard !bad.isEmpty else { continue }
            logger.error("scrub found corrupted blocks", metadata: ["replica.node": "\(member.nodeID)", "blocks": "\(bad)"])
            for block in bad {
                total += repairBlock(member, block: block, others: members.filter { $0 !== member })
            }
        }
        return total
    }

    private func repairBlock(_ damaged: Member, block: UInt64, others: [Member]) -> UInt64 {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.blockSize, alignment: Self.blockSize)
        defer { buffer.deallocate() }
        for good in others {
            do {
                let generations = try good.io.generations(volumeID: volumeID, firstBlock: block, count: 1, epoch: epoch)
                try good.io.read(volumeID: volumeID, offset: block * UInt64(Self.blockSize), into: buffer, epoch: epoch)
                return repair(damaged, firstBlock: block, generations: generations, data: UnsafeRawBufferPointer(buffer),
                              from: good, reason: "scrub")
            } catch {
                continue
            }
        }
        unrepairable.wrappingAdd(1, ordering: .relaxed)
        logger.critical("no in-sync replica holds a good copy of a corrupted block", metadata: [
            "replica.node": "\(damaged.nodeID)", "block": "\(block)"])
        return 0
    }
}

/// Publishes a resync's progress: into the engine's state at once, to the log and the store
/// every `progressInterval`.
struct ProgressReporter {
    let engine: VolumeEngine
    let recovery: EngineRecovery
    var last: Double = 0

    init(engine: VolumeEngine, recovery: EngineRecovery) {
        self.engine = engine
        self.recovery = recovery
    }

    mutating func update(_ report: ResyncReport, force: Bool = false) {
        engine.sets.withLock { $0.resync = report }
        let now = monotonicSeconds()
        guard force || now - last >= recovery.progressInterval else { return }
        last = now
        recovery.reportProgress(report.nodeID, report)
        engine.logger.info("resync progress", metadata: [
            "replica.node": "\(report.nodeID)", "phase": "\(report.phase.rawValue)",
            "bytes.done": "\(report.bytesDone)", "bytes.total": "\(report.bytesTotal)",
            "percent": "\(String(format: "%.1f", report.percent))",
            "rate.MBps": "\(String(format: "%.1f", Double(report.bytesPerSecond) / 1e6))",
            "eta.seconds": "\(report.etaSeconds.map { String(format: "%.0f", $0) } ?? "?")"])
    }
}
