import ArgumentParser
import Foundation

/// bench/run's timer for what fio cannot measure: the control plane (also at scale) and failover. Each
/// subcommand writes one JSON document (samples in milliseconds plus p50/p99) and cleans up
/// every volume it made, also when a step fails.
@main
struct CairnBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn-bench",
        abstract: "Times Cairn's CSI control plane and failover (used by bench/run).",
        subcommands: [ControlPlane.self, Failover.self, Stage.self, Unstage.self, Resync.self, Scale.self, CSICommands.self]
    )
}

/// Latency samples in milliseconds, with the nearest-rank percentiles.
struct Samples: Codable {
    var ms: [Double] = []

    mutating func time<T>(_ body: () async throws -> T) async rethrows -> T {
        let start = ContinuousClock.now
        let value = try await body()
        ms.append(milliseconds(ContinuousClock.now - start))
        return value
    }

    func percentile(_ p: Double) -> Double? {
        guard !ms.isEmpty else { return nil }
        let sorted = ms.sorted()
        let rank = Int((p / 100 * Double(sorted.count)).rounded(.up))
        return sorted[min(max(rank, 1), sorted.count) - 1]
    }

    var summary: [String: Double] {
        var out: [String: Double] = ["n": Double(ms.count)]
        out["p50"] = percentile(50)
        out["p99"] = percentile(99)
        out["min"] = ms.min()
        out["max"] = ms.max()
        return out
    }
}

func milliseconds(_ d: Duration) -> Double {
    let c = d.components
    return Double(c.seconds) * 1000 + Double(c.attoseconds) / 1e15
}

func writeJSON(_ object: [String: Any], to path: String) throws {
    let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
    try data.write(to: URL(fileURLWithPath: path))
}

func log(_ message: String) {
    FileHandle.standardError.write(Data("cairn-bench: \(message)\n".utf8))
}

struct ControlPlane: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "control-plane",
        abstract: "CreateVolume, the publish chain (first with mkfs, then without), its undo and DeleteVolume, N times.")

    @Option(help: "The controller's CSI endpoint (unix:///…).") var controller: String
    @Option(help: "The node's CSI endpoint.") var node: String
    @Option(help: "The node's id (ControllerPublish's node_id).") var nodeID: String
    @Option(help: "Replicas per volume (the `replicas` parameter).") var replicas: Int = 1
    @Option(help: "Iterations.") var iterations: Int = 10
    @Option(help: "Volume size in MiB.") var sizeMiB: Int64 = 256
    @Option(help: "Directory for staging and target paths (must be under the node's --path-root).") var workDir: String
    @Option(help: "Where the JSON result goes.") var out: String
    @Option(help: "Volume name prefix.") var name: String = "bench-cp"

    func run() async throws {
        let controller = CSIClient(endpoint: self.controller)
        let node = CSIClient(endpoint: self.node)
        var create = Samples(), delete = Samples(), withMkfs = Samples(), withoutMkfs = Samples(), unpublish = Samples()
        for i in 0..<iterations {
            let volume = try await create.time {
                try await createVolume(controller, name: "\(name)-r\(replicas)-\(i)-\(UUID().uuidString.prefix(8))",
                                       bytes: sizeMiB << 20, replicas: replicas, preferredNode: nodeID)
            }
            let attachment = Attachment(volume: volume, nodeID: nodeID, root: workDir)
            do {
                try await withMkfs.time { try await attachment.publish(controller: controller, node: node) }
                try await unpublish.time { try await attachment.unpublish(controller: controller, node: node) }
                try await withoutMkfs.time { try await attachment.publish(controller: controller, node: node) }
                try await unpublish.time { try await attachment.unpublish(controller: controller, node: node) }
            } catch {
                try? await attachment.unpublish(controller: controller, node: node)
                try? await deleteVolume(controller, volume)
                throw error
            }
            try await delete.time { try await deleteVolume(controller, volume) }
            try? FileManager.default.removeItem(atPath: workDir + "/\(volume)-\(nodeID)")
        }
        try writeJSON([
            "replicas": replicas, "iterations": iterations, "size_mib": sizeMiB,
            "create_volume": create.summary, "delete_volume": delete.summary,
            "publish_chain_mkfs": withMkfs.summary, "publish_chain": withoutMkfs.summary,
            "unpublish_chain": unpublish.summary,
            "samples_ms": ["create_volume": create.ms, "delete_volume": delete.ms,
                           "publish_chain_mkfs": withMkfs.ms, "publish_chain": withoutMkfs.ms,
                           "unpublish_chain": unpublish.ms],
        ], to: out)
        log("control plane, \(replicas) replica(s), \(iterations) iterations: CreateVolume p50 \(fmt(create.percentile(50))) ms, publish chain p50 \(fmt(withoutMkfs.percentile(50))) ms (with mkfs \(fmt(withMkfs.percentile(50))) ms)")
    }
}

func fmt(_ v: Double?) -> String { v.map { String(format: "%.1f", $0) } ?? "-" }
