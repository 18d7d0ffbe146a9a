/// The data protocol's frames (docs/replica-format.md, "Data protocol (TCP)"): pure encode and
/// decode, no sockets.
///
/// Owns: the 32-byte header layout and its CRC-32C, the opcodes, the typed request and response
/// payloads of every op, the status codes, and every limit the wire imposes (payload size,
/// 4 KiB block alignment, volume id length and UTF-8, auth token size). Everything read from the
/// wire is untrusted: decoding validates lengths before using them, uses checked arithmetic,
/// and reports a `FrameError` (a reason for "closing connection: <reason>") instead of trapping.
///
/// Does not own: sockets, connection lifetime, request-id bookkeeping, authentication (the
/// hello's token is opaque bytes here), epoch fencing decisions (the header only carries the
/// epoch) or anything about the replica store. The incremental stream decoder is
/// `FrameDecoder`.
///
/// Encoding trusts the caller (it is our own side): values that break a limit are encoded as
/// given, and the receiving decoder rejects them. Tests rely on this to build malformed frames.

/// Fixed sizes and limits of the data protocol.
public enum FrameLimits {
    public static let magic: UInt32 = 0x464E_5243  // "CRNF" in wire order (little-endian u32)
    /// The header's version: the framing itself.
    public static let version: UInt16 = 1
    /// The newest protocol version a hello offers and this side speaks: 2 adds the damaged
    /// block to a read's `checksumMismatch` (`FrameFlags.detail`); 3 lets a flush say the
    /// generation it covers (`FlushRequest.through`); 4 adds `snapshotRead` and
    /// `snapshotGenerations` (a client refuses to send them to an older peer); 5 adds durable
    /// writes (`FrameFlags.durable`). A server answers a hello with the lower of the two
    /// versions and uses only what that version has.
    public static let protocolVersion: UInt16 = 5
    public static let supportedProtocolVersions: ClosedRange<UInt16> = 1...protocolVersion
    public static let headerSize = 32
    /// The header CRC covers every header byte before the CRC field.
    public static let checksummedHeaderSize = 28
    public static let blockSize = 4096
    /// Largest read or write in one request.
    public static let maxDataLength = 8 * 1024 * 1024
    /// 8 MiB of data plus 256 bytes for the other fields.
    public static let maxPayloadLength = maxDataLength + 256
    public static let maxFrameSize = headerSize + maxPayloadLength
    public static let maxVolumeIDLength = 128
    public static let maxAuthTokenLength = 128
    /// A response's error message (UTF-8; longer messages are cut by the sender).
    public static let maxMessageLength = 1024
    /// Most blocks one `generations` request may ask about (256 MiB of volume, 512 KiB of reply).
    public static let maxGenerationsCount = 65_536
}

/// The op a frame carries; a response reuses its request's op with `FrameFlags.response`.
/// Values are wire values: never renumber. Room is left for `barrier`.
public enum Opcode: UInt8, Sendable, CaseIterable {
    case hello = 1
    case claim = 2
    case read = 3
    case write = 4
    case flush = 5
    case trim = 6
    case status = 7
    /// Control plane (the controller placing or deleting a replica).
    case create = 8
    case delete = 9
    /// Delta resync: the block map's generation of each block in a range.
    case generations = 10
    /// One digest per 1 MiB region of block generations (resync compares them first).
    case summary = 11
    /// The blocks of a range whose data does not match its checksum (the scrub).
    case verify = 12
    /// Seals the head layer as a snapshot (with `FrameFlags.barrier`: the engine's write barrier).
    case snapshot = 13
    case deleteSnapshot = 14
    case listSnapshots = 15
    /// A new replica sharing a snapshot's layers (hard links) on the same node.
    case clone = 16
    case grow = 17
    /// Group snapshots: hold (then release) the writes of the volume's engine on the receiving node.
    case holdWrites = 18
    case releaseWrites = 19
    /// Settle and report the regions written above the engine's clean watermark (FrameActivity.swift).
    case activity = 20
    /// Backups: a sealed snapshot's content, and its blocks' generations (FrameSnapshots.swift;
    /// protocol version 4).
    case snapshotRead = 21
    case snapshotGenerations = 22
}

/// Header flag bits. Bits other than these are reserved and must be zero (a peer that sets
/// one speaks something we do not understand).
public enum FrameFlags {
    public static let response: UInt8 = 0x01
    /// On a `write` or `trim` request: a resync copy, applied only to the blocks whose current
    /// generation is lower than the request's. On a `write` or `trim` response: the reply of a
    /// conditional request (if-newer or repair), carrying how many blocks were applied.
    public static let ifNewer: UInt8 = 0x02
    /// Only on a `write` request: a repair, applied only to the blocks whose current generation
    /// is at most the request's (a corrupted block's good copy, never over a newer write).
    public static let repair: UInt8 = 0x04
    /// On a `snapshot` request (and its response): take the snapshot through the engine that
    /// runs the volume on the receiving node (its write barrier over every in-sync replica),
    /// not on this replica alone.
    public static let barrier: UInt8 = 0x08
    /// Only on a `read` response with status `checksumMismatch` (protocol version 2): the
    /// payload ends with the damaged block's number, u64, after the message.
    public static let detail: UInt8 = 0x10
    /// Only on a plain `write` (protocol version 5). On the request: make the write durable
    /// before answering, if the replica can do so cheaply (a journaled small write: the record
    /// is synced). On the response: it is durable — the engine need not flush this replica for
    /// it. A response without it promises only what a write always did.
    public static let durable: UInt8 = 0x20
    public static let known: UInt8 = response | ifNewer | repair | barrier | detail | durable
}

/// The status a response carries. Wire values: never renumber.
public enum ReplyStatus: UInt8, Sendable, CaseIterable {
    case ok = 0
    /// The request's epoch is older than the replica's: the sender was fenced.
    case staleEpoch = 1
    case checksumMismatch = 2
    case outOfRange = 3
    case notFound = 4
    case ioError = 5
    case badRequest = 6
}

