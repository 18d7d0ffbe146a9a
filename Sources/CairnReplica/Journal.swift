// The replica's journal (docs/replica-format.md, "Journal"): a preallocated file beside the
// superblock where every small write is also appended — a 4 KiB record header naming the layer,
// offset, generation and each block's crc32c, then the data — so that a flush is one fdatasync
// of this file instead of syncing the sparse data file, the block map and a rewritten
// superblock. The data and the block map are still written in place (reads use them); they are
// made durable together, rarely, at a checkpoint, after which the journal starts over.
//
// Crash rule: at open, the records from the journal's start are replayed in order while each is
// whole (header checksum, every block's checksum, the expected sequence number); the first that
// is not ends the replay. A flush that returned covered every record written before it, so all
// of them are in that unbroken prefix. A record is applied to a block only when it is not older
// than what the block map holds (the newest version wins; a same-generation trim is not undone).

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CDirectIO
import Synchronization

/// One replica's journal file. Appends run concurrently (each reserves its own range with one
/// compare-exchange, then writes with one pwritev outside it); `sync` is the flush's one fdatasync.
final class Journal: Sendable {
    static let fileName = "journal"
    static let magic: [UInt8] = Array("CAIRNJL1".utf8)
    static let recordMagic: UInt64 = 0x4452_4345_524A_4E43  // "CNJRECRD" little-endian
    /// An intent: a header alone, written before an in-place write or trim of a range (large
    /// writes, trims, resync and repair copies). If the process dies between that data and its
    /// block-map entries, replay finds the blocks whose data no longer matches an older entry
    /// and records what they hold at the intent's generation, instead of leaving a checksum
    /// mismatch that would read as corruption.
    static let intentMagic: UInt64 = 0x544E_544E_494A_4E43  // "CNJINTNT" little-endian
    /// The most blocks one intent names (64 MiB: the store's largest request).
    static let maxIntentBlocks = 1 << 14
    /// In an intent's block count: the intent is a trim's.
    static let trimBit: UInt32 = 1 << 31
    static let blockSize = 4096
    /// Writes up to this long are journaled; longer ones go in place only (the flush then syncs
    /// the data file and the block map as well).
    static let smallWriteLimit = 256 << 10
    /// Header fields before the per-block checksums: magic, seq, layer, offset, generation,
    /// flushed generation, block count, the cycle's nonce.
    static let headerFixed = 8 + 8 + 8 + 8 + 8 + 8 + 4 + 8
    static let maxBlocksPerRecord = (blockSize - headerFixed - 4) / 4
    /// `CAIRN_REPLICA_JOURNAL=off` writes everything in place only (flushes then sync the data
    /// file and the block map, as before the journal): an escape hatch, and the comparison
    /// `cairn replica latency` measures.
    static let enabled: Bool = getenv("CAIRN_REPLICA_JOURNAL").map { String(cString: $0) != "off" } ?? true

    /// The journal's size for a replica of `volumeSize` bytes: an eighth of it, 1–64 MiB (a small volume need not pay a large one).
    static func capacity(forVolumeSize volumeSize: UInt64) -> UInt64 {
        min(64 << 20, max(1 << 20, (volumeSize / 8) & ~UInt64(blockSize - 1)))
    }

    let fd: Int32
    let path: String
    let capacity: UInt64

    /// Where records go, without a lock (appends run on many threads at once): one atomic
    /// word, the records reserved this cycle in its high 32 bits and the next record's block
    /// (block 0 is the journal's header) in its low 32. A reservation is one compare-exchange
    /// that advances both, so the sequence numbers follow the order of the file.
    let cursor: Atomic<UInt64>
    /// The sequence number of this cycle's first record (a record's is this plus its index in
    /// the cycle). Changed only by `reset`, when no append runs (the store's exclusive lock).
    let cycleSeq: Atomic<UInt64>
    /// Random per cycle, in the header and every record: replay skipping a hole accepts only
    /// this cycle's records, never a copy of a record inside someone's data. Changed only by
    /// `reset`, as `cycleSeq`.
    let cycleNonce: Atomic<UInt64>
    static let cursorBlockMask: UInt64 = 0xFFFF_FFFF

