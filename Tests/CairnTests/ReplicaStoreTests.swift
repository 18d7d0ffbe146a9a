import CairnCore
@testable import CairnReplica
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The single-layer replica store on a real filesystem (docs/replica-format.md).
final class ReplicaStoreTests: XCTestCase {
    private var root = ""
    private var dir: String { root + "/replica" }
    private let volume = "pvc-3f1c"
    private let bs = ReplicaStore.blockSize

    override func setUpWithError() throws {
        root = "/tmp/cairn-replica-test-" + UUID().uuidString
        XCTAssertEqual(mkdir(root, 0o700), 0)
    }

    override func tearDownWithError() throws {
        if !root.isEmpty { try? FileManager.default.removeItem(atPath: root) }
    }

    // MARK: helpers

    private func pattern(blocks: Int, seed: UInt8) -> [UInt8] { Self.pattern(blocks: blocks, seed: seed) }

    private static func pattern(blocks: Int, seed: UInt8) -> [UInt8] {
        (0..<(blocks * ReplicaStore.blockSize)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed) &* 7 &+ ($0 >> 12)) }
    }

    private func assertReplicaError<T>(_ expected: ReplicaError, _ body: () throws -> T,
                                       file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("expected \(expected), got success", file: file, line: line)
        } catch let e as ReplicaError {
            XCTAssertEqual(e, expected, file: file, line: line)
        } catch {
            XCTFail("expected \(expected), got \(error)", file: file, line: line)
        }
    }

    private func assertBadRequest<T>(_ body: () throws -> T, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("expected badRequest, got success", file: file, line: line)
        } catch let e as ReplicaError {
            guard case .badRequest = e else { return XCTFail("expected badRequest, got \(e)", file: file, line: line) }
        } catch {
            XCTFail("expected badRequest, got \(error)", file: file, line: line)
        }
    }

    private var dataPath: String { dir + "/layers/0000000001/data" }
    private var blockMapPath: String { dir + "/layers/0000000001/blockmap" }

    /// Overwrites bytes of a file behind the store's back (buffered; the kernel keeps it
    /// coherent with the store's O_DIRECT reads).
    private func poke(_ path: String, at offset: Int, _ bytes: [UInt8]) throws {
        let fd = open(path, O_RDWR)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
        XCTAssertEqual(n, bytes.count)
        XCTAssertEqual(fsync(fd), 0)
    }

    private func peek(_ path: String, at offset: Int, count: Int) throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: count)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        XCTAssertEqual(n, count)
        return bytes
    }

    private func flipByte(_ path: String, at offset: Int) throws {
        let old = try peek(path, at: offset, count: 1)[0]
        try poke(path, at: offset, [old ^ 0x5A])
    }

    private func allocatedBytes(_ path: String) -> Int {
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        return Int(st.st_blocks) * 512
    }

    // MARK: round trips

    func testWriteReadRoundTripAtSeveralOffsets() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 64 << 20)
        defer { try? store.close() }
        let cases: [(offset: UInt64, blocks: Int)] = [(0, 1), (4096, 3), (1 << 20, 16), ((64 << 20) - 8192, 2)]
        for (i, c) in cases.enumerated() {
            let data = pattern(blocks: c.blocks, seed: UInt8(i + 1))
            try store.write(offset: c.offset, data: data, generation: UInt64(i + 1), epoch: 0)
            XCTAssertEqual(try store.read(offset: c.offset, length: data.count, epoch: 0), data, "offset \(c.offset)")
        }
        // A read spanning written and unwritten blocks: block 0 written, block 4 never.
        let mixed = try store.read(offset: 0, length: 5 * bs, epoch: 0)
        XCTAssertEqual(Array(mixed[0..<bs]), pattern(blocks: 1, seed: 1))
        XCTAssertEqual(Array(mixed[(4 * bs)...]), [UInt8](repeating: 0, count: bs))
        // Survives a close and reopen.
        try store.close()
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? reopened.close() }
        for (i, c) in cases.enumerated() {
            XCTAssertEqual(try reopened.read(offset: c.offset, length: c.blocks * bs, epoch: 0),
                           pattern(blocks: c.blocks, seed: UInt8(i + 1)))
        }
        XCTAssertEqual(reopened.recovery, RecoveryReport())
        XCTAssertEqual(reopened.status.highestGeneration, 4)
        XCTAssertEqual(reopened.status.flushedGeneration, 4)
    }

    // MARK: planned (asynchronous) reads

    /// A plan names the data file's descriptor and offset, each written block's checksum and
    /// each hole's zero bit; a range of holes needs no I/O at all.
    func testAPlannedReadNamesTheFileTheChecksumsAndTheHoles() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 8 << 20)
        defer { try? store.close() }
        try store.claim(epoch: 2)
        let data = pattern(blocks: 2, seed: 7)
        try store.write(offset: UInt64(4 * bs), data: data, generation: 1, epoch: 2)
        try store.trim(offset: UInt64(5 * bs), length: bs, generation: 2, epoch: 2)
        var crcs = [UInt32](repeating: 0, count: 64)
        let plan = try crcs.withUnsafeMutableBufferPointer {
            try store.planRead(offset: UInt64(3 * bs), length: 4 * bs, epoch: 2, checksums: $0.baseAddress!)
        }
        let p = try XCTUnwrap(plan)
        defer { store.endPlannedRead() }
        XCTAssertGreaterThanOrEqual(p.fd, 0)
        XCTAssertEqual(p.fileOffset, UInt64(3 * bs))
        XCTAssertEqual(p.zeros, 0b1101, "blocks 3 (never written), 5 (trimmed) and 6 read as zeros")
        XCTAssertEqual(crcs[1], data.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<bs])) })
        // What the descriptor holds there is what `read` answers.
        let direct = UnsafeMutableRawBufferPointer(start: aligned_alloc(4096, bs), count: bs)
        defer { free(direct.baseAddress) }
        XCTAssertEqual(pread(p.fd, direct.baseAddress, bs, off_t(4 * bs)), bs)
        XCTAssertEqual(Array(direct), Array(data[0..<bs]))

        let none = try crcs.withUnsafeMutableBufferPointer {
            try store.planRead(offset: UInt64(100 * bs), length: 64 * bs, epoch: 2, checksums: $0.baseAddress!)
        }
        XCTAssertEqual(none?.fd, -1, "no block written: zeros without I/O")
        XCTAssertEqual(none?.zeros, ~0)
        // Stale epochs are refused as `read` refuses them; too long a range is not planned.
        assertReplicaError(.staleEpoch(seen: 2, got: 1)) {
            try crcs.withUnsafeMutableBufferPointer {
                try store.planRead(offset: 0, length: bs, epoch: 1, checksums: $0.baseAddress!)
            }
        }
        XCTAssertNil(try crcs.withUnsafeMutableBufferPointer {
            try store.planRead(offset: 0, length: 65 * bs, epoch: 2, checksums: $0.baseAddress!)
        })
    }

    /// The hazard a plan carries: its descriptor must not be closed (and its number given to
    /// another file or a socket) while the read is in flight. Closing waits for it.
    func testClosingTheStoreWaitsForAPlannedReadInFlight() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        try store.write(offset: 0, data: pattern(blocks: 1, seed: 3), generation: 1, epoch: 0)
        var crcs = [UInt32](repeating: 0, count: 64)
        let plan = try crcs.withUnsafeMutableBufferPointer {
            try store.planRead(offset: 0, length: bs, epoch: 0, checksums: $0.baseAddress!)
        }
        let fd = try XCTUnwrap(plan?.fd)
        let closed = Atomic<Bool>(false)
        let done = DispatchSemaphore(value: 0)
        Thread {
            try? store.close()
            closed.store(true, ordering: .releasing)
            done.signal()
        }.start()
        usleep(300_000)
        XCTAssertFalse(closed.load(ordering: .acquiring), "the store closed its files under a planned read")
        XCTAssertGreaterThanOrEqual(fcntl(fd, F_GETFD), 0, "the planned read's descriptor is still open")
        store.endPlannedRead()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertTrue(closed.load(ordering: .acquiring))
    }

    func testOverwriteReplacesDataAndGeneration() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        defer { try? store.close() }
        try store.write(offset: 8192, data: pattern(blocks: 1, seed: 1), generation: 1, epoch: 0)
        try store.write(offset: 8192, data: pattern(blocks: 1, seed: 2), generation: 2, epoch: 0)
        XCTAssertEqual(try store.read(offset: 8192, length: bs, epoch: 0), pattern(blocks: 1, seed: 2))
        XCTAssertEqual(try store.blocksNewer(than: 1), [2])
    }

    func testNeverWrittenBlocksReadAsZeros() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
        defer { try? store.close() }
        XCTAssertEqual(try store.read(offset: 0, length: 256 * bs, epoch: 0), [UInt8](repeating: 0, count: 256 * bs))
        XCTAssertEqual(try store.read(offset: (16 << 20) - 4096, length: bs, epoch: 0), [UInt8](repeating: 0, count: bs))
    }

    func testReplicaStaysSparseAfterAWriteFarIntoAOneGiBVolume() throws {
        let size: UInt64 = 1 << 30
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: size)
        defer { try? store.close() }
        try store.write(offset: size - 2 * 4096, data: pattern(blocks: 2, seed: 9), generation: 1, epoch: 0)
        try store.flush(epoch: 0)
        var st = stat()
        XCTAssertEqual(stat(dataPath, &st), 0)
        XCTAssertEqual(UInt64(st.st_size), size, "the data file is volume-sized")
        XCTAssertLessThan(allocatedBytes(dataPath), 1 << 20, "but only the written blocks are allocated")
        XCTAssertLessThan(allocatedBytes(blockMapPath), 1 << 20, "and so is the block map (4 MiB if dense)")
        XCTAssertEqual(try store.read(offset: size - 2 * 4096, length: 2 * bs, epoch: 0), pattern(blocks: 2, seed: 9))
        XCTAssertEqual(try store.blocksNewer(than: 0), [262_142, 262_143])
    }

    // MARK: corruption

    func testAFlippedByteInTheDataFileIsACheckSumMismatchOnRead() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        defer { try? store.close() }
        try store.write(offset: 0, data: pattern(blocks: 4, seed: 3), generation: 1, epoch: 0)
        try store.flush(epoch: 0)
        try flipByte(dataPath, at: 2 * 4096 + 1234)  // inside block 2
        assertReplicaError(.checksumMismatch(block: 2)) { try store.read(offset: 0, length: 4 * bs, epoch: 0) }
        assertReplicaError(.checksumMismatch(block: 2)) { try store.read(offset: 8192, length: bs, epoch: 0) }
        // The neighbours are intact and still read.
        XCTAssertEqual(try store.read(offset: 0, length: 2 * bs, epoch: 0), Array(pattern(blocks: 4, seed: 3)[0..<(2 * bs)]))
        XCTAssertEqual(try store.read(offset: 3 * 4096, length: bs, epoch: 0), Array(pattern(blocks: 4, seed: 3)[(3 * bs)...]))
        // Still detected after a clean close and reopen (no recovery hides it).
        try store.close()
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? reopened.close() }
        assertReplicaError(.checksumMismatch(block: 2)) { try reopened.read(offset: 8192, length: bs, epoch: 0) }
        // A rewrite of the block heals it.
        try reopened.write(offset: 8192, data: pattern(blocks: 1, seed: 4), generation: 2, epoch: 0)
        XCTAssertEqual(try reopened.read(offset: 8192, length: bs, epoch: 0), pattern(blocks: 1, seed: 4))
    }

    func testAChecksumMismatchIsDataLoss() {
        XCTAssertEqual(ReplicaError.checksumMismatch(block: 7).status.code, .dataLoss)
        XCTAssertEqual(RPCStatus.from(ReplicaError.checksumMismatch(block: 7)).code, .dataLoss)
        XCTAssertEqual(ReplicaError.staleEpoch(seen: 2, got: 1).status.code, .failedPrecondition)
        XCTAssertEqual(ReplicaError.badRequest("x").status.code, .invalidArgument)
        XCTAssertEqual(ReplicaError.corruptSuperblock("x").status.code, .dataLoss)
        XCTAssertEqual(ReplicaError.wrongVolume(expected: "a", found: "b").status.code, .failedPrecondition)
        XCTAssertEqual(ReplicaError.notFound("x").status.code, .notFound)
        XCTAssertEqual(ReplicaError.alreadyExists("x").status.code, .alreadyExists)
    }

    // MARK: fencing

    func testAStaleEpochIsRefusedForEveryOpAndChangesNothing() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        defer { try? store.close() }
        try store.claim(epoch: 5)
        try store.write(offset: 0, data: pattern(blocks: 2, seed: 1), generation: 1, epoch: 5)
        try store.flush(epoch: 5)
        try store.write(offset: 8192, data: pattern(blocks: 1, seed: 2), generation: 2, epoch: 5)
        let before = store.status
        let superblockBefore = try peek(dir + "/superblock", at: 0, count: 4096)
        let stale = ReplicaError.staleEpoch(seen: 5, got: 4)

        assertReplicaError(stale) { try store.read(offset: 0, length: bs, epoch: 4) }
        assertReplicaError(stale) { try store.write(offset: 0, data: pattern(blocks: 1, seed: 9), generation: 3, epoch: 4) }
        assertReplicaError(stale) { try store.flush(epoch: 4) }
        assertReplicaError(stale) { try store.trim(offset: 0, length: bs, epoch: 4) }
        assertReplicaError(stale) { try store.grow(to: 2 << 20, epoch: 4) }
        assertReplicaError(stale) { try store.claim(epoch: 4) }
        assertReplicaError(.staleEpoch(seen: 5, got: 0)) { try store.claim(epoch: 0) }

        XCTAssertEqual(store.status, before)
        XCTAssertEqual(try peek(dir + "/superblock", at: 0, count: 4096), superblockBefore, "superblock untouched")
        XCTAssertEqual(try store.read(offset: 0, length: 2 * bs, epoch: 5), pattern(blocks: 2, seed: 1))
        XCTAssertEqual(try store.read(offset: 8192, length: bs, epoch: 5), pattern(blocks: 1, seed: 2))
        XCTAssertEqual(try store.blocksNewer(than: 0), [0, 1, 2])
        // The current epoch and a newer one are accepted.
        XCTAssertNoThrow(try store.read(offset: 0, length: bs, epoch: 6))
        XCTAssertEqual(store.status.epoch, 5, "reading with a newer epoch does not claim it")
    }

    func testAClaimPersistsAcrossCloseAndOpen() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        try store.claim(epoch: 3)
        try store.claim(epoch: 3)  // the same epoch again is a no-op
        try store.claim(epoch: 7)
        XCTAssertEqual(store.status.epoch, 7)
        try store.close()
        assertReplicaError(.closed) { try store.claim(epoch: 8) }

        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? reopened.close() }
        XCTAssertEqual(reopened.status.epoch, 7)
        assertReplicaError(.staleEpoch(seen: 7, got: 6)) { try reopened.write(offset: 0, data: pattern(blocks: 1, seed: 1), generation: 1, epoch: 6) }
        XCTAssertEqual(try Superblock.read(directory: dir).epoch, 7)
    }

    func testAClaimPersistsEvenWithoutAnOrderlyClose() throws {
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
            try store.claim(epoch: 11)
        }  // dropped: no close
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? reopened.close() }
        XCTAssertEqual(reopened.status.epoch, 11)
    }

    // MARK: superblock

    func testSuperblockRoundTripsAndRejectsBadMagicVersionAndChecksum() throws {
        let sb = Superblock(volumeID: volume, size: 1 << 30, epoch: 9, flushedGeneration: 42, clean: true, layers: [1, 2, 5])
        let image = sb.encode()
        XCTAssertEqual(image.count, 4096)
        XCTAssertEqual(Array(image[0..<8]), Array("CAIRNRP1".utf8))
        XCTAssertEqual(try Superblock.decode(image), sb)

        var badMagic = image
        badMagic[0] = UInt8(ascii: "X")
        XCTAssertThrowsError(try Superblock.decode(badMagic)) { e in
            guard case .corruptSuperblock(let why) = e as? ReplicaError else { return XCTFail("\(e)") }
            XCTAssertTrue(why.contains("magic"), why)
        }
        var badVersion = image
        badVersion[8] = 3
        XCTAssertThrowsError(try Superblock.decode(badVersion)) { e in
            guard case .corruptSuperblock(let why) = e as? ReplicaError else { return XCTFail("\(e)") }
            XCTAssertTrue(why.contains("version 3"), why)
        }
        var badField = image
        badField[8 + 4 + 4 + 128] ^= 1  // a bit of the size
        XCTAssertThrowsError(try Superblock.decode(badField)) { e in
            guard case .corruptSuperblock(let why) = e as? ReplicaError else { return XCTFail("\(e)") }
            XCTAssertTrue(why.contains("checksum"), why)
        }
        assertReplicaError(.wrongVolume(expected: "pvc-other", found: volume)) {
            try Superblock.decode(image, expectedVolumeID: "pvc-other")
        }
    }

    func testOpenRefusesACorruptSuperblock() throws {
        try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20).close()
        try flipByte(dir + "/superblock", at: 8 + 4 + 4 + 3)  // a byte of the volume id
        XCTAssertThrowsError(try ReplicaStore.open(directory: dir, volumeID: volume)) { e in
            guard case .corruptSuperblock = e as? ReplicaError else { return XCTFail("\(e)") }
            XCTAssertEqual(RPCStatus.from(e).code, .dataLoss)
        }
    }

    func testOpenRefusesAnotherVolumesReplica() throws {
        try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20).close()
        assertReplicaError(.wrongVolume(expected: "pvc-other", found: volume)) {
            try ReplicaStore.open(directory: dir, volumeID: "pvc-other")
        }
        // Nothing was changed by the refused open: the right volume still opens cleanly.
        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        XCTAssertEqual(store.recovery, RecoveryReport())
        try store.close()
    }

    func testCreateRefusesAnExistingReplicaAndOpenRefusesAMissingOne() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        try store.write(offset: 0, data: pattern(blocks: 1, seed: 1), generation: 1, epoch: 0)
        try store.close()
        assertReplicaError(.alreadyExists("a replica already exists in \(dir)")) {
            try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        }
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        XCTAssertEqual(try reopened.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 1), "data untouched")
        try reopened.close()
        XCTAssertThrowsError(try ReplicaStore.open(directory: root + "/nothing", volumeID: volume)) { e in
            guard case .notFound = e as? ReplicaError else { return XCTFail("\(e)") }
        }
        assertBadRequest { try ReplicaStore.create(directory: root + "/b", volumeID: volume, size: 1000) }
        assertBadRequest { try ReplicaStore.create(directory: root + "/c", volumeID: "", size: 4096) }
        assertBadRequest { try ReplicaStore.create(directory: root + "/d", volumeID: String(repeating: "v", count: 129), size: 4096) }
    }

    func testAReplicaOpensInOneStoreAtATime() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        try store.write(offset: 0, data: pattern(blocks: 1, seed: 1), generation: 1, epoch: 0)
        XCTAssertThrowsError(try ReplicaStore.open(directory: dir, volumeID: volume)) { e in
            guard case .inUse = e as? ReplicaError else { return XCTFail("\(e)") }
            XCTAssertEqual(RPCStatus.from(e).code, .aborted)
        }
        XCTAssertFalse(try Superblock.read(directory: dir).clean, "the refused open changed nothing")
        XCTAssertEqual(try store.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 1))
        try store.close()
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        XCTAssertEqual(try reopened.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 1))
        try reopened.close()
    }

    func testTheDataFileDescriptorCarriesODirectWhenTheStoreSaysSo() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        defer { try? store.close() }
        guard store.usesDirectIO else { throw XCTSkip("the filesystem under /tmp refuses O_DIRECT") }
        let flags = try ProcFile.text("/proc/self/fdinfo/\(dataDescriptor())")
            .split(separator: "\n").first { $0.hasPrefix("flags:") }
        let octal = Int(flags?.split(separator: "\t").last.map(String.init) ?? "", radix: 8) ?? 0
        XCTAssertNotEqual(octal & Int(FileIO.O_DIRECT), 0, "the open descriptor carries O_DIRECT")
    }

    /// The descriptor this process has open on the replica's data file.
    private func dataDescriptor() throws -> Int {
        for name in try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + name),
               target == dataPath, let fd = Int(name) { return fd }
        }
        XCTFail("no descriptor open on \(dataPath)")
        return -1
    }

    func testCreateLaysOutTheDocumentedFiles() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 8 << 20)
        defer { try? store.close() }
        var st = stat()
        XCTAssertEqual(stat(dataPath, &st), 0)
        XCTAssertEqual(st.st_size, 8 << 20)
        XCTAssertEqual(stat(blockMapPath, &st), 0)
        XCTAssertEqual(st.st_size, 2048 * 16)
        let sb = try Superblock.read(directory: dir, expectedVolumeID: volume)
        XCTAssertEqual(sb.layers, [1])
        XCTAssertEqual(sb.blockSize, 4096)
        XCTAssertFalse(sb.clean, "clean = 0 while open")
        try store.close()
        XCTAssertTrue(try Superblock.read(directory: dir).clean, "clean = 1 after close")
    }

    // MARK: crash recovery

    func testUncleanCloseRecoversUnflushedBlocksWhileFlushedCorruptionStillFails() throws {
        do {
            let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
            try store.write(offset: 0, data: pattern(blocks: 2, seed: 1), generation: 1, epoch: 0)
            try store.flush(epoch: 0)
            // An orderly close and reopen: the journal starts over, so block 0–1 live in place only.
            try store.close()
            let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
            // Too large for the journal (> 256 KiB): in place only, and not flushed.
            try reopened.write(offset: 4 * 4096, data: pattern(blocks: 70, seed: 2), generation: 2, epoch: 0)
            XCTAssertEqual(reopened.status.flushedGeneration, 1)
            XCTAssertEqual(reopened.status.highestGeneration, 2)
        }  // "crash": the store is dropped without close, clean stays 0
        XCTAssertFalse(try Superblock.read(directory: dir).clean)
        try flipByte(dataPath, at: 4 * 4096 + 10)  // unflushed block 4: a torn write
        try flipByte(dataPath, at: 1 * 4096 + 10)  // flushed block 1: corruption

        let store = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? store.close() }
        XCTAssertEqual(store.recovery.unflushedBlocks, Array(4..<74))
        XCTAssertEqual(store.recovery.rewrittenBlocks, [4])
        XCTAssertEqual(store.status.highestGeneration, 2)
        XCTAssertEqual(store.status.flushedGeneration, 1)
        // The unflushed block reads as whatever was found (some version of an unacknowledged write).
        var torn = pattern(blocks: 2, seed: 2)
        torn[10] ^= 0x5A
        XCTAssertEqual(try store.read(offset: 4 * 4096, length: 2 * bs, epoch: 0), torn)
        // The flushed block's mismatch is corruption and is not papered over.
        assertReplicaError(.checksumMismatch(block: 1)) { try store.read(offset: 0, length: 2 * bs, epoch: 0) }
        XCTAssertEqual(try store.read(offset: 0, length: bs, epoch: 0), Array(pattern(blocks: 1, seed: 1)))
        // Resync would fetch the unflushed blocks.
        XCTAssertEqual(try store.blocksNewer(than: 1), Array(4..<74))
    }

    // MARK: trim, grow

    func testTrimReadsZerosAndFreesSpace() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 16 << 20)
        defer { try? store.close() }
        try store.write(offset: 1 << 20, data: pattern(blocks: 512, seed: 5), generation: 1, epoch: 0)  // 2 MiB
        try store.flush(epoch: 0)
        let before = allocatedBytes(dataPath)
        XCTAssertGreaterThanOrEqual(before, 2 << 20)

        try store.trim(offset: 1 << 20, length: 256 * bs, generation: 2, epoch: 0)  // the first MiB
        try store.flush(epoch: 0)
        XCTAssertLessThanOrEqual(allocatedBytes(dataPath), before - (1 << 20), "the trimmed MiB was freed")
        XCTAssertEqual(try store.read(offset: 1 << 20, length: 256 * bs, epoch: 0), [UInt8](repeating: 0, count: 256 * bs))
        XCTAssertEqual(try store.read(offset: 2 << 20, length: 256 * bs, epoch: 0),
                       Array(pattern(blocks: 512, seed: 5)[(256 * bs)...]), "the rest is untouched")
        XCTAssertEqual(try store.blocksNewer(than: 1), Array(256..<512), "a resync sees the trim")
        let entry = try BlockMap(path: blockMapPath, create: false).read(block: 256)
        XCTAssertTrue(entry.isTrimmed)
        XCTAssertEqual(entry.generation, 2)

        // Trimmed blocks stay zeros across a reopen, and a later write replaces the trim.
        try store.close()
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? reopened.close() }
        XCTAssertEqual(try reopened.read(offset: 1 << 20, length: bs, epoch: 0), [UInt8](repeating: 0, count: bs))
        try reopened.write(offset: 1 << 20, data: pattern(blocks: 1, seed: 6), generation: 3, epoch: 0)
        XCTAssertEqual(try reopened.read(offset: 1 << 20, length: bs, epoch: 0), pattern(blocks: 1, seed: 6))
    }

    func testGrowExtendsTheVolumeSparselyAndPersists() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 1 << 20)
        try store.write(offset: 0, data: pattern(blocks: 1, seed: 1), generation: 1, epoch: 0)
        assertBadRequest { try store.write(offset: 1 << 20, data: pattern(blocks: 1, seed: 2), generation: 2, epoch: 0) }
        try store.grow(to: 4 << 20, epoch: 0)
        try store.grow(to: 4 << 20, epoch: 0)  // the same size again is a no-op
        XCTAssertEqual(store.status.size, 4 << 20)
        XCTAssertEqual(try store.read(offset: (4 << 20) - 4096, length: bs, epoch: 0), [UInt8](repeating: 0, count: bs))
        try store.write(offset: (4 << 20) - 4096, data: pattern(blocks: 1, seed: 2), generation: 2, epoch: 0)
        assertBadRequest { try store.grow(to: 2 << 20, epoch: 0) }
        assertBadRequest { try store.grow(to: (8 << 20) + 1, epoch: 0) }
        try store.close()

        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        defer { try? reopened.close() }
        XCTAssertEqual(reopened.status.size, 4 << 20)
        XCTAssertEqual(try reopened.read(offset: 0, length: bs, epoch: 0), pattern(blocks: 1, seed: 1))
        XCTAssertEqual(try reopened.read(offset: (4 << 20) - 4096, length: bs, epoch: 0), pattern(blocks: 1, seed: 2))
        var st = stat()
        XCTAssertEqual(stat(dataPath, &st), 0)
        XCTAssertEqual(st.st_size, 4 << 20)
        XCTAssertEqual(stat(blockMapPath, &st), 0)
        XCTAssertEqual(st.st_size, 1024 * 16)
    }

    // MARK: generations

    func testBlocksNewerThanReturnsExactlyTheBlocksWrittenAfterAGeneration() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 512 << 20)
        defer { try? store.close() }
        try store.write(offset: 0, data: pattern(blocks: 2, seed: 1), generation: 1, epoch: 0)                  // 0, 1
        try store.write(offset: 100 * 4096, data: pattern(blocks: 1, seed: 2), generation: 2, epoch: 0)         // 100
        try store.flush(epoch: 0)
        try store.write(offset: 1 * 4096, data: pattern(blocks: 1, seed: 3), generation: 3, epoch: 0)           // 1 again
        try store.write(offset: 100_000 * 4096, data: pattern(blocks: 3, seed: 4), generation: 4, epoch: 0)     // far away
        XCTAssertEqual(try store.blocksNewer(than: 0), [0, 1, 100, 100_000, 100_001, 100_002])
        XCTAssertEqual(try store.blocksNewer(than: 1), [1, 100, 100_000, 100_001, 100_002])
        XCTAssertEqual(try store.blocksNewer(than: 2), [1, 100_000, 100_001, 100_002])
        XCTAssertEqual(try store.blocksNewer(than: 3), [100_000, 100_001, 100_002])
        XCTAssertEqual(try store.blocksNewer(than: 4), [])
        XCTAssertEqual(store.status.flushedGeneration, 2)
        XCTAssertEqual(store.status.highestGeneration, 4)
        try store.flush(epoch: 0)
        XCTAssertEqual(store.status.flushedGeneration, 4)
        try store.close()
        XCTAssertEqual(try Superblock.read(directory: dir).flushedGeneration, 4)
    }

    // MARK: validation

    func testMisalignedOrOutOfRangeRequestsAreBadRequests() throws {
        let size: UInt64 = 1 << 20
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: size)
        defer { try? store.close() }
        let block = pattern(blocks: 1, seed: 1)
        assertBadRequest { try store.read(offset: 1, length: bs, epoch: 0) }
        assertBadRequest { try store.read(offset: 0, length: 100, epoch: 0) }
        assertBadRequest { try store.read(offset: 0, length: 0, epoch: 0) }
        assertBadRequest { try store.read(offset: size, length: bs, epoch: 0) }
        assertBadRequest { try store.read(offset: size - 4096, length: 2 * bs, epoch: 0) }
        assertBadRequest { try store.read(offset: UInt64.max - 4095, length: bs, epoch: 0) }
        assertBadRequest { try store.write(offset: 512, data: block, generation: 1, epoch: 0) }
        assertBadRequest { try store.write(offset: 0, data: Array(block[0..<1000]), generation: 1, epoch: 0) }
        assertBadRequest { try store.write(offset: size, data: block, generation: 1, epoch: 0) }
        assertBadRequest { try store.write(offset: 0, data: block, generation: 0, epoch: 0) }
        assertBadRequest { try store.trim(offset: 100, length: bs, epoch: 0) }
        assertBadRequest { try store.trim(offset: 0, length: 2 * Int(size), epoch: 0) }
        assertBadRequest { try store.read(offset: 0, length: ReplicaStore.maxRequestLength + bs, epoch: 0) }
        XCTAssertEqual(try store.blocksNewer(than: 0), [], "nothing was written by the refused requests")
        XCTAssertEqual(ReplicaError.badRequest("x").status.code, .invalidArgument)
    }

    func testConcurrentWritersToDistinctBlocksAllLand() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 4 << 20)
        defer { try? store.close() }
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 64) { i in
            do {
                try store.write(offset: UInt64(i) * 4096, data: Self.pattern(blocks: 1, seed: UInt8(i)),
                                generation: UInt64(i + 1), epoch: 0)
            } catch {
                failures.withLock { $0.append("\(i): \(error)") }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        for i in 0..<64 {
            XCTAssertEqual(try store.read(offset: UInt64(i) * 4096, length: bs, epoch: 0), pattern(blocks: 1, seed: UInt8(i)))
        }
        XCTAssertEqual(store.status.highestGeneration, 64)
    }

    /// Reads and writes run concurrently under the shared lock: many threads hammer the same
    /// few blocks (unaligned source buffers, so the scratch path is used too) while others
    /// read them; every read sees a block whose data matches its checksum (never a torn
    /// data/map pair), and the last write of each block wins.
    func testConcurrentWritesAndReadsOfTheSameBlocksStayConsistent() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 4 << 20)
        let generation = Atomic<UInt64>(0)
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            for round in 0..<200 {
                // Blocks 0...3 (one region) and block 300 (another), written and read by all.
                let offset = UInt64([0, 4096, 8192, 12288, 300 * 4096][round % 5])
                do {
                    if worker % 2 == 0 {
                        let seed = UInt8(truncatingIfNeeded: worker &* 31 &+ round)
                        let bytes = [UInt8](repeating: 0, count: 1) + Self.pattern(blocks: 1, seed: seed)
                        let g = generation.wrappingAdd(1, ordering: .relaxed).newValue
                        try bytes.withUnsafeBytes {
                            try store.write(offset: offset, bytes: UnsafeRawBufferPointer(rebasing: $0[1...]), generation: g, epoch: 0)
                        }
                    } else {
                        _ = try store.read(offset: offset, length: 4096, epoch: 0)
                    }
                } catch {
                    failures.withLock { $0.append("worker \(worker) round \(round): \(error)") }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual(store.status.highestGeneration, generation.load(ordering: .relaxed))
        try store.close()
        // Reopened after a clean close: every block still matches its checksum.
        let reopened = try ReplicaStore.open(directory: dir, volumeID: volume)
        for offset in [0, 4096, 8192, 12288, 300 * 4096] {
            XCTAssertNoThrow(try reopened.read(offset: UInt64(offset), length: 4096, epoch: 0))
        }
        try reopened.close()
    }

    /// A claim waits for I/O already past its epoch check and fences everything after it:
    /// while writers with epoch 1 run, claim(2); every later epoch-1 write is refused.
    func testAClaimDuringConcurrentWritesFencesEveryLaterOne() throws {
        let store = try ReplicaStore.create(directory: dir, volumeID: volume, size: 4 << 20)
        try store.claim(epoch: 1)
        let claimed = Atomic<Bool>(false)
        let lateSuccesses = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            if worker == 0 {
                usleep(2000)
                try? store.claim(epoch: 2)
                claimed.store(true, ordering: .sequentiallyConsistent)
                return
            }
            for round in 0..<300 {
                let after = claimed.load(ordering: .sequentiallyConsistent)
                let data = Self.pattern(blocks: 1, seed: UInt8(truncatingIfNeeded: round))
                if (try? store.write(offset: UInt64(worker) * 65536, data: data, generation: UInt64(round + 1), epoch: 1)) != nil, after {
                    lateSuccesses.wrappingAdd(1, ordering: .relaxed)
                }
            }
        }
        XCTAssertEqual(lateSuccesses.load(ordering: .relaxed), 0, "an epoch-1 write succeeded after claim(2) returned")
        XCTAssertEqual(store.status.epoch, 2)
        try store.close()
    }
}
