// The replica server: serves the data protocol (docs/replica-format.md) over TCP for every
// replica in `<data-dir>/replicas/<volume-id>/`.
//
// Owns: the listening socket, one reader thread per connection (decodes frames, enforces
// "hello first", runs a lone write of up to 64 KiB or a lone flush itself when nothing else of the
// connection is running and hands every other request to a fixed pool of worker threads so many run at
// once), the per-connection
// send queue (responses go out whole, possibly out of order; a response finished while another
// is being sent goes out with that thread's next write, FrameSendQueue), the registry of open
// `ReplicaStore`s (one per volume, shared by every connection, opened lazily, closed at stop),
// the table of op handlers (one per `DataOp`, registered with `handler(Op.self)`) and the
// mapping of errors to `ReplyStatus` (once, for every op: `failure`).
//
// Authentication (docs/security.md): with `--data-security auth|secure` every connection first
// runs a mutual TLS 1.3 handshake (SecureChannel) and is refused unless the peer's certificate
// comes from the cluster's CA and names a node or controller of its trust domain (and
// `authorizePeer`, the agent's check against the store's nodes, agrees); every refusal and
// every accepted connection is logged with the peer's identity and address. A refused peer
// never gets a frame, so it learns no epoch. The hello's token is not used.
//
// Does not own: the format or the epoch rule (ReplicaStore checks every request against the
// persisted epoch), the framing rules (Frame*.swift), placement (the controller says which
// replicas to create and delete).
//
// A frame the decoder rejects, a request before hello or a response sent to us closes that
// connection only, with a warning naming the peer and the reason; nothing is written.

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

/// The engines of the volumes attached on this node, as the replica server reaches them.
public protocol ReplicaEngineHooks: AnyObject, Sendable {
    /// Takes snapshot `snapshotID` of `volume` through the engine running it here (its write
    /// barrier over every in-sync replica) and returns the node ids holding it; nil when no
    /// engine runs the volume on this node. `epoch` is the request's: older than the engine's
    /// is refused as stale.
    func snapshot(volume: String, snapshotID: String, epoch: UInt64) throws -> [String]?
    /// Holds the writes of `volume`'s engine here for at most `timeout` (a group snapshot's
    /// barrier; a barrier snapshot inside the hold takes it without a hold of its own). False
    /// when no engine runs the volume on this node.
    func holdWrites(volume: String, timeout: Duration, epoch: UInt64) throws -> Bool
    /// Releases that hold; false when no engine runs the volume here.
    func releaseWrites(volume: String, epoch: UInt64) throws -> Bool
}

public final class ReplicaServer: Sendable {
    /// Requests one connection may have running at once; the reader stops reading beyond it.
    public static let maxInFlightPerConnection = 64
    static let receiveBufferSize = 1 << 20
    /// Writes up to this size are handled on the connection's reader thread when nothing else
    /// of the connection is running and no other frame is waiting (queue depth 1: a hand-off
    /// to a worker and back would cost more than the write). Otherwise they go to the workers:
    /// a journaled write waits for the device, and one at a time per connection would cap a
    /// replica at one write per device round trip.
    static let inlineWriteLimit = 64 << 10

    public let dataDir: String
    public let replicasDir: String
    public let host: String
    public let requestedPort: UInt16
    private let logger: Logger
    private let state = Mutex(ServerState())
    /// Open stores by volume id. Opening, creating and deleting happen under this lock, so a
    /// volume never has two stores and a delete cannot race an open.
    private let stores = Mutex([String: ReplicaStore]())
    private let hooks = Mutex<(any ReplicaEngineHooks)?>(nil)
    /// How connections are authenticated and protected.
    public let security: DataPlaneSecurity
    private let peerCheck = Mutex<(@Sendable (PeerIdentity) -> String?)?>(nil)

    /// A further check of an authenticated peer (the agent's: the node is one the store knows);
    /// returns why the peer is refused, or nil.
    public var authorizePeer: (@Sendable (PeerIdentity) -> String?)? {
        get { peerCheck.withLock { $0 } }
        set { peerCheck.withLock { $0 = newValue } }
    }

    /// What the node process running volume engines lets this server reach: a `snapshot` request
    /// with the barrier flag is handed to it. Nil (the default) refuses barrier snapshots with
    /// `not-found`.
    public var engineHooks: (any ReplicaEngineHooks)? {
        get { hooks.withLock { $0 } }
        set { hooks.withLock { $0 = newValue } }
    }
    /// Runs every connection's requests (see `WorkerPool` for why not Dispatch).
    private let workers: WorkerPool
    /// Request durations and errors by op, on the process's metrics endpoint.
    let metrics = ReplicaRequestMetrics()
    /// Writes run in groups (`handleWriteGroup`) and the groups, since start.
    let grouped = Atomic<UInt64>(0), groups = Atomic<UInt64>(0)
    public static let workerThreads = 32
    /// Entered by the accept thread and by every connection thread; `stop` waits on it.
    private let threads = DispatchGroup()

    private struct ServerState {
        var listenFD: Int32 = -1
        var boundPort: UInt16 = 0
        var running = false
        var stopped = false
        var connections: [UInt64: ServerConnection] = [:]
        var nextConnectionID: UInt64 = 1
    }

    /// Replicas live in `<dataDir>/replicas/<volume-id>/` (created if missing).
    /// The data protocol versions this server accepts at hello (narrowed in tests to play a
    /// server of an older release).
    let protocolVersions: ClosedRange<UInt16>

