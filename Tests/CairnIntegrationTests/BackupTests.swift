@testable import CairnBackup
import CairnCore
import Foundation
import Logging
import XCTest

/// The backup format (packs, indexes, block maps, zstd) and backups, restores and retention
/// against a real S3-compatible server (moto, SigV4 verified).
final class BackupTests: XCTestCase {
    let logger = Logger(label: "backup-test")
    /// The tests' S3 server and scratch directory (`scratch()`), removed after each test.
    var server: S3TestServer!
    var dir = ""

    override func tearDown() async throws {
        server?.stop()
        server = nil
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    /// Starts a fresh S3 server and makes a scratch directory; a client of the server's bucket.
    func scratch() async throws -> S3Client {
        server = try await S3TestServer.start()
        dir = try Self.temporaryDirectory()
        return try await server.client()
    }

    // MARK: Format

    func testZstdRoundTripsAndRejectsADamagedFrame() {
        let block = (0..<4096).map { UInt8(truncatingIfNeeded: $0 / 7) }
        let frame = block.withUnsafeBytes { Zstd.compress($0) }
        XCTAssertLessThan(frame.count, block.count / 4)
        XCTAssertEqual(Zstd.decompress(frame[...], size: 4096), block)
        var damaged = frame
        damaged[damaged.count / 2] ^= 0xFF
        let back = Zstd.decompress(damaged[...], size: 4096)
        XCTAssertTrue(back == nil || back != block)
        XCTAssertNil(Zstd.decompress(frame[...], size: 8192), "a frame of another size is refused")
    }

    func testPackIndexAndBlockMapRoundTrip() throws {
        var pack = PendingPack(number: 0)
        let blocks = (0..<3).map { n in [UInt8](repeating: UInt8(n + 1), count: 4096) }
        for b in blocks { _ = b.withUnsafeBytes { pack.append($0, hash: BlockHash.of(b)) } }
        let sealed = pack.seal()
        let index = try PackIndex.decode(sealed.index, name: "i")
        XCTAssertEqual(index, pack.index)
        XCTAssertEqual(index.hashes[2], BlockHash.of(blocks[2]))
        XCTAssertThrowsError(try PackIndex.decode(Array(sealed.index.dropLast()), name: "i"))

        var map = BlockMap()
        map.append(pack: 0, entry: 0)
        map.append(pack: 0, entry: 1)
        map.append(pack: BlockMap.zero, entry: 0)
        map.append(pack: BlockMap.zero, entry: 0)
        map.append(pack: 1, entry: 7)
        map.append(pack: 0, entry: 2)
        XCTAssertEqual(map.runs, [BlockRun(count: 2, pack: 0, entry: 0), BlockRun(count: 2, pack: BlockMap.zero, entry: 0),
                                  BlockRun(count: 1, pack: 1, entry: 7), BlockRun(count: 1, pack: 0, entry: 2)])
        XCTAssertEqual(BlockMap.decode(map.encoded(), runs: 4, blocks: 6), map)
        XCTAssertNil(BlockMap.decode(map.encoded(), runs: 4, blocks: 7))
    }

    func testRetentionKeepsTheNewestPerVolume() {
        let now = Date()
        func m(_ id: String, _ volume: String, daysAgo: Double) -> BackupManifest {
            BackupManifest(id: id, volumeID: volume, snapshotID: "s", sizeBytes: 0, blockSize: 4096,
                           createdAt: now.addingTimeInterval(-daysAgo * 86400), packs: [], runs: 0, blockMap: "",
                           dataBlocks: 0, newBlocks: 0, uploadedBytes: 0)
        }
        let all = [m("a1", "a", daysAgo: 10), m("a2", "a", daysAgo: 5), m("a3", "a", daysAgo: 1), m("b1", "b", daysAgo: 30)]
        XCTAssertEqual(BackupTarget.expired(all, keep: 2, olderThan: nil, now: now).map(\.id), ["a1"])
        XCTAssertEqual(BackupTarget.expired(all, keep: nil, olderThan: 3 * 86400, now: now).map(\.id), ["a1", "a2"])
        XCTAssertEqual(BackupTarget.expired(all, keep: 1, olderThan: 7 * 86400, now: now).map(\.id), ["a1", "a2"])
    }

    // MARK: Against the server

    func testBackupRestoreAndDetectsADamagedPack() async throws {
        let target = BackupTarget(client: try await scratch(), logger: logger)
        let size: Int64 = 16 << 20
        let source = dir + "/snap.img"
        try Self.databaseLike(source, size: size, fill: 0.7)

        let first = try await target.create(id: "one", volumeID: "v", snapshotID: "s1", path: source, sizeBytes: size)
        XCTAssertGreaterThan(first.newBlocks, 0)
        let again = try await target.create(id: "one", volumeID: "v", snapshotID: "s1", path: source, sizeBytes: size)
        XCTAssertEqual(again, first, "create is idempotent by id")
        let listed = try await target.backups()
        XCTAssertEqual(listed.map(\.id), ["one"])

        let restored = dir + "/restored.img"
        let result = try await target.restore(id: "one", to: restored, progressPath: dir + "/restore.progress", zeroFill: false)
        XCTAssertEqual(result.packsAlreadyDone, 0)
        XCTAssertEqual(try Self.sha256(restored), try Self.sha256(source))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/restore.progress"))

        // One byte of a pack changed in the store: the restore refuses it.
        let packName = first.packs[0]
        var pack = try await target.client.get(BackupLayout.pack(packName))!
        pack[pack.count / 2] ^= 0x01
        try await target.client.put(BackupLayout.pack(packName), pack)
        do {
            _ = try await target.restore(id: "one", to: dir + "/bad.img", progressPath: dir + "/bad.progress", zeroFill: false)
            XCTFail("a damaged pack was restored")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .failedPrecondition)
            XCTAssertTrue(error.message.contains("checksum"), error.message)
        }
    }

