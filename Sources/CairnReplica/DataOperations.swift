// The data protocol's operations, each declared once (docs/replica-format.md, "Data protocol").
//
// An op is a caseless enum conforming to `DataOperation`: its opcode, its request and response
// types (which encode and decode themselves: `WireCodable`) and its name. That one declaration
// drives the frame codec (`Frame` decodes a payload through the op its header names), the
// client (`ReplicaClient.call(Op.self, request, epoch:)`) and the server (`ReplicaServer`'s
// table from opcode to a handler registered per op). Adding an op is a declaration here (and a
// case in `Opcode`, the wire values), a handler in the server's table and, optionally, a
// convenience method on the client.

/// A message that writes and reads its own payload bytes.
public protocol WireCodable: Equatable, Sendable {
    /// Header flag bits this message carries besides `FrameFlags.response` (e.g. a resync
    /// write's `ifNewer`); part of the message, though they travel in the header.
    var headerFlags: UInt8 { get }
    /// The payload's bytes.
    func encode() -> [UInt8]
    /// Decodes a payload; `flags` are the header's (without `FrameFlags.response`).
    init(decoding payload: some Collection<UInt8>, flags: UInt8) throws(FrameError)
}

extension WireCodable {
    public var headerFlags: UInt8 { 0 }

    func isEqual(to other: any WireCodable) -> Bool {
        (other as? Self) == self
    }
}

/// A response: every one starts with a status and ends with a message.
public protocol WireResponse: WireCodable {
    var status: ReplyStatus { get }
    /// Why the request failed, for logs and errors; empty on success.
    var message: String { get }
    /// The response carrying only `failure` (what a refused request is answered with).
    init(failure: ReplyFailure)
    /// The epoch the response's header carries when it is not the request's (the replica's
    /// own, for `claim` and `status`); nil: the request's.
    var headerEpoch: UInt64? { get }
}

extension WireResponse {
    public var headerEpoch: UInt64? { nil }
}

/// Why a request was refused, as the server hands it to the op's response type.
public struct ReplyFailure: Sendable {
    public var status: ReplyStatus
    public var message: String
    /// The epoch the reply carries (on `staleEpoch`: the newer one that fenced the sender).
    public var epoch: UInt64
    /// The request's header flags (a conditional write's failure still carries a count).
    public var requestFlags: UInt8
    /// The block whose data failed its checksum (a `checksumMismatch` of a read), for a peer
    /// that speaks protocol version 2.
    public var damagedBlock: UInt64?

    public init(status: ReplyStatus, message: String, epoch: UInt64 = 0, requestFlags: UInt8 = 0, damagedBlock: UInt64? = nil) {
        self.status = status
        self.message = message
        self.epoch = epoch
        self.requestFlags = requestFlags
        self.damagedBlock = damagedBlock
    }
}

/// One op of the data protocol: everything the codec, the client and the server need to know.
public protocol DataOperation: Sendable {
    associatedtype Request: WireCodable
    associatedtype Response: WireResponse
    static var opcode: Opcode { get }
    /// For logs and errors ("flush request"); the opcode's name unless told otherwise.
    static var name: String { get }
}

extension DataOperation {
    public static var name: String { "\(opcode)" }

    /// A request of this op, ready to be a frame's body.
    public static func request(_ request: Request) -> FrameMessage { FrameMessage(opcode: opcode, value: request) }
    /// A response of this op, ready to be a frame's body.
    public static func response(_ response: Response) -> FrameMessage { FrameMessage(opcode: opcode, value: response) }

    /// The response carrying only `failure`.
    public static func failureResponse(_ failure: ReplyFailure) -> FrameMessage { response(Response(failure: failure)) }

    /// Decodes this op's request or response payload.
    public static func decode(response: Bool, flags: UInt8, payload: some Collection<UInt8>) throws(FrameError) -> FrameMessage {
        let plain = flags & ~FrameFlags.response
        return response ? Self.response(try Response(decoding: payload, flags: plain))
            : Self.request(try Request(decoding: payload, flags: plain))
    }
}

/// Every op of the data protocol, one declaration each. Layouts: docs/replica-format.md.
public enum DataOp {
    public enum Hello: DataOperation {
        public typealias Request = HelloRequest
        public typealias Response = HelloResponse
        public static let opcode = Opcode.hello
    }

    public enum Claim: DataOperation {
        public typealias Request = ClaimRequest
        public typealias Response = ClaimResponse
        public static let opcode = Opcode.claim
    }

    public enum Read: DataOperation {
        public typealias Request = ReadRequest
        public typealias Response = ReadResponse
        public static let opcode = Opcode.read
    }

    /// Plain, resync (`ifNewer`) and repair writes: the flags travel in the request.
    public enum Write: DataOperation {
        public typealias Request = WriteRequest
        public typealias Response = WriteResponse
        public static let opcode = Opcode.write
    }

    public enum Flush: DataOperation {
        public typealias Request = FlushRequest
        public typealias Response = FlushResponse
        public static let opcode = Opcode.flush
    }

    public enum Trim: DataOperation {
        public typealias Request = TrimRequest
        public typealias Response = TrimResponse
        public static let opcode = Opcode.trim
    }