/// Why a byte stream was rejected. `reason` is written for a log line:
/// "closing connection: \(error.reason)".
public struct FrameError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        case badMagic
        case unsupportedVersion
        case headerChecksum
        case oversizedPayload
        case unknownOpcode
        case reservedFlags
        case malformedPayload
        /// The stream ended inside a frame.
        case truncated
    }

    public var kind: Kind
    public var reason: String

    public init(_ kind: Kind, _ reason: String) {
        self.kind = kind
        self.reason = reason
    }

    public var description: String { reason }
}

// MARK: - Header

/// The 32-byte frame header (every integer little-endian):
/// magic u32 | version u16 | op u8 | flags u8 | request id u64 | payload length u32 |
/// epoch u64 | header crc32c u32 (over the first 28 bytes).
public struct FrameHeader: Equatable, Sendable {
    public var opcode: Opcode
    public var flags: UInt8
    public var requestID: UInt64
    public var payloadLength: UInt32
    public var epoch: UInt64

    public init(opcode: Opcode, flags: UInt8, requestID: UInt64, payloadLength: UInt32, epoch: UInt64) {
        self.opcode = opcode
        self.flags = flags
        self.requestID = requestID
        self.payloadLength = payloadLength
        self.epoch = epoch
    }

    public var isResponse: Bool { flags & FrameFlags.response != 0 }

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: FrameLimits.headerSize)
        w.write(FrameLimits.magic)
        w.write(FrameLimits.version)
        w.write(opcode.rawValue)
        w.write(flags)
        w.write(requestID)
        w.write(payloadLength)
        w.write(epoch)
        w.write(CRC32C.checksum(w.bytes))
        return w.bytes
    }

    /// Throws `badMagic` unless `bytes` (the first four of a frame) are 'CRNF'; lets a stream
    /// decoder reject a stranger before a whole header has arrived.
    public static func checkMagic(_ bytes: some Collection<UInt8>) throws(FrameError) {
        var r = ByteReader(bytes.prefix(4))
        let magic = try r.readUInt32("magic")
        guard magic == FrameLimits.magic else {
            throw FrameError(.badMagic, "bad frame magic 0x\(String(magic, radix: 16, uppercase: true)) (expected 'CRNF')")
        }
    }

    /// Decodes and validates a header from exactly `FrameLimits.headerSize` bytes. Checks, in
    /// order: magic, version (so a newer peer is told apart from garbage), checksum, payload
    /// length, opcode, flags.
    public init(decoding bytes: some Collection<UInt8>) throws(FrameError) {
        let bytes = Array(bytes)
        guard bytes.count == FrameLimits.headerSize else {
            throw FrameError(.truncated, "frame header is \(bytes.count) bytes, expected \(FrameLimits.headerSize)")
        }
        try Self.checkMagic(bytes[0..<4])
        var r = ByteReader(bytes)
        _ = try r.readUInt32("magic")
        let version = try r.readUInt16("version")
        guard version == FrameLimits.version else {
            throw FrameError(.unsupportedVersion, "unsupported protocol version \(version) (this side speaks \(FrameLimits.version))")
        }
        let rawOpcode = try r.readUInt8("op")
        let flags = try r.readUInt8("flags")
        let requestID = try r.readUInt64("request id")
        let payloadLength = try r.readUInt32("payload length")
        let epoch = try r.readUInt64("epoch")
        let crc = try r.readUInt32("header crc")
        let expected = CRC32C.checksum(Array(bytes[0..<FrameLimits.checksummedHeaderSize]))
        guard crc == expected else {
            throw FrameError(.headerChecksum, "frame header checksum mismatch (got 0x\(String(crc, radix: 16)), computed 0x\(String(expected, radix: 16)))")
        }
        guard UInt64(payloadLength) <= UInt64(FrameLimits.maxPayloadLength) else {
            throw FrameError(.oversizedPayload, "payload length \(payloadLength) exceeds the limit of \(FrameLimits.maxPayloadLength) bytes (request id \(requestID))")
        }
        guard let opcode = Opcode(rawValue: rawOpcode) else {
            throw FrameError(.unknownOpcode, "unknown op \(rawOpcode) (request id \(requestID))")
        }
        if let error = Self.flagError(opcode: opcode, flags: flags, requestID: requestID) { throw error }
        self.init(opcode: opcode, flags: flags, requestID: requestID, payloadLength: payloadLength, epoch: epoch)
    }

    /// `init(decoding:)` for bytes in memory (every frame a connection receives): the same
    /// checks in the same order, read in place — no copies into arrays, no generic reader.
    /// Any header that fails a check is handed to the general decoder, which names the fault.
    public init(decoding raw: UnsafeRawBufferPointer) throws(FrameError) {
        if raw.count == FrameLimits.headerSize, let header = Self.decodedInPlace(raw) {
            self = header
            return
        }
        try self.init(decoding: Array(raw))
    }

    /// The header in `raw` (exactly `headerSize` bytes) when it passes every check; nil otherwise.
    private static func decodedInPlace(_ raw: UnsafeRawBufferPointer) -> FrameHeader? {
        guard UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) == FrameLimits.magic,
              UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt16.self)) == FrameLimits.version,
              UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 28, as: UInt32.self))
                == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[0..<FrameLimits.checksummedHeaderSize])) else { return nil }
        let flags = raw[7]
        let requestID = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let payloadLength = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        guard UInt64(payloadLength) <= UInt64(FrameLimits.maxPayloadLength), let opcode = Opcode(rawValue: raw[6]),
              flagError(opcode: opcode, flags: flags, requestID: requestID) == nil else { return nil }
        return FrameHeader(opcode: opcode, flags: flags, requestID: requestID, payloadLength: payloadLength,
                           epoch: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 20, as: UInt64.self)))
    }

    /// Why `flags` are not valid on `opcode`'s frames; nil when they are.
    private static func flagError(opcode: Opcode, flags: UInt8, requestID: UInt64) -> FrameError? {
        guard flags & ~FrameFlags.known == 0 else {
            return FrameError(.reservedFlags, "reserved flag bits set: 0x\(String(flags, radix: 16)) (request id \(requestID))")
        }
        guard flags & FrameFlags.ifNewer == 0 || opcode == .write || opcode == .trim else {
            return FrameError(.reservedFlags, "the if-newer flag is only valid on write and trim, not \(opcode) (request id \(requestID))")
        }
        guard flags & FrameFlags.repair == 0 || (opcode == .write && flags & (FrameFlags.response | FrameFlags.ifNewer) == 0) else {
            return FrameError(.reservedFlags, "the repair flag is only valid on a write request, without if-newer (request id \(requestID))")
        }
        guard flags & FrameFlags.barrier == 0 || opcode == .snapshot else {
            return FrameError(.reservedFlags, "the barrier flag is only valid on snapshot, not \(opcode) (request id \(requestID))")
        }
        guard flags & FrameFlags.detail == 0 || (opcode == .read && flags & FrameFlags.response != 0) else {
            return FrameError(.reservedFlags, "the detail flag is only valid on a read response, not \(opcode) (request id \(requestID))")
        }
        guard flags & FrameFlags.durable == 0 || (opcode == .write && flags & (FrameFlags.ifNewer | FrameFlags.repair) == 0) else {
            return FrameError(.reservedFlags, "the durable flag is only valid on a plain write, not \(opcode) (request id \(requestID))")
        }
        return nil
    }
}

