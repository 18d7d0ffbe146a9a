import CSIProto
import CairnCore
import CairnRPC
import Foundation
import Synchronization
import XCTest

/// Issue 4's acceptance tests: real processes on the network-namespace test bed (etcd, a
/// controller, three nodes each with an agent and a replica server), real FUSE engines, loop
/// devices and block I/O. A writer records every acknowledged (O_DSYNC) checksummed block; after
/// each failure every acknowledged block must read back intact.
final class ReplicatedFailoverTests: XCTestCase {
    var bed: Testbed!

    override func setUp() async throws {
        bed = try Testbed.up(nodes: 3)
    }

    override func tearDown() async throws {
        if let bed {
            if let run = testRun, run.failureCount + run.unexpectedExceptionCount > 0 {
                for name in bed.processNames { print("==> \(name).log\n" + bed.logTail(name, lines: 60)) }
            }
            bed.down()
        }
        bed = nil
    }

    // MARK: The three failures

    /// The attached node's agent is SIGKILLed; the volume moves to another node; every
    /// acknowledged write is there.
    func testAttachedNodeKilledFailsOverWithEveryAcknowledgedWrite() async throws {
        let volume = try await createBlockVolume("killed-node")
        let first = try await attach(volume, on: "n1")
        let writer = try BlockWriter(device: first.target, blocks: volume.blocks)
        writer.start()
        try await writer.waitForAcknowledged(200)

        try bed.kill("n1")
        try await writer.waitUntilStopped(seconds: 30)
        let acknowledged = writer.acknowledged()
        XCTAssertGreaterThanOrEqual(acknowledged.count, 200)

        let second = try await failOver(volume, from: "n1", to: "n2")
        try BlockWriter.verify(device: second.target, acknowledged: acknowledged)

        // The dead node's replica left the in-sync set before the new engine served a byte.
        let condition = try await controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition
        XCTAssertTrue(condition.abnormal, condition.message)
        XCTAssertTrue(condition.message.contains("n1"), condition.message)
        try await detach(volume, second)
    }

    /// The attached node loses etcd and the controller but still reaches the replicas; the
    /// volume fails over; the old engine's later writes are refused by every replica.
    func testPartitionedNodeIsFencedAfterFailover() async throws {
        let volume = try await createBlockVolume("partitioned")
        let first = try await attach(volume, on: "n1")
        let writer = try BlockWriter(device: first.target, blocks: volume.blocks)
        writer.start()
        try await writer.waitForAcknowledged(200)

        try bed.partition("n1")
        let second = try await failOver(volume, from: "n1", to: "n2")
        // The new engine's claim raised every replica's epoch: the old engine is fenced.
        try await writer.waitUntilStopped(seconds: 30)
        XCTAssertNotNil(writer.failure, "the old node kept writing after the failover")
        let acknowledged = writer.acknowledged()

        // A write the old node tries now must not reach any replica.
        let late = BlockWriter.block(index: 7, sequence: UInt64.max)
        XCTAssertThrowsError(try BlockWriter.writeDirect(device: first.target, index: 7, block: late),
                             "a write from the fenced node was acknowledged")
        try BlockWriter.verify(device: second.target, acknowledged: acknowledged)
        let seen = try BlockWriter.readDirect(device: second.target, index: 7)
        XCTAssertNotEqual(seen, late, "the fenced node's write reached the volume")
        try bed.heal("n1")
        try await detach(volume, second)
    }

    /// A replica's node dies during writes: I/O goes on, the volume reports degraded, nothing
    /// acknowledged is lost.
    func testReplicaNodeDeathDegradesWithoutLoss() async throws {
        let volume = try await createBlockVolume("degraded")
        let attached = try await attach(volume, on: "n1")
        let writer = try BlockWriter(device: attached.target, blocks: volume.blocks)
        writer.start()
        try await writer.waitForAcknowledged(100)

        try bed.kill("n3")
        let before = writer.acknowledgedCount
        try await writer.waitForAcknowledged(before + 200, seconds: 60)
        try await writer.stopAndVerify("I/O stopped when one replica of three died")

        let condition = try await controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition
        XCTAssertTrue(condition.abnormal)
        XCTAssertTrue(condition.message.contains("degraded") && condition.message.contains("n3"), condition.message)
        let listed = try await controller.listVolumes().entries.first { $0.volume.volumeID == volume.id }
        XCTAssertEqual(listed?.status.volumeCondition.abnormal, true)
        let stats = try await node("n1").nodeGetVolumeStats(CSI.stats(volume.id, path: attached.target))
        XCTAssertTrue(stats.volumeCondition.abnormal && stats.volumeCondition.message.contains("n3"),
                      stats.volumeCondition.message)
        try await detach(volume, attached)
    }

