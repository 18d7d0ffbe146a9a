import CairnCore
@testable import CairnReplica
import CairnSecurity
import Foundation
import Logging
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The data protocol with `--data-security auth|secure` over real TCP: who may connect, what a
/// refusal looks like, and that tampered or replayed records change nothing.
final class DataSecurityTests: XCTestCase {
    private var root = ""
    private var logs = CapturedLogs()
    private var stops: [() -> Void] = []
    private let volume = "vol-sec1"
    private let bs = FrameLimits.blockSize

    override func setUpWithError() throws {
        root = "/tmp/cairn-data-security-test-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        logs = CapturedLogs()
        try CertificateAuthority.create(directory: root + "/ca", trustDomain: "cairn", days: 2)
        try CertificateAuthority.create(directory: root + "/other-ca", trustDomain: "cairn", days: 2)
        for (name, kinds) in [("n1", [SpiffeID.Kind.node]), ("n2", [.node]), ("ctl", [.controller])] {
            try CertificateAuthority.issue(caDirectory: root + "/ca", trustDomain: "cairn", name: name, kinds: kinds,
                                           ips: [], dns: [], days: 1, out: root + "/" + name)
        }
        try CertificateAuthority.issue(caDirectory: root + "/ca", trustDomain: "cairn", name: "etcd", kinds: [],
                                       ips: ["127.0.0.1"], dns: [], days: 1, out: root + "/etcd")
        try CertificateAuthority.issue(caDirectory: root + "/other-ca", trustDomain: "cairn", name: "n2", kinds: [.node],
                                       ips: [], dns: [], days: 1, out: root + "/foreign-n2")
    }

    override func tearDownWithError() throws {
        for stop in stops.reversed() { stop() }
        stops = []
        if !root.isEmpty { try? FileManager.default.removeItem(atPath: root) }
    }

    private func security(_ name: String, _ mode: DataSecurity) throws -> DataPlaneSecurity {
        DataPlaneSecurity(mode: mode, identity: try TLSIdentity(files: TLSFiles(directory: root + "/" + name), logger: logs.logger,
                                                                trustDomain: name == "etcd" ? "cairn" : nil))
    }

    /// Node n1's replica server in `mode`.
    private func startServer(_ mode: DataSecurity) throws -> ReplicaServer {
        let server = try ReplicaServer(dataDir: root + "/data-n1", host: "127.0.0.1", port: 0, logger: logs.logger,
                                       security: try security("n1", mode))
        try server.start()
        stops.append { server.stop() }
        return server
    }

    private func connect(_ server: ReplicaServer, as name: String?, _ mode: DataSecurity, expecting node: String? = "n1",
                         port: UInt16? = nil) throws -> ReplicaClient {
        let c = try ReplicaClient.connect(host: "127.0.0.1", port: port ?? server.boundPort, connectTimeout: .seconds(3),
                                          security: name.map { try security($0, mode) } ?? .insecure, expectedNode: node)
        stops.append { c.close() }
        return c
    }

    /// The controller's grant of `epoch` of the test volume to node n2.
    private func grant(_ epoch: UInt64) throws -> ClaimGrant {
        try TLSIdentity(files: TLSFiles(directory: root + "/ctl"), logger: logs.logger)
            .grant(volumeID: volume, nodeID: "n2", epoch: FencingEpoch(epoch))
    }

