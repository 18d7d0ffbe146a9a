// The replica's layer chain (docs/replica-format.md, "Snapshots and clones"): copy-on-write
// snapshots, their deletion by merging, and clones that share sealed layers by hard link.
//
// Rules this file keeps:
// - Only the head layer takes writes and trims. A snapshot flushes the head, seals it and starts
//   a new empty head; the superblock rename is the commit point (a crash before it leaves the
//   old chain, and the half-made snapshot is forgotten at the next open).
// - A read takes, per block, the newest layer whose entry is present (generation ≠ 0); a trim in
//   a newer layer hides older data. `generations`, `summary` and `verify` report the same
//   effective entry, so a resync or a scrub sees the volume, not one layer.
// - Deleting a snapshot merges its layer L into the next newer one, N: only blocks N has no
//   entry for (neither written nor trimmed there) are copied, so N's effective content — what a
//   read of N's position in the chain returns — does not change. That is why a clone that
//   hard-links both L and N sees the same volume after the merge, and why a clone that links
//   only up to L is unaffected when the source drops its own link to L.
// - A clone never writes the layers it links: it has no snapshot record for them, so it cannot
//   delete (merge) them, and its writes go to its own head.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import Logging
import Synchronization

/// One snapshot of a replica: a sealed layer of its chain.
public struct ReplicaSnapshot: Sendable, Equatable, CustomStringConvertible {
    public var id: String
    /// The volume's size when the snapshot was taken.
    public var size: UInt64
    /// The replica's flushed (= highest) generation when it was taken: every block of the
    /// snapshot has a generation at most this.
    public var generation: UInt64
    /// The sealed layer holding what changed since the previous snapshot.
    public var layer: UInt64

    public init(id: String, size: UInt64, generation: UInt64, layer: UInt64) {
        self.id = id
        self.size = size
        self.generation = generation
        self.layer = layer
    }

    public var description: String { "snapshot \(id) (\(size) bytes, generation \(generation), layer \(layer))" }
}

/// One layer of the chain: its `data` and `blockmap` files.
final class Layer {
    let id: UInt64
    let directory: String
    let dataFD: Int32
    let dataPath: String
    let blockMap: BlockMap
    /// The snapshot this sealed layer is, if it is one of this replica's snapshots (a layer a
    /// clone inherited from its source has none: the clone cannot delete it).
    var snapshot: ReplicaSnapshot?
    private var closed = false

    init(id: UInt64, directory: String, dataFD: Int32, blockMap: BlockMap, snapshot: ReplicaSnapshot? = nil) {
        self.id = id
        self.directory = directory
        self.dataFD = dataFD
        self.dataPath = directory + "/data"
        self.blockMap = blockMap
        self.snapshot = snapshot
    }

    func close() {
        guard !closed else { return }
        closed = true
        _ = Glibc.close(dataFD)
    }

    deinit { close() }

    /// Opens a sealed layer: data read-only (O_DIRECT where possible) and without the flock the
    /// head takes — the same files may be hard-linked into a clone that has them open too.
    static func openSealed(directory: String, id: UInt64, logger: Logger) throws -> Layer {
        let path = directory + "/data"
        var fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | FileIO.O_DIRECT)
        if fd < 0, errno == EINVAL || errno == EOPNOTSUPP { fd = Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { throw SystemError("open sealed layer \(path)", errno: errno) }
        do {
            let map = try BlockMap(path: directory + "/blockmap", create: false)
            let snapshot = try SnapshotRecord.read(layerDirectory: directory, layer: id)
            return Layer(id: id, directory: directory, dataFD: fd, blockMap: map, snapshot: snapshot)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
    }
}

/// `layers/<id>/snapshot`: which snapshot a sealed layer is. Written (atomically) into the head
/// just before the superblock that seals it; a record in the head therefore means "that
/// snapshot crashed before committing" and is removed at open.
/// Layout (little-endian): magic `CAIRNSN1` | id (u16 length + UTF-8) | size u64 |
/// generation u64 | crc32c u32 of everything before it.
enum SnapshotRecord {
    static let fileName = "snapshot"
    static let magic: [UInt8] = Array("CAIRNSN1".utf8)

