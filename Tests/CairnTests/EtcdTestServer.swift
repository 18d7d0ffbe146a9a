import CairnCore
import CairnRPC
import CairnStore
import Foundation
import Logging
import XCTest

/// A real etcd (Debian's etcd-server) on free loopback ports with its own temporary data
/// directory, for the EtcdStore tests. `stop()` kills it and removes the directory.
final class EtcdTestServer: @unchecked Sendable {
    static let binary = "/usr/bin/etcd"
    let dir: String
    let clientURL: String
    /// With `start(tls:)`: the identity a client presents (a certificate of the test CA).
    let clientIdentity: TLSCredentials?
    private let process = Process()

    private init(dir: String, clientURL: String, clientIdentity: TLSCredentials?) {
        self.dir = dir
        self.clientURL = clientURL
        self.clientIdentity = clientIdentity
    }

    /// Starts etcd and waits (up to 20 s) until it answers. `tls: true`: etcd serves https://
    /// with a certificate of a CA made in its directory (`pki`) and requires client
    /// certificates of that CA (`--client-cert-auth`).
    static func start(tls: Bool = false) async throws -> EtcdTestServer {
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw CairnError.failedPrecondition("\(binary) is missing: run scripts/setup (it installs Debian's etcd-server)")
        }
        let dir = NSTemporaryDirectory() + "cairn-etcd-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let clientPort = try freePort(), peerPort = try freePort()
        let client = "\(tls ? "https" : "http")://127.0.0.1:\(clientPort)", peer = "http://127.0.0.1:\(peerPort)"
        var tlsArguments: [String] = []
        var clientIdentity: TLSCredentials?
        if tls {
            let pki = try TestPKI.make(in: dir + "/pki")
            let serving = try pki.issue("etcd", dns: ["localhost"], ips: ["127.0.0.1"])
            clientIdentity = try pki.controller("etcd-client")
            tlsArguments = ["--cert-file", serving.certFile!, "--key-file", serving.keyFile!,
                            "--trusted-ca-file", serving.caFile, "--client-cert-auth"]
        }
        let server = EtcdTestServer(dir: dir, clientURL: client, clientIdentity: clientIdentity)
        server.process.executableURL = URL(fileURLWithPath: binary)
        server.process.arguments = [
            "--name", "default", "--data-dir", dir + "/data",
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", "default=\(peer)",
        ] + tlsArguments
        FileManager.default.createFile(atPath: dir + "/etcd.log", contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/etcd.log"))
        server.process.standardOutput = log
        server.process.standardError = log
        do {
            try server.process.run()
            let probe = try EtcdStore(endpoints: [client], tls: clientIdentity, prefix: "/probe", logger: Logger(label: "probe"))
            let deadline = ContinuousClock.now + .seconds(20)
            while true {
                do { _ = try await probe.liveNodes(); break } catch {
                    guard server.process.isRunning, ContinuousClock.now < deadline else {
                        let output = (try? String(contentsOfFile: dir + "/etcd.log", encoding: .utf8)) ?? ""
                        throw CairnError.unavailable("etcd did not start answering at \(client): \(error)\n\(output.suffix(2000))")
                    }
                    try await Task.sleep(for: .milliseconds(100))
                }
            }
        } catch {
            server.stop()
            throw error
        }
        return server
    }

    /// A store on this etcd under a fresh prefix, so tests sharing one etcd never see each other.
    func store(nodeLeaseTTL: Int = 10, endpoints: [String]? = nil, tls: TLSCredentials? = nil) throws -> EtcdStore {
        var logger = Logger(label: "etcd-store-test")
        logger.logLevel = .debug
        return try EtcdStore(endpoints: endpoints ?? [clientURL], tls: tls ?? clientIdentity, prefix: "/cairn-test-\(UUID().uuidString)",
                             nodeLeaseTTL: nodeLeaseTTL, logger: logger)
    }

    /// etcd's process id (the leadership tests SIGSTOP it to make it unreachable).
    var pid: Int32 { process.processIdentifier }

    func stop() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// A TCP port nobody listens on right now (bound to port 0, then released).
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket", errno: errno) }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { pointer in
                bind(fd, pointer, length) == 0 && getsockname(fd, pointer, &length) == 0
            }
        }
        guard bound else { throw SystemError("bind 127.0.0.1:0", errno: errno) }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
