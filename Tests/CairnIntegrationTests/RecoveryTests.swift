import CSIProto
import CairnCore
import CairnReplica
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Issue 6's acceptance tests on the network-namespace test bed: real node processes, real
/// replicas on disk, real FUSE engines. Bytes on the wire are the target node's own interface
/// counters (eth0 in its namespace: everything it sent and received, control plane included);
/// data is verified with `cairn replica digest` on every replica against the volume as the
/// application reads it.
final class RecoveryTests: XCTestCase {
    var bed: Testbed!

    override func tearDown() async throws {
        if let problem = bed?.down(after: testRun, logLines: 80) { XCTFail(problem) }
        bed = nil
    }

    // MARK: Tests

    /// 1% of a 2 GiB volume is rewritten while a replica's node is down; when it returns, the
    /// resync moves no more than 1.5× the changed bytes and every replica holds the same data.
    func testAReplicaBackFromAnOutageCopiesOnlyWhatChanged() async throws {
        bed = try Testbed.up(nodes: 3, nodeArgs: ["--rebuild-rate", "0", "--resync-retry", "0.5"])
        let size: Int64 = 2 << 30
        let volume = try await createVolume("outage", bytes: size)
        let attached = try await attach(volume, on: "n1")
        try fill(attached.target, bytes: Int(size), seed: 1)

        try bed.kill("n3")
        let blocks = Int(size) / 4096
        var indexes = Set<Int>()
        while indexes.count < blocks / 100 { indexes.insert(Int.random(in: 0..<blocks)) }
        try rewrite(attached.target, blocks: indexes.sorted(), seed: 2)
        let changed = Int64(indexes.count * 4096)
        let condition = try await controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition
        XCTAssertTrue(condition.abnormal && condition.message.contains("n3"), condition.message)

        let before = try wireBytes("n3")
        try bed.restart("n3")
        try await waitHealthy(volume, seconds: 180)
        let moved = try wireBytes("n3") - before
        let ratio = Double(moved) / Double(changed)
        print("resync after an outage: \(changed) bytes changed, \(moved) bytes on n3's wire (\(String(format: "%.3f", ratio))×)")
        XCTAssertLessThanOrEqual(ratio, 1.5, "the resync moved \(moved) bytes for \(changed) changed")
        XCTAssertGreaterThanOrEqual(ratio, 1.0, "fewer bytes than changed reached n3: was it copied at all?")
        try verifyReplicas(volume, device: attached.target, on: ["n1", "n2", "n3"])
        try await detach(volume, attached)
    }

    /// `cairn node remove` on a replica's node: the controller re-creates that replica on the
    /// spare node, the engine copies it in full, and the volume is back to 3 in-sync replicas.
    func testARemovedNodesReplicaIsRecreatedOnAnotherNode() async throws {
        bed = try Testbed.up(nodes: 4, nodeArgs: ["--rebuild-rate", "0", "--resync-retry", "0.5"])
        let volume = try await createVolume("removed", bytes: 256 << 20)
        let holders = try replicaNodes(volume)
        XCTAssertEqual(holders.count, 3)
        let home = holders[0]
        let victim = holders[2]
        let spare = try XCTUnwrap(bed.nodes.first { !holders.contains($0) })
        let attached = try await attach(volume, on: home)
        try fill(attached.target, bytes: 256 << 20, seed: 3)

        try bed.kill(victim)
        let removal = try cairnCLI(["node", "remove", victim])
        print(removal)
        XCTAssertTrue(removal.contains(volume.id), "node remove does not name the affected volume:\n\(removal)")
        let deadline = Date().addingTimeInterval(180)
        while try replicaNodes(volume).contains(victim) {
            guard Date() < deadline else { throw FixtureError("\(victim)'s replica was not replaced in 180 s:\n\(try cairnCLI(["volume", "inspect", volume.id]))") }
            try await Task.sleep(for: .milliseconds(250))
        }
        try await waitHealthy(volume, seconds: 180)
        let now = try replicaNodes(volume)
        XCTAssertEqual(Set(now), Set(holders.filter { $0 != victim } + [spare]), "replicas are on \(now)")
        try verifyReplicas(volume, device: attached.target, on: now)
        let inspect = try cairnCLI(["volume", "inspect", volume.id])
        XCTAssertTrue(inspect.contains(spare), inspect)
        try await detach(volume, attached)
    }

