import CairnCore
@testable import CairnReplica
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The replica's journal (docs/replica-format.md, "Journal"): a flush of small writes is one
/// fdatasync of the journal, and what it covered survives the loss of every in-place write.
final class ReplicaJournalTests: XCTestCase {
    private var root = ""
    private var dir: String { root + "/replica" }
    private let volume = "pvc-journal"
    private let bs = ReplicaStore.blockSize
    private var dataPath: String { dir + "/layers/0000000001/data" }
    private var blockMapPath: String { dir + "/layers/0000000001/blockmap" }
    private var journalPath: String { dir + "/journal" }

    override func setUpWithError() throws {
        root = "/var/tmp/cairn-journal-test-" + UUID().uuidString
        XCTAssertEqual(mkdir(root, 0o700), 0)
    }

    override func tearDownWithError() throws {
        if !root.isEmpty { try? FileManager.default.removeItem(atPath: root) }
    }

    private func pattern(blocks: Int, seed: Int) -> [UInt8] { Self.pattern(blocks: blocks, seed: seed) }

    private static func pattern(blocks: Int, seed: Int) -> [UInt8] {
        (0..<(blocks * ReplicaStore.blockSize)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ seed &* 101 &+ ($0 >> 12)) }
    }

    /// What a crash can leave when the page cache and the disk's cache are lost: none of the
    /// in-place writes since the last checkpoint. Zeroes `blocks` in the data file and their
    /// block-map entries (as if never written).
    private func loseInPlaceWrites(blocks: [UInt64]) throws {
        for (path, unit) in [(dataPath, bs), (blockMapPath, BlockMapEntry.encodedSize)] {
            let fd = open(path, O_RDWR)
            XCTAssertGreaterThanOrEqual(fd, 0)
            defer { close(fd) }
            let zeros = [UInt8](repeating: 0, count: unit)
            for block in blocks {
                let n = zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, unit, off_t(Int(block) * unit)) }
                XCTAssertEqual(n, unit)
            }
            XCTAssertEqual(fsync(fd), 0)
        }
    }

    private func fileBytes(_ path: String, at offset: Int, count: Int) throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        XCTAssertEqual(bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }, count)
        return bytes
    }

    func testAFlushedSmallWriteSurvivesTheLossOfItsInPlaceCopyThroughTheJournal() throws {
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
            try store.write(offset: 0, data: pattern(blocks: 2, seed: 1), generation: 1, epoch: 0)
            try store.write(offset: 100 * UInt64(bs), data: pattern(blocks: 1, seed: 2), generation: 2, epoch: 0)
            try store.flush(epoch: 0)
            try store.write(offset: 0, data: pattern(blocks: 1, seed: 3), generation: 3, epoch: 0)
            try store.flush(epoch: 0)
            XCTAssertEqual(store.status.flushedGeneration, 3)
        }  // crash: no close (and no record after the last flush to carry its generation)
        try loseInPlaceWrites(blocks: [0, 1, 100])
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(try store.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 3))
        XCTAssertEqual(try store.read(offset: UInt64(bs), length: bs, epoch: 0), Array(pattern(blocks: 2, seed: 1)[bs...]))
        XCTAssertEqual(try store.read(offset: 100 * UInt64(bs), length: bs, epoch: 0), pattern(blocks: 1, seed: 2))
        XCTAssertEqual(try store.generations(firstBlock: 0, count: 2, epoch: 0), [3, 1])
        // The last record carried the flushed generation of the flush before it: an underestimate
        // (safe: recovery and resync look at a little more), never more than was made durable.
        XCTAssertEqual(store.status.flushedGeneration, 2)
        XCTAssertEqual(store.status.highestGeneration, 3)
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 4096, epoch: 0), [])
    }

    /// A durable write (the engine's commit at queue depth 1, docs/engine.md "Durable writes")
    /// is synced through its journal record as it is written: it survives the loss of every
    /// in-place copy with no flush after it — even when the record of an earlier, unflushed
    /// write before it never reached the disk (replay skips that hole).
    func testADurableWriteSurvivesTheLossOfItsInPlaceCopyWithNoFlushAfterIt() throws {
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
            try store.write(offset: 0, data: pattern(blocks: 1, seed: 1), generation: 1, epoch: 0)
            try store.flush(epoch: 0)
            // Journal blocks 1-2 hold the first record; the next, unflushed, takes 3-4.
            try store.write(offset: 5 * UInt64(bs), data: pattern(blocks: 1, seed: 2), generation: 2, epoch: 0)
            let durable = try pattern(blocks: 2, seed: 3).withUnsafeBytes {
                try store.write(offset: 9 * UInt64(bs), bytes: $0, generation: 3, epoch: 0, durable: true)
            }
            XCTAssertTrue(durable, "a small journaled write is made durable when asked")
            XCTAssertEqual(store.durableWriteCount, 1)
            // Too long for the journal: in place only, so not durable until a flush.
            let long = try pattern(blocks: 80, seed: 4).withUnsafeBytes {
                try store.write(offset: 100 * UInt64(bs), bytes: $0, generation: 4, epoch: 0, durable: true)
            }
            XCTAssertFalse(long)
            XCTAssertEqual(store.durableWriteCount, 1)
        }  // crash: no close, no flush after the durable write
        // The unflushed write's record never reached the disk, nor did any in-place copy.
        let journalFD = open(journalPath, O_RDWR)
        XCTAssertGreaterThanOrEqual(journalFD, 0)
        let zeros = [UInt8](repeating: 0, count: 2 * bs)
        XCTAssertEqual(zeros.withUnsafeBytes { pwrite(journalFD, $0.baseAddress, $0.count, off_t(3 * bs)) }, 2 * bs)
        close(journalFD)
        try loseInPlaceWrites(blocks: [0, 5, 9, 10])
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(try store.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 1), "flushed")
        XCTAssertEqual(try store.read(offset: 9 * UInt64(bs), length: 2 * bs, epoch: 0), pattern(blocks: 2, seed: 3), "durable")
        XCTAssertEqual(try store.generations(firstBlock: 9, count: 2, epoch: 0), [3, 3])
        XCTAssertEqual(try store.read(offset: 5 * UInt64(bs), length: bs, epoch: 0), [UInt8](repeating: 0, count: bs),
                       "the lost, never-flushed write is gone, and nothing else took its place")
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 4096, epoch: 0), [])
    }

    /// A journal past 3/4 full is due for a checkpoint at the next flush: a durable write then
    /// says it is not durable, so the engine sends that flush instead of skipping it.
    func testADurableWriteIntoAJournalDueForACheckpointAsksForTheFlush() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
        defer { try? store.close() }
        func durableWrite(_ block: Int, _ generation: UInt64) throws -> Bool {
            try pattern(blocks: 1, seed: block).withUnsafeBytes {
                try store.write(offset: UInt64(block * bs), bytes: $0, generation: generation, epoch: 0, durable: true)
            }
        }
        XCTAssertTrue(try durableWrite(0, 1))
        // A 2 MiB journal: 192 one-block records (two journal blocks each) fill 3/4 of it.
        for b in 1...200 {
            try store.write(offset: UInt64(b * bs), data: pattern(blocks: 1, seed: b), generation: UInt64(b + 1), epoch: 0)
        }
        XCTAssertFalse(try durableWrite(300, 300))
        try store.flush(epoch: 0)  // the checkpoint
        XCTAssertTrue(try durableWrite(301, 301))
    }

    /// A group of writes (a replica server's receive of many small writes) goes to the device
    /// at once, but each write is what it would be alone: journaled, in place, its block-map
    /// entries; a bad one among them fails alone; after a flush the group survives the loss of
    /// every in-place copy through the journal; a write that no longer fits the journal goes
    /// in place only and the next flush syncs it.
    func testAGroupOfWritesIsEachWriteAloneAndSurvivesACrashAfterItsFlush() throws {
        let blocks: [UInt64] = [3, 0, 700, 41, 42, 1000]
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
            try store.claim(epoch: 2)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: (blocks.count + 1) * bs, alignment: bs)
            defer { buffer.deallocate() }
            var writes: [ReplicaStore.GroupWrite] = []
            for (i, block) in blocks.enumerated() {
                let slot = UnsafeMutableRawBufferPointer(rebasing: buffer[(i * bs)..<((i + 1) * bs)])
                pattern(blocks: 1, seed: 10 + i).withUnsafeBytes { slot.copyMemory(from: $0) }
                writes.append(ReplicaStore.GroupWrite(offset: block * UInt64(bs), data: UnsafeRawBufferPointer(slot),
                                                      generation: UInt64(5 + i)))
            }
            // Beyond the end of the 16 MiB replica: refused, alone.
            writes.insert(ReplicaStore.GroupWrite(offset: 16 << 20, data: UnsafeRawBufferPointer(rebasing: buffer[0..<bs]),
                                                  generation: 50), at: 2)
            let errors = store.writeGroup(writes, epoch: 2)
            XCTAssertEqual(errors.count, blocks.count + 1)
            for (i, e) in errors.enumerated() {
                if i == 2 { XCTAssertNotNil(e, "the write beyond the end is refused") } else { XCTAssertNil(e, "write \(i): \(String(describing: e))") }
            }
            // A stale epoch fails every write of the group, and nothing of it is applied.
            let stale = store.writeGroup([ReplicaStore.GroupWrite(offset: 9 * UInt64(bs), data: UnsafeRawBufferPointer(rebasing: buffer[0..<bs]),
                                                                  generation: 60)], epoch: 1)
            guard case ReplicaError.staleEpoch? = stale[0] else { return XCTFail("\(String(describing: stale[0]))") }
            for (i, block) in blocks.enumerated() {
                XCTAssertEqual(try store.read(offset: block * UInt64(bs), length: bs, epoch: 2), pattern(blocks: 1, seed: 10 + i))
            }
            XCTAssertEqual(try store.generations(firstBlock: 9, count: 1, epoch: 2), [0])
            XCTAssertEqual(store.status.highestGeneration, UInt64(5 + blocks.count - 1))
            try store.flush(epoch: 2)
        }  // crash: no close
        try loseInPlaceWrites(blocks: blocks)
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        for (i, block) in blocks.enumerated() {
            XCTAssertEqual(try store.read(offset: block * UInt64(bs), length: bs, epoch: 2), pattern(blocks: 1, seed: 10 + i),
                           "block \(block) came back from the journal")
            XCTAssertEqual(try store.generations(firstBlock: block, count: 1, epoch: 2), [UInt64(5 + i)])
        }
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 4096, epoch: 2), [])
    }

    func testReplaySkipsATornRecordAndAppliesTheWholeOnesAroundIt() throws {
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
            for g in 1...4 {
                try store.write(offset: UInt64(g * 10 * bs), data: pattern(blocks: 1, seed: g), generation: UInt64(g), epoch: 0)
            }
            try store.flush(epoch: 0)
        }
        // Record 3 (gen 3) is torn: a byte of its data changed. Records are 8 KiB from offset 4 KiB.
        let recordData = bs + 2 * (2 * bs) + bs
        var byte = try fileBytes(journalPath, at: recordData + 7, count: 1)
        byte[0] ^= 0xFF
        let fd = open(journalPath, O_RDWR)
        XCTAssertEqual(byte.withUnsafeBytes { pwrite(fd, $0.baseAddress, 1, off_t(recordData + 7)) }, 1)
        close(fd)
        try loseInPlaceWrites(blocks: [10, 20, 30, 40])
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(try store.read(offset: UInt64(10 * bs), length: bs, epoch: 0), pattern(blocks: 1, seed: 1))
        XCTAssertEqual(try store.read(offset: UInt64(20 * bs), length: bs, epoch: 0), pattern(blocks: 1, seed: 2))
        // The torn record is not applied (its block reads as never written, consistently); the
        // whole one after it is (an unflushed write may land: its in-place copy may have).
        XCTAssertEqual(try store.generations(firstBlock: 30, count: 11, epoch: 0)[0], 0)
        XCTAssertEqual(try store.generations(firstBlock: 30, count: 11, epoch: 0)[10], 4)
        XCTAssert(try store.read(offset: UInt64(40 * bs), length: bs, epoch: 0) == pattern(blocks: 1, seed: 4))
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 4096, epoch: 0), [])
    }

    func testReplayNeverUndoesANewerWriteOrATrimOfTheSameGeneration() throws {
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
            try store.write(offset: UInt64(100 * bs), data: pattern(blocks: 1, seed: 1), generation: 5, epoch: 0)
            try store.write(offset: UInt64(bs), data: pattern(blocks: 1, seed: 2), generation: 6, epoch: 0)
            // A trim at the highest generation (6) of block 1, and a large in-place write over block 100.
            try store.trim(offset: UInt64(bs), length: bs, epoch: 0)
            var large = pattern(blocks: 80, seed: 9)
            large[0] = 0xAB
            try store.write(offset: UInt64(100 * bs), data: large, generation: 7, epoch: 0)
            try store.flush(epoch: 0)
        }
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        var expected = pattern(blocks: 1, seed: 9)
        expected[0] = 0xAB
        XCTAssert(try store.read(offset: UInt64(100 * bs), length: bs, epoch: 0) == expected, "the older journaled write came back")
        XCTAssert(try store.read(offset: UInt64(bs), length: bs, epoch: 0) == [UInt8](repeating: 0, count: bs), "the trim was undone")
        XCTAssertEqual(try store.generations(firstBlock: 1, count: 1, epoch: 0), [6 | BlockGenerations.trimmedBit])
        XCTAssertEqual(try store.generations(firstBlock: 100, count: 1, epoch: 0), [7])
    }

    func testAFlushRecordsTheGenerationTheEngineVouchesForNotTheHighestSeen() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
        defer { try? store.close() }
        // Generation 11 arrived first; 10 is still on its way.
        try store.write(offset: 0, data: pattern(blocks: 1, seed: 1), generation: 11, epoch: 0)
        try store.flush(epoch: 0, through: 9)
        XCTAssertEqual(store.status.flushedGeneration, 9)
        try store.write(offset: UInt64(bs), data: pattern(blocks: 1, seed: 2), generation: 10, epoch: 0)
        try store.flush(epoch: 0, through: 11)
        XCTAssertEqual(store.status.flushedGeneration, 11)
        // Never above what the replica holds, never backwards.
        try store.flush(epoch: 0, through: 50)
        XCTAssertEqual(store.status.flushedGeneration, 11)
        try store.flush(epoch: 0, through: 3)
        XCTAssertEqual(store.status.flushedGeneration, 11)
    }

    func testAFullJournalFallsBackToInPlaceWritesAndTheNextFlushCheckpoints() throws {
        // A 16 MiB volume has a 2 MiB journal: 255 records of one block; write 700.
        let blocks = 700
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
            for b in 0..<blocks {
                try store.write(offset: UInt64(b * bs), data: pattern(blocks: 1, seed: b), generation: UInt64(b + 1), epoch: 0)
            }
            try store.flush(epoch: 0)
            XCTAssertEqual(store.status.flushedGeneration, UInt64(blocks))
            // After the checkpoint the journal is empty again and takes small writes.
            try store.write(offset: 0, data: pattern(blocks: 1, seed: 1000), generation: UInt64(blocks + 1), epoch: 0)
            try store.flush(epoch: 0)
        }
        try loseInPlaceWrites(blocks: [0])
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(try store.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 1000))
        for b in [1, 300, 511, 699] {
            XCTAssertEqual(try store.read(offset: UInt64(b * bs), length: bs, epoch: 0), pattern(blocks: 1, seed: b), "block \(b)")
        }
        XCTAssertEqual(store.status.flushedGeneration, UInt64(blocks), "the checkpoint's, kept in the journal header")
    }

    /// Writes `entries` into the block map behind the store's back: what the map held before an
    /// in-place write whose data landed and whose entries did not.
    private func restoreEntries(first: UInt64, _ entries: [BlockMapEntry]) throws {
        let fd = open(blockMapPath, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: entries.count * BlockMapEntry.encodedSize)
        bytes.withUnsafeMutableBytes { raw in
            for (i, e) in entries.enumerated() { e.encode(into: raw.baseAddress! + i * BlockMapEntry.encodedSize) }
        }
        XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(Int(first) * BlockMapEntry.encodedSize)) },
                       bytes.count)
    }

    func testAnInPlaceWriteOrTrimCutBeforeItsMapEntriesIsNotReadAsCorruption() throws {
        var flushedEntries: [BlockMapEntry] = []
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
            try store.write(offset: 0, data: pattern(blocks: 100, seed: 1), generation: 1, epoch: 0)  // in place (400 KiB)
            try store.flush(epoch: 0)
            flushedEntries = try store.state.withShared { try $0.blockMap.read(first: 0, count: 100) }
            // In flight when the process dies: a large write over blocks 0–79 and a trim of 80–99,
            // whose data reached the file and whose entries did not.
            try store.write(offset: 0, data: pattern(blocks: 80, seed: 2), generation: 2, epoch: 0)
            try store.trim(offset: 80 * UInt64(bs), length: 20 * bs, generation: 3, epoch: 0)
        }
        try restoreEntries(first: 0, flushedEntries)
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 100, epoch: 0), [], "no block may read as corrupt")
        XCTAssert(try store.read(offset: 0, length: 80 * bs, epoch: 0) == pattern(blocks: 80, seed: 2))
        XCTAssert(try store.read(offset: 80 * UInt64(bs), length: 20 * bs, epoch: 0) == [UInt8](repeating: 0, count: 20 * bs))
        let generations = try store.generations(firstBlock: 0, count: 100, epoch: 0)
        XCTAssertEqual(Set(generations[0..<80]), [2], "recorded at the unacknowledged write's generation")
        XCTAssertEqual(Set(generations[80..<100]), [3 | BlockGenerations.trimmedBit], "a trim is recorded as a trim")
    }

    /// A new journal's blocks are written (zeros), not just allocated: an append into an
    /// *unwritten* extent makes its fdatasync commit the extent's conversion too — a filesystem
    /// journal commit per flush on every fresh replica. `filefrag -v` flags such extents.
    func testANewJournalHasNoUnwrittenExtents() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 64 << 20)
        defer { try? store.close() }
        let filefrag = Process()
        filefrag.executableURL = URL(fileURLWithPath: "/usr/sbin/filefrag")
        guard FileManager.default.isExecutableFile(atPath: filefrag.executableURL!.path) else {
            throw XCTSkip("filefrag (e2fsprogs) is not installed")
        }
        filefrag.arguments = ["-v", journalPath]
        let pipe = Pipe()
        filefrag.standardOutput = pipe
        filefrag.standardError = pipe
        try filefrag.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        filefrag.waitUntilExit()
        guard filefrag.terminationStatus == 0 else { throw XCTSkip("filefrag cannot map this filesystem: \(output)") }
        XCTAssertTrue(output.contains(" found"), output)
        XCTAssertFalse(output.contains("unwritten"), "the journal still has unwritten extents:\n\(output)")
    }

    func testTheSuperblockSaysJournaledWhileOpenAndPlainAfterAnOrderlyClose() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
        try store.write(offset: 0, data: pattern(blocks: 1, seed: 1), generation: 1, epoch: 0)
        let open = try fileBytes(dir + "/superblock", at: 8, count: 4)
        XCTAssertEqual(open, [2, 0, 0, 0], "version 2 while the journal may hold writes: older builds refuse it")
        try store.close()
        XCTAssertEqual(try fileBytes(dir + "/superblock", at: 8, count: 4), [1, 0, 0, 0])
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        XCTAssertEqual(try reopened.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 1))
        try reopened.close()
    }

    /// The lost-write race of a flush that does not drain: a flush's sync that runs after a
    /// record's place is reserved and before the record is written does not cover it, so the
    /// journal's "unsynced" mark must be set once it is written, or the flush that follows the
    /// write's answer would sync nothing. Both ways a record is written: a write alone and a
    /// group of writes.
    func testARecordWrittenWhileAFlushSyncsIsSyncedByTheNextFlush() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
        defer {
            Journal.afterReservingARecordForTesting = nil
            try? store.close()
        }
        let journal = store.state.withShared { $0.journal }
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 * bs, alignment: bs)
        defer { data.deallocate() }
        pattern(blocks: 2, seed: 3).withUnsafeBytes { data.copyMemory(from: $0) }
        var generation: UInt64 = 0
        for grouped in [false, true] {
            let overtaken = Atomic<Int>(0)
            Journal.afterReservingARecordForTesting = { j in
                // A flush's sync lands here, between the reservation and the write.
                try? j.sync()
                overtaken.wrappingAdd(1, ordering: .relaxed)
            }
            if grouped {
                let writes = (0..<2).map { i -> ReplicaStore.GroupWrite in
                    generation += 1
                    return ReplicaStore.GroupWrite(offset: UInt64((10 + i) * bs),
                                                   data: UnsafeRawBufferPointer(rebasing: data[(i * bs)..<((i + 1) * bs)]),
                                                   generation: generation)
                }
                XCTAssert(store.writeGroup(writes, epoch: 0).allSatisfy { $0 == nil })
            } else {
                generation += 1
                try store.write(offset: 0, bytes: UnsafeRawBufferPointer(rebasing: data[0..<bs]), generation: generation, epoch: 0)
            }
            Journal.afterReservingARecordForTesting = nil
            XCTAssertGreaterThan(overtaken.load(ordering: .relaxed), 0, "no record was written (grouped: \(grouped))")
            XCTAssertTrue(journal.unsynced.load(ordering: .relaxed),
                          "a record written after a flush's sync began is left for no flush to sync (grouped: \(grouped))")
            try store.flush(epoch: 0, through: generation)
            XCTAssertFalse(journal.unsynced.load(ordering: .relaxed))
        }
    }

    func testConcurrentWritersAndFlushesLoseNothingFlushed() throws {
        let writers = 6, perWriter = 150
        let flushedUpTo = Mutex([Int](repeating: -1, count: writers))
        let bs = bs
        do {
            // 512 MiB: a 64 MiB journal, so no checkpoint comes between (one would make the
            // in-place copies durable, which this test then pretends were lost).
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 512 << 20)
            DispatchQueue.concurrentPerform(iterations: writers) { w in
                for i in 0..<perWriter {
                    let block = UInt64(w * 1000 + i)
                    let generation = UInt64(w * perWriter + i + 1)
                    try! store.write(offset: block * UInt64(bs), data: Self.pattern(blocks: 1, seed: w * 7919 + i),
                                     generation: generation, epoch: 0)
                    if i % 10 == 9 {
                        try! store.flush(epoch: 0, through: 0)
                        flushedUpTo.withLock { $0[w] = i }
                    }
                }
            }
        }
        let flushed = flushedUpTo.withLock { $0 }
        try loseInPlaceWrites(blocks: (0..<writers).flatMap { w in (0..<perWriter).map { UInt64(w * 1000 + $0) } })
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        for w in 0..<writers {
            for i in 0...flushed[w] {
                let block = UInt64(w * 1000 + i)
                let found = try store.read(offset: block * UInt64(bs), length: bs, epoch: 0)
                XCTAssert(found == pattern(blocks: 1, seed: w * 7919 + i), "writer \(w) write \(i) was flushed and is lost")
            }
        }
        XCTAssertEqual(try store.verify(firstBlock: 0, count: 16384, epoch: 0), [])
    }
}
