// A claim grant: the controller's signature that node N was given epoch E of volume V
// (ControllerPublishVolume). A node presents it with every claim; a replica server with data
// security on refuses a node's claim without a valid grant for exactly that volume, that node
// and that epoch — so even a node whose key is stolen cannot fence or take a volume the
// controller did not attach to it (docs/security.md).

import Foundation

public struct ClaimGrant: Codable, Sendable, Equatable {
    /// The controller's signature over `message(volumeID:nodeID:epoch:)`.
    public var signature: Data
    /// The signing controller's certificate (DER), verified against the cluster's CAs.
    public var certificate: Data

    public init(signature: Data, certificate: Data) {
        self.signature = signature
        self.certificate = certificate
    }

    /// What is signed: a fixed label, then the three facts, unambiguously separated.
    public static func message(volumeID: String, nodeID: String, epoch: UInt64) -> [UInt8] {
        var bytes = Array("cairn claim grant v1\0".utf8)
        bytes += Array(volumeID.utf8) + [0] + Array(nodeID.utf8) + [0]
        withUnsafeBytes(of: epoch.bigEndian) { bytes += $0 }
        return bytes
    }
}

/// Signs grants (the controller's TLS identity); nil in a cluster without data security.
public protocol ClaimSigner: Sendable {
    func grant(volumeID: String, nodeID: String, epoch: FencingEpoch) throws -> ClaimGrant
}