    public init(dataDir: String, host: String, port: UInt16, logger: Logger,
                protocolVersions: ClosedRange<UInt16> = FrameLimits.supportedProtocolVersions,
                security: DataPlaneSecurity = .insecure) throws {
        self.protocolVersions = protocolVersions
        self.security = security
        self.dataDir = dataDir
        self.replicasDir = dataDir + "/replicas"
        self.host = host
        self.requestedPort = port
        self.logger = logger
        self.workers = WorkerPool()
        for dir in [dataDir, replicasDir] where mkdir(dir, 0o700) != 0 && errno != EEXIST {
            throw SystemError("mkdir \(dir)", errno: errno)
        }
    }

    /// The port actually bound (the kernel's choice when asked for port 0); 0 before `start`.
    public var boundPort: UInt16 { state.withLock { $0.boundPort } }

    /// Binds, listens and starts accepting. Throws if the address cannot be bound.
    public func start() throws {
        let (fd, port) = try state.withLock { s throws -> (Int32, UInt16) in
            guard !s.running, !s.stopped else { throw SocketError("the replica server was already started") }
            let (fd, port) = try Socket.listen(host: host, port: requestedPort)
            s.listenFD = fd
            s.boundPort = port
            s.running = true
            return (fd, port)
        }
        threads.enter()
        do {
            try workers.start(threads: Self.workerThreads)
            try startThread { [self] in
                acceptLoop(fd)
                threads.leave()
            }
        } catch {
            threads.leave()
            stop()
            throw error
        }
        logger.info("replica server listening", metadata: [
            "replica.listen": "\(ReplicaAddress(host: host, port: port))", "replica.dir": "\(replicasDir)",
            "replica.security": "\(security)",
        ])
    }

    /// Stops accepting, closes every connection (requests already running finish first) and
    /// closes every open replica cleanly. Idempotent.
    public func stop() {
        let (listenFD, connections) = state.withLock { s -> (Int32, [ServerConnection]) in
            let result = (s.stopped ? -1 : s.listenFD, Array(s.connections.values))
            s.running = false
            s.stopped = true
            return result
        }
        if listenFD >= 0 {
            // Wakes the accept thread, which closes the descriptor.
            _ = shutdown(listenFD, Int32(SHUT_RDWR))
        }
        for c in connections { c.shutdown() }
        threads.wait()
        workers.shutdown()
        let open = stores.withLock { s -> [ReplicaStore] in
            defer { s.removeAll() }
            return Array(s.values)
        }
        for store in open {
            do {
                try store.close()
            } catch {
                logger.error("replica did not close cleanly; it will be recovered at the next open",
                             metadata: ["volume.id": "\(store.volumeID)", "error": "\(error)"])
            }
        }
        if listenFD >= 0 {
            logger.info("replica server stopped", metadata: ["replica.closed_replicas": "\(open.count)"])
        }
    }

    // MARK: connections

    private func acceptLoop(_ listenFD: Int32) {
        defer { _ = Glibc.close(listenFD) }
        while true {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                let e = errno
                if e == EINTR || e == ECONNABORTED || e == EPROTO { continue }
                if state.withLock({ !$0.running }) { return }
                logger.error("accept failed; retrying in 100 ms", metadata: ["error": "\(String(cString: strerror(e)))"])
                if e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM { usleep(100_000); continue }
                return
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            Socket.setNoDelay(fd)
            let connection = ServerConnection(fd: fd, peer: Socket.peerName(fd))
            let id: UInt64? = state.withLock { s in
                guard s.running else { return nil }
                let id = s.nextConnectionID
                s.nextConnectionID += 1
                s.connections[id] = connection
                return id
            }
            guard let id else {
                _ = Glibc.close(fd)
                return
            }
            threads.enter()
            do {
                try startThread { [self] in
                    serve(connection)
                    state.withLock { _ = $0.connections.removeValue(forKey: id) }
                    threads.leave()
                }
            } catch {
                logger.error("cannot start a connection thread; closing the connection",
                             metadata: ["replica.peer": "\(connection.peer)", "error": "\(error)"])
                state.withLock { _ = $0.connections.removeValue(forKey: id) }
                connection.close()
                threads.leave()
            }
        }
    }

