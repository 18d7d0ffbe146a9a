import CoreMetrics
import Foundation
import Prometheus

/// The process's metrics: one Prometheus registry, behind swift-metrics. The libraries record
/// through the swift-metrics API (`Counter`, `Timer`, `Gauge`) and never see Prometheus; `cairn
/// serve` bootstraps the metrics system with this registry once, before any role starts, and the
/// `ObservabilityServer` renders the same registry on GET /metrics (docs/metrics.md).
public enum ProcessMetrics {
    /// Latency buckets for storage: from a local flash write (tens of µs) to a replica that
    /// stalls (seconds). Every `Timer` of the process uses them.
    public static let latencyBuckets: [Duration] = [
        .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
        .milliseconds(1), .microseconds(2500), .milliseconds(5), .milliseconds(10), .milliseconds(25),
        .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
        .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
    ]

    /// A swift-metrics factory over `registry` with the storage latency buckets. Unit tests pass
    /// a fresh registry's factory to the instruments they check, instead of bootstrapping.
    public static func factory(for registry: PrometheusCollectorRegistry) -> PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = latencyBuckets
        return factory
    }

    /// The process's registry. The first use bootstraps `MetricsSystem` with it (a process may
    /// bootstrap only once; later uses return the same registry).
    public static var registry: PrometheusCollectorRegistry { bootstrapped }

    private static let bootstrapped: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(factory(for: registry))
        return registry
    }()
}
