// What a process's replica server and clients need to protect the data protocol: the mode and,
// unless the mode is `none`, this process's TLS identity.

import CairnCore
import Foundation

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

/// The controller signs claim grants with its TLS identity.
extension TLSIdentity: ClaimSigner {
    public func grant(volumeID: String, nodeID: String, epoch: FencingEpoch) throws -> ClaimGrant {
        let context = current
        let signature = try context.sign(ClaimGrant.message(volumeID: volumeID, nodeID: nodeID, epoch: epoch.rawValue))
        return ClaimGrant(signature: Data(signature), certificate: Data(try context.certificateDER()))
    }

    /// Checks `grant` for a claim of `volumeID` at `epoch` by `peer`: signed by a controller of
    /// this trust domain, for that volume, that node and that epoch. Returns why not, or nil.
    public func refusal(ofClaim grant: ClaimGrant?, volumeID: String, epoch: UInt64, by peer: PeerIdentity) -> String? {
        if peer.isController(in: trustDomain) { return nil }
        guard let node = peer.node(in: trustDomain) else { return "the peer is not a node of trust domain \(trustDomain)" }
        guard let grant else {
            return "node \(node) claimed epoch \(epoch) of volume \(volumeID) without the controller's grant (attached by a release before signed claims? unpublish and publish the volume again)"
        }
        let signer: PeerIdentity
        do {
            signer = try current.verify(message: ClaimGrant.message(volumeID: volumeID, nodeID: node, epoch: epoch),
                                        signature: [UInt8](grant.signature), certificateDER: [UInt8](grant.certificate))
        } catch {
            return "node \(node)'s grant for epoch \(epoch) of volume \(volumeID) does not verify (\(error)): the controller did not attach this volume to this node at this epoch"
        }
        guard signer.isController(in: trustDomain) else {
            return "node \(node)'s grant for volume \(volumeID) is signed by \(signer), not a controller"
        }
        return nil
    }
}
