import CairnCore
@testable import CairnReplica
import Dispatch
import Foundation
import Logging
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Keeps every log record, so tests can check what the server said and why.
final class CapturedLogs: Sendable {
    struct Record: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: [String: String]
    }

    let records = Mutex<[Record]>([])

    var logger: Logger {
        Logger(label: "test") { _ in Handler(sink: self) }
    }

    func contains(_ level: Logger.Level, _ text: String) -> Bool {
        records.withLock { $0.contains { $0.level == level && $0.message.contains(text) } }
    }

    struct Handler: LogHandler {
        let sink: CapturedLogs
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(level: Logger.Level, message: Logger.Message, metadata extra: Logger.Metadata?,
                 source: String, file: String, function: String, line: UInt) {
            let all = metadata.merging(extra ?? [:]) { $1 }.mapValues { "\($0)" }
            sink.records.withLock { $0.append(Record(level: level, message: "\(message)", metadata: all)) }
        }
    }
}

/// The replica server and client over real TCP on 127.0.0.1 (docs/replica-format.md,
/// "Data protocol").
final class ReplicaServerTests: XCTestCase {
    private var root = ""
    private var server: ReplicaServer?
    private var clients: [ReplicaClient] = []
    private var logs = CapturedLogs()
    private let volume = "vol-5b1e"
    private let size: UInt64 = 64 << 20
    private let bs = FrameLimits.blockSize

    override func setUpWithError() throws {
        root = "/tmp/cairn-replica-server-test-" + UUID().uuidString
        XCTAssertEqual(mkdir(root, 0o700), 0)
        logs = CapturedLogs()
        try startServer()
    }

    override func tearDownWithError() throws {
        for c in clients { c.close() }
        clients = []
        server?.stop()
        server = nil
        if !root.isEmpty { try? FileManager.default.removeItem(atPath: root) }
    }

    /// A rolling upgrade reaches an engine before some agents: the newer client connects to a
    /// server that speaks only protocol version 1 and works at that version.
    func testClientFallsBackToTheOlderProtocolOfAnOlderServer() throws {
        let old = try ReplicaServer(dataDir: root + "/old", host: "127.0.0.1", port: 0, logger: logs.logger,
                                    protocolVersions: 1...1)
        try old.start()
        defer { old.stop() }
        XCTAssertThrowsError(try ReplicaClient(host: "127.0.0.1", port: old.boundPort),
                             "the newest hello is refused by a version-1 server")
        let client = try ReplicaClient.connect(host: "127.0.0.1", port: old.boundPort)
        defer { client.close() }
        try client.create(volumeID: "vol-old", sizeBytes: 1 << 20)
        _ = try client.claim(volumeID: "vol-old", epoch: 1)
        try pattern(4096, seed: 3).withUnsafeBytes { try client.write(volumeID: "vol-old", offset: 0, data: $0, generation: 1, epoch: 1) }
        XCTAssertEqual(try client.read(volumeID: "vol-old", offset: 0, length: 4096, epoch: 1), pattern(4096, seed: 3))
    }

    // MARK: helpers

    private func startServer() throws {
        let s = try ReplicaServer(dataDir: root, host: "127.0.0.1", port: 0, logger: logs.logger)
        try s.start()
        server = s
    }

    private var port: UInt16 { server!.boundPort }

    private func client(requestTimeout: Duration = .seconds(10)) throws -> ReplicaClient {
        let c = try ReplicaClient(host: "127.0.0.1", port: port, requestTimeout: requestTimeout)
        clients.append(c)
        return c
    }

    private func pattern(_ bytes: Int, seed: Int) -> [UInt8] { Self.pattern(bytes, seed: seed) }

