// The claim request: the volume, and (with data security) the controller's grant of the
// header's epoch to the claiming node (CairnCore/ClaimGrant.swift). The claimed epoch is the
// header's.
//
//   volume (u16 length + UTF-8) [signature (u16 length, 1…512 bytes) certificate (u16 length,
//   1…8192 bytes)]
//
// A claim without the grant is the earlier releases' request, byte for byte.

import CairnCore
import Foundation

public struct ClaimRequest: WireCodable {
    public static let maxSignature = 512
    public static let maxCertificate = 8192

    public var volume: String
    public var grant: ClaimGrant?

    public init(volume: String, grant: ClaimGrant? = nil) {
        self.volume = volume
        self.grant = grant
    }

    public func encode() -> [UInt8] {
        var w = ByteWriter()
        w.writeVolume(volume)
        if let grant {
            w.writeToken([UInt8](grant.signature.prefix(Self.maxSignature)))
            w.writeToken([UInt8](grant.certificate.prefix(Self.maxCertificate)))
        }
        return w.bytes
    }

    public init(decoding payload: some Collection<UInt8>, flags: UInt8 = 0) throws(FrameError) {
        var r = ByteReader(payload)
        volume = try r.readVolume()
        if r.remaining > 0 {
            let signature = try Self.readBytes(&r, "grant signature", max: Self.maxSignature)
            let certificate = try Self.readBytes(&r, "grant certificate", max: Self.maxCertificate)
            grant = ClaimGrant(signature: Data(signature), certificate: Data(certificate))
        }
        try r.expectEnd()
    }

    private static func readBytes(_ r: inout ByteReader, _ field: String, max: Int) throws(FrameError) -> ArraySlice<UInt8> {
        let n = Int(try r.readUInt16(field))
        guard (1...max).contains(n) else { throw FrameError(.malformedPayload, "\(field) of \(n) bytes (1…\(max))") }
        return try r.take(n, field)
    }
}
