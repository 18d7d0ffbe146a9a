import CairnCore
@testable import CairnReplica
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The replica's layer chain on a real filesystem: snapshots, their deletion (merge), clones.
final class ReplicaSnapshotTests: XCTestCase {
    private var root = ""
    private var dir: String { root + "/replica" }
    private let volume = "pvc-snap"
    private let bs = ReplicaStore.blockSize

    override func setUpWithError() throws {
        root = "/tmp/cairn-snapshot-test-" + UUID().uuidString
        XCTAssertEqual(mkdir(root, 0o700), 0)
    }

    override func tearDownWithError() throws {
        if !root.isEmpty { try? FileManager.default.removeItem(atPath: root) }
    }

    private func block(_ seed: UInt8) -> [UInt8] { Self.block(seed) }

    static func block(_ seed: UInt8) -> [UInt8] {
        (0..<ReplicaStore.blockSize).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ Int(seed) &* 101) }
    }

    /// What the racing writer of the merge test wrote, and its stop signal.
    private final class WriterLog: @unchecked Sendable {
        let lock = NSLock()
        var written: [Int: UInt8] = [:]
        var stop = false
        var done = false
        var failure: (any Error)?
    }

    private func read(_ store: ReplicaStore, _ block: UInt64) throws -> [UInt8] {
        try store.read(offset: block * UInt64(bs), length: bs, epoch: 1)
    }

    private func write(_ store: ReplicaStore, _ block: UInt64, _ seed: UInt8, generation: UInt64, epoch: UInt64 = 1) throws {
        try store.write(offset: block * UInt64(bs), data: self.block(seed), generation: generation, epoch: epoch)
    }

    private func layerDirs(_ directory: String) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: directory + "/layers").sorted()
    }

    private func expectBadRequest<T>(_ body: () throws -> T, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("expected badRequest", file: file, line: line)
        } catch let e as ReplicaError {
            guard case .badRequest = e else { return XCTFail("expected badRequest, got \(e)", file: file, line: line) }
        } catch { XCTFail("expected badRequest, got \(error)", file: file, line: line) }
    }

    /// Silent corruption: `bytes` over layer `layer`'s data at byte `offset`, behind the store's back.
    private func corrupt(layer: Int, at offset: Int, with bytes: [UInt8], file: StaticString = #filePath, line: UInt = #line) {
        let fd = open(ReplicaStore.layerDirectory(dir, layer: UInt64(layer)) + "/data", O_WRONLY)
        XCTAssertGreaterThanOrEqual(fd, 0, file: file, line: line)
        XCTAssertEqual(pwrite(fd, bytes, bytes.count, off_t(offset)), bytes.count, file: file, line: line)
        close(fd)
    }

    /// A 4-block replica with block 3 written, snapshot "small" of it, then grown to 8 blocks.
    private func grownAfterASmallSnapshot() throws -> ReplicaStore {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 4 * UInt64(bs))
        do {
            try store.claim(epoch: 1)
            try write(store, 3, 3, generation: 1)
            try store.snapshot(id: "small", epoch: 1)
            try store.grow(to: 8 * UInt64(bs), epoch: 1)
            return store
        } catch {
            try? store.close()
            throw error
        }
    }

    // MARK: snapshots

    func testReadsFallThroughToTheNewestLayerHoldingTheBlock() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 64 * UInt64(bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        for b in 0..<4 { try write(store, UInt64(b), UInt8(b), generation: UInt64(b + 1)) }
        let s1 = try store.snapshot(id: "snap-1", epoch: 1)
        XCTAssertEqual(s1, ReplicaSnapshot(id: "snap-1", size: 64 * UInt64(bs), generation: 4, layer: 1))
        try write(store, 1, 50, generation: 5)
        let s2 = try store.snapshot(id: "snap-2", epoch: 1)
        try write(store, 2, 60, generation: 6)

        XCTAssertEqual(try read(store, 0), block(0), "only in the oldest layer")
        XCTAssertEqual(try read(store, 1), block(50), "rewritten in the middle layer")
        XCTAssertEqual(try read(store, 2), block(60), "rewritten in the head")
        XCTAssertEqual(try read(store, 3), block(3))
        XCTAssertEqual(try read(store, 4), [UInt8](repeating: 0, count: bs), "never written anywhere")
        // A multi-block read mixing layers.
        let all = try store.read(offset: 0, length: 4 * bs, epoch: 1)
        XCTAssertEqual(all, block(0) + block(50) + block(60) + block(3))
        XCTAssertEqual(try store.generations(firstBlock: 0, count: 5, epoch: 1), [1, 5, 6, 4, 0], "effective generations")
        XCTAssertEqual(store.status.highestGeneration, 6)
        XCTAssertEqual(try store.snapshots(), [s1, s2])
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 64, epoch: 1), [])
        XCTAssertEqual(try layerDirs(dir), ["0000000001", "0000000002", "0000000003"])
        XCTAssertEqual(try store.blocksNewer(than: 3), [1, 2, 3], "across layers: 3 only in the oldest, 1 in the middle, 2 in the head")
    }

    func testAChecksumIsVerifiedOnTheSealedLayerServingTheBlock() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        try write(store, 2, 9, generation: 1)
        try store.snapshot(id: "s", epoch: 1)
        try write(store, 3, 8, generation: 2)
        // Silent corruption in the sealed layer's data file.
        corrupt(layer: 1, at: 2 * bs + 100, with: [UInt8](repeating: 0xFF, count: 16))
        XCTAssertThrowsError(try read(store, 2)) { error in
            XCTAssertEqual(error as? ReplicaError, .checksumMismatch(block: 2))
        }
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 16, epoch: 1), [2])
        XCTAssertEqual(try read(store, 3), block(8), "the head's blocks are unaffected")
        // A repair (the good copy at its own generation) goes to the head and mends the volume.
        XCTAssertEqual(try store.write(offset: 2 * UInt64(bs), bytes: block(9).withUnsafeBytes { UnsafeRawBufferPointer($0) },
                                       generation: 1, epoch: 1, condition: .ifNotNewer), 1)
        XCTAssertEqual(try read(store, 2), block(9))
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 16, epoch: 1), [])
    }

    func testATrimInTheHeadHidesTheSnapshotsDataButNotTheSnapshot() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        try write(store, 3, 7, generation: 1)
        try store.snapshot(id: "before-trim", epoch: 1)
        try store.trim(offset: 3 * UInt64(bs), length: bs, generation: 2, epoch: 1)
        XCTAssertEqual(try read(store, 3), [UInt8](repeating: 0, count: bs))
        XCTAssertEqual(try store.generations(firstBlock: 3, count: 1, epoch: 1), [2 | BlockGenerations.trimmedBit])
        // The sealed layer still holds the block (a clone of the snapshot reads it).
        let clone = try ReplicaStore.clone(from: store, snapshotID: "before-trim", directory: root + "/clone",
                                           volumeID: "pvc-clone", size: 16 * UInt64(bs))
        defer { try? clone.close() }
        XCTAssertEqual(try clone.read(offset: 3 * UInt64(bs), length: bs, epoch: 0), block(7))
    }

    func testSnapshotIsIdempotentValidatedAndFenced() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? store.close() }
        try store.claim(epoch: 3)
        try write(store, 0, 1, generation: 1, epoch: 3)
        let first = try store.snapshot(id: "s", epoch: 3)
        try store.write(offset: 0, data: block(2), generation: 2, epoch: 3)
        XCTAssertEqual(try store.snapshot(id: "s", epoch: 3), first, "a repeat returns the existing snapshot")
        XCTAssertEqual(try store.snapshots().count, 1)
        XCTAssertEqual(try layerDirs(dir).count, 2, "the repeat sealed nothing")
        for bad in ["", "a/b", "..", "sp ace", String(repeating: "x", count: 129)] {
            expectBadRequest { try store.snapshot(id: bad, epoch: 3) }
        }
        XCTAssertThrowsError(try store.snapshot(id: "t", epoch: 2)) { error in
            XCTAssertEqual(error as? ReplicaError, .staleEpoch(seen: 3, got: 2))
        }
        XCTAssertEqual(try store.snapshots().map(\.id), ["s"])
    }

    func testSnapshotsSurviveReopenAndACrashedSnapshotIsForgotten() throws {
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
            try store.claim(epoch: 1)
            try write(store, 0, 1, generation: 1)
            try store.snapshot(id: "kept", epoch: 1)
            try write(store, 0, 2, generation: 2)
            try store.close()
        }
        // What a snapshot that crashed before its superblock leaves: a record in the head and
        // the directory of the head it had begun.
        try SnapshotRecord.write(ReplicaSnapshot(id: "crashed", size: 16 * UInt64(bs), generation: 2, layer: 2),
                                 layerDirectory: dir + "/layers/0000000002")
        XCTAssertEqual(mkdir(dir + "/layers/0000000003", 0o700), 0)
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(try store.snapshots().map(\.id), ["kept"])
        XCTAssertEqual(try layerDirs(dir), ["0000000001", "0000000002"], "the unreferenced layer is removed")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/layers/0000000002/snapshot"))
        XCTAssertEqual(try read(store, 0), block(2))
        // The crashed id can be taken now.
        XCTAssertEqual(try store.snapshot(id: "crashed", epoch: 1).layer, 2)
        XCTAssertEqual(try store.snapshots().map(\.id), ["kept", "crashed"])
    }

    // MARK: deletion

    func testDeleteMergesOnlyTheBlocksTheNewerLayerLacks() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        for b in 0..<3 { try write(store, UInt64(b), UInt8(b), generation: UInt64(b + 1)) }
        try store.snapshot(id: "old", epoch: 1)
        try write(store, 1, 9, generation: 4)
        try store.trim(offset: 2 * UInt64(bs), length: bs, generation: 5, epoch: 1)
        let before = try store.generations(firstBlock: 0, count: 16, epoch: 1)

        try store.deleteSnapshot(id: "old", epoch: 1)
        XCTAssertEqual(try store.snapshots(), [])
        XCTAssertEqual(try layerDirs(dir), ["0000000002"], "the merged layer's files are gone")
        XCTAssertEqual(try read(store, 0), block(0), "merged from the deleted layer")
        XCTAssertEqual(try read(store, 1), block(9), "the newer write is kept")
        XCTAssertEqual(try read(store, 2), [UInt8](repeating: 0, count: bs), "the newer trim is kept")
        XCTAssertEqual(try store.generations(firstBlock: 0, count: 16, epoch: 1), before)
        try store.deleteSnapshot(id: "old", epoch: 1)  // idempotent
        try store.close()
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? reopened.close() }
        XCTAssertEqual(try reopened.generations(firstBlock: 0, count: 16, epoch: 1), before)
        XCTAssertEqual(try read(reopened, 0), block(0))
    }

    func testDeleteOfAMiddleSnapshotMergesIntoTheNextSealedLayer() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        try write(store, 0, 1, generation: 1)
        try store.snapshot(id: "a", epoch: 1)
        try write(store, 1, 2, generation: 2)
        try store.snapshot(id: "b", epoch: 1)
        try write(store, 2, 3, generation: 3)
        try store.snapshot(id: "c", epoch: 1)
        try store.deleteSnapshot(id: "b", epoch: 1)
        XCTAssertEqual(try store.snapshots().map(\.id), ["a", "c"])
        // "c" (layer 3) now holds block 1 as well: a clone of it reads b's block.
        let clone = try ReplicaStore.clone(from: store, snapshotID: "c", directory: root + "/clone", volumeID: "pvc-c", size: 16 * UInt64(bs))
        defer { try? clone.close() }
        XCTAssertEqual(try clone.read(offset: 0, length: 3 * bs, epoch: 0), block(1) + block(2) + block(3))
        XCTAssertEqual(try store.read(offset: 0, length: 3 * bs, epoch: 1), block(1) + block(2) + block(3))
        XCTAssertEqual(try layerDirs(dir), ["0000000001", "0000000003", "0000000004"])
    }

    func testDeleteRacingWithWritesNeverOverwritesANewerBlock() throws {
        let blocks = 8192  // 32 MiB: several merge chunks
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: UInt64(blocks * bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        let base = block(1)
        var chunk: [UInt8] = []
        for _ in 0..<256 { chunk.append(contentsOf: base) }
        for first in stride(from: 0, to: blocks, by: 256) {
            try store.write(offset: UInt64(first * bs), data: chunk, generation: 1, epoch: 1)
        }
        // Precomputed: building a block per write would slow the writer far below the merge.
        let seeds: [[UInt8]] = (0..<256).map { block(UInt8($0)) }
        try store.snapshot(id: "s", epoch: 1)
        // A writer rewrites blocks all over the volume while the merge runs.
        let log = WriterLog()
        let bs = self.bs
        let writer = Thread {
            var generation: UInt64 = 2
            while !log.lock.withLock({ log.stop }) {
                let b = Int.random(in: 0..<blocks)
                let seed = UInt8(truncatingIfNeeded: generation % 200 + 2)
                do {
                    try store.write(offset: UInt64(b * bs), data: seeds[Int(seed)], generation: generation, epoch: 1)
                } catch {
                    log.lock.withLock { log.failure = error }
                    break
                }
                log.lock.withLock { log.written[b] = seed }
                generation += 1
            }
            log.lock.withLock { log.done = true }
        }
        writer.start()
        // Stops the writer whatever happens, before the store closes.
        defer {
            log.lock.withLock { log.stop = true }
            while !log.lock.withLock({ log.done }) { Thread.sleep(forTimeInterval: 0.01) }
        }
        Thread.sleep(forTimeInterval: 0.05)
        let started = Date()
        let before = log.lock.withLock { log.written.count }
        try store.deleteSnapshot(id: "s", epoch: 1)
        let during = log.lock.withLock { log.written.count } - before
        let mergeSeconds = Date().timeIntervalSince(started)
        log.lock.withLock { log.stop = true }
        while !log.lock.withLock({ log.done }) { Thread.sleep(forTimeInterval: 0.01) }
        let last = log.lock.withLock { log.written }
        XCTAssertNil(log.lock.withLock { log.failure })
        // However slow the machine, writes landed while the merge ran (a count, not a rate).
        XCTAssertGreaterThan(during, 0, "the writer ran during the merge")
        print(String(format: "snapshot merge of 32 MiB with a racing writer: %.2f s; the writer rewrote %d blocks (from 50 ms before the merge to its end)", mergeSeconds, last.count))
        XCTAssertEqual(try store.snapshots(), [])
        for b in 0..<blocks {
            let got = try read(store, UInt64(b))
            let want = last[b].map { seeds[Int($0)] } ?? base
            if got != want { return XCTFail("block \(b): the merge overwrote a newer write or lost the snapshot's") }
        }
    }

    func testACrashMidMergeLeavesAConsistentChainAndDeletingAgainFinishes() throws {
        let blocks = 3 * Int(ReplicaStore.mergeChunkBlocks)
        var expected: [UInt64] = []
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: UInt64(blocks * bs))
            try store.claim(epoch: 1)
            for b in stride(from: 0, to: blocks, by: 97) { try write(store, UInt64(b), UInt8(b % 251), generation: UInt64(b + 1)) }
            try store.snapshot(id: "s", epoch: 1)
            try write(store, 97, 200, generation: 100_000)
            expected = try store.generations(firstBlock: 0, count: blocks, epoch: 1)
            // The merge of one chunk, then a "crash": the store is dropped without close.
            let (layer, target) = store.state.withShared { ($0.sealed[0], $0.head) }
            XCTAssertGreaterThan(try store.merge(layer, into: target, epoch: 1, maxChunks: 1), 0)
        }
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(try store.snapshots().map(\.id), ["s"], "the snapshot is still there")
        XCTAssertEqual(try store.generations(firstBlock: 0, count: blocks, epoch: 1), expected)
        XCTAssertEqual(try store.verify(firstBlock: 0, count: blocks, epoch: 1), [])
        try store.deleteSnapshot(id: "s", epoch: 1)
        XCTAssertEqual(try store.snapshots(), [])
        XCTAssertEqual(try store.generations(firstBlock: 0, count: blocks, epoch: 1), expected)
        for b in stride(from: 0, to: blocks, by: 97) where b != 97 {
            XCTAssertEqual(try read(store, UInt64(b)), block(UInt8(b % 251)))
        }
        XCTAssertEqual(try read(store, 97), block(200))
        XCTAssertEqual(try layerDirs(dir), ["0000000002"])
    }

    // MARK: reading a snapshot (backups)

    private func expectNotFound<T>(_ body: () throws -> T, naming words: [String], file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("expected notFound", file: file, line: line)
        } catch let e as ReplicaError {
            guard case .notFound(let message) = e else { return XCTFail("expected notFound, got \(e)", file: file, line: line) }
            for word in words { XCTAssertTrue(message.contains(word), "\(message) lacks \(word)", file: file, line: line) }
            XCTAssertEqual(RPCStatus.from(e).code, .notFound, file: file, line: line)
            XCTAssertEqual(ReplicaServer.replyStatus(for: e).0, .notFound, file: file, line: line)
        } catch { XCTFail("expected notFound, got \(error)", file: file, line: line) }
    }

    private var zeros: [UInt8] { [UInt8](repeating: 0, count: bs) }

    /// Each block of `store`'s snapshot `id`, read one at a time and all at once (through an
    /// unaligned array and an aligned buffer: the scratch and the direct paths).
    private func snapshotBlocks(_ store: ReplicaStore, _ id: String, blocks: Int) throws -> [[UInt8]] {
        let single = try (0..<blocks).map { try store.read(snapshotID: id, offset: UInt64($0 * bs), length: bs) }
        let whole = try store.read(snapshotID: id, offset: 0, length: blocks * bs)
        XCTAssertEqual(whole, single.flatMap { $0 }, "one read of the whole snapshot equals its blocks read one by one")
        let aligned = UnsafeMutableRawBufferPointer.allocate(byteCount: blocks * bs, alignment: bs)
        defer { aligned.deallocate() }
        try store.read(snapshotID: id, offset: 0, into: aligned)
        XCTAssertEqual(Array(aligned), whole)
        return single
    }

    func testSnapshotReadsAndGenerationsSeeEachSnapshotsOwnContentAndSurviveAnOlderSnapshotsMerge() throws {
        let blocks = 16
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: UInt64(blocks * bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        for b in 0..<8 { try write(store, UInt64(b), UInt8(b), generation: UInt64(b + 1)) }
        let s1 = try store.snapshot(id: "s1", epoch: 1)
        XCTAssertEqual(s1.generation, 8)
        // Between the snapshots: two overwrites, a trim, a new block.
        try write(store, 1, 21, generation: 9)
        try write(store, 2, 22, generation: 10)
        try store.trim(offset: 3 * UInt64(bs), length: bs, generation: 11, epoch: 1)
        try write(store, 8, 28, generation: 12)
        let s2 = try store.snapshot(id: "s2", epoch: 1)
        XCTAssertEqual(s2.generation, 12)
        // After S2, in the head only: neither snapshot may see these.
        try write(store, 0, 40, generation: 13)
        try store.trim(offset: 4 * UInt64(bs), length: bs, generation: 14, epoch: 1)
        try write(store, 9, 41, generation: 15)
        try write(store, 1, 42, generation: 16)

        let s1Blocks = (0..<blocks).map { $0 < 8 ? block(UInt8($0)) : zeros }
        var s2Blocks = s1Blocks
        s2Blocks[1] = block(21)
        s2Blocks[2] = block(22)
        s2Blocks[3] = zeros
        s2Blocks[8] = block(28)
        let s1Generations: [UInt64] = (0..<blocks).map { $0 < 8 ? UInt64($0 + 1) : 0 }
        let s2Generations: [UInt64] = [1, 9, 10, 11 | BlockGenerations.trimmedBit, 5, 6, 7, 8, 12, 0, 0, 0, 0, 0, 0, 0]
        func check(_ context: String) throws {
            XCTAssertEqual(try snapshotBlocks(store, "s2", blocks: blocks), s2Blocks, context)
            XCTAssertEqual(try store.generations(snapshotID: "s2", firstBlock: 0, count: blocks), s2Generations, context)
            XCTAssertEqual(try store.generations(snapshotID: "s2", firstBlock: 3, count: 2), [11 | BlockGenerations.trimmedBit, 5], context)
        }
        XCTAssertEqual(try snapshotBlocks(store, "s1", blocks: blocks), s1Blocks)
        XCTAssertEqual(try store.generations(snapshotID: "s1", firstBlock: 0, count: blocks), s1Generations)
        try check("before any merge")
        // What changed between the snapshots is exactly what is newer than S1 in S2.
        let s2Now = try store.generations(snapshotID: "s2", firstBlock: 0, count: blocks)
        XCTAssertEqual(s2Now.indices.filter { BlockGenerations.generation(s2Now[$0]) > s1.generation }, [1, 2, 3, 8])
        XCTAssertTrue(s2Now.allSatisfy { BlockGenerations.generation($0) <= s2.generation })
        // The volume itself did move on.
        XCTAssertEqual(try read(store, 0), block(40))
        XCTAssertEqual(try read(store, 1), block(42))
        XCTAssertEqual(try read(store, 4), zeros)
        XCTAssertEqual(try store.generations(firstBlock: 9, count: 1, epoch: 1), [15])

        // Not fenced: a newer claim does not stop a backup reading.
        try store.claim(epoch: 7)
        try check("after a newer claim")

        // S1 merges into S2's layer: S2 reads the same; S1 is gone.
        try store.deleteSnapshot(id: "s1", epoch: 7)
        try check("after S1 merged into S2")
        expectNotFound({ try store.read(snapshotID: "s1", offset: 0, length: bs) }, naming: [volume, "s1"])
        expectNotFound({ try store.generations(snapshotID: "s1", firstBlock: 0, count: 1) }, naming: [volume, "s1"])
        expectNotFound({ try store.existingSnapshot(id: "never") }, naming: [volume, "never"])
        XCTAssertEqual(try store.existingSnapshot(id: "s2"), s2)

        // S2 merges into the head: gone too, and the volume keeps its own content.
        try store.deleteSnapshot(id: "s2", epoch: 7)
        expectNotFound({ try store.read(snapshotID: "s2", offset: 0, length: bs) }, naming: [volume, "s2"])
        XCTAssertEqual(try store.read(offset: 2 * UInt64(bs), length: 2 * bs, epoch: 7), block(22) + zeros)
    }

    func testSnapshotReadsAreRangeCheckedAgainstTheSnapshotsSize() throws {
        let store = try grownAfterASmallSnapshot()
        defer { try? store.close() }
        try write(store, 5, 5, generation: 2)
        try store.snapshot(id: "large", epoch: 1)
        // The volume is 8 blocks now, the first snapshot only 4.
        XCTAssertEqual(try store.read(snapshotID: "small", offset: 3 * UInt64(bs), length: bs), block(3))
        expectBadRequest { try store.read(snapshotID: "small", offset: 4 * UInt64(bs), length: bs) }
        expectBadRequest { try store.read(snapshotID: "small", offset: 2 * UInt64(bs), length: 3 * bs) }
        expectBadRequest { try store.generations(snapshotID: "small", firstBlock: 4, count: 1) }
        expectBadRequest { try store.generations(snapshotID: "small", firstBlock: .max, count: 2) }
        XCTAssertEqual(try store.generations(snapshotID: "small", firstBlock: 0, count: 4), [0, 0, 0, 1])
        // The larger one reads past the older layer's end as zeros, its own block as written.
        XCTAssertEqual(try store.read(snapshotID: "large", offset: 4 * UInt64(bs), length: 2 * bs), zeros + block(5))
        XCTAssertEqual(try store.generations(snapshotID: "large", firstBlock: 0, count: 8), [0, 0, 0, 1, 0, 2, 0, 0])
        // Whole blocks, a positive length, a sane count.
        expectBadRequest { try store.read(snapshotID: "large", offset: 100, length: bs) }
        expectBadRequest { try store.read(snapshotID: "large", offset: 0, length: 100) }
        expectBadRequest { try store.read(snapshotID: "large", offset: 0, length: 0) }
        expectBadRequest { try store.generations(snapshotID: "large", firstBlock: 0, count: 0) }
        expectBadRequest { try store.generations(snapshotID: "large", firstBlock: 0, count: FrameLimits.maxGenerationsCount + 1) }
    }

    func testASnapshotReadVerifiesTheChecksumOfTheSealedLayerServingTheBlock() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        try write(store, 2, 9, generation: 1)
        try write(store, 5, 10, generation: 2)
        try store.snapshot(id: "s1", epoch: 1)
        try write(store, 3, 8, generation: 3)
        try store.snapshot(id: "s2", epoch: 1)
        // The head rewrites block 2: the volume no longer reads the corrupted copy, the snapshots do.
        try write(store, 2, 11, generation: 4)
        corrupt(layer: 1, at: 2 * bs + 100, with: [UInt8](repeating: 0xFF, count: 16))
        for id in ["s1", "s2"] {
            XCTAssertThrowsError(try store.read(snapshotID: id, offset: 0, length: 4 * bs), id) { error in
                XCTAssertEqual(error as? ReplicaError, .checksumMismatch(block: 2))
            }
        }
        XCTAssertEqual(try read(store, 2), block(11), "the volume reads the head's copy")
        XCTAssertEqual(try store.read(snapshotID: "s2", offset: 3 * UInt64(bs), length: 3 * bs), block(8) + zeros + block(10),
                       "the snapshot's other blocks read")
        // A corrupted block of the snapshot's own layer too.
        corrupt(layer: 2, at: 3 * bs, with: [0x5A])
        XCTAssertThrowsError(try store.read(snapshotID: "s2", offset: 3 * UInt64(bs), length: bs)) { error in
            XCTAssertEqual(error as? ReplicaError, .checksumMismatch(block: 3))
        }
        XCTAssertEqual(try store.read(snapshotID: "s1", offset: 3 * UInt64(bs), length: bs), zeros, "S1 predates block 3")
    }

    /// Snapshot reads race deletions: the merge of an older snapshot into this one (the answer
    /// never changes), then the merge of this one into the head (the same answer until it is
    /// gone, then notFound for good).
    func testSnapshotReadsRacingMergesNeverSeeATornOrWrongSnapshot() throws {
        let blocks = 2 * Int(ReplicaStore.mergeChunkBlocks) + 512  // several merge chunks
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: UInt64(blocks * bs))
        defer { try? store.close() }
        try store.claim(epoch: 1)
        for b in stride(from: 0, to: blocks, by: 3) { try write(store, UInt64(b), UInt8(b % 200), generation: UInt64(b + 1)) }
        try store.snapshot(id: "old", epoch: 1)
        var generation = UInt64(blocks + 1)
        for b in stride(from: 0, to: blocks, by: 7) {
            try write(store, UInt64(b), 250, generation: generation)
            generation += 1
        }
        try store.snapshot(id: "new", epoch: 1)
        for b in stride(from: 0, to: blocks, by: 5) {
            try write(store, UInt64(b), 251, generation: generation)
            generation += 1
        }
        let chunk = 256
        let expected = try (0..<(blocks / chunk)).map {
            try store.read(snapshotID: "new", offset: UInt64($0 * chunk * bs), length: chunk * bs)
        }
        let expectedGenerations = try store.generations(snapshotID: "new", firstBlock: 0, count: blocks)
        XCTAssertEqual(expected[0].prefix(bs), ArraySlice(block(250)))

        final class Reader: @unchecked Sendable {
            let lock = NSLock()
            var stop = false, done = false, reads = 0, gone = false
            var failure: String?
        }
        func race(_ delete: () throws -> Void, mayVanish: Bool) throws -> (reads: Int, sawItGone: Bool) {
            let r = Reader()
            let bs = self.bs
            let thread = Thread {
                var i = 0
                while !r.lock.withLock({ r.stop }) {
                    let c = i % expected.count
                    do {
                        let got = try store.read(snapshotID: "new", offset: UInt64(c * chunk * bs), length: chunk * bs)
                        let generations = try store.generations(snapshotID: "new", firstBlock: UInt64(c * chunk), count: chunk)
                        if r.lock.withLock({ r.gone }) { r.lock.withLock { r.failure = "read the snapshot after it was gone" }; break }
                        if got != expected[c] || generations != Array(expectedGenerations[(c * chunk)..<((c + 1) * chunk)]) {
                            r.lock.withLock { r.failure = "chunk \(c) differs from the snapshot's content" }
                            break
                        }
                        r.lock.withLock { r.reads += 1 }
                    } catch ReplicaError.notFound(_) where mayVanish {
                        r.lock.withLock { r.gone = true }
                    } catch {
                        r.lock.withLock { r.failure = "\(error)" }
                        break
                    }
                    i += 1
                }
                r.lock.withLock { r.done = true }
            }
            thread.start()
            defer {
                r.lock.withLock { r.stop = true }
                while !r.lock.withLock({ r.done }) { Thread.sleep(forTimeInterval: 0.01) }
            }
            while r.lock.withLock({ r.reads }) == 0, r.lock.withLock({ r.failure }) == nil { Thread.sleep(forTimeInterval: 0.005) }
            let before = r.lock.withLock { r.reads }
            try delete()
            let during = r.lock.withLock { r.reads } - before
            // The reader goes on after the deletion: gone stays gone.
            let after = r.lock.withLock { r.reads }
            while r.lock.withLock({ r.reads }) == after, !r.lock.withLock({ r.gone }), r.lock.withLock({ r.failure }) == nil {
                Thread.sleep(forTimeInterval: 0.005)
            }
            Thread.sleep(forTimeInterval: 0.05)
            XCTAssertNil(r.lock.withLock { r.failure })
            return (during, r.lock.withLock { r.gone })
        }
        let older = try race({ try store.deleteSnapshot(id: "old", epoch: 1) }, mayVanish: false)
        print("snapshot reads while the older snapshot merged into it: \(older.reads)")
        XCTAssertEqual(try store.snapshots().map(\.id), ["new"])
        XCTAssertTrue(try race({ try store.deleteSnapshot(id: "new", epoch: 1) }, mayVanish: true).sawItGone)
        expectNotFound({ try store.read(snapshotID: "new", offset: 0, length: bs) }, naming: ["new"])
    }

    // MARK: clones

    func testACloneSharesLayersByHardLinkAndIsIndependentOfItsSource() throws {
        let source = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? source.close() }
        try source.claim(epoch: 1)
        try write(source, 0, 1, generation: 1)
        try write(source, 1, 2, generation: 2)
        try source.snapshot(id: "s", epoch: 1)
        try write(source, 2, 3, generation: 3)  // after the snapshot: not in the clone
        expectBadRequest {
            try ReplicaStore.clone(from: source, snapshotID: "s", directory: root + "/small", volumeID: "pvc-small", size: 8 * UInt64(bs))
        }
        XCTAssertThrowsError(try ReplicaStore.clone(from: source, snapshotID: "nope", directory: root + "/x", volumeID: "pvc-x",
                                                    size: 16 * UInt64(bs)))
        let clone = try ReplicaStore.clone(from: source, snapshotID: "s", directory: root + "/clone", volumeID: "pvc-clone",
                                           size: 32 * UInt64(bs))
        defer { try? clone.close() }
        var st = stat()
        XCTAssertEqual(stat(root + "/clone/layers/0000000001/data", &st), 0)
        XCTAssertEqual(st.st_nlink, 2, "hard-linked, not copied")
        XCTAssertEqual(clone.status.size, 32 * UInt64(bs))
        XCTAssertGreaterThanOrEqual(clone.status.highestGeneration, 3, "the clone's generations continue above the source's")
        XCTAssertEqual(try clone.snapshots(), [], "the source's snapshots are not the clone's")
        XCTAssertEqual(try clone.read(offset: 0, length: 3 * bs, epoch: 0), block(1) + block(2) + [UInt8](repeating: 0, count: bs))

        try clone.claim(epoch: 1)
        try clone.write(offset: 0, data: block(77), generation: 10, epoch: 1)
        XCTAssertEqual(try read(source, 0), block(1), "a write to the clone never reaches the source")
        try write(source, 1, 88, generation: 11)
        XCTAssertEqual(try clone.read(offset: UInt64(bs), length: bs, epoch: 1), block(2), "nor the other way")
        XCTAssertEqual(try clone.read(offset: 0, length: bs, epoch: 1), block(77))
        // A clone may snapshot and delete its own snapshots; the shared layer stays untouched.
        try clone.snapshot(id: "c1", epoch: 1)
        try clone.deleteSnapshot(id: "c1", epoch: 1)
        XCTAssertEqual(try clone.read(offset: 0, length: 2 * bs, epoch: 1), block(77) + block(2))
        XCTAssertEqual(try source.read(offset: 0, length: 2 * bs, epoch: 1), block(1) + block(88))
    }

    func testACloneSurvivesTheDeletionOfItsSnapshotAndOfItsSource() throws {
        let source = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        try source.claim(epoch: 1)
        try write(source, 5, 5, generation: 1)
        try source.snapshot(id: "s", epoch: 1)
        try write(source, 6, 6, generation: 2)
        try source.snapshot(id: "t", epoch: 1)
        let clone = try ReplicaStore.clone(from: source, snapshotID: "s", directory: root + "/clone", volumeID: "pvc-clone",
                                           size: 16 * UInt64(bs))
        try source.deleteSnapshot(id: "s", epoch: 1)
        XCTAssertEqual(try clone.read(offset: 5 * UInt64(bs), length: 2 * bs, epoch: 0), block(5) + [UInt8](repeating: 0, count: bs))
        try source.close()
        try FileManager.default.removeItem(atPath: dir)
        try clone.close()
        let reopened = try ReplicaStore.open(directory: root + "/clone", volumeID: "pvc-clone")
        defer { try? reopened.close() }
        XCTAssertEqual(try reopened.read(offset: 5 * UInt64(bs), length: bs, epoch: 0), block(5))
        XCTAssertEqual(try reopened.verify(firstBlock: 0, count: 16, epoch: 0), [])
    }

    func testMergingIntoALayerACloneLinksDoesNotChangeTheClone() throws {
        let source = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 * UInt64(bs))
        defer { try? source.close() }
        try source.claim(epoch: 1)
        for b in 0..<4 { try write(source, UInt64(b), UInt8(b), generation: UInt64(b + 1)) }
        try source.snapshot(id: "l1", epoch: 1)
        try write(source, 1, 41, generation: 5)
        try write(source, 4, 44, generation: 6)
        try source.snapshot(id: "l2", epoch: 1)
        // Links layers 1 and 2; another clone links layer 1 only.
        let both = try ReplicaStore.clone(from: source, snapshotID: "l2", directory: root + "/both", volumeID: "pvc-both", size: 16 * UInt64(bs))
        defer { try? both.close() }
        let first = try ReplicaStore.clone(from: source, snapshotID: "l1", directory: root + "/first", volumeID: "pvc-first", size: 16 * UInt64(bs))
        defer { try? first.close() }
        let bothBefore = (try both.read(offset: 0, length: 16 * bs, epoch: 0), try both.generations(firstBlock: 0, count: 16, epoch: 0))
        let firstBefore = (try first.read(offset: 0, length: 16 * bs, epoch: 0), try first.generations(firstBlock: 0, count: 16, epoch: 0))

        // Merges layer 1 into layer 2 — a file the clone "both" shares.
        try source.deleteSnapshot(id: "l1", epoch: 1)
        var st = stat()
        XCTAssertEqual(stat(root + "/both/layers/0000000002/blockmap", &st), 0)
        XCTAssertEqual(st.st_nlink, 2, "the merge wrote the shared layer in place")
        XCTAssertEqual(try both.read(offset: 0, length: 16 * bs, epoch: 0), bothBefore.0)
        XCTAssertEqual(try both.generations(firstBlock: 0, count: 16, epoch: 0), bothBefore.1)
        XCTAssertEqual(try first.read(offset: 0, length: 16 * bs, epoch: 0), firstBefore.0)
        XCTAssertEqual(try first.generations(firstBlock: 0, count: 16, epoch: 0), firstBefore.1)
        XCTAssertEqual(try both.verify(firstBlock: 0, count: 16, epoch: 0), [])
        // And the same after reopening the clones from disk.
        try both.close()
        let reopened = try ReplicaStore.open(directory: root + "/both", volumeID: "pvc-both")
        defer { try? reopened.close() }
        XCTAssertEqual(try reopened.read(offset: 0, length: 16 * bs, epoch: 0), bothBefore.0)
        XCTAssertEqual(try source.read(offset: 0, length: 5 * bs, epoch: 1), block(0) + block(41) + block(2) + block(3) + block(44))
    }

    func testSnapshotRecordsTheSizeAtTheTimeAndReadsBeyondAnOlderLayerAreZeros() throws {
        let store = try grownAfterASmallSnapshot()
        defer { try? store.close() }
        try write(store, 7, 7, generation: 2)
        let big = try store.snapshot(id: "big", epoch: 1)
        XCTAssertEqual(try store.snapshots().map(\.size), [4 * UInt64(bs), 8 * UInt64(bs)])
        XCTAssertEqual(big.generation, 2)
        XCTAssertEqual(try store.read(offset: 3 * UInt64(bs), length: 5 * bs, epoch: 1),
                       block(3) + [UInt8](repeating: 0, count: 3 * bs) + block(7))
        try store.deleteSnapshot(id: "small", epoch: 1)
        try store.deleteSnapshot(id: "big", epoch: 1)
        XCTAssertEqual(try store.read(offset: 3 * UInt64(bs), length: 5 * bs, epoch: 1),
                       block(3) + [UInt8](repeating: 0, count: 3 * bs) + block(7))
    }
}
