// The replica store: one volume's replica on this node's disk, in the format of
// docs/replica-format.md — a superblock, and a chain of layers each holding a sparse `data`
// file and a `blockmap` of (generation, crc32c, flags) per 4 KiB block.
//
// What it owns: the on-disk format of one replica directory; per-block checksums, verified on
// every read; write generations (and the scan delta resync needs); the persisted fencing epoch
// (every request older than the highest seen is refused, and changes nothing); crash recovery of
// unflushed block-map entries after an unclean close; sparse allocation, trim, growth.
//
// What it does not own: networking (the data protocol's frames live in Frame*.swift, and the
// replica server decodes them and calls this store); the engine (the single writer that
// numbers generations, fans writes out to replicas, holds the epoch and the snapshot write
// barrier); repair from a peer and scrubbing (this store detects corruption and says where, it
// does not fix it). Snapshots, their deletion (a merge) and clones live in LayerChain.swift.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CDirectIO
import Logging
import Synchronization

/// Why a replica store operation was refused. Each case maps to one gRPC status (below); the
/// data protocol maps the same cases to its own status codes.
public enum ReplicaError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The request's epoch is older than the highest this replica has seen: the sender was fenced.
    case staleEpoch(seen: UInt64, got: UInt64)
    /// A block's data does not match its recorded checksum: silent corruption, detected.
    case checksumMismatch(block: UInt64)
    /// Misaligned, out of range, or otherwise malformed.
    case badRequest(String)
    /// The superblock is unreadable (bad magic, version, checksum or fields).
    case corruptSuperblock(String)
    /// The directory holds another volume's replica.
    case wrongVolume(expected: String, found: String)
    case notFound(String)
    case alreadyExists(String)
    /// The store was closed.
    case closed
    /// Another open store (in this process or another) holds the replica.
    case inUse(String)

    public var description: String {
        switch self {
        case let .staleEpoch(seen, got):
            "stale epoch \(got): this replica has seen epoch \(seen) (the sender was fenced)"
        case let .checksumMismatch(block):
            "checksum mismatch in block \(block): the data on disk does not match its recorded crc32c"
        case let .badRequest(reason): "bad request: \(reason)"
        case let .corruptSuperblock(reason): "corrupt replica superblock: \(reason)"
        case let .wrongVolume(expected, found):
            "the replica belongs to volume \(found), not \(expected)"
        case let .notFound(what): what
        case let .alreadyExists(what): what
        case .closed: "the replica store is closed"
        case let .inUse(directory): "the replica in \(directory) is already open"
        }
    }
}

extension ReplicaError: StatusConvertible {
    /// FAILED_PRECONDITION for a fenced sender or a wrong replica (retrying the same request
    /// cannot succeed until the system's state changes); DATA_LOSS for detected corruption.
    public var status: (code: StatusCode, message: String) {
        switch self {
        case .staleEpoch, .wrongVolume, .closed: (code: StatusCode.failedPrecondition, message: description)
        case .checksumMismatch, .corruptSuperblock: (code: StatusCode.dataLoss, message: description)
        case .badRequest: (code: StatusCode.invalidArgument, message: description)
        case .notFound: (code: StatusCode.notFound, message: description)
        case .alreadyExists: (code: StatusCode.alreadyExists, message: description)
        case .inUse: (code: StatusCode.aborted, message: description)
        }
    }
}

/// What `status` reports.
public struct ReplicaStatus: Sendable, Equatable {
    public var volumeID: String
    public var size: UInt64
    public var blockSize: UInt32
    public var epoch: UInt64
    /// Every write with a generation ≤ this is durable.
    public var flushedGeneration: UInt64
    /// The highest generation written (durable or not).
    public var highestGeneration: UInt64

    public init(volumeID: String, size: UInt64, blockSize: UInt32, epoch: UInt64, flushedGeneration: UInt64,
                highestGeneration: UInt64) {
        self.volumeID = volumeID
        self.size = size
        self.blockSize = blockSize
        self.epoch = epoch
        self.flushedGeneration = flushedGeneration
        self.highestGeneration = highestGeneration
    }
}

/// What recovery found when a replica was opened after an unclean close.
public struct RecoveryReport: Sendable, Equatable {
    /// Blocks whose entries had generation > flushed generation (never acknowledged durable);
    /// their checksums were recomputed from the data found.
    public var unflushedBlocks: [UInt64] = []
    /// Of those, the blocks whose data did not match the recorded checksum (a torn write).
    public var rewrittenBlocks: [UInt64] = []
}

/// One volume's replica on disk (see the file comment for what it owns).
///
/// Thread safety: a reader-writer lock. Reads, writes and trims hold it shared — from
/// validation and the epoch check through the I/O — so they run concurrently; claim, grow, flush
/// and close hold it exclusive, so a claim still waits for every request already past its epoch
/// check and no stale request can start after it (the fence is atomic). Within the shared
/// side, I/O to the same 1 MiB region is serialized (`RegionLocks`): a block's data and its
/// block-map entry change together, and a read never sees one without the other.
public final class ReplicaStore: Sendable {
    public static let blockSize = 4096
    /// The largest read, write or trim one call may ask for: bounds the buffer a request can
    /// make the store allocate (the data protocol's own limit, 8 MiB, is below it).
    public static let maxRequestLength = 64 << 20
    static let layerNameWidth = 10

    public let directory: String
    public let volumeID: String
    /// Whether the data file was opened O_DIRECT (false where the filesystem refuses it).
    public let usesDirectIO: Bool
    /// What recovery did at open (empty after a clean close or for a new replica).
    public let recovery: RecoveryReport
    let logger: Logger
    let state: ReadWriteLocked<State>
    let regions = RegionLocks()
    /// Reads planned (`planRead`) and not yet ended: the descriptors they read from stay open
    /// until this is zero (`waitForPlannedReads`, before any data file is closed).
    let plannedReads = Atomic<Int>(0)
    /// Regions written above the engine's clean watermark (convergence at the next claim).
    public let activity = ActivityLog()
    /// Writes made durable as they were written (`write(...durable:)` that returned true).
    let durableWrites = Atomic<UInt64>(0)
    public var durableWriteCount: UInt64 { durableWrites.load(ordering: .relaxed) }
    /// Serializes the operations that rewrite sealed layers or depend on them staying put:
    /// `deleteSnapshot` (its merge runs in chunks, taking the shared lock per chunk so writes go
    /// on) and `clone` (it hard-links sealed layers). Always taken before `state`.
    let maintenance = Mutex(())

    final class State {
        var superblock: Superblock
        /// Raised by writes and trims holding the lock shared.
        let highestGeneration: Atomic<UInt64>
        /// The writable head layer (the last of the superblock's chain).
        var head: Layer
        /// The sealed layers, oldest first (the chain without its head); never written except
        /// by a snapshot deletion's merge, which only adds blocks the layer fell through for.
        var sealed: [Layer]
        var isClosed = false
        /// The journal (Journal.swift): small writes are appended to it, so a flush syncs it alone.
        let journal: Journal
        /// Set by a write or trim that went in place only (too large for the journal, or the
        /// journal was full): the next flush syncs the data file and the block map too.
        let dirtyInPlace = Atomic<Bool>(false)
        /// Every write with a generation at or below this is durable (the superblock's copy is
        /// updated at checkpoints; between them the journal carries it).
        let flushedGeneration: Atomic<UInt64>

        var dataFD: Int32 { head.dataFD }
        var dataPath: String { head.dataPath }
        var blockMap: BlockMap { head.blockMap }

        init(superblock: Superblock, highestGeneration: UInt64, head: Layer, sealed: [Layer], journal: Journal) {
            self.superblock = superblock
            self.highestGeneration = Atomic(highestGeneration)
            self.flushedGeneration = Atomic(superblock.flushedGeneration)
            self.journal = journal
            self.head = head
            self.sealed = sealed
        }

        func closeFiles() {
            head.close()
            for layer in sealed { layer.close() }
        }
    }

    private init(directory: String, volumeID: String, usesDirectIO: Bool, recovery: RecoveryReport,
                 logger: Logger, state: sending State) {
        self.directory = directory
        self.volumeID = volumeID
        self.usesDirectIO = usesDirectIO
        self.recovery = recovery
        self.logger = logger
        self.state = ReadWriteLocked(state)
    }

    static func layerDirectory(_ directory: String, layer: UInt64) -> String {
        let s = String(layer)
        return directory + "/layers/" + String(repeating: "0", count: max(0, layerNameWidth - s.count)) + s
    }