    static func cursorWord(records: UInt64, nextBlock: UInt64) -> UInt64 { records << 32 | nextBlock }

    /// Records were reserved since the last sync (set at reservation: a flush first drains the
    /// appends in flight under the store's exclusive lock, so each one set before is written).
    let unsynced = Atomic<Bool>(false)
    /// An append failed after its range was reserved: the record sequence has a hole, so what
    /// follows it would not be replayed. No more appends; the next flush checkpoints (syncs
    /// everything in place) and starts the journal over.
    let broken = Atomic<Bool>(false)

    private init(fd: Int32, path: String, capacity: UInt64, next: UInt64, seq: UInt64, nonce: UInt64) {
        self.fd = fd
        self.path = path
        self.capacity = capacity
        precondition(capacity / UInt64(Self.blockSize) <= Self.cursorBlockMask, "journal too large for its cursor")
        self.cursor = Atomic(Self.cursorWord(records: 0, nextBlock: next / UInt64(Self.blockSize)))
        self.cycleSeq = Atomic(seq)
        self.cycleNonce = Atomic(nonce)
    }

    deinit { _ = Glibc.close(fd) }

    /// Bytes of records since the start (what a checkpoint frees).
    var used: UInt64 { ((cursor.load(ordering: .relaxed) & Self.cursorBlockMask) - 1) * UInt64(Self.blockSize) }

    // MARK: opening

    /// Opens `<directory>/journal`, making it (preallocated to `capacity`, empty) if it is
    /// missing, the wrong size or unreadable. Returns the journal and its records, which the
    /// caller replays and then discards with `reset()`, and the flushed generation the header
    /// recorded at the last checkpoint.
    static func open(directory: String, capacity: UInt64, replay: Bool) throws -> (Journal, [Record], UInt64) {
        let path = directory + "/" + fileName
        var fd = Glibc.open(path, O_RDWR | O_CLOEXEC | FileIO.O_DIRECT)
        if fd < 0 && (errno == EINVAL || errno == EOPNOTSUPP) { fd = Glibc.open(path, O_RDWR | O_CLOEXEC) }
        if fd >= 0 {
            var st = stat()
            if fstat(fd, &st) == 0, st.st_size >= Int(2 * blockSize),
               let (startSeq, flushed, nonce) = try? readHeader(fd: fd, path: path) {
                let size = UInt64(st.st_size)
                let records = replay ? try scan(fd: fd, path: path, size: size, startSeq: startSeq, nonce: nonce) : []
                let lastSeq = records.last?.seq ?? (startSeq &- 1)
                // The next cycle's numbers start past anything this one may hold (a record
                // after the replayed prefix may be whole), so none is taken for the new cycle's.
                let journal = Journal(fd: fd, path: path, capacity: size,
                                      next: UInt64(blockSize), seq: lastSeq &+ 1 &+ size / UInt64(blockSize), nonce: nonce)
                return (journal, records, flushed)
            }
            _ = Glibc.close(fd)
            // A torn or foreign file: nothing in it can be trusted, and nothing needs to be (a
            // journal that was never whole was never synced by a flush). Made anew below.
        }
        return (try create(directory: directory, capacity: capacity, startSeq: 1, flushed: 0), [], 0)
    }

