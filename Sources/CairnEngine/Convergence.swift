import CairnCore
import CairnReplica
import Foundation

// Convergence at claim (docs/recovery.md, "Convergence after failover"): before an engine
// serves its first I/O, every in-sync replica it claimed holds the same version of every block.
//
// A write that failed at the previous engine (it was cut off, fenced or killed mid-write) may
// have reached some in-sync replicas and not others; nothing recorded that, because the write
// was never acknowledged. Left alone, a read would return one version today and another after
// the next failover. The claim fences the previous engine on every claimed replica first, so
// nothing of it can land afterwards; then the replicas are compared — region digests of the
// block generations (one u64 per MiB), block generations only where digests differ — and each
// block that differs is rolled *forward*: the newest version any in-sync replica holds is
// copied, at its own generation, with if-newer writes (or trims), to the replicas that hold an
// older one. Every acknowledged write is on every in-sync replica, so the newest version is the
// latest acknowledged write or a newer unacknowledged one: no acknowledged write is ever rolled
// back, and what a later read returns no longer depends on which replica answers.

/// What convergence found and did, for the log and tests.
public struct ConvergenceReport: Sendable, Equatable {
    /// Regions compared: those the replicas' activity logs name, or all when one cannot tell.
    public var regionsCompared: UInt64 = 0
    /// Whether a replica's activity log could not tell (it restarted), so every region's digest was compared.
    public var compareWhole = false
    /// 1 MiB regions whose block generations were compared (logged, or digests differing).
    public var regionsDiffering = 0
    /// Blocks rolled forward (counted once per block, whatever the number of replicas behind).
    public var blocksConverged = 0
    /// Bytes written to lagging replicas.
    public var bytesCopied: UInt64 = 0
    /// Replicas grown to the largest claimed size (an expansion cut off halfway).
    public var replicasGrown = 0
    public var seconds: Double = 0
}

extension VolumeEngine {
    /// Makes every member hold the newest version of every block any of them holds. Throws the
    /// first error with the member it came from (the caller drops that member and runs again).
    func converge(_ members: [Member], settledThrough: UInt64) throws(ConvergenceFailure) -> ConvergenceReport {
        var report = ConvergenceReport()
        let started = monotonicSeconds()
        // Sizes first: an expansion cut off halfway (ControllerExpandVolume grows the replicas
        // one by one) leaves some bigger than the others. Growing is idempotent and adds zeros,
        // so the smaller ones grow to the largest; the volume keeps its recorded size.
        let largest = max(sizeBytes, members.map(\.claimedSize).max() ?? 0)
        replicaSize.max(largest, ordering: .relaxed)
        for member in members where member.claimedSize < largest {
            try attempt(member) { try member.io.grow(volumeID: volumeID, sizeBytes: largest, epoch: epoch) }
            report.replicasGrown += 1
            logger.notice("grew a replica an interrupted expansion left smaller than the others", metadata: [
                "replica.node": "\(member.nodeID)", "replica.size": "\(member.claimedSize)", "grown.to": "\(largest)"])
        }
        let blocks = sizeBytes / UInt64(Self.blockSize)
        let regions = (blocks + UInt64(Self.regionBlocks) - 1) / UInt64(Self.regionBlocks)
        // The replicas' activity logs: the regions an earlier engine wrote and never settled.
        let logs = try each(members) { member in
            try member.io.activity(volumeID: volumeID, cleanThrough: 0, converged: false, epoch: epoch)
        }
        report.compareWhole = logs.contains(where: \.all)
        // Regions whose block generations are compared: the logged ones, or (when a log cannot
        // tell) those whose digests differ among all regions'.
        var differing: [UInt64] = []
        if members.count > 1 && !report.compareWhole {
            differing = Set(logs.flatMap(\.regions)).filter { $0 < regions }.sorted()
            report.regionsCompared = UInt64(differing.count)
        } else if members.count > 1 {
            report.regionsCompared = regions
            var region: UInt64 = 0
            while region < regions {
                let count = Int(min(UInt64(Self.maxSummaryCount), regions - region))
                let digests = try each(members) { member in
                    try member.io.generationSummary(volumeID: volumeID, firstRegion: region, count: count, epoch: epoch)
                }
                for i in 0..<count where digests.contains(where: { $0[i] != digests[0][i] }) {
                    differing.append(region + UInt64(i))
                }
                region += UInt64(count)
            }
        }
        report.regionsDiffering = differing.count
        var index = 0
        while index < differing.count {
            // Runs of consecutive differing regions, up to `maxGenerationsCount` blocks each.
            var end = index + 1
            while end < differing.count && differing[end] == differing[end - 1] + 1
                    && (end - index + 1) * Self.regionBlocks <= Self.maxGenerationsCount { end += 1 }
            let firstBlock = differing[index] * UInt64(Self.regionBlocks)
            let count = Int(min(UInt64((end - index) * Self.regionBlocks), blocks - firstBlock))
            let generations = try each(members) { member in
                try member.io.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
            }
            for step in Self.rollForward(generations, firstBlock: firstBlock) {
                try apply(step, members: members, report: &report)
            }
            index = end
        }
        if report.blocksConverged > 0 {
            // The copies are durable before the first I/O is served.
            _ = try each(members) { member in try member.io.flush(volumeID: volumeID, epoch: epoch) }
        }
        // Identical now: what the earlier engines left is settled, the restarts' unknown too.
        _ = try each(members) { member in
            try member.io.activity(volumeID: volumeID, cleanThrough: settledThrough, converged: true, epoch: epoch)
        }
        report.seconds = monotonicSeconds() - started
        return report
    }

