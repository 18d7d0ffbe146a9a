/// The HELP line of every Cairn metric (docs/metrics.md says more). swift-metrics carries no
/// help text, so the exposition adds these before each family's TYPE line.
enum MetricHelp {
    static let text: [String: String] = [
        "cairn_volume_read_ops_total": "Reads the volume's engine served.",
        "cairn_volume_write_ops_total": "Writes the volume's engine acknowledged (every in-sync replica has them).",
        "cairn_volume_flush_ops_total": "Flushes the volume's engine completed on every in-sync replica.",
        "cairn_volume_read_bytes_total": "Bytes read from the volume.",
        "cairn_volume_write_bytes_total": "Bytes written to the volume (before replication).",
        "cairn_volume_read_latency_seconds": "Read latency as the kernel sees it, QoS waits included.",
        "cairn_volume_write_latency_seconds": "Write latency: the slowest in-sync replica, QoS waits included.",
        "cairn_volume_flush_latency_seconds": "Flush latency: every in-sync replica's fsync.",
        "cairn_volume_repaired_blocks_total": "Corrupted blocks rewritten from another replica (read repair, scrub).",
        "cairn_volume_fencing_events_total": "Times this engine found a newer epoch and stopped serving I/O.",
        "cairn_volume_qos_throttled_seconds_total": "Time the volume's QoS limits held I/O back.",
        "cairn_volume_resync_bytes_total": "Bytes copied to out-of-sync or new replicas by resync and rebuild.",
        "cairn_volume_durable_writes_total": "Writes every replica was asked to make durable as it wrote them (queue-depth-1 commits).",
        "cairn_volume_flushes_without_sync_total": "Flushes answered without flushing any replica: everything since was durable already.",
        "cairn_volume_durability_flushes_total": "Writes and trims the engine flushed on the replicas itself before answering them (not durable as written: large, with others in flight, trims), so every write is durable when answered (docs/engine.md, \"Write-through volumes\").",
        "cairn_volume_buffer_bytes_released_total": "Bytes of the volume's FUSE buffers (workers' request and read buffers, the read ring's) given back to the kernel after the volume went CAIRN_IDLE_TRIM_SECONDS without a request (docs/engine.md, \"Idle volumes give their buffers back\").",
        "cairn_volume_reads_redone_total": "Asynchronous reads of the local replica whose data did not match the block map when they arrived (a write or trim of the block raced the read, or the block is damaged), read again the ordinary way (docs/engine.md, \"Asynchronous reads\"); a steady rise without writes to the same blocks means damage the scrub should find.",
        "cairn_volume_durability_flush_round_seconds": "How long each of the engine's own flush rounds took (a flush of every in-sync replica holding writes not yet durable); writes and trims share rounds, so cairn_volume_durability_flushes_total over this count is the writes per round (docs/engine.md, \"Write-through volumes\").",
        "cairn_replica_request_duration_seconds": "Time this node's replica server took per data-protocol request.",
        "cairn_replica_request_errors_total": "Data-protocol requests this node's replica server answered with an error.",
        "cairn_csi_operations_seconds": "CSI call durations by method and gRPC status code.",
        "cairn_store_transaction_seconds": "Metadata store operation durations (etcd txn: retries included).",
        "cairn_store_conflicts_total": "Store operations that lost a race and were retried (etcd) or found the database busy (SQLite).",
        "cairn_volume_replicas": "Replicas the volume should have.",
        "cairn_volume_replicas_in_sync": "Replicas of the volume in sync.",
        "cairn_volume_resync_remaining_bytes": "Bytes the volume's running resyncs still have to copy.",
        "cairn_volume_resync_progress_ratio": "Mean progress of the volume's replicas towards in sync (1: all in sync).",
        "cairn_replica_in_sync": "1 if the volume's replica on the node is in sync, else 0.",
        "cairn_node_up": "1 while the node's registration lease is alive, 0 while it is away.",
        "cairn_node_capacity_bytes": "Bytes the node's pool may provision (--capacity).",
        "cairn_node_used_bytes": "Bytes promised to the replicas on the node.",
    ]

    /// `exposition` with a `# HELP` line before each `# TYPE` line of a metric listed above.
    static func adding(to exposition: [UInt8]) -> [UInt8] {
        let typePrefix = Array("# TYPE ".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(exposition.count + 4096)
        var lineStart = exposition.startIndex
        while lineStart < exposition.endIndex {
            let lineEnd = exposition[lineStart...].firstIndex(of: UInt8(ascii: "\n")) ?? exposition.endIndex
            let line = exposition[lineStart..<lineEnd]
            if line.starts(with: typePrefix) {
                let name = line.dropFirst(typePrefix.count).prefix { $0 != UInt8(ascii: " ") }
                if let help = text[String(decoding: name, as: UTF8.self)] {
                    out += Array("# HELP ".utf8) + name + Array(" \(help)\n".utf8)
                }
            }
            out += line
            if lineEnd < exposition.endIndex { out.append(UInt8(ascii: "\n")) }
            lineStart = lineEnd < exposition.endIndex ? exposition.index(after: lineEnd) : lineEnd
        }
        return out
    }
}