    public static let discardingLogger = Logger(label: "cairn.replica", factory: { _ in SwiftLogNoOpLogHandler() })

    // MARK: create / open / close

    /// Creates a new replica in `directory` (created if missing): the head layer's sparse
    /// `data` and `blockmap` files first, the superblock last, so a directory without a
    /// superblock is never a replica. Refuses a directory that already holds one.
    public static func create(directory: String, volumeID: String, size: UInt64,
                              logger: Logger = discardingLogger) throws -> ReplicaStore {
        guard Superblock.isValidVolumeID(volumeID) else {
            throw ReplicaError.badRequest("volume id must be 1–\(Superblock.volumeIDCapacity) bytes of UTF-8 without NUL")
        }
        guard size > 0, size % UInt64(blockSize) == 0 else {
            throw ReplicaError.badRequest("size \(size) must be a positive multiple of \(blockSize)")
        }
        guard size <= UInt64(Int64.max / 2) else { throw ReplicaError.badRequest("size \(size) is too large") }
        try makeDirectory(directory)
        if access(directory + "/superblock", F_OK) == 0 {
            throw ReplicaError.alreadyExists("a replica already exists in \(directory)")
        }
        try makeDirectory(directory + "/layers")
        let layerDir = layerDirectory(directory, layer: 1)
        try makeDirectory(layerDir)

        let (dataFD, direct) = try openData(layerDir + "/data", create: true, logger: logger)
        let blockMap: BlockMap
        do {
            // Empty first: a directory without a superblock may hold a half-created replica.
            guard ftruncate(dataFD, 0) == 0, ftruncate(dataFD, off_t(size)) == 0 else { throw SystemError("ftruncate \(layerDir)/data", errno: errno) }
            guard fsync(dataFD) == 0 else { throw SystemError("fsync \(layerDir)/data", errno: errno) }
            blockMap = try BlockMap(path: layerDir + "/blockmap", create: true)
            try blockMap.ensureCapacity(blocks: size / UInt64(blockSize))
            guard fsync(blockMap.fd) == 0 else { throw SystemError("fsync \(blockMap.path)", errno: errno) }
            try FileIO.fsyncDirectory(layerDir)
            try FileIO.fsyncDirectory(directory + "/layers")
            let journal = try Journal.create(directory: directory, capacity: Journal.capacity(forVolumeSize: size),
                                             startSeq: 1, flushed: 0)
            let superblock = Superblock(volumeID: volumeID, size: size, clean: false, layers: [1])
            try superblock.write(directory: directory)
            logger.info("replica created", metadata: ["volume.id": "\(volumeID)", "replica.dir": "\(directory)",
                                                      "replica.size": "\(size)", "replica.direct_io": "\(direct)"])
            let head = Layer(id: 1, directory: layerDir, dataFD: dataFD, blockMap: blockMap)
            return ReplicaStore(directory: directory, volumeID: volumeID, usesDirectIO: direct, recovery: RecoveryReport(),
                                logger: logger,
                                state: State(superblock: superblock, highestGeneration: 0, head: head, sealed: [], journal: journal))
        } catch {
            _ = Glibc.close(dataFD)
            throw error
        }
    }