// MARK: - Frame

/// One frame: the header's identity fields plus a typed body. The opcode and the response flag
/// follow from the body; the payload length from its encoding.
public struct Frame: Equatable, Sendable {
    public enum Body: Equatable, Sendable {
        case request(FrameMessage)
        case response(FrameMessage)
    }

    public var requestID: UInt64
    /// The sender's epoch: every request carries it (a `claim` claims it); a response echoes
    /// the replica's current epoch.
    public var epoch: UInt64
    public var body: Body

    public init(requestID: UInt64, epoch: UInt64, body: Body) {
        self.requestID = requestID
        self.epoch = epoch
        self.body = body
    }

    public var message: FrameMessage {
        switch body {
        case .request(let m), .response(let m): m
        }
    }

    public var opcode: Opcode { message.opcode }

    public var isResponse: Bool {
        if case .response = body { return true }
        return false
    }

    /// The body as `Op`'s request; nil for a response or another op's frame.
    public func request<Op: DataOperation>(_: Op.Type) -> Op.Request? {
        guard case .request(let m) = body, m.opcode == Op.opcode else { return nil }
        return m.as(Op.Request.self)
    }

    /// The body as `Op`'s response; nil for a request or another op's frame.
    public func response<Op: DataOperation>(_: Op.Type) -> Op.Response? {
        guard case .response(let m) = body, m.opcode == Op.opcode else { return nil }
        return m.as(Op.Response.self)
    }

    /// The header's flag bits, which follow from the body.
    public var headerFlags: UInt8 { (isResponse ? FrameFlags.response : 0) | message.headerFlags }

    /// The payload's bytes (without the header).
    public func encodePayload() -> [UInt8] { message.encode() }

    /// Header and payload, ready for the socket.
    public func encode() -> [UInt8] {
        let payload = encodePayload()
        let header = FrameHeader(
            opcode: opcode, flags: headerFlags, requestID: requestID,
            payloadLength: UInt32(clamping: payload.count), epoch: epoch)
        return header.encode() + payload
    }

    /// Builds a frame from a validated header and its complete payload, decoded by the op the
    /// header names.
    public init(header: FrameHeader, payload: some Collection<UInt8>) throws(FrameError) {
        guard payload.count == Int(header.payloadLength) else {
            throw FrameError(.truncated, "payload is \(payload.count) bytes, header says \(header.payloadLength) (request id \(header.requestID))")
        }
        guard let op = DataOp.operation(header.opcode) else {
            throw FrameError(.unknownOpcode, "no operation is declared for op \(header.opcode) (request id \(header.requestID))")
        }
        let message: FrameMessage
        do throws(FrameError) {
            // The data path's ops by their concrete types (decoders specialized for this
            // payload), every other through the op table.
            switch header.opcode {
            case .write: message = try DataOp.Write.decode(response: header.isResponse, flags: header.flags, payload: payload)
            case .read: message = try DataOp.Read.decode(response: header.isResponse, flags: header.flags, payload: payload)
            case .flush: message = try DataOp.Flush.decode(response: header.isResponse, flags: header.flags, payload: payload)
            default: message = try op.decode(response: header.isResponse, flags: header.flags, payload: payload)
            }
        } catch {
            throw FrameError(error.kind, "\(error.reason) (\(op.name) \(header.isResponse ? "response" : "request"), request id \(header.requestID))")
        }
        self.init(requestID: header.requestID, epoch: header.epoch, body: header.isResponse ? .response(message) : .request(message))
    }
}

