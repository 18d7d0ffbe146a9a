// Who a peer is: the SPIFFE ID in its certificate's subjectAltName, issued by the cluster's CA.
//
//   spiffe://<trust-domain>/node/<node-id>         a node (its agent, engines and replica server)
//   spiffe://<trust-domain>/controller/<name>      a controller
//
// A certificate may name several (a `--role all` process is a node and a controller).

import CairnCore

/// How replica traffic (the data protocol) is protected.
public enum DataSecurity: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Plain TCP: anyone who reaches the port reads and writes every replica. Only with
    /// `--allow-unauthenticated-data`, and warned about at every start.
    case none
    /// Mutual TLS 1.3 handshake; every record carries a Poly1305 tag over its bytes (integrity,
    /// no confidentiality).
    case auth
    /// Like `auth`, and every record is encrypted (AES-256-GCM).
    case secure

    public var description: String { rawValue }

    /// The byte each side announces inside the handshake.
    var wireValue: UInt8 {
        switch self {
        case .none: 0
        case .auth: 1
        case .secure: 2
        }
    }

    init?(wireValue: UInt8) {
        switch wireValue {
        case 1: self = .auth
        case 2: self = .secure
        default: return nil
        }
    }
}

/// One SPIFFE ID Cairn issues: a node or a controller of a trust domain.
public struct SpiffeID: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable, CaseIterable { case node, controller }
    public var trustDomain: String
    public var kind: Kind
    public var name: String

    public init(trustDomain: String, kind: Kind, name: String) {
        self.trustDomain = trustDomain
        self.kind = kind
        self.name = name
    }

    /// Parses "spiffe://td/node/n1"; nil for anything else (other URIs are ignored, not errors).
    public init?(_ uri: String) {
        guard uri.hasPrefix("spiffe://") else { return nil }
        let parts = uri.dropFirst("spiffe://".count).split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, !parts[2].isEmpty,
              let kind = Kind(rawValue: String(parts[1])) else { return nil }
        self.init(trustDomain: String(parts[0]), kind: kind, name: String(parts[2]))
    }

    public var description: String { "spiffe://\(trustDomain)/\(kind.rawValue)/\(name)" }

    /// A trust domain: lower-case letters, digits, '.', '-', '_' (SPIFFE's rule).
    public static func validateTrustDomain(_ td: String) throws {
        guard !td.isEmpty, td.count <= 255,
              td.unicodeScalars.allSatisfy({ ("a"..."z").contains($0) || ("0"..."9").contains($0) || "._-".unicodeScalars.contains($0) })
        else {
            throw CairnError.invalidArgument("trust domain \"\(td)\" must be lower-case letters, digits, '.', '-' or '_'")
        }
    }
}

/// What the other end of a connection proved: the SPIFFE IDs of its verified certificate.
public struct PeerIdentity: Sendable, CustomStringConvertible {
    public var ids: [SpiffeID]
    /// Every URI SAN, SPIFFE or not (for logs).
    public var uris: [String]

    public init(uris: [String]) {
        self.uris = uris
        self.ids = uris.compactMap(SpiffeID.init)
    }

    /// The node this peer is in `trustDomain`, if it is one.
    public func node(in trustDomain: String) -> String? {
        ids.first { $0.kind == .node && $0.trustDomain == trustDomain }?.name
    }

    public func isController(in trustDomain: String) -> Bool {
        ids.contains { $0.kind == .controller && $0.trustDomain == trustDomain }
    }

    public var description: String { uris.isEmpty ? "a certificate with no URI name" : uris.joined(separator: ", ") }
}

/// The NUL-terminated text a C call wrote into `buffer`.
func cString(_ buffer: [CChar]) -> String {
    String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