    /// The connection's reader: decode, check hello, dispatch. Returns when the peer goes, the
    /// stream breaks a rule, or the server stops; the socket is closed once running requests
    /// have answered.
    private func serve(_ c: ServerConnection) {
        var connectionLog = { var l = logger; l[metadataKey: "replica.peer"] = "\(c.peer)"; return l }()
        connectionLog.debug("replica connection opened")
        if let identity = security.identity {
            let channel: SecureChannel
            do {
                channel = try SecureChannel.establish(fd: c.fd, asServer: true, mode: security.mode, context: identity.current,
                                                      timeout: security.handshakeTimeout)
            } catch {
                connectionLog.warning("refused a replica connection: the peer did not authenticate", metadata: ["error": "\(error)"])
                c.close()
                return
            }
            if let reason = security.refusal(of: channel.peer) ?? authorizePeer?(channel.peer) {
                connectionLog.warning("refused a replica connection: \(reason)", metadata: ["replica.peer_identity": "\(channel.peer)"])
                c.close()
                return
            }
            connectionLog[metadataKey: "replica.peer_identity"] = "\(channel.peer)"
            connectionLog.info("replica connection authenticated", metadata: ["replica.security": "\(security.mode)"])
            c.channel = channel
        }
        let log = connectionLog
        let inFlight = DispatchSemaphore(value: Self.maxInFlightPerConnection)
        let running = DispatchGroup()
        // Requests of this connection on the workers now.
        let onWorkers = WorkerCount()
        defer {
            c.shutdown()
            running.wait()
            c.close()
        }
        // Runs `job` (a request's or a group's) on a worker, counted in flight for this connection.
        func onWorker(_ job: @escaping @Sendable () -> Void) {
            inFlight.wait()
            running.enter()
            onWorkers.value.wrappingAdd(1, ordering: .relaxed)
            workers.submit {
                defer {
                    onWorkers.value.wrappingSubtract(1, ordering: .releasing)
                    inFlight.signal()
                    running.leave()
                }
                job()
            }
        }
        var decoder = FrameDecoder()
        var greeted = false
        var peerVersion = FrameLimits.protocolVersion
        // The plaintext receive buffer; an authenticated connection reads into its channel's.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: c.channel == nil ? Self.receiveBufferSize : 0, alignment: 16)
        defer { buffer.deallocate() }
        while true {
            let chunk: UnsafeRawBufferPointer
            if let channel = c.channel {
                do {
                    chunk = try channel.receive() ?? UnsafeRawBufferPointer(start: nil, count: 0)
                } catch {
                    log.warning("closing replica connection", metadata: ["error": "\(error)"])
                    return
                }
            } else {
                let n = recv(c.fd, buffer.baseAddress, buffer.count, 0)
                if n < 0 {
                    if errno == EINTR { continue }
                    log.info("replica connection failed", metadata: ["error": "\(String(cString: strerror(errno)))"])
                    return
                }
                chunk = UnsafeRawBufferPointer(rebasing: buffer[0..<n])
            }
            if chunk.isEmpty {
                do {
                    try decoder.finish()
                    log.debug("replica connection closed by the peer")
                } catch {
                    log.warning("closing connection: \(error.reason)")
                }
                return
            }
            var frames: [Frame]
            do {
                frames = try decoder.feed(chunk)
            } catch {
                log.warning("closing connection: \(error.reason)")
                return
            }
            // An authenticated connection hands over one record at a time; the records one
            // receive brought are taken together (as a plaintext receive's frames are), so a
            // queue of writes goes out as a group and the lone-request path below sees only a
            // request that really is alone. Before, each record's frame looked alone and ran on
            // this thread, one device write after another, with flushes queued behind them.
            // A record that breaks the stream closes the connection after the requests before
            // it are served, as when it came in a receive of its own.
            var broken: (message: Logger.Message, error: String?)?
            if let channel = c.channel {
                while frames.count < Self.maxFramesPerReceive, channel.hasCompleteRecord {
                    do {
                        guard let more = try channel.receive() else { break }
                        frames += try decoder.feed(more)
                    } catch let error as FrameError {
                        broken = ("closing connection: \(error.reason)", nil)
                        break
                    } catch {
                        broken = ("closing replica connection", "\(error)")
                        break
                    }
                }
            }
            // Frames already handed out with a group of writes.
            var grouped: Set<Int> = []
            for (index, frame) in frames.enumerated() where !grouped.contains(index) {
                guard !frame.isResponse else {
                    log.warning("closing connection: the peer sent a \(frame.opcode) response (request id \(frame.requestID)); a replica server only takes requests")
                    return
                }
                if let hello = frame.request(DataOp.Hello.self) {
                    guard !greeted else {
                        log.warning("closing connection: a second hello (request id \(frame.requestID))")
                        return
                    }
                    let versions = protocolVersions
                    guard versions.contains(hello.protocolVersion) else {
                        let message = "protocol version \(hello.protocolVersion) is not supported; this replica server speaks \(versions.lowerBound)...\(versions.upperBound)"
                        c.send(Frame(requestID: frame.requestID, epoch: 0, body: .response(DataOp.Hello.response(
                            HelloResponse(status: .badRequest, message: message)))))
                        log.warning("closing connection: \(message)")
                        return
                    }
                    greeted = true
                    peerVersion = hello.protocolVersion
                    c.send(Frame(requestID: frame.requestID, epoch: 0, body: .response(DataOp.Hello.response(
                        HelloResponse(status: .ok, protocolVersion: peerVersion)))))
                    continue
                }
                guard greeted else {
                    log.warning("closing connection: the first frame must be hello, got \(frame.opcode) (request id \(frame.requestID))")
                    return
                }
                // Several small writes of one volume in this receive (a queue of writes): one
                // job for a worker, their device writes submitted together (writeGroup) and
                // their replies sent in one go — one wake-up and one device notification for
                // the lot instead of one each.
                if frames.count - index >= 2, let group = Self.writeGroup(frames, from: index), group.count >= 2 {
                    grouped.formUnion(group)
                    let members = group.map { frames[$0] }
                    onWorker { [self, peerVersion] in
                        c.send(handleWriteGroup(members, peerVersion: peerVersion, peer: c.channel?.peer, logger: log))
                    }
                    continue
                }
                // A lone small write or a lone flush (queue depth 1: a database's commit) runs
                // on this thread. Everything else — writes with others in flight or behind
                // them, larger ones, reads, claims — goes to the pool, so a slow one does not
                // stall the rest and writes wait for the device in parallel. (Order between
                // them does not matter: the engine never has two writes of one block in flight,
                // OverlapGate.swift, and a flush covers only writes answered before it.)
                if index == frames.count - 1, onWorkers.value.load(ordering: .acquiring) == 0,
                   Self.runsInline(frame) {
                    c.send(handle(frame, peerVersion: peerVersion, peer: c.channel?.peer, logger: log))
                    continue
                }
                onWorker { [self, peerVersion] in
                    c.send(handle(frame, peerVersion: peerVersion, peer: c.channel?.peer, logger: log))
                }
            }
            if let broken {
                log.warning(broken.message, metadata: broken.error.map { ["error": "\($0)"] })
                return
            }
        }
    }

    /// Most writes one group takes (`writeGroup`).
    static let maxGroupedWrites = 64
    /// Most frames the reader takes from buffered records before it hands them out.
    static let maxFramesPerReceive = 64

    /// A plain write (not a resync or repair copy) of whole blocks, at most `inlineWriteLimit`:
    /// what may go in a group. Not a durable write: the engine asks for one only when it has
    /// no other write in flight, and it is answered after its own sync.
    static func groupable(_ frame: Frame) -> WriteRequest? {
        guard let m = frame.request(DataOp.Write.self), !m.ifNewer, !m.repair, !m.durable, !m.data.isEmpty,
              m.data.count <= inlineWriteLimit, m.data.count % FrameLimits.blockSize == 0 else { return nil }
        return m
    }

