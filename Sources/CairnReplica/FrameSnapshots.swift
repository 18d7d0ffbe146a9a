// The data protocol's snapshot, clone and growth messages (ops 13–19), and the backups' snapshot reads
// (ops 21–22; docs/replica-format.md).
// Same rules as Frame.swift: little-endian, length-prefixed strings checked before use, a
// payload with bytes left over is malformed.

/// `snapshot` and `deleteSnapshot` requests: volume | snapshot id.
public struct SnapshotRequest: WireCodable {
    public var volume: String
    public var snapshotID: String
    /// `FrameFlags.barrier` (snapshot only): the receiving node's engine for the volume takes the
    /// snapshot on every in-sync replica behind its write barrier.
    public var barrier: Bool

    public init(volume: String, snapshotID: String, barrier: Bool = false) {
        self.volume = volume
        self.snapshotID = snapshotID
        self.barrier = barrier
    }

    public var headerFlags: UInt8 { barrier ? FrameFlags.barrier : 0 }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.writeVolume(snapshotID)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        snapshotID = try r.readName("snapshot id")
        barrier = flags & FrameFlags.barrier != 0
        try r.expectEnd()
    }
}

/// The `snapshot` response: what the snapshot is and (for a barrier snapshot) which nodes hold it.
public struct SnapshotResponse: WireResponse {
    public var status: ReplyStatus
    public var message: String
    /// The volume's size when the snapshot was taken (0 unless ok).
    public var size: UInt64
    /// The replica's generation when it was taken (0 unless ok).
    public var generation: UInt64
    /// The node ids whose replicas hold the snapshot (a barrier snapshot; empty otherwise).
    public var nodes: [String]
    public var barrier: Bool

    public static let maxNodes = 64

    public init(status: ReplyStatus, size: UInt64 = 0, generation: UInt64 = 0, nodes: [String] = [], barrier: Bool = false,
                message: String = "") {
        self.status = status
        self.size = size
        self.generation = generation
        self.nodes = nodes
        self.barrier = barrier
        self.message = message
    }

    public init(failure: ReplyFailure) {
        self.init(status: failure.status, barrier: failure.requestFlags & FrameFlags.barrier != 0, message: failure.message)
    }

    public var headerFlags: UInt8 { barrier ? FrameFlags.barrier : 0 }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        w.write(size)
        w.write(generation)
        let nodes = nodes.prefix(Self.maxNodes)
        w.write(UInt16(nodes.count))
        for n in nodes { w.writeVolume(n) }
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        size = try r.readUInt64("size")
        generation = try r.readUInt64("generation")
        let count = try r.readUInt16("node count")
        guard count <= Self.maxNodes else {
            throw FrameError(.malformedPayload, "snapshot response names \(count) nodes (limit \(Self.maxNodes))")
        }
        var nodes: [String] = []
        for _ in 0..<count { nodes.append(try r.readName("node id")) }
        self.nodes = nodes
        barrier = flags & FrameFlags.barrier != 0
        message = try r.readMessage()
        try r.expectEnd()
    }
}

/// `listSnapshots` request: the volume alone, laid out like `status`'s.
public typealias ListSnapshotsRequest = StatusRequest

/// One entry of a `listSnapshots` response.
public struct SnapshotEntry: Equatable, Sendable {
    public var id: String
    public var size: UInt64
    public var generation: UInt64

    public init(id: String, size: UInt64, generation: UInt64) {
        self.id = id
        self.size = size
        self.generation = generation
    }
}

public struct ListSnapshotsResponse: WireResponse {
    public var status: ReplyStatus
    public var message: String
    /// Oldest first; empty unless ok.
    public var snapshots: [SnapshotEntry]

    /// More than a replica's chain can hold (`ReplicaStore.maxSnapshots`).
    public static let maxEntries = 512

    public init(status: ReplyStatus, snapshots: [SnapshotEntry] = [], message: String = "") {
        self.status = status
        self.snapshots = snapshots
        self.message = message
    }

    public init(failure: ReplyFailure) { self.init(status: failure.status, message: failure.message) }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        let entries = snapshots.prefix(Self.maxEntries)
        w.write(UInt16(entries.count))
        for e in entries {
            w.writeVolume(e.id)
            w.write(e.size)
            w.write(e.generation)
        }
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        let count = try r.readUInt16("snapshot count")
        guard count <= Self.maxEntries else {
            throw FrameError(.malformedPayload, "snapshot list has \(count) entries (limit \(Self.maxEntries))")
        }
        guard status == .ok || count == 0 else {
            throw FrameError(.malformedPayload, "snapshot list with status \(status) carries \(count) entries")
        }
        var entries: [SnapshotEntry] = []
        for _ in 0..<count {
            let id = try r.readName("snapshot id")
            entries.append(SnapshotEntry(id: id, size: try r.readUInt64("snapshot size"), generation: try r.readUInt64("snapshot generation")))
        }
        snapshots = entries
        message = try r.readMessage()
        try r.expectEnd()
    }
}

