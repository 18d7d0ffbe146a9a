import ArgumentParser
import CSIProto
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Issue 6's bench row. (1) Delta resync: a node is killed, 1% of the volume is rewritten with
/// random 4 KiB writes, the node restarts; bytes on its wire / bytes changed, and the time until
/// the volume is healthy. (2) Full rebuild: the node is killed before a large file is written;
/// after it restarts every written byte is copied; its rate, unthrottled (the bed's nodes run
/// with --rebuild-rate 0), from the node's wire counters between 10% and 90% of the copy.
struct Resync: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Delta resync (bytes on the wire / bytes changed) and full-rebuild rate on the test bed.")

    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(help: "The attached node's CSI endpoint.") var node: String
    @Option(help: "The attached node's id.") var nodeID: String = "n1"
    @Option(help: "The node whose replica goes away and comes back.") var victim: String = "n3"
    @Option(help: "The test bed script (its CAIRN_TESTBED_* environment is inherited).") var testbed: String
    @Option(name: .customLong("size-mib"), help: "Volume size in MiB.") var sizeMiB: Int64 = 2048
    @Option(name: .customLong("fill-mib"), help: "MiB written before the outage (the delta resync's volume contents).") var fillMiB: Int = 1024
    @Option(help: "Percent of the volume rewritten during the outage.") var changedPercent: Double = 1
    @Option(name: .customLong("rebuild-mib"), help: "MiB written while the node is away for the full-rebuild measurement.") var rebuildMiB: Int = 1024
    @Option(help: "Directory for staging and target paths (under the nodes' --path-root).") var workDir: String
    @Option(help: "Where the JSON result goes.") var out: String

    func validate() throws {
        // Both files live in one ext4 on the volume, which needs room for its own metadata.
        guard Int64(fillMiB + rebuildMiB) <= sizeMiB * 9 / 10 else {
            throw ValidationError("--fill-mib + --rebuild-mib (\(fillMiB + rebuildMiB)) must fit in 90% of --size-mib (\(sizeMiB)): both files are written to the volume's filesystem")
        }
    }

    func run() async throws {
        let controller = CSIClient(endpoint: self.controller)
        let node = CSIClient(endpoint: self.node)
        let volume = try await createVolume(controller, name: "bench-resync-\(UUID().uuidString.prefix(8))",
                                            bytes: sizeMiB << 20, replicas: 3, preferredNode: nodeID)
        let attachment = Attachment(volume: volume, nodeID: nodeID, root: workDir)
        var killed = false
        do {
            try await attachment.publish(controller: controller, node: node)
            let file = attachment.target + "/data"
            log("resync: writing \(fillMiB) MiB")
            try sequentialWrite(file, mib: fillMiB, seed: 1)

            // (1) delta resync
            try testbedRun("kill", victim)
            killed = true
            let blocks = fillMiB * 256
            let count = Int(Double(sizeMiB << 20) * changedPercent / 100) / 4096
            var indexes = Set<Int>()
            while indexes.count < min(count, blocks) { indexes.insert(Int.random(in: 0..<blocks)) }
            try randomRewrite(file, blocks: indexes.sorted(), seed: 2)
            let changed = Int64(indexes.count * 4096)
            let before = try wireBytes()
            let start = ContinuousClock.now
            try testbedRun("restart", victim)
            killed = false
            try await waitHealthy(controller, volume)
            let deltaSeconds = seconds(ContinuousClock.now - start)
            let moved = try wireBytes() - before
            log("delta resync: \(changed) bytes changed, \(moved) on the wire (\(String(format: "%.3f", Double(moved) / Double(changed)))×), healthy after \(String(format: "%.1f", deltaSeconds)) s")

            // (2) full rebuild
            try testbedRun("kill", victim)
            killed = true
            log("full rebuild: writing \(rebuildMiB) MiB while \(victim) is away")
            try sequentialWrite(attachment.target + "/rebuild", mib: rebuildMiB, seed: 3)
            let rebuildStart = try wireBytes()
            let t0 = ContinuousClock.now
            try testbedRun("restart", victim)
            killed = false
            var samples: [(Double, Int64)] = []
            while true {
                samples.append((seconds(ContinuousClock.now - t0), try wireBytes() - rebuildStart))
                if try await healthy(controller, volume) { break }
                guard seconds(ContinuousClock.now - t0) < 600 else { throw BenchError("the full rebuild did not finish in 600 s") }
                try await Task.sleep(for: .milliseconds(200))
            }
            let total = Int64(rebuildMiB) << 20
            let rebuildSeconds = seconds(ContinuousClock.now - t0)
            guard let a = samples.first(where: { $0.1 >= total / 10 }), let b = samples.first(where: { $0.1 >= total * 9 / 10 }),
                  b.0 > a.0 else {
                throw BenchError("too few samples of the rebuild to compute a rate (\(samples.count))")
            }
            let rate = Double(b.1 - a.1) / (b.0 - a.0)
            log("full rebuild: \(String(format: "%.0f", rate / 1e6)) MB/s on the wire, healthy after \(String(format: "%.1f", rebuildSeconds)) s")
            try await attachment.unpublish(controller: controller, node: node)
            try await deleteVolume(controller, volume)
            try writeJSON([
                "volume_mib": sizeMiB, "fill_mib": fillMiB, "changed_bytes": changed, "wire_bytes": moved,
                "wire_over_changed": Double(moved) / Double(changed), "delta_resync_seconds": deltaSeconds,
                "rebuild_bytes": total, "rebuild_seconds": rebuildSeconds, "rebuild_rate_bytes_per_second": rate,
            ], to: out)
        } catch {
            if killed { try? testbedRun("restart", victim) }
            try? await attachment.unpublish(controller: controller, node: node)
            try? await deleteVolume(controller, volume)
            throw error
        }
    }

    func healthy(_ controller: CSIClient, _ volume: String) async throws -> Bool {
        var request = Csi_V1_ControllerGetVolumeRequest()
        request.volumeID = volume
        let response = try await controller.call("Controller", "ControllerGetVolume", request,
                                                  as: Csi_V1_ControllerGetVolumeResponse.self)
        return !response.status.volumeCondition.abnormal
    }

    func waitHealthy(_ controller: CSIClient, _ volume: String) async throws {
        let deadline = ContinuousClock.now + .seconds(600)
        while try await !healthy(controller, volume) {
            guard ContinuousClock.now < deadline else { throw BenchError("volume \(volume) is not healthy after 600 s") }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    /// Bytes received plus sent on the victim's eth0 (its only link).
    func wireBytes() throws -> Int64 {
        let text = try testbedRun("exec", victim, "cat", "/proc/net/dev")
        guard let line = text.split(separator: "\n").first(where: { $0.trimmingCharacters(in: .whitespaces).hasPrefix("eth0:") }) else {
            throw BenchError("no eth0 in \(victim)'s /proc/net/dev")
        }
        let fields = line.split(separator: ":", maxSplits: 1)[1].split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 9, let rx = Int64(fields[0]), let tx = Int64(fields[8]) else { throw BenchError("cannot parse \(line)") }
        return rx + tx
    }

    @discardableResult
    func testbedRun(_ arguments: String...) throws -> String {
        try runTestbedScript(testbed, arguments)
    }

    func seconds(_ d: Duration) -> Double { milliseconds(d) / 1000 }
}

private let oDirect: Int32 = 0o40000  // Linux x86_64; Glibc's module does not export O_DIRECT

/// Writes `mib` MiB of distinct data to a new file with 1 MiB O_DIRECT writes, then fsyncs.
func sequentialWrite(_ path: String, mib: Int, seed: UInt8) throws {
    let fd = open(path, O_CREAT | O_WRONLY | oDirect | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw BenchError("open \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    guard let memory = aligned_alloc(4096, 1 << 20) else { throw BenchError("aligned_alloc failed") }
    defer { free(memory) }
    for i in 0..<mib {
        memset(memory, Int32(seed), 1 << 20)
        for block in 0..<256 { memory.storeBytes(of: UInt64(i * 256 + block), toByteOffset: block * 4096, as: UInt64.self) }
        guard pwrite(fd, memory, 1 << 20, off_t(i) << 20) == 1 << 20 else {
            throw BenchError("write \(path): \(String(cString: strerror(errno)))")
        }
    }
    guard fsync(fd) == 0 else { throw BenchError("fsync \(path): \(String(cString: strerror(errno)))") }
}

/// Overwrites the given 4 KiB blocks of an existing file in place (O_DIRECT), then fsyncs.
func randomRewrite(_ path: String, blocks: [Int], seed: UInt8) throws {
    let fd = open(path, O_WRONLY | oDirect | O_CLOEXEC)
    guard fd >= 0 else { throw BenchError("open \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    guard let memory = aligned_alloc(4096, 4096) else { throw BenchError("aligned_alloc failed") }
    defer { free(memory) }
    for block in blocks {
        memset(memory, Int32(seed), 4096)
        memory.storeBytes(of: UInt64(block), as: UInt64.self)
        guard pwrite(fd, memory, 4096, off_t(block) * 4096) == 4096 else {
            throw BenchError("rewrite \(path) block \(block): \(String(cString: strerror(errno)))")
        }
    }
    guard fsync(fd) == 0 else { throw BenchError("fsync \(path): \(String(cString: strerror(errno)))") }
}