    private static func pattern(_ bytes: Int, seed: Int) -> [UInt8] {
        (0..<bytes).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ seed &* 101 &+ ($0 >> 12)) }
    }

    private func write(_ c: ReplicaClient, _ offset: UInt64, _ data: [UInt8], generation: UInt64, epoch: UInt64) throws {
        try data.withUnsafeBytes {
            try c.write(volumeID: volume, offset: offset, data: $0, generation: generation, epoch: epoch)
        }
    }


    /// A raw TCP connection: sends `bytes`, then reports whether the server closed the
    /// connection (EOF) within 5 s, and everything it sent before.
    private func sendRaw(_ bytes: [UInt8], hello: Bool = false) throws -> (closed: Bool, received: [UInt8]) {
        let fd = try Socket.connect(host: "127.0.0.1", port: port, timeout: .seconds(3))
        defer { Glibc.close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        if hello {
            try Frame(requestID: 1, epoch: 0, body: .request(DataOp.Hello.request(HelloRequest()))).encode().withUnsafeBytes { try Socket.sendAll(fd, $0) }
            var decoder = FrameDecoder()
            while received.count < FrameLimits.headerSize + 5 {
                let n = recv(fd, &buffer, buffer.count, 0)
                guard n > 0 else { throw SocketError("no hello reply") }
                received += buffer[0..<n]
            }
            XCTAssertEqual(try decoder.feed(received).map(\.opcode), [.hello])
        }
        try bytes.withUnsafeBytes { try Socket.sendAll(fd, $0) }
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n == 0 { return (true, received) }
            if n < 0 { return (errno == ECONNRESET, received) }
            received += buffer[0..<n]
        }
    }

    // MARK: the data path

    func testCreateClaimWriteReadFlushStatusRoundTrip() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        let claimed = try c.claim(volumeID: volume, epoch: 3)
        XCTAssertEqual(claimed.epoch, 3)
        XCTAssertEqual(claimed.size, size)
        XCTAssertEqual(claimed.highestGeneration, 0)

        let data = pattern(3 * bs, seed: 1)
        try write(c, UInt64(5 * bs), data, generation: 1, epoch: 3)
        XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(5 * bs), length: 3 * bs, epoch: 3), data)
        // Never-written blocks read as zeros.
        XCTAssertEqual(try c.read(volumeID: volume, offset: 0, length: bs, epoch: 3), [UInt8](repeating: 0, count: bs))

        var st = try c.status(volumeID: volume, epoch: 3)
        XCTAssertEqual(st.highestGeneration, 1)
        XCTAssertEqual(st.flushedGeneration, 0)
        XCTAssertEqual(try c.flush(volumeID: volume, epoch: 3), 1)
        st = try c.status(volumeID: volume, epoch: 3)
        XCTAssertEqual(st.flushedGeneration, 1)

        try c.trim(volumeID: volume, offset: UInt64(5 * bs), length: UInt64(bs), generation: 2, epoch: 3)
        let after = try c.read(volumeID: volume, offset: UInt64(5 * bs), length: 3 * bs, epoch: 3)
        XCTAssertEqual(Array(after[0..<bs]), [UInt8](repeating: 0, count: bs))
        XCTAssertEqual(Array(after[bs...]), Array(data[bs...]))
        XCTAssertEqual(try c.status(volumeID: volume, epoch: 3).highestGeneration, 2)

        // A trim of the whole volume is split into store-sized pieces.
        try c.trim(volumeID: volume, offset: 0, length: size, generation: 3, epoch: 3)
        XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(5 * bs), length: 3 * bs, epoch: 3),
                       [UInt8](repeating: 0, count: 3 * bs))
    }

    func testErrorsMapToDistinctStatuses() throws {
        let c = try client()
        assertRemote(.notFound, containing: [volume, "create"]) { try c.status(volumeID: volume, epoch: 1) }
        try c.create(volumeID: volume, sizeBytes: size)
        assertRemote(.outOfRange, containing: ["beyond the end"]) {
            try c.read(volumeID: volume, offset: size, length: bs, epoch: 1)
        }
        assertRemote(.outOfRange) { try c.trim(volumeID: volume, offset: 0, length: size + UInt64(bs), generation: 1, epoch: 1) }
        // An id that could escape the data directory never reaches the disk.
        assertRemote(.badRequest, containing: ["volume id"]) { try c.create(volumeID: "..", sizeBytes: size) }
        assertRemote(.badRequest, containing: ["'/'"]) { try c.create(volumeID: "a/b", sizeBytes: size) }
        XCTAssertFalse(c.isBroken, "refused requests leave the connection usable")
    }

    func testSnapshotListCloneDeleteSnapshotAndGrowOverTheWire() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        _ = try c.claim(volumeID: volume, epoch: 4)
        let a = pattern(bs, seed: 1), b = pattern(bs, seed: 2)
        try a.withUnsafeBytes { try c.write(volumeID: volume, offset: 0, data: $0, generation: 1, epoch: 4) }
        let snap = try c.snapshot(volumeID: volume, snapshotID: "snap-1", epoch: 4)
        XCTAssertEqual(snap.size, size)
        XCTAssertEqual(snap.generation, 1)
        XCTAssertEqual(try c.snapshot(volumeID: volume, snapshotID: "snap-1", epoch: 4).generation, 1, "idempotent")
        try b.withUnsafeBytes { try c.write(volumeID: volume, offset: 0, data: $0, generation: 2, epoch: 4) }
        XCTAssertEqual(try c.listSnapshots(volumeID: volume, epoch: 4), [SnapshotEntry(id: "snap-1", size: size, generation: 1)])
        // Epochs: older ones are refused like every other op.
        XCTAssertThrowsError(try c.snapshot(volumeID: volume, snapshotID: "snap-2", epoch: 3)) { error in
            guard case .remote(.staleEpoch, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try c.snapshot(volumeID: volume, snapshotID: "bad/id", epoch: 4)) { error in
            guard case .remote(.badRequest, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
        }

        // A clone, on the same node, reads the snapshot's data; repeating it is fine.
        try c.clone(volumeID: "vol-clone", sourceVolumeID: volume, snapshotID: "snap-1", sizeBytes: 2 * size)
        try c.clone(volumeID: "vol-clone", sourceVolumeID: volume, snapshotID: "snap-1", sizeBytes: 2 * size)
        XCTAssertThrowsError(try c.clone(volumeID: "vol-clone", sourceVolumeID: volume, snapshotID: "snap-1", sizeBytes: size))
        XCTAssertThrowsError(try c.clone(volumeID: "vol-other", sourceVolumeID: volume, snapshotID: "nope", sizeBytes: size)) { error in
            guard case .remote(.notFound, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
        }
        XCTAssertEqual(try c.read(volumeID: "vol-clone", offset: 0, length: bs, epoch: 0), a)
        let cloneStatus = try c.status(volumeID: "vol-clone", epoch: 0)
        XCTAssertEqual(cloneStatus.size, 2 * size)
        XCTAssertGreaterThanOrEqual(cloneStatus.highestGeneration, 2)

        // Deleting the snapshot and then the source leaves the clone whole.
        try c.deleteSnapshot(volumeID: volume, snapshotID: "snap-1", epoch: 4)
        try c.deleteSnapshot(volumeID: volume, snapshotID: "snap-1", epoch: 4)
        XCTAssertEqual(try c.listSnapshots(volumeID: volume, epoch: 4), [])
        XCTAssertEqual(try c.read(volumeID: volume, offset: 0, length: bs, epoch: 4), b)
        try c.delete(volumeID: volume, epoch: 4)
        XCTAssertEqual(try c.read(volumeID: "vol-clone", offset: 0, length: bs, epoch: 0), a)

        try c.grow(volumeID: "vol-clone", sizeBytes: 4 * size, epoch: 0)
        XCTAssertEqual(try c.status(volumeID: "vol-clone", epoch: 0).size, 4 * size)
        XCTAssertThrowsError(try c.grow(volumeID: "vol-clone", sizeBytes: size, epoch: 0)) { error in
            guard case .remote(.badRequest, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
        }
    }

    func testSnapshotReadsAndGenerationsOverTheWire() throws {
        let c = try client()
        XCTAssertEqual(c.protocolVersion, FrameLimits.protocolVersion)
        try c.create(volumeID: volume, sizeBytes: size)
        _ = try c.claim(volumeID: volume, epoch: 4)
        let a = pattern(4 * bs, seed: 1), b = pattern(bs, seed: 2), later = pattern(2 * bs, seed: 3)
        try write(c, 0, a, generation: 1, epoch: 4)
        let s1 = try c.snapshot(volumeID: volume, snapshotID: "s1", epoch: 4)
        try write(c, UInt64(bs), b, generation: 2, epoch: 4)
        try c.trim(volumeID: volume, offset: 2 * UInt64(bs), length: UInt64(bs), generation: 3, epoch: 4)
        let s2 = try c.snapshot(volumeID: volume, snapshotID: "s2", epoch: 4)
        try write(c, 0, later, generation: 4, epoch: 4)
        // A newer engine claims the replica: backups still read (they send epoch 0, never fenced).
        _ = try c.claim(volumeID: volume, epoch: 9)

        XCTAssertEqual(try c.readSnapshot(volumeID: volume, snapshotID: "s1", offset: 0, length: 4 * bs), a)
        let s2Content = Array(a[0..<bs]) + b + [UInt8](repeating: 0, count: bs) + Array(a[(3 * bs)...])
        XCTAssertEqual(try c.readSnapshot(volumeID: volume, snapshotID: "s2", offset: 0, length: 4 * bs), s2Content)
        XCTAssertEqual(try c.read(volumeID: volume, offset: 0, length: 2 * bs, epoch: 9), later, "the volume moved on")
        XCTAssertEqual(try c.snapshotGenerations(volumeID: volume, snapshotID: "s1", firstBlock: 0, count: 5), [1, 1, 1, 1, 0])
        let generations = try c.snapshotGenerations(volumeID: volume, snapshotID: "s2", firstBlock: 0, count: 5)
        XCTAssertEqual(generations, [1, 2, 3 | BlockGenerations.trimmedBit, 1, 0])
        XCTAssertEqual(generations.indices.filter { BlockGenerations.generation(generations[$0]) > s1.generation }, [1, 2])
        XCTAssertTrue(generations.allSatisfy { BlockGenerations.generation($0) <= s2.generation })
        // The largest read one frame carries, over the wire.
        let whole = try c.readSnapshot(volumeID: volume, snapshotID: "s2", offset: 0, length: FrameLimits.maxDataLength)
        XCTAssertEqual(Array(whole.prefix(4 * bs)), s2Content)
        XCTAssertTrue(whole.dropFirst(4 * bs).allSatisfy { $0 == 0 })

        // Refusals travel as statuses: no snapshot, beyond its size, a bad count, no replica.
        func expect(_ status: ReplyStatus, containing text: String = "", _ body: () throws -> Any) {
            XCTAssertThrowsError(try body()) { error in
                guard case .remote(let got, let message) = error as? ReplicaClientError, got == status else {
                    return XCTFail("expected \(status), got \(error)")
                }
                XCTAssertTrue(text.isEmpty || message.contains(text), "\(message) lacks \(text)")
            }
        }
        expect(.notFound, containing: "no snapshot nope") { try c.readSnapshot(volumeID: self.volume, snapshotID: "nope", offset: 0, length: self.bs) }
        expect(.notFound, containing: "no snapshot nope") {
            try c.snapshotGenerations(volumeID: self.volume, snapshotID: "nope", firstBlock: 0, count: 1)
        }
        expect(.outOfRange, containing: "snapshot s1") { try c.readSnapshot(volumeID: self.volume, snapshotID: "s1", offset: self.size, length: self.bs) }
        expect(.outOfRange) { try c.snapshotGenerations(volumeID: self.volume, snapshotID: "s1", firstBlock: self.size / 4096, count: 1) }
        expect(.outOfRange) { try c.snapshotGenerations(volumeID: self.volume, snapshotID: "s1", firstBlock: .max, count: 2) }
        expect(.badRequest) { try c.snapshotGenerations(volumeID: self.volume, snapshotID: "s1", firstBlock: 0, count: 65_537) }
        expect(.notFound) { try c.readSnapshot(volumeID: "vol-none", snapshotID: "s1", offset: 0, length: self.bs) }

        // After S1 merges into S2, S2 reads the same and S1 is not found.
        try c.deleteSnapshot(volumeID: volume, snapshotID: "s1", epoch: 9)
        XCTAssertEqual(try c.readSnapshot(volumeID: volume, snapshotID: "s2", offset: 0, length: 4 * bs), s2Content)
        XCTAssertEqual(try c.snapshotGenerations(volumeID: volume, snapshotID: "s2", firstBlock: 0, count: 5), generations)
        expect(.notFound, containing: "no snapshot s1") { try c.readSnapshot(volumeID: self.volume, snapshotID: "s1", offset: 0, length: self.bs) }
        XCTAssertFalse(c.isBroken)
    }

    /// A durable write over the data protocol (version 5): the server syncs the write's journal
    /// record and says so; a long write it cannot make durable cheaply is answered as any write.
    /// A server of the previous release is never asked (it would refuse the flag).
    func testADurableWriteIsAnsweredDurableAndAnOlderServerIsNotAsked() throws {
        let server = try ReplicaServer(dataDir: root + "/new", host: "127.0.0.1", port: 0, logger: logs.logger)
        try server.start()
        defer { server.stop() }
        let client = try ReplicaClient.connect(host: "127.0.0.1", port: server.boundPort)
        defer { client.close() }
        XCTAssertEqual(client.protocolVersion, 5)
        try client.create(volumeID: "vol-d", sizeBytes: 8 << 20)
        _ = try client.claim(volumeID: "vol-d", epoch: 2)
        let small = [UInt8](repeating: 7, count: 2 * bs), long = [UInt8](repeating: 8, count: 300 << 10)
        XCTAssertTrue(try small.withUnsafeBytes { try client.write(volumeID: "vol-d", offset: 0, data: $0, generation: 1, epoch: 2, durable: true) })
        XCTAssertFalse(try small.withUnsafeBytes { try client.write(volumeID: "vol-d", offset: 0, data: $0, generation: 2, epoch: 2, durable: false) })
        XCTAssertFalse(try long.withUnsafeBytes { try client.write(volumeID: "vol-d", offset: 1 << 20, data: $0, generation: 3, epoch: 2, durable: true) })
        let wait = small.withUnsafeBytes { client.beginWrite(volumeID: "vol-d", offset: 16384, data: $0, generation: 4, epoch: 2, durable: true) }
        XCTAssertTrue(try small.withUnsafeBytes { _ in try wait() })
        XCTAssertEqual(try client.read(volumeID: "vol-d", offset: 16384, length: 2 * bs, epoch: 2), small)

        let old = try ReplicaServer(dataDir: root + "/old", host: "127.0.0.1", port: 0, logger: logs.logger,
                                    protocolVersions: 1...4)
        try old.start()
        defer { old.stop() }
        let oldClient = try ReplicaClient.connect(host: "127.0.0.1", port: old.boundPort)
        defer { oldClient.close() }
        XCTAssertEqual(oldClient.protocolVersion, 4)
        try oldClient.create(volumeID: "vol-o", sizeBytes: 8 << 20)
        XCTAssertFalse(try small.withUnsafeBytes { try oldClient.write(volumeID: "vol-o", offset: 0, data: $0, generation: 1, epoch: 0, durable: true) })
        XCTAssertFalse(oldClient.isBroken, "the older server was not sent a flag it refuses")
        XCTAssertEqual(try oldClient.read(volumeID: "vol-o", offset: 0, length: 2 * bs, epoch: 0), small)
    }

    /// A replica server of the previous release (protocol version 3) closes the connection on an
    /// op it does not know: the client refuses to send snapshot reads to it, and says why.
    func testSnapshotReadsToAnOlderServerSayToUpgradeItAndKeepTheConnection() throws {
        let old = try ReplicaServer(dataDir: root + "/old", host: "127.0.0.1", port: 0, logger: logs.logger,
                                    protocolVersions: 1...3)
        try old.start()
        defer { old.stop() }
        let client = try ReplicaClient.connect(host: "127.0.0.1", port: old.boundPort)
        defer { client.close() }
        XCTAssertEqual(client.protocolVersion, 3)
        try client.create(volumeID: "vol-old", sizeBytes: 1 << 20)
        _ = try client.snapshot(volumeID: "vol-old", snapshotID: "s", epoch: 0)
        for call in [{ _ = try client.readSnapshot(volumeID: "vol-old", snapshotID: "s", offset: 0, length: 4096) },
                     { _ = try client.snapshotGenerations(volumeID: "vol-old", snapshotID: "s", firstBlock: 0, count: 1) }] {
            XCTAssertThrowsError(try call()) { error in
                let text = "\(error)"
                XCTAssertTrue(text.contains("older Cairn without snapshot reads"), text)
                XCTAssertTrue(text.contains("upgrade"), text)
                XCTAssertTrue(text.contains("\(client.address)"), text)
            }
        }
        XCTAssertFalse(client.isBroken, "nothing was sent: the connection still serves other ops")
        XCTAssertEqual(try client.listSnapshots(volumeID: "vol-old", epoch: 0).map(\.id), ["s"])
    }

    private final class FakeHooks: ReplicaEngineHooks, @unchecked Sendable {
        let lock = NSLock()
        var calls: [String] = []

        private func check(_ volume: String, _ epoch: UInt64) throws -> Bool {
            guard volume == "attached" else { return false }
            guard epoch >= 5 else { throw ReplicaError.staleEpoch(seen: 5, got: epoch) }
            return true
        }

        func snapshot(volume: String, snapshotID: String, epoch: UInt64) throws -> [String]? {
            guard try check(volume, epoch) else { return nil }
            lock.withLock { calls.append("snapshot \(snapshotID)") }
            return ["n1", "n3"]
        }

        func holdWrites(volume: String, timeout: Duration, epoch: UInt64) throws -> Bool {
            guard try check(volume, epoch) else { return false }
            lock.withLock { calls.append("hold \(timeout)") }
            return true
        }

        func releaseWrites(volume: String, epoch: UInt64) throws -> Bool {
            guard try check(volume, epoch) else { return false }
            lock.withLock { calls.append("release") }
            return true
        }
    }

    func testABarrierSnapshotGoesToTheEngineHooksOrIsRefusedWithoutAnEngine() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        XCTAssertThrowsError(try c.barrierSnapshot(volumeID: volume, snapshotID: "s", epoch: 1)) { error in
            guard case .remote(.notFound, let message) = error as? ReplicaClientError else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("no engine runs volume"), message)
        }
        let hooks = FakeHooks()
        server!.engineHooks = hooks
        try c.holdWrites(volumeID: "attached", timeout: .milliseconds(2500), epoch: 5)
        XCTAssertEqual(try c.barrierSnapshot(volumeID: "attached", snapshotID: "s", epoch: 5), ["n1", "n3"])
        try c.releaseWrites(volumeID: "attached", epoch: 5)
        XCTAssertEqual(hooks.lock.withLock { hooks.calls }, ["hold 2.5 seconds", "snapshot s", "release"])
        for call in [{ try c.holdWrites(volumeID: self.volume, timeout: .seconds(1), epoch: 5) },
                     { try c.releaseWrites(volumeID: self.volume, epoch: 5) }] {
            XCTAssertThrowsError(try call()) { error in
                guard case .remote(.notFound, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
            }
        }
        XCTAssertThrowsError(try c.barrierSnapshot(volumeID: "attached", snapshotID: "s", epoch: 4)) { error in
            guard case .remote(.staleEpoch, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try c.barrierSnapshot(volumeID: volume, snapshotID: "s", epoch: 5)) { error in
            guard case .remote(.notFound, _) = error as? ReplicaClientError else { return XCTFail("\(error)") }
        }
        // The replica itself took no snapshot.
        XCTAssertEqual(try c.listSnapshots(volumeID: volume, epoch: 5), [])
    }

    func testCreateIsIdempotentAndRefusesAnotherSize() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        _ = try c.claim(volumeID: volume, epoch: 1)
        try write(c, 0, pattern(bs, seed: 2), generation: 1, epoch: 1)
        try c.create(volumeID: volume, sizeBytes: size)
        // The repeated create kept the data.
        XCTAssertEqual(try c.read(volumeID: volume, offset: 0, length: bs, epoch: 1), pattern(bs, seed: 2))
        assertRemote(.badRequest, containing: ["exists with size \(size)"]) {
            try c.create(volumeID: volume, sizeBytes: size * 2)
        }
        // Also after a restart (the replica is opened from disk, not found in memory).
        clients.forEach { $0.close() }
        clients = []
        server!.stop()
        try startServer()
        let c2 = try client()
        try c2.create(volumeID: volume, sizeBytes: size)
        assertRemote(.badRequest, containing: ["exists with size"]) { try c2.create(volumeID: volume, sizeBytes: 4096) }
    }

    func testDeleteIsIdempotentAndRemovesTheReplica() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        _ = try c.claim(volumeID: volume, epoch: 4)
        try write(c, 0, pattern(bs, seed: 3), generation: 1, epoch: 4)
        // A fenced sender cannot delete either.
        assertRemote(.staleEpoch) { try c.delete(volumeID: volume, epoch: 3) }
        try c.delete(volumeID: volume, epoch: 4)
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/replicas/" + volume))
        try c.delete(volumeID: volume, epoch: 4)
        try c.delete(volumeID: "vol-never-existed")
        assertRemote(.notFound) { try c.read(volumeID: volume, offset: 0, length: bs, epoch: 4) }
        // Re-created, it starts empty at epoch 0.
        try c.create(volumeID: volume, sizeBytes: size)
        let st = try c.status(volumeID: volume, epoch: 0)
        XCTAssertEqual(st.epoch, 0)
        XCTAssertEqual(try c.read(volumeID: volume, offset: 0, length: bs, epoch: 0), [UInt8](repeating: 0, count: bs))
    }

    func testPipelinedWritesFromManyThreadsThroughOneClient() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        _ = try c.claim(volumeID: volume, epoch: 1)
        let threads = 16, perThread = 40
        let volume = volume, bs = bs
        let failures = Mutex<[String]>([])
        let generation = Atomic<UInt64>(0)
        onThreads(threads) { t in
            for i in 0..<perThread {
                let block = t * perThread + i
                let data = Self.pattern(2 * bs, seed: block)
                let gen = generation.add(1, ordering: .relaxed).newValue
                do {
                    try data.withUnsafeBytes {
                        try c.write(volumeID: volume, offset: UInt64(block * 2 * bs), data: $0, generation: gen, epoch: 1)
                    }
                } catch {
                    failures.withLock { $0.append("block \(block): \(error)") }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        try c.flush(volumeID: volume, epoch: 1)
        // Read back concurrently too (responses come back out of order).
        onThreads(threads) { t in
            for i in 0..<perThread {
                let block = t * perThread + i
                do {
                    let got = try c.read(volumeID: volume, offset: UInt64(block * 2 * bs), length: 2 * bs, epoch: 1)
                    if got != Self.pattern(2 * bs, seed: block) { failures.withLock { $0.append("block \(block) differs") } }
                } catch {
                    failures.withLock { $0.append("read \(block): \(error)") }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertEqual(try c.status(volumeID: volume, epoch: 1).flushedGeneration, UInt64(threads * perThread))
    }

    // MARK: fencing

    func testStaleEpochIsRefusedDistinctlyAndStaysRefusedAfterARestart() throws {
        let old = try client()
        try old.create(volumeID: volume, sizeBytes: size)
        _ = try old.claim(volumeID: volume, epoch: 4)
        try write(old, 0, pattern(bs, seed: 4), generation: 1, epoch: 4)

        let new = try client()
        XCTAssertEqual(try new.claim(volumeID: volume, epoch: 5).epoch, 5)
        assertRemote(.staleEpoch, containing: ["4", "5"]) { try write(old, 0, pattern(bs, seed: 9), generation: 2, epoch: 4) }
        assertRemote(.staleEpoch) { try old.read(volumeID: volume, offset: 0, length: bs, epoch: 4) }
        assertRemote(.staleEpoch) { try old.flush(volumeID: volume, epoch: 4) }
        assertRemote(.staleEpoch) { try old.trim(volumeID: volume, offset: 0, length: UInt64(bs), generation: 2, epoch: 4) }
        assertRemote(.staleEpoch) { try old.status(volumeID: volume, epoch: 4) }
        assertRemote(.staleEpoch) { try old.claim(volumeID: volume, epoch: 4) }
        XCTAssertFalse(old.isBroken, "being fenced is an answer, not a connection failure")

        clients.forEach { $0.close() }
        clients = []
        server!.stop()
        try startServer()
        let again = try client()
        assertRemote(.staleEpoch, containing: ["stale epoch 4", "seen epoch 5"]) {
            try write(again, 0, pattern(bs, seed: 9), generation: 2, epoch: 4)
        }
        // The fenced write changed nothing.
        XCTAssertEqual(try again.read(volumeID: volume, offset: 0, length: bs, epoch: 5), pattern(bs, seed: 4))
        XCTAssertEqual(try again.status(volumeID: volume, epoch: 5).highestGeneration, 1)
    }

    // MARK: bad input

    func testMalformedFramesCloseOnlyThatConnectionAndWriteNothing() throws {
        let good = try client()
        try good.create(volumeID: volume, sizeBytes: size)
        _ = try good.claim(volumeID: volume, epoch: 1)

        let block = pattern(bs, seed: 5)
        let validWrite = Frame(requestID: 9, epoch: 1, body: .request(DataOp.Write.request(WriteRequest(volume: volume, generation: 7, offset: 0, data: block)))).encode()
        var badChecksum = validWrite
        badChecksum[9] ^= 0x40  // request id bit: the header crc no longer matches
        var oversized = FrameHeader(opcode: .write, flags: 0, requestID: 3, payloadLength: UInt32(FrameLimits.maxPayloadLength + 1), epoch: 1).encode()
        oversized += [UInt8](repeating: 0, count: 4096)
        var unknownOp = validWrite
        unknownOp[6] = 0xEE
        unknownOp.replaceSubrange(28..<32, with: withUnsafeBytes(of: CRC32C.checksum(Array(unknownOp[0..<28])).littleEndian) { Array($0) })
        let misaligned = Frame(requestID: 4, epoch: 1, body: .request(DataOp.Write.request(WriteRequest(volume: volume, generation: 7, offset: 100, data: block)))).encode()

        let cases: [(String, [UInt8], Bool, String)] = [
            ("garbage", Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8), false, "bad frame magic"),
            ("bad checksum", badChecksum, true, "checksum mismatch"),
            ("oversized", oversized, true, "exceeds the limit"),
            ("unknown op", unknownOp, true, "unknown op 238"),
            ("misaligned write", misaligned, true, "not a multiple of 4096"),
            ("request before hello", validWrite, false, "the first frame must be hello, got write"),
            ("second hello", Frame(requestID: 2, epoch: 0, body: .request(DataOp.Hello.request(HelloRequest()))).encode(), true, "a second hello"),
            ("a response", Frame(requestID: 2, epoch: 0, body: .response(DataOp.Write.response(WriteResponse(status: .ok)))).encode(), true, "only takes requests"),
        ]
        for (name, bytes, hello, reason) in cases {
            let (closed, received) = try sendRaw(bytes, hello: hello)
            XCTAssertTrue(closed, "\(name): the server kept the connection open")
            // The only thing ever sent back is the hello's reply.
            var d = FrameDecoder()
            let replies = try d.feed(received)
            XCTAssertEqual(replies.map(\.opcode), hello ? [.hello] : [], name)
            XCTAssertTrue(logs.contains(.warning, reason), "\(name): no warning containing \"\(reason)\"")
        }
        let peerLogged = logs.records.withLock { $0.contains { $0.level == .warning && $0.metadata["replica.peer"]?.hasPrefix("127.0.0.1:") == true } }
        XCTAssertTrue(peerLogged, "warnings name the peer")

        // Nothing was written, and the good connection (and the server) carry on.
        XCTAssertFalse(good.isBroken)
        let st = try good.status(volumeID: volume, epoch: 1)
        XCTAssertEqual(st.highestGeneration, 0)
        XCTAssertEqual(try good.read(volumeID: volume, offset: 0, length: bs, epoch: 1), [UInt8](repeating: 0, count: bs))
        let fresh = try client()
        XCTAssertEqual(try fresh.status(volumeID: volume, epoch: 1).epoch, 1)
    }

    func testEveryDeclaredOpHasAServerHandler() {
        for op in DataOp.all {
            XCTAssertNotNil(ReplicaServer.handlers[op.opcode], "no handler for \(op.name)")
        }
        XCTAssertEqual(ReplicaServer.handlers.count, DataOp.all.count)
    }

    func testAnUnsupportedProtocolVersionIsRefusedWithAReason() throws {
        let hello = Frame(requestID: 1, epoch: 0, body: .request(DataOp.Hello.request(HelloRequest(protocolVersion: FrameLimits.protocolVersion + 1)))).encode()
        let (closed, received) = try sendRaw(hello)
        XCTAssertTrue(closed)
        var d = FrameDecoder()
        let replies = try d.feed(received)
        guard let r = replies.first?.response(DataOp.Hello.self) else { return XCTFail("no hello reply: \(replies)") }
        XCTAssertEqual(r.status, .badRequest)
        XCTAssertTrue(r.message.contains("protocol version \(FrameLimits.protocolVersion + 1) is not supported"), r.message)
    }

    // MARK: connection loss

    /// A fake replica that answers hello, then holds every request unanswered; `cut` makes it
    /// close the connection.
    private final class SilentReplica: Sendable {
        let fd: Int32
        let port: UInt16
        let received = Atomic<Int>(0)
        let connection = Mutex<Int32>(-1)
        let done = DispatchSemaphore(value: 0)

        init() throws {
            (fd, port) = try Socket.listen(host: "127.0.0.1", port: 0)
            try startThread { [self] in serve() }
        }

        private func serve() {
            defer { done.signal() }
            let c = accept(fd, nil, nil)
            guard c >= 0 else { return }
            connection.withLock { $0 = c }
            var decoder = FrameDecoder()
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = recv(c, &buffer, buffer.count, 0)
                guard n > 0, let frames = try? decoder.feed(buffer[0..<n]) else { return }
                for f in frames {
                    if f.opcode == .hello {
                        let reply = Frame(requestID: f.requestID, epoch: 0, body: .response(DataOp.Hello.response(HelloResponse(status: .ok)))).encode()
                        _ = reply.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    } else {
                        received.add(1, ordering: .relaxed)
                    }
                }
            }
        }

        func cut() { connection.withLock { _ = shutdown($0, Int32(SHUT_RDWR)) } }

        func stop() {
            _ = shutdown(fd, Int32(SHUT_RDWR))
            cut()
            done.wait()
            connection.withLock { if $0 >= 0 { Glibc.close($0) } }
            Glibc.close(fd)
        }
    }

    /// Many writes in one receive are run as a group (one worker, their device writes
    /// submitted together): sent in one TCP write, each is answered under its own request id —
    /// the one beyond the end refused, a resync copy among them applied as a resync copy — and
    /// every block reads back as written.
    func testWritesArrivingTogetherAreAnsweredEachAndAppliedEach() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        _ = try c.claim(volumeID: volume, epoch: 3)
        let fd = try Socket.connect(host: "127.0.0.1", port: port, timeout: .seconds(3))
        defer { Glibc.close(fd) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var bytes = Frame(requestID: 1, epoch: 0, body: .request(DataOp.Hello.request(HelloRequest()))).encode()
        let count = 40
        for i in 0..<count {
            let offset = i == 7 ? size : UInt64(i * 3) * UInt64(bs)
            var request = WriteRequest(volume: volume, generation: UInt64(100 + i), offset: offset, data: pattern(bs, seed: i))
            if i == 11 { request.ifNewer = true }
            bytes += Frame(requestID: UInt64(10 + i), epoch: 3, body: .request(DataOp.Write.request(request))).encode()
        }
        try bytes.withUnsafeBytes { try Socket.sendAll(fd, $0) }
        var decoder = FrameDecoder()
        var answers: [UInt64: WriteResponse] = [:]
        var buffer = [UInt8](repeating: 0, count: 65536)
        while answers.count < count {
            let n = recv(fd, &buffer, buffer.count, 0)
            guard n > 0 else { return XCTFail("the server stopped answering after \(answers.count) replies") }
            for frame in try buffer.withUnsafeBytes({ try decoder.feed(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }) {
                if let r = frame.response(DataOp.Write.self) { answers[frame.requestID] = r }
            }
        }
        for i in 0..<count {
            let status = answers[UInt64(10 + i)]?.status
            XCTAssertEqual(status, i == 7 ? .outOfRange : .ok, "write \(i)")
        }
        XCTAssertEqual(answers[21]?.appliedBlocks, 1, "the resync copy among them was applied as one")
        for i in 0..<count where i != 7 {
            XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(i * 3) * UInt64(bs), length: bs, epoch: 3), pattern(bs, seed: i))
        }
        XCTAssertEqual(try c.generations(volumeID: volume, firstBlock: 0, count: 1, epoch: 3), [100])
        let (grouped, groups) = (server!.grouped.load(ordering: .relaxed), server!.groups.load(ordering: .relaxed))
        XCTAssertGreaterThan(grouped, 0, "writes that arrived together ran as a group")
        XCTAssertLessThan(groups, grouped, "a group holds several writes")
    }

    /// No reader thread: waiting callers take turns reading the socket and hand replies to
    /// each other. Many threads on one client, each with writes begun to two replicas at once
    /// (as the engine sends them), reads and flushes in between: every call gets its own answer,
    /// nothing hangs or crashes, and every block reads back as written.
    func testManyThreadsShareOneClientAndEveryReplyReachesItsCaller() throws {
        let second = try ReplicaServer(dataDir: root + "/second", host: "127.0.0.1", port: 0, logger: logs.logger)
        try second.start()
        defer { second.stop() }
        let a = try client(), b = try ReplicaClient(host: "127.0.0.1", port: second.boundPort)
        defer { b.close() }
        for c in [a, b] {
            try c.create(volumeID: volume, sizeBytes: size)
            _ = try c.claim(volumeID: volume, epoch: 1)
        }
        let (threads, rounds, bs, volume) = (24, 150, bs, volume)
        let failures = Mutex<[String]>([])
        let generation = Atomic<UInt64>(0)
        onThreads(threads) { t in
            for r in 0..<rounds {
                let block = UInt64(t * rounds + r)
                let data = Self.pattern(bs, seed: t &* 1000 &+ r)
                do {
                    let g = generation.wrappingAdd(1, ordering: .relaxed).newValue
                    // The data is borrowed by the frames until their replies: awaited inside.
                    try data.withUnsafeBytes { bytes in
                        let waits = [a, b].map { $0.beginWrite(volumeID: volume, offset: block * UInt64(bs), data: bytes, generation: g, epoch: 1) }
                        for w in waits { try w() }
                    }
                    if r % 10 == 0 {
                        let flushes = [a.beginFlush(volumeID: volume, epoch: 1), b.beginFlush(volumeID: volume, epoch: 1)]
                        for f in flushes { try f() }
                    }
                    for c in [a, b] where r % 3 == 0 {
                        let back = try c.read(volumeID: volume, offset: block * UInt64(bs), length: bs, epoch: 1)
                        if back != data { failures.withLock { $0.append("thread \(t) block \(block): read back other data") } }
                    }
                } catch {
                    failures.withLock { $0.append("thread \(t) round \(r): \(error)") }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        XCTAssertFalse(a.isBroken)
        XCTAssertFalse(b.isBroken)
        for t in [0, threads - 1] {
            let block = UInt64(t * rounds + rounds - 1)
            XCTAssertEqual(try b.read(volumeID: volume, offset: block * UInt64(bs), length: bs, epoch: 1),
                           Self.pattern(bs, seed: t &* 1000 &+ rounds - 1))
        }
    }

    private func callConcurrently(_ c: ReplicaClient, _ n: Int) -> (errors: [ReplicaClientError], seconds: Double) {
        let errors = Mutex<[ReplicaClientError]>([])
        let volume = volume
        let start = ContinuousClock.now
        onThreads(n) { _ in
            do {
                _ = try c.status(volumeID: volume, epoch: 1)
            } catch let e as ReplicaClientError {
                errors.withLock { $0.append(e) }
            } catch {
                XCTFail("unexpected \(error)")
            }
        }
        let elapsed = start.duration(to: .now)
        return (errors.withLock { $0 }, Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
    }

    func testALostConnectionFailsEveryWaiterPromptly() throws {
        let fake = try SilentReplica()
        defer { fake.stop() }
        let c = try ReplicaClient(host: "127.0.0.1", port: fake.port, requestTimeout: .seconds(30))
        defer { c.close() }
        DispatchQueue.global().async {
            while fake.received.load(ordering: .relaxed) < 4 { usleep(1000) }
            fake.cut()
        }
        let (errors, seconds) = callConcurrently(c, 4)
        XCTAssertEqual(errors.count, 4)
        for e in errors {
            guard case .connection = e else { return XCTFail("expected .connection, got \(e)") }
        }
        XCTAssertLessThan(seconds, 10, "waiters must fail when the connection goes, not at their timeout")
        XCTAssertTrue(c.isBroken)
        XCTAssertThrowsError(try c.status(volumeID: volume, epoch: 1)) { e in
            guard case ReplicaClientError.connection = e else { return XCTFail("\(e)") }
        }
    }

    func testATimeoutBreaksTheConnectionAndFailsTheOtherWaiters() throws {
        let fake = try SilentReplica()
        defer { fake.stop() }
        let c = try ReplicaClient(host: "127.0.0.1", port: fake.port, requestTimeout: .milliseconds(500))
        defer { c.close() }
        let (errors, seconds) = callConcurrently(c, 4)
        XCTAssertEqual(errors.count, 4)
        XCTAssertTrue(errors.contains { if case .timeout = $0 { true } else { false } }, "\(errors)")
        XCTAssertLessThan(seconds, 5)
        XCTAssertTrue(c.isBroken)
    }

    func testStoppingTheServerFailsTheClientAndConnectingToNothingFails() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: size)
        server!.stop()
        XCTAssertThrowsError(try c.status(volumeID: volume, epoch: 0)) { e in
            guard case ReplicaClientError.connection = e else { return XCTFail("\(e)") }
        }
        XCTAssertTrue(c.isBroken)
        XCTAssertThrowsError(try ReplicaClient(host: "127.0.0.1", port: port)) { e in
            guard case ReplicaClientError.connection(let m) = e else { return XCTFail("\(e)") }
            XCTAssertTrue(m.contains("127.0.0.1"), m)
        }
        // The replica was closed cleanly: it opens again without recovery.
        let store = try ReplicaStore.open(directory: root + "/replicas/" + volume, volumeID: volume)
        XCTAssertEqual(store.recovery, RecoveryReport())
        try store.close()
    }

    func testAsyncWrapperRunsTheBlockingCall() async throws {
        let c = try ReplicaClient(host: "127.0.0.1", port: port)
        defer { c.close() }
        try await c.perform { [volume, size] in try $0.create(volumeID: volume, sizeBytes: size) }
        let st = try await c.perform { [volume] in try $0.status(volumeID: volume, epoch: 0) }
        XCTAssertEqual(st.size, size)
    }

    func testReplicaAddressParsing() throws {
        XCTAssertEqual(try ReplicaAddress("10.0.0.5:7420"), ReplicaAddress(host: "10.0.0.5", port: 7420))
        XCTAssertEqual(try ReplicaAddress("node-a.example:1"), ReplicaAddress(host: "node-a.example", port: 1))
        XCTAssertEqual(try ReplicaAddress("[::1]:7420"), ReplicaAddress(host: "::1", port: 7420))
        XCTAssertEqual(try ReplicaAddress("[::1]:7420").description, "[::1]:7420")
        XCTAssertEqual(try ReplicaAddress("10.0.0.5:7420").description, "10.0.0.5:7420")
        for bad in ["", "host", "host:", ":7420", "host:0", "host:65536", "::1:7420", "[::1]7420", "host:x"] {
            XCTAssertThrowsError(try ReplicaAddress(bad), bad)
        }
    }

    // MARK: throughput (prints, asserts nothing about speed)

    func testThroughputPrint() throws {
        let c = try client()
        try c.create(volumeID: volume, sizeBytes: 1 << 30)
        _ = try c.claim(volumeID: volume, epoch: 1)
        let generation = Atomic<UInt64>(0)
        let volume = volume
        for (length, window) in [(4096, 16384), (1 << 20, 256)] {
            let data = pattern(length, seed: 7)
            let count = Atomic<Int>(0)
            let start = ContinuousClock.now
            let deadline = start + .seconds(2)
            onThreads(16) { t in
                var i = 0
                while ContinuousClock.now < deadline {
                    let slot = (t * 1_000_003 + i) % window
                    i += 1
                    let gen = generation.add(1, ordering: .relaxed).newValue
                    do {
                        try data.withUnsafeBytes {
                            try c.write(volumeID: volume, offset: UInt64(slot * length), data: $0, generation: gen, epoch: 1)
                        }
                        count.add(1, ordering: .relaxed)
                    } catch {
                        XCTFail("\(error)")
                        return
                    }
                }
            }
            let d = start.duration(to: .now)
            let seconds = Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
            let n = Double(count.load(ordering: .relaxed))
            print(String(format: "replica throughput: %d-byte writes, 16 threads, one client: %.0f writes/s, %.1f MiB/s",
                         length, n / seconds, n * Double(length) / seconds / 1_048_576))
        }
        let probe = Glibc.open(root + "/direct-probe", O_RDWR | O_CREAT | FileIO.O_DIRECT, 0o600)
        print("replica throughput: data file O_DIRECT = \(probe >= 0)")
        if probe >= 0 { Glibc.close(probe) }
    }
}

extension XCTestCase {
    /// Asserts that `body` fails with the replica's `status` and a message containing `texts`.
    func assertRemote<T>(_ status: ReplyStatus, containing texts: [String] = [], _ body: () throws -> T,
                         file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("expected \(status), got success", file: file, line: line)
        } catch let error as ReplicaClientError where error.replyStatus != nil {
            let message = "\(error)"
            XCTAssertEqual(error.replyStatus, status, message, file: file, line: line)
            for text in texts {
                XCTAssertTrue(message.contains(text), "\"\(message)\" lacks \"\(text)\"", file: file, line: line)
            }
        } catch {
            XCTFail("expected remote \(status), got \(error)", file: file, line: line)
        }
    }
}

/// Runs `body(i)` for i in 0..<n on n threads of their own, all at once (concurrentPerform
/// would use only as many threads as there are cores), and waits for them.
func onThreads(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let group = DispatchGroup()
    for i in 0..<n {
        group.enter()
        Thread.detachNewThread {
            body(i)
            group.leave()
        }
    }
    group.wait()
}
