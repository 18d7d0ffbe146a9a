import CS3Shim
import CZstdShim
import CairnCore
import Foundation

/// The objects of a backup target (docs/backups.md, "Object layout"), under the target's prefix:
///
/// - `packs/<sha256>`: many blocks, each one zstd frame, end to end; named by the SHA-256 of
///   the whole object (checked after every download).
/// - `index/<sha256>`: the pack's index (`PackIndex`): for each entry the SHA-256 of the block's
///   4 KiB (its content address, checked after decompression) and where its frame lies.
/// - `backups/<id>.json`: a backup's manifest (`BackupManifest`), written last.
public enum BackupLayout {
    public static let blockSize = 4096
    /// A pack is sealed once its blocks' raw size reaches this (before compression).
    public static let packRawBytes = 8 << 20

    public static func pack(_ hash: String) -> String { "packs/" + hash }
    public static func index(_ hash: String) -> String { "index/" + hash }
    public static func manifest(_ id: String) -> String { "backups/\(id).json" }
}

/// A block's content address: SHA-256 of its bytes.
public struct BlockHash: Hashable, Sendable {
    public var bytes: (UInt64, UInt64, UInt64, UInt64)

    public init(_ raw: UnsafeRawBufferPointer) {
        bytes = (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                 raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self), raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
    }

    public static func of(_ data: UnsafeRawBufferPointer) -> BlockHash {
        var digest = [UInt8](repeating: 0, count: 32)
        cs3_sha256(data.baseAddress?.assumingMemoryBound(to: UInt8.self), data.count, &digest)
        return digest.withUnsafeBytes { BlockHash($0) }
    }

    public static func of(_ data: [UInt8]) -> BlockHash { data.withUnsafeBytes { of($0) } }

    public static func == (a: BlockHash, b: BlockHash) -> Bool { a.bytes == b.bytes }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(bytes.0)
        hasher.combine(bytes.1)
        hasher.combine(bytes.2)
        hasher.combine(bytes.3)
    }

    var raw: [UInt8] {
        withUnsafeBytes(of: bytes) { Array($0) }
    }

    public var hex: String { raw.map { String(format: "%02x", $0) }.joined() }
}

/// zstd through CZstdShim.
public enum Zstd {
    public static func compress(_ data: UnsafeRawBufferPointer, level: Int32 = 3) -> [UInt8] {
        let bound = czstd_bound(data.count)
        var out = [UInt8](repeating: 0, count: bound)
        let n = out.withUnsafeMutableBufferPointer {
            czstd_compress(data.baseAddress?.assumingMemoryBound(to: UInt8.self), data.count, $0.baseAddress, bound, level)
        }
        precondition(n > 0, "zstd could not compress \(data.count) bytes into its own bound")
        out.removeSubrange(n...)
        return out
    }

    /// The frame's bytes, which must be exactly `size` long; nil when the frame is damaged.
    public static func decompress(_ frame: ArraySlice<UInt8>, size: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: size)
        let n = frame.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { czstd_decompress(src.baseAddress, src.count, $0.baseAddress, size) }
        }
        return n == size ? out : nil
    }
}

/// A pack's index: entry i is the block with content address `hashes[i]`, its zstd frame at
/// `offsets[i]..<offsets[i] + lengths[i]` in the pack. Binary: "CAIRNIX1", count (u32 LE), then
/// per entry 32 bytes of hash, offset (u32 LE), length (u32 LE).
public struct PackIndex: Sendable, Equatable {
    public var hashes: [BlockHash] = []
    public var offsets: [UInt32] = []
    public var lengths: [UInt32] = []

    public init() {}

    static let magic = Array("CAIRNIX1".utf8)

    public var count: Int { hashes.count }

    public func encoded() -> [UInt8] {
        var out = Self.magic
        out.reserveCapacity(12 + count * 40)
        appendLE(&out, UInt32(count))
        for i in 0..<count {
            out += hashes[i].raw
            appendLE(&out, offsets[i])
            appendLE(&out, lengths[i])
        }
        return out
    }

    public static func decode(_ bytes: [UInt8], name: String) throws -> PackIndex {
        let bad = CairnError.failedPrecondition("backup index \(name) is damaged; run `cairn backup verify`, or delete the backups that use it")
        guard bytes.count >= 12, Array(bytes[0..<8]) == magic else { throw bad }
        let count = Int(readLE(bytes, 8))
        guard bytes.count == 12 + count * 40 else { throw bad }
        var index = PackIndex()
        index.hashes.reserveCapacity(count)
        bytes.withUnsafeBytes { raw in
            for i in 0..<count {
                let at = 12 + i * 40
                index.hashes.append(BlockHash(UnsafeRawBufferPointer(rebasing: raw[at..<at + 32])))
                index.offsets.append(readLE(bytes, at + 32))
                index.lengths.append(readLE(bytes, at + 36))
            }
        }
        return index
    }
}

/// Which block of the volume is which pack entry, as runs: `count` blocks from the current one
/// on are entries `entry`, `entry + 1`… of pack `pack` (the manifest's `packs[pack]`), or zero
/// blocks (stored nowhere) when `pack == BlockMap.zero`. A whole backup's map is a few runs per
/// pack plus a few per changed block, whatever the volume's size.
public struct BlockRun: Sendable, Equatable {
    public var count: UInt32
    public var pack: UInt32
    public var entry: UInt32

