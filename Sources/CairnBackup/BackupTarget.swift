import CairnCore
import Foundation
import Logging

/// How far a backup or a restore is: bytes of the volume gone through of `totalBytes`, and the
/// bytes that went to (or came from) the object store.
public struct TransferProgress: Sendable, Codable, Equatable {
    public var doneBytes: Int64
    public var totalBytes: Int64
    public var transferredBytes: Int64
}

/// What a restore did: packs fetched now and those an earlier, interrupted run had finished.
public struct RestoreResult: Sendable, Codable, Equatable {
    public var backupID: String
    public var packsFetched: Int
    public var packsAlreadyDone: Int
    public var bytesDownloaded: Int64
    public var blocksWritten: Int
}

/// A backup target: backups of volumes' snapshots in one bucket and prefix (docs/backups.md).
/// Backups read the snapshot from a block file (a snapshot's sparse file on one machine); every
/// block of it is hashed, and only blocks whose content address the target does not hold yet
/// are compressed and uploaded. Restores write a block file.
public struct BackupTarget: Sendable {
    public let client: S3Client
    /// Bytes per second to the store over all uploads; nil: unthrottled.
    public var uploadLimit: Int64?
    /// Packs transferred at once.
    public var parallelism: Int
    let logger: Logger

    public init(client: S3Client, uploadLimit: Int64? = nil, parallelism: Int = 4, logger: Logger) {
        self.client = client
        self.uploadLimit = uploadLimit
        self.parallelism = max(1, parallelism)
        self.logger = logger
    }

    // MARK: Reading the target

    public func manifest(_ id: String) async throws -> BackupManifest? {
        try Validate.volumeID(id)
        guard let bytes = try await client.get(BackupLayout.manifest(id)) else { return nil }
        do {
            return try Self.decoder.decode(BackupManifest.self, from: Data(bytes))
        } catch {
            throw CairnError.failedPrecondition("backup \(id)'s manifest is not readable (\(error)); delete the backup and take it again")
        }
    }

    /// Every complete backup (those with a manifest), oldest first.
    public func backups() async throws -> [BackupManifest] {
        var out: [BackupManifest] = []
        for object in try await client.list("backups/") where object.key.hasSuffix(".json") {
            let id = String(object.key.dropFirst("backups/".count).dropLast(".json".count))
            if let m = try await manifest(id) { out.append(m) }
        }
        return out.sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
    }

    /// Every block the target holds: content address → (pack, entry), from every pack's index.
    func blockIndex() async throws -> (packs: [String], blocks: [BlockHash: (pack: Int, entry: UInt32)]) {
        var packs: [String] = []
        var blocks: [BlockHash: (pack: Int, entry: UInt32)] = [:]
        for object in try await client.list("index/") {
            let hash = String(object.key.dropFirst("index/".count))
            guard let bytes = try await client.get(object.key) else { continue }
            let index = try PackIndex.decode(bytes, name: object.key)
            let number = packs.count
            packs.append(hash)
            for (i, h) in index.hashes.enumerated() where blocks[h] == nil {
                blocks[h] = (number, UInt32(i))
            }
        }
        return (packs, blocks)
    }

    // MARK: Backup

    /// Backs up the block file at `path` (the snapshot's data, `sizeBytes` long) as backup `id`.
    public func create(id: String, volumeID: String, snapshotID: String, path: String, sizeBytes: Int64, fsType: String? = nil,
                       encryption: VolumeEncryption? = nil, progress: @Sendable (TransferProgress) -> Void = { _ in }) async throws -> BackupManifest {
        try await create(id: id, volumeID: volumeID, snapshotID: snapshotID, source: try FileBlockSource(path: path), sizeBytes: sizeBytes,
                         fsType: fsType, encryption: encryption, progress: progress)
    }

