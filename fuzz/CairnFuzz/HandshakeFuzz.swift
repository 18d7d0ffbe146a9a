#if canImport(Glibc)
import Glibc
#endif
import CairnSecurity
import Foundation

/// The `handshake` target: a replica server's side of the data protocol's handshake
/// (`SecureChannel.establish(asServer:)`: OpenSSL's TLS 1.3 server with client certificates
/// required, then the mode byte) fed what a peer sends, through a socket pair. Nothing it sends
/// may crash the server or make it accept: without the cluster CA's key no input can present a
/// valid certificate, so every input must be refused.
public enum HandshakeFuzz {
    public static let target = FuzzTarget(name: "handshake", run: run, seeds: seeds)

    /// The server's identity: a CA and a node certificate made once per process in a
    /// temporary directory.
    static let server: TLSContext? = {
        let dir = NSTemporaryDirectory() + "cairn-fuzz-handshake-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            try CertificateAuthority.create(directory: dir + "/ca", trustDomain: "cairn", days: 1)
            try CertificateAuthority.issue(caDirectory: dir + "/ca", trustDomain: "cairn", name: "n1", kinds: [.node],
                                           ips: [], dns: [], days: 1, out: dir + "/n1")
            return try TLSContext(TLSFiles(directory: dir + "/n1"))
        } catch {
            return nil
        }
    }()

    static func run(_ input: UnsafeRawBufferPointer) {
        guard let server, let first = input.first else { return }
        RecordFuzz.withPeerStream(UnsafeRawBufferPointer(rebasing: input.dropFirst())) { fd in
            let accepted = (try? SecureChannel.establish(fd: fd, asServer: true, mode: RecordFuzz.mode(first), context: server,
                                                         timeout: .seconds(2))) != nil
            precondition(!accepted, "a handshake without a certificate of the cluster's CA was accepted")
        }
    }

    /// No generated seeds: a ClientHello is random (its random and key share), so it could not
    /// match a committed file. The corpus holds one captured with `capturedSeed()`
    /// (fuzz/corpus/handshake/clienthello-captured).
    static func seeds() -> [(name: String, bytes: [UInt8])] { [] }

    /// A real client's first flight (its ClientHello) with the mode byte in front: the
    /// committed corpus file was made with it.
    public static func capturedSeed() -> [UInt8] { [0] + clientHello() }

    /// What a client with a certificate of another CA sends before it waits for the server.
    static func clientHello() -> [UInt8] {
        let dir = NSTemporaryDirectory() + "cairn-fuzz-hello-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        guard (try? CertificateAuthority.create(directory: dir + "/ca", trustDomain: "cairn", days: 1)) != nil,
              (try? CertificateAuthority.issue(caDirectory: dir + "/ca", trustDomain: "cairn", name: "n2", kinds: [.node],
                                               ips: [], dns: [], days: 1, out: dir + "/n2")) != nil,
              let client = try? TLSContext(TLSFiles(directory: dir + "/n2")) else { return [] }
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { return [] }
        defer { close(fds[0]) }
        // The client sends its ClientHello, then gives up waiting for a ServerHello.
        _ = try? SecureChannel.establish(fd: fds[1], asServer: false, mode: .auth, context: client, timeout: .milliseconds(200))
        close(fds[1])
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fds[0], &buffer, buffer.count, Int32(MSG_DONTWAIT))
            guard n > 0 else { break }
            out += buffer[0..<n]
        }
        return out
    }
}