// MARK: - Messages
//
// Layouts (all little-endian; a volume id is u16 byte length + UTF-8, 1...128 bytes; data is
// u32 byte length + bytes; a payload with bytes left over is malformed):
//   hello    req: version u16 | token (u16 length + bytes, ≤ 128)
//            rsp: status u8 | version u16 | token
//   claim    req: volume                       (the claimed epoch is the header's)
//            rsp: status u8 | replica epoch u64
//   read     req: volume | offset u64 | length u32
//            rsp: status u8 | data | message [| damaged block u64: flag `detail`, checksum-mismatch]
//   write    req: volume | generation u64 | offset u64 | data
//            rsp: status u8
//   flush    req: volume
//            rsp: status u8 | flushed generation u64
//   trim     req: volume | generation u64 | offset u64 | length u64  (u64: one trim may cover a volume)
//            rsp: status u8
//   status   req: volume
//            rsp: status u8 | size u64 | replica epoch u64 | flushed generation u64 |
//                 highest generation u64
//   create   req: volume | size u64          (idempotent for the same size)
//            rsp: status u8
//   delete   req: volume                       (idempotent)
//            rsp: status u8
//   generations req: volume | first block u64 | count u32 (1...65536)
//            rsp: status u8 | count u32 | count × generation u64 (bit 63: trimmed; empty unless ok)
//   summary  req: volume | first region u64 | count u32 (1...4096; a region is 256 blocks)
//            rsp: status u8 | count u32 | count × digest u64 (0: no block of the region written)
//   verify   req: volume | first block u64 | count u32 (1...16384)
//            rsp: status u8 | count u32 | count × block number u64 (the blocks that fail their crc32c)
//   snapshot req: volume | snapshot id           (flag `barrier`: through the volume's engine)
//            rsp: status u8 | size u64 | generation u64 | node count u16 | node ids (each
//                 u16 length + UTF-8; the nodes holding it, filled by a barrier snapshot)
//   deleteSnapshot req: volume | snapshot id     (idempotent)
//            rsp: status u8
//   listSnapshots req: volume
//            rsp: status u8 | count u16 | count × (snapshot id | size u64 | generation u64)
//   clone    req: new volume | source volume | snapshot id | size u64
//            rsp: status u8
//   grow     req: volume | size u64
//            rsp: status u8
//   holdWrites req: volume | timeout ms u32 (1...600000; the hold lapses by itself after it)
//            rsp: status u8
//   releaseWrites req: volume
//            rsp: status u8
//   activity req: volume | clean-through generation u64 | flags u8 (bit 0: converged)
//            rsp: status u8 | all u8 | count u32 | count × region u64 (1 MiB regions written
//                 above the clean watermark; all = 1: the replica cannot tell, compare it whole)
// A write with the header flag `ifNewer` (a resync write) or `repair`, and a trim with
// `ifNewer`, answer status u8 | applied blocks u32, with `ifNewer` set in the response header.
// Every response ends with a message (u16 length + UTF-8, ≤ 1024 bytes; empty on success).

public struct HelloRequest: WireCodable {
    public var protocolVersion: UInt16
    /// Opaque cluster authentication (a key id + MAC later); empty for now.
    public var authToken: [UInt8]

    public init(protocolVersion: UInt16 = FrameLimits.protocolVersion, authToken: [UInt8] = []) {
        self.protocolVersion = protocolVersion
        self.authToken = authToken
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(protocolVersion)
        w.writeToken(authToken)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        protocolVersion = try r.readUInt16("protocol version")
        authToken = try r.readToken()
        try r.expectEnd()
    }
}

public struct HelloResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String
    public var protocolVersion: UInt16
    /// Opaque: room for the replica's half of a mutual authentication.
    public var authToken: [UInt8]

    public init(failure: ReplyFailure) { self.init(status: failure.status, message: failure.message) }

    public init(status: ReplyStatus, protocolVersion: UInt16 = FrameLimits.protocolVersion, authToken: [UInt8] = [], message: String = "") {
        self.message = message
        self.status = status
        self.protocolVersion = protocolVersion
        self.authToken = authToken
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        w.write(protocolVersion)
        w.writeToken(authToken)
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        protocolVersion = try r.readUInt16("protocol version")
        authToken = try r.readToken()
        message = try r.readMessage()
        try r.expectEnd()
    }
}

/// The requests that name a volume and nothing else (`claim`, `flush`, `status`, `delete`,
/// `listSnapshots`, `releaseWrites`): volume.
public struct VolumeRequest: WireCodable {
    public var volume: String

    public init(volume: String) { self.volume = volume }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        try r.expectEnd()
    }
}

/// A flush: volume [| through generation u64]. `through` (protocol version 3) is the engine's
/// word that every write numbered at or below it has finished on the replica, so the replica
/// records that as flushed rather than the highest generation it happened to see (a write
/// still on its way with a lower number would otherwise be counted). Without it the request
/// is the earlier versions' `VolumeRequest`, byte for byte.
public struct FlushRequest: WireCodable {
    public var volume: String
    public var through: UInt64?

    public init(volume: String, through: UInt64? = nil) {
        self.volume = volume
        self.through = through
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        if let through { w.write(through) }
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        through = r.remaining > 0 ? try r.readUInt64("flush through generation") : nil
        try r.expectEnd()
    }
}

public typealias StatusRequest = VolumeRequest
public typealias DeleteRequest = VolumeRequest

public struct ClaimResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String
    /// The replica's epoch after the claim (on `staleEpoch`: the newer epoch that fenced us).
    public var replicaEpoch: UInt64

    public init(status: ReplyStatus, replicaEpoch: UInt64, message: String = "") {
        self.message = message
        self.status = status
        self.replicaEpoch = replicaEpoch
    }

    public init(failure: ReplyFailure) { self.init(status: failure.status, replicaEpoch: failure.epoch, message: failure.message) }

    public var headerEpoch: UInt64? { replicaEpoch }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        w.write(replicaEpoch)
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        replicaEpoch = try r.readUInt64("replica epoch")
        message = try r.readMessage()
        try r.expectEnd()
    }
}

public struct ReadRequest: WireCodable {
    public var volume: String
    public var offset: UInt64
    public var length: UInt32

    public init(volume: String, offset: UInt64, length: UInt32) {
        self.volume = volume
        self.offset = offset
        self.length = length
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.write(offset)
        w.write(length)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        offset = try r.readUInt64("offset")
        length = try r.readUInt32("length")
        try r.expectEnd()
        try validateBlockRange(offset: offset, length: UInt64(length), maxLength: UInt64(FrameLimits.maxDataLength), what: "read")
    }
}

