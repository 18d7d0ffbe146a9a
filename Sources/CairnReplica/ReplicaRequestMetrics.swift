import CairnCore
import CoreMetrics

/// The replica server's series (docs/metrics.md): a duration histogram and an error counter per
/// data-protocol op (label `op`), made for every op when the server is built, so a request
/// finds its handles by opcode in a fixed array — no lookup by label, no lock.
final class ReplicaRequestMetrics: Sendable {
    let records: Bool
    private let durations: [CoreMetrics.Timer?]
    private let errors: [CoreMetrics.Counter?]

    init(factory: any MetricsFactory = MetricsSystem.factory) {
        records = MetricsClock.records(factory)
        var durations = [CoreMetrics.Timer?](repeating: nil, count: 256)
        var errors = [CoreMetrics.Counter?](repeating: nil, count: 256)
        if records {
            for op in Opcode.allCases {
                let labels = [("op", "\(op)")]
                durations[Int(op.rawValue)] = CoreMetrics.Timer(label: "cairn_replica_request_duration_seconds",
                                                                dimensions: labels, factory: factory)
                errors[Int(op.rawValue)] = CoreMetrics.Counter(label: "cairn_replica_request_errors_total",
                                                               dimensions: labels, factory: factory)
            }
        }
        self.durations = durations
        self.errors = errors
    }

    @inline(__always)
    func start() -> UInt64 { records ? monotonicNanoseconds() : 0 }

    @inline(__always)
    func served(_ op: Opcode, since start: UInt64) {
        guard records else { return }
        durations[Int(op.rawValue)]?.recordNanoseconds(Int64(clamping: monotonicNanoseconds() &- start))
    }

    func failed(_ op: Opcode) {
        errors[Int(op.rawValue)]?.increment()
    }
}