    private func pattern(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) } }

    private func roundTrip(_ mode: DataSecurity) throws {
        let server = try startServer(mode)
        let c = try connect(server, as: "n2", mode)
        try c.create(volumeID: volume, sizeBytes: 64 << 20)
        XCTAssertEqual(try c.claim(volumeID: volume, epoch: 2, grant: try grant(2)).epoch, 2)
        // Small, and larger than one record (1 MiB): split into several records both ways.
        for (offset, length, seed) in [(0, bs, UInt8(1)), (8 * bs, 3 << 20, 2)] {
            let data = pattern(length, seed: seed)
            try data.withUnsafeBytes { try c.write(volumeID: volume, offset: UInt64(offset), data: $0, generation: UInt64(seed), epoch: 2) }
            XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(offset), length: length, epoch: 2), data)
        }
        XCTAssertEqual(try c.flush(volumeID: volume, epoch: 2), 2)
        XCTAssertTrue(logs.records.withLock { $0.contains {
            $0.message == "replica connection authenticated" && $0.metadata["replica.peer_identity"] == "spiffe://cairn/node/n2"
                && $0.metadata["replica.peer"]?.hasPrefix("127.0.0.1:") == true
        } }, "the accepted connection is logged with the peer's identity and address")
    }

    func testAuthModeRoundTrip() throws { try roundTrip(.auth) }
    func testSecureModeRoundTrip() throws { try roundTrip(.secure) }

    /// The server answers nothing to a peer that cannot authenticate, and says so in its log
    /// with the peer's address.
    private func assertRefused(_ server: ReplicaServer, as name: String?, _ mode: DataSecurity, expecting node: String? = "n1",
                               clientSays: String, serverSays: String?, file: StaticString = #filePath, line: UInt = #line) {
        do {
            let c = try connect(server, as: name, mode, expecting: node)
            try c.create(volumeID: "vol-intruder", sizeBytes: 1 << 20)
            XCTFail("a peer as \(name ?? "nobody") was served", file: file, line: line)
        } catch {
            XCTAssertTrue("\(error)".contains(clientSays), "client saw: \(error)", file: file, line: line)
        }
        if let serverSays {
            let deadline = Date().addingTimeInterval(3)
            var seen = false
            while !seen && Date() < deadline {
                seen = logs.records.withLock { $0.contains {
                    $0.level == .warning && $0.message.hasPrefix("refused a replica connection")
                        && "\($0.message) \($0.metadata)".contains(serverSays) && $0.metadata["replica.peer"]?.hasPrefix("127.0.0.1:") == true
                } }
                if !seen { usleep(20_000) }
            }
            XCTAssertTrue(seen, "the server logs the refusal with the peer's address: \(serverSays)", file: file, line: line)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/data-n1/replicas/vol-intruder"), file: file, line: line)
    }

    func testPeersWithoutAValidCertificateAreRefused() throws {
        let server = try startServer(.auth)
        // No certificate at all: a plain data-protocol client.
        assertRefused(server, as: nil, .none, clientSays: "connection failed", serverSays: "did not authenticate")
        // A certificate from another cluster's CA, with the right name.
        assertRefused(server, as: "foreign-n2", .auth, clientSays: "certificate", serverSays: "did not authenticate")
        // A certificate of this CA that names no node or controller.
        assertRefused(server, as: "etcd", .auth, clientSays: "connection failed", serverSays: "names no node or controller")
        // The other mode: both ends say which.
        assertRefused(server, as: "n2", .secure, clientSays: "--data-security auth", serverSays: "--data-security secure")
        // A controller may connect (it creates and deletes replicas).
        XCTAssertNoThrow(try connect(server, as: "ctl", .auth).create(volumeID: "vol-ctl", sizeBytes: 1 << 20))
    }

    func testAClientRefusesAServerThatIsNotTheNodeItMeant() throws {
        let server = try startServer(.auth)
        assertRefused(server, as: "n2", .auth, expecting: "n3", clientSays: "is node n1, not node n3", serverSays: nil)
    }

    /// Records changed or replayed on the wire fail their tag: the connection is closed and the
    /// replica keeps what it had.
    /// A fresh server in `mode` (the last one stopped, its data gone), reached by n2 through a
    /// relay, with the test volume created and claimed at epoch 1.
    private func serverBehindRelay(_ mode: DataSecurity) throws -> (ReplicaServer, Relay, ReplicaClient) {
        for stop in stops.reversed() { stop() }
        stops = []
        try? FileManager.default.removeItem(atPath: root + "/data-n1")
        let server = try startServer(mode)
        let relay = try Relay(to: server.boundPort)
        stops.append { relay.stop() }
        let c = try connect(server, as: "n2", mode, port: relay.port)
        try c.create(volumeID: volume, sizeBytes: 1 << 20)
        _ = try c.claim(volumeID: volume, epoch: 1, grant: try grant(1))
        return (server, relay, c)
    }

    func testTamperedOrReplayedRecordsChangeNothing() throws {
        for mode in [DataSecurity.auth, .secure] {
            for attack in [Relay.Attack.flipBit, .replay] {
                do {
                    let (server, relay, c) = try serverBehindRelay(mode)
                    let before = pattern(bs, seed: 9)
                    try before.withUnsafeBytes { try c.write(volumeID: volume, offset: 0, data: $0, generation: 1, epoch: 1) }
                    relay.arm(attack)
                    let after = pattern(bs, seed: 10)
                    XCTAssertThrowsError(try after.withUnsafeBytes {
                        try c.write(volumeID: volume, offset: 0, data: $0, generation: 2, epoch: 1)
                        // A replayed write is answered once; the duplicate record closes the connection.
                        _ = try c.status(volumeID: volume, epoch: 1)
                    })
                    let fresh = try connect(server, as: "n2", mode)
                    let now = try fresh.read(volumeID: volume, offset: 0, length: bs, epoch: 1)
                    switch attack {
                    case .flipBit: XCTAssertEqual(now, before, "a tampered write must not reach the replica")
                    case .replay: XCTAssertEqual(now, after, "the original write is applied once")
                    }
                    XCTAssertEqual(try fresh.status(volumeID: volume, epoch: 1).highestGeneration, attack == .flipBit ? 1 : 2)
                    XCTAssertTrue(logs.contains(.warning, "closing replica connection"))
                }
            }
        }
    }

    /// Requests that arrive together on an authenticated or encrypted connection, each in a
    /// record of its own, are taken together, as a plaintext reader takes what one receive
    /// brings: a queue of small writes runs as a group (one worker, one submission). Taken one
    /// record at a time, each looked alone and ran on the reader, one device write after
    /// another, with a flush queued behind them all (the 3-replica random-write row).
    func testWritesArrivingTogetherInSeparateRecordsRunAsAGroup() throws {
        for mode in [DataSecurity.auth, .secure] {
            let (server, relay, c) = try serverBehindRelay(mode)
            let before = server.groups.load(ordering: .relaxed)
            XCTAssertEqual(server.grouped.load(ordering: .relaxed), 0, "\(mode)")
            relay.holdRequests()
            let count = 24
            let blocks = (0..<count).map { pattern(bs, seed: UInt8($0)) }
            var waits: [() throws -> Void] = []
            for (i, block) in blocks.enumerated() {
                waits.append(block.withUnsafeBytes {
                    c.beginWrite(volumeID: volume, offset: UInt64(i * 2 * bs), data: $0, generation: UInt64(10 + i), epoch: 1)
                })
            }
            usleep(100_000)  // every record is at the relay
            relay.release()
            for (i, wait) in waits.enumerated() { XCTAssertNoThrow(try wait(), "\(mode) write \(i)") }
            withExtendedLifetime(blocks) {}
            XCTAssertGreaterThan(server.grouped.load(ordering: .relaxed), 1, "\(mode): writes that arrived together ran as a group")
            XCTAssertGreaterThan(server.groups.load(ordering: .relaxed), before, "\(mode)")
            for (i, block) in blocks.enumerated() {
                XCTAssertEqual(try c.read(volumeID: volume, offset: UInt64(i * 2 * bs), length: bs, epoch: 1), block, "\(mode) block \(i)")
            }
        }
    }

    /// A reply whose record stops arriving halfway (the server hangs, the network is cut) does
    /// not hold the caller forever: the call fails once the request timeout passes with
    /// nothing more received, and the connection is broken (the caller reads the socket itself,
    /// and the secure channel waits in recv for the rest of a record).
    func testAReplyCutHalfwayFailsAtTheRequestTimeout() throws {
        let server = try startServer(.secure)
        let relay = try Relay(to: server.boundPort)
        stops.append { relay.stop() }
        let c = try ReplicaClient.connect(host: "127.0.0.1", port: relay.port, connectTimeout: .seconds(3),
                                          requestTimeout: .seconds(1), security: try security("n2", .secure), expectedNode: "n1")
        stops.append { c.close() }
        try c.create(volumeID: volume, sizeBytes: 1 << 20)
        _ = try c.claim(volumeID: volume, epoch: 1, grant: try grant(1))
        relay.stallReplies()
        let outcome = Mutex<String?>(nil)
        let done = DispatchSemaphore(value: 0)
        let client = c
        DispatchQueue.global().async { [volume] in
            do {
                _ = try client.read(volumeID: volume, offset: 0, length: 256 << 10, epoch: 1)
                outcome.withLock { $0 = "answered" }
            } catch {
                outcome.withLock { $0 = "\(error)" }
            }
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 15), .success, "the read still waits for the rest of its reply")
        let text = outcome.withLock { $0 } ?? ""
        XCTAssertTrue(text.contains("replica connection failed") || text.contains("timed out"), text)
        XCTAssertTrue(c.isBroken)
    }

    func testIdentityFilesAreReloadedWhenTheyChange() throws {
        let identity = try TLSIdentity(files: TLSFiles(directory: root + "/n1"), logger: logs.logger)
        let first = identity.current.info.notAfter
        sleep(1)
        try CertificateAuthority.issue(caDirectory: root + "/ca", trustDomain: "cairn", name: "n1", kinds: [.node],
                                       ips: [], dns: [], days: 2, out: root + "/n1")
        sleep(2)
        XCTAssertGreaterThan(identity.current.info.notAfter, first)
        XCTAssertTrue(logs.contains(.notice, "TLS identity reloaded"))
    }

    /// A node's claim needs the controller's grant for that volume, that node and that epoch;
    /// a refusal does not tell the node the replica's epoch.
    func testANodeClaimsOnlyWhatTheControllerGrantedIt() throws {
        let server = try startServer(.auth)
        let ctl = try TLSIdentity(files: TLSFiles(directory: root + "/ctl"), logger: logs.logger)
        let n1 = try TLSIdentity(files: TLSFiles(directory: root + "/n1"), logger: logs.logger)
        let admin = try connect(server, as: "ctl", .auth)
        try admin.create(volumeID: volume, sizeBytes: 1 << 20)
        XCTAssertEqual(try admin.claim(volumeID: volume, epoch: 4).epoch, 4, "a controller claims without a grant")
        let c = try connect(server, as: "n2", .auth)
        func refused(_ grant: ClaimGrant?, epoch: UInt64, _ why: String, line: UInt = #line) {
            XCTAssertThrowsError(try c.claim(volumeID: volume, epoch: epoch, grant: grant), line: line) { error in
                XCTAssertTrue("\(error)".contains(why), "\(error)", line: line)
                XCTAssertFalse(["epoch 4 ", "epoch 4,", "epoch 4)", "seen", "stale"].contains { "\(error)".contains($0) },
                               "the refusal reveals the epoch: \(error)", line: line)
            }
        }
        refused(nil, epoch: 1 << 62, "without the controller's grant")
        refused(try ctl.grant(volumeID: volume, nodeID: "n1", epoch: 5), epoch: 5, "does not verify")
        refused(try ctl.grant(volumeID: volume, nodeID: "n2", epoch: 5), epoch: 6, "does not verify")
        refused(try ctl.grant(volumeID: "vol-other", nodeID: "n2", epoch: 5), epoch: 5, "does not verify")
        refused(try n1.grant(volumeID: volume, nodeID: "n2", epoch: 5), epoch: 5, "not a controller")
        XCTAssertEqual(try admin.status(volumeID: volume, epoch: .max).epoch, 4, "no refused claim moved the epoch")
        XCTAssertEqual(try c.claim(volumeID: volume, epoch: 5, grant: try ctl.grant(volumeID: volume, nodeID: "n2", epoch: 5)).epoch, 5)
        XCTAssertTrue(logs.records.withLock { $0.contains {
            $0.message == "claim accepted" && $0.metadata["replica.peer_identity"] == "spiffe://cairn/node/n2" && $0.metadata["claim.epoch"] == "5"
        } })
        XCTAssertTrue(logs.contains(.warning, "refused a claim"))
    }

    func testSignaturesVerifyOnlyFromTheCluster() throws {
        let ctl = try TLSContext(TLSFiles(directory: root + "/ctl"))
        let n1 = try TLSContext(TLSFiles(directory: root + "/n1"))
        let foreign = try TLSContext(TLSFiles(directory: root + "/foreign-n2"))
        let message = Array("volume vol-1 epoch 7 node n1".utf8)
        let signature = try ctl.sign(message)
        let signer = try n1.verify(message: message, signature: signature, certificateDER: try ctl.certificateDER())
        XCTAssertTrue(signer.isController(in: "cairn"))
        XCTAssertThrowsError(try n1.verify(message: message + [0], signature: signature, certificateDER: try ctl.certificateDER()))
        let forged = try foreign.sign(message)
        XCTAssertThrowsError(try n1.verify(message: message, signature: forged, certificateDER: try foreign.certificateDER()))
    }
}