    /// The target of a rebuild is killed halfway; after it returns the rebuild continues and
    /// moves less than what remained plus 10%.
    func testAnInterruptedRebuildResumesWhereItStopped() async throws {
        bed = try Testbed.up(nodes: 3, nodeArgs: ["--rebuild-rate", "40", "--resync-retry", "0.5"])
        let volume = try await createVolume("resume", bytes: 512 << 20)
        let attached = try await attach(volume, on: "n1")
        try bed.kill("n3")
        let changed: Int64 = 320 << 20
        try fill(attached.target, bytes: Int(changed), seed: 4)

        var start = try wireBytes("n3")
        try bed.restart("n3")
        // Kill it once it has received about half.
        let deadline = Date().addingTimeInterval(120)
        while try wireBytes("n3") - start < changed / 2 {
            guard Date() < deadline else { return XCTFail("n3 received only \(try wireBytes("n3") - start) bytes in 120 s") }
            usleep(50_000)
        }
        try bed.kill("n3")
        let first = try wireBytes("n3") - start
        let remaining = changed - first
        start = try wireBytes("n3")
        try bed.restart("n3")
        try await waitHealthy(volume, seconds: 180)
        print("interrupted rebuild: healthy at \(Date())")
        let second = try wireBytes("n3") - start
        print("interrupted rebuild: \(changed) bytes to copy, \(first) moved before the kill, \(second) after it (remaining \(remaining); \(String(format: "%.3f", Double(second) / Double(remaining)))× the remaining)")
        XCTAssertLessThan(Double(second), Double(remaining) * 1.1, "the resumed rebuild moved \(second) bytes for \(remaining) remaining")
        try verifyReplicas(volume, device: attached.target, on: ["n1", "n2", "n3"])
        try await detach(volume, attached)
    }

    /// A rebuild limited to 50 MB/s runs within 10% of it.
    func testTheRebuildRateLimitIsHonoured() async throws {
        bed = try Testbed.up(nodes: 3, nodeArgs: ["--rebuild-rate", "50", "--resync-retry", "0.5"])
        let volume = try await createVolume("throttled", bytes: 1 << 30)
        let attached = try await attach(volume, on: "n1")
        try bed.kill("n3")
        let changed: Int64 = 512 << 20
        try fill(attached.target, bytes: Int(changed), seed: 5)
        let start = try wireBytes("n3")
        try bed.restart("n3")
        // Samples of (time, bytes received by n3) until the volume is healthy again.
        var samples: [(Double, Int64)] = []
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline {
            samples.append((monotonic(), try wireBytes("n3") - start))
            if try await !controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition.abnormal { break }
            usleep(250_000)
        }
        // The steady part: from 20% to 80% of the copy.
        guard let a = samples.first(where: { $0.1 >= changed / 5 }), let b = samples.first(where: { $0.1 >= changed * 4 / 5 }),
              b.0 > a.0 else {
            return XCTFail("the rebuild did not get through 80% of \(changed) bytes: \(samples.last.map { "\($0.1)" } ?? "none")")
        }
        let rate = Double(b.1 - a.1) / (b.0 - a.0)
        print("rebuild limited to 50 MB/s: measured \(String(format: "%.1f", rate / 1e6)) MB/s on n3's wire")
        XCTAssertEqual(rate, 50e6, accuracy: 5e6, "measured \(rate / 1e6) MB/s")
        try await waitHealthy(volume, seconds: 120)
        try await detach(volume, attached)
    }