    /// Makes a new, empty journal (replacing any file there) and syncs it and its directory.
    static func create(directory: String, capacity: UInt64, startSeq: UInt64, flushed: UInt64) throws -> Journal {
        let path = directory + "/" + fileName
        let tmp = path + ".tmp"
        _ = unlink(tmp)
        var fd = Glibc.open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | FileIO.O_DIRECT, 0o600)
        if fd < 0 && (errno == EINVAL || errno == EOPNOTSUPP) { fd = Glibc.open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        guard fd >= 0 else { throw SystemError("open \(tmp)", errno: errno) }
        do {
            let rc = posix_fallocate(fd, 0, off_t(capacity))
            if rc != 0 {
                // Filesystems without fallocate: a sized (sparse) file still works, only slower.
                guard rc == EOPNOTSUPP || rc == EINVAL, ftruncate(fd, off_t(capacity)) == 0 else {
                    throw SystemError("fallocate \(tmp) to \(capacity) bytes", errno: rc == 0 ? errno : rc)
                }
            }
            try fillWithZeros(fd: fd, capacity: capacity, path: tmp)
            let nonce = UInt64.random(in: 1...UInt64.max)
            let journal = Journal(fd: fd, path: path, capacity: capacity,
                                  next: UInt64(blockSize), seq: startSeq, nonce: nonce)
            try journal.writeHeader(startSeq: startSeq, flushed: flushed, nonce: nonce)
            guard fsync(fd) == 0 else { throw SystemError("fsync \(tmp)", errno: errno) }
            guard rename(tmp, path) == 0 else { throw SystemError("rename \(tmp)", errno: errno) }
            try FileIO.fsyncDirectory(directory)
            return journal
        } catch {
            _ = Glibc.close(fd)
            _ = unlink(tmp)
            throw error
        }
    }