/// A TCP relay between a client and the server that can change what the client sends.
final class Relay: Sendable {
    enum Attack: Sendable { case flipBit, replay }
    let port: UInt16
    private let listenFD: Int32
    private let armed = Mutex<Attack?>(nil)
    private let fds = Mutex<[Int32]>([])

    init(to serverPort: UInt16) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        Glibc.listen(fd, 4)
        listenFD = fd
        port = Socket.localPort(fd)
        let this = UnsafeSendable(self)
        try startThread {
            let relay = this.value
            while true {
                let client = accept(relay.listenFD, nil, nil)
                guard client >= 0 else { return }
                guard let upstream = try? Socket.connect(host: "127.0.0.1", port: serverPort, timeout: .seconds(2)) else { return }
                relay.fds.withLock { $0 += [client, upstream] }
                try? startThread { relay.pump(from: client, to: upstream, attacking: true) }
                try? startThread { relay.pump(from: upstream, to: client, attacking: false) }
            }
        }
    }

    func arm(_ attack: Attack) { armed.withLock { $0 = attack } }

    /// From the next chunk on, replies are cut: half of that chunk reaches the client, then
    /// nothing more, and the connection stays open (a peer that hangs halfway through a record).
    func stallReplies() { stalling.withLock { $0 = true } }
    private let stalling = Mutex(false)

    /// From now on the client's bytes are held here until `release`, which sends all of them
    /// to the server in one write: requests sent one record at a time arrive together.
    func holdRequests() { held.withLock { $0 = ($0?.0 ?? [], $0?.1 ?? -1) } }
    func release() {
        held.withLock { h in
            if let (bytes, to) = h, to >= 0, !bytes.isEmpty { _ = try? bytes.withUnsafeBytes { try Socket.sendAll(to, $0) } }
            h = nil
        }
    }
    /// Bytes held for the server, and the server's socket (-1 until the first chunk).
    private let held = Mutex<([UInt8], Int32)?>(nil)

    private func pump(from: Int32, to: Int32, attacking: Bool) {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = recv(from, &buffer, buffer.count, 0)
            guard n > 0 else { _ = shutdown(to, Int32(SHUT_RDWR)); return }
            var chunk = Array(buffer[0..<n])
            if !attacking, stalling.withLock({ $0 }) {
                let half = Array(chunk[0..<max(1, chunk.count / 2)])
                _ = try? half.withUnsafeBytes { try Socket.sendAll(to, $0) }
                while recv(from, &buffer, buffer.count, 0) > 0 {}  // swallow the rest until closed
                return
            }
            if attacking, held.withLock({ h in
                guard h != nil else { return false }
                h!.0 += chunk
                h!.1 = to
                return true
            }) { continue }
            let attack = attacking ? armed.withLock { a -> Attack? in defer { a = nil }; return a } : nil
            if attack == .flipBit { chunk[chunk.count - 20] ^= 0x01 }
            let copies = attack == .replay ? 2 : 1
            for _ in 0..<copies {
                guard (try? chunk.withUnsafeBytes { try Socket.sendAll(to, $0) }) != nil else { return }
            }
        }
    }

    func stop() {
        _ = shutdown(listenFD, Int32(SHUT_RDWR))
        close(listenFD)
        for fd in fds.withLock({ $0 }) { _ = shutdown(fd, Int32(SHUT_RDWR)) }
    }
}

private struct UnsafeSendable<T>: @unchecked Sendable { let value: T; init(_ v: T) { value = v } }
