import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The generations of an engine's writes and trims in flight, without a lock (issue 16: a
/// mutex taken twice by every write was among the hottest spots of a queue of small writes).
///
/// A fixed table of slots, each 0 (free), `reserving`, or the generation of one op in flight.
/// `take` claims a free slot (compare-and-swap 0 → `reserving`), then draws the next
/// generation from the engine's counter and stores it in the slot; `finish` frees the slot.
/// `watermark` reads the counter first and then every slot, waiting out a slot still
/// `reserving`: an op whose generation is at or below the counter value read had marked its
/// slot before drawing it (sequentially consistent operations), so the scan sees either the
/// mark or the generation, and the watermark never counts an op still in flight as finished.
final class InflightGenerations: @unchecked Sendable {
    /// Ops in flight at once at most; a `take` beyond it waits for a slot (FUSE runs at most
    /// 16 requests at a time, so this is never reached in practice).
    static let slots = 256
    private static let reserving = UInt64.max
    private let table: UnsafeMutablePointer<Atomic<UInt64>>
    private let hint = Atomic<Int>(0)

    init() {
        table = .allocate(capacity: Self.slots)
        for i in 0..<Self.slots { (table + i).initialize(to: Atomic(0)) }
    }

    deinit {
        table.deinitialize(count: Self.slots)
        table.deallocate()
    }

    /// The next generation of `counter`, registered as in flight; returns it and its slot (for `finish`).
    func take(from counter: borrowing Atomic<UInt64>) -> (generation: UInt64, slot: Int) {
        var i = hint.wrappingAdd(1, ordering: .relaxed).oldValue & (Self.slots - 1)
        var probes = 0
        while !(table + i).pointee.compareExchange(expected: 0, desired: Self.reserving, ordering: .sequentiallyConsistent).exchanged {
            i = (i + 1) & (Self.slots - 1)
            probes += 1
            if probes % Self.slots == 0 { sched_yield() }
        }
        let generation = counter.wrappingAdd(1, ordering: .sequentiallyConsistent).newValue
        (table + i).pointee.store(generation, ordering: .sequentiallyConsistent)
        return (generation, i)
    }

    /// The op of `slot` was answered.
    func finish(slot: Int) {
        (table + slot).pointee.store(0, ordering: .releasing)
    }

    /// The highest generation at or below which no op is in flight (`counter`'s value when none is).
    func watermark(of counter: borrowing Atomic<UInt64>) -> UInt64 {
        var lowest = counter.load(ordering: .sequentiallyConsistent)
        for i in 0..<Self.slots {
            var v = (table + i).pointee.load(ordering: .sequentiallyConsistent)
            while v == Self.reserving {
                sched_yield()
                v = (table + i).pointee.load(ordering: .sequentiallyConsistent)
            }
            if v != 0 && v - 1 < lowest { lowest = v - 1 }
        }
        return lowest
    }
}