    /// The indices of the frames from `index` on that can go in one group with `frames[index]`:
    /// groupable writes of the same volume and epoch, at most `maxGroupedWrites`. Nil when
    /// `frames[index]` is not a groupable write.
    static func writeGroup(_ frames: [Frame], from index: Int) -> [Int]? {
        guard let first = groupable(frames[index]) else { return nil }
        var group = [index]
        for j in (index + 1)..<frames.count where group.count < maxGroupedWrites {
            if frames[j].epoch == frames[index].epoch, let m = groupable(frames[j]), m.volume == first.volume { group.append(j) }
        }
        return group
    }

    /// Runs a group of writes of one volume (`writeGroup`'s) with `ReplicaStore.writeGroup` and
    /// returns their responses, in order: each as `handle` would answer it alone.
    func handleWriteGroup(_ frames: [Frame], peerVersion: UInt16, peer: PeerIdentity?, logger log: Logger) -> [Frame] {
        let began = metrics.start()
        grouped.wrappingAdd(UInt64(frames.count), ordering: .relaxed)
        groups.wrappingAdd(1, ordering: .relaxed)
        let requests = frames.map { Self.groupable($0)! }
        let contexts = frames.map {
            RequestContext(epoch: $0.epoch, requestFlags: $0.headerFlags & ~FrameFlags.response, peerVersion: peerVersion,
                           peer: peer, log: log)
        }
        var errors = [(any Error)?](repeating: nil, count: frames.count)
        do {
            let store = try store(requests[0].volume)
            var writes: [ReplicaStore.GroupWrite] = []
            var indices: [Int] = []
            for (i, m) in requests.enumerated() {
                do {
                    try checkRange(store, offset: m.offset, length: UInt64(m.data.count))
                } catch {
                    errors[i] = error
                    continue
                }
                // The decoded data is aligned memory of its own (BlockData), alive while
                // `requests` is: the store writes from it directly (O_DIRECT), no copy.
                let data = m.data.withUnsafeBytes { $0 }
                writes.append(ReplicaStore.GroupWrite(offset: m.offset, data: data, generation: m.generation))
                indices.append(i)
            }
            // A group's writes carry one epoch (`writeGroup` groups no others).
            let epoch = frames[0].epoch
            let outcomes = withExtendedLifetime(requests) { store.writeGroup(writes, epoch: epoch) }
            for (k, error) in outcomes.enumerated() where error != nil {
                errors[indices[k]] = error
            }
        } catch {
            for i in errors.indices where errors[i] == nil { errors[i] = error }
        }
        return frames.indices.map { i in
            metrics.served(.write, since: began)
            if let error = errors[i] {
                let failure = failure(error, frame: frames[i], context: contexts[i])
                return Frame(requestID: frames[i].requestID, epoch: failure.epoch,
                             body: .response(DataOp.Write.failureResponse(failure)))
            }
            return Frame(requestID: frames[i].requestID, epoch: contexts[i].epoch,
                         body: .response(DataOp.Write.response(WriteResponse(status: .ok))))
        }
    }

    /// Whether a request that arrives alone (nothing else of its connection running or
    /// waiting) is run on the reader: a write of up to `inlineWriteLimit`, or a flush. A hand-off
    /// to a worker and back costs two wake-ups, more than either takes on this thread.
    static func runsInline(_ frame: Frame) -> Bool {
        if frame.opcode == .flush { return true }
        if let m = frame.request(DataOp.Write.self) { return m.data.count <= inlineWriteLimit }
        return false
    }

    // MARK: requests

    /// What a handler knows about the request besides its body.
    struct RequestContext {
        /// The request header's epoch.
        let epoch: UInt64
        let requestFlags: UInt8
        /// The hello's negotiated protocol version (what the peer understands).
        let peerVersion: UInt16
        /// Who the peer proved to be (auth and secure modes); nil on plain TCP.
        var peer: PeerIdentity? = nil
        let log: Logger
    }

    /// One op's server side: runs the request and answers it, a failure included.
    typealias Handler = @Sendable (ReplicaServer, Frame, RequestContext) -> Frame

    /// An op's handler: `body` answers a request of `Op`; any error it throws becomes `Op`'s
    /// failure response (status, message, the fencing epoch, a damaged block).
    static func handler<Op: DataOperation>(
        _: Op.Type, _ body: @escaping @Sendable (ReplicaServer, Op.Request, RequestContext) throws -> Op.Response
    ) -> (Opcode, Handler) {
        (Op.opcode, { server, frame, context in
            do {
                guard let request = frame.request(Op.self) else {
                    throw ReplicaError.badRequest("a \(frame.opcode) frame is not a \(Op.name) request")
                }
                let response = try body(server, request, context)
                return Frame(requestID: frame.requestID, epoch: response.headerEpoch ?? context.epoch,
                             body: .response(Op.response(response)))
            } catch {
                let failure = server.failure(error, frame: frame, context: context)
                return Frame(requestID: frame.requestID, epoch: failure.epoch, body: .response(Op.failureResponse(failure)))
            }
        })
    }

