import CoreMetrics
import Foundation
import Synchronization

// What the libraries record through swift-metrics (docs/metrics.md). They never see the
// backend: `cairn serve --metrics-address` bootstraps Prometheus; without it every instrument
// is swift-metrics' no-op and `MetricsClock` reads no clock.

/// Whether the process records metrics (a backend was bootstrapped): callers skip clock reads
/// when it does not.
public enum MetricsClock {
    /// Read per instrument at creation; a factory other than the no-op one records.
    public static func records(_ factory: any MetricsFactory) -> Bool { !(factory is NOOPMetricsHandler) }

    /// The start of a timed operation.
    @inline(__always)
    public static func now() -> UInt64 { monotonicNanoseconds() }
}

/// Monotonic nanoseconds (CLOCK_MONOTONIC: not moved by wall-clock changes).
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// One metric family (`label`) whose series are told apart by a few bounded label values (a CSI
/// method and its status code, a store and its operation): each series is made on first use and
/// kept. For calls that are not per-I/O (the lookup takes a lock).
public final class MetricFamily<Instrument: AnyObject & Sendable>: Sendable {
    let names: [String]
    /// False without a metrics backend: callers skip their clock reads.
    public let records: Bool
    private let make: @Sendable (_ dimensions: [(String, String)]) -> Instrument
    private let series = Mutex<[[String]: Instrument]>([:])

    public init(labelNames: [String], records: Bool, make: @escaping @Sendable (_ dimensions: [(String, String)]) -> Instrument) {
        self.names = labelNames
        self.records = records
        self.make = make
    }

    /// The series of `values` (in the order of the label names).
    public func series(_ values: [String]) -> Instrument {
        series.withLock { series in
            if let made = series[values] { return made }
            let made = make(Array(zip(names, values)))
            series[values] = made
            return made
        }
    }
}

public typealias TimerFamily = MetricFamily<CoreMetrics.Timer>
public typealias CounterFamily = MetricFamily<CoreMetrics.Counter>

extension MetricFamily where Instrument == CoreMetrics.Timer {
    public convenience init(label: String, labelNames: [String], factory: any MetricsFactory = MetricsSystem.factory) {
        self.init(labelNames: labelNames, records: MetricsClock.records(factory)) {
            CoreMetrics.Timer(label: label, dimensions: $0, factory: factory)
        }
    }

    /// Records the time since `start` (`MetricsClock.now()`) in the series of `values`.
    public func record(_ values: [String], since start: UInt64) {
        guard records else { return }
        series(values).recordNanoseconds(Int64(clamping: MetricsClock.now() &- start))
    }
}

extension MetricFamily where Instrument == CoreMetrics.Counter {
    public convenience init(label: String, labelNames: [String], factory: any MetricsFactory = MetricsSystem.factory) {
        self.init(labelNames: labelNames, records: MetricsClock.records(factory)) {
            CoreMetrics.Counter(label: label, dimensions: $0, factory: factory)
        }
    }

    public func increment(_ values: [String], by amount: Int64 = 1) {
        guard records else { return }
        series(values).increment(by: amount)
    }
}