    /// Backs up `source` (a snapshot, `sizeBytes` long) as backup `id`. Idempotent by id: a
    /// complete backup is returned as it is; a run interrupted earlier uploads only the blocks
    /// whose packs did not make it. When the source reports generations and the volume's latest
    /// backup was made from the same incarnation, only the blocks written since that backup's
    /// generation are read; the others are taken from its block map. `encryption`: the volume's
    /// wrapped key, kept in the manifest for a restore (the blocks are ciphertext already).
    public func create(id: String, volumeID: String, snapshotID: String, source: some BackupBlockSource, sizeBytes: Int64,
                       fsType: String? = nil, encryption: VolumeEncryption? = nil,
                       progress: @Sendable (TransferProgress) -> Void = { _ in }) async throws -> BackupManifest {
        try Validate.volumeID(id)
        let blockSize = BackupLayout.blockSize
        guard sizeBytes % Int64(blockSize) == 0 else {
            throw CairnError.invalidArgument("a backup's size must be a multiple of \(blockSize) bytes; \(sizeBytes) is not")
        }
        if let done = try await manifest(id) {
            guard done.snapshotID == snapshotID else {
                throw CairnError.alreadyExists("backup \(id) exists already, of snapshot \(done.snapshotID); choose another id")
            }
            return done
        }
        let parent = try await backups().last { $0.volumeID == volumeID }
        var (packs, known) = try await blockIndex()
        var numberOf = Dictionary(packs.enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        // The parent's map stands for every block whose generation is not above the parent's.
        var base: (cursor: BlockCursor, since: UInt64, numbers: [Int])?
        if let generations = source.generations, let parent, parent.lineage == generations.lineage,
           let since = parent.sourceGeneration, since <= generations.generation, parent.blockSize == blockSize {
            let numbers = parent.packs.map { name in
                if let n = numberOf[name] { return n }
                packs.append(name)
                numberOf[name] = packs.count - 1
                return packs.count - 1
            }
            base = (BlockCursor(try parent.map()), since, numbers)
        }
        logger.info("backup starting", metadata: [
            "backup.id": "\(id)", "volume.id": "\(volumeID)", "target.blocks": "\(known.count)",
            "backup.parent": "\(parent?.id ?? "-")", "backup.since_generation": "\(base.map { "\($0.since)" } ?? "- (every block is read)")",
        ])

        let throttle = uploadLimit.map { Throttle(bytesPerSecond: $0) }
        let uploader = PackUploader(client: client, throttle: throttle, limit: parallelism)
        var map = BlockMap()
        var slots: [Int: UInt32] = [:]  // pack number → index in the manifest's pack list
        var manifestPacks: [Int] = []
        var pending = PendingPack(number: packs.count)
        packs.append("")
        var newBlocks = 0, dataBlocks = 0
        var uploaded: Int64 = 0, scanned: Int64 = 0

        func slot(_ number: Int) -> UInt32 {
            if let s = slots[number] { return s }
            let s = UInt32(manifestPacks.count)
            slots[number] = s
            manifestPacks.append(number)
            return s
        }

        let readBlocks = 256  // one read: 1 MiB
        let totalBlocks = Int64(sizeBytes) / Int64(blockSize)
        let window = base == nil ? readBlocks : max(1, source.changedWindow)
        var first: Int64 = 0
        do {
        while first < totalBlocks {
            let n = Int(min(Int64(window), totalBlocks - first))
            let changed = base == nil ? nil : try await source.changed(since: base!.since, firstBlock: first, count: n)
            var i = 0
            while i < n {
                if let changed, !changed[i] {
                    let (pack, entry) = base!.cursor.next()
                    if pack == BlockMap.zero {
                        map.append(pack: BlockMap.zero, entry: 0)
                    } else {
                        guard Int(pack) < base!.numbers.count else {
                            throw CairnError.failedPrecondition("backup \(parent?.id ?? "")'s block map names a pack it does not list; delete that backup and back up again")
                        }
                        dataBlocks += 1
                        map.append(pack: slot(base!.numbers[Int(pack)]), entry: entry)
                    }
                    i += 1
                    continue
                }
                var end = i + 1
                while end < n, end - i < readBlocks, changed?[end] ?? true { end += 1 }
                let bytes = (end - i) * blockSize
                let buffer = try await source.read(offset: (first + Int64(i)) * Int64(blockSize), count: bytes)
                guard buffer.count == bytes else {
                    throw CairnError.internal("the snapshot's source returned \(buffer.count) bytes for a read of \(bytes)")
                }
                scanned += Int64(bytes)
                buffer.withUnsafeBytes { raw in
                    for k in 0..<(end - i) {
                        _ = base?.cursor.next()
                        let block = UnsafeRawBufferPointer(rebasing: raw[(k * blockSize)..<((k + 1) * blockSize)])
                        if Self.isZero(block) {
                            map.append(pack: BlockMap.zero, entry: 0)
                            continue
                        }
                        dataBlocks += 1
                        let hash = BlockHash.of(block)
                        if let place = known[hash] {
                            map.append(pack: slot(place.pack), entry: place.entry)
                            continue
                        }
                        let entry = pending.append(block, hash: hash)
                        known[hash] = (pending.number, entry)
                        newBlocks += 1
                        map.append(pack: slot(pending.number), entry: entry)
                    }
                }
                i = end
                if pending.rawBytes >= BackupLayout.packRawBytes {
                    let sealed = pending.seal()
                    packs[pending.number] = sealed.hash
                    uploaded += Int64(sealed.bytes.count)
                    try await uploader.upload(sealed)
                    pending = PendingPack(number: packs.count)
                    packs.append("")
                }
            }
            first += Int64(n)
            progress(TransferProgress(doneBytes: first * Int64(blockSize), totalBytes: sizeBytes, transferredBytes: uploaded))
            // Cancelled (Ctrl-C, a caller giving up): the packs sealed so far still go up, so
            // a run with the same id resumes after them.
            try Task.checkCancellation()
        }
        if pending.count > 0 {
            let sealed = pending.seal()
            packs[pending.number] = sealed.hash
            uploaded += Int64(sealed.bytes.count)
            try await uploader.upload(sealed)
        }
        } catch {
            try? await uploader.finish()
            throw error
        }
        try await uploader.finish()

        let packNames = manifestPacks.map { packs[$0] }
        let manifest = BackupManifest(
            id: id, volumeID: volumeID, snapshotID: snapshotID, sizeBytes: sizeBytes, blockSize: blockSize,
            createdAt: Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down)), parent: parent?.id,
            sourceGeneration: source.generations?.generation, lineage: source.generations?.lineage, fsType: fsType, encryption: encryption,
            packs: packNames, runs: map.runs.count, blockMap: Data(map.encoded()).base64EncodedString(),
            dataBlocks: dataBlocks, newBlocks: newBlocks, uploadedBytes: uploaded, scannedBytes: scanned)
        // Every pack it names must still be there: a prune running meanwhile may have removed
        // one this backup found in the index.
        for name in Set(packNames) where !(try await client.exists(BackupLayout.pack(name))) {
            throw CairnError.aborted("pack \(name) disappeared while backup \(id) was made (a prune ran meanwhile?); run the backup again")
        }
        try await client.put(BackupLayout.manifest(id), Array(try Self.encoder.encode(manifest)))
        logger.info("backup complete", metadata: [
            "backup.id": "\(id)", "backup.new_blocks": "\(newBlocks)", "backup.uploaded_bytes": "\(uploaded)",
            "backup.scanned_bytes": "\(scanned)",
        ])
        progress(TransferProgress(doneBytes: sizeBytes, totalBytes: sizeBytes, transferredBytes: uploaded))
        return manifest
    }

    // MARK: Restore

    /// Writes backup `id` into the block file at `path` (made, sparse, `sizeBytes` long when
    /// missing; an existing file or device is written in place). `progressPath` records each
    /// pack once its blocks are on disk (fdatasync'd), so a restore killed half-way and run
    /// again fetches only the packs it had not finished. `zeroFill`: write the backup's zero
    /// blocks too (a device or a file that is not known to be all zeros).
    public func restore(id: String, to path: String, progressPath: String, zeroFill: Bool,
                        progress: @Sendable (TransferProgress) -> Void = { _ in }) async throws -> RestoreResult {
        guard let manifest = try await manifest(id) else {
            throw CairnError.notFound("backup \(id) does not exist in bucket \(client.location.bucket); `cairn backup list` shows the backups")
        }
        return try await restore(manifest, into: try FileRestoreSink(path: path, sizeBytes: manifest.sizeBytes),
                                 journal: FileRestoreJournal(path: progressPath), zeroFill: zeroFill, progress: progress)
    }

    /// Writes the backup `manifest` describes into `sink`, `parallelism` packs at once. Each
    /// pack is recorded in `journal` once the sink has synced its blocks, so a restore cut off
    /// and run again fetches only the packs it had not finished. `zeroFill`: write the backup's
    /// zero blocks too (a sink not known to read zeros where nothing was written).
    public func restore(_ manifest: BackupManifest, into sink: some RestoreSink, journal: some RestoreJournal, zeroFill: Bool,
                        progress: @Sendable (TransferProgress) -> Void = { _ in }) async throws -> RestoreResult {
        let id = manifest.id
        let map = try manifest.map()
        var byPack: [[(block: Int, entry: UInt32)]] = Array(repeating: [], count: manifest.packs.count)
        var zeroRuns: [(block: Int, count: Int)] = []
        var block = 0
        for run in map.runs {
            if run.pack == BlockMap.zero {
                zeroRuns.append((block, Int(run.count)))
            } else {
                guard Int(run.pack) < byPack.count else { throw CairnError.failedPrecondition("backup \(id)'s block map names a pack it does not list; delete the backup") }
                for k in 0..<Int(run.count) { byPack[Int(run.pack)].append((block + k, run.entry + UInt32(k))) }
            }
            block += Int(run.count)
        }

        let done = try await journal.begin(backupID: id)
        let blockSize = manifest.blockSize
        if zeroFill && done.isEmpty {
            let zeros = [UInt8](repeating: 0, count: 1 << 20)
            for run in zeroRuns {
                var at = Int64(run.block) * Int64(blockSize)
                let end = at + Int64(run.count) * Int64(blockSize)
                while at < end {
                    let n = Int(min(Int64(zeros.count), end - at))
                    try await sink.write(n == zeros.count ? zeros : Array(zeros[0..<n]), offset: at)
                    at += Int64(n)
                }
            }
        }

        let total = manifest.sizeBytes
        let work = manifest.packs.indices.filter { !done.contains($0) && !byPack[$0].isEmpty }
        let alreadyDone = manifest.packs.indices.count - work.count
        var fetched = 0, written = 0
        var downloaded: Int64 = 0
        var doneBlocks = Int64(manifest.sizeBytes) / Int64(blockSize) - Int64(work.reduce(0) { $0 + byPack[$1].count })
        let client = self.client
        try await withThrowingTaskGroup(of: (Int, Int64, Int).self) { group in
            var next = 0
            func launch() {
                let number = work[next]
                next += 1
                let name = manifest.packs[number], blocks = byPack[number]
                group.addTask {
                    let (bytes, count) = try await Self.restorePack(name, blocks: blocks, client: client, sink: sink, blockSize: blockSize)
                    return (number, bytes, count)
                }
            }
            while next < work.count && next < parallelism { launch() }
            while let (number, bytes, count) = try await group.next() {
                // Durable before it is recorded as done.
                try await sink.sync()
                try await journal.finished(pack: number)
                fetched += 1
                written += count
                downloaded += bytes
                doneBlocks += Int64(count)
                progress(TransferProgress(doneBytes: doneBlocks * Int64(blockSize), totalBytes: total, transferredBytes: downloaded))
                try Task.checkCancellation()
                if next < work.count { launch() }
            }
        }
        try await sink.sync()
        try await journal.complete()
        return RestoreResult(backupID: id, packsFetched: fetched, packsAlreadyDone: alreadyDone, bytesDownloaded: downloaded, blocksWritten: written)
    }

    /// Fetches one pack and its index, checks both, and writes its blocks where they go (runs
    /// of consecutive blocks, up to 1 MiB, in one write).
    static func restorePack(_ name: String, blocks: [(block: Int, entry: UInt32)], client: S3Client, sink: some RestoreSink,
                            blockSize: Int) async throws -> (Int64, Int) {
        guard let indexBytes = try await client.get(BackupLayout.index(name)), let pack = try await client.get(BackupLayout.pack(name)) else {
            throw CairnError.failedPrecondition("pack \(name) or its index is missing from the target: the backup is damaged; restore another backup")
        }
        guard pack.sha256Hex == name else {
            throw CairnError.failedPrecondition("pack \(name) does not match its checksum (damaged in the store); restore another backup")
        }
        let index = try PackIndex.decode(indexBytes, name: BackupLayout.index(name))
        let sorted = blocks.sorted { $0.block < $1.block }
        let maxRun = (1 << 20) / blockSize
        var run: [UInt8] = []
        var runStart = -1, runCount = 0
        for (block, entry) in sorted {
            let e = Int(entry)
            guard e < index.count, Int(index.offsets[e]) + Int(index.lengths[e]) <= pack.count,
                  let data = Zstd.decompress(pack[Int(index.offsets[e])..<Int(index.offsets[e]) + Int(index.lengths[e])], size: blockSize),
                  BlockHash.of(data) == index.hashes[e]
            else {
                throw CairnError.failedPrecondition("block \(e) of pack \(name) fails its checksum; the backup is damaged; restore another backup")
            }
            if runCount > 0 && (block != runStart + runCount || runCount == maxRun) {
                try await sink.write(run, offset: Int64(runStart) * Int64(blockSize))
                run.removeAll(keepingCapacity: true)
                runCount = 0
            }
            if runCount == 0 { runStart = block }
            run += data
            runCount += 1
        }
        if runCount > 0 { try await sink.write(run, offset: Int64(runStart) * Int64(blockSize)) }
        return (Int64(pack.count + indexBytes.count), blocks.count)
    }

    // MARK: Delete and retention

    /// Removes backup `id`'s manifest, then every pack no remaining backup names.
    public func delete(id: String, gracePeriod: TimeInterval) async throws -> Int {
        try Validate.volumeID(id)
        try await client.delete(BackupLayout.manifest(id))
        return try await collectGarbage(gracePeriod: gracePeriod)
    }

    /// Backups to remove under a retention rule, per volume: beyond the newest `keep`, or older
    /// than `olderThan` (never the newest one of a volume).
    public static func expired(_ backups: [BackupManifest], keep: Int?, olderThan: TimeInterval?, now: Date = Date()) -> [BackupManifest] {
        var out: [BackupManifest] = []
        for (_, group) in Dictionary(grouping: backups, by: \.volumeID) {
            let newest = group.sorted { ($0.createdAt, $0.id) > ($1.createdAt, $1.id) }
            for (i, backup) in newest.enumerated() where i > 0 || keep == 0 {
                let beyond = keep.map { i >= $0 } ?? false
                let old = olderThan.map { now.timeIntervalSince(backup.createdAt) > $0 } ?? false
                if beyond || old { out.append(backup) }
            }
        }
        return out.sorted { $0.createdAt < $1.createdAt }
    }

    /// Deletes what `expired` names, then the packs no remaining backup names.
    public func prune(keep: Int?, olderThan: TimeInterval?, gracePeriod: TimeInterval) async throws -> (removed: [String], packsDeleted: Int) {
        let gone = Self.expired(try await backups(), keep: keep, olderThan: olderThan)
        for backup in gone { try await client.delete(BackupLayout.manifest(backup.id)) }
        return (gone.map(\.id), try await collectGarbage(gracePeriod: gracePeriod))
    }

    /// Deletes packs (and their indexes) that no manifest names and that are older than
    /// `gracePeriod` (a backup being made has uploaded packs it has not named yet). A pack a
    /// remaining backup names is never deleted, so no deletion breaks another backup.
    public func collectGarbage(gracePeriod: TimeInterval) async throws -> Int {
        var referenced = Set<String>()
        for backup in try await backups() { referenced.formUnion(backup.packs) }
        let cutoff = Date().addingTimeInterval(-gracePeriod)
        var deleted = 0
        for object in try await client.list("packs/") {
            let hash = String(object.key.dropFirst("packs/".count))
            guard !referenced.contains(hash), (object.lastModified ?? .distantPast) <= cutoff else { continue }
            // The index first: a pack without an index is never used for a new backup.
            try await client.delete(BackupLayout.index(hash))
            try await client.delete(object.key)
            deleted += 1
        }
        // Indexes left without their pack by an interrupted deletion or upload.
        let packNames = Set(try await client.list("packs/").map { String($0.key.dropFirst("packs/".count)) })
        for object in try await client.list("index/") where !packNames.contains(String(object.key.dropFirst("index/".count))) {
            guard (object.lastModified ?? .distantPast) <= cutoff else { continue }
            try await client.delete(object.key)
        }
        return deleted
    }

    // MARK: Helpers

    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.dateEncodingStrategy = .iso8601
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    static let decoder: JSONDecoder = {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return d
    }()

    private static let zeroBlock = [UInt8](repeating: 0, count: BackupLayout.blockSize)

    static func isZero(_ block: UnsafeRawBufferPointer) -> Bool {
        zeroBlock.withUnsafeBytes { memcmp($0.baseAddress!, block.baseAddress!, block.count) == 0 }
    }

    static func readFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, count: Int, offset: Int64, path: String) throws {
        var done = 0
        while done < count {
            let n = pread(fd, buffer.baseAddress! + done, count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                if n == 0 {  // past the end of a short file: zeros
                    (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: count - done)
                    return
                }
                throw CairnError.unavailable("cannot read \(path) at \(offset + Int64(done)): \(String(cString: strerror(errno)))")
            }
            done += n
        }
    }

    static func writeFully(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, offset: Int64, path: String) throws {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw CairnError.unavailable("cannot write \(path) at \(offset + Int64(done)): \(String(cString: strerror(errno)))")
            }
            done += n
        }
    }
}