    /// The server side of every op, by opcode (a test checks every declared op has one).
    static let handlers: [Opcode: Handler] = Dictionary(uniqueKeysWithValues: [
        handler(DataOp.Hello.self) { _, _, _ in
            throw ReplicaError.badRequest("hello is only valid as the first frame")
        },
        handler(DataOp.Create.self) { server, m, _ in
            try server.createReplica(volume: m.volume, size: m.size)
            return PlainResponse(status: .ok)
        },
        handler(DataOp.Delete.self) { server, m, c in
            try server.deleteReplica(volume: m.volume, epoch: c.epoch)
            return PlainResponse(status: .ok)
        },
        handler(DataOp.Claim.self) { server, m, c in
            if let identity = server.security.identity, let peer = c.peer,
               let refusal = identity.refusal(ofClaim: m.grant, volumeID: m.volume, epoch: c.epoch, by: peer) {
                c.log.warning("refused a claim: \(refusal)", metadata: [
                    "volume.id": "\(m.volume)", "claim.epoch": "\(c.epoch)", "replica.peer_identity": "\(peer)",
                ])
                // Answered without the replica's epoch: only a valid grant learns it.
                throw ReplicaError.badRequest("claim refused: \(refusal)")
            }
            let store = try server.store(m.volume)
            let before = store.status.epoch
            try store.claim(epoch: c.epoch)
            if c.epoch > before {
                c.log.info("claim accepted", metadata: [
                    "volume.id": "\(m.volume)", "claim.epoch": "\(c.epoch)", "replica.previous_epoch": "\(before)",
                    "replica.peer_identity": "\(c.peer.map { "\($0)" } ?? "unauthenticated")",
                ])
            }
            return ClaimResponse(status: .ok, replicaEpoch: store.status.epoch)
        },
        handler(DataOp.Status.self) { server, m, c in
            let s = try server.store(m.volume).status
            guard c.epoch >= s.epoch else { throw ReplicaError.staleEpoch(seen: s.epoch, got: c.epoch) }
            return StatusResponse(status: .ok, size: s.size, replicaEpoch: s.epoch, flushedGeneration: s.flushedGeneration,
                                  highestGeneration: s.highestGeneration)
        },
        handler(DataOp.Read.self) { server, m, c in
            let store = try server.store(m.volume)
            try server.checkRange(store, offset: m.offset, length: UInt64(m.length))
            return ReadResponse(status: .ok, data: try store.read(offset: m.offset, length: Int(m.length), epoch: c.epoch))
        },
        handler(DataOp.Write.self) { server, m, c in try server.write(m, context: c) },
        handler(DataOp.Generations.self) { server, m, c in
            let store = try server.store(m.volume)
            try ReplicaStore.checkGenerationsCount(Int(m.count))
            let start = try server.blockOffset(m.firstBlock, of: store)
            try server.checkRange(store, offset: start, length: UInt64(m.count) * UInt64(ReplicaStore.blockSize))
            let generations = try store.generations(firstBlock: m.firstBlock, count: Int(m.count), epoch: c.epoch)
            return GenerationsResponse(status: .ok, generations: generations)
        },
        handler(DataOp.Summary.self) { server, m, c in
            let digests = try server.store(m.volume).generationSummary(firstRegion: m.firstBlock, count: Int(m.count), epoch: c.epoch)
            return GenerationsResponse(status: .ok, generations: digests)
        },
        handler(DataOp.Activity.self) { server, m, c in
            let activity = try server.store(m.volume).activity(cleanThrough: m.cleanThrough, converged: m.converged, epoch: c.epoch)
            return ActivityResponse(status: .ok, activity: activity)
        },
        handler(DataOp.Verify.self) { server, m, c in
            let bad = try server.store(m.volume).verify(firstBlock: m.firstBlock, count: Int(m.count), epoch: c.epoch)
            return GenerationsResponse(status: .ok, generations: bad)
        },
        handler(DataOp.Flush.self) { server, m, c in
            let store = try server.store(m.volume)
            try store.flush(epoch: c.epoch, through: m.through)
            return FlushResponse(status: .ok, flushedGeneration: store.status.flushedGeneration)
        },
        handler(DataOp.Snapshot.self) { server, m, c in
            if m.barrier {
                let nodes = try server.barrierSnapshot(volume: m.volume, snapshotID: m.snapshotID, epoch: c.epoch)
                return SnapshotResponse(status: .ok, nodes: nodes, barrier: true)
            }
            let snap = try server.snapshotReplica(volume: m.volume, snapshotID: m.snapshotID, epoch: c.epoch)
            return SnapshotResponse(status: .ok, size: snap.size, generation: snap.generation)
        },
        handler(DataOp.DeleteSnapshot.self) { server, m, c in
            try server.deleteSnapshot(volume: m.volume, snapshotID: m.snapshotID, epoch: c.epoch)
            return PlainResponse(status: .ok)
        },
        handler(DataOp.ListSnapshots.self) { server, m, c in
            ListSnapshotsResponse(status: .ok, snapshots: try server.listSnapshots(volume: m.volume, epoch: c.epoch))
        },
        handler(DataOp.Clone.self) { server, m, _ in
            try server.cloneReplica(volume: m.volume, source: m.source, snapshotID: m.snapshotID, size: m.size)
            return PlainResponse(status: .ok)
        },
        handler(DataOp.Grow.self) { server, m, c in
            try server.growReplica(volume: m.volume, size: m.size, epoch: c.epoch)
            return PlainResponse(status: .ok)
        },
        handler(DataOp.HoldWrites.self) { server, m, c in
            try server.holdWrites(volume: m.volume, timeout: .milliseconds(Int(m.timeoutMilliseconds)), epoch: c.epoch)
            return PlainResponse(status: .ok)
        },
        handler(DataOp.ReleaseWrites.self) { server, m, c in
            try server.releaseWrites(volume: m.volume, epoch: c.epoch)
            return PlainResponse(status: .ok)
        },
        handler(DataOp.Trim.self) { server, m, c in try server.trim(m, context: c) },
        // Backups read sealed snapshots: not fenced (the header's epoch is not checked).
        handler(DataOp.SnapshotRead.self) { server, m, _ in
            let store = try server.store(m.volume)
            try server.checkSnapshotRange(store, snapshotID: m.snapshotID, offset: m.offset, length: UInt64(m.length))
            return ReadResponse(status: .ok, data: try store.read(snapshotID: m.snapshotID, offset: m.offset, length: Int(m.length)))
        },
        handler(DataOp.SnapshotGenerations.self) { server, m, _ in
            let store = try server.store(m.volume)
            try ReplicaStore.checkGenerationsCount(Int(m.count))
            let start = try server.blockOffset(m.firstBlock, of: store)
            try server.checkSnapshotRange(store, snapshotID: m.snapshotID, offset: start, length: UInt64(m.count) * UInt64(ReplicaStore.blockSize))
            let generations = try store.generations(snapshotID: m.snapshotID, firstBlock: m.firstBlock, count: Int(m.count))
            return GenerationsResponse(status: .ok, generations: generations)
        },
    ])

