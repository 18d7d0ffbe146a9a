import ArgumentParser
import CairnCore
import CairnReplicaControl
import CairnRPC

/// The process's TLS identity (`--tls-dir`), checked at start: its files and what its
/// certificate names.
struct ProcessIdentity: Sendable {
    let files: TLSIdentity
    let spiffeID: SPIFFEID
    let nodeID: String

    /// Refuses files that cannot serve (unreadable, a key of another certificate, expired) and
    /// a certificate without a Cairn SPIFFE ID; a process that serves replicas must hold its
    /// node's certificate (peers verify the node id it carries).
    init(directory: String, nodeID: String, servesReplicas: Bool) throws {
        files = TLSIdentity(directory: directory)
        let id: SPIFFEID?
        do { id = try files.check() } catch let error as CairnError { throw ValidationError("--tls-dir \(directory): \(error.message)") }
        guard let id, let member = id.member else {
            throw ValidationError("--tls-dir \(directory): the certificate \(files.certFile!) names no Cairn SPIFFE ID (spiffe://TRUST-DOMAIN/node/NODE-ID or .../controller/NAME): issue it with `cairn cert issue`")
        }
        if servesReplicas && !(member.role == .node && member.name == nodeID) {
            throw ValidationError("--tls-dir \(directory): the certificate names \(id), but this process serves node \(nodeID)'s replicas: it needs that node's certificate (`cairn cert issue \(nodeID) --role node`)")
        }
        spiffeID = id
        self.nodeID = nodeID
    }

    var replicaControlAccess: ReplicaControlAccess { ReplicaControlAccess(trustDomain: spiffeID.trustDomain, nodeID: nodeID) }
}
