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

    struct State {
        var restarted = true
        /// Set by an overflow: everything written up to this generation may be unsettled.
        var overflowThrough: UInt64?
        /// Region → the highest generation written into it that is not settled yet.
        var regions: [UInt64: UInt64] = [:]
    }

    let state = Mutex(State())

    public init() {}

    /// Records a write or trim of `length` bytes at `offset` with `generation`, before it is applied.
    public func note(offset: UInt64, length: Int, generation: UInt64) {
        let first = offset >> Self.regionShift
        let last = (offset + UInt64(max(length, 1)) - 1) >> Self.regionShift
        state.withLock { s in
            if let through = s.overflowThrough {
                s.overflowThrough = max(through, generation)
                return
            }
            if s.regions.count + Int(last - first + 1) > Self.maxTracked {
                s.overflowThrough = max(generation, s.regions.values.max() ?? 0)
                s.regions = [:]
                return
            }
            for region in first...last { s.regions[region] = max(s.regions[region] ?? 0, generation) }
        }
    }

    /// Forgets what was written at or below `cleanThrough` (every write up to it settled on
    /// every in-sync replica); with `converged`, also the restart's unknown. Returns what is
    /// left: everything (`all`), or the regions, ascending.
    public func settle(cleanThrough: UInt64, converged: Bool) -> ReplicaActivity {
        state.withLock { s in
            if converged { s.restarted = false }
            if let through = s.overflowThrough, through <= cleanThrough { s.overflowThrough = nil }
            if cleanThrough > 0 { s.regions = s.regions.filter { $0.value > cleanThrough } }
            if s.restarted || s.overflowThrough != nil { return ReplicaActivity(all: true, regions: []) }
            return ReplicaActivity(all: false, regions: s.regions.keys.sorted())
        }
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