    func testAnInterruptedBackupRunAgainUploadsOnlyWhatWasMissing() async throws {
        let client = try await scratch()
        let target = BackupTarget(client: client, logger: logger)
        let size: Int64 = 32 << 20
        let source = dir + "/snap.img"
        try Self.databaseLike(source, size: size, fill: 1)
        let cut = Task {
            try await target.create(id: "b", volumeID: "v", snapshotID: "s", path: source, sizeBytes: size) { p in
                if p.doneBytes >= size / 2 + (1 << 20) { withUnsafeCurrentTask { $0?.cancel() } }
            }
        }
        do {
            _ = try await cut.value
            XCTFail("the backup was not interrupted")
        } catch is CancellationError {}
        let none = try await target.manifest("b")
        XCTAssertNil(none, "an interrupted backup has no manifest, so it is not listed")
        let indexed = try await client.list("index/").count
        XCTAssertEqual(indexed, 2, "the two packs sealed before the interruption went up")

        let done = try await target.create(id: "b", volumeID: "v", snapshotID: "s", path: source, sizeBytes: size)
        XCTAssertEqual(done.dataBlocks, Int(size / 4096))
        XCTAssertEqual(done.newBlocks, done.dataBlocks - 2 * BackupLayout.packRawBytes / 4096, "the second run uploaded only the rest")
        _ = try await target.restore(id: "b", to: dir + "/r.img", progressPath: dir + "/r.progress", zeroFill: false)
        XCTAssertEqual(try Self.sha256(dir + "/r.img"), try Self.sha256(source))
    }

    func testTheUploadLimitHoldsBackupsToItsRate() async throws {
        let client = try await scratch()
        let rate: Int64 = 2_000_000
        let target = BackupTarget(client: client, uploadLimit: rate, logger: logger)
        let size: Int64 = 16 << 20
        try Self.databaseLike(dir + "/snap.img", size: size, fill: 1)
        let clock = ContinuousClock.now
        let backup = try await target.create(id: "slow", volumeID: "v", snapshotID: "s", path: dir + "/snap.img", sizeBytes: size)
        let seconds = (ContinuousClock.now - clock).seconds
        // A second's worth may go at once (the bucket's depth); the rest at the rate.
        let least = Double(backup.uploadedBytes - rate) / Double(rate)
        XCTAssertGreaterThan(least, 1.5, "the test needs more bytes than the burst")
        XCTAssertGreaterThanOrEqual(seconds, least * 0.9, "\(backup.uploadedBytes) bytes went up in \(seconds) s at a limit of \(rate) B/s")
    }