    /// Bytes corrupted on disk: on the attached node's replica they are found by a read (which
    /// still returns the right data) and repaired; on another node's by the scrub.
    func testCorruptedBlocksAreRepairedOnReadAndByTheScrub() async throws {
        bed = try Testbed.up(nodes: 3, nodeArgs: ["--scrub-rate", "100"])
        let volume = try await createVolume("corrupt", bytes: 64 << 20)
        let attached = try await attach(volume, on: "n1")
        try fill(attached.target, bytes: 64 << 20, seed: 6)

        // n1 (local: reads come from it): block 100.
        try corrupt(volume, on: "n1", block: 100)
        let read = try BlockWriter.readDirect(device: attached.target, index: 100)
        XCTAssertEqual(read, Self.pattern(block: 100, seed: 6), "the read did not return the good copy")
        XCTAssertTrue(bed.logTail(bed.engineProcess("n1"), lines: 400).contains("repaired a corrupted block"), bed.logTail(bed.engineProcess("n1"), lines: 40))
        // n2: block 7000, never read: the scrub finds it.
        try corrupt(volume, on: "n2", block: 7000)
        let deadline = Date().addingTimeInterval(60)
        while !bed.logTail(bed.engineProcess("n1"), lines: 400).contains("found.by=scrub") {
            guard Date() < deadline else { return XCTFail("the scrub did not repair n2's block in 60 s") }
            usleep(200_000)
        }
        try verifyReplicas(volume, device: attached.target, on: ["n1", "n2", "n3"])
        let stats = try await node("n1").nodeGetVolumeStats(CSI.stats(volume.id, path: attached.target))
        XCTAssertTrue(stats.volumeCondition.message.contains("repaired 2"), stats.volumeCondition.message)
        try await detach(volume, attached)
    }

    // MARK: Steps

    struct Volume {
        let id: String
        let bytes: Int64
    }

    typealias Attached = Testbed.Attached

    var controller: CSIClient { bed.controller }
    func node(_ name: String) -> CSIClient { bed.node(name) }

    func createVolume(_ name: String, bytes: Int64) async throws -> Volume {
        let response = try await controller.createVolume(
            CSI.create(name: name, access: .block, required: bytes, parameters: ["replicas": "3"]))
        return Volume(id: response.volume.volumeID, bytes: response.volume.capacityBytes)
    }

    func attach(_ volume: Volume, on name: String) async throws -> Attached {
        try await bed.attachBlock(volume.id, on: name)
    }

    func detach(_ volume: Volume, _ attached: Attached) async throws {
        try await bed.detach(volume.id, attached)
    }

    func waitHealthy(_ volume: Volume, seconds: Double) async throws {
        let deadline = Date().addingTimeInterval(seconds)
        var message = ""
        while Date() < deadline {
            let condition = try await controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition
            if !condition.abnormal { return }
            message = condition.message
            try await Task.sleep(for: .milliseconds(250))
        }
        throw FixtureError("volume \(volume.id) is not healthy after \(Int(seconds)) s: \(message)")
    }