    /// Runs one request through its op's handler; every failure becomes the op's response.
    func handle(_ frame: Frame, peerVersion: UInt16 = FrameLimits.protocolVersion, peer: PeerIdentity? = nil,
                logger log: Logger) -> Frame {
        let context = RequestContext(epoch: frame.epoch, requestFlags: frame.headerFlags & ~FrameFlags.response,
                                     peerVersion: peerVersion, peer: peer, log: log)
        guard let handler = Self.handlers[frame.opcode] else {
            // Every declared op has a handler (a test pins it down); the decoder refuses the rest.
            let failure = failure(ReplicaError.badRequest("this replica server has no handler for \(frame.opcode)"),
                                  frame: frame, context: context)
            return Frame(requestID: frame.requestID, epoch: failure.epoch,
                         body: .response(DataOp.operation(frame.opcode)?.failureResponse(failure) ?? frame.message))
        }
        let began = metrics.start()
        defer { metrics.served(frame.opcode, since: began) }
        return handler(self, frame, context)
    }

    /// A refused request's failure: its status and message, the epoch to answer with (the
    /// newer one that fenced the sender), and the damaged block of a checksum mismatch for a
    /// peer that takes it. Logged here, once for every op.
    private func failure(_ error: any Error, frame: Frame, context: RequestContext) -> ReplyFailure {
        let (status, message) = Self.replyStatus(for: error)
        metrics.failed(frame.opcode)
        var failure = ReplyFailure(status: status, message: message, epoch: context.epoch, requestFlags: context.requestFlags)
        if case let ReplicaError.staleEpoch(seen, _) = error { failure.epoch = seen }
        if case let ReplicaError.checksumMismatch(block) = error, context.peerVersion >= 2 { failure.damagedBlock = block }
        let level: Logger.Level = status == .ioError || status == .checksumMismatch ? .error : .info
        context.log.log(level: level, "replica request refused", metadata: [
            "replica.op": "\(frame.opcode)", "replica.request_id": "\(frame.requestID)",
            "replica.status": "\(status)", "error": "\(message)",
        ])
        return failure
    }

    private func write(_ m: WriteRequest, context c: RequestContext) throws -> WriteResponse {
        let store = try store(m.volume)
        try checkRange(store, offset: m.offset, length: UInt64(m.data.count))
        guard m.ifNewer || m.repair else {
            let durable = try m.data.withUnsafeBytes {
                try store.write(offset: m.offset, bytes: $0, generation: m.generation, epoch: c.epoch, durable: m.durable)
            }
            return WriteResponse(status: .ok, durable: durable)
        }
        let applied = try m.data.withUnsafeBytes {
            try store.write(offset: m.offset, bytes: $0, generation: m.generation, epoch: c.epoch,
                            condition: m.repair ? .ifNotNewer : .ifNewer)
        }
        if m.repair {
            c.log.warning("replica blocks repaired", metadata: [
                "volume.id": "\(m.volume)", "replica.offset": "\(m.offset)", "replica.generation": "\(m.generation)",
                "replica.applied": "\(applied)"])
        }
        return WriteResponse(status: .ok, appliedBlocks: UInt32(applied))
    }

    private func trim(_ m: TrimRequest, context c: RequestContext) throws -> TrimResponse {
        let store = try store(m.volume)
        try checkRange(store, offset: m.offset, length: m.length)
        // The store bounds one call; a trim may cover the whole volume.
        let chunk = UInt64(ReplicaStore.maxRequestLength)
        var done: UInt64 = 0
        var applied = 0
        while done < m.length {
            let n = min(chunk, m.length - done)
            applied += try store.trim(offset: m.offset + done, length: Int(n),
                                      generation: m.generation == 0 ? nil : m.generation, epoch: c.epoch, ifNewer: m.ifNewer)
            done += n
        }
        return TrimResponse(status: .ok, appliedBlocks: m.ifNewer ? UInt32(clamping: applied) : nil)
    }

    static func noEngine(_ volume: String) -> ReplicaError {
        .notFound("no engine runs volume \(volume) on this node; send barrier requests to the node the volume is attached to, or snapshot each replica when it is not attached")
    }

    /// The wire status of an error, and its message.
    static func replyStatus(for error: any Error) -> (ReplyStatus, String) {
        switch error {
        case let e as ReplicaError:
            switch e {
            case .staleEpoch: return (.staleEpoch, e.description)
            case .checksumMismatch: return (.checksumMismatch, e.description)
            case .badRequest, .alreadyExists: return (.badRequest, e.description)
            case .notFound, .closed: return (.notFound, e.description)
            case .corruptSuperblock, .wrongVolume, .inUse: return (.ioError, e.description)
            }
        case let e as CairnError:
            return (status(for: e.code), e.message)
        case let e as any StatusConvertible:
            return (status(for: e.status.code), e.status.message)
        default:
            return (.ioError, "\(error)")
        }
    }