    func testDeletionNeverRemovesAPackAnotherBackupUses() async throws {
        let target = BackupTarget(client: try await scratch(), logger: logger)
        let size: Int64 = 8 << 20
        let source = dir + "/snap.img"
        try Self.databaseLike(source, size: size, fill: 1)
        _ = try await target.create(id: "b1", volumeID: "v", snapshotID: "s1", path: source, sizeBytes: size)
        try Self.changeBlocks(source, size: size, count: 64)
        let second = try await target.create(id: "b2", volumeID: "v", snapshotID: "s2", path: source, sizeBytes: size)
        XCTAssertEqual(second.parent, "b1")
        XCTAssertEqual(second.packs.count, 2, "the second backup names the first's pack and its own")
        let expected = try Self.sha256(source)

        // The first backup's deletion leaves the pack the second uses.
        let deleted = try await target.delete(id: "b1", gracePeriod: 0)
        XCTAssertEqual(deleted, 0)
        let remaining = try await target.backups()
        XCTAssertEqual(remaining.map(\.id), ["b2"])
        _ = try await target.restore(id: "b2", to: dir + "/r.img", progressPath: dir + "/r.progress", zeroFill: false)
        XCTAssertEqual(try Self.sha256(dir + "/r.img"), expected)

        // A prune that keeps none of volume v's removes everything.
        let pruned = try await target.prune(keep: 0, olderThan: nil, gracePeriod: 0)
        XCTAssertEqual(pruned.removed, ["b2"])
        XCTAssertEqual(pruned.packsDeleted, 2)
        let left = try await target.client.list("")
        XCTAssertEqual(left.map(\.key), [])
    }

    /// Issue 18's numbers on one machine: a 1 GiB database-like volume, a full backup, 1% of its
    /// blocks changed, a second backup that stores at most 1.5× the changed bytes (the server's
    /// own object sizes), a restore byte-identical to the snapshot, and a restore interrupted
    /// half-way that, run again, fetches only the packs it had not finished.
    func testIncrementalBackupOfOneGiBUploadsOnlyTheChangeAndARestoreResumes() async throws {
        let client = try await scratch()
        let target = BackupTarget(client: client, logger: logger)
        let size: Int64 = 1 << 30
        let volume = dir + "/volume.img"
        try Self.databaseLike(volume, size: size, fill: 1)
        let snap1 = dir + "/snap1.img"
        try FileManager.default.copyItem(atPath: volume, toPath: snap1)

        var clock = ContinuousClock.now
        let first = try await target.create(id: "full", volumeID: "v", snapshotID: "snap1", path: snap1, sizeBytes: size)
        let firstSeconds = (ContinuousClock.now - clock).seconds
        let afterFirst = try await server.storedBytes(client)
        print("backup: first backup of 1 GiB stored \(afterFirst) bytes in \(firstSeconds) s")

        let changed = try Self.changeBlocks(volume, size: size, count: Int(size / 100) / 4096)
        let snap2 = dir + "/snap2.img"
        try FileManager.default.copyItem(atPath: volume, toPath: snap2)
        try? FileManager.default.removeItem(atPath: snap1)
        let second = try await target.create(id: "incr", volumeID: "v", snapshotID: "snap2", path: snap2, sizeBytes: size)
        let afterSecond = try await server.storedBytes(client)
        let added = afterSecond - afterFirst
        print("backup: 1% changed (\(changed) bytes), the second backup stored \(added) bytes (\(String(format: "%.2f", Double(added) / Double(changed)))×)")
        XCTAssertEqual(second.parent, first.id)
        XCTAssertEqual(second.newBlocks, Int(changed / 4096))
        XCTAssertLessThanOrEqual(added, changed * 3 / 2)

        // Interrupted after about half of its packs, then run again.
        let restored = dir + "/restored.img"
        let progressPath = dir + "/restore.progress"
        let total = size
        let interrupted = Task {
            try await target.restore(id: "incr", to: restored, progressPath: progressPath, zeroFill: false) { p in
                if p.doneBytes >= total / 2 { withUnsafeCurrentTask { $0?.cancel() } }
            }
        }
        do {
            _ = try await interrupted.value
            XCTFail("the restore was not interrupted")
        } catch is CancellationError {}
        let recorded = try String(contentsOfFile: progressPath, encoding: .utf8).split(separator: "\n").count - 1
        XCTAssertGreaterThan(recorded, 0)
        let getsBefore = client.counters.gets
        clock = ContinuousClock.now
        let resumed = try await target.restore(id: "incr", to: restored, progressPath: progressPath, zeroFill: false)
        let restoreSeconds = (ContinuousClock.now - clock).seconds
        XCTAssertEqual(resumed.packsAlreadyDone, recorded)
        XCTAssertEqual(resumed.packsFetched, second.packs.count - recorded)
        // The manifest, and a pack and its index for each pack not done before.
        XCTAssertEqual(client.counters.gets - getsBefore, 1 + 2 * resumed.packsFetched)
        XCTAssertEqual(try Self.sha256(restored), try Self.sha256(snap2))
        print("backup: restore resumed after \(recorded) of \(second.packs.count) packs, fetched \(resumed.packsFetched) (\(resumed.bytesDownloaded) bytes) in \(restoreSeconds) s")
    }