    // MARK: Steps

    struct Volume {
        let id: String
        let blocks: Int
    }

    typealias Attached = Testbed.Attached

    var controller: CSIClient { bed.controller }
    func node(_ name: String) -> CSIClient { bed.node(name) }

    func createBlockVolume(_ name: String) async throws -> Volume {
        let bytes: Int64 = 64 << 20
        let response = try await controller.createVolume(
            CSI.create(name: name, access: .block, required: bytes, parameters: ["replicas": "3"]))
        XCTAssertEqual(response.volume.capacityBytes, bytes)
        return Volume(id: response.volume.volumeID, blocks: Int(bytes) / BlockWriter.blockSize)
    }

    func attach(_ volume: Volume, on name: String) async throws -> Attached {
        try await bed.attachBlock(volume.id, on: name)
    }

    /// What a CO does when a node is lost: forget its attachment, attach elsewhere.
    func failOver(_ volume: Volume, from old: String, to new: String) async throws -> Attached {
        _ = try await controller.controllerUnpublish(CSI.controllerUnpublish(volume.id, node: old))
        return try await attach(volume, on: new)
    }

    func detach(_ volume: Volume, _ attached: Attached) async throws {
        try await bed.detach(volume.id, attached)
    }
}

/// Writes self-describing 4 KiB blocks (magic, index, sequence, payload, checksum) with
/// O_DIRECT|O_DSYNC — each pwrite that returns is an acknowledged, durable write — and
/// remembers the newest acknowledged sequence of every block.
final class BlockWriter: @unchecked Sendable {
    static let blockSize = 4096
    static let magic: UInt64 = 0x4341_4952_4E42_4C4B  // "CAIRNBLK"
    /// O_DIRECT on Linux x86_64 (Glibc's Swift module does not export it).
    static let O_DIRECT: Int32 = 0o40000

    let device: String
    let blocks: Int
    private let state = Mutex(State())
    private var thread: Thread?

    struct State {
        var acked: [Int: UInt64] = [:]
        var count = 0
        var stopRequested = false
        var stopped = false
        var failure: String?
    }

    init(device: String, blocks: Int) throws {
        self.device = device
        self.blocks = blocks
    }

    var acknowledgedCount: Int { state.withLock { $0.count } }
    var failure: String? { state.withLock { $0.failure } }
    func acknowledged() -> [Int: UInt64] { state.withLock { $0.acked } }

    func start() {
        let thread = Thread { [self] in run() }
        thread.name = "block-writer"
        self.thread = thread
        thread.start()
    }

    func stop() { state.withLock { $0.stopRequested = true } }

    /// Stops writing, then: no write failed (else `failureMessage`), and every acknowledged block
    /// reads back from the device.
    func stopAndVerify(_ failureMessage: String) async throws {
        stop()
        try await waitUntilStopped(seconds: 30)
        if let failure { XCTFail("\(failureMessage): \(failure)") }
        try Self.verify(device: device, acknowledged: acknowledged())
    }

