// This process's certificate, key and trusted CAs: a directory as cert-manager writes a
// Kubernetes Secret (`ca.crt`, `tls.crt`, `tls.key`), made by `cairn ca init` and `cairn cert issue`
// or brought by the operator.
//
// Rotation: the files are looked at again (at most every 2 s) when a connection is made; a
// changed set is loaded for new connections, and connections already made stay as they are. A
// set that does not load (half written, key not matching) is logged and the previous one stays
// in use. Peers accept any certificate their CAs sign until it expires, so an old certificate
// keeps working beside the new one; a CA is rotated by listing both in `ca.crt` first.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CTLSShim
import Foundation
import Logging
import Synchronization

/// The three files of an identity.
public struct TLSFiles: Sendable, Hashable, CustomStringConvertible {
    public var ca: String
    public var certificate: String
    public var key: String

    public init(ca: String, certificate: String, key: String) {
        self.ca = ca
        self.certificate = certificate
        self.key = key
    }

    /// `DIR/ca.crt`, `DIR/tls.crt`, `DIR/tls.key`.
    public init(directory: String) {
        self.init(ca: directory + "/ca.crt", certificate: directory + "/tls.crt", key: directory + "/tls.key")
    }

    public var description: String { "\(certificate) (key \(key), CAs \(ca))" }
}

/// Facts about a certificate file (its first certificate).
public struct CertificateInfo: Sendable {
    public var uris: [String]
    public var subject: String
    public var notBefore: Date
    public var notAfter: Date

    public static func read(_ path: String) throws -> CertificateInfo {
        var uris = [CChar](repeating: 0, count: 4096)
        var subject = [CChar](repeating: 0, count: 1024)
        var err = [CChar](repeating: 0, count: 1024)
        var notBefore: Int64 = 0
        var notAfter: Int64 = 0
        guard ctls_cert_file_info(path, &uris, uris.count, &subject, subject.count, &notBefore, &notAfter, &err, err.count) == 0 else {
            throw CairnError.invalidArgument(cString(err))
        }
        let joined = cString(uris)
        return CertificateInfo(uris: joined.isEmpty ? [] : joined.split(separator: "\n").map(String.init),
                               subject: cString(subject),
                               notBefore: Date(timeIntervalSince1970: TimeInterval(notBefore)),
                               notAfter: Date(timeIntervalSince1970: TimeInterval(notAfter)))
    }
}

/// A loaded TLS context (OpenSSL's SSL_CTX): freed when the last connection using it is done.
public final class TLSContext: @unchecked Sendable {
    // SSL_CTX is safe to share between threads once configured (OpenSSL's rule); it is never
    // reconfigured after init.
    let raw: OpaquePointer
    public let files: TLSFiles
    public let info: CertificateInfo

    public init(_ files: TLSFiles) throws {
        var err = [CChar](repeating: 0, count: 2048)
        guard let raw = ctls_ctx_new(files.ca, files.certificate, files.key, &err, err.count) else {
            throw CairnError.invalidArgument("cannot load the TLS identity: \(cString(err))")
        }
        self.raw = raw
        self.files = files
        do {
            self.info = try CertificateInfo.read(files.certificate)
        } catch {
            ctls_ctx_free(raw)
            throw error
        }
    }

    deinit { ctls_ctx_free(raw) }

    public var identity: PeerIdentity { PeerIdentity(uris: info.uris) }

    /// Signs `message` with this identity's key.
    public func sign(_ message: [UInt8]) throws -> [UInt8] {
        var sig = [UInt8](repeating: 0, count: 512)
        var len = sig.count
        var err = [CChar](repeating: 0, count: 512)
        guard ctls_ctx_sign(raw, message, message.count, &sig, &len, &err, err.count) == 0 else {
            throw CairnError.internal("signing failed: \(cString(err))")
        }
        return Array(sig.prefix(len))
    }