    public init(count: UInt32, pack: UInt32, entry: UInt32) {
        self.count = count
        self.pack = pack
        self.entry = entry
    }
}

public struct BlockMap: Sendable, Equatable {
    public static let zero = UInt32.max
    public private(set) var runs: [BlockRun] = []
    public private(set) var blocks: Int = 0

    public init() {}

    /// Appends the next block's place, extending the last run when it continues it.
    public mutating func append(pack: UInt32, entry: UInt32) {
        blocks += 1
        if var last = runs.last, last.pack == pack, last.count < UInt32.max,
           pack == Self.zero || last.entry &+ last.count == entry {
            last.count += 1
            runs[runs.count - 1] = last
        } else {
            runs.append(BlockRun(count: 1, pack: pack, entry: pack == Self.zero ? 0 : entry))
        }
    }

    /// Binary (three u32 LE per run), zstd-compressed.
    public func encoded() -> [UInt8] {
        var raw: [UInt8] = []
        raw.reserveCapacity(runs.count * 12)
        for run in runs {
            appendLE(&raw, run.count)
            appendLE(&raw, run.pack)
            appendLE(&raw, run.entry)
        }
        return raw.withUnsafeBytes { Zstd.compress($0, level: 9) }
    }

    public static func decode(_ bytes: [UInt8], runs runCount: Int, blocks: Int) -> BlockMap? {
        guard let raw = Zstd.decompress(bytes[...], size: runCount * 12) else { return nil }
        var map = BlockMap()
        for i in 0..<runCount {
            let run = BlockRun(count: readLE(raw, i * 12), pack: readLE(raw, i * 12 + 4), entry: readLE(raw, i * 12 + 8))
            map.runs.append(run)
            map.blocks += Int(run.count)
        }
        return map.blocks == blocks ? map : nil
    }
}

/// A backup's manifest, `backups/<id>.json`. Written after every pack it names, so a manifest
/// that exists is a complete backup.
public struct BackupManifest: Codable, Sendable, Equatable {
    public var format = 1
    public var id: String
    public var volumeID: String
    public var snapshotID: String
    public var sizeBytes: Int64
    public var blockSize: Int
    public var createdAt: Date
    /// The backup this one was made against (its blocks were looked up first); informational:
    /// every manifest names all the packs it needs, so deleting the parent breaks nothing.
    public var parent: String?
    /// The snapshot's generation (cluster replicas: every block of it is at most this) and the
    /// volume incarnation the generations belong to; nil when the source had none (one machine).
    /// The next backup of the volume reads only blocks written above it.
    public var sourceGeneration: UInt64?
    public var lineage: String?
    /// The source volume's filesystem ("" raw block), for a volume restored from it.
    public var fsType: String?
    /// An encrypted volume's wrapped key, copied verbatim (the blocks are ciphertext already):
    /// a volume restored from the backup takes it, and opens with the passphrase that was the
    /// volume's when the backup was made.
    public var encryption: VolumeEncryption?
    /// Pack hashes; a run's `pack` indexes this list.
    public var packs: [String]
    public var runs: Int
    /// `BlockMap.encoded()`, base64.
    public var blockMap: String
    /// Non-zero blocks in the volume, blocks this backup uploaded, and the bytes it stored.
    public var dataBlocks: Int
    public var newBlocks: Int
    public var uploadedBytes: Int64
    /// Bytes read from the snapshot to make the backup (nil in a manifest from before it was kept).
    public var scannedBytes: Int64?

    public func map() throws -> BlockMap {
        guard let bytes = Data(base64Encoded: blockMap),
              let map = BlockMap.decode(Array(bytes), runs: runs, blocks: Int(sizeBytes) / blockSize)
        else {
            throw CairnError.failedPrecondition("backup \(id)'s block map is damaged; delete the backup and take it again")
        }
        return map
    }
}

/// Walks a block map block by block: the place of block 0, 1, 2…; past the map's end, zero.
struct BlockCursor {
    let runs: [BlockRun]
    var run = 0
    var within: UInt32 = 0

    init(_ map: BlockMap) {
        runs = map.runs
    }

    mutating func next() -> (pack: UInt32, entry: UInt32) {
        guard run < runs.count else { return (BlockMap.zero, 0) }
        let r = runs[run]
        let place = (r.pack, r.pack == BlockMap.zero ? 0 : r.entry + within)
        within += 1
        if within == r.count {
            run += 1
            within = 0
        }
        return place
    }
}

func appendLE(_ out: inout [UInt8], _ value: UInt32) {
    withUnsafeBytes(of: value.littleEndian) { out += $0 }
}

func readLE(_ bytes: [UInt8], _ at: Int) -> UInt32 {
    UInt32(bytes[at]) | UInt32(bytes[at + 1]) << 8 | UInt32(bytes[at + 2]) << 16 | UInt32(bytes[at + 3]) << 24
}

extension [UInt8] {
    var sha256Hex: String { BlockHash.of(self).hex }
}