/// The pack being filled: compressed frames end to end and its index.
struct PendingPack {
    let number: Int
    var bytes: [UInt8] = []
    var index = PackIndex()
    var rawBytes = 0
    var count: Int { index.count }

    init(number: Int) { self.number = number }

    mutating func append(_ block: UnsafeRawBufferPointer, hash: BlockHash) -> UInt32 {
        let frame = Zstd.compress(block)
        index.hashes.append(hash)
        index.offsets.append(UInt32(bytes.count))
        index.lengths.append(UInt32(frame.count))
        bytes += frame
        rawBytes += block.count
        return UInt32(index.count - 1)
    }

    func seal() -> SealedPack {
        SealedPack(hash: bytes.sha256Hex, bytes: bytes, index: index.encoded())
    }
}

struct SealedPack: Sendable {
    var hash: String
    var bytes: [UInt8]
    var index: [UInt8]
}

/// Uploads sealed packs, at most `limit` at once: the pack, then its index (so an index names
/// only a pack that is there).
final class PackUploader {
    let client: S3Client
    let throttle: Throttle?
    let limit: Int
    private var inFlight: [Task<Void, any Error>] = []

    init(client: S3Client, throttle: Throttle?, limit: Int) {
        self.client = client
        self.throttle = throttle
        self.limit = limit
    }

