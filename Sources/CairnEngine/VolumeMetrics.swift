import CairnCore
import CoreMetrics
import Synchronization

/// A staged volume's series (docs/metrics.md, label `volume`): made once when its engine is
/// built, so the I/O path touches only these handles (an atomic add per counter, a short
/// uncontended lock per histogram sample) and never looks a series up by label; destroyed when
/// the engine stops, so an unstaged volume leaves no series behind.
final class VolumeMetrics: Sendable {
    /// False without a metrics backend: the I/O path then reads no clock either.
    let records: Bool
    let readOps: CoreMetrics.Counter
    let writeOps: CoreMetrics.Counter
    let flushOps: CoreMetrics.Counter
    let readBytes: CoreMetrics.Counter
    let writeBytes: CoreMetrics.Counter
    let readLatency: CoreMetrics.Timer
    let writeLatency: CoreMetrics.Timer
    let flushLatency: CoreMetrics.Timer
    let repairedBlocks: CoreMetrics.Counter
    let fencingEvents: CoreMetrics.Counter
    let qosThrottled: CoreMetrics.FloatingPointCounter
    let resyncBytes: CoreMetrics.Counter
    let durableWrites: CoreMetrics.Counter
    let flushesWithoutSync: CoreMetrics.Counter
    let durabilityFlushes: CoreMetrics.Counter
    let durabilityRounds: CoreMetrics.Timer
    let readsRedone: CoreMetrics.Counter
    let bufferBytesReleased: CoreMetrics.Counter
    private let destroyed = Atomic<Bool>(false)

    init(volumeID: String, factory: any MetricsFactory = MetricsSystem.factory) {
        let volume = [("volume", volumeID)]
        func counter(_ name: String) -> CoreMetrics.Counter {
            CoreMetrics.Counter(label: name, dimensions: volume, factory: factory)
        }
        func timer(_ name: String) -> CoreMetrics.Timer {
            CoreMetrics.Timer(label: name, dimensions: volume, factory: factory)
        }
        records = MetricsClock.records(factory)
        readOps = counter("cairn_volume_read_ops_total")
        writeOps = counter("cairn_volume_write_ops_total")
        flushOps = counter("cairn_volume_flush_ops_total")
        readBytes = counter("cairn_volume_read_bytes_total")
        writeBytes = counter("cairn_volume_write_bytes_total")
        readLatency = timer("cairn_volume_read_latency_seconds")
        writeLatency = timer("cairn_volume_write_latency_seconds")
        flushLatency = timer("cairn_volume_flush_latency_seconds")
        repairedBlocks = counter("cairn_volume_repaired_blocks_total")
        fencingEvents = counter("cairn_volume_fencing_events_total")
        qosThrottled = CoreMetrics.FloatingPointCounter(label: "cairn_volume_qos_throttled_seconds_total", dimensions: volume,
                                                        factory: factory)
        resyncBytes = counter("cairn_volume_resync_bytes_total")
        durableWrites = counter("cairn_volume_durable_writes_total")
        flushesWithoutSync = counter("cairn_volume_flushes_without_sync_total")
        durabilityFlushes = counter("cairn_volume_durability_flushes_total")
        durabilityRounds = timer("cairn_volume_durability_flush_round_seconds")
        readsRedone = counter("cairn_volume_reads_redone_total")
        bufferBytesReleased = counter("cairn_volume_buffer_bytes_released_total")
    }

    /// The start of a timed I/O (0 when nothing records).
    @inline(__always)
    func start() -> UInt64 { records ? monotonicNanoseconds() : 0 }

    @inline(__always)
    func read(bytes: Int, since start: UInt64) { record(readLatency, readOps, readBytes, bytes: bytes, since: start) }

    @inline(__always)
    func write(bytes: Int, since start: UInt64) { record(writeLatency, writeOps, writeBytes, bytes: bytes, since: start) }

    @inline(__always)
    func flush(since start: UInt64) { record(flushLatency, flushOps, nil, bytes: 0, since: start) }

    @inline(__always)
    private func record(_ latency: CoreMetrics.Timer, _ ops: CoreMetrics.Counter, _ bytesCounter: CoreMetrics.Counter?,
                        bytes: Int, since start: UInt64) {
        guard records else { return }
        latency.recordNanoseconds(Int64(clamping: monotonicNanoseconds() &- start))
        ops.increment()
        bytesCounter?.increment(by: Int64(bytes))
    }

    @inline(__always)
    func durableWrite() { if records { durableWrites.increment() } }

    @inline(__always)
    func flushWithoutSync() { if records { flushesWithoutSync.increment() } }
    func durabilityFlush() { if records { durabilityFlushes.increment() } }

    /// An asynchronous read whose data did not match the block map when it arrived, read again.
    func readRedone() { if records { readsRedone.increment() } }

    /// FUSE buffers given back to the kernel by an idle trim.
    func buffersReleased(bytes: UInt64) { if records { bufferBytesReleased.increment(by: Int64(clamping: bytes)) } }

    /// One flush round of the engine's own (group commit: its count against
    /// `durabilityFlushes` says how many writes a round carries).
    func durabilityRound(since start: UInt64) {
        guard records else { return }
        durabilityRounds.recordNanoseconds(Int64(clamping: monotonicNanoseconds() &- start))
    }

    /// Time the QoS limiter held an I/O back.
    func throttled(nanoseconds: UInt64) {
        guard records, nanoseconds > 0 else { return }
        qosThrottled.increment(by: Double(nanoseconds) / 1e9)
    }

    /// Removes every series of the volume from the registry (its engine stopped). Idempotent.
    func destroy() {
        guard !destroyed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for counter in [readOps, writeOps, flushOps, readBytes, writeBytes, repairedBlocks, fencingEvents, resyncBytes,
                        durableWrites, flushesWithoutSync, durabilityFlushes, readsRedone, bufferBytesReleased] {
            counter.destroy()
        }
        for timer in [readLatency, writeLatency, flushLatency, durabilityRounds] { timer.destroy() }
        qosThrottled.destroy()
    }
}
