import CairnCore
@testable import CairnReplica
import Dispatch
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The replica-side primitives of delta resync (docs/recovery.md) over real TCP: the
/// `generations` op and if-newer (resync) writes.
final class ReplicaResyncTests: XCTestCase {
    private var root = ""
    private var server: ReplicaServer?
    private var clients: [ReplicaClient] = []
    private let volume = "vol-resync"
    private let size: UInt64 = 256 << 20  // 65,536 blocks: one largest generations request
    private let bs = FrameLimits.blockSize

    override func setUpWithError() throws {
        root = "/tmp/cairn-replica-resync-test-" + UUID().uuidString
        XCTAssertEqual(mkdir(root, 0o700), 0)
        let s = try ReplicaServer(dataDir: root, host: "127.0.0.1", port: 0, logger: ReplicaStore.discardingLogger)
        try s.start()
        server = s
    }

    override func tearDownWithError() throws {
        for c in clients { c.close() }
        clients = []
        server?.stop()
        server = nil
        if !root.isEmpty { try? FileManager.default.removeItem(atPath: root) }
    }

    private func client() throws -> ReplicaClient {
        let c = try ReplicaClient(host: "127.0.0.1", port: server!.boundPort, requestTimeout: .seconds(20))
        clients.append(c)
        return c
    }

    /// A client on a created volume claimed at `epoch`.
    private func prepared(epoch: UInt64 = 2) throws -> ReplicaClient {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        _ = try c.claim(volumeID: volume, epoch: epoch)
        return c
    }