    /// The nodes holding the volume's replicas, as `cairn volume inspect --output json` lists them.
    func replicaNodes(_ volume: Volume) throws -> [String] {
        let text = try cairnCLI(["volume", "inspect", volume.id, "--output", "json"])
        guard let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any],
              let replicas = object["replicas"] as? [[String: Any]] else {
            throw FixtureError("cairn volume inspect --output json printed no replicas:\n\(text)")
        }
        return replicas.compactMap { $0["nodeID"] as? String }
    }

    /// Runs `cairn ARGS --store etcd --etcd-endpoints …` in the controller's namespace.
    func cairnCLI(_ arguments: [String]) throws -> String {
        try bed.exec("ctl", [try PluginProcess.locateBinary()] + arguments + bed.etcdArguments)
    }

    /// Bytes received plus sent on the node's eth0 (its only link).
    func wireBytes(_ name: String) throws -> Int64 {
        let text = try bed.exec(name, ["cat", "/proc/net/dev"])
        guard let line = text.split(separator: "\n").first(where: { $0.trimmingCharacters(in: .whitespaces).hasPrefix("eth0:") }) else {
            throw FixtureError("no eth0 in \(name)'s /proc/net/dev:\n\(text)")
        }
        let fields = line.split(separator: ":", maxSplits: 1)[1].split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 9, let rx = Int64(fields[0]), let tx = Int64(fields[8]) else {
            throw FixtureError("cannot parse \(line)")
        }
        return rx + tx
    }

    /// Every listed replica's digest equals that of the volume read through `device`.
    func verifyReplicas(_ volume: Volume, device: String, on nodes: [String]) throws {
        let started = Date()
        defer { print("verified \(nodes) in \(String(format: "%.1f", Date().timeIntervalSince(started))) s") }
        let expected = try Self.digest(device: device, bytes: volume.bytes)
        print("volume digest read in \(String(format: "%.1f", Date().timeIntervalSince(started))) s")
        for name in nodes {
            let address = try XCTUnwrap(bed.dataAddress(name))
            let output = try bed.exec(name, [try PluginProcess.locateBinary(), "replica", "digest", volume.id, "--address", address])
            XCTAssertTrue(output.contains("digest \(expected.hex) "), "\(name)'s replica differs from the volume (\(expected)): \(output)")
        }
    }

    static func digest(device: String, bytes: Int64) throws -> VolumeDigest {
        let fd = open(device, O_RDONLY | BlockWriter.O_DIRECT | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("open \(device): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let chunk = 4 << 20
        let buffer = UnsafeMutableRawBufferPointer(start: aligned_alloc(4096, chunk), count: chunk)
        defer { free(buffer.baseAddress) }
        var digest = VolumeDigest()
        var offset: Int64 = 0
        while offset < bytes {
            let n = pread(fd, buffer.baseAddress, chunk, off_t(offset))
            guard n > 0, n % 4096 == 0 else { throw FixtureError("pread \(device) at \(offset): \(n)") }
            digest.add(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            offset += Int64(n)
        }
        return digest
    }

    /// A block's contents for a seed: different for every block and seed.
    static func pattern(block: Int, seed: UInt64) -> [UInt8] {
        var state = UInt64(block) &* 0x9E37_79B9_7F4A_7C15 ^ seed &* 0xD1B5_4A32_D192_ED03
        var bytes = [UInt8](repeating: 0, count: 4096)
        bytes.withUnsafeMutableBytes { raw in
            let words = raw.bindMemory(to: UInt64.self)
            for i in words.indices {
                state = state &* 6364136223846793005 &+ 1442695040888963407
                words[i] = state
            }
        }
        return bytes
    }

    /// Writes `bytes` from offset 0 in 1 MiB O_DIRECT writes of patterned blocks, then fsyncs.
    func fill(_ device: String, bytes: Int, seed: UInt64) throws {
        try write(device, blocks: Array(0..<(bytes / 4096)), seed: seed, run: 256)
    }

    /// Rewrites the given blocks (4 KiB O_DIRECT writes), then fsyncs.
    func rewrite(_ device: String, blocks: [Int], seed: UInt64) throws {
        try write(device, blocks: blocks, seed: seed, run: 1)
    }

    private func write(_ device: String, blocks: [Int], seed: UInt64, run: Int) throws {
        let fd = open(device, O_RDWR | BlockWriter.O_DIRECT | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("open \(device): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer(start: aligned_alloc(4096, run * 4096), count: run * 4096)
        defer { free(buffer.baseAddress) }
        var i = 0
        while i < blocks.count {
            var n = 1
            while n < run && i + n < blocks.count && blocks[i + n] == blocks[i] + n { n += 1 }
            for j in 0..<n {
                Self.pattern(block: blocks[i + j], seed: seed).withUnsafeBytes {
                    (buffer.baseAddress! + j * 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096)
                }
            }
            let written = pwrite(fd, buffer.baseAddress, n * 4096, off_t(blocks[i] * 4096))
            guard written == n * 4096 else {
                throw FixtureError("pwrite \(device) block \(blocks[i]): \(written < 0 ? String(cString: strerror(errno)) : "short")")
            }
            i += n
        }
        guard fsync(fd) == 0 else { throw FixtureError("fsync \(device): \(String(cString: strerror(errno)))") }
    }

    /// Overwrites 16 bytes in the middle of `block` in the node's replica data file, behind the
    /// replica's back (O_DIRECT, as the replica reads it).
    func corrupt(_ volume: Volume, on name: String, block: Int) throws {
        let layers = bed.stateDir + "/\(name)/replicas/\(volume.id)/layers"
        let head = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: layers).sorted().last)
        let path = "\(layers)/\(head)/data"
        let fd = open(path, O_RDWR | BlockWriter.O_DIRECT | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer(start: aligned_alloc(4096, 4096), count: 4096)
        defer { free(buffer.baseAddress) }
        guard pread(fd, buffer.baseAddress, 4096, off_t(block * 4096)) == 4096 else { throw FixtureError("pread \(path)") }
        for i in 2000..<2016 { buffer[i] ^= 0xFF }
        guard pwrite(fd, buffer.baseAddress, 4096, off_t(block * 4096)) == 4096 else { throw FixtureError("pwrite \(path)") }
    }

    func monotonic() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
