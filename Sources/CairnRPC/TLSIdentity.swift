import CGRPCShim
import CairnCore

/// A process's TLS identity as three PEM files: the CA bundle it trusts, its certificate (leaf,
/// then intermediates) and its private key. `--tls-dir DIR` names them DIR/ca.crt, DIR/tls.crt
/// and DIR/tls.key, the names cert-manager writes into a Kubernetes Secret.
///
/// Only paths: the C shim reads the files (`cgrpc_tls_files`) whenever it creates a server or a
/// channel, so that the key never passes through Swift, and a channel created after the files
/// were replaced uses the new ones (docs/security.md, "Rotation").
public struct TLSIdentity: Sendable, Hashable, CustomStringConvertible {
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

    /// DIR/ca.crt, DIR/tls.crt, DIR/tls.key.
    public init(directory: String) {
        let dir = directory.hasSuffix("/") ? String(directory.dropLast()) : directory
        self.init(caFile: dir + "/ca.crt", certFile: dir + "/tls.crt", keyFile: dir + "/tls.key")
    }

    public var description: String {
        "ca \(caFile)" + (certFile.map { ", certificate \($0)" } ?? "") + (keyFile.map { ", key \($0)" } ?? "")
    }

    /// Reads and checks the files as a server or channel would (parseable PEM, the key matches
    /// the certificate, not expired) and returns the certificate's SPIFFE ID, if it has one.
    /// Throws INVALID_ARGUMENT naming the file at fault; never the files' contents.
    @discardableResult
    public func check() throws -> SPIFFEID? {
        var id = [CChar](repeating: 0, count: 1024)
        var err = [CChar](repeating: 0, count: 1024)
        let status = withFiles { cgrpc_tls_check($0, &id, id.count, &err, err.count) }
        guard status == 0 else { throw CairnError.invalidArgument("TLS identity (\(self)): \(String(cString: err))") }
        return SPIFFEID(String(cString: id))
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

/// A SPIFFE ID as Cairn's certificates carry it in their URI SAN:
/// `spiffe://<trust-domain>/node/<node-id>` or `spiffe://<trust-domain>/controller/<name>`.
public struct SPIFFEID: Sendable, Hashable, CustomStringConvertible {
    public enum Role: String, Sendable { case node, controller }

    public let trustDomain: String
    /// The path without its leading slash, e.g. "node/n1".
    public let path: String

    public init?(_ uri: String) {
        let scheme = "spiffe://"
        guard uri.hasPrefix(scheme) else { return nil }
        let rest = uri.dropFirst(scheme.count)
        guard let slash = rest.firstIndex(of: "/") else {
            guard !rest.isEmpty else { return nil }
            trustDomain = String(rest)
            path = ""
            return
        }
        let domain = rest[..<slash]
        guard !domain.isEmpty else { return nil }
        trustDomain = String(domain)
        path = String(rest[rest.index(after: slash)...])
    }

    public var description: String { "spiffe://\(trustDomain)" + (path.isEmpty ? "" : "/\(path)") }

    /// The role and name a Cairn certificate names (`node/n1` → (.node, "n1")); nil for any
    /// other path (a certificate of another kind, such as etcd's server certificate).
    public var member: (role: Role, name: String)? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let role = Role(rawValue: String(parts[0])), !parts[1].isEmpty else { return nil }
        return (role, String(parts[1]))
    }
}