    static func encode(_ s: ReplicaSnapshot) -> [UInt8] {
        var out = magic
        let id = Array(s.id.utf8)
        out.appendLE(UInt16(id.count))
        out += id
        out.appendLE(s.size)
        out.appendLE(s.generation)
        out.appendLE(out.withUnsafeBytes { CRC32C.checksum($0) })
        return out
    }

    static func decode(_ bytes: [UInt8], layer: UInt64, path: String) throws -> ReplicaSnapshot {
        func corrupt(_ why: String) -> ReplicaError {
            .corruptSuperblock("snapshot record \(path) \(why); restore it from a peer or delete the snapshot's replica")
        }
        guard bytes.count >= 8 + 2 + 16 + 4, Array(bytes[0..<8]) == magic else { throw corrupt("has a bad magic") }
        let n = Int(bytes[8]) | Int(bytes[9]) << 8
        guard n >= 1, n <= Superblock.volumeIDCapacity, bytes.count == 10 + n + 16 + 4 else { throw corrupt("has a bad length") }
        var r = LittleEndianReader(bytes: bytes, offset: 10 + n)
        let size = r.u64(), generation = r.u64()
        let crcEnd = r.offset
        let stored = r.u32()
        guard stored == bytes.withUnsafeBytes({ CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<crcEnd])) }) else {
            throw corrupt("fails its checksum")
        }
        guard let id = String(validating: bytes[10..<(10 + n)], as: UTF8.self) else { throw corrupt("has an id that is not UTF-8") }
        return ReplicaSnapshot(id: id, size: size, generation: generation, layer: layer)
    }

    /// The record of the layer in `layerDirectory`, or nil when it has none.
    static func read(layerDirectory: String, layer: UInt64) throws -> ReplicaSnapshot? {
        let path = layerDirectory + "/" + fileName
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ENOENT { return nil }
            throw SystemError("open \(path)", errno: errno)
        }
        defer { _ = Glibc.close(fd) }
        var bytes = [UInt8](repeating: 0, count: 512)
        let n = try bytes.withUnsafeMutableBytes { try FileIO.preadFully(fd, $0, offset: 0, path: path) }
        return try decode(Array(bytes[0..<n]), layer: layer, path: path)
    }

    /// Writes the record with write-temp/fsync/rename/fsync-directory.
    static func write(_ s: ReplicaSnapshot, layerDirectory: String) throws {
        try FileIO.replaceAtomically(directory: layerDirectory, name: fileName, with: encode(s))
    }
}

extension ReplicaStore {
    /// Most sealed layers a chain may hold (the superblock's room for layer ids, less the head).
    public static var maxSnapshots: Int { Superblock.maxLayers - 1 }

    /// Snapshot ids follow the volume-id rules (`Validate.volumeID`): they name nothing on disk
    /// today, but the same alphabet keeps them safe to print, log and use as names later.
    static func validateSnapshotID(_ id: String) throws {
        do {
            try Validate.volumeID(id, field: "snapshot id")
        } catch let e as CairnError {
            throw ReplicaError.badRequest(e.message)
        }
    }

    // MARK: reads through the chain (called holding the lock and the region locks)

    /// The layer at `index` of `sealed + [head]`.
    static func layer(_ s: State, at index: Int) -> Layer {
        index == s.sealed.count ? s.head : s.sealed[index]
    }

