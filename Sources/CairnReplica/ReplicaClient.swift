// The replica client: one TCP connection to a replica server, shared by many threads.
//
// Owns: the connection (connect with a timeout, hello), request ids, pipelining (any number of
// callers send on the one socket and each waits for its own reply; a request sent while another
// thread is sending goes out in that thread's next write, FrameSendQueue), reading the replies
// (no reader thread: a waiting caller reads the socket itself while no other does — the leader —
// and hands the replies it finds to their waiters, which sleep meanwhile; when its own reply is
// in, it wakes one sleeping waiter to read next. At queue depth 1 the reply wakes the thread
// waiting for it directly, without a hop through a reader thread), timeouts, and the "broken"
// state: after any
// connection error, protocol violation or timeout the socket is shut down, every waiter fails
// with `.connection`, and every later call fails fast. Reconnecting is the caller's decision
// (the engine must first decide whether the replica is still in sync).
//
// Does not own: retries, replica selection, generations or epochs (the engine numbers writes
// and holds the epoch; the client only carries them).

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CairnSecurity
import Dispatch
import Logging
import Synchronization

public enum ReplicaClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The replica answered with an error (`staleEpoch` is how fencing shows).
    case remote(ReplyStatus, String)
    /// Connect/IO failure or closed; the connection is now broken.
    case connection(String)
    /// No reply within the request timeout; the connection is now broken.
    case timeout(String)
    /// The replica found the data of this block not matching its checksum (a read's
    /// `checksumMismatch`; protocol version 2 names the block).
    case damagedBlock(UInt64, String)

    /// The replica's status, for an error the replica answered with.
    public var replyStatus: ReplyStatus? {
        switch self {
        case .remote(let status, _): status
        case .damagedBlock: .checksumMismatch
        case .connection, .timeout: nil
        }
    }

    public var description: String {
        switch self {
        case let .remote(status, message): "replica refused the request (\(status)): \(message)"
        case let .connection(reason): "replica connection failed: \(reason)"
        case let .timeout(reason): "replica request timed out: \(reason)"
        case let .damagedBlock(_, message): "replica refused the request (\(ReplyStatus.checksumMismatch)): \(message)"
        }
    }
}

public final class ReplicaClient: Sendable {
    public let address: ReplicaAddress
    public let requestTimeout: Duration
    let fd: Int32
    /// The authenticated channel (auth and secure modes); nil for plain TCP.
    private let channel: SecureChannel?
    private let logger: Logger
    private let state = PlainLocked(ClientState())
    /// Every request goes out through it; closed (with the descriptor) by the reader on its way out.
    let sendQueue: FrameSendQueue
    /// Signalled once the connection is torn down (socket closed, waiters failed).
    private let readerDone = DispatchSemaphore(value: 0)
    /// The receive side: touched only by the thread holding the reader role (`ClientState.reading`).
    private let readSide: ReadSide
    private let receivedBytes = Atomic<UInt64>(0)
    private let negotiated = Atomic<UInt16>(FrameLimits.supportedProtocolVersions.lowerBound)

    /// The data protocol version the hello settled on (what this server understands).
    public var protocolVersion: UInt16 { negotiated.load(ordering: .relaxed) }

    /// Every byte this connection sent (frames whole, headers included).
    public var bytesSent: UInt64 { sendQueue.bytesWritten }
    /// Every byte this connection received.
    public var bytesReceived: UInt64 { receivedBytes.load(ordering: .relaxed) }

    private struct ClientState {
        var nextRequestID: UInt64 = 1
        var waiters: [UInt64: Waiter] = [:]
        /// Why the connection is unusable; nil while it works.
        var broken: String?
        /// A thread holds the reader role (reads the socket and hands replies out).
        var reading = false
        /// The connection was torn down: nobody reads again.
        var tornDown = false
        /// Waiters asleep while another thread reads: one of them takes the reader role when
        /// the reader leaves.
        var sleepers: [UInt64: Waiter] = [:]
    }

    /// The decoder and plaintext buffer of the receive side. Only the thread holding the reader
    /// role touches them, so they need no lock of their own.
    private final class ReadSide: @unchecked Sendable {
        var decoder = FrameDecoder()
        let buffer: UnsafeMutableRawBufferPointer

        init(bufferSize: Int) {
            buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 16)
        }