public struct ReadResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String
    /// Whole blocks; empty unless `status` is `ok`.
    public var data: [UInt8]
    /// On `checksumMismatch`: the block whose data failed its checksum (protocol version 2;
    /// `FrameFlags.detail` in the header, the u64 after the message).
    public var damagedBlock: UInt64?

    public init(status: ReplyStatus, data: [UInt8] = [], damagedBlock: UInt64? = nil, message: String = "") {
        self.message = message
        self.status = status
        self.data = data
        self.damagedBlock = damagedBlock
    }

    public init(failure: ReplyFailure) {
        self.init(status: failure.status, damagedBlock: failure.status == .checksumMismatch ? failure.damagedBlock : nil,
                  message: failure.message)
    }

    public var headerFlags: UInt8 { damagedBlock == nil ? 0 : FrameFlags.detail }

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: 13 + data.count)
        w.write(status.rawValue)
        w.writeData(data)
        w.writeMessage(message)
        if let damagedBlock { w.write(damagedBlock) }
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        data = try r.readData(allowEmpty: true)
        message = try r.readMessage()
        damagedBlock = flags & FrameFlags.detail != 0 ? try r.readUInt64("damaged block") : nil
        try r.expectEnd()
        guard status == .ok || data.isEmpty else {
            throw FrameError(.malformedPayload, "read response with status \(status) carries \(data.count) bytes of data")
        }
        guard damagedBlock == nil || status == .checksumMismatch else {
            throw FrameError(.malformedPayload, "read response with status \(status) names a damaged block")
        }
    }
}

public struct WriteRequest: WireCodable {
    public var volume: String
    /// The volume-wide write generation (strictly increasing, assigned by the engine).
    public var generation: UInt64
    public var offset: UInt64
    /// Whole 4 KiB blocks, at most `FrameLimits.maxDataLength`, in aligned memory (decoded
    /// once from the wire into memory the store writes from directly).
    public var data: BlockData
    /// A resync write (`FrameFlags.ifNewer` in the header, not in the payload): applied only to
    /// the blocks whose current generation is lower than `generation`.
    public var ifNewer: Bool
    /// A repair (`FrameFlags.repair` in the header): applied only to the blocks whose current
    /// generation is at most `generation`.
    public var repair: Bool
    /// Asks for the write to be made durable before the answer (`FrameFlags.durable`; plain
    /// writes only).
    public var durable: Bool

    public init(volume: String, generation: UInt64, offset: UInt64, data: BlockData, ifNewer: Bool = false,
                repair: Bool = false, durable: Bool = false) {
        self.volume = volume
        self.generation = generation
        self.offset = offset
        self.data = data
        self.ifNewer = ifNewer
        self.repair = repair
        self.durable = durable
    }

    public init(volume: String, generation: UInt64, offset: UInt64, data: [UInt8], ifNewer: Bool = false,
                repair: Bool = false, durable: Bool = false) {
        self.init(volume: volume, generation: generation, offset: offset, data: BlockData(data), ifNewer: ifNewer,
                  repair: repair, durable: durable)
    }

    public var headerFlags: UInt8 {
        (ifNewer ? FrameFlags.ifNewer : 0) | (repair ? FrameFlags.repair : 0) | (durable ? FrameFlags.durable : 0)
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: 2 + volume.utf8.count + 20 + data.count)
        w.writeVolume(volume)
        w.write(generation)
        w.write(offset)
        w.writeData(data)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        generation = try r.readUInt64("generation")
        offset = try r.readUInt64("offset")
        data = try r.readBlockData()
        ifNewer = flags & FrameFlags.ifNewer != 0
        repair = flags & FrameFlags.repair != 0
        durable = flags & FrameFlags.durable != 0
        try r.expectEnd()
        guard generation != 0 else {
            // Generation 0 means "never written" in the block map.
            throw FrameError(.malformedPayload, "write generation 0 is reserved")
        }
        try validateBlockRange(offset: offset, length: UInt64(data.count), maxLength: UInt64(FrameLimits.maxDataLength), what: "write")
    }
}

/// The response of the ops that answer with a status (and a message) only.
public struct PlainResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String

    public init(status: ReplyStatus, message: String = "") {
        self.status = status
        self.message = message
    }

    public init(failure: ReplyFailure) { self.init(status: failure.status, message: failure.message) }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        message = try r.readMessage()
        try r.expectEnd()
    }
}

public struct FlushResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String
    /// The generation recorded as durable by this flush.
    public var flushedGeneration: UInt64

    public init(status: ReplyStatus, flushedGeneration: UInt64, message: String = "") {
        self.message = message
        self.status = status
        self.flushedGeneration = flushedGeneration
    }

    public init(failure: ReplyFailure) { self.init(status: failure.status, flushedGeneration: 0, message: failure.message) }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        w.write(flushedGeneration)
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        flushedGeneration = try r.readUInt64("flushed generation")
        message = try r.readMessage()
        try r.expectEnd()
    }
}

public struct TrimRequest: WireCodable {
    public var volume: String
    /// The generation the trimmed blocks take (so a delta resync sees the trim); 0 lets the
    /// replica use the highest generation it has written.
    public var generation: UInt64
    public var offset: UInt64
    public var length: UInt64
    /// A resync trim (`FrameFlags.ifNewer` in the header): only the blocks whose current
    /// generation is lower than `generation` are trimmed.
    public var ifNewer: Bool

    public init(volume: String, generation: UInt64 = 0, offset: UInt64, length: UInt64, ifNewer: Bool = false) {
        self.volume = volume
        self.generation = generation
        self.offset = offset
        self.length = length
        self.ifNewer = ifNewer
    }

    public var headerFlags: UInt8 { ifNewer ? FrameFlags.ifNewer : 0 }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.write(generation)
        w.write(offset)
        w.write(length)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        generation = try r.readUInt64("generation")
        offset = try r.readUInt64("offset")
        length = try r.readUInt64("length")
        ifNewer = flags & FrameFlags.ifNewer != 0
        try r.expectEnd()
        try validateBlockRange(offset: offset, length: length, maxLength: .max, what: "trim")
    }
}

