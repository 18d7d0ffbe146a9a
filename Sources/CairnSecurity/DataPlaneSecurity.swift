// What a process's replica server and clients need to protect the data protocol: the mode and,
// unless the mode is `none`, this process's TLS identity.

import CairnCore

public struct DataPlaneSecurity: Sendable, CustomStringConvertible {
    public let mode: DataSecurity
    public let identity: TLSIdentity?
    /// How long a connection's handshake may take before it is dropped.
    public var handshakeTimeout: Duration = .seconds(5)

    /// Plain TCP (tests, and `--data-security none --allow-unauthenticated-data`).
    public static let insecure = DataPlaneSecurity(mode: .none)

    private init(mode: DataSecurity) {
        self.mode = mode
        self.identity = nil
    }

    /// `auth` or `secure` with `identity`.
    public init(mode: DataSecurity, identity: TLSIdentity) {
        self.mode = mode
        self.identity = mode == .none ? nil : identity
    }

    public var description: String {
        guard let identity else { return "none (unauthenticated)" }
        return "\(mode) as \(identity.identity)"
    }

    /// Why `peer` may not use this node's replicas, or nil when it may: a node or a controller
    /// of this identity's trust domain.
    public func refusal(of peer: PeerIdentity) -> String? {
        guard let td = identity?.trustDomain else { return nil }
        if peer.node(in: td) != nil || peer.isController(in: td) { return nil }
        return "its certificate (\(peer)) names no node or controller of trust domain \(td)"
    }
}