        deinit { buffer.deallocate() }
    }

    /// One caller waiting for the reply to one request.
    private final class Waiter: Sendable {
        let done = DispatchSemaphore(value: 0)
        let result = Mutex<Result<Frame, ReplicaClientError>?>(nil)

        func complete(_ r: Result<Frame, ReplicaClientError>) {
            result.withLock { if $0 == nil { $0 = r } }
            done.signal()
        }
    }

    /// Connects, authenticates (with `security`), sends hello and waits for the reply (each
    /// within `connectTimeout`). With security, the server must prove it is a node of this
    /// identity's trust domain — `expectedNode` when given (the node the store says holds the
    /// replica) — or the connection is refused.
    public init(host: String, port: UInt16, connectTimeout: Duration = .seconds(3),
                requestTimeout: Duration = .seconds(10), logger: Logger = ReplicaStore.discardingLogger,
                protocolVersion: UInt16 = FrameLimits.protocolVersion,
                security: DataPlaneSecurity = .insecure, expectedNode: String? = nil) throws {
        self.address = ReplicaAddress(host: host, port: port)
        self.requestTimeout = requestTimeout
        self.logger = logger
        do {
            self.fd = try Socket.connect(host: host, port: port, timeout: connectTimeout)
        } catch {
            throw ReplicaClientError.connection("\(error)")
        }
        do {
            self.channel = try Self.authenticate(fd: fd, address: address, security: security, expectedNode: expectedNode,
                                                 timeout: connectTimeout)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        sendQueue = FrameSendQueue { [fd, channel] parts in
            if let channel { try channel.send(parts) } else { try StreamSocket.sendAll(fd, parts) }
        }
        readSide = ReadSide(bufferSize: channel == nil ? ReplicaServer.receiveBufferSize : 0)
        // A reply's record that stops arriving halfway (the peer hangs, the network is cut)
        // must not hold the reading caller forever: the secure channel waits in recv for the
        // rest of a record, so recv itself gives up after the request timeout.
        let (seconds, attoseconds) = max(requestTimeout, .milliseconds(1)).components
        var limit = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        do {
            let hello = try call(DataOp.Hello.self, HelloRequest(protocolVersion: protocolVersion), epoch: 0, timeout: connectTimeout)
            guard FrameLimits.supportedProtocolVersions.contains(hello.protocolVersion) else {
                throw protocolViolation("hello answered with protocol version \(hello.protocolVersion)")
            }
            negotiated.store(min(hello.protocolVersion, protocolVersion), ordering: .relaxed)
        } catch {
            close()
            throw error
        }
        logger.debug("replica connection established", metadata: ["replica.address": "\(address)"])
    }

    /// The handshake of a secure connection, and the check of who answered.
    private static func authenticate(fd: Int32, address: ReplicaAddress, security: DataPlaneSecurity, expectedNode: String?,
                                     timeout: Duration) throws(ReplicaClientError) -> SecureChannel? {
        guard let identity = security.identity else { return nil }
        let channel: SecureChannel
        do {
            channel = try SecureChannel.establish(fd: fd, asServer: false, mode: security.mode, context: identity.current,
                                                  timeout: timeout)
        } catch {
            throw .connection("cannot authenticate the replica server \(address): \(error)")
        }
        let td = identity.trustDomain
        guard let node = channel.peer.node(in: td) else {
            throw .connection("the replica server \(address) presented a certificate (\(channel.peer)) that names no node of trust domain \(td); refusing it")
        }
        if let expectedNode, node != expectedNode {
            throw .connection("the replica server \(address) is node \(node), not node \(expectedNode) that the store says holds the replica; refusing it")
        }
        return channel
    }

    /// Connects at the newest protocol version the server speaks: a server of an older release
    /// (a rolling upgrade reaches engines before some agents) refuses a newer hello with
    /// badRequest and closes; the client then connects again one version lower.
    public static func connect(host: String, port: UInt16, connectTimeout: Duration = .seconds(3),
                               requestTimeout: Duration = .seconds(10),
                               logger: Logger = ReplicaStore.discardingLogger,
                               security: DataPlaneSecurity = .insecure, expectedNode: String? = nil) throws -> ReplicaClient {
        var version = FrameLimits.protocolVersion
        while true {
            do {
                return try ReplicaClient(host: host, port: port, connectTimeout: connectTimeout,
                                         requestTimeout: requestTimeout, logger: logger, protocolVersion: version,
                                         security: security, expectedNode: expectedNode)
            } catch ReplicaClientError.remote(.badRequest, let message)
                        where version > FrameLimits.supportedProtocolVersions.lowerBound && message.contains("protocol version") {
                logger.info("the replica server speaks an older data protocol; connecting at the previous version",
                            metadata: ["replica.address": "\(host):\(port)", "refused.version": "\(version)"])
                version -= 1
            }
        }
    }

    public convenience init(_ address: ReplicaAddress, connectTimeout: Duration = .seconds(3),
                            requestTimeout: Duration = .seconds(10), logger: Logger = ReplicaStore.discardingLogger) throws {
        try self.init(host: address.host, port: address.port, connectTimeout: connectTimeout,
                      requestTimeout: requestTimeout, logger: logger)
    }

    /// A client dropped without `close` still closes its socket (no thread holds it any more).
    deinit {
        let open = state.withLock { s -> Bool in
            defer { s.tornDown = true }
            return !s.tornDown
        }
        if open { sendQueue.close { _ = Glibc.close(fd) } }
    }

    /// After a connection error, protocol violation, timeout or `close`: every call fails fast.
    public var isBroken: Bool { state.withLock { $0.broken != nil } }

    /// Shuts the connection down, fails every waiting call, and waits until the socket is
    /// closed. Idempotent.
    public func close() {
        markBroken("the client was closed")
        readerDone.wait()
        readerDone.signal()
    }

    // MARK: operations

    /// Sends `request` as op `Op` and waits for its response; a status other than `ok` throws
    /// (`.remote`, or `.damagedBlock` for a read's checksum mismatch naming the block).
    public func call<Op: DataOperation>(_ op: Op.Type, _ request: Op.Request, epoch: UInt64,
                                        timeout: Duration? = nil) throws(ReplicaClientError) -> Op.Response {
        try call(op, timeout: timeout) { id in Frame(requestID: id, epoch: epoch, body: .request(Op.request(request))).encode() }
    }

    /// `call` with the frame built by `encode` for the request id.
    private func call<Op: DataOperation>(_ op: Op.Type, timeout: Duration? = nil,
                                         encode: (UInt64) -> [UInt8]) throws(ReplicaClientError) -> Op.Response {
        let (waiter, id) = try send(opcode: Op.opcode, encode: encode)
        return try answer(op, waiter: waiter, id: id, timeout: timeout ?? requestTimeout)
    }

    /// `call` for a write whose data is sent from the caller's memory (`borrowed`): `encode`
    /// builds the frame up to the data. Returns (or throws) only once that memory is no longer
    /// read.
    private func call<Op: DataOperation>(_ op: Op.Type, borrowing borrowed: UnsafeRawBufferPointer,
                                         encode: (UInt64) -> [UInt8]) throws(ReplicaClientError) -> Op.Response {
        let sent: (Waiter, UInt64)
        do {
            sent = try send(opcode: Op.opcode, borrowing: borrowed, encode: encode)
        } catch {
            sendQueue.fence("sending \(Op.opcode) to \(address) failed: \(error)")
            throw error
        }
        return try answerBorrowed(op, waiter: sent.0, id: sent.1, timeout: requestTimeout)
    }

    /// `answer` for a request that borrowed the caller's memory. A reply (even a refusal) means
    /// the server read the whole frame, so the memory was sent; with none (the connection
    /// broke, or timed out) the frame may still sit in the send queue or be half written, so
    /// the queue is fenced — nothing more goes out, no write is under way — before the caller
    /// gets the error and reuses the memory. Otherwise a later send could put the memory's new
    /// contents on the wire under this write's header.
    private func answerBorrowed<Op: DataOperation>(_ op: Op.Type, waiter: Waiter, id: UInt64,
                                                   timeout: Duration) throws(ReplicaClientError) -> Op.Response {
        do {
            return try answer(op, waiter: waiter, id: id, timeout: timeout)
        } catch {
            switch error {
            case .remote, .damagedBlock: break
            case .connection(let reason), .timeout(let reason): sendQueue.fence(reason)
            }
            throw error
        }
    }

    /// Waits for the reply to request `id` and checks it is `Op`'s, and `ok`.
    private func answer<Op: DataOperation>(_: Op.Type, waiter: Waiter, id: UInt64,
                                           timeout: Duration) throws(ReplicaClientError) -> Op.Response {
        let frame = try wait(for: waiter, id: id, opcode: Op.opcode, timeout: timeout)
        guard let response = frame.response(Op.self) else {
            throw protocolViolation("request id \(id) (\(Op.name)) was answered with \(frame.isResponse ? "" : "a request ")\(frame.opcode)")
        }
        guard response.status == .ok else {
            let message = response.message.isEmpty ? "\(response.status)" : response.message
            if let read = response as? ReadResponse, let block = read.damagedBlock { throw .damagedBlock(block, message) }
            throw .remote(response.status, message)
        }
        return response
    }

    /// Creates the replica (idempotent for the same size).
    public func create(volumeID: String, sizeBytes: UInt64) throws {
        _ = try call(DataOp.Create.self, CreateRequest(volume: volumeID, size: sizeBytes), epoch: 0)
    }

    /// Deletes the replica (idempotent). `epoch` must not be older than the replica's.
    public func delete(volumeID: String, epoch: UInt64 = .max) throws {
        _ = try call(DataOp.Delete.self, DeleteRequest(volume: volumeID), epoch: epoch)
    }

    /// Claims `epoch` (persisted by the replica before it answers) and returns the status.
    public func claim(volumeID: String, epoch: UInt64, grant: ClaimGrant? = nil) throws -> ReplicaStatus {
        _ = try call(DataOp.Claim.self, ClaimRequest(volume: volumeID, grant: grant), epoch: epoch)
        return try status(volumeID: volumeID, epoch: epoch)
    }

    public func status(volumeID: String, epoch: UInt64) throws -> ReplicaStatus {
        let m = try call(DataOp.Status.self, StatusRequest(volume: volumeID), epoch: epoch)
        return ReplicaStatus(volumeID: volumeID, size: m.size, blockSize: UInt32(FrameLimits.blockSize),
                             epoch: m.replicaEpoch, flushedGeneration: m.flushedGeneration,
                             highestGeneration: m.highestGeneration)
    }

    /// Reads whole, aligned blocks (at most `FrameLimits.maxDataLength`).
    public func read(volumeID: String, offset: UInt64, length: Int, epoch: UInt64) throws -> [UInt8] {
        let m = try call(DataOp.Read.self, ReadRequest(volume: volumeID, offset: offset, length: UInt32(clamping: length)), epoch: epoch)
        guard m.data.count == length else {
            throw protocolViolation("read of \(length) bytes answered with \(m.data.count)")
        }
        return m.data
    }

    /// Writes whole, aligned blocks at `generation` (> 0); durable after the next `flush`.
    public func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws {
        _ = try write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch, durable: false)
    }

    /// A write that, with `durable`, asks the replica to make it durable before answering
    /// (`FrameFlags.durable`, protocol 5; an older server is not asked). Returns whether the
    /// replica says it is durable: if not, only a flush makes it so.
    public func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
                      durable: Bool) throws -> Bool {
        try beginWrite(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch,
                       durable: durable)()
    }

    /// A resync write (`FrameFlags.ifNewer`): the replica applies it only to the blocks whose
    /// current generation is lower than `generation`, so a copy never overwrites a newer write
    /// that reached the replica directly. Returns how many blocks were applied.
    @discardableResult
    public func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
                      ifNewer: Bool) throws -> Int {
        guard ifNewer else {
            try write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
            return data.count / FrameLimits.blockSize
        }
        let m = try call(DataOp.Write.self, borrowing: data) { id in
            WriteRequest.encodeFrameHead(requestID: id, epoch: epoch, volume: volumeID, generation: generation,
                                         offset: offset, dataCount: data.count, ifNewer: true)
        }
        return try applied(m, of: data.count / FrameLimits.blockSize, "a resync write")
    }

    /// A repair write (`FrameFlags.repair`): applied only to the blocks whose current generation
    /// is at most `generation`. Returns how many blocks were applied.
    @discardableResult
    public func repairWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                            epoch: UInt64) throws -> Int {
        let m = try call(DataOp.Write.self, borrowing: data) { id in
            WriteRequest.encodeFrameHead(requestID: id, epoch: epoch, volume: volumeID, generation: generation,
                                         offset: offset, dataCount: data.count, repair: true)
        }
        return try applied(m, of: data.count / FrameLimits.blockSize, "a repair write")
    }

    /// A conditional write's or trim's applied count, checked against the blocks it covered.
    private func applied(_ m: WriteResponse, of blocks: Int, _ what: String) throws(ReplicaClientError) -> Int {
        guard let applied = m.appliedBlocks else { throw protocolViolation("\(what) was answered without an applied count") }
        guard Int(applied) <= blocks else {
            throw protocolViolation("\(what) of \(blocks) blocks reports \(applied) applied")
        }
        return Int(applied)
    }

    /// The block map's generation of blocks `firstBlock ..< firstBlock+count` (count
    /// 1...`FrameLimits.maxGenerationsCount`), as `BlockGenerations` describes: 0 never
    /// written, bit 63 set for a trimmed block.
    public func generations(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        let request = GenerationsRequest(volume: volumeID, firstBlock: firstBlock, count: UInt32(clamping: count))
        let m = try call(DataOp.Generations.self, request, epoch: epoch)
        guard m.generations.count == count else {
            throw protocolViolation("generations of \(count) blocks answered with \(m.generations.count)")
        }
        return m.generations
    }

    /// Sends a write (as `write`) and returns at once with a function that waits for its reply
    /// and throws what `write` would: one thread can have writes to several replicas in flight
    /// without a thread per replica. The data is sent from where it is, not copied: it must
    /// stay valid and unchanged until the returned function has returned. That function must
    /// be called exactly once.
    public func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                           epoch: UInt64) -> () throws -> Void {
        let wait = beginWrite(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch,
                              durable: false)
        return { _ = try wait() }
    }

    /// `beginWrite` with `durable` as `write(...durable:)` takes it: the returned function
    /// says whether the replica made the write durable.
    public func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                           epoch: UInt64, durable: Bool) -> () throws -> Bool {
        let asks = durable && protocolVersion >= 5
        let sent: (Waiter, UInt64)
        do {
            sent = try send(opcode: .write, borrowing: data) { id in
                WriteRequest.encodeFrameHead(requestID: id, epoch: epoch, volume: volumeID, generation: generation,
                                             offset: offset, dataCount: data.count, durable: asks)
            }
        } catch {
            sendQueue.fence("sending a write to \(address) failed: \(error)")
            return { throw error }
        }
        return { [self] in
            let m = try answerBorrowed(DataOp.Write.self, waiter: sent.0, id: sent.1, timeout: requestTimeout)
            return asks && m.durable
        }
    }

    /// Settles the regions written at or below `cleanThrough` (with `converged`, also the
    /// restart's unknown) and returns what is left (`ReplicaStore.activity`).
    public func activity(volumeID: String, cleanThrough: UInt64, converged: Bool, epoch: UInt64) throws -> ReplicaActivity {
        let request = ActivityRequest(volume: volumeID, cleanThrough: cleanThrough, converged: converged)
        return try call(DataOp.Activity.self, request, epoch: epoch).activity
    }

    /// One digest per 1 MiB region of block generations (`ReplicaStore.generationSummary`),
    /// regions `firstRegion ..< firstRegion+count` (count 1...4096).
    public func generationSummary(volumeID: String, firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        let request = GenerationsRequest(volume: volumeID, firstBlock: firstRegion, count: UInt32(clamping: count))
        let m = try call(DataOp.Summary.self, request, epoch: epoch)
        guard m.generations.count == count else {
            throw protocolViolation("a summary of \(count) regions answered with \(m.generations.count)")
        }
        return m.generations
    }

    /// The blocks of `firstBlock ..< firstBlock+count` (count 1...16384) whose data fails its
    /// checksum on the replica (`ReplicaStore.verify`).
    public func verify(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        let request = GenerationsRequest(volume: volumeID, firstBlock: firstBlock, count: UInt32(clamping: count))
        let m = try call(DataOp.Verify.self, request, epoch: epoch, timeout: .seconds(120))
        guard m.generations.allSatisfy({ $0 >= firstBlock && $0 < firstBlock + UInt64(count) }) else {
            throw protocolViolation("verify of blocks \(firstBlock)+\(count) names blocks outside the range")
        }
        return m.generations
    }

    /// A resync trim (`FrameFlags.ifNewer`): only the blocks whose generation is lower than
    /// `generation` are trimmed. Returns how many were.
    @discardableResult
    public func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64,
                     ifNewer: Bool) throws -> Int {
        guard ifNewer else {
            try trim(volumeID: volumeID, offset: offset, length: length, generation: generation, epoch: epoch)
            return Int(length / UInt64(FrameLimits.blockSize))
        }
        let request = TrimRequest(volume: volumeID, generation: generation, offset: offset, length: length, ifNewer: true)
        let m = try call(DataOp.Trim.self, request, epoch: epoch)
        return try applied(m, of: Int(clamping: length / UInt64(FrameLimits.blockSize)), "an if-newer trim")
    }

    /// Makes every write acknowledged so far durable on the replica; returns the flushed
    /// generation. `through`: every write numbered at or below it has finished (sent only to a
    /// server of protocol version 3 or later; an older one records its highest generation).
    @discardableResult
    public func flush(volumeID: String, epoch: UInt64, through: UInt64? = nil) throws -> UInt64 {
        let request = FlushRequest(volume: volumeID, through: protocolVersion >= 3 ? through : nil)
        return try call(DataOp.Flush.self, request, epoch: epoch).flushedGeneration
    }

    /// Sends a flush (as `flush`) and returns at once with a function that waits for its reply
    /// and throws what `flush` would (called exactly once): one thread flushes several
    /// replicas at once without a thread per replica.
    public func beginFlush(volumeID: String, epoch: UInt64, through: UInt64? = nil) -> () throws -> Void {
        let request = FlushRequest(volume: volumeID, through: protocolVersion >= 3 ? through : nil)
        let sent: (Waiter, UInt64)
        do {
            sent = try send(opcode: .flush) { id in
                Frame(requestID: id, epoch: epoch, body: .request(DataOp.Flush.request(request))).encode()
            }
        } catch {
            return { throw error }
        }
        return { [self] in
            _ = try answer(DataOp.Flush.self, waiter: sent.0, id: sent.1, timeout: requestTimeout)
        }
    }

    /// Trims whole, aligned blocks (they read as zeros); they take `generation` (0: the
    /// replica's highest written).
    public func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws {
        let request = TrimRequest(volume: volumeID, generation: generation, offset: offset, length: length)
        _ = try call(DataOp.Trim.self, request, epoch: epoch)
    }

    // Snapshots, clones, growth (ops 13–17).

    /// Takes snapshot `snapshotID` of this replica alone (idempotent by id). A barrier snapshot
    /// of an attached volume goes through `barrierSnapshot` to the node running its engine.
    @discardableResult
    public func snapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws -> ReplicaSnapshot {
        let m = try call(DataOp.Snapshot.self, SnapshotRequest(volume: volumeID, snapshotID: snapshotID), epoch: epoch,
                         timeout: Self.controlTimeout)
        return ReplicaSnapshot(id: snapshotID, size: m.size, generation: m.generation, layer: 0)
    }

    /// Asks the node this client reaches to take snapshot `snapshotID` through the engine that
    /// runs `volumeID` there (its write barrier over every in-sync replica). Returns the node
    /// ids whose replicas hold the snapshot; `not-found` when no engine runs the volume there.
    public func barrierSnapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws -> [String] {
        try call(DataOp.Snapshot.self, SnapshotRequest(volume: volumeID, snapshotID: snapshotID, barrier: true),
                 epoch: epoch, timeout: Self.controlTimeout).nodes
    }

    /// Deletes snapshot `snapshotID` of the replica (idempotent; the merge may take a while).
    public func deleteSnapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws {
        _ = try call(DataOp.DeleteSnapshot.self, SnapshotRequest(volume: volumeID, snapshotID: snapshotID), epoch: epoch,
                     timeout: Self.controlTimeout)
    }

    public func listSnapshots(volumeID: String, epoch: UInt64) throws -> [SnapshotEntry] {
        try call(DataOp.ListSnapshots.self, ListSnapshotsRequest(volume: volumeID), epoch: epoch).snapshots
    }

    /// Creates replica `volumeID` on the reached node from snapshot `snapshotID` of the replica
    /// of `sourceVolumeID` there (hard links, no copy); idempotent for the same size.
    public func clone(volumeID: String, sourceVolumeID: String, snapshotID: String, sizeBytes: UInt64) throws {
        let request = CloneRequest(volume: volumeID, source: sourceVolumeID, snapshotID: snapshotID, size: sizeBytes)
        _ = try call(DataOp.Clone.self, request, epoch: 0, timeout: Self.controlTimeout)
    }

    /// Grows the replica to `sizeBytes` (the same size is a no-op; smaller is refused).
    public func grow(volumeID: String, sizeBytes: UInt64, epoch: UInt64) throws {
        _ = try call(DataOp.Grow.self, GrowRequest(volume: volumeID, size: sizeBytes), epoch: epoch)
    }

    /// Holds the writes of the engine running `volumeID` on the reached node for at most
    /// `timeout` (a group snapshot's barrier): barrier snapshots of it then take the snapshot
    /// inside this hold. `not-found` when no engine runs the volume there.
    public func holdWrites(volumeID: String, timeout: Duration, epoch: UInt64) throws {
        let ms = UInt32(clamping: max(1, timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000))
        let request = HoldWritesRequest(volume: volumeID, timeoutMilliseconds: min(ms, HoldWritesRequest.maxTimeoutMilliseconds))
        _ = try call(DataOp.HoldWrites.self, request, epoch: epoch, timeout: Self.controlTimeout)
    }

    /// Releases a hold taken with `holdWrites` (harmless without one).
    public func releaseWrites(volumeID: String, epoch: UInt64) throws {
        _ = try call(DataOp.ReleaseWrites.self, ReleaseWritesRequest(volume: volumeID), epoch: epoch)
    }

    // Backups: a sealed snapshot's content and generations (ops 21–22, protocol version 4).
    // Sent with epoch 0: sealed layers never change, so the replica does not fence these.

    /// Reads whole, aligned blocks (at most `FrameLimits.maxDataLength`) of snapshot
    /// `snapshotID` of the replica: its content as taken, never later writes.
    public func readSnapshot(volumeID: String, snapshotID: String, offset: UInt64, length: Int) throws -> [UInt8] {
        try requireSnapshotReads("read snapshot \(snapshotID) of volume \(volumeID)")
        let request = SnapshotReadRequest(volume: volumeID, snapshotID: snapshotID, offset: offset, length: UInt32(clamping: length))
        let m = try call(DataOp.SnapshotRead.self, request, epoch: 0)
        guard m.data.count == length else {
            throw protocolViolation("snapshot read of \(length) bytes answered with \(m.data.count)")
        }
        return m.data
    }

    /// The generations (as `generations` reports them) of blocks `firstBlock ..< firstBlock+count`
    /// of snapshot `snapshotID`: a block whose generation is above an older snapshot's changed
    /// since it.
    public func snapshotGenerations(volumeID: String, snapshotID: String, firstBlock: UInt64, count: Int) throws -> [UInt64] {
        try requireSnapshotReads("list the generations of snapshot \(snapshotID) of volume \(volumeID)")
        let request = SnapshotGenerationsRequest(volume: volumeID, snapshotID: snapshotID, firstBlock: firstBlock,
                                                 count: UInt32(clamping: count))
        let m = try call(DataOp.SnapshotGenerations.self, request, epoch: 0)
        guard m.generations.count == count else {
            throw protocolViolation("snapshot generations of \(count) blocks answered with \(m.generations.count)")
        }
        return m.generations
    }

    /// The protocol version that has snapshot reads.
    static let snapshotReadsVersion: UInt16 = 4

    /// Refuses (without sending anything: an older server would close the connection on the
    /// unknown op) when the server speaks a protocol without snapshot reads.
    private func requireSnapshotReads(_ what: String) throws(ReplicaClientError) {
        let version = protocolVersion
        guard version < Self.snapshotReadsVersion else { return }
        throw .remote(.badRequest, "cannot \(what): the replica server at \(address) runs an older Cairn without snapshot reads (data protocol version \(version), they need \(Self.snapshotReadsVersion)); upgrade Cairn on that node and retry")
    }

    /// Snapshot deletion merges layers and a barrier snapshot waits for a volume's in-flight
    /// writes and flushes: both can outlast an I/O's timeout.
    static let controlTimeout: Duration = .seconds(120)

    /// Runs a blocking call off the caller's task (for control-plane callers in async code).
    public func perform<T: Sendable>(_ body: @escaping @Sendable (ReplicaClient) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(with: Result { try body(self) })
            }
        }
    }

    // MARK: plumbing

    /// Breaks the connection for a reply that makes no sense.
    private func protocolViolation(_ what: String) -> ReplicaClientError {
        let reason = "protocol violation from \(address): \(what)"
        markBroken(reason)
        return .connection(reason)
    }

    /// Registers a waiter and sends the frame `encode` builds for the new request id (or hands
    /// it to the thread sending now). A send failure breaks the connection, which completes the
    /// waiter with the error, and every other waiter, those whose frames were lost with it too.
    private func send(opcode: Opcode, borrowing borrowed: UnsafeRawBufferPointer? = nil,
                      encode: (UInt64) -> [UInt8]) throws(ReplicaClientError) -> (Waiter, UInt64) {
        let waiter = Waiter()
        let registered: Result<UInt64, ReplicaClientError> = state.withLock { s in
            if let reason = s.broken { return .failure(.connection(reason)) }
            let id = s.nextRequestID
            s.nextRequestID += 1
            s.waiters[id] = waiter
            return .success(id)
        }
        let id = try registered.get()
        var parts: [FramePart] = [.owned(encode(id))]
        if let borrowed, borrowed.count > 0 { parts.append(.borrowed(borrowed)) }
        if let failure = sendQueue.send(parts) {
            markBroken("sending \(opcode) (and the requests sent with it) to \(address) failed: \(failure)")
        }
        return (waiter, id)
    }

    /// Waits for the reply to request `id` (sent by `send`): reads the socket itself while no
    /// other thread does (the reader role), else sleeps until the reader hands it its reply or
    /// leaves the role to it.
    private func wait(for waiter: Waiter, id: UInt64, opcode: Opcode,
                      timeout: Duration) throws(ReplicaClientError) -> Frame {
        let deadline = DispatchTime.now() + Self.dispatchInterval(timeout)
        var leading = false
        enum Next { case done, read, sleep }
        while true {
            let (next, wake): (Next, Waiter?) = state.withLock { s in
                if s.waiters[id] == nil {
                    // Answered (or failed). A reader leaving wakes a sleeper to read next.
                    if leading { s.reading = false }
                    return (.done, s.reading || s.tornDown ? nil : Self.takeSleeper(&s))
                }
                if leading { return (.read, nil) }
                if !s.reading && !s.tornDown {
                    s.reading = true
                    return (.read, nil)
                }
                s.sleepers[id] = waiter
                return (.sleep, nil)
            }
            wake?.done.signal()
            switch next {
            case .done:
                // Whoever took it out of `waiters` sets its result right after (outside the lock).
                while true {
                    if let result = waiter.result.withLock({ $0 }) { return try result.get() }
                    waiter.done.wait()
                }
            case .read:
                leading = true
                if let reason = receiveOnce(deadline: deadline, opcode: opcode, id: id) {
                    logger.warning("replica request timed out; connection closed", metadata: ["replica.address": "\(address)", "error": "\(reason)"])
                    throw .timeout(reason)
                }
            case .sleep:
                if waiter.done.wait(timeout: deadline) == .timedOut {
                    let abandoned = state.withLock { s in
                        s.sleepers[id] = nil
                        return s.waiters.removeValue(forKey: id) != nil
                    }
                    if abandoned {
                        let reason = "no reply to \(opcode) (request id \(id)) from \(address) within \(timeout)"
                        markBroken(reason)
                        logger.warning("replica request timed out; connection closed", metadata: ["replica.address": "\(address)", "error": "\(reason)"])
                        throw .timeout(reason)
                    }
                }
            }
        }
    }

    /// Removes and returns one sleeping waiter (to take the reader role); nil when none sleeps.
    private static func takeSleeper(_ s: inout ClientState) -> Waiter? {
        guard let (key, waiter) = s.sleepers.first else { return nil }
        s.sleepers[key] = nil
        return waiter
    }

    /// One receive of the reader role: waits (until `deadline`) for bytes, decodes the frames
    /// and hands each reply to its waiter. On a closed connection, a receive error or a bad
    /// frame the connection is torn down (every waiter fails). Returns the timeout's reason when
    /// nothing came by the deadline (the connection is then torn down too).
    private func receiveOnce(deadline: DispatchTime, opcode: Opcode, id: UInt64) -> String? {
        if state.withLock({ $0.broken }) != nil {
            tearDown(reason: "connection to \(address) closed")
            return nil
        }
        if !(channel?.hasBufferedBytes ?? false) {
            let now = DispatchTime.now().uptimeNanoseconds
            let remaining = deadline.uptimeNanoseconds > now ? deadline.uptimeNanoseconds - now : 0
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let rc = poll(&pfd, 1, Int32(clamping: (remaining + 999_999) / 1_000_000))
            if rc < 0 {
                if errno == EINTR { return nil }
                tearDown(reason: "waiting for replies from \(address) failed: \(String(cString: strerror(errno)))")
                return nil
            }
            if rc == 0 {
                if DispatchTime.now() < deadline { return nil }
                let reason = "no reply to \(opcode) (request id \(id)) from \(address) within the request timeout"
                tearDown(reason: reason)
                return reason
            }
        }
        let chunk: UnsafeRawBufferPointer
        if let channel {
            do {
                chunk = try channel.receive() ?? UnsafeRawBufferPointer(start: nil, count: 0)
            } catch {
                let stalled = "\(error)".contains(String(cString: strerror(EAGAIN)))
                tearDown(reason: "receiving from \(address) failed: \(error)"
                         + (stalled ? " (a reply stopped arriving halfway for \(requestTimeout))" : ""))
                return nil
            }
        } else {
            let n = recv(fd, readSide.buffer.baseAddress, readSide.buffer.count, 0)
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { return nil }
                tearDown(reason: "receiving from \(address) failed: \(String(cString: strerror(errno)))")
                return nil
            }
            chunk = UnsafeRawBufferPointer(rebasing: readSide.buffer[0..<n])
        }
        if chunk.isEmpty {
            tearDown(reason: "\(address) closed the connection")
            return nil
        }
        receivedBytes.wrappingAdd(UInt64(chunk.count), ordering: .relaxed)
        let frames: [Frame]
        do {
            frames = try readSide.decoder.feed(chunk)
        } catch {
            logger.warning("closing replica connection", metadata: ["replica.address": "\(address)", "error": "\(error.reason)"])
            tearDown(reason: "bad frame from \(address): \(error.reason)")
            return nil
        }
        for frame in frames {
            guard frame.isResponse else {
                tearDown(reason: "\(address) sent a \(frame.opcode) request; a client only takes responses")
                return nil
            }
            let waiter = state.withLock { s -> Waiter? in
                s.sleepers[frame.requestID] = nil
                return s.waiters.removeValue(forKey: frame.requestID)
            }
            waiter?.complete(.success(frame))
        }
        return nil
    }

    private static func dispatchInterval(_ d: Duration) -> DispatchTimeInterval {
        let (s, atto) = d.components
        return .nanoseconds(Int(clamping: s * 1_000_000_000 + atto / 1_000_000_000))
    }

    /// Marks the connection broken (the first reason wins) and shuts the socket down: the
    /// thread reading now (if any) then tears the connection down; with none reading, this
    /// thread does.
    private func markBroken(_ reason: String) {
        let (first, tearDownHere) = state.withLock { s -> (Bool, Bool) in
            let first = s.broken == nil
            if first { s.broken = reason }
            guard !s.reading, !s.tornDown else { return (first, false) }
            s.reading = true
            return (first, true)
        }
        if first { _ = shutdown(fd, Int32(SHUT_RDWR)) }
        if tearDownHere { tearDown(reason: reason) }
    }

    /// Called by the thread holding the reader role: fails every waiter, closes the socket
    /// (once no send is running) and never lets anyone read again.
    private func tearDown(reason: String) {
        let (waiters, firstTime) = state.withLock { s -> ([Waiter], Bool) in
            if s.broken == nil { s.broken = reason }
            let firstTime = !s.tornDown
            s.tornDown = true
            s.sleepers.removeAll()
            defer { s.waiters.removeAll() }
            return (Array(s.waiters.values), firstTime)
        }
        guard firstTime else { return }
        let error = ReplicaClientError.connection(state.withLock { $0.broken ?? reason })
        for w in waiters { w.complete(.failure(error)) }
        _ = shutdown(fd, Int32(SHUT_RDWR))
        sendQueue.close { _ = Glibc.close(fd) }
        readerDone.signal()
    }
}
