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

// Delta resync, its run (docs/recovery.md "Delta resync"): claim the target, join it as
// catching up, copy what the plan (ResyncPlan.swift) lists, rejoin; progress as it goes.
extension VolumeEngine {
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
                    metrics.resyncBytes.increment(by: Int64(bytes))
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
                metrics.resyncBytes.increment(by: Int64(Self.blockSize))
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

    func withCopyBuffer<T>(_ bytes: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: Self.blockSize)
        defer { buffer.deallocate() }
        return try body(buffer)
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