/// `clone`: a new replica `volume` on this node sharing `source`'s layers up to `snapshotID`.
public struct CloneRequest: WireCodable {
    public var volume: String
    public var source: String
    public var snapshotID: String
    /// Bytes, a positive multiple of 4096, at least the snapshot's size.
    public var size: UInt64

    public init(volume: String, source: String, snapshotID: String, size: UInt64) {
        self.volume = volume
        self.source = source
        self.snapshotID = snapshotID
        self.size = size
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.writeVolume(source)
        w.writeVolume(snapshotID)
        w.write(size)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        source = try r.readName("source volume id")
        snapshotID = try r.readName("snapshot id")
        size = try r.readUInt64("size")
        try r.expectEnd()
        guard size != 0, size % UInt64(FrameLimits.blockSize) == 0 else {
            throw FrameError(.malformedPayload, "clone size \(size) is not a positive multiple of \(FrameLimits.blockSize)")
        }
    }
}

/// `grow` request: volume | size u64 (the new size; not smaller than now: the replica refuses),
/// laid out and checked like `create`'s.
public typealias GrowRequest = CreateRequest

extension ByteReader {
    /// u16 length + UTF-8, 1...128 bytes (a snapshot, source volume or node id).
    mutating func readName(_ field: String) throws(FrameError) -> String {
        let n = Int(try readUInt16("\(field) length"))
        guard n >= 1, n <= FrameLimits.maxVolumeIDLength else {
            throw FrameError(.malformedPayload, "\(field) is \(n) bytes (must be 1...\(FrameLimits.maxVolumeIDLength))")
        }
        let raw = try take(n, field)
        guard let name = String(validating: raw, as: UTF8.self) else {
            throw FrameError(.malformedPayload, "\(field) is not valid UTF-8")
        }
        return name
    }
}

/// `holdWrites`: hold the writes of the engine running `volume` on the receiving node for at
/// most `timeoutMilliseconds` (a group snapshot's barrier; `releaseWrites` ends it sooner).
public struct HoldWritesRequest: WireCodable {
    public var volume: String
    public var timeoutMilliseconds: UInt32

    /// Ten minutes: longer would let a crashed coordinator freeze a volume for too long.
    public static let maxTimeoutMilliseconds: UInt32 = 600_000

    public init(volume: String, timeoutMilliseconds: UInt32) {
        self.volume = volume
        self.timeoutMilliseconds = timeoutMilliseconds
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.write(timeoutMilliseconds)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        timeoutMilliseconds = try r.readUInt32("timeout")
        try r.expectEnd()
        guard timeoutMilliseconds >= 1, timeoutMilliseconds <= Self.maxTimeoutMilliseconds else {
            throw FrameError(.malformedPayload, "hold timeout \(timeoutMilliseconds) ms is outside 1...\(Self.maxTimeoutMilliseconds)")
        }
    }
}

/// `releaseWrites`: the volume alone.
public typealias ReleaseWritesRequest = StatusRequest

/// `snapshotRead` (op 21): volume | snapshot id | offset u64 | length u32 — a `read` of the
/// sealed snapshot's content, checked like a read's range (whole blocks, at most
/// `FrameLimits.maxDataLength`). Answered with a `ReadResponse`.
public struct SnapshotReadRequest: WireCodable {
    public var volume: String
    public var snapshotID: String
    public var offset: UInt64
    public var length: UInt32

    public init(volume: String, snapshotID: String, offset: UInt64, length: UInt32) {
        self.volume = volume
        self.snapshotID = snapshotID
        self.offset = offset
        self.length = length
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.writeVolume(snapshotID)
        w.write(offset)
        w.write(length)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        snapshotID = try r.readName("snapshot id")
        offset = try r.readUInt64("offset")
        length = try r.readUInt32("length")
        try r.expectEnd()
        try validateBlockRange(offset: offset, length: UInt64(length), maxLength: UInt64(FrameLimits.maxDataLength),
                               what: "snapshot read")
    }
}

/// `snapshotGenerations` (op 22): volume | snapshot id | first block u64 | count u32 — the
/// `generations` of the sealed snapshot's blocks. The count and the range are the replica's to
/// refuse, as for `generations`. Answered with a `GenerationsResponse`.
public struct SnapshotGenerationsRequest: WireCodable {
    public var volume: String
    public var snapshotID: String
    public var firstBlock: UInt64
    public var count: UInt32

    public init(volume: String, snapshotID: String, firstBlock: UInt64, count: UInt32) {
        self.volume = volume
        self.snapshotID = snapshotID
        self.firstBlock = firstBlock
        self.count = count
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.writeVolume(snapshotID)
        w.write(firstBlock)
        w.write(count)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        snapshotID = try r.readName("snapshot id")
        firstBlock = try r.readUInt64("first block")
        count = try r.readUInt32("count")
        try r.expectEnd()
    }
}
