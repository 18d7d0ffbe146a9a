import CairnCore

/// The metadata stores' series (docs/metrics.md): how long a transaction takes, by store
/// (`sqlite`, `etcd`) and kind of operation (`read`, `write`, `get`, `range`, `txn`), and how
/// often one lost a race and was retried.
enum StoreMetrics {
    static let transactions = TimerFamily(label: "cairn_store_transaction_seconds", labelNames: ["store", "op"])
    static let conflicts = CounterFamily(label: "cairn_store_conflicts_total", labelNames: ["store"])

    /// Runs `body` and records its duration (failed ones too) as one `op` of `store`.
    static func timed<T>(_ store: String, _ op: String, _ body: () async throws -> T) async rethrows -> T {
        let began = MetricsClock.now()
        defer { transactions.record([store, op], since: began) }
        return try await body()
    }
}