    /// Block contents that differ per generation and per block.
    private static func blockData(generation: UInt64, block: UInt64) -> [UInt8] {
        (0..<FrameLimits.blockSize).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(truncatingIfNeeded: generation) &* 7 &+ Int(truncatingIfNeeded: block) &* 3 &+ ($0 >> 8)) }
    }

    private func write(_ c: ReplicaClient, block: UInt64, blocks: Int = 1, generation: UInt64, epoch: UInt64 = 2,
                       ifNewer: Bool = false) throws -> Int {
        try Self.write(c, volume: volume, block: block, blocks: blocks, generation: generation, epoch: epoch, ifNewer: ifNewer)
    }

    private static func write(_ c: ReplicaClient, volume: String, block: UInt64, blocks: Int = 1, generation: UInt64,
                              epoch: UInt64 = 2, ifNewer: Bool = false) throws -> Int {
        let data = (0..<UInt64(blocks)).flatMap { Self.blockData(generation: generation, block: block + $0) }
        return try data.withUnsafeBytes {
            try c.write(volumeID: volume, offset: block * UInt64(FrameLimits.blockSize), data: $0, generation: generation, epoch: epoch, ifNewer: ifNewer)
        }
    }


    // MARK: generations

    func testGenerationsAfterWritesTrimsAndNothing() throws {
        let c = try prepared()
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 0, count: 8, epoch: 2), [UInt64](repeating: 0, count: 8))
        _ = try write(c, block: 1, blocks: 3, generation: 5)
        _ = try write(c, block: 2, generation: 6)
        try c.trim(volumeID: volume, offset: UInt64(3 * bs), length: UInt64(2 * bs), generation: 7, epoch: 2)
        let t = BlockGenerations.trimmedBit
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 0, count: 6, epoch: 2), [0, 5, 6, 7 | t, 7 | t, 0])
        // A write after a trim clears the trimmed bit.
        _ = try write(c, block: 4, generation: 8)
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 3, count: 2, epoch: 2), [7 | t, 8])

        // The largest request, ending at the last block; it survives a restart (flush, reopen).
        let blocks = size / UInt64(bs)
        _ = try write(c, block: blocks - 1, generation: 9)
        try c.flush(volumeID: volume, epoch: 2)
        c.close()
        server!.stop()
        let s = try ReplicaServer(dataDir: root, host: "127.0.0.1", port: 0, logger: ReplicaStore.discardingLogger)
        try s.start()
        server = s
        let again = try client()
        XCTAssertEqual(blocks, 65_536)
        let all = try again.generations(volumeID: volume, firstBlock: 0, count: 65_536, epoch: 2)
        XCTAssertEqual(all.count, 65_536)
        XCTAssertEqual(all.last, 9)
        XCTAssertEqual(Array(all[0..<6]), [0, 5, 6, 7 | t, 8, 0])
        XCTAssertEqual(all.filter { $0 != 0 }.count, 5)
    }

    func testGenerationsCountLimitsRangeAndEpochAreRefused() throws {
        let c = try prepared(epoch: 4)
        let blocks = size / UInt64(bs)
        assertRemote(.badRequest, containing: ["count 0"]) { try c.generations(volumeID: volume, firstBlock: 0, count: 0, epoch: 4) }
        assertRemote(.badRequest, containing: ["65536"]) { try c.generations(volumeID: volume, firstBlock: 0, count: 65_537, epoch: 4) }
        assertRemote(.outOfRange, containing: ["beyond the end"]) { try c.generations(volumeID: volume, firstBlock: blocks - 1, count: 2, epoch: 4) }
        assertRemote(.outOfRange, containing: ["beyond the end"]) { try c.generations(volumeID: volume, firstBlock: .max, count: 1, epoch: 4) }
        assertRemote(.staleEpoch, containing: ["stale epoch 3"]) { try c.generations(volumeID: volume, firstBlock: 0, count: 1, epoch: 3) }
        assertRemote(.notFound) { try c.generations(volumeID: "vol-missing", firstBlock: 0, count: 1, epoch: 4) }
        // The connection stays usable after every refusal.
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: blocks - 1, count: 1, epoch: 4), [0])
    }

    func testTheStoreRefusesGenerationsThatWouldCollideWithTheTrimmedBit() throws {
        let c = try prepared()
        assertRemote(.badRequest, containing: ["above the limit"]) {
            try write(c, block: 0, generation: BlockGenerations.trimmedBit)
        }
        assertRemote(.badRequest, containing: ["above the limit"]) {
            try write(c, block: 0, generation: BlockGenerations.trimmedBit, ifNewer: true)
        }
        assertRemote(.badRequest, containing: ["above the limit"]) {
            try c.trim(volumeID: volume, offset: 0, length: UInt64(bs), generation: .max, epoch: 2)
        }
        XCTAssertEqual(try write(c, block: 0, generation: BlockGenerations.maxGeneration), 1)
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 0, count: 1, epoch: 2), [BlockGenerations.maxGeneration])
    }

    // MARK: if-newer writes

    func testAResyncWriteSkipsNewerBlocksAndAppliesToOlderAndUnwrittenOnes() throws {
        let c = try prepared()
        // Blocks 0..5: 0 unwritten, 1 at gen 3, 2 at gen 10 (newer), 3 at gen 7 (equal), 4 trimmed at 4, 5 trimmed at 12.
        _ = try write(c, block: 1, generation: 3)
        _ = try write(c, block: 2, generation: 10)
        _ = try write(c, block: 3, generation: 7)
        try c.trim(volumeID: volume, offset: UInt64(4 * bs), length: UInt64(bs), generation: 4, epoch: 2)
        try c.trim(volumeID: volume, offset: UInt64(5 * bs), length: UInt64(bs), generation: 12, epoch: 2)

        XCTAssertEqual(try write(c, block: 0, blocks: 6, generation: 7, ifNewer: true), 3)
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 0, count: 6, epoch: 2),
                       [7, 7, 10, 7, 7, 12 | BlockGenerations.trimmedBit])
        let data = try c.read(volumeID: volume, offset: 0, length: 6 * bs, epoch: 2)
        let expected: [[UInt8]] = [
            Self.blockData(generation: 7, block: 0), Self.blockData(generation: 7, block: 1),
            Self.blockData(generation: 10, block: 2), Self.blockData(generation: 7, block: 3),
            Self.blockData(generation: 7, block: 4), [UInt8](repeating: 0, count: bs),
        ]
        for (i, want) in expected.enumerated() {
            XCTAssertEqual(Array(data[(i * bs)..<((i + 1) * bs)]), want, "block \(i)")
        }
        // Idempotent: the same copy again applies nothing.
        XCTAssertEqual(try write(c, block: 0, blocks: 6, generation: 7, ifNewer: true), 0)
        XCTAssertEqual(try c.status(volumeID: volume, epoch: 2).highestGeneration, 12)
        // Survives a flush and the checksums match what was applied (a read verifies them).
        try c.flush(volumeID: volume, epoch: 2)
        XCTAssertEqual(try c.read(volumeID: volume, offset: 0, length: 6 * bs, epoch: 2), data)
    }

    // MARK: summary, repair, if-newer trims, verify (issue 6)

    /// The data file of the replica's head layer, to damage behind the store's back.
    private func dataFile() throws -> String {
        let layers = root + "/replicas/\(volume)/layers"
        let head = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: layers).sorted().last)
        return "\(layers)/\(head)/data"
    }

    /// Flips 8 bytes of `block` in the data file (O_DIRECT, as the store reads it).
    private func corrupt(block: UInt64) throws {
        let path = try dataFile()
        let fd = open(path, O_RDWR | 0o40000)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let buffer = UnsafeMutableRawBufferPointer(start: aligned_alloc(4096, 4096), count: 4096)
        defer { free(buffer.baseAddress) }
        XCTAssertEqual(pread(fd, buffer.baseAddress, 4096, off_t(block) * 4096), 4096)
        for i in 100..<108 { buffer[i] ^= 0x5A }
        XCTAssertEqual(pwrite(fd, buffer.baseAddress, 4096, off_t(block) * 4096), 4096)
    }

    func testSummariesAreZeroWhenUntouchedEqualForEqualGenerationsAndDifferOtherwise() throws {
        let c = try prepared()
        let regions = Int(size) / bs / ReplicaStore.summaryRegionBlocks
        XCTAssertEqual(try c.generationSummary(volumeID: volume, firstRegion: 0, count: regions, epoch: 2), [UInt64](repeating: 0, count: regions))
        _ = try write(c, block: 300, generation: 5)  // region 1
        try c.trim(volumeID: volume, offset: UInt64(600 * bs), length: UInt64(bs), generation: 6, epoch: 2)  // region 2
        let first = try c.generationSummary(volumeID: volume, firstRegion: 0, count: 4, epoch: 2)
        XCTAssertEqual(first[0], 0)
        XCTAssertNotEqual(first[1], 0)
        XCTAssertNotEqual(first[2], 0)
        XCTAssertNotEqual(first[1], first[2])
        // A second replica holding the same generations has the same digests; one block more differs.
        let other = "vol-resync-2"
        try c.create(volumeID: other, sizeBytes: size)
        _ = try c.claim(volumeID: other, epoch: 2)
        _ = try Self.write(c, volume: other, block: 300, generation: 5)
        try c.trim(volumeID: other, offset: UInt64(600 * bs), length: UInt64(bs), generation: 6, epoch: 2)
        XCTAssertEqual(try c.generationSummary(volumeID: other, firstRegion: 0, count: 4, epoch: 2), first)
        _ = try Self.write(c, volume: other, block: 301, generation: 7)
        let second = try c.generationSummary(volumeID: other, firstRegion: 0, count: 4, epoch: 2)
        XCTAssertNotEqual(second[1], first[1])
        XCTAssertEqual(second[2], first[2])
        // Limits, range and epoch.
        assertRemote(.badRequest, containing: ["summary count"]) { try c.generationSummary(volumeID: volume, firstRegion: 0, count: 4097, epoch: 2) }
        assertRemote(.badRequest, containing: ["beyond"]) { try c.generationSummary(volumeID: volume, firstRegion: UInt64(regions), count: 1, epoch: 2) }
        assertRemote(.staleEpoch, containing: ["stale epoch 1"]) { try c.generationSummary(volumeID: volume, firstRegion: 0, count: 1, epoch: 1) }
    }

    func testAPartialLastRegionIsSummarised() throws {
        let c = try client()
        let odd = "vol-odd"
        try c.create(volumeID: odd, sizeBytes: UInt64(300 * bs))  // 2 regions, the second 44 blocks
        _ = try c.claim(volumeID: odd, epoch: 1)
        XCTAssertEqual(try c.generationSummary(volumeID: odd, firstRegion: 0, count: 2, epoch: 1), [0, 0])
        _ = try Self.write(c, volume: odd, block: 299, generation: 2, epoch: 1)
        let digests = try c.generationSummary(volumeID: odd, firstRegion: 0, count: 2, epoch: 1)
        XCTAssertEqual(digests[0], 0)
        XCTAssertNotEqual(digests[1], 0)
    }

    func testVerifyFindsACorruptedBlockAndARepairWriteFixesItButNeverOverwritesANewerWrite() throws {
        let c = try prepared()
        _ = try write(c, block: 10, blocks: 4, generation: 5)
        try c.flush(volumeID: volume, epoch: 2)
        XCTAssertEqual(try c.verify(volumeID: volume, firstBlock: 0, count: 16_384, epoch: 2), [])
        try corrupt(block: 12)
        XCTAssertEqual(try c.verify(volumeID: volume, firstBlock: 0, count: 16_384, epoch: 2), [12])
        assertRemote(.checksumMismatch, containing: ["block 12"]) { try c.read(volumeID: volume, offset: UInt64(12 * bs), length: bs, epoch: 2) }
        // The damaged block's number travels as a field of the response, not in the message.
        XCTAssertThrowsError(try c.read(volumeID: volume, offset: UInt64(8 * bs), length: 8 * bs, epoch: 2)) { error in
            guard case .damagedBlock(12, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
        }
        // The good copy at the block's own generation is applied (≤), the block reads again.
        let good = Self.blockData(generation: 5, block: 12)
        XCTAssertEqual(try good.withUnsafeBytes {
            try c.repairWrite(volumeID: volume, offset: UInt64(12 * bs), data: $0, generation: 5, epoch: 2)
        }, 1)
        XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(12 * bs), length: bs, epoch: 2), good)
        XCTAssertEqual(try c.verify(volumeID: volume, firstBlock: 0, count: 64, epoch: 2), [])
        // A repair at an older generation than the block's is not applied.
        _ = try write(c, block: 13, generation: 9)
        XCTAssertEqual(try good.withUnsafeBytes {
            try c.repairWrite(volumeID: volume, offset: UInt64(13 * bs), data: $0, generation: 5, epoch: 2)
        }, 0)
        XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(13 * bs), length: bs, epoch: 2), Self.blockData(generation: 9, block: 13))
        assertRemote(.badRequest, containing: ["verify count"]) { try c.verify(volumeID: volume, firstBlock: 0, count: 16_385, epoch: 2) }
        assertRemote(.staleEpoch, containing: ["stale epoch 1"]) { try c.verify(volumeID: volume, firstBlock: 0, count: 1, epoch: 1) }
        assertRemote(.staleEpoch, containing: ["stale epoch 1"]) {
            try good.withUnsafeBytes { try c.repairWrite(volumeID: volume, offset: 0, data: $0, generation: 5, epoch: 1) }
        }
    }

    func testAnIfNewerTrimSkipsNewerBlocks() throws {
        let c = try prepared()
        _ = try write(c, block: 0, generation: 3)
        _ = try write(c, block: 1, generation: 9)
        XCTAssertEqual(try c.trim(volumeID: volume, offset: 0, length: UInt64(3 * bs), generation: 5, epoch: 2, ifNewer: true), 2)
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 0, count: 3, epoch: 2),
                       [5 | BlockGenerations.trimmedBit, 9, 5 | BlockGenerations.trimmedBit])
        XCTAssertEqual(try c.read(volumeID: volume, offset: 0, length: bs, epoch: 2), [UInt8](repeating: 0, count: bs))
        XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(bs), length: bs, epoch: 2), Self.blockData(generation: 9, block: 1))
        XCTAssertEqual(try c.trim(volumeID: volume, offset: 0, length: UInt64(3 * bs), generation: 5, epoch: 2, ifNewer: true), 0)
        assertRemote(.staleEpoch, containing: ["stale epoch 1"]) {
            try c.trim(volumeID: volume, offset: 0, length: UInt64(bs), generation: 5, epoch: 1, ifNewer: true)
        }
    }

    func testTheClientCountsItsBytesOnTheWire() throws {
        let c = try prepared()
        let (sent, received) = (c.bytesSent, c.bytesReceived)
        _ = try write(c, block: 0, blocks: 4, generation: 3)
        XCTAssertGreaterThanOrEqual(c.bytesSent - sent, UInt64(4 * bs))
        XCTAssertLessThan(c.bytesSent - sent, UInt64(4 * bs + 128))
        _ = try c.read(volumeID: volume, offset: 0, length: 4 * bs, epoch: 2)
        XCTAssertGreaterThanOrEqual(c.bytesReceived - received, UInt64(4 * bs))
    }

    func testAResyncWriteIsFencedAndValidatedLikeAWrite() throws {
        let c = try prepared(epoch: 5)
        assertRemote(.staleEpoch, containing: ["stale epoch 4"]) { try write(c, block: 0, generation: 3, epoch: 4, ifNewer: true) }
        assertRemote(.outOfRange, containing: ["beyond the end"]) {
            try write(c, block: size / UInt64(bs), generation: 3, epoch: 5, ifNewer: true)
        }
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 0, count: 1, epoch: 5), [0])
        // The plain form of the call still works and reports every block.
        XCTAssertEqual(try write(c, block: 0, blocks: 2, generation: 3, epoch: 5), 2)
    }

    /// One thread writes blocks normally at increasing generations; another copies older or
    /// interleaved generations over the same blocks as resync writes. At the end every block
    /// holds data matching its recorded generation (checksum verified by the read), and never a
    /// generation below the last normal write to it.
    func testResyncWritesNeverOverwriteNewerWritesUnderConcurrency() throws {
        let c = try prepared()
        let blocks: UInt64 = 8
        let rounds: UInt64 = 600
        let lastNormal = Mutex([UInt64](repeating: 0, count: Int(blocks)))
        let failures = Mutex<[String]>([])
        let applied = Atomic<Int>(0)
        let volume = volume
        let group = DispatchGroup()
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            do {
                for k in 1...rounds {
                    let block = k % blocks
                    let generation = 2 * k
                    _ = try Self.write(c, volume: volume, block: block, generation: generation)
                    lastNormal.withLock { $0[Int(block)] = generation }
                }
            } catch {
                failures.withLock { $0.append("normal write: \(error)") }
            }
        }
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            var rng = SystemRandomNumberGenerator()
            do {
                for _ in 0..<rounds {
                    // Odd generations anywhere in the run: some older than the blocks, some newer.
                    let generation = 2 * UInt64.random(in: 0..<rounds, using: &rng) + 1
                    let first = UInt64.random(in: 0..<blocks, using: &rng)
                    let n = Int.random(in: 1...Int(blocks - first), using: &rng)
                    let count = try Self.write(c, volume: volume, block: first, blocks: n, generation: generation, ifNewer: true)
                    applied.add(count, ordering: .relaxed)
                }
            } catch {
                failures.withLock { $0.append("resync write: \(error)") }
            }
        }
        group.wait()
        XCTAssertEqual(failures.withLock { $0 }, [])

        let generations = try c.generations(volumeID: volume, firstBlock: 0, count: Int(blocks), epoch: 2)
        let data = try c.read(volumeID: volume, offset: 0, length: Int(blocks) * bs, epoch: 2)
        let last = lastNormal.withLock { $0 }
        for b in 0..<Int(blocks) {
            XCTAssertFalse(BlockGenerations.isTrimmed(generations[b]))
            XCTAssertGreaterThanOrEqual(generations[b], last[b], "block \(b) went back below its last normal write")
            XCTAssertEqual(Array(data[(b * bs)..<((b + 1) * bs)]), Self.blockData(generation: generations[b], block: UInt64(b)),
                           "block \(b) holds data of another generation than \(generations[b])")
        }
        XCTAssertGreaterThan(applied.load(ordering: .relaxed), 0, "no resync write applied: the test proved nothing")
    }
}