    /// Fills `entries` (uninitialized) with the effective entry of each block from `first`: the
    /// newest layer's whose entry is present, among the layers up to and including `top` (an
    /// index into `sealed + [head]`; nil: the head — the volume; a sealed layer's index: that
    /// snapshot's content, newer layers unseen). Returns nil when `top` is the only layer to
    /// look at (every entry is its own); else, per block, the serving layer's index in
    /// `sealed + [head]`, or -1 when no layer has the block.
    static func resolve(_ s: State, first: UInt64, into entries: UnsafeMutableBufferPointer<BlockMapEntry>,
                        top: Int? = nil) throws -> [Int]? {
        let top = top ?? s.sealed.count
        try layer(s, at: top).blockMap.read(first: first, into: entries)
        guard top > 0 else { return nil }
        var owners = [Int](repeating: top, count: entries.count)
        var missing: [Int] = []
        for i in 0..<entries.count where !entries[i].isPresent { missing.append(i) }
        var layer = top - 1
        while layer >= 0, !missing.isEmpty {
            let older = try s.sealed[layer].blockMap.read(first: first, count: entries.count)
            missing.removeAll { i in
                guard older[i].isPresent else { return false }
                entries[i] = older[i]
                owners[i] = layer
                return true
            }
            layer -= 1
        }
        for i in missing { owners[i] = -1 }
        return owners
    }

    /// `resolve` (up to `top`), then the data of every present, untrimmed block from the layer
    /// serving it into `target` (block i at i*4096). Other blocks' bytes are left unspecified
    /// (readers zero them). With `onlyIfWritten`, no data is read when no block is written.
    static func readResolved(_ s: State, first: UInt64, entries: UnsafeMutableBufferPointer<BlockMapEntry>,
                             into target: UnsafeMutableRawBufferPointer, top: Int? = nil, onlyIfWritten: Bool = false) throws {
        let owners = try resolve(s, first: first, into: entries, top: top)
        if onlyIfWritten, !entries.contains(where: { $0.isPresent && !$0.isTrimmed }) { return }
        guard let owners else {
            let only = layer(s, at: top ?? s.sealed.count)
            try readBlocks(fd: only.dataFD, path: only.dataPath, first: first, into: target)
            return
        }
        let bs = blockSize
        var i = 0
        while i < owners.count {
            let owner = owners[i]
            guard owner >= 0, !entries[i].isTrimmed else { i += 1; continue }
            var end = i + 1
            while end < owners.count, owners[end] == owner, !entries[end].isTrimmed { end += 1 }
            let layer = layer(s, at: owner)
            try readBlocks(fd: layer.dataFD, path: layer.dataPath, first: first + UInt64(i),
                           into: UnsafeMutableRawBufferPointer(rebasing: target[(i * bs)..<(end * bs)]))
            i = end
        }
    }

    // MARK: reading a snapshot (backups)

    /// Snapshot `id`'s index in `sealed`, and the snapshot; `notFound` when this replica has no
    /// such snapshot (never taken here, or deleted).
    func snapshotLocked(_ s: State, _ id: String) throws -> (index: Int, snapshot: ReplicaSnapshot) {
        guard let i = s.sealed.firstIndex(where: { $0.snapshot?.id == id }), let snap = s.sealed[i].snapshot else {
            throw ReplicaError.notFound("volume \(volumeID) has no snapshot \(id) on this node (it was deleted, or never taken on this replica); list the replica's snapshots")
        }
        return (i, snap)
    }