    private static func status(for code: StatusCode) -> ReplyStatus {
        switch code {
        case .invalidArgument, .alreadyExists: .badRequest
        case .notFound: .notFound
        case .outOfRange: .outOfRange
        case .dataLoss: .checksumMismatch
        default: .ioError
        }
    }

    /// Block `block`'s byte offset; `outOfRange` when it overflows.
    private func blockOffset(_ block: UInt64, of store: ReplicaStore) throws -> UInt64 {
        let (start, overflow) = block.multipliedReportingOverflow(by: UInt64(ReplicaStore.blockSize))
        guard !overflow else { throw CairnError.outOfRange("block \(block) is beyond the end of volume \(store.volumeID)") }
        return start
    }

    /// `checkRange` against snapshot `snapshotID`'s size (`notFound` without the snapshot).
    private func checkSnapshotRange(_ store: ReplicaStore, snapshotID: String, offset: UInt64, length: UInt64) throws {
        let snap = try store.existingSnapshot(id: snapshotID)
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= snap.size else {
            throw CairnError.outOfRange("range \(offset)+\(length) is beyond the end of snapshot \(snapshotID) of volume \(store.volumeID) (\(snap.size) bytes)")
        }
    }

    private func checkRange(_ store: ReplicaStore, offset: UInt64, length: UInt64) throws {
        let size = store.status.size
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= size else {
            throw CairnError.outOfRange("range \(offset)+\(length) is beyond the end of volume \(store.volumeID) (\(size) bytes)")
        }
    }

    // MARK: the store registry

    private func directory(_ volume: String) throws -> String {
        try Validate.volumeID(volume, field: "volume id")
        return replicasDir + "/" + volume
    }

    private static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// The open store of `volume` (opened on first use), for an engine in this process that
    /// reads and writes its local replica directly instead of over loopback TCP. It is the same
    /// store the server's connections use, so the epoch rule is enforced identically; the caller
    /// must not close it (the server does, at `stop` or when the replica is deleted — later
    /// calls then fail with `closed`).
    public func openStore(volumeID: String) throws -> ReplicaStore {
        try store(volumeID)
    }

    /// The open store of `volume`, opening it on first use.
    private func store(_ volume: String) throws -> ReplicaStore {
        let dir = try directory(volume)
        return try stores.withLock { open throws -> ReplicaStore in
            if let store = open[volume] { return store }
            guard Self.exists(dir + "/superblock") else {
                throw ReplicaError.notFound("no replica of volume \(volume) on this node (the controller creates it with the create op)")
            }
            let store = try ReplicaStore.open(directory: dir, volumeID: volume, logger: logger)
            open[volume] = store
            return store
        }
    }

    // MARK: control operations (the data ops' and the ReplicaControl service's one body each)

    /// Takes snapshot `snapshotID` of this node's replica of `volume` (idempotent by id).
    public func snapshotReplica(volume: String, snapshotID: String, epoch: UInt64) throws -> ReplicaSnapshot {
        try store(volume).snapshot(id: snapshotID, epoch: epoch)
    }

    /// Takes snapshot `snapshotID` through the engine running `volume` here (its write barrier
    /// over every in-sync replica); the node ids holding it. `notFound` when no engine runs it.
    public func barrierSnapshot(volume: String, snapshotID: String, epoch: UInt64) throws -> [String] {
        guard let hooks = engineHooks, let nodes = try hooks.snapshot(volume: volume, snapshotID: snapshotID, epoch: epoch) else {
            throw Self.noEngine(volume)
        }
        return nodes
    }

    /// Deletes snapshot `snapshotID` of this node's replica of `volume` (a missing one is fine).
    public func deleteSnapshot(volume: String, snapshotID: String, epoch: UInt64) throws {
        try store(volume).deleteSnapshot(id: snapshotID, epoch: epoch)
    }

    /// The snapshots this node's replica of `volume` holds.
    public func listSnapshots(volume: String, epoch: UInt64) throws -> [SnapshotEntry] {
        try store(volume).snapshots(epoch: epoch).map { SnapshotEntry(id: $0.id, size: $0.size, generation: $0.generation) }
    }

    /// Grows this node's replica of `volume` to `size` bytes (a replica already that large is fine).
    public func growReplica(volume: String, size: UInt64, epoch: UInt64) throws {
        try store(volume).grow(to: size, epoch: epoch)
    }

    /// Holds the writes of the engine running `volume` here for at most `timeout`; `notFound`
    /// when no engine runs it.
    public func holdWrites(volume: String, timeout: Duration, epoch: UInt64) throws {
        guard let hooks = engineHooks, try hooks.holdWrites(volume: volume, timeout: timeout, epoch: epoch) else {
            throw Self.noEngine(volume)
        }
    }

    /// Releases that hold; `notFound` when no engine runs `volume` here.
    public func releaseWrites(volume: String, epoch: UInt64) throws {
        guard let hooks = engineHooks, try hooks.releaseWrites(volume: volume, epoch: epoch) else {
            throw Self.noEngine(volume)
        }
    }

    /// Creates the replica, or accepts an existing one of the same size.
    public func createReplica(volume: String, size: UInt64) throws {
        try make(volume: volume, size: size, what: "re-create it") { [logger] dir in
            try ReplicaStore.create(directory: dir, volumeID: volume, size: size, logger: logger)
        }
    }

    /// Creates replica `volume` from snapshot `snapshotID` of this node's replica of `source`, or
    /// accepts an existing one of the same size (a repeated clone).
    public func cloneReplica(volume: String, source: String, snapshotID: String, size: UInt64) throws {
        guard volume != source else { throw ReplicaError.badRequest("a clone needs a new volume id, not its source's (\(source))") }
        let sourceStore = try store(source)
        try make(volume: volume, size: size, what: "clone again") { [logger] dir in
            try ReplicaStore.clone(from: sourceStore, snapshotID: snapshotID, directory: dir, volumeID: volume, size: size, logger: logger)
        }
    }