    /// This identity's certificate, DER.
    public func certificateDER() throws -> [UInt8] {
        var der = [UInt8](repeating: 0, count: 8192)
        var len = der.count
        guard ctls_ctx_cert_der(raw, &der, &len) == 0 else {
            throw CairnError.internal("cannot encode this process's certificate")
        }
        return Array(der.prefix(len))
    }

    /// Checks that `certificateDER` chains to this identity's CAs and that `signature` signs
    /// `message` under it; returns who signed.
    public func verify(message: [UInt8], signature: [UInt8], certificateDER: [UInt8]) throws -> PeerIdentity {
        var uris = [CChar](repeating: 0, count: 4096)
        var err = [CChar](repeating: 0, count: 1024)
        guard ctls_ctx_verify_signed(raw, certificateDER, certificateDER.count, message, message.count,
                                     signature, signature.count, &uris, uris.count, &err, err.count) == 0 else {
            throw CairnError(.permissionDenied, cString(err))
        }
        let joined = cString(uris)
        return PeerIdentity(uris: joined.isEmpty ? [] : joined.split(separator: "\n").map(String.init))
    }
}

/// This process's identity, reloaded when its files change.
public final class TLSIdentity: Sendable {
    public let files: TLSFiles
    /// The trust domain of this identity's own SPIFFE IDs (peers must share it).
    public let trustDomain: String
    private let logger: Logger
    private let state: Mutex<State>

    private struct State {
        var context: TLSContext
        var stamp: [Int64]
        var lastCheck: ContinuousClock.Instant
    }

    /// Loads the files; throws a message that says which file is wrong and how to make one.
    /// `trustDomain` is for a certificate that names no Cairn identity (a client that only
    /// reads, in tests); otherwise it comes from the certificate.
    public init(files: TLSFiles, logger: Logger, trustDomain: String? = nil) throws {
        for path in [files.ca, files.certificate, files.key] where access(path, R_OK) != 0 {
            throw CairnError.invalidArgument(
                "cannot read \(path): \(String(cString: strerror(errno))); make the files with `cairn ca init --dir CA_DIR` and `cairn cert issue NAME --ca-dir CA_DIR --out DIR` (or bring ca.crt, tls.crt and tls.key, e.g. from a cert-manager Secret)")
        }
        let context = try TLSContext(files)
        guard let td = context.identity.ids.first?.trustDomain ?? trustDomain else {
            throw CairnError.invalidArgument(
                "the certificate \(files.certificate) names no Cairn identity (a URI subjectAltName spiffe://TRUST-DOMAIN/node/NODE-ID or spiffe://TRUST-DOMAIN/controller/NAME); issue one with `cairn cert issue`")
        }
        self.files = files
        self.trustDomain = td
        self.logger = logger
        self.state = Mutex(State(context: context, stamp: Self.stamp(files), lastCheck: .now))
    }

    /// The context for a new connection: reloaded first if the files changed.
    public var current: TLSContext {
        let now = ContinuousClock.now
        let (context, due) = state.withLock { s -> (TLSContext, Bool) in
            guard now - s.lastCheck >= .seconds(2) else { return (s.context, false) }
            s.lastCheck = now
            return (s.context, true)
        }
        guard due else { return context }
        let stamp = Self.stamp(files)
        guard stamp != state.withLock({ $0.stamp }) else { return context }
        do {
            let fresh = try TLSContext(files)
            state.withLock { s in
                s.context = fresh
                s.stamp = stamp
            }
            logger.notice("TLS identity reloaded: new connections use the new certificate", metadata: [
                "tls.certificate": "\(files.certificate)", "tls.identity": "\(fresh.identity)",
                "tls.not_after": "\(fresh.info.notAfter)",
            ])
            return fresh
        } catch {
            state.withLock { $0.stamp = stamp }
            logger.error("the TLS files changed but do not load; still using the previous certificate", metadata: [
                "tls.certificate": "\(files.certificate)", "error": "\(error)",
            ])
            return context
        }
    }

    /// This process's own identity (what peers see).
    public var identity: PeerIdentity { current.identity }