    /// A source that reports generations (as a cluster snapshot's replica does): the second
    /// backup reads exactly the blocks written or trimmed above the first one's generation, takes
    /// every other block from the first one's map, and restores byte-identical; a source of
    /// another volume incarnation (same id, made again) is read whole.
    func testGenerationsLimitWhatAnIncrementalBackupReads() async throws {
        let target = BackupTarget(client: try await scratch(), logger: logger)
        let size: Int64 = 64 << 20
        let image = dir + "/volume.img"
        try Self.databaseLike(image, size: size, fill: 0.6)
        let blocks = Int(size / 4096)
        let volume = GenerationSource(bytes: try Self.readAll(image), generations: (0..<blocks).map { $0 < blocks * 6 / 10 ? UInt64(1 + $0 % 50) : 0 },
                                      lineage: "v@1", generation: 50)

        let first = try await target.create(id: "g1", volumeID: "v", snapshotID: "s1", source: volume, sizeBytes: size)
        XCTAssertEqual(first.sourceGeneration, 50)
        XCTAssertEqual(first.scannedBytes, size, "a first backup reads everything")

        // Past generation 50: 1% of the blocks rewritten, 64 trimmed (zeros), one grown past the data.
        var rng = SystemRandomNumberGenerator()
        var changed = Set<Int>()
        while changed.count < blocks / 100 { changed.insert(Int.random(in: 0..<blocks, using: &rng)) }
        for b in changed { volume.write(block: b, generation: 51 + UInt64(b % 7), zero: b % 5 == 0) }
        let second = try await target.create(id: "g2", volumeID: "v", snapshotID: "s2", source: volume.advanced(to: 60), sizeBytes: size)
        XCTAssertEqual(second.parent, "g1")
        XCTAssertEqual(second.scannedBytes, Int64(changed.count) * 4096, "the incremental backup read blocks that did not change")
        XCTAssertEqual(volume.readBlocks, blocks + changed.count)
        XCTAssertLessThanOrEqual(second.newBlocks, changed.count)
        let restored = dir + "/restored.img"
        _ = try await target.restore(id: "g2", to: restored, progressPath: dir + "/r.progress", zeroFill: false)
        XCTAssertEqual(try Self.readAll(restored), volume.bytes, "the restore of the incremental backup differs from the volume")

        // The same id, another incarnation: its generations mean nothing next to g2's.
        let remade = GenerationSource(bytes: volume.bytes, generations: volume.blockGenerations, lineage: "v@2", generation: 60)
        let third = try await target.create(id: "g3", volumeID: "v", snapshotID: "s3", source: remade, sizeBytes: size)
        XCTAssertEqual(third.scannedBytes, size, "a backup of a new incarnation trusted the old one's generations")
        XCTAssertEqual(third.newBlocks, 0)
    }

    // MARK: Helpers