public struct StatusResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String
    public var size: UInt64
    public var replicaEpoch: UInt64
    public var flushedGeneration: UInt64
    /// The highest generation written, durable or not.
    public var highestGeneration: UInt64

    public init(status: ReplyStatus, size: UInt64, replicaEpoch: UInt64, flushedGeneration: UInt64,
                highestGeneration: UInt64 = 0, message: String = "") {
        self.message = message
        self.status = status
        self.size = size
        self.replicaEpoch = replicaEpoch
        self.flushedGeneration = flushedGeneration
        self.highestGeneration = highestGeneration
    }

    public init(failure: ReplyFailure) {
        self.init(status: failure.status, size: 0, replicaEpoch: failure.epoch, flushedGeneration: 0, message: failure.message)
    }

    public var headerEpoch: UInt64? { replicaEpoch }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        w.write(size)
        w.write(replicaEpoch)
        w.write(flushedGeneration)
        w.write(highestGeneration)
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        size = try r.readUInt64("size")
        replicaEpoch = try r.readUInt64("replica epoch")
        flushedGeneration = try r.readUInt64("flushed generation")
        highestGeneration = try r.readUInt64("highest generation")
        message = try r.readMessage()
        try r.expectEnd()
    }
}

public struct CreateRequest: WireCodable {
    public var volume: String
    /// Bytes, a positive multiple of 4096.
    public var size: UInt64

    public init(volume: String, size: UInt64) {
        self.volume = volume
        self.size = size
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.write(size)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        size = try r.readUInt64("size")
        try r.expectEnd()
        guard size != 0, size % UInt64(FrameLimits.blockSize) == 0 else {
            // The frame's error names the op (create or grow).
            throw FrameError(.malformedPayload, "size \(size) is not a positive multiple of \(FrameLimits.blockSize)")
        }
    }
}

/// Block generations as the `generations` op reports them: the block map's generation, with
/// `trimmedBit` set for a trimmed block (0: never written). Real generations stay below 2^63
/// (the store refuses higher ones), so the bit is free; two replicas hold the same version of a
/// block exactly when the reported values are equal.
public enum BlockGenerations {
    public static let trimmedBit: UInt64 = 1 << 63
    /// The largest generation a write or trim may carry.
    public static let maxGeneration: UInt64 = trimmedBit - 1

    /// The generation without the trimmed bit.
    public static func generation(_ reported: UInt64) -> UInt64 { reported & ~trimmedBit }
    public static func isTrimmed(_ reported: UInt64) -> Bool { reported & trimmedBit != 0 }
}

public struct GenerationsRequest: WireCodable {
    public var volume: String
    public var firstBlock: UInt64
    /// 1...`FrameLimits.maxGenerationsCount` blocks (the replica answers `bad-request` otherwise).
    public var count: UInt32

    public init(volume: String, firstBlock: UInt64, count: UInt32) {
        self.volume = volume
        self.firstBlock = firstBlock
        self.count = count
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        w.write(firstBlock)
        w.write(count)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        firstBlock = try r.readUInt64("first block")
        count = try r.readUInt32("count")
        // The count and the range are the replica's to refuse (bad-request, out-of-range): a
        // wrong one is an answerable mistake, not a reason to close the connection.
        try r.expectEnd()
    }
}

public struct GenerationsResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String
    /// One per block asked about (see `BlockGenerations`); empty unless `status` is `ok`.
    public var generations: [UInt64]

    public init(status: ReplyStatus, generations: [UInt64] = [], message: String = "") {
        self.status = status
        self.generations = generations
        self.message = message
    }

    public init(failure: ReplyFailure) { self.init(status: failure.status, message: failure.message) }

    public func encode() -> [UInt8] {
        var w = ByteWriter(capacity: 7 + 8 * generations.count)
        w.write(status.rawValue)
        w.write(UInt32(clamping: generations.count))
        for g in generations.prefix(Int(UInt32.max)) { w.write(g) }
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        let count = try r.readUInt32("generations count")
        guard count <= FrameLimits.maxGenerationsCount else {
            throw FrameError(.malformedPayload, "generations count \(count) exceeds the limit of \(FrameLimits.maxGenerationsCount)")
        }
        guard status == .ok || count == 0 else {
            throw FrameError(.malformedPayload, "generations response with status \(status) carries \(count) generations")
        }
        guard r.remaining >= Int(count) * 8 else {
            throw FrameError(.malformedPayload, "payload ends inside the generations (needs \(Int(count) * 8) bytes, \(r.remaining) left)")
        }
        var generations: [UInt64] = []
        generations.reserveCapacity(Int(count))
        for _ in 0..<count { generations.append(try r.readUInt64("generation")) }
        self.generations = generations
        message = try r.readMessage()
        try r.expectEnd()
    }
}

/// The response to a `write` or `trim`: status u8 | message for a plain one; for a conditional
/// one (a resync or repair write, an if-newer trim: `FrameFlags.ifNewer` in the response
/// header) status u8 | applied blocks u32 | message.
public struct WriteResponse: WireResponse {
    public var status: ReplyStatus
    /// Why the request failed, for logs and errors; empty on success.
    public var message: String
    /// A conditional request's blocks applied (their generation allowed it); the rest were left
    /// alone. Nil for a plain write or trim; 0 unless `status` is `ok`.
    public var appliedBlocks: UInt32?
    /// A plain write's: it is durable (`FrameFlags.durable`), no flush needed for it.
    public var durable: Bool

    public init(status: ReplyStatus, appliedBlocks: UInt32? = nil, message: String = "", durable: Bool = false) {
        self.status = status
        self.appliedBlocks = appliedBlocks
        self.message = message
        self.durable = durable
    }

    public init(failure: ReplyFailure) {
        let conditional = failure.requestFlags & (FrameFlags.ifNewer | FrameFlags.repair) != 0
        self.init(status: failure.status, appliedBlocks: conditional ? 0 : nil, message: failure.message)
    }

