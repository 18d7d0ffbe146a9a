import Foundation

/// The mutable parameters Cairn enforces: `iopsLimit` (I/O operations per second) and
/// `bandwidthLimit` (bytes per second, with an optional K/M/G/Ki/Mi/Gi suffix); "0" removes a
/// limit. Anything else is INVALID_ARGUMENT.
public struct QoSLimits: Equatable, Sendable {
    public static let known = ["iopsLimit", "bandwidthLimit"]
    public var iops: UInt64?
    public var bytesPerSecond: UInt64?
    /// Normalised values as stored in the volume's record.
    public var stored: [String: String] = [:]

    public init(_ raw: [String: String]) throws {
        for (key, value) in raw.sorted(by: { $0.key < $1.key }) {
            switch key {
            case "iopsLimit":
                guard let n = UInt64(value) else {
                    throw CairnError.invalidArgument("mutable parameter iopsLimit=\"\(Validate.printable(value))\" must be a whole number of I/O operations per second (0: no limit)")
                }
                iops = n
                stored[key] = String(n)
            case "bandwidthLimit":
                guard let n = Self.bytes(value) else {
                    throw CairnError.invalidArgument("mutable parameter bandwidthLimit=\"\(Validate.printable(value))\" must be bytes per second, e.g. 104857600 or 100Mi (0: no limit)")
                }
                bytesPerSecond = n
                stored[key] = String(n)
            default:
                throw CairnError.invalidArgument(
                    "unknown mutable parameter \"\(Validate.printable(key))\"; Cairn accepts \(Self.known.joined(separator: ", "))")
            }
        }
    }

    /// The limits recorded on a volume (missing or unparsable values: no limit).
    public init(volume: VolumeRecord) {
        let raw = volume.mutableParameters ?? [:]
        iops = raw["iopsLimit"].flatMap(UInt64.init)
        bytesPerSecond = raw["bandwidthLimit"].flatMap(UInt64.init)
        stored = raw
    }

    static func bytes(_ text: String) -> UInt64? {
        let units: [(String, UInt64)] = [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("K", 1000), ("M", 1_000_000), ("G", 1_000_000_000)]
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            guard let n = UInt64(text.dropLast(suffix.count)) else { return nil }
            let (product, overflow) = n.multipliedReportingOverflow(by: factor)
            return overflow ? nil : product
        }
        return UInt64(text)
    }
}

/// One machine (`--role all`): the node side that enforces a volume's QoS limits on the device
/// it is staged on. The controller and the node are one process there, so ControllerModifyVolume
/// reaches the staged device directly through this, right after it recorded the new limits.
public protocol LocalLimitEnforcement: Sendable {
    /// Applies the limits recorded on the volume to its device where it is staged on this
    /// machine. Returns false when it is not staged here (NodeStage applies them then).
    func applyRecordedLimits(volumeID: String) async throws -> Bool
}
