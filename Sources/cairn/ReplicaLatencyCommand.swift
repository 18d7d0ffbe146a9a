import ArgumentParser
import CairnCore
import CairnReplica
import Foundation

/// `cairn replica latency` (hidden): what one replica store costs per small write and per
/// flush on this machine's disk, without network, FUSE or engine (docs/engine.md, "Where the
/// cycles go"). Creates a scratch replica in --dir, runs --ops rounds of a 4 KiB write at a
/// random block followed by a flush (the database pattern: commit = write + fdatasync), then
/// --ops writes without a flush, and prints p50/p99 of each, in µs. Set
/// CAIRN_REPLICA_JOURNAL=off to measure the in-place path (data file + block map synced).
struct ReplicaLatencyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "latency",
        abstract: "Measure a scratch replica store's 4 KiB write and write+flush latency on this disk (benchmarks).",
        shouldDisplay: false)

    @Option(help: "A directory on the disk to measure (a scratch replica is made and removed there).")
    var dir: String

    @Option(help: "Rounds of each measurement.")
    var ops = 2000

    @Option(help: "The scratch volume's size in MiB.")
    var sizeMib: UInt64 = 1024

    func run() throws {
        let path = dir + "/cairn-latency-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try ReplicaStore.create(directory: path, volumeID: "latency", size: sizeMib << 20)
        defer { try? store.close() }
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        var rng = SystemRandomNumberGenerator()
        let blocks = (sizeMib << 20) / 4096
        var generation: UInt64 = 0
        func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
        func round(flush: Bool) throws -> Double {
            for i in 0..<block.count { block[i] = UInt8.random(in: 0...255, using: &rng) }
            generation += 1
            let start = now()
            try store.write(offset: UInt64.random(in: 0..<blocks, using: &rng) * 4096, bytes: UnsafeRawBufferPointer(block),
                            generation: generation, epoch: 0)
            if flush { try store.flush(epoch: 0) }
            return Double(now() - start) / 1000
        }
        func percentiles(_ v: [Double]) -> String {
            let s = v.sorted()
            return String(format: "p50 %.0f µs, p99 %.0f µs", s[s.count / 2], s[min(s.count - 1, s.count * 99 / 100)])
        }
        for _ in 0..<50 { _ = try round(flush: true) }  // warm-up
        let synced = try (0..<ops).map { _ in try round(flush: true) }
        let unsynced = try (0..<ops).map { _ in try round(flush: false) }
        let journal = ProcessInfo.processInfo.environment["CAIRN_REPLICA_JOURNAL"] == "off" ? "off (in place)" : "on"
        print("replica store on \(dir), journal \(journal), \(ops) rounds each")
        print("  4 KiB write + flush: \(percentiles(synced))")
        print("  4 KiB write alone:   \(percentiles(unsynced))")
    }
}