    /// Snapshot `id` as this replica holds it (not taken: that is `snapshot(id:epoch:)`);
    /// `notFound` without it.
    public func existingSnapshot(id: String) throws -> ReplicaSnapshot {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            return try snapshotLocked(s, id).snapshot
        }
    }

    /// Snapshot `snapshotID`'s content: per block, the newest entry among the sealed layers up
    /// to and including the snapshot's (never the head or a newer snapshot), its crc32c checked
    /// as `read` checks it; never-written and trimmed blocks read as zeros. The range (whole
    /// blocks, at most `maxRequestLength`) must lie within the snapshot's size. Not fenced:
    /// sealed layers never change content, so reading fences nobody and changes nothing. Holds
    /// the lock shared and the region locks like `read`, so a merge into or out of the
    /// snapshot's layer (a `deleteSnapshot`) is never seen half-done; once the snapshot itself
    /// is deleted, `notFound`.
    public func read(snapshotID: String, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            let (index, snap) = try snapshotLocked(s, snapshotID)
            let (first, count) = try Self.checkRange(offset: offset, length: buffer.count, size: snap.size,
                                                     what: "snapshot \(snapshotID)")
            try readLocked(s, first: first, count: count, offset: offset, into: buffer, top: index)
        }
    }

    /// `read(snapshotID:offset:into:)` into a new array of `length` bytes.
    public func read(snapshotID: String, offset: UInt64, length: Int) throws -> [UInt8] {
        try Self.readArray(length: length) { try read(snapshotID: snapshotID, offset: offset, into: $0) }
    }

    /// Snapshot `snapshotID`'s block generations, as `generations(firstBlock:count:epoch:)`
    /// reports the volume's (0 never written, `BlockGenerations.trimmedBit` for a trim), for
    /// the snapshot's effective entries. Every value is at most the snapshot's generation; a
    /// block whose value is above an older snapshot's generation changed since that snapshot.
    /// Not fenced, and locked, like `read(snapshotID:offset:into:)`.
    public func generations(snapshotID: String, firstBlock: UInt64, count: Int) throws -> [UInt64] {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            let (index, snap) = try snapshotLocked(s, snapshotID)
            return try generationsLocked(s, firstBlock: firstBlock, count: count, size: snap.size, top: index)
        }
    }

    // MARK: snapshots

    /// This replica's snapshots, oldest first (a clone's inherited layers are not listed).
    /// `epoch` is checked like `status`'s (the default: an in-process caller, not checked).
    public func snapshots(epoch: UInt64 = .max) throws -> [ReplicaSnapshot] {
        try state.withShared { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            return s.sealed.compactMap(\.snapshot)
        }
    }

    /// Takes snapshot `id`: flushes the head, seals it (never written again) and starts a new
    /// empty head, committed by one atomic superblock rewrite. Idempotent: an id that exists
    /// returns the existing snapshot. The caller (the engine's write barrier) makes sure no
    /// write is in flight; the store only guarantees that the snapshot holds every write it
    /// acknowledged before this call took its exclusive lock.
    @discardableResult
    public func snapshot(id: String, epoch: UInt64) throws -> ReplicaSnapshot {
        try Self.validateSnapshotID(id)
        return try state.withLock { s in
            try Self.checkOpenLocked(s)
            try Self.checkEpochLocked(s, epoch)
            if let existing = s.sealed.lazy.compactMap(\.snapshot).first(where: { $0.id == id }) { return existing }
            guard s.superblock.layers.count < Superblock.maxLayers else {
                throw ReplicaError.badRequest("volume \(volumeID) has \(s.sealed.count) layers, the most a replica holds; delete a snapshot first")
            }
            try Self.flushLocked(s, directory: directory)
            let info = ReplicaSnapshot(id: id, size: s.superblock.size, generation: s.superblock.flushedGeneration, layer: s.head.id)
            let newID = (s.superblock.layers.max() ?? 0) + 1
            let newHead = try Self.createLayer(directory: directory, id: newID, size: s.superblock.size, logger: logger)
            do {
                try SnapshotRecord.write(info, layerDirectory: s.head.directory)
                var next = s.superblock
                next.layers.append(newID)
                do {
                    try next.write(directory: directory)
                } catch {
                    _ = unlink(s.head.directory + "/" + SnapshotRecord.fileName)
                    throw error
                }
                s.superblock = next
            } catch {
                newHead.close()
                try? FileTree.remove(newHead.directory)
                throw error
            }
            let sealed = s.head
            sealed.snapshot = info
            // The sealed layer keeps its descriptor; the flock belongs to the head only.
            _ = flock(sealed.dataFD, LOCK_UN)
            s.sealed.append(sealed)
            s.head = newHead
            logger.info("replica snapshot taken", metadata: [
                "volume.id": "\(volumeID)", "snapshot.id": "\(id)", "snapshot.layer": "\(info.layer)",
                "snapshot.generation": "\(info.generation)", "replica.head": "\(newID)",
            ])
            return info
        }
    }

    /// Blocks one merge step covers (16 MiB): the region locks of a step are held across one
    /// fdatasync of the target's data, so writes to those regions wait for it.
    static let mergeChunkBlocks: UInt64 = 4096

    /// Deletes snapshot `id` (a missing one is fine: idempotent). Its layer L is merged into the
    /// next newer layer N — only the blocks N has no entry for, each decided under its region
    /// lock, so a write to the head racing with the merge is never overwritten — and N is synced;
    /// then one superblock rewrite drops L from the chain and L's files are removed. A crash
    /// before the superblock leaves L in the chain (N holds copies of some of L's blocks at the
    /// same generation: the same content), and deleting again finishes; a crash after it leaves
    /// only L's directory, removed at the next open. A clone that hard-linked L keeps its link.
    public func deleteSnapshot(id: String, epoch: UInt64) throws {
        try Self.validateSnapshotID(id)
        try maintenance.withLock { _ in
            let found = try state.withShared { s -> (Layer, Layer)? in
                try Self.checkOpenLocked(s)
                try Self.checkEpochLocked(s, epoch)
                guard let i = s.sealed.firstIndex(where: { $0.snapshot?.id == id }) else { return nil }
                return (s.sealed[i], i + 1 < s.sealed.count ? s.sealed[i + 1] : s.head)
            }
            guard let (layer, target) = found else {
                logger.debug("snapshot already deleted", metadata: ["volume.id": "\(volumeID)", "snapshot.id": "\(id)"])
                return
            }
            let merged = try merge(layer, into: target, epoch: epoch)
            try state.withLock { s in
                try Self.checkOpenLocked(s)
                try Self.checkEpochLocked(s, epoch)
                guard let i = s.sealed.firstIndex(where: { $0 === layer }) else { return }
                var next = s.superblock
                next.layers.removeAll { $0 == layer.id }
                try next.write(directory: directory)
                s.superblock = next
                s.sealed.remove(at: i)
                waitForPlannedReads()
                layer.close()
            }
            do {
                try FileTree.remove(layer.directory)
            } catch {
                logger.warning("could not remove a deleted snapshot's layer; the next open of the replica removes it",
                               metadata: ["volume.id": "\(volumeID)", "replica.layer": "\(layer.directory)", "error": "\(error)"])
            }
            logger.info("replica snapshot deleted", metadata: [
                "volume.id": "\(volumeID)", "snapshot.id": "\(id)", "snapshot.layer": "\(layer.id)",
                "snapshot.merged_into": "\(target.id)", "snapshot.merged_blocks": "\(merged)",
            ])
        }
    }

    /// Copies into `target` every block `layer` has and `target` does not (neither written nor
    /// trimmed there), then syncs `target`. Returns the blocks copied. `maxChunks` stops early
    /// (what a crash mid-merge leaves; tests use it).
    func merge(_ layer: Layer, into target: Layer, epoch: UInt64, maxChunks: Int = .max) throws -> Int {
        let bs = Self.blockSize
        // L is only ever written by a merge of the layer below it, which `maintenance` excludes.
        let blocks = state.withShared { s in s.superblock.size / UInt64(bs) }
        var present: [(UInt64, BlockMapEntry)] = []
        try layer.blockMap.forEachPresent(blocks: blocks) { present.append(($0, $1)) }
        guard !present.isEmpty else { return 0 }

        // A sealed target is opened for writing just for the merge (its usual descriptor is
        // read-only); the head's is already read-write.
        var ownFD: Int32 = -1
        defer { if ownFD >= 0 { _ = Glibc.close(ownFD) } }
        let isHead = state.withShared { s in s.head === target }
        if !isHead {
            ownFD = Glibc.open(target.dataPath, O_RDWR | O_CLOEXEC | (usesDirectIO ? FileIO.O_DIRECT : 0))
            guard ownFD >= 0 else { throw SystemError("open \(target.dataPath) for a snapshot merge", errno: errno) }
        }
        let targetFD = isHead ? target.dataFD : ownFD
        let run = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.summaryRegionBlocks * bs, alignment: bs)
        defer { run.deallocate() }

        var copied = 0
        var index = 0
        var chunks = 0
        while index < present.count, chunks < maxChunks {
            chunks += 1
            let chunkFirst = present[index].0 / Self.mergeChunkBlocks * Self.mergeChunkBlocks
            let chunkEnd = chunkFirst + Self.mergeChunkBlocks
            var end = index
            while end < present.count, present[end].0 < chunkEnd { end += 1 }
            let batch = present[index..<end]
            index = end
            // The shared lock per chunk: writes go on between chunks, and a snapshot (exclusive)
            // can seal the head mid-merge — the target stays the same layer object either way.
            try state.withShared { s in
                try Self.checkOpenLocked(s)
                try Self.checkEpochLocked(s, epoch)
                let count = Int(min(Self.mergeChunkBlocks, blocks - chunkFirst))
                try regions.withRange(offset: chunkFirst * UInt64(bs), length: count * bs) {
                    let current = try target.blockMap.read(first: chunkFirst, count: count)
                    let todo = batch.filter { !current[Int($0.0 - chunkFirst)].isPresent }
                    guard !todo.isEmpty else { return }
                    // Data first, made durable before any entry points at it: a merged entry's
                    // generation is at or below the flushed one, which recovery never rechecks.
                    var i = todo.startIndex
                    var wroteData = false
                    while i < todo.endIndex {
                        guard !todo[i].1.isTrimmed else { i += 1; continue }
                        var j = i + 1
                        while j < todo.endIndex, j - i < Self.summaryRegionBlocks, !todo[j].1.isTrimmed,
                              todo[j].0 == todo[j - 1].0 + 1 { j += 1 }
                        let bytes = UnsafeMutableRawBufferPointer(rebasing: run[0..<((j - i) * bs)])
                        try Self.readBlocks(fd: layer.dataFD, path: layer.dataPath, first: todo[i].0, into: bytes)
                        try FileIO.pwriteFully(targetFD, UnsafeRawBufferPointer(bytes), offset: todo[i].0 * UInt64(bs), path: target.dataPath)
                        wroteData = true
                        i = j
                    }
                    if wroteData, fdatasync(targetFD) != 0 { throw SystemError("fdatasync \(target.dataPath)", errno: errno) }
                    for (block, entry) in todo { try target.blockMap.write(first: block, [entry]) }
                    copied += todo.count
                }
            }
        }
        try target.blockMap.sync()
        return copied
    }

    // MARK: clones

    /// Creates, in `directory`, replica `volumeID` (`size` ≥ the snapshot's) whose chain is
    /// `source`'s layers up to and including snapshot `snapshotID`'s, hard-linked (the clone
    /// never writes them), plus its own empty head. No data is copied. The clone's generations
    /// start above the source's highest, so its writes always supersede the shared blocks; it
    /// starts at epoch 0 like a created replica. Refuses a directory that holds a replica;
    /// a half-made clone (no superblock) is removed and made again.
    public static func clone(from source: ReplicaStore, snapshotID: String, directory: String, volumeID: String,
                             size: UInt64, logger: Logger = discardingLogger) throws -> ReplicaStore {
        try validateSnapshotID(snapshotID)
        guard Superblock.isValidVolumeID(volumeID) else {
            throw ReplicaError.badRequest("volume id must be 1–\(Superblock.volumeIDCapacity) bytes of UTF-8 without NUL")
        }
        guard size > 0, size % UInt64(blockSize) == 0, size <= UInt64(Int64.max / 2) else {
            throw ReplicaError.badRequest("size \(size) must be a positive multiple of \(blockSize)")
        }
        if access(directory + "/superblock", F_OK) == 0 {
            throw ReplicaError.alreadyExists("a replica already exists in \(directory)")
        }
        // Holding the source's maintenance lock: no merge writes and no deletion removes the
        // layers while they are linked.
        return try source.maintenance.withLock { _ in
            let (layers, highest) = try source.state.withShared { s -> ([UInt64], UInt64) in
                try checkOpenLocked(s)
                let (i, snap) = try source.snapshotLocked(s, snapshotID)
                guard size >= snap.size else {
                    throw ReplicaError.badRequest("a clone of snapshot \(snapshotID) needs at least its size, \(snap.size) bytes, not \(size)")
                }
                return (s.sealed[0...i].map(\.id), s.highestGeneration.load(ordering: .relaxed))
            }
            if access(directory, F_OK) == 0 { try FileTree.remove(directory) }
            try makeDirectory(directory)
            try makeDirectory(directory + "/layers")
            for id in layers {
                let from = layerDirectory(source.directory, layer: id), to = layerDirectory(directory, layer: id)
                try makeDirectory(to)
                for file in ["data", "blockmap"] where link(from + "/" + file, to + "/" + file) != 0 {
                    throw SystemError("link \(from)/\(file) to \(to)", errno: errno)
                }
                try FileIO.fsyncDirectory(to)
            }
            let headID = (layers.max() ?? 0) + 1
            try createLayer(directory: directory, id: headID, size: size, logger: logger).close()
            // The clone's highest generation starts at the source's (flushed: every linked
            // block is durable), so the engine numbers its writes above every shared block.
            let superblock = Superblock(volumeID: volumeID, size: size, flushedGeneration: highest, clean: true,
                                        layers: layers + [headID])
            try superblock.write(directory: directory)
            logger.info("replica cloned", metadata: [
                "volume.id": "\(volumeID)", "clone.source": "\(source.volumeID)", "snapshot.id": "\(snapshotID)",
                "clone.layers": "\(layers)", "replica.size": "\(size)",
            ])
            return try open(directory: directory, volumeID: volumeID, logger: logger)
        }
    }

    // MARK: helpers

    /// A new empty layer in `<directory>/layers/<id>/` (a leftover of a crashed attempt there is
    /// replaced), synced, with its data file open and flock'ed: it is going to be a head.
    static func createLayer(directory: String, id: UInt64, size: UInt64, logger: Logger) throws -> Layer {
        let layerDir = layerDirectory(directory, layer: id)
        if access(layerDir, F_OK) == 0 { try FileTree.remove(layerDir) }
        try makeDirectory(layerDir)
        let (fd, _) = try openData(layerDir + "/data", create: true, logger: logger)
        do {
            guard ftruncate(fd, off_t(size)) == 0 else { throw SystemError("ftruncate \(layerDir)/data", errno: errno) }
            guard fsync(fd) == 0 else { throw SystemError("fsync \(layerDir)/data", errno: errno) }
            let map = try BlockMap(path: layerDir + "/blockmap", create: true)
            try map.ensureCapacity(blocks: size / UInt64(blockSize))
            guard fsync(map.fd) == 0 else { throw SystemError("fsync \(map.path)", errno: errno) }
            try FileIO.fsyncDirectory(layerDir)
            try FileIO.fsyncDirectory(directory + "/layers")
            return Layer(id: id, directory: layerDir, dataFD: fd, blockMap: map)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
    }

    /// Removes every `layers/` entry the chain does not name: a deleted snapshot's layer whose
    /// removal a crash interrupted, or a head a crashed snapshot had begun.
    static func removeUnreferencedLayers(directory: String, chain: [UInt64], logger: Logger) throws {
        let layersDir = directory + "/layers"
        guard let dir = opendir(layersDir) else { return }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != ".", name != ".." { names.append(name) }
        }
        closedir(dir)
        let keep = Set(chain.map { String(layerDirectory(directory, layer: $0).split(separator: "/").last!) })
        for name in names where !keep.contains(name) {
            logger.notice("removing a layer the replica's chain does not name (left by an interrupted snapshot operation)",
                          metadata: ["replica.dir": "\(directory)", "replica.layer": "\(name)"])
            try FileTree.remove(layersDir + "/" + name)
        }
    }
}