    /// Writes zeros over the whole file once, at creation. fallocate leaves *unwritten* extents:
    /// the first append into each would make its fdatasync also commit the extent's conversion
    /// to written (a filesystem journal commit per flush), which doubled a fresh replica's
    /// write+fdatasync latency until the journal had gone round once. Written extents make an
    /// append's fdatasync a data write only. (≤ 64 MiB, once per replica.)
    private static func fillWithZeros(fd: Int32, capacity: UInt64, path: String) throws {
        let chunk = 1 << 20
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: blockSize)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var offset: UInt64 = 0
        while offset < capacity {
            let length = Int(min(UInt64(chunk), capacity - offset))
            try FileIO.pwriteFully(fd, UnsafeRawBufferPointer(rebasing: zeros[0..<length]), offset: offset, path: path)
            offset += UInt64(length)
        }
    }

    /// The header: magic | first record's sequence number u64 | flushed generation u64 | nonce
    /// u64 | crc32c.
    private static func readHeader(fd: Int32, path: String) throws -> (UInt64, UInt64, UInt64)? {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: blockSize)
        defer { buffer.deallocate() }
        guard try FileIO.preadFully(fd, buffer, offset: 0, path: path) == blockSize else { return nil }
        guard buffer.prefix(8).elementsEqual(magic) else { return nil }
        let startSeq = buffer.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
        let flushed = buffer.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian
        let nonce = buffer.loadUnaligned(fromByteOffset: 24, as: UInt64.self).littleEndian
        let stored = buffer.loadUnaligned(fromByteOffset: 32, as: UInt32.self).littleEndian
        guard stored == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buffer[0..<32])) else { return nil }
        return (startSeq, flushed, nonce)
    }

    private func writeHeader(startSeq: UInt64, flushed: UInt64, nonce: UInt64) throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.blockSize, alignment: Self.blockSize)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        buffer.copyBytes(from: Self.magic)
        buffer.storeBytes(of: startSeq.littleEndian, toByteOffset: 8, as: UInt64.self)
        buffer.storeBytes(of: flushed.littleEndian, toByteOffset: 16, as: UInt64.self)
        buffer.storeBytes(of: nonce.littleEndian, toByteOffset: 24, as: UInt64.self)
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buffer[0..<32]))
        buffer.storeBytes(of: crc.littleEndian, toByteOffset: 32, as: UInt32.self)
        try FileIO.pwriteFully(fd, UnsafeRawBufferPointer(buffer), offset: 0, path: path)
    }

    // MARK: records

    /// A whole record found at open.
    struct Record: Sendable, Equatable {
        var seq: UInt64
        var layer: UInt64
        var offset: UInt64
        var generation: UInt64
        /// The replica's flushed generation when the record was written (durable with it).
        var flushedGeneration: UInt64
        var crcs: [UInt32]
        /// Where the record's data starts in the journal file.
        var dataOffset: UInt64
        /// An intent (no data): the range `offset`, `blocks` blocks, written in place at `generation`.
        var intentBlocks = 0
        var isIntent: Bool { intentBlocks > 0 }
        /// The intent announces a trim: blocks found zeroed become trimmed entries.
        var intentIsTrim = false
    }

    /// The whole records of this cycle, in order. A hole — a range reserved by a write the
    /// process did not get to issue before it died — is skipped by looking for the next of this
    /// cycle's records (its nonce, a higher sequence number, a valid checksum) at each 4 KiB
    /// boundary after it. No flush covered anything from the first hole on (a flush drains
    /// every append before it syncs), so those records are unacknowledged-or-unflushed writes:
    /// applying them is allowed, and it keeps a block whose in-place copy landed consistent
    /// with its block-map entry.
    private static func scan(fd: Int32, path: String, size: UInt64, startSeq: UInt64, nonce: UInt64) throws -> [Record] {
        var records: [Record] = []
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: blockSize)
        defer { header.deallocate() }
        var data = UnsafeMutableRawBufferPointer.allocate(byteCount: smallWriteLimit, alignment: blockSize)
        defer { data.deallocate() }
        let maxGap = size / UInt64(blockSize)

        /// The record at `at` if it is whole and its sequence number is acceptable; its size.
        func parse(at: UInt64, accept: (UInt64) -> Bool) throws -> (Record, UInt64)? {
            guard at + UInt64(blockSize) <= size,
                  try FileIO.preadFully(fd, header, offset: at, path: path) == blockSize else { return nil }
            let magic = header.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
            let seq = header.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
            guard magic == recordMagic || magic == intentMagic, accept(seq),
                  header.loadUnaligned(fromByteOffset: 52, as: UInt64.self).littleEndian == nonce else { return nil }
            let word = header.loadUnaligned(fromByteOffset: 48, as: UInt32.self).littleEndian
            var record = Record(
                seq: seq,
                layer: header.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian,
                offset: header.loadUnaligned(fromByteOffset: 24, as: UInt64.self).littleEndian,
                generation: header.loadUnaligned(fromByteOffset: 32, as: UInt64.self).littleEndian,
                flushedGeneration: header.loadUnaligned(fromByteOffset: 40, as: UInt64.self).littleEndian,
                crcs: [], dataOffset: 0)
            if magic == intentMagic {
                let blocks = Int(word & ~Self.trimBit)
                let stored = header.loadUnaligned(fromByteOffset: headerFixed, as: UInt32.self).littleEndian
                guard blocks >= 1, blocks <= maxIntentBlocks,
                      stored == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[0..<headerFixed])) else { return nil }
                record.intentBlocks = blocks
                record.intentIsTrim = word & Self.trimBit != 0
                return (record, UInt64(blockSize))
            }
            let count = Int(word)
            guard count >= 1, count <= maxBlocksPerRecord else { return nil }
            let crcEnd = headerFixed + 4 * count
            let stored = header.loadUnaligned(fromByteOffset: crcEnd, as: UInt32.self).littleEndian
            guard stored == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[0..<crcEnd])) else { return nil }
            let length = count * blockSize
            guard at + UInt64(blockSize) + UInt64(length) <= size else { return nil }
            if length > data.count {
                data.deallocate()
                data = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: blockSize)
            }
            let body = UnsafeMutableRawBufferPointer(rebasing: data[0..<length])
            guard try FileIO.preadFully(fd, body, offset: at + UInt64(blockSize), path: path) == length else { return nil }
            record.crcs.reserveCapacity(count)
            for i in 0..<count {
                let crc = header.loadUnaligned(fromByteOffset: headerFixed + 4 * i, as: UInt32.self).littleEndian
                let block = UnsafeRawBufferPointer(rebasing: body[(i * blockSize)..<((i + 1) * blockSize)])
                guard CRC32C.checksum(block) == crc else { return nil }
                record.crcs.append(crc)
            }
            record.dataOffset = at + UInt64(blockSize)
            return (record, UInt64(blockSize + length))
        }

        var at = UInt64(blockSize)
        var expected = startSeq
        while at + UInt64(blockSize) <= size {
            if let (record, length) = try parse(at: at, accept: { $0 == expected }) {
                records.append(record)
                at += length
                expected = record.seq &+ 1
                continue
            }
            // A hole: the next of this cycle's records after it, if any.
            var probe = at + UInt64(blockSize)
            var found: (Record, UInt64, UInt64)?
            while probe + UInt64(blockSize) <= size {
                if let (record, length) = try parse(at: probe, accept: { $0 > expected && $0 - expected <= maxGap }) {
                    found = (record, length, probe)
                    break
                }
                probe += UInt64(blockSize)
            }
            guard let (record, length, where_) = found else { break }
            records.append(record)
            at = where_ + length
            expected = record.seq &+ 1
        }
        return records
    }

    /// Reads a record's data (its blocks, checked again: the file was read once already).
    func readData(of record: Record, into buffer: UnsafeMutableRawBufferPointer) throws {
        let n = try FileIO.preadFully(fd, buffer, offset: record.dataOffset, path: path)
        guard n == buffer.count else { throw ReplicaError.badRequest("journal record \(record.seq) is short") }
    }

    /// Appends one write's record — `data` is whole blocks, 4 KiB-aligned in memory, and its
    /// blocks' checksums are `entries`' crcs — and writes the same data in place (`inPlace` at
    /// `offset`), both in flight together (`cdio_write_pair`). Returns false — nothing written —
    /// when the journal is off, broken or has no room left (the caller writes in place only and
    /// the next flush checkpoints).
    func append(layer: UInt64, offset: UInt64, generation: UInt64, flushedGeneration: UInt64,
                data: UnsafeRawBufferPointer, entries: UnsafeBufferPointer<BlockMapEntry>,
                inPlace: (fd: Int32, path: String)) throws -> Bool {
        guard let (at, header) = prepareRecord(layer: layer, offset: offset, generation: generation,
                                               flushedGeneration: flushedGeneration, dataCount: data.count, entries: entries)
        else { return false }
        defer { header.deallocate() }
        try writing {
            let rc = cdio_write_pair(fd, header.baseAddress, header.count, data.baseAddress, data.count, Int64(at),
                                     inPlace.fd, data.baseAddress, data.count, Int64(offset))
            if rc != 0 { throw SystemError("write \(inPlace.path) and \(path)", errno: -rc) }
        }
        recordWritten()
        return true
    }

    /// A record's write has completed: the next `sync` must not be skipped. Marked only now, not
    /// when its place is reserved: a sync running while the record is in flight would take the
    /// mark, and its fdatasync need not cover a write that completes after it began. Intents do
    /// not mark: a flush makes the in-place write an intent announces durable itself (the data
    /// file and the block map), after which the intent says nothing recovery needs.
    func recordWritten() { unsynced.store(true, ordering: .releasing) }

    /// Tests only: runs after a record's place is reserved and before it is written (a flush's
    /// sync that lands in between).
    nonisolated(unsafe) static var afterReservingARecordForTesting: ((Journal) -> Void)?

    /// Reserves and fills in the header of a record for `dataCount` bytes with `entries`'
    /// checksums, for a caller that writes it — the header, then the data, at `at` — together
    /// with other writes (`ReplicaStore.writeGroup`), deallocates the header, and calls
    /// `recordFailed` if that write fails. Nil (nothing reserved) when the journal is off,
    /// broken or full, or the write is too long for one record.
    func prepareRecord(layer: UInt64, offset: UInt64, generation: UInt64, flushedGeneration: UInt64, dataCount: Int,
                       entries: UnsafeBufferPointer<BlockMapEntry>) -> (at: UInt64, header: UnsafeMutableRawBufferPointer)? {
        let count = entries.count
        guard count <= Self.maxBlocksPerRecord, dataCount == count * Self.blockSize,
              let (at, header) = reserve(size: UInt64(Self.blockSize + dataCount), magic: Self.recordMagic, layer: layer,
                                         offset: offset, generation: generation, flushedGeneration: flushedGeneration,
                                         word: UInt32(count))
        else { return nil }
        for (i, e) in entries.enumerated() {
            header.storeBytes(of: e.crc.littleEndian, toByteOffset: Self.headerFixed + 4 * i, as: UInt32.self)
        }
        let crcEnd = Self.headerFixed + 4 * count
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[0..<crcEnd]))
        header.storeBytes(of: crc.littleEndian, toByteOffset: crcEnd, as: UInt32.self)
        if let hook = Self.afterReservingARecordForTesting { hook(self) }
        return (at, header)
    }

    /// A prepared record was not written whole: the sequence has a hole, so the journal takes
    /// no more records until the next checkpoint.
    func recordFailed() { broken.store(true, ordering: .relaxed) }

    /// Appends an intent for an in-place write or trim of `blocks` blocks from `offset` at
    /// `generation` (before the data changes). False — nothing written — when the journal is
    /// full, off or broken (the in-place write then goes ahead without one).
    func appendIntent(layer: UInt64, offset: UInt64, blocks: Int, generation: UInt64, flushedGeneration: UInt64,
                      trim: Bool = false) throws -> Bool {
        guard let (at, header) = prepareIntent(layer: layer, offset: offset, blocks: blocks, generation: generation,
                                               flushedGeneration: flushedGeneration, trim: trim)
        else { return false }
        defer { header.deallocate() }
        try writing { try FileIO.pwriteFully(fd, UnsafeRawBufferPointer(header), offset: at, path: path) }
        return true
    }

    /// Reserves and fills in an intent (as `appendIntent` writes it) for a caller that writes
    /// it at `at` together with the in-place write it announces (`ReplicaStore.writeAnnounced`,
    /// `writeGroup`), deallocates it, and calls `recordFailed` if that write fails. Nil when
    /// the journal is off, broken or full.
    func prepareIntent(layer: UInt64, offset: UInt64, blocks: Int, generation: UInt64, flushedGeneration: UInt64,
                       trim: Bool = false) -> (at: UInt64, header: UnsafeMutableRawBufferPointer)? {
        guard blocks >= 1, blocks <= Self.maxIntentBlocks,
              let (at, header) = reserve(size: UInt64(Self.blockSize), magic: Self.intentMagic, layer: layer, offset: offset,
                                         generation: generation, flushedGeneration: flushedGeneration,
                                         word: UInt32(blocks) | (trim ? Self.trimBit : 0))
        else { return nil }
        let crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: header[0..<Self.headerFixed]))
        header.storeBytes(of: crc.littleEndian, toByteOffset: Self.headerFixed, as: UInt32.self)
        return (at, header)
    }

    /// Reserves `size` bytes of the journal for the next record (nil when the journal is off,
    /// broken or full) and returns where, with a 4 KiB header holding the fixed fields (the
    /// caller adds its checksums and deallocates it).
    private func reserve(size: UInt64, magic: UInt64, layer: UInt64, offset: UInt64, generation: UInt64,
                         flushedGeneration: UInt64, word: UInt32) -> (UInt64, UnsafeMutableRawBufferPointer)? {
        guard Self.enabled, !broken.load(ordering: .relaxed) else { return nil }
        precondition(size > 0 && size % UInt64(Self.blockSize) == 0, "a journal record is whole blocks")
        let blocks = size / UInt64(Self.blockSize)
        let capacityBlocks = capacity / UInt64(Self.blockSize)
        var current = cursor.load(ordering: .relaxed)
        var index: UInt64
        var nextBlock: UInt64
        while true {
            index = current >> 32
            nextBlock = current & Self.cursorBlockMask
            guard nextBlock + blocks <= capacityBlocks else { return nil }
            let (exchanged, original) = cursor.compareExchange(
                expected: current, desired: Self.cursorWord(records: index + 1, nextBlock: nextBlock + blocks),
                ordering: .relaxed)
            if exchanged { break }
            current = original
        }
        let at = nextBlock * UInt64(Self.blockSize)
        let seq = cycleSeq.load(ordering: .relaxed) &+ index
        let nonce = cycleNonce.load(ordering: .relaxed)
        let header = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.blockSize, alignment: Self.blockSize)
        header.initializeMemory(as: UInt8.self, repeating: 0)
        header.storeBytes(of: magic.littleEndian, toByteOffset: 0, as: UInt64.self)
        header.storeBytes(of: seq.littleEndian, toByteOffset: 8, as: UInt64.self)
        header.storeBytes(of: layer.littleEndian, toByteOffset: 16, as: UInt64.self)
        header.storeBytes(of: offset.littleEndian, toByteOffset: 24, as: UInt64.self)
        header.storeBytes(of: generation.littleEndian, toByteOffset: 32, as: UInt64.self)
        header.storeBytes(of: flushedGeneration.littleEndian, toByteOffset: 40, as: UInt64.self)
        header.storeBytes(of: word.littleEndian, toByteOffset: 48, as: UInt32.self)
        header.storeBytes(of: nonce.littleEndian, toByteOffset: 52, as: UInt64.self)
        return (at, header)
    }

    /// Runs a reserved record's write; a failure leaves a hole in the sequence, so the journal
    /// takes no more records until the next checkpoint.
    private func writing(_ body: () throws -> Void) throws {
        do { try body() } catch {
            broken.store(true, ordering: .relaxed)
            throw error
        }
    }

    /// Past 3/4 full: the next flush checkpoints (and a durable write does not say it is
    /// durable, so that flush comes).
    var dueForCheckpoint: Bool { used * 4 >= capacity * 3 }

    /// A durable write's sync: every record whose write has completed is durable after it. It
    /// leaves `unsynced` alone — records still being written by other threads are not covered,
    /// so the next flush must still sync.
    func syncRecords() throws {
        if fdatasync(fd) != 0 { throw SystemError("fdatasync \(path)", errno: errno) }
    }

    /// Makes every record appended so far durable: the flush's one fdatasync (none when nothing
    /// was appended since the last).
    func sync() throws {
        guard unsynced.exchange(false, ordering: .acquiringAndReleasing) else { return }
        if fdatasync(fd) != 0 {
            let e = errno
            unsynced.store(true, ordering: .relaxed)
            throw SystemError("fdatasync \(path)", errno: e)
        }
    }

    /// Starts the journal over (a checkpoint: everything it held is durable in place). Only
    /// with no append running (the store's exclusive lock). The new header is synced before the
    /// space is reused, so a crash never replays an older cycle's records as this one's.
    /// `flushed` is the replica's flushed generation, kept in the header (the records that
    /// carried it are gone).
    func reset(flushed: UInt64) throws {
        let start = cycleSeq.load(ordering: .relaxed) &+ (cursor.load(ordering: .relaxed) >> 32)
        let nonce = UInt64.random(in: 1...UInt64.max)
        try writeHeader(startSeq: start, flushed: flushed, nonce: nonce)
        guard fdatasync(fd) == 0 else { throw SystemError("fdatasync \(path)", errno: errno) }
        cycleSeq.store(start, ordering: .relaxed)
        cycleNonce.store(nonce, ordering: .relaxed)
        cursor.store(Self.cursorWord(records: 0, nextBlock: 1), ordering: .relaxed)
        unsynced.store(false, ordering: .relaxed)
        broken.store(false, ordering: .relaxed)
    }
}