    public enum Status: DataOperation {
        public typealias Request = StatusRequest
        public typealias Response = StatusResponse
        public static let opcode = Opcode.status
    }

    public enum Create: DataOperation {
        public typealias Request = CreateRequest
        public typealias Response = PlainResponse
        public static let opcode = Opcode.create
    }

    public enum Delete: DataOperation {
        public typealias Request = DeleteRequest
        public typealias Response = PlainResponse
        public static let opcode = Opcode.delete
    }

    public enum Generations: DataOperation {
        public typealias Request = GenerationsRequest
        public typealias Response = GenerationsResponse
        public static let opcode = Opcode.generations
    }

    /// The `generations` layout: first *region* (256 blocks), region count; one digest each.
    public enum Summary: DataOperation {
        public typealias Request = GenerationsRequest
        public typealias Response = GenerationsResponse
        public static let opcode = Opcode.summary
    }

    /// The `generations` layout: first block, block count; the bad blocks' numbers.
    public enum Verify: DataOperation {
        public typealias Request = GenerationsRequest
        public typealias Response = GenerationsResponse
        public static let opcode = Opcode.verify
    }

    public enum Snapshot: DataOperation {
        public typealias Request = SnapshotRequest
        public typealias Response = SnapshotResponse
        public static let opcode = Opcode.snapshot
    }

    public enum DeleteSnapshot: DataOperation {
        public typealias Request = SnapshotRequest
        public typealias Response = PlainResponse
        public static let opcode = Opcode.deleteSnapshot
    }

    public enum ListSnapshots: DataOperation {
        public typealias Request = ListSnapshotsRequest
        public typealias Response = ListSnapshotsResponse
        public static let opcode = Opcode.listSnapshots
    }

    public enum Clone: DataOperation {
        public typealias Request = CloneRequest
        public typealias Response = PlainResponse
        public static let opcode = Opcode.clone
    }

    public enum Grow: DataOperation {
        public typealias Request = GrowRequest
        public typealias Response = PlainResponse
        public static let opcode = Opcode.grow
    }

    public enum HoldWrites: DataOperation {
        public typealias Request = HoldWritesRequest
        public typealias Response = PlainResponse
        public static let opcode = Opcode.holdWrites
    }

    public enum ReleaseWrites: DataOperation {
        public typealias Request = ReleaseWritesRequest
        public typealias Response = PlainResponse
        public static let opcode = Opcode.releaseWrites
    }

    public enum Activity: DataOperation {
        public typealias Request = ActivityRequest
        public typealias Response = ActivityResponse
        public static let opcode = Opcode.activity
    }

    /// A sealed snapshot's content (`ReadRequest`'s layout plus the snapshot id); not fenced.
    public enum SnapshotRead: DataOperation {
        public typealias Request = SnapshotReadRequest
        public typealias Response = ReadResponse
        public static let opcode = Opcode.snapshotRead
    }

    /// A sealed snapshot's block generations (`generations`' answer); not fenced.
    public enum SnapshotGenerations: DataOperation {
        public typealias Request = SnapshotGenerationsRequest
        public typealias Response = GenerationsResponse
        public static let opcode = Opcode.snapshotGenerations
    }

    /// Every declared op (the codec's, client's and server's one list).
    public static let all: [any DataOperation.Type] = [
        Hello.self, Claim.self, Read.self, Write.self, Flush.self, Trim.self, Status.self, Create.self, Delete.self,
        Generations.self, Summary.self, Verify.self, Snapshot.self, DeleteSnapshot.self, ListSnapshots.self,
        Clone.self, Grow.self, HoldWrites.self, ReleaseWrites.self, Activity.self, SnapshotRead.self,
        SnapshotGenerations.self,
    ]

    /// The op an opcode names, at the opcode's raw value (every `Opcode` has one: a test pins
    /// it down). An array, not a dictionary: every frame received looks its op up.
    static let byOpcode: [(any DataOperation.Type)?] = {
        var table = [(any DataOperation.Type)?](repeating: nil, count: Int(Opcode.allCases.map(\.rawValue).max() ?? 0) + 1)
        for op in all where table[Int(op.opcode.rawValue)] == nil { table[Int(op.opcode.rawValue)] = op }
        return table
    }()

    public static func operation(_ opcode: Opcode) -> (any DataOperation.Type)? {
        let index = Int(opcode.rawValue)
        return index < byOpcode.count ? byOpcode[index] : nil
    }
}

/// One frame's body: a request or a response of the op `opcode` names (its `Request` or
/// `Response` type), kept as the op declared it.
public struct FrameMessage: Equatable, Sendable, CustomStringConvertible {
    public let opcode: Opcode
    public let value: any WireCodable

    init(opcode: Opcode, value: any WireCodable) {
        self.opcode = opcode
        self.value = value
    }

    public var headerFlags: UInt8 { value.headerFlags }
    public func encode() -> [UInt8] { value.encode() }

    /// The message as `Op`'s request or response type; nil for another op's message.
    public func `as`<T: WireCodable>(_: T.Type) -> T? { value as? T }

    public static func == (a: FrameMessage, b: FrameMessage) -> Bool {
        a.opcode == b.opcode && a.value.isEqual(to: b.value)
    }

    public var description: String { "\(opcode): \(value)" }
}