    private func run() {
        defer { state.withLock { $0.stopped = true } }
        let fd = open(device, O_RDWR | BlockWriter.O_DIRECT | O_DSYNC | O_CLOEXEC)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            state.withLock { $0.failure = "open \(device): \(reason)" }
            return
        }
        defer { close(fd) }
        var generator = SystemRandomNumberGenerator()
        var sequence: UInt64 = 0
        let buffer = UnsafeMutableRawBufferPointer(
            start: aligned_alloc(Self.blockSize, Self.blockSize), count: Self.blockSize)
        defer { free(buffer.baseAddress) }
        while !state.withLock({ $0.stopRequested }) {
            sequence += 1
            let index = Int.random(in: 0..<blocks, using: &generator)
            let block = Self.block(index: index, sequence: sequence)
            block.withUnsafeBytes { buffer.copyMemory(from: $0) }
            let n = pwrite(fd, buffer.baseAddress, Self.blockSize, off_t(index * Self.blockSize))
            if n != Self.blockSize {
                let reason = n < 0 ? String(cString: strerror(errno)) : "short write of \(n) bytes"
                state.withLock { $0.failure = "pwrite block \(index): \(reason)" }
                return
            }
            state.withLock {
                $0.acked[index] = sequence
                $0.count += 1
            }
        }
    }

    func waitForAcknowledged(_ count: Int, seconds: Int = 60) async throws {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while acknowledgedCount < count {
            if let failure { throw FixtureError("the writer failed after \(acknowledgedCount) acknowledged writes: \(failure)") }
            guard ContinuousClock.now < deadline else {
                throw FixtureError("only \(acknowledgedCount) of \(count) writes were acknowledged in \(seconds) s")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    func waitUntilStopped(seconds: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while !state.withLock({ $0.stopped }) {
            guard ContinuousClock.now < deadline else {
                throw FixtureError("the writer is still writing (or hung in I/O) after \(seconds) s")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    static func block(index: Int, sequence: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blockSize)
        var seed = sequence &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(index)
        withUnsafeBytes(of: magic.littleEndian) { bytes.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: UInt64(index).littleEndian) { bytes.replaceSubrange(8..<16, with: $0) }
        withUnsafeBytes(of: sequence.littleEndian) { bytes.replaceSubrange(16..<24, with: $0) }
        for i in 24..<(blockSize - 8) {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            bytes[i] = UInt8(truncatingIfNeeded: seed >> 33)
        }
        let sum = checksum(bytes[0..<(blockSize - 8)])
        withUnsafeBytes(of: sum.littleEndian) { bytes.replaceSubrange((blockSize - 8)..<blockSize, with: $0) }
        return bytes
    }

    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return hash
    }

    static func field(_ bytes: [UInt8], _ at: Int) -> UInt64 {
        bytes[at..<(at + 8)].enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * $1.offset) }
    }

    static func readDirect(device: String, index: Int) throws -> [UInt8] {
        let fd = open(device, O_RDONLY | BlockWriter.O_DIRECT | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("open \(device): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer(start: aligned_alloc(blockSize, blockSize), count: blockSize)
        defer { free(buffer.baseAddress) }
        let n = pread(fd, buffer.baseAddress, blockSize, off_t(index * blockSize))
        guard n == blockSize else {
            throw FixtureError("pread block \(index) of \(device): \(n < 0 ? String(cString: strerror(errno)) : "short read")")
        }
        return [UInt8](buffer)
    }

    static func writeDirect(device: String, index: Int, block: [UInt8]) throws {
        let fd = open(device, O_RDWR | BlockWriter.O_DIRECT | O_DSYNC | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("open \(device): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer(start: aligned_alloc(blockSize, blockSize), count: blockSize)
        defer { free(buffer.baseAddress) }
        block.withUnsafeBytes { buffer.copyMemory(from: $0) }
        let n = pwrite(fd, buffer.baseAddress, blockSize, off_t(index * blockSize))
        guard n == blockSize else {
            throw FixtureError("pwrite block \(index): \(n < 0 ? String(cString: strerror(errno)) : "short write")")
        }
    }

    /// Every acknowledged block holds its newest acknowledged version or a later one (a write in
    /// flight at the failure may have landed: block devices allow that), never older, never torn.
    static func verify(device: String, acknowledged: [Int: UInt64]) throws {
        var problems: [String] = []
        for (index, sequence) in acknowledged.sorted(by: { $0.key < $1.key }) {
            let bytes = try readDirect(device: device, index: index)
            let found = field(bytes, 16)
            if field(bytes, 0) != magic {
                problems.append("block \(index): not a written block (acknowledged sequence \(sequence) is lost)")
            } else if field(bytes, 8) != UInt64(index) {
                problems.append("block \(index): holds block \(field(bytes, 8))")
            } else if checksum(bytes[0..<(blockSize - 8)]) != field(bytes, blockSize - 8) {
                problems.append("block \(index): checksum mismatch (torn or corrupt)")
            } else if found < sequence {
                problems.append("block \(index): sequence \(found), older than the acknowledged \(sequence)")
            }
            if problems.count >= 20 { break }
        }
        if !problems.isEmpty {
            throw FixtureError("\(problems.count)+ of \(acknowledged.count) acknowledged blocks are wrong on \(device):\n" + problems.joined(separator: "\n"))
        }
    }
}