    public var headerFlags: UInt8 {
        (appliedBlocks == nil ? 0 : FrameFlags.ifNewer) | (durable && appliedBlocks == nil ? FrameFlags.durable : 0)
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.write(status.rawValue)
        if let appliedBlocks { w.write(appliedBlocks) }
        w.writeMessage(message)
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        status = try r.readStatus()
        appliedBlocks = flags & FrameFlags.ifNewer != 0 ? try r.readUInt32("applied blocks") : nil
        durable = flags & FrameFlags.durable != 0
        message = try r.readMessage()
        try r.expectEnd()
        guard !durable || status == .ok else {
            throw FrameError(.malformedPayload, "a write response with status \(status) says it is durable")
        }
    }
}

public typealias TrimResponse = WriteResponse

// MARK: - Validation and byte access

/// A non-empty, block-aligned range that does not wrap around 2^64.
func validateBlockRange(offset: UInt64, length: UInt64, maxLength: UInt64, what: String) throws(FrameError) {
    let block = UInt64(FrameLimits.blockSize)
    guard offset % block == 0 else {
        throw FrameError(.malformedPayload, "\(what) offset \(offset) is not a multiple of \(block)")
    }
    guard length != 0, length % block == 0 else {
        throw FrameError(.malformedPayload, "\(what) length \(length) is not a positive multiple of \(block)")
    }
    guard length <= maxLength else {
        throw FrameError(.malformedPayload, "\(what) length \(length) exceeds the limit of \(maxLength) bytes")
    }
    guard !offset.addingReportingOverflow(length).overflow else {
        throw FrameError(.malformedPayload, "\(what) range at \(offset) + \(length) overflows")
    }
}

/// Appends little-endian integers and length-prefixed fields.
struct ByteWriter {
    var bytes: [UInt8] = []