    static func readAll(_ path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else { throw CairnError.notFound(path) }
        return Array(data)
    }

    static func temporaryDirectory() throws -> String {
        let dir = NSTemporaryDirectory() + "cairn-backup-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// A database's file: 4 KiB pages, the first `fill` of them used, each half rows (random
    /// bytes) and half free space (zeros); the rest never written.
    static func databaseLike(_ path: String, size: Int64, fill: Double) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw SystemError("ftruncate", errno: errno) }
        let used = Int64(Double(size) * fill) / 4096 * 4096
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var at: Int64 = 0
        while at < used {
            let n = Int(min(Int64(chunk.count), used - at))
            chunk.withUnsafeMutableBytes { raw in
                for page in stride(from: 0, to: n, by: 4096) {
                    random(raw.baseAddress! + page, 2048)
                    memset(raw.baseAddress! + page + 2048, 0, 2048)
                }
            }
            _ = chunk.withUnsafeBytes { pwrite(fd, $0.baseAddress, n, off_t(at)) }
            at += Int64(n)
        }
    }

    /// Rewrites `count` distinct random pages (4 KiB, the same half-rows shape); returns the bytes.
    @discardableResult
    static func changeBlocks(_ path: String, size: Int64, count: Int) throws -> Int64 {
        let fd = open(path, O_RDWR)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        var pages = Set<Int64>()
        var rng = SystemRandomNumberGenerator()
        while pages.count < count { pages.insert(Int64.random(in: 0..<(size / 4096), using: &rng)) }
        var page = [UInt8](repeating: 0, count: 4096)
        for p in pages {
            page.withUnsafeMutableBytes { random($0.baseAddress!, 2048) }
            _ = page.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, off_t(p * 4096)) }
        }
        return Int64(count) * 4096
    }

    private static let urandom = open("/dev/urandom", O_RDONLY | O_CLOEXEC)

    static func random(_ into: UnsafeMutableRawPointer, _ count: Int) {
        precondition(read(urandom, into, count) == count, "/dev/urandom gave fewer bytes")
    }

    static func sha256(_ path: String) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/sha256sum")
        p.arguments = [path]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(String(decoding: data, as: UTF8.self).prefix(64))
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// An in-memory volume with per-block generations, as a replica reports a snapshot's: a fake
/// standing in for `ReplicaSnapshotSource` (the bed test runs the real one).
final class GenerationSource: BackupBlockSource, @unchecked Sendable {
    private let lock = NSLock()
    private(set) var bytes: [UInt8]
    private(set) var blockGenerations: [UInt64]
    let lineage: String
    let generation: UInt64
    private var reads = 0
    var readBlocks: Int { lock.withLock { reads } }

    init(bytes: [UInt8], generations: [UInt64], lineage: String, generation: UInt64) {
        self.bytes = bytes
        self.blockGenerations = generations
        self.lineage = lineage
        self.generation = generation
    }

    /// The same volume, its snapshot now at `generation` (shares the read counter's owner).
    func advanced(to generation: UInt64) -> GenerationSource {
        let next = GenerationSource(bytes: bytes, generations: blockGenerations, lineage: lineage, generation: generation)
        next.parentCounter = self
        return next
    }

    private weak var parentCounter: GenerationSource?

    func write(block: Int, generation: UInt64, zero: Bool) {
        var rng = SystemRandomNumberGenerator()
        for i in 0..<4096 { bytes[block * 4096 + i] = zero ? 0 : UInt8.random(in: 0...255, using: &rng) }
        blockGenerations[block] = generation
    }

    var generations: SourceGenerations? { SourceGenerations(lineage: lineage, generation: generation) }
    var changedWindow: Int { 1000 }

    func read(offset: Int64, count: Int) async throws -> [UInt8] {
        let counter = parentCounter ?? self
        counter.lock.withLock { counter.reads += count / 4096 }
        return Array(bytes[Int(offset)..<Int(offset) + count])
    }

    func changed(since: UInt64, firstBlock: Int64, count: Int) async throws -> [Bool] {
        blockGenerations[Int(firstBlock)..<Int(firstBlock) + count].map { $0 > since }
    }
}
