// Who may call a node's ReplicaControl service when it serves mutual TLS (`--tls-dir`).
//
// The transport has verified the caller's certificate against the cluster's CA before any call
// reaches this check; what is left is the certificate's SPIFFE ID (its URI SAN). The callers the
// code has: the controller (ReplicatedBacking's create, delete, snapshot, clone, grow, write
// holds: every method) and the node's own sweeper, which deletes this node's orphaned replicas
// through its own service. So the rule is: a controller of the cluster's trust domain, or this
// node itself; another node, a certificate of the CA that names no member (etcd's server
// certificate), or another trust domain is refused with PERMISSION_DENIED. A compromised node
// cannot delete or snapshot another node's replicas through this service.
//
// Every refusal is logged (warning) with the peer's identity and address; every accepted call
// that changes something (all but ListSnapshots) is logged at info with the same.

import CairnCore
import CairnRPC
import CairnSecurity
import Logging

public struct ReplicaControlAccess: Sendable {
    /// The cluster's trust domain: the one in this process's own certificate.
    public let trustDomain: String
    /// This node's id: its own processes (the sweeper) call with its node certificate.
    public let nodeID: String

    public init(trustDomain: String, nodeID: String) {
        self.trustDomain = trustDomain
        self.nodeID = nodeID
    }

    /// Methods that change nothing: accepted without an info line.
    static let readOnlyMethods: Set<String> = [ReplicaControlService.method("ListSnapshots")]

    /// Throws PERMISSION_DENIED unless the caller may call; logs the decision.
    public func authorize(_ context: RPCContext) throws {
        let peer = context.peer
        var metadata: Logger.Metadata = [
            "peer.id": "\(peer.identity.map { "\($0)" } ?? "none")", "peer.address": "\(peer.address)",
            "rpc.method": "\(context.method)",
        ]
        guard let refusal = refusal(peer) else {
            if !Self.readOnlyMethods.contains(context.method) {
                context.logger.info("replica control call accepted", metadata: metadata)
            }
            return
        }
        metadata["reason"] = "\(refusal)"
        context.logger.warning("replica control call refused", metadata: metadata)
        throw CairnError(.permissionDenied, "replica control refused the call: \(refusal)")
    }

    /// Why `peer` may not call; nil when it may.
    func refusal(_ peer: RPCPeer) -> String? {
        guard let identity = peer.identity, !identity.ids.isEmpty else {
            return "the client certificate names no Cairn identity (spiffe://\(trustDomain)/controller/NAME or spiffe://\(trustDomain)/node/\(nodeID))"
        }
        if identity.isController(in: trustDomain) || identity.node(in: trustDomain) == nodeID { return nil }
        if let node = identity.node(in: trustDomain) {
            return "node \(node) may not control node \(nodeID)'s replicas: only the cluster's controllers and the node itself may"
        }
        return "\(identity) names no controller or node of trust domain \(trustDomain)"
    }
}