    /// Under the registry lock: accepts an existing replica of `volume` of the same size (a
    /// repeated request), refuses one of another size, or makes it with `body`.
    private func make(volume: String, size: UInt64, what: String, _ body: (String) throws -> ReplicaStore) throws {
        let dir = try directory(volume)
        try stores.withLock { open throws in
            var store = open[volume]
            if store == nil, Self.exists(dir + "/superblock") {
                store = try ReplicaStore.open(directory: dir, volumeID: volume, logger: logger)
                open[volume] = store
            }
            if let store {
                let existing = store.status.size
                guard existing == size else {
                    throw ReplicaError.alreadyExists("the replica of volume \(volume) exists with size \(existing), not \(size); delete it first to \(what)")
                }
                logger.debug("replica already exists", metadata: ["volume.id": "\(volume)", "replica.size": "\(size)"])
                return
            }
            open[volume] = try body(dir)
        }
    }

    /// Closes and removes the replica; a missing one is fine. A sender with an epoch older than
    /// the replica's is refused (a fenced writer cannot delete the volume either).
    public func deleteReplica(volume: String, epoch: UInt64) throws {
        let dir = try directory(volume)
        let trashDir = dataDir + "/replicas-trash"
        let trash = trashDir + "/" + volume
        try stores.withLock { open throws in
            var store = open[volume]
            if store == nil, Self.exists(dir + "/superblock") {
                do {
                    store = try ReplicaStore.open(directory: dir, volumeID: volume, logger: logger)
                } catch let error as ReplicaError {
                    guard case .corruptSuperblock = error else { throw error }
                    logger.warning("deleting a replica whose superblock is unreadable",
                                   metadata: ["volume.id": "\(volume)", "error": "\(error)"])
                }
            }
            if let store {
                let seen = store.status.epoch
                guard epoch >= seen else { throw ReplicaError.staleEpoch(seen: seen, got: epoch) }
                open[volume] = nil
                do { try store.close() } catch {
                    logger.warning("replica did not close cleanly before deletion", metadata: ["volume.id": "\(volume)", "error": "\(error)"])
                }
            }
            guard Self.exists(dir) else { return }
            // Rename first: the replica disappears atomically, and a crash mid-removal leaves
            // only trash (removed by the next delete of this volume).
            if mkdir(trashDir, 0o700) != 0, errno != EEXIST { throw SystemError("mkdir \(trashDir)", errno: errno) }
            if Self.exists(trash) { try FileTree.remove(trash) }
            guard rename(dir, trash) == 0 else { throw SystemError("rename \(dir) to \(trash)", errno: errno) }
        }
        if Self.exists(trash) {
            try FileTree.remove(trash)
            logger.info("replica deleted", metadata: ["volume.id": "\(volume)"])
        }
    }
}

/// How many of a connection's requests the workers are running.
final class WorkerCount: Sendable {
    let value = Atomic<Int>(0)
}

/// One accepted connection: the descriptor, and the queue that keeps responses whole.
final class ServerConnection: @unchecked Sendable {
    let fd: Int32
    let peer: String
    /// The authenticated channel (auth and secure modes); set by the reader before any frame is
    /// read or sent, never changed afterwards.
    var channel: SecureChannel?
    /// Every response goes out through it; closed with the descriptor.
    private(set) var sendQueue: FrameSendQueue!

    init(fd: Int32, peer: String) {
        self.fd = fd
        self.peer = peer
        // The connection owns the queue, so the queue's writer never outlives it.
        sendQueue = FrameSendQueue { [unowned self] parts in
            if let channel { try channel.send(parts) } else { try StreamSocket.sendAll(fd, parts) }
        }
    }

    /// Sends frames whole, in order, as one entry of the send queue (one system call when
    /// nobody else is sending).
    func send(_ frames: [Frame]) {
        var parts: [FramePart] = []
        parts.reserveCapacity(frames.count * 2)
        for frame in frames {
            let payload = frame.encodePayload()
            let header = FrameHeader(opcode: frame.opcode, flags: frame.headerFlags,
                                     requestID: frame.requestID, payloadLength: UInt32(payload.count), epoch: frame.epoch)
            parts.append(.owned(header.encode()))
            parts.append(.owned(payload))
        }
        if sendQueue.send(parts) != nil {
            _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
        }
    }

    /// Sends a whole frame; a failure (the peer went) is left to the reader to notice.
    func send(_ frame: Frame) {
        let payload = frame.encodePayload()
        let header = FrameHeader(opcode: frame.opcode, flags: frame.headerFlags,
                                 requestID: frame.requestID, payloadLength: UInt32(payload.count), epoch: frame.epoch)
        if sendQueue.send([.owned(header.encode()), .owned(payload)]) != nil {
            _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
        }
    }

    /// Wakes the reader (recv returns 0) without closing the descriptor under it.
    func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    func close() {
        sendQueue.close { _ = Glibc.close(fd) }
    }
}

/// Recursive removal of a directory tree the server owns (never follows symlinks).
enum FileTree {
    static func remove(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            if errno == ENOENT { return }
            throw SystemError("lstat \(path)", errno: errno)
        }
        if st.st_mode & S_IFMT == S_IFDIR {
            guard let dir = opendir(path) else { throw SystemError("opendir \(path)", errno: errno) }
            var names: [String] = []
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                    String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
                }
                if name != "." && name != ".." { names.append(name) }
            }
            closedir(dir)
            for name in names { try remove(path + "/" + name) }
            guard rmdir(path) == 0 || errno == ENOENT else { throw SystemError("rmdir \(path)", errno: errno) }
        } else {
            guard unlink(path) == 0 || errno == ENOENT else { throw SystemError("unlink \(path)", errno: errno) }
        }
    }
}