    /// mtime and size of each file: a change of any is a rotation.
    private static func stamp(_ files: TLSFiles) -> [Int64] {
        [files.ca, files.certificate, files.key].flatMap { path -> [Int64] in
            var st = stat()
            guard stat(path, &st) == 0 else { return [-1, -1, -1] }
            return [Int64(st.st_mtim.tv_sec), Int64(st.st_mtim.tv_nsec), Int64(st.st_size)]
        }
    }
}

/// Makes a cluster CA and the certificates it signs (`cairn ca init`, `cairn cert issue`).
public enum CertificateAuthority {
    /// Writes `dir/ca.key` (0600) and `dir/ca.crt`; refuses to overwrite an existing CA.
    public static func create(directory: String, trustDomain: String, days: Int) throws {
        try SpiffeID.validateTrustDomain(trustDomain)
        try makeDirectory(directory)
        let key = directory + "/ca.key", cert = directory + "/ca.crt"
        guard access(key, F_OK) != 0, access(cert, F_OK) != 0 else {
            throw CairnError.alreadyExists("\(directory) already holds a CA (ca.key, ca.crt); issuing certificates from it needs no new one")
        }
        var err = [CChar](repeating: 0, count: 1024)
        guard ctls_ca_create("cairn CA \(trustDomain)", "spiffe://\(trustDomain)", Int32(days), key, cert, &err, err.count) == 0 else {
            throw CairnError.internal("cannot create the CA: \(cString(err))")
        }
    }

    /// The trust domain of the CA in `directory` (its certificate's spiffe:// URI).
    public static func trustDomain(caDirectory directory: String) throws -> String {
        let info = try CertificateInfo.read(directory + "/ca.crt")
        guard let uri = info.uris.first(where: { $0.hasPrefix("spiffe://") }) else {
            throw CairnError.invalidArgument("\(directory)/ca.crt names no trust domain (spiffe://…); give --trust-domain")
        }
        return String(uri.dropFirst("spiffe://".count).prefix { $0 != "/" })
    }

    /// Issues `name`'s certificate into `out` as tls.key (0600), tls.crt and ca.crt.
    public static func issue(caDirectory: String, trustDomain: String, name: String, kinds: [SpiffeID.Kind],
                             ips: [String], dns: [String], days: Int, out: String) throws {
        try Validate.nodeID(name, field: "NAME")
        for ip in ips where !isIPAddress(ip) { throw CairnError.invalidArgument("--ip \(ip) is not an IPv4 or IPv6 address") }
        for d in dns where d.isEmpty || d.contains(",") || d.contains(":") || d.contains(" ") {
            throw CairnError.invalidArgument("--dns \"\(d)\" is not a DNS name")
        }
        var san = kinds.map { "URI:\(SpiffeID(trustDomain: trustDomain, kind: $0, name: name))" }
        if !kinds.isEmpty { san.append("DNS:\(name)") }
        san += dns.filter { $0 != name || kinds.isEmpty }.map { "DNS:\($0)" }
        san += ips.map { "IP:\($0)" }
        guard !san.isEmpty else { throw CairnError.invalidArgument("a server certificate needs at least one --ip or --dns") }
        try makeDirectory(out)
        var err = [CChar](repeating: 0, count: 1024)
        guard ctls_cert_issue(caDirectory + "/ca.key", caDirectory + "/ca.crt", name, san.joined(separator: ","), Int32(days),
                              out + "/tls.key", out + "/tls.crt", &err, err.count) == 0 else {
            throw CairnError.invalidArgument("cannot issue the certificate: \(cString(err))")
        }
        let ca = try String(contentsOfFile: caDirectory + "/ca.crt", encoding: .utf8)
        try ca.write(toFile: out + "/ca.crt", atomically: true, encoding: .utf8)
    }

    private static func makeDirectory(_ path: String) throws {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
        } catch {
            throw CairnError.invalidArgument("cannot create \(path): \(error.localizedDescription)")
        }
    }

    static func isIPAddress(_ s: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, s, &v4) == 1 || inet_pton(AF_INET6, s, &v6) == 1
    }
}
