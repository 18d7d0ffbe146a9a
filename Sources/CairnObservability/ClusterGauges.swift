import CairnCore
import CoreMetrics
import Logging
import ServiceLifecycle
import Synchronization

/// The controller's view of the cluster as gauges (docs/metrics.md), read from the store every
/// `interval`: per volume its replica count, how many are in sync and its resync's progress;
/// per replica whether it is in sync; per node whether it is up, its capacity and what its
/// replicas take. A volume deleted or a node removed loses its series at the next refresh.
public final class ClusterGauges: Service, Sendable {
    let store: any MetadataStore
    let interval: Duration
    let logger: Logger
    let factory: any MetricsFactory
    private let state: Mutex<Exported>

    private struct Exported: ~Copyable {
        var gauges: [Series: CoreMetrics.Gauge] = [:]
        /// Capacity last seen for each node: a node that went away keeps it on its series.
        var capacity: [String: Int64] = [:]
    }

    /// One series: a metric name and its label values, in the order of `Series.names`.
    struct Series: Hashable {
        let name: String
        let labels: [String]
    }

    public init(store: any MetadataStore, interval: Duration = .seconds(5), logger: Logger,
                factory: any MetricsFactory = MetricsSystem.factory) {
        self.store = store
        self.interval = interval
        self.logger = logger
        self.factory = factory
        self.state = Mutex(Exported())
    }

    public func run() async throws {
        logger.info("service started", metadata: ["service": "cluster-gauges"])
        defer { logger.info("service stopped", metadata: ["service": "cluster-gauges"]) }
        await cancelWhenGracefulShutdown { [self] in
            var failing = false
            while !Task.isCancelled {
                do {
                    try await refresh()
                    if failing { logger.info("the cluster gauges are read from the store again") }
                    failing = false
                } catch {
                    if !failing {
                        logger.warning("cannot read the cluster state for the metrics; the gauges keep their last values until the store answers",
                                       metadata: ["error": "\(error)"])
                    }
                    failing = true
                }
                try? await Task.sleep(for: interval)
            }
        }
    }

    /// Reads the store once and sets every gauge; drops the series of what is gone.
    public func refresh() async throws {
        let volumes = try await store.listVolumes(afterID: nil, limit: 0)
        let live = try await store.liveNodes()
        let removed = Set(try await store.removedNodes())
        var values: [Series: Double] = [:]
        var used: [String: Int64] = [:]
        var referenced: Set<String> = []
        for volume in volumes {
            guard let replicas = volume.replicas, !replicas.isEmpty else { continue }  // one machine: a local file
            let id = volume.id
            let inSync = replicas.filter(\.inSync)
            var remaining: Int64 = 0
            var progress = 0.0
            for replica in replicas {
                used[replica.nodeID, default: 0] += volume.capacityBytes
                referenced.insert(replica.nodeID)
                values[Series(name: "cairn_replica_in_sync", labels: [id, replica.nodeID])] = replica.inSync ? 1 : 0
                if replica.inSync {
                    progress += 1
                } else if let resync = replica.resync, resync.bytesTotal > 0 {
                    remaining += max(0, resync.bytesTotal - resync.bytesDone)
                    progress += min(1, Double(resync.bytesDone) / Double(resync.bytesTotal))
                }
            }
            values[Series(name: "cairn_volume_replicas", labels: [id])] = Double(replicas.count)
            values[Series(name: "cairn_volume_replicas_in_sync", labels: [id])] = Double(inSync.count)
            values[Series(name: "cairn_volume_resync_remaining_bytes", labels: [id])] = Double(remaining)
            values[Series(name: "cairn_volume_resync_progress_ratio", labels: [id])] = progress / Double(replicas.count)
        }
        let liveIDs = Set(live.map(\.id))
        state.withLock { exported in
            for node in live { if let capacity = node.capacityBytes { exported.capacity[node.id] = capacity } }
            for node in liveIDs.union(referenced) where !removed.contains(node) {
                values[Series(name: "cairn_node_up", labels: [node])] = liveIDs.contains(node) ? 1 : 0
                values[Series(name: "cairn_node_used_bytes", labels: [node])] = Double(used[node] ?? 0)
                if let capacity = exported.capacity[node] {
                    values[Series(name: "cairn_node_capacity_bytes", labels: [node])] = Double(capacity)
                }
            }
            for node in removed { exported.capacity[node] = nil }
            for (series, gauge) in exported.gauges where values[series] == nil {
                gauge.destroy()
                exported.gauges[series] = nil
            }
            for (series, value) in values {
                let gauge = exported.gauges[series] ?? {
                    let made = CoreMetrics.Gauge(label: series.name, dimensions: Array(zip(Self.labelNames(series.name), series.labels)),
                                                 factory: factory)
                    exported.gauges[series] = made
                    return made
                }()
                gauge.record(value)
            }
        }
    }

    static func labelNames(_ metric: String) -> [String] {
        if metric.hasPrefix("cairn_node_") { return ["node"] }
        if metric == "cairn_replica_in_sync" { return ["volume", "node"] }
        return ["volume"]
    }
}
