import CGRPCShim
import CairnCore
import CairnSecurity

/// What a gRPC server or channel authenticates with, as PEM files: the CA bundle it trusts, and
/// its certificate (leaf, then intermediates) and private key — the process's identity
/// (`CairnSecurity.TLSFiles`, `--tls-dir`), or etcd's client files (`--etcd-ca/--etcd-cert/--etcd-key`).
///
/// Only paths: the C shim reads the files (`cgrpc_tls_files`) whenever it creates a server or a
/// channel, so that the key never passes through Swift, and a channel created after the files
/// were replaced uses the new ones (docs/security.md, "Rotation").
public struct TLSCredentials: Sendable, Hashable, CustomStringConvertible {
    public var caFile: String
    /// The certificate and key go together; both nil for a client that presents none (an etcd
    /// without --client-cert-auth).
    public var certFile: String?
    public var keyFile: String?

    public init(caFile: String, certFile: String? = nil, keyFile: String? = nil) {
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
    }

    /// A process's identity (DIR/ca.crt, DIR/tls.crt, DIR/tls.key for `--tls-dir DIR`).
    public init(_ files: TLSFiles) {
        self.init(caFile: files.ca, certFile: files.certificate, keyFile: files.key)
    }

    public var description: String {
        "ca \(caFile)" + (certFile.map { ", certificate \($0)" } ?? "") + (keyFile.map { ", key \($0)" } ?? "")
    }

    /// Reads and checks the files as a server or channel would (parseable PEM, the key matches
    /// the certificate, not expired). Throws INVALID_ARGUMENT naming the file at fault; never
    /// the files' contents.
    public func check() throws {
        var err = [CChar](repeating: 0, count: 1024)
        let status = withFiles { cgrpc_tls_check($0, &err, err.count) }
        guard status == 0 else { throw CairnError.invalidArgument("TLS files (\(self)): \(String(cString: err))") }
    }

    /// The files as the C shim takes them, valid during `body`.
    func withFiles<R>(_ body: (UnsafePointer<cgrpc_tls_files>) throws -> R) rethrows -> R {
        try caFile.withCString { ca in
            try withOptionalCString(certFile) { cert in
                try withOptionalCString(keyFile) { key in
                    var files = cgrpc_tls_files(ca_path: ca, cert_path: cert, key_path: key)
                    return try body(&files)
                }
            }
        }
    }
}

private func withOptionalCString<R>(_ string: String?, _ body: (UnsafePointer<CChar>?) throws -> R) rethrows -> R {
    guard let string else { return try body(nil) }
    return try string.withCString { try body($0) }
}