    /// One run of consecutive blocks to roll forward from one member to others: same source,
    /// same generation to carry, same targets, all data or all trims.
    struct ConvergeStep: Equatable {
        var firstBlock: UInt64
        var count: Int
        var generation: UInt64
        var trimmed: Bool
        /// Index of the member holding the newest version.
        var source: Int
        /// Indexes of the members holding an older one.
        var targets: [Int]
    }

    /// For each block where the members' generations differ: the newest version (highest
    /// generation; the first member holding it is the source) goes to every member behind it.
    static func rollForward(_ generations: [[UInt64]], firstBlock: UInt64) -> [ConvergeStep] {
        guard let count = generations.map(\.count).min() else { return [] }
        var steps: [ConvergeStep] = []
        for i in 0..<count {
            let reported = generations.map { $0[i] }
            guard reported.contains(where: { $0 != reported[0] }) else { continue }
            let values = reported.map(BlockGenerations.generation)
            let newest = values.max()!
            let source = values.firstIndex(of: newest)!
            let targets = values.indices.filter { values[$0] < newest }
            // Equal generations with different trimmed bits cannot come from one write; nothing
            // to carry then (the scrub's checksums are the judge of a damaged block).
            guard !targets.isEmpty else { continue }
            // A never-written newest version cannot be newer than anything: newest > 0 here.
            let trimmed = BlockGenerations.isTrimmed(reported[source])
            let block = firstBlock + UInt64(i)
            if var last = steps.last, last.firstBlock + UInt64(last.count) == block, last.generation == newest,
               last.trimmed == trimmed, last.source == source, last.targets == targets, last.count < copyRunBlocks {
                last.count += 1
                steps[steps.count - 1] = last
            } else {
                steps.append(ConvergeStep(firstBlock: block, count: 1, generation: newest, trimmed: trimmed,
                                          source: source, targets: targets))
            }
        }
        return steps
    }

    private func apply(_ step: ConvergeStep, members: [Member], report: inout ConvergenceReport) throws(ConvergenceFailure) {
        let bytes = step.count * Self.blockSize
        let offset = step.firstBlock * UInt64(Self.blockSize)
        let volumeID = volumeID, epoch = epoch
        if step.trimmed {
            for target in step.targets {
                try attempt(members[target]) {
                    _ = try members[target].io.trimIfNewer(volumeID: volumeID, offset: offset, length: UInt64(bytes),
                                                            generation: step.generation, epoch: epoch)
                }
            }
        } else {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: Self.blockSize)
            defer { buffer.deallocate() }
            try attempt(members[step.source]) {
                try members[step.source].io.read(volumeID: volumeID, offset: offset, into: buffer, epoch: epoch)
            }
            for target in step.targets {
                try attempt(members[target]) {
                    _ = try members[target].io.writeIfNewer(volumeID: volumeID, offset: offset,
                                                             data: UnsafeRawBufferPointer(buffer),
                                                             generation: step.generation, epoch: epoch)
                }
                report.bytesCopied += UInt64(bytes)
            }
        }
        report.blocksConverged += step.count
        logger.notice("converged blocks an earlier engine may have written without acknowledging", metadata: [
            "block.first": "\(step.firstBlock)", "blocks": "\(step.count)", "generation": "\(step.generation)",
            "trimmed": "\(step.trimmed)", "source": "\(members[step.source].nodeID)",
            "targets": "\(step.targets.map { members[$0].nodeID })"])
    }

    private func each<T>(_ members: [Member], _ body: (Member) throws -> T) throws(ConvergenceFailure) -> [T] {
        var results: [T] = []
        results.reserveCapacity(members.count)
        for member in members {
            try attempt(member) { results.append(try body(member)) }
        }
        return results
    }

    private func attempt(_ member: Member, _ body: () throws -> Void) throws(ConvergenceFailure) {
        do { try body() } catch { throw ConvergenceFailure(member: member, error: error) }
    }
}

/// A member failed during convergence.
struct ConvergenceFailure: Error {
    let member: Member
    let error: any Error
}

extension VolumeEngine {
    /// Advances the replicas' clean watermark (`ActivityLog`): every write and trim numbered at
    /// or below the generation sampled here has finished on every in-sync replica (the
    /// `changeMembers` drain), so none of them can leave the replicas different any more. Not
    /// once a write failed after it was sent (`unsettled`): then the next engine compares the
    /// regions written since. Called by the recovery thread every membership interval; returns
    /// the watermark reached (`last` when nothing changed).
    func settleActivity(after last: UInt64) -> UInt64 {
        if fenced.load(ordering: .relaxed) || unsettled.load(ordering: .acquiring) { return last }
        guard generation.load(ordering: .relaxed) != last else { return last }
        let through = changeMembers { _ in generation.load(ordering: .relaxed) }
        guard !unsettled.load(ordering: .acquiring) else { return last }
        let members = sets.withLock { $0.inSync }
        for member in members {
            do {
                _ = try member.io.activity(volumeID: volumeID, cleanThrough: through, converged: false, epoch: epoch)
            } catch {
                // The replica's next I/O decides whether it stays in sync; its log only grows.
                logger.debug("could not settle a replica's activity log", metadata: [
                    "replica.node": "\(member.nodeID)", "error": "\(error)"])
            }
        }
        return through
    }
}