    init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    mutating func write<T: FixedWidthInteger & UnsignedInteger>(_ value: T) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { bytes.append(contentsOf: $0) }
    }

    /// u16 length + UTF-8. Written as given (the decoder enforces 1...128 bytes); only a name
    /// beyond u16 is cut so the stream stays well-framed.
    mutating func writeVolume(_ volume: String) {
        let utf8 = Array(volume.utf8)
        let n = UInt16(clamping: utf8.count)
        write(n)
        bytes.append(contentsOf: utf8[0..<Int(n)])
    }

    mutating func writeToken(_ token: [UInt8]) {
        let n = UInt16(clamping: token.count)
        write(n)
        bytes.append(contentsOf: token[0..<Int(n)])
    }

    /// u16 length + UTF-8, cut (on a character boundary) to `FrameLimits.maxMessageLength`.
    mutating func writeMessage(_ message: String) {
        var utf8 = Array(message.utf8)
        if utf8.count > FrameLimits.maxMessageLength {
            var cut = FrameLimits.maxMessageLength
            while cut > 0, utf8[cut] & 0xC0 == 0x80 { cut -= 1 }
            utf8 = Array(utf8[0..<cut])
        }
        write(UInt16(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    mutating func writeData(_ data: [UInt8]) {
        let n = UInt32(clamping: data.count)
        write(n)
        bytes.append(contentsOf: data[0..<Int(n)])
    }

    mutating func writeData(_ data: BlockData) {
        let n = UInt32(clamping: data.count)
        write(n)
        data.withUnsafeBytes { bytes.append(contentsOf: $0[0..<Int(n)]) }
    }
}

/// Reads little-endian integers and length-prefixed fields from untrusted bytes: every read
/// checks what is left first, so a lying length throws instead of trapping or allocating.
struct ByteReader {
    /// Where the bytes are: a slice (what `FrameDecoder` hands over from its buffer), read in
    /// place, or raw memory the caller keeps valid while this reader lives (a payload decoded
    /// straight from a received chunk). Either way a write's data is copied once, into its
    /// aligned `BlockData`.
    private enum Storage {
        case slice(ArraySlice<UInt8>)
        case raw(UnsafeRawBufferPointer)
    }

    private let storage: Storage
    /// Bytes before this offset (from the start of the payload) are read.
    private var consumed = 0
    private let count: Int

    init(_ bytes: some Collection<UInt8>) {
        if let raw = bytes as? UnsafeRawBufferPointer {
            storage = .raw(raw)
        } else if let slice = bytes as? Slice<UnsafeRawBufferPointer> {
            storage = .raw(UnsafeRawBufferPointer(rebasing: slice))
        } else {
            storage = .slice((bytes as? ArraySlice<UInt8>) ?? ArraySlice(bytes))
        }
        switch storage {
        case .slice(let s): count = s.count
        case .raw(let r): count = r.count
        }
    }

    var remaining: Int { count - consumed }

    private mutating func claim(_ n: Int, _ field: String) throws(FrameError) -> Int {
        guard n >= 0, n <= remaining else {
            throw FrameError(.malformedPayload, "payload ends inside \(field) (needs \(n) bytes, \(remaining) left)")
        }
        defer { consumed += n }
        return consumed
    }

    /// The next `n` bytes (copied when the reader is over raw memory: use it for small fields).
    mutating func take(_ n: Int, _ field: String) throws(FrameError) -> ArraySlice<UInt8> {
        let at = try claim(n, field)
        switch storage {
        case .slice(let s): return s[(s.startIndex + at)..<(s.startIndex + at + n)]
        case .raw(let r): return ArraySlice(UnsafeRawBufferPointer(rebasing: r[at..<(at + n)]))
        }
    }

    /// Calls `body` with the next `n` bytes in place.
    private mutating func withNext<R>(_ n: Int, _ field: String, _ body: (UnsafeRawBufferPointer) -> R) throws(FrameError) -> R {
        let at = try claim(n, field)
        switch storage {
        case .slice(let s):
            return s.withUnsafeBytes { body(UnsafeRawBufferPointer(rebasing: $0[at..<(at + n)])) }
        case .raw(let r):
            return body(UnsafeRawBufferPointer(rebasing: r[at..<(at + n)]))
        }
    }

    private mutating func readInteger<T: FixedWidthInteger & UnsignedInteger>(_: T.Type, _ field: String) throws(FrameError) -> T {
        try withNext(MemoryLayout<T>.size, field) { T(littleEndian: $0.loadUnaligned(as: T.self)) }
    }

    mutating func readUInt8(_ field: String) throws(FrameError) -> UInt8 { try readInteger(UInt8.self, field) }
    mutating func readUInt16(_ field: String) throws(FrameError) -> UInt16 { try readInteger(UInt16.self, field) }
    mutating func readUInt32(_ field: String) throws(FrameError) -> UInt32 { try readInteger(UInt32.self, field) }
    mutating func readUInt64(_ field: String) throws(FrameError) -> UInt64 { try readInteger(UInt64.self, field) }

    mutating func readStatus() throws(FrameError) -> ReplyStatus {
        let raw = try readUInt8("status")
        guard let status = ReplyStatus(rawValue: raw) else {
            throw FrameError(.malformedPayload, "unknown status code \(raw)")
        }
        return status
    }

    mutating func readVolume() throws(FrameError) -> String {
        let n = Int(try readUInt16("volume id length"))
        guard n >= 1, n <= FrameLimits.maxVolumeIDLength else {
            throw FrameError(.malformedPayload, "volume id is \(n) bytes (must be 1...\(FrameLimits.maxVolumeIDLength))")
        }
        guard let volume = try withNext(n, "volume id", { String(validating: $0, as: UTF8.self) }) else {
            throw FrameError(.malformedPayload, "volume id is not valid UTF-8")
        }
        return volume
    }

    mutating func readToken() throws(FrameError) -> [UInt8] {
        let n = Int(try readUInt16("auth token length"))
        guard n <= FrameLimits.maxAuthTokenLength else {
            throw FrameError(.malformedPayload, "auth token is \(n) bytes (limit \(FrameLimits.maxAuthTokenLength))")
        }
        return Array(try take(n, "auth token"))
    }

    mutating func readMessage() throws(FrameError) -> String {
        let n = Int(try readUInt16("message length"))
        guard n <= FrameLimits.maxMessageLength else {
            throw FrameError(.malformedPayload, "message is \(n) bytes (limit \(FrameLimits.maxMessageLength))")
        }
        guard let message = try withNext(n, "message", { String(validating: $0, as: UTF8.self) }) else {
            throw FrameError(.malformedPayload, "message is not valid UTF-8")
        }
        return message
    }

    /// A data field's u32 length, checked: at most `FrameLimits.maxDataLength`, whole blocks.
    private mutating func dataLength(allowEmpty: Bool) throws(FrameError) -> Int {
        let n = Int(try readUInt32("data length"))
        guard n <= FrameLimits.maxDataLength else {
            throw FrameError(.malformedPayload, "data is \(n) bytes (limit \(FrameLimits.maxDataLength))")
        }
        guard n % FrameLimits.blockSize == 0, allowEmpty || n > 0 else {
            throw FrameError(.malformedPayload, "data length \(n) is not a \(allowEmpty ? "" : "positive ")multiple of \(FrameLimits.blockSize)")
        }
        return n
    }

    mutating func readData(allowEmpty: Bool) throws(FrameError) -> [UInt8] {
        let n = try dataLength(allowEmpty: allowEmpty)
        return try withNext(n, "data") { Array($0) }
    }

    /// `readData(allowEmpty: false)` into aligned memory of its own: one copy.
    mutating func readBlockData() throws(FrameError) -> BlockData {
        let n = try dataLength(allowEmpty: false)
        return try withNext(n, "data") { BlockData(copying: $0) }
    }

    func expectEnd() throws(FrameError) {
        guard remaining == 0 else {
            throw FrameError(.malformedPayload, "\(remaining) unexpected bytes after the last field")
        }
    }
}

// MARK: - Hot path

extension WriteRequest {
    /// A write request frame's header and fields, up to (not including) its `dataCount` bytes
    /// of data, which the caller sends right after from where they are: the frame is
    /// `encodeFrameHead(...) + data`, the same bytes as `encodeFrame`.
    public static func encodeFrameHead(requestID: UInt64, epoch: UInt64, volume: String, generation: UInt64,
                                       offset: UInt64, dataCount: Int, ifNewer: Bool = false,
                                       repair: Bool = false, durable: Bool = false) -> [UInt8] {
        var fields = ByteWriter()
        fields.writeVolume(volume)
        fields.write(generation)
        fields.write(offset)
        fields.write(UInt32(clamping: dataCount))
        let flags = (ifNewer ? FrameFlags.ifNewer : 0) | (repair ? FrameFlags.repair : 0) | (durable ? FrameFlags.durable : 0)
        let header = FrameHeader(opcode: .write, flags: flags,
                                 requestID: requestID,
                                 payloadLength: UInt32(clamping: fields.bytes.count + dataCount), epoch: epoch)
        return header.encode() + fields.bytes
    }

    /// A whole write request frame (header and payload) built straight from `data`: the data
    /// is copied once, into the returned buffer. Same bytes as `Frame(...).encode()`.
    public static func encodeFrame(requestID: UInt64, epoch: UInt64, volume: String, generation: UInt64,
                                   offset: UInt64, data: UnsafeRawBufferPointer, ifNewer: Bool = false,
                                   repair: Bool = false, durable: Bool = false) -> [UInt8] {
        var bytes = encodeFrameHead(requestID: requestID, epoch: epoch, volume: volume, generation: generation,
                                    offset: offset, dataCount: data.count, ifNewer: ifNewer, repair: repair,
                                    durable: durable)
        bytes.append(contentsOf: data)
        return bytes
    }
}