    /// Opens an existing replica of `volumeID` (refusing another volume's). After an unclean
    /// close it recovers: entries with generation > flushed generation get their checksum
    /// recomputed from the data found (reported in `recovery` and logged); entries at or below
    /// the flushed generation are left alone, so corruption there still reads as a mismatch.
    public static func open(directory: String, volumeID: String,
                            logger: Logger = discardingLogger) throws -> ReplicaStore {
        var superblock = try Superblock.read(directory: directory, expectedVolumeID: volumeID)
        guard let head = superblock.layers.last else { throw ReplicaError.corruptSuperblock("empty layer chain") }
        try removeUnreferencedLayers(directory: directory, chain: superblock.layers, logger: logger)
        // Sealed layers were flushed when they were sealed (and a merge syncs what it adds
        // before the chain changes), so they need no recovery; a clone opens them read-only.
        var sealed: [Layer] = []
        for id in superblock.layers.dropLast() {
            sealed.append(try Layer.openSealed(directory: layerDirectory(directory, layer: id), id: id, logger: logger))
        }
        let layerDir = layerDirectory(directory, layer: head)
        // A snapshot record in the head is from a snapshot that crashed before its superblock
        // was written: that snapshot never happened (the caller retries it).
        _ = unlink(layerDir + "/" + SnapshotRecord.fileName)
        let dataPath = layerDir + "/data"
        let (dataFD, direct) = try openData(dataPath, create: false, logger: logger)
        do {
            let blockMap = try BlockMap(path: layerDir + "/blockmap", create: false)
            let blocks = superblock.size / UInt64(blockSize)
            // Finish a growth that crashed between the superblock and the files.
            var st = stat()
            guard fstat(dataFD, &st) == 0 else { throw SystemError("fstat \(dataPath)", errno: errno) }
            if UInt64(st.st_size) < superblock.size {
                guard ftruncate(dataFD, off_t(superblock.size)) == 0 else { throw SystemError("ftruncate \(dataPath)", errno: errno) }
            }
            try blockMap.ensureCapacity(blocks: blocks)

            // The journal first: what it holds is newer than the block map's entries may say.
            let (journal, records, checkpointFlushed) = try Journal.open(
                directory: directory, capacity: Journal.capacity(forVolumeSize: superblock.size), replay: !superblock.clean)
            superblock.flushedGeneration = max(superblock.flushedGeneration, checkpointFlushed)
            var highest = superblock.flushedGeneration
            if !records.isEmpty {
                let replayed = try replayJournal(records, journal: journal, head: head, dataFD: dataFD, dataPath: dataPath,
                                                 blockMap: blockMap, blocks: blocks)
                superblock.flushedGeneration = max(superblock.flushedGeneration, replayed.flushed)
                highest = max(highest, replayed.highest)
                logger.warning("replica journal replayed after an unclean close", metadata: [
                    "volume.id": "\(volumeID)", "replica.dir": "\(directory)",
                    "replica.journal_records": "\(records.count)", "replica.journal_blocks_applied": "\(replayed.applied)",
                    "replica.flushed_generation": "\(superblock.flushedGeneration)",
                ])
            }
            var report = RecoveryReport()
            if !superblock.clean {
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: blockSize)
                defer { buffer.deallocate() }
                try blockMap.forEachPresent(blocks: blocks) { block, entry in
                    highest = max(highest, entry.generation)
                    guard entry.generation > superblock.flushedGeneration, !entry.isTrimmed else { return }
                    report.unflushedBlocks.append(block)
                    try readBlocks(fd: dataFD, path: dataPath, first: block, into: buffer)
                    let crc = CRC32C.checksum(UnsafeRawBufferPointer(buffer))
                    if crc != entry.crc {
                        report.rewrittenBlocks.append(block)
                        try blockMap.write(first: block, [BlockMapEntry(generation: entry.generation, crc: crc, flags: entry.flags)])
                    }
                }
                if !report.rewrittenBlocks.isEmpty { try blockMap.sync() }
                logger.warning("replica recovered after an unclean close", metadata: [
                    "volume.id": "\(volumeID)", "replica.dir": "\(directory)",
                    "replica.flushed_generation": "\(superblock.flushedGeneration)",
                    "replica.unflushed_blocks": "\(report.unflushedBlocks.count)",
                    "replica.rewritten_blocks": "\(report.rewrittenBlocks)",
                ])
            }
            // Everything replayed and recovered is in place and synced: the superblock takes the
            // flushed generation, then the journal starts over.
            superblock.clean = false
            try superblock.write(directory: directory)
            try journal.reset(flushed: superblock.flushedGeneration)
            let headLayer = Layer(id: head, directory: layerDir, dataFD: dataFD, blockMap: blockMap)
            return ReplicaStore(directory: directory, volumeID: volumeID, usesDirectIO: direct, recovery: report,
                                logger: logger,
                                state: State(superblock: superblock, highestGeneration: highest, head: headLayer, sealed: sealed,
                                             journal: journal))
        } catch {
            _ = Glibc.close(dataFD)
            throw error
        }
    }

    /// Applies the journal's whole records to the head layer in order: each block takes the
    /// record's version unless the block map holds a newer one (or a trim of the same
    /// generation). Syncs what it wrote. Returns the blocks applied, the highest generation seen
    /// and the newest flushed generation the records carried.
    static func replayJournal(_ records: [Journal.Record], journal: Journal, head: UInt64, dataFD: Int32, dataPath: String,
                              blockMap: BlockMap, blocks: UInt64) throws -> (applied: Int, highest: UInt64, flushed: UInt64) {
        var applied = 0, highest: UInt64 = 0, flushed: UInt64 = 0
        var buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Journal.smallWriteLimit, alignment: blockSize)
        defer { buffer.deallocate() }
        for record in records {
            flushed = max(flushed, record.flushedGeneration)
            if record.isIntent {
                guard record.layer == head, record.offset % UInt64(blockSize) == 0 else { continue }
                highest = max(highest, record.generation)
                applied += try replayIntent(record, dataFD: dataFD, dataPath: dataPath, blockMap: blockMap, blocks: blocks)
                continue
            }
            let count = record.crcs.count
            let first = record.offset / UInt64(blockSize)
            // A record of another layer (a snapshot checkpoints first, so none should be) or
            // beyond the replica's size is not this head's to apply.
            guard record.layer == head, record.offset % UInt64(blockSize) == 0, first + UInt64(count) <= blocks else { continue }
            highest = max(highest, record.generation)
            let length = count * blockSize
            if length > buffer.count {
                buffer.deallocate()
                buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: blockSize)
            }
            let data = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
            try journal.readData(of: record, into: data)
            let current = try blockMap.read(first: first, count: count)
            var i = 0
            while i < count {
                func applies(_ e: BlockMapEntry) -> Bool {
                    record.generation > e.generation || (record.generation == e.generation && !e.isTrimmed)
                }
                guard applies(current[i]) else { i += 1; continue }
                var end = i
                while end < count && applies(current[end]) { end += 1 }
                try FileIO.pwriteFully(dataFD, UnsafeRawBufferPointer(rebasing: data[(i * blockSize)..<(end * blockSize)]),
                                       offset: record.offset + UInt64(i * blockSize), path: dataPath)
                try blockMap.write(first: first + UInt64(i), (i..<end).map {
                    BlockMapEntry(generation: record.generation, crc: record.crcs[$0]) })
                applied += end - i
                i = end
            }
        }
        if applied > 0 {
            guard fdatasync(dataFD) == 0 else { throw SystemError("fdatasync \(dataPath)", errno: errno) }
            try blockMap.sync()
        }
        return (applied, highest, flushed)
    }

    /// An intent's range: a block whose data no longer matches an older entry (the write or
    /// trim reached the data file, not the map, when the process died) is recorded as what it
    /// holds, at the intent's generation — some version of an unacknowledged write, which the
    /// generation lets resync and convergence replace — rather than read later as corruption.
    static func replayIntent(_ record: Journal.Record, dataFD: Int32, dataPath: String, blockMap: BlockMap,
                             blocks: UInt64) throws -> Int {
        let first = record.offset / UInt64(blockSize)
        let end = min(first + UInt64(record.intentBlocks), blocks)
        guard first < end else { return 0 }
        let chunk = 256
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk * blockSize, alignment: blockSize)
        defer { buffer.deallocate() }
        var applied = 0
        var at = first
        while at < end {
            let count = Int(min(UInt64(chunk), end - at))
            let entries = try blockMap.read(first: at, count: count)
            let data = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(count * blockSize)])
            try readBlocks(fd: dataFD, path: dataPath, first: at, into: data)
            for i in 0..<count where entries[i].generation < record.generation {
                let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: data[(i * blockSize)..<((i + 1) * blockSize)]))
                let e = entries[i]
                if e.isPresent && !e.isTrimmed && crc == e.crc { continue }        // the old version, whole
                if (!e.isPresent || e.isTrimmed) && crc == zeroBlockCRC { continue } // still reads as zeros
                let found = record.intentIsTrim && crc == zeroBlockCRC
                    ? BlockMapEntry(generation: record.generation, crc: crc, flags: BlockMapEntry.trimmedFlag)
                    : BlockMapEntry(generation: record.generation, crc: crc)
                try blockMap.write(first: at + UInt64(i), [found])
                applied += 1
            }
            at += UInt64(count)
        }
        return applied
    }

    /// An orderly close: flushes, records `clean = 1`, closes the files. Later calls throw
    /// `closed`; closing twice is harmless. (Dropping the store without `close` leaves
    /// `clean = 0`, which the next `open` treats as a crash.)
    public func close() throws {
        try state.withLock { s in
            guard !s.isClosed else { return }
            try Self.flushLocked(s, directory: directory)
            s.superblock.clean = true
            try s.superblock.write(directory: directory)
            s.isClosed = true
            waitForPlannedReads()
            s.closeFiles()
        }
        logger.debug("replica closed", metadata: ["volume.id": "\(volumeID)"])
    }

    // MARK: data operations

    /// Reads whole, aligned blocks. Every block present in the map is checked against its
    /// crc32c; never-written and trimmed blocks read as zeros.
    public func read(offset: UInt64, length: Int, epoch: UInt64) throws -> [UInt8] {
        try Self.readArray(length: length) { try read(offset: offset, into: $0, epoch: epoch) }
    }

    /// A new array of `length` bytes (checked before it is allocated) filled by `read`.
    static func readArray(length: Int, _ read: (UnsafeMutableRawBufferPointer) throws -> Void) throws -> [UInt8] {
        guard length > 0, length <= maxRequestLength else {
            throw ReplicaError.badRequest("length \(length) is not a positive multiple of \(blockSize) up to \(maxRequestLength)")
        }
        return try [UInt8](unsafeUninitializedCapacity: length) { buffer, count in
            try read(UnsafeMutableRawBufferPointer(buffer))
            count = length
        }
    }

    /// Reads whole, aligned blocks into `buffer` (its count is the length). A 4 KiB-aligned
    /// buffer is read into directly (O_DIRECT); any other goes through a per-thread scratch one.
    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, epoch: UInt64) throws {
        try state.withShared { s in
            let (first, count) = try Self.checkLocked(s, offset: offset, length: buffer.count, epoch: epoch)
            try readLocked(s, first: first, count: count, offset: offset, into: buffer)
        }
    }

    /// A planned read (`planRead`): the data file's descriptor (-1: no I/O needed), the byte
    /// offset of the range in it, and a bit per block that reads as zeros.
    public typealias PlannedRead = (fd: Int32, fileOffset: UInt64, zeros: UInt64)
    /// The most blocks one plan covers (one bit each in `PlannedRead.zeros`).
    public static let maxPlannedBlocks = 64

    /// Where a read of whole blocks lies, for a caller that reads it itself, asynchronously
    /// (the engine's io_uring reads of its local replica; docs/engine.md, "Asynchronous
    /// reads"): the data file's descriptor and byte offset of the range, and per block either
    /// the crc32c its data must have (`checksums[i]`) or bit i of `zeros` (a hole or a trim:
    /// it reads as zeros, whatever the file holds). Checked like `read` (open, epoch, range).
    /// `checksums` holds a slot per block. nil when the range is longer than `maxPlannedBlocks`
    /// or the blocks are not in one layer's file (a snapshot's chain serves them from
    /// several): the caller reads them with `read`. A plan with `fd` -1 needs no I/O (every
    /// block reads as zeros).
    ///
    /// Nothing is held once it returns: a write or trim may change the blocks before the
    /// caller's read, so the caller must check every block against its checksum and, if one
    /// does not match, read the range again with `read` (under the locks) before it calls
    /// anything damaged. The descriptor stays open until `endPlannedRead`, which the caller
    /// must call exactly once for each non-nil plan whose `fd` is not -1, when its read is done.
    public func planRead(offset: UInt64, length: Int, epoch: UInt64,
                         checksums: UnsafeMutablePointer<UInt32>) throws -> PlannedRead? {
        try state.withShared { s in
            let (first, count) = try Self.checkLocked(s, offset: offset, length: length, epoch: epoch)
            guard count <= Self.maxPlannedBlocks else { return nil }
            return try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: count) { entries in
                let owners = try regions.withRange(offset: offset, length: length) {
                    try Self.resolve(s, first: first, into: entries)
                }
                var serving = s.sealed.count
                var zeros: UInt64 = 0
                var one: Int?
                for i in 0..<count {
                    let entry = entries[i]
                    if !entry.isPresent || entry.isTrimmed {
                        zeros |= 1 << UInt64(i)
                        continue
                    }
                    checksums[i] = entry.crc
                    guard let owners else { continue }
                    if one == nil { one = owners[i] } else if one != owners[i] { return nil }
                }
                if count == Self.maxPlannedBlocks ? zeros == ~0 : zeros == (1 << UInt64(count)) - 1 {
                    return (fd: -1, fileOffset: 0, zeros: zeros)
                }
                if let one { serving = one }
                let layer = Self.layer(s, at: serving)
                // Under the shared lock: a closer (holding it exclusively) waits for this read.
                plannedReads.wrappingAdd(1, ordering: .acquiringAndReleasing)
                return (fd: layer.dataFD, fileOffset: first * UInt64(Self.blockSize), zeros: zeros)
            }
        }
    }

    /// A planned read is done: its descriptor may be closed.
    public func endPlannedRead() {
        plannedReads.wrappingSubtract(1, ordering: .acquiringAndReleasing)
    }

    /// Waits until no planned read is left in flight. Called holding the lock exclusively (no
    /// read is planned meanwhile) before a data file is closed: a read in flight must never
    /// find its descriptor closed, or given to another file or socket.
    func waitForPlannedReads() {
        var waited = 0
        while plannedReads.load(ordering: .acquiring) > 0 {
            usleep(100)
            waited += 1
            if waited == 100_000 {
                // 10 s for reads of a local file: the device is stuck; this waits on.
                logger.warning("still waiting for asynchronous reads of this replica to finish before closing a data file",
                               metadata: ["volume.id": "\(volumeID)"])
            }
        }
    }

    /// The read of blocks `first ..< first+count` (at byte `offset`) through the layers up to
    /// `top` (`resolve`'s; nil: the volume), under their region locks, each present block checked
    /// against its crc32c, holes and trims zeroed. Called holding the lock shared, range checked.
    func readLocked(_ s: State, first: UInt64, count: Int, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                    top: Int? = nil) throws {
        let aligned = Int(bitPattern: buffer.baseAddress) % Self.blockSize == 0
        let target = aligned ? buffer : AlignedScratch.buffer(buffer.count)
        try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: count) { entries in
            try regions.withRange(offset: offset, length: buffer.count) {
                try Self.readResolved(s, first: first, entries: entries, into: target, top: top)
            }
            for (i, entry) in entries.enumerated() {
                let block = UnsafeMutableRawBufferPointer(rebasing: target[(i * Self.blockSize)..<((i + 1) * Self.blockSize)])
                if !entry.isPresent || entry.isTrimmed {
                    // A hole reads as zeros anyway; zeroing also hides a stale, un-punched block.
                    block.initializeMemory(as: UInt8.self, repeating: 0)
                    continue
                }
                if CRC32C.checksum(UnsafeRawBufferPointer(block)) != entry.crc {
                    logger.error("replica block checksum mismatch", metadata: [
                        "volume.id": "\(volumeID)", "replica.block": "\(first + UInt64(i))",
                        "replica.generation": "\(entry.generation)",
                        "replica.read": "\(top.map { "snapshot layer \(Self.layer(s, at: $0).id)" } ?? "volume")",
                    ])
                    throw ReplicaError.checksumMismatch(block: first + UInt64(i))
                }
            }
        }
        if !aligned { buffer.copyMemory(from: UnsafeRawBufferPointer(target)) }
    }

    /// Writes whole, aligned blocks at `generation` (> 0, numbered by the engine): the data
    /// first, then the map entries. Durable after the next `flush`.
    public func write(offset: UInt64, data: [UInt8], generation: UInt64, epoch: UInt64) throws {
        try data.withUnsafeBytes { try write(offset: offset, bytes: $0, generation: generation, epoch: epoch) }
    }

    /// `write(offset:data:generation:epoch:)` from memory the caller owns: a 4 KiB-aligned
    /// buffer is written from directly (O_DIRECT), any other is copied into a per-thread one.
    public func write(offset: UInt64, bytes data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws {
        _ = try write(offset: offset, bytes: data, generation: generation, epoch: epoch, durable: false)
    }

    /// `write(offset:bytes:generation:epoch:)` that, with `durable`, also makes the write
    /// durable before it returns when that is cheap: a journaled write's record is synced (one
    /// fdatasync of the journal, as a flush would do; replay finds the record even past a hole
    /// left by a write still in flight). Returns whether the write is durable now. False for
    /// writes that went in place only (too long for the journal, or the journal full or
    /// broken) and when the journal is past the point where the next flush checkpoints (so
    /// that flush is not skipped): those wait for a flush as every write did.
    public func write(offset: UInt64, bytes data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
                      durable: Bool) throws -> Bool {
        let journal: Journal? = try state.withShared { s in
            let (first, count) = try Self.checkLocked(s, offset: offset, length: data.count, epoch: epoch)
            try Self.checkGeneration(generation)
            activity.note(offset: offset, length: data.count, generation: generation)
            let source = Self.alignedSource(data)
            return try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: count) { entries in
                for i in 0..<count {
                    let block = UnsafeRawBufferPointer(rebasing: source[(i * Self.blockSize)..<((i + 1) * Self.blockSize)])
                    entries.initializeElement(at: i, to: BlockMapEntry(generation: generation, crc: CRC32C.checksum(block)))
                }
                return try regions.withRange(offset: offset, length: data.count) {
                    // Marked once the write is done, data and entries (a flush that does not
                    // drain must leave the mark for the next flush while this is on its way).
                    var inPlace = false
                    defer { if inPlace { s.dirtyInPlace.store(true, ordering: .relaxed) } }
                    // Small writes go to the journal as well — its record and the in-place copy in
                    // flight together — so the flush that makes them durable syncs the journal
                    // alone; others (or when it is full) only in place, announced by an intent.
                    let journaled = try data.count <= Journal.smallWriteLimit
                        && (s.journal.append(layer: s.head.id, offset: offset, generation: generation,
                                             flushedGeneration: s.flushedGeneration.load(ordering: .relaxed),
                                             data: source, entries: UnsafeBufferPointer(entries),
                                             inPlace: (s.dataFD, s.dataPath)))
                    if !journaled {
                        inPlace = true
                        try Self.writeAnnounced(s, offset: offset, blocks: count, generation: generation, data: source)
                    }
                    try s.blockMap.write(first: first, UnsafeBufferPointer(entries))
                    s.highestGeneration.max(generation, ordering: .relaxed)
                    return journaled && durable && !s.journal.dueForCheckpoint ? s.journal : nil
                }
            }
        }
        // Outside the lock: a flush's drain need not wait for this sync. A checkpoint that ran
        // meanwhile synced the write in place; this sync is then merely redundant.
        guard let journal else { return false }
        try journal.syncRecords()
        durableWrites.wrappingAdd(1, ordering: .relaxed)
        return true
    }

    /// One write of `writeGroup`: whole, aligned blocks at `offset`, numbered `generation`.
    public struct GroupWrite {
        public var offset: UInt64
        /// 4 KiB-aligned memory the caller owns until `writeGroup` returns.
        public var data: UnsafeRawBufferPointer
        public var generation: UInt64

        public init(offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64) {
            self.offset = offset
            self.data = data
            self.generation = generation
        }
    }

    /// Several writes at once, each exactly as `write(offset:bytes:generation:epoch:)` would do
    /// it (checks, journal record and in-place copy, block-map entries), but their device writes
    /// are submitted together (`cdio_write_many`: one io_submit, one notification of the device)
    /// and this thread waits once, not once per write. A replica server uses it for the writes
    /// one receive brought. The writes must not overlap each other (the engine never has two
    /// writes of one block in flight). Returns each write's error, or nil, in order.
    public func writeGroup(_ writes: [GroupWrite], epoch: UInt64) -> [(any Error)?] {
        var errors = [(any Error)?](repeating: nil, count: writes.count)
        do {
            try state.withShared { s in
                // Checked one by one: a bad write fails alone.
                var ranges: [(first: UInt64, count: Int)?] = []
                ranges.reserveCapacity(writes.count)
                for (i, w) in writes.enumerated() {
                    do {
                        let r = try Self.checkLocked(s, offset: w.offset, length: w.data.count, epoch: epoch)
                        try Self.checkGeneration(w.generation)
                        guard Int(bitPattern: w.data.baseAddress) % Self.blockSize == 0 else {
                            throw ReplicaError.badRequest("a grouped write's data must be 4 KiB-aligned")
                        }
                        ranges.append(r)
                    } catch {
                        errors[i] = error
                        ranges.append(nil)
                    }
                }
                let live = writes.indices.filter { ranges[$0] != nil }
                guard !live.isEmpty else { return }
                for i in live {
                    activity.note(offset: writes[i].offset, length: writes[i].data.count, generation: writes[i].generation)
                }
                let totalBlocks = live.reduce(0) { $0 + ranges[$1]!.count }
                try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: totalBlocks) { entries in
                    var at = 0
                    var firstEntry = [Int](repeating: 0, count: writes.count)
                    for i in live {
                        firstEntry[i] = at
                        let w = writes[i]
                        for b in 0..<ranges[i]!.count {
                            let block = UnsafeRawBufferPointer(rebasing: w.data[(b * Self.blockSize)..<((b + 1) * Self.blockSize)])
                            entries.initializeElement(at: at, to: BlockMapEntry(generation: w.generation, crc: CRC32C.checksum(block)))
                            at += 1
                        }
                    }
                    defer { entries.baseAddress!.deinitialize(count: totalBlocks) }
                    func entriesOf(_ i: Int) -> UnsafeBufferPointer<BlockMapEntry> {
                        UnsafeBufferPointer(rebasing: entries[firstEntry[i]..<(firstEntry[i] + ranges[i]!.count)])
                    }
                    try regions.withRanges(live.map { (writes[$0].offset, writes[$0].data.count) }) {
                        // Each write's journal record (when it fits), and its in-place copy.
                        var io: [cdio_write] = []
                        io.reserveCapacity(live.count * 2)
                        var headers: [UnsafeMutableRawBufferPointer] = []
                        defer { for h in headers { h.deallocate() } }
                        var owner: [(write: Int, journal: Bool)] = []
                        var inPlaceOnly = false, anyRecord = false
                        // Marked once done, as `write` does.
                        defer { if inPlaceOnly { s.dirtyInPlace.store(true, ordering: .relaxed) } }
                        let flushed = s.flushedGeneration.load(ordering: .relaxed)
                        for i in live {
                            let w = writes[i]
                            if w.data.count <= Journal.smallWriteLimit,
                               let (at, header) = s.journal.prepareRecord(layer: s.head.id, offset: w.offset, generation: w.generation,
                                                                          flushedGeneration: flushed, dataCount: w.data.count,
                                                                          entries: entriesOf(i)) {
                                headers.append(header)
                                io.append(cdio_write(fd: s.journal.fd, base1: UnsafeRawPointer(header.baseAddress), len1: header.count,
                                                     base2: w.data.baseAddress, len2: w.data.count, offset: Int64(at), result: 0))
                                owner.append((i, true))
                                anyRecord = true
                            } else {
                                // In place only, announced by an intent submitted with it.
                                if let (at, header) = s.journal.prepareIntent(layer: s.head.id, offset: w.offset, blocks: ranges[i]!.count,
                                                                              generation: w.generation, flushedGeneration: flushed) {
                                    headers.append(header)
                                    io.append(cdio_write(fd: s.journal.fd, base1: UnsafeRawPointer(header.baseAddress), len1: header.count,
                                                         base2: nil, len2: 0, offset: Int64(at), result: 0))
                                    owner.append((i, true))
                                }
                                inPlaceOnly = true
                            }
                            io.append(cdio_write(fd: s.dataFD, base1: w.data.baseAddress, len1: w.data.count,
                                                 base2: nil, len2: 0, offset: Int64(w.offset), result: 0))
                            owner.append((i, false))
                        }
                        io.withUnsafeMutableBufferPointer { cdio_write_many($0.baseAddress, Int32($0.count)) }
                        if anyRecord { s.journal.recordWritten() }
                        for (k, op) in io.enumerated() where op.result != 0 {
                            let (i, journal) = owner[k]
                            if journal { s.journal.recordFailed() }
                            if errors[i] == nil {
                                errors[i] = SystemError("write \(journal ? s.journal.path : s.dataPath)", errno: -op.result)
                            }
                        }
                        // The entries of the writes whose data is in place (a failed one keeps
                        // its old entries: its data may be half there, and it was not answered).
                        for i in live where errors[i] == nil {
                            do {
                                try s.blockMap.write(first: ranges[i]!.first, entriesOf(i))
                                s.highestGeneration.max(writes[i].generation, ordering: .relaxed)
                            } catch {
                                errors[i] = error
                            }
                        }
                    }
                }
            }
        } catch {
            for i in errors.indices where errors[i] == nil { errors[i] = error }
        }
        return errors
    }

    /// A resync write: like `write`, but applied only to the blocks whose current generation
    /// is lower than `generation` (never written, or written or trimmed by an older request);
    /// the others hold a newer (or the same) version and are left alone. Each block is decided
    /// and written under its region lock, so a normal write racing with this one is never
    /// overwritten by an older copy. Returns how many blocks were written.
    @discardableResult
    public func writeIfNewer(offset: UInt64, data: [UInt8], generation: UInt64, epoch: UInt64) throws -> Int {
        try data.withUnsafeBytes { try writeIfNewer(offset: offset, bytes: $0, generation: generation, epoch: epoch) }
    }

    /// `writeIfNewer(offset:data:generation:epoch:)` from memory the caller owns.
    @discardableResult
    public func writeIfNewer(offset: UInt64, bytes data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        try write(offset: offset, bytes: data, generation: generation, epoch: epoch, condition: .ifNewer)
    }

    /// Which blocks a conditional write applies to.
    public enum WriteCondition: Sendable {
        /// Blocks whose generation is lower than the write's (a resync copy).
        case ifNewer
        /// Blocks whose generation is at most the write's (a repair: the good copy of a
        /// corrupted block, rewritten at its own generation, never over a newer write).
        case ifNotNewer
    }

    /// A conditional write: each block is decided and written under its region lock, so a
    /// normal write racing with it is never overwritten. Returns how many blocks were written.
    @discardableResult
    public func write(offset: UInt64, bytes data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
                      condition: WriteCondition) throws -> Int {
        let applies: (UInt64) -> Bool = switch condition {
        case .ifNewer: { $0 < generation }
        case .ifNotNewer: { $0 <= generation }
        }
        return try state.withShared { s in
            let (first, count) = try Self.checkLocked(s, offset: offset, length: data.count, epoch: epoch)
            try Self.checkGeneration(generation)
            activity.note(offset: offset, length: data.count, generation: generation)
            let source = Self.alignedSource(data)
            // Resync and repair copies go in place only; the flush after them syncs the files.
            try Self.announce(s, offset: offset, blocks: count, generation: generation)
            // Marked once done (`write`), also when a later run fails after earlier ones landed.
            defer { s.dirtyInPlace.store(true, ordering: .relaxed) }
            let applied = try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: count) { entries in
                try regions.withRange(offset: offset, length: data.count) {
                    // Decided on the effective generation (the newest layer's): what resync compared.
                    _ = try Self.resolve(s, first: first, into: entries)
                    var applied = 0
                    var i = 0
                    // Runs of consecutive blocks to apply: one data pwrite and one map write each.
                    while i < count {
                        guard applies(entries[i].generation) else { i += 1; continue }
                        var end = i
                        while end < count && applies(entries[end].generation) {
                            let block = UnsafeRawBufferPointer(rebasing: source[(end * Self.blockSize)..<((end + 1) * Self.blockSize)])
                            entries[end] = BlockMapEntry(generation: generation, crc: CRC32C.checksum(block))
                            end += 1
                        }
                        let bytes = UnsafeRawBufferPointer(rebasing: source[(i * Self.blockSize)..<(end * Self.blockSize)])
                        try FileIO.pwriteFully(s.dataFD, bytes, offset: offset + UInt64(i * Self.blockSize), path: s.dataPath)
                        try s.blockMap.write(first: first + UInt64(i), UnsafeBufferPointer(rebasing: entries[i..<end]))
                        applied += end - i
                        i = end
                    }
                    return applied
                }
            }
            if applied > 0 { s.highestGeneration.max(generation, ordering: .relaxed) }
            logger.trace("replica conditional write", metadata: [
                "volume.id": "\(volumeID)", "replica.offset": "\(offset)", "replica.generation": "\(generation)",
                "replica.condition": "\(condition)", "replica.blocks": "\(count)", "replica.applied": "\(applied)",
            ])
            return applied
        }
    }

    /// The generation of each block `firstBlock ..< firstBlock+count` in the block map, as
    /// the `generations` op reports them (`BlockGenerations`): 0 for a never-written block, the
    /// trim's generation with `BlockGenerations.trimmedBit` for a trimmed one. `count` is
    /// 1...`FrameLimits.maxGenerationsCount`. A resync diffs two replicas with it.
    public func generations(firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            return try generationsLocked(s, firstBlock: firstBlock, count: count, size: s.superblock.size)
        }
    }

    /// `generations` of the layers up to `top` (`resolve`'s), for blocks within `size` bytes;
    /// called holding the lock shared.
    func generationsLocked(_ s: State, firstBlock: UInt64, count: Int, size: UInt64, top: Int? = nil) throws -> [UInt64] {
        try Self.checkGenerationsCount(count)
        let blocks = size / UInt64(Self.blockSize)
        let (end, overflow) = firstBlock.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= blocks else {
            throw ReplicaError.badRequest("blocks \(firstBlock)+\(count) are beyond the \(top == nil ? "replica" : "snapshot")'s \(blocks) blocks")
        }
        return try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: count) { entries in
            // The region locks: an entry is never read half-written.
            try regions.withRange(offset: firstBlock * UInt64(Self.blockSize), length: count * Self.blockSize) {
                _ = try Self.resolve(s, first: firstBlock, into: entries, top: top)
            }
            return entries.map { $0.isTrimmed ? $0.generation | BlockGenerations.trimmedBit : $0.generation }
        }
    }

    /// Blocks per region of `generationSummary`.
    public static let summaryRegionBlocks = 256
    /// Most regions one `generationSummary` call covers (4 GiB of volume, 32 KiB of reply).
    public static let maxSummaryCount = 4096
    /// Most blocks one `verify` call covers (64 MiB).
    public static let maxVerifyCount = 16_384

    /// One digest per region (`summaryRegionBlocks` blocks; the last may be shorter) of the
    /// values `generations` reports, for regions `firstRegion ..< firstRegion+count`: two
    /// replicas whose digests for a region are equal hold the same block versions there (up to
    /// the odds of a 64-bit hash), so a resync lists generations only where digests differ. A
    /// region with no block ever written or trimmed has digest 0, and no other region does.
    /// The digest is FNV-1a over the little-endian bytes of the reported values, in block order.
    public func generationSummary(firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            guard count >= 1, count <= Self.maxSummaryCount else {
                throw ReplicaError.badRequest("summary count \(count) is outside 1...\(Self.maxSummaryCount)")
            }
            let blocks = s.superblock.size / UInt64(Self.blockSize)
            let regionCount = (blocks + UInt64(Self.summaryRegionBlocks) - 1) / UInt64(Self.summaryRegionBlocks)
            let (end, overflow) = firstRegion.addingReportingOverflow(UInt64(count))
            guard !overflow, end <= regionCount else {
                throw ReplicaError.badRequest("regions \(firstRegion)+\(count) are beyond the replica's \(regionCount) regions")
            }
            return try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: Self.summaryRegionBlocks) { entries in
                var digests: [UInt64] = []
                digests.reserveCapacity(count)
                for region in firstRegion..<end {
                    let first = region * UInt64(Self.summaryRegionBlocks)
                    let n = Int(min(UInt64(Self.summaryRegionBlocks), blocks - first))
                    let slice = UnsafeMutableBufferPointer(rebasing: entries[0..<n])
                    try lockRegions(first: first, count: n) { _ = try Self.resolve(s, first: first, into: slice) }
                    digests.append(Self.regionDigest(slice))
                }
                return digests
            }
        }
    }

    private func lockRegions(first firstBlock: UInt64, count: Int, _ body: () throws -> Void) throws {
        try regions.withRange(offset: firstBlock * UInt64(Self.blockSize), length: count * Self.blockSize, body)
    }

    static func regionDigest(_ entries: UnsafeMutableBufferPointer<BlockMapEntry>) -> UInt64 {
        var any = false
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for entry in entries {
            let value = entry.isTrimmed ? entry.generation | BlockGenerations.trimmedBit : entry.generation
            if value != 0 { any = true }
            var v = value
            for _ in 0..<8 {
                hash = (hash ^ (v & 0xFF)) &* 0x100_0000_01B3
                v >>= 8
            }
        }
        guard any else { return 0 }
        return hash == 0 ? 1 : hash
    }

    /// Blocks a verify reads at a time (64 KiB). The scrub's verifies reach every worker
    /// thread of the replica server in turn, a few a second, so no thread is ever idle long
    /// enough to give its scratch buffer back: reading 1 MiB at a time kept 1 MiB resident in
    /// every thread's (~30 MiB per replica server after the first scrub pass).
    static let verifyChunkBlocks = 16

    /// The blocks in `firstBlock ..< firstBlock+count` (1...`maxVerifyCount`) whose data does
    /// not match its recorded checksum (written, untrimmed blocks only), ascending. Reads the
    /// data `verifyChunkBlocks` at a time under the region locks; each bad block is logged.
    public func verify(firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            guard count >= 1, count <= Self.maxVerifyCount else {
                throw ReplicaError.badRequest("verify count \(count) is outside 1...\(Self.maxVerifyCount)")
            }
            let blocks = s.superblock.size / UInt64(Self.blockSize)
            let (end, overflow) = firstBlock.addingReportingOverflow(UInt64(count))
            guard !overflow, end <= blocks else {
                throw ReplicaError.badRequest("blocks \(firstBlock)+\(count) are beyond the replica's \(blocks) blocks")
            }
            let chunk = Self.verifyChunkBlocks
            let buffer = AlignedScratch.buffer(chunk * Self.blockSize)
            var bad: [UInt64] = []
            try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: chunk) { entries in
                var first = firstBlock
                while first < end {
                    let n = Int(min(UInt64(chunk), end - first))
                    let slice = UnsafeMutableBufferPointer(rebasing: entries[0..<n])
                    let data = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(n * Self.blockSize)])
                    try lockRegions(first: first, count: n) {
                        // Only when something in the chunk is written: holes cost nothing.
                        try Self.readResolved(s, first: first, entries: slice, into: data, onlyIfWritten: true)
                    }
                    for i in 0..<n where slice[i].isPresent && !slice[i].isTrimmed {
                        let block = UnsafeRawBufferPointer(rebasing: data[(i * Self.blockSize)..<((i + 1) * Self.blockSize)])
                        if CRC32C.checksum(block) != slice[i].crc {
                            bad.append(first + UInt64(i))
                            logger.error("replica block checksum mismatch found by verify", metadata: [
                                "volume.id": "\(volumeID)", "replica.block": "\(first + UInt64(i))",
                                "replica.generation": "\(slice[i].generation)",
                            ])
                        }
                    }
                    first += UInt64(n)
                }
            }
            return bad
        }
    }

    /// Makes every write acknowledged so far durable. `through` is the engine's word that every
    /// write numbered at or below it has finished (the flushed generation recorded; without it,
    /// the highest written so far).
    ///
    /// Without `through` it drains the writes in flight (the exclusive lock, held only for
    /// that): what it then syncs covers every write numbered up to the highest one. With
    /// `through` there is nothing to drain — every write it must cover has finished — so writes
    /// go on meanwhile: a write-through volume's engine flushes after every burst of writes,
    /// and a drain each time stalled them all behind the slowest one. Either way, then —
    /// outside the lock, so writes go on — one fdatasync of the journal, plus the data file and
    /// the block map if something went in place only since the last flush (a write in place
    /// sets that flag once more when it is done, so a flush that took it meanwhile leaves it
    /// for the next). A checkpoint (everything in place synced, the journal started over)
    /// instead when the journal is past 3/4 full or broken; it drains.
    public func flush(epoch: UInt64, through: UInt64? = nil) throws {
        if let through {
            let plan: FlushPlan? = try state.withShared { s in
                try Self.checkOpenLocked(s)
                try Self.checkEpochLocked(s, epoch)
                if s.journal.broken.load(ordering: .relaxed) || s.journal.dueForCheckpoint { return nil }
                let target = min(through, s.highestGeneration.load(ordering: .relaxed))
                return (s.dirtyInPlace.exchange(false, ordering: .relaxed), s.journal, target, s)
            }
            if let plan {
                try syncForFlush(plan)
                return
            }
        }
        let plan: FlushPlan? = try state.withLock { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            let highest = s.highestGeneration.load(ordering: .relaxed)
            let target = min(through ?? highest, highest)
            if s.journal.broken.load(ordering: .relaxed) || s.journal.dueForCheckpoint {
                try Self.flushLocked(s, directory: directory, through: target)
                return nil
            }
            return (s.dirtyInPlace.exchange(false, ordering: .relaxed), s.journal, target, s)
        }
        guard let plan else { return }
        try syncForFlush(plan)
    }

    /// What a flush syncs, decided under the lock: the data file and block map too (something
    /// went in place only since the last flush), the journal, the generation to record, the state.
    private typealias FlushPlan = (inPlace: Bool, journal: Journal, target: UInt64, state: State)

    /// A flush's syncs, outside the lock: the data file and the block map when something went
    /// in place only, then the journal; the flushed generation moves to `target` after them.
    private func syncForFlush(_ plan: FlushPlan) throws {
        let s = plan.state
        do {
            if plan.inPlace {
                guard fdatasync(s.dataFD) == 0 else { throw SystemError("fdatasync \(s.dataPath)", errno: errno) }
                try s.blockMap.sync()
            }
            try plan.journal.sync()
        } catch {
            if plan.inPlace { s.dirtyInPlace.store(true, ordering: .relaxed) }
            throw error
        }
        s.flushedGeneration.max(plan.target, ordering: .relaxed)
    }

    /// Trims whole, aligned blocks: punches holes in the data (PUNCH_HOLE | KEEP_SIZE) and
    /// marks the entries trimmed, so they read as zeros. The entries take `generation` (the
    /// protocol's trim carries none yet; by default the highest generation written so far, so
    /// a delta resync from below it sees the trim).
    public func trim(offset: UInt64, length: Int, generation: UInt64? = nil, epoch: UInt64) throws {
        _ = try trim(offset: offset, length: length, generation: generation, epoch: epoch, ifNewer: false)
    }

    /// A trim; with `ifNewer` (a resync's copy of a trimmed block) only the blocks whose
    /// generation is lower than `generation` are trimmed. Returns the blocks trimmed.
    @discardableResult
    public func trim(offset: UInt64, length: Int, generation: UInt64?, epoch: UInt64, ifNewer: Bool) throws -> Int {
        if ifNewer {
            guard let generation, generation > 0 else { throw ReplicaError.badRequest("an if-newer trim needs a generation") }
            return try trimIfNewer(offset: offset, length: length, generation: generation, epoch: epoch)
        }
        return try state.withShared { s in
            let (first, count) = try Self.checkLocked(s, offset: offset, length: length, epoch: epoch)
            if let generation, generation > BlockGenerations.maxGeneration {
                throw ReplicaError.badRequest("generation \(generation) is above the limit of \(BlockGenerations.maxGeneration)")
            }
            let generation = generation ?? s.highestGeneration.load(ordering: .relaxed)
            activity.note(offset: offset, length: length, generation: generation)
            // An absent entry would let a snapshot's data show through the trim.
            if generation == 0, !s.sealed.isEmpty {
                throw ReplicaError.badRequest("a trim over a snapshot needs a generation above 0")
            }
            if generation > 0 {
                try Self.announce(s, offset: offset, blocks: count, generation: generation, trim: true)
            }
            // Marked once done (`write`).
            defer { s.dirtyInPlace.store(true, ordering: .relaxed) }
            try regions.withRange(offset: offset, length: length) {
            let punch = FileIO.FALLOC_FL_PUNCH_HOLE | FileIO.FALLOC_FL_KEEP_SIZE
            if FileIO.fallocate(s.dataFD, mode: punch, offset: offset, length: UInt64(length)) != 0 {
                let e = errno
                guard e == EOPNOTSUPP else { throw SystemError("fallocate punch hole \(s.dataPath)", errno: e) }
                // No hole punching here: write zeros instead (space is not freed, reads stay right).
                logger.notice("filesystem cannot punch holes; trim writes zeros", metadata: ["replica.dir": "\(directory)"])
                let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: Self.blockSize)
                defer { zeros.deallocate() }
                zeros.initializeMemory(as: UInt8.self, repeating: 0)
                try FileIO.pwriteFully(s.dataFD, UnsafeRawBufferPointer(zeros), offset: offset, path: s.dataPath)
            }
            let entry = generation == 0
                ? BlockMapEntry.absent
                : BlockMapEntry(generation: generation, crc: Self.zeroBlockCRC, flags: BlockMapEntry.trimmedFlag)
            try s.blockMap.write(first: first, [BlockMapEntry](repeating: entry, count: count))
            }
            s.highestGeneration.max(generation, ordering: .relaxed)
            return count
        }
    }

    /// Trims (punch hole + trimmed entry) the runs of blocks whose generation is below
    /// `generation`, each decided under its region lock.
    private func trimIfNewer(offset: UInt64, length: Int, generation: UInt64, epoch: UInt64) throws -> Int {
        try state.withShared { s in
            let (first, count) = try Self.checkLocked(s, offset: offset, length: length, epoch: epoch)
            guard generation <= BlockGenerations.maxGeneration else {
                throw ReplicaError.badRequest("generation \(generation) is above the limit of \(BlockGenerations.maxGeneration)")
            }
            activity.note(offset: offset, length: length, generation: generation)
            let trimmed = BlockMapEntry(generation: generation, crc: Self.zeroBlockCRC, flags: BlockMapEntry.trimmedFlag)
            try Self.announce(s, offset: offset, blocks: count, generation: generation, trim: true)
            // Marked once done (`write`).
            defer { s.dirtyInPlace.store(true, ordering: .relaxed) }
            let applied = try withUnsafeTemporaryAllocation(of: BlockMapEntry.self, capacity: count) { entries in
                try regions.withRange(offset: offset, length: length) {
                    _ = try Self.resolve(s, first: first, into: entries)
                    var applied = 0
                    var i = 0
                    while i < count {
                        guard entries[i].generation < generation else { i += 1; continue }
                        var end = i
                        while end < count && entries[end].generation < generation { end += 1 }
                        let start = offset + UInt64(i * Self.blockSize)
                        let bytes = (end - i) * Self.blockSize
                        let punch = FileIO.FALLOC_FL_PUNCH_HOLE | FileIO.FALLOC_FL_KEEP_SIZE
                        if FileIO.fallocate(s.dataFD, mode: punch, offset: start, length: UInt64(bytes)) != 0 {
                            let e = errno
                            guard e == EOPNOTSUPP else { throw SystemError("fallocate punch hole \(s.dataPath)", errno: e) }
                            let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: Self.blockSize)
                            defer { zeros.deallocate() }
                            zeros.initializeMemory(as: UInt8.self, repeating: 0)
                            try FileIO.pwriteFully(s.dataFD, UnsafeRawBufferPointer(zeros), offset: start, path: s.dataPath)
                        }
                        try s.blockMap.write(first: first + UInt64(i), [BlockMapEntry](repeating: trimmed, count: end - i))
                        applied += end - i
                        i = end
                    }
                    return applied
                }
            }
            if applied > 0 { s.highestGeneration.max(generation, ordering: .relaxed) }
            return applied
        }
    }

    /// Grows the replica to `newSize` (a multiple of the block size, not smaller than now;
    /// the same size is a no-op): the superblock first, then the head's files (sparse).
    public func grow(to newSize: UInt64, epoch: UInt64) throws {
        try state.withLock { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            guard newSize % UInt64(Self.blockSize) == 0 else {
                throw ReplicaError.badRequest("size \(newSize) is not a multiple of \(Self.blockSize)")
            }
            guard newSize >= s.superblock.size else {
                throw ReplicaError.badRequest("cannot shrink from \(s.superblock.size) to \(newSize)")
            }
            guard newSize <= UInt64(Int64.max / 2) else { throw ReplicaError.badRequest("size \(newSize) is too large") }
            guard newSize > s.superblock.size else { return }
            var next = s.superblock
            next.size = newSize
            try next.write(directory: directory)
            s.superblock = next
            guard ftruncate(s.dataFD, off_t(newSize)) == 0 else { throw SystemError("ftruncate \(s.dataPath)", errno: errno) }
            try s.blockMap.ensureCapacity(blocks: newSize / UInt64(Self.blockSize))
            logger.info("replica grown", metadata: ["volume.id": "\(volumeID)", "replica.size": "\(newSize)"])
        }
    }

    /// Records `epoch` as the highest seen (persisted before returning). The same epoch again
    /// is a no-op; a lower one is `staleEpoch`.
    /// The `activity` op: settles what the engine says is settled and reports what is not
    /// (`ActivityLog`). Epoch-checked like every data op: a fenced engine cannot clear it.
    public func activity(cleanThrough: UInt64, converged: Bool, epoch: UInt64) throws -> ReplicaActivity {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            return activity.settle(cleanThrough: cleanThrough, converged: converged)
        }
    }

    public func claim(epoch: UInt64) throws {
        try state.withLock { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            guard epoch > s.superblock.epoch else { return }
            var next = s.superblock
            next.epoch = epoch
            try next.write(directory: directory)
            s.superblock = next
            logger.info("replica epoch claimed", metadata: ["volume.id": "\(volumeID)", "replica.epoch": "\(epoch)"])
        }
    }

    public var status: ReplicaStatus {
        state.withShared { s in
            ReplicaStatus(volumeID: s.superblock.volumeID, size: s.superblock.size, blockSize: s.superblock.blockSize,
                          epoch: s.superblock.epoch,
                          flushedGeneration: max(s.superblock.flushedGeneration, s.flushedGeneration.load(ordering: .relaxed)),
                          highestGeneration: s.highestGeneration.load(ordering: .relaxed))
        }
    }

    /// The blocks (ascending) whose entry in any layer has a generation > `generation`, trims
    /// included: what a replica that left at flushed generation `generation` must fetch. (A
    /// newer layer's entries are newer than an older one's, so a block newer in a sealed layer
    /// is newer in the volume too.)
    public func blocksNewer(than generation: UInt64) throws -> [UInt64] {
        try state.withLock { s in
            try Self.checkOpenLocked(s)
            var blocks = Set<UInt64>()
            for layer in s.sealed + [s.head] {
                try layer.blockMap.forEachPresent(blocks: s.superblock.size / UInt64(Self.blockSize)) { block, entry in
                    if entry.generation > generation { blocks.insert(block) }
                }
            }
            return blocks.sorted()
        }
    }

    // MARK: helpers (called with the lock held, shared or exclusive)

    static let zeroBlockCRC: UInt32 = [UInt8](repeating: 0, count: blockSize).withUnsafeBytes { CRC32C.checksum($0) }

    /// A `generations` request's block count: 1...`FrameLimits.maxGenerationsCount`.
    static func checkGenerationsCount(_ count: Int) throws {
        guard count >= 1, count <= FrameLimits.maxGenerationsCount else {
            throw ReplicaError.badRequest("generations count \(count) is outside 1...\(FrameLimits.maxGenerationsCount); ask in smaller ranges")
        }
    }

    /// A write's generation: 1...`BlockGenerations.maxGeneration` (0 means "never written";
    /// bit 63 marks a trim in `generations`).
    private static func checkGeneration(_ generation: UInt64) throws {
        guard generation > 0 else { throw ReplicaError.badRequest("generation must be greater than 0") }
        guard generation <= BlockGenerations.maxGeneration else {
            throw ReplicaError.badRequest("generation \(generation) is above the limit of \(BlockGenerations.maxGeneration)")
        }
    }

    /// `data` itself when it is 4 KiB-aligned (O_DIRECT can use it), else a copy in the
    /// calling thread's aligned scratch buffer.
    private static func alignedSource(_ data: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        if Int(bitPattern: data.baseAddress) % blockSize == 0 { return data }
        let scratch = AlignedScratch.buffer(data.count)
        scratch.copyMemory(from: data)
        return UnsafeRawBufferPointer(scratch)
    }

    /// An in-place write of the head announced by an intent (Journal.swift), both submitted to
    /// the device together (`cdio_write_pair`: one round trip, not an intent and then the
    /// data). Together is as safe as one after the other: the intent only has to be there when
    /// the process dies between the data and its block-map entries, and once submitted both
    /// complete whatever happens to the process; neither is durable before a flush either way.
    /// Without room in the journal the data goes alone.
    static func writeAnnounced(_ s: State, offset: UInt64, blocks: Int, generation: UInt64, data: UnsafeRawBufferPointer) throws {
        guard let (at, header) = s.journal.prepareIntent(layer: s.head.id, offset: offset, blocks: blocks, generation: generation,
                                                         flushedGeneration: s.flushedGeneration.load(ordering: .relaxed)) else {
            try FileIO.pwriteFully(s.dataFD, data, offset: offset, path: s.dataPath)
            return
        }
        defer { header.deallocate() }
        let rc = cdio_write_pair(s.journal.fd, header.baseAddress, header.count, nil, 0, Int64(at),
                                 s.dataFD, data.baseAddress, data.count, Int64(offset))
        if rc != 0 {
            s.journal.recordFailed()
            throw SystemError("write \(s.dataPath) and its intent in \(s.journal.path)", errno: -rc)
        }
    }

    /// An intent in the journal before an in-place write or trim of the head (Journal.swift):
    /// a process killed between its data and its entries then leaves an unacknowledged version.
    static func announce(_ s: State, offset: UInt64, blocks: Int, generation: UInt64, trim: Bool = false) throws {
        _ = try s.journal.appendIntent(layer: s.head.id, offset: offset, blocks: blocks, generation: generation,
                                       flushedGeneration: s.flushedGeneration.load(ordering: .relaxed), trim: trim)
    }

    static func checkOpenLocked(_ s: State) throws {
        if s.isClosed { throw ReplicaError.closed }
    }

    static func checkEpochLocked(_ s: State, _ epoch: UInt64) throws {
        if epoch < s.superblock.epoch { throw ReplicaError.staleEpoch(seen: s.superblock.epoch, got: epoch) }
    }

    /// Validates an I/O range and the epoch; returns (first block, block count).
    private static func checkLocked(_ s: State, offset: UInt64, length: Int, epoch: UInt64) throws -> (UInt64, Int) {
        try checkOpenLocked(s)
        try checkEpochLocked(s, epoch)
        return try checkRange(offset: offset, length: length, size: s.superblock.size, what: "the replica")
    }

    /// Validates an I/O range of whole blocks, at most `maxRequestLength`, within `size` bytes
    /// (`what`'s: the replica, a snapshot); returns (first block, block count).
    static func checkRange(offset: UInt64, length: Int, size: UInt64, what: String) throws -> (UInt64, Int) {
        let bs = UInt64(blockSize)
        guard offset % bs == 0 else { throw ReplicaError.badRequest("offset \(offset) is not a multiple of \(blockSize)") }
        guard length > 0, length % blockSize == 0 else {
            throw ReplicaError.badRequest("length \(length) is not a positive multiple of \(blockSize)")
        }
        guard length <= maxRequestLength else {
            throw ReplicaError.badRequest("length \(length) is above the per-request limit of \(maxRequestLength)")
        }
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        guard !overflow, end <= size else {
            throw ReplicaError.badRequest("range \(offset)+\(length) is beyond \(what)'s size \(size)")
        }
        return (offset / bs, length / blockSize)
    }

    /// A checkpoint (the exclusive lock held: nothing in flight): the data file and the block
    /// map synced, then the journal started over with the flushed generation in its header —
    /// `through` if given, else the highest generation written. The superblock keeps the
    /// flushed generation it had; snapshots, close and claims write theirs.
    static func flushLocked(_ s: State, directory: String, through: UInt64? = nil) throws {
        try checkOpenLocked(s)
        s.dirtyInPlace.store(false, ordering: .relaxed)
        do {
            guard fdatasync(s.dataFD) == 0 else { throw SystemError("fdatasync \(s.dataPath)", errno: errno) }
            try s.blockMap.sync()
        } catch {
            s.dirtyInPlace.store(true, ordering: .relaxed)
            throw error
        }
        let flushed = max(s.flushedGeneration.load(ordering: .relaxed), through ?? s.highestGeneration.load(ordering: .relaxed))
        try s.journal.reset(flushed: flushed)
        s.flushedGeneration.max(flushed, ordering: .relaxed)
        s.superblock.flushedGeneration = max(s.superblock.flushedGeneration, flushed)
    }

    /// Reads `buffer.count` bytes of blocks from `first` (a hole reads as zeros).
    static func readBlocks(fd: Int32, path: String, first: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let n = try FileIO.preadFully(fd, buffer, offset: first * UInt64(blockSize), path: path)
        if n < buffer.count {
            (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
    }

    /// Opens a data file O_DIRECT, or without it (logged) where the filesystem refuses it, and
    /// takes an exclusive flock on it: one store per replica, so two never interleave writes or
    /// superblock updates (the lock goes with the descriptor, so a crashed holder releases it).
    static func openData(_ path: String, create: Bool, logger: Logger) throws -> (Int32, Bool) {
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0)
        var fd = Glibc.open(path, flags | FileIO.O_DIRECT, 0o600)
        var direct = true
        if fd < 0 {
            let e = errno
            guard e == EINVAL || e == EOPNOTSUPP else { throw SystemError("open \(path)", errno: e) }
            logger.notice("filesystem refuses O_DIRECT; the replica's data goes through the page cache",
                          metadata: ["replica.data": "\(path)", "errno": "\(e)"])
            fd = Glibc.open(path, flags, 0o600)
            guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
            direct = false
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            _ = Glibc.close(fd)
            if e == EWOULDBLOCK { throw ReplicaError.inUse(path) }
            throw SystemError("flock \(path)", errno: e)
        }
        return (fd, direct)
    }

    static func makeDirectory(_ path: String) throws {
        if mkdir(path, 0o700) != 0, errno != EEXIST { throw SystemError("mkdir \(path)", errno: errno) }
    }
}
