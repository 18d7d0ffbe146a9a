import Synchronization

/// What a replica has written that its engine has not yet called settled (docs/recovery.md,
/// "Convergence after failover"): the 1 MiB regions written with a generation above the
/// engine's clean watermark, in memory. A new engine asks every in-sync replica for it after
/// the claim and compares only those regions — DRBD's activity log, kept on the replicas, so it
/// survives the death of the engine's node.
///
/// In memory only: a replica process that restarts cannot know what it had in flight, so it
/// starts *unknown* (`restarted`) and the next engine compares it whole; an engine clears that
/// once it has converged the replica (or resynced it). Past `maxTracked` regions (a discard of
/// a whole large volume) the log says "everything" until a watermark passes the overflow.
public final class ActivityLog: Sendable {
    /// Bytes per region: the engine's summary region (256 blocks of 4 KiB).
    public static let regionShift: UInt64 = 20
    /// Regions tracked one by one; beyond it the log covers the whole volume for a while.
    public static let maxTracked = 65_536
    /// Regions are spread over this many independently locked shards (region mod count): every
    /// write notes its regions, and one lock for all of them was contended under a queue of
    /// writes (issue 16). Each shard tracks `maxTracked / shardCount` regions at most.
    public static let shardCount = 16

    struct Shard {
        /// Set by an overflow: everything written into this shard's regions up to this
        /// generation may be unsettled.
        var overflowThrough: UInt64?
        /// Region → the highest generation written into it that is not settled yet.
        var regions: [UInt64: UInt64] = [:]
    }

    final class ShardBox: Sendable {
        let state = Mutex(Shard())
    }

    private let restarted = Atomic<Bool>(true)
    private let shards: [ShardBox] = (0..<ActivityLog.shardCount).map { _ in ShardBox() }

    public init() {}

    /// Records a write or trim of `length` bytes at `offset` with `generation`, before it is applied.
    public func note(offset: UInt64, length: Int, generation: UInt64) {
        let first = offset >> Self.regionShift
        let last = (offset + UInt64(max(length, 1)) - 1) >> Self.regionShift
        let perShard = Self.maxTracked / Self.shardCount
        // A range covering every shard many times over (a discard of a large volume) overflows them all.
        if last - first >= UInt64(perShard) {
            for box in shards {
                box.state.withLock { s in
                    s.overflowThrough = max(s.overflowThrough ?? 0, generation, s.regions.values.max() ?? 0)
                    s.regions = [:]
                }
            }
            return
        }
        for region in first...last {
            shards[Int(region % UInt64(Self.shardCount))].state.withLock { s in
                if let through = s.overflowThrough {
                    s.overflowThrough = max(through, generation)
                    return
                }
                if s.regions[region] == nil && s.regions.count + 1 > perShard {
                    s.overflowThrough = max(generation, s.regions.values.max() ?? 0)
                    s.regions = [:]
                    return
                }
                s.regions[region] = max(s.regions[region] ?? 0, generation)
            }
        }
    }

    /// Forgets what was written at or below `cleanThrough` (every write up to it settled on
    /// every in-sync replica); with `converged`, also the restart's unknown. Returns what is
    /// left: everything (`all`), or the regions, ascending.
    public func settle(cleanThrough: UInt64, converged: Bool) -> ReplicaActivity {
        if converged { restarted.store(false, ordering: .relaxed) }
        var overflowed = false
        var left: [UInt64] = []
        for box in shards {
            box.state.withLock { s in
                if let through = s.overflowThrough, through <= cleanThrough { s.overflowThrough = nil }
                if cleanThrough > 0 { s.regions = s.regions.filter { $0.value > cleanThrough } }
                if s.overflowThrough != nil { overflowed = true }
                left.append(contentsOf: s.regions.keys)
            }
        }
        if restarted.load(ordering: .relaxed) || overflowed { return ReplicaActivity(all: true, regions: []) }
        return ReplicaActivity(all: false, regions: left.sorted())
    }
}

/// A replica's unsettled regions, as the `activity` op reports them.
public struct ReplicaActivity: Sendable, Equatable {
    /// The replica cannot tell (it restarted, or too much was written): compare it whole.
    public var all: Bool
    /// 1 MiB regions (`ActivityLog.regionShift`) written above the clean watermark, ascending.
    public var regions: [UInt64]

    public init(all: Bool, regions: [UInt64]) {
        self.all = all
        self.regions = regions
    }

    public static let unknown = ReplicaActivity(all: true, regions: [])
}