    func upload(_ pack: SealedPack) async throws {
        if inFlight.count >= limit { try await inFlight.removeFirst().value }
        let client = self.client, throttle = self.throttle
        inFlight.append(Task {
            await throttle?.take(Int64(pack.bytes.count + pack.index.count))
            if !(try await client.exists(BackupLayout.pack(pack.hash))) {
                try await client.put(BackupLayout.pack(pack.hash), pack.bytes)
            }
            try await client.put(BackupLayout.index(pack.hash), pack.index)
        })
    }

    func finish() async throws {
        var first: (any Error)?
        for task in inFlight {
            do { try await task.value } catch { first = first ?? error }
        }
        inFlight = []
        if let first { throw first }
    }
}

/// A token bucket over bytes per second (`--limit-rate`): a caller takes what it is about to send
/// and waits until the bucket had it.
actor Throttle {
    let rate: Double
    private var available: Double
    private var last = ContinuousClock.now

    init(bytesPerSecond: Int64) {
        rate = Double(max(1, bytesPerSecond))
        available = rate
    }

    func take(_ bytes: Int64) async {
        let now = ContinuousClock.now
        let elapsed = now - last
        last = now
        available = min(rate, available + rate * (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18))
        available -= Double(bytes)
        if available < 0 {
            let wait = -available / rate
            try? await Task.sleep(for: .milliseconds(Int(wait * 1000)))
        }
    }
}
