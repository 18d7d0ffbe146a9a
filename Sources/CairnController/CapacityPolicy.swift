import CairnCore

/// How a CSI capacity range becomes a volume size.
///
/// Sizes are whole MiB (Mesos sizes disks in MiB; the loop device wants 512-byte multiples).
/// Without a range a volume is 1 GiB. xfs refuses filesystems under 300 MiB, so an xfs volume
/// is at least that.
public struct CapacityPolicy: Sendable {
    public static let mib: Int64 = 1 << 20
    public static let defaultBytes: Int64 = 1 << 30
    public static let minimumBytes: Int64 = 16 * mib
    public static let minimumXFSBytes: Int64 = 300 * mib

    /// Total bytes the pool may provision.
    public var poolBytes: Int64

    public init(poolBytes: Int64) {
        self.poolBytes = poolBytes
    }

    public static func minimum(fsType: String?) -> Int64 {
        fsType == "xfs" ? minimumXFSBytes : minimumBytes
    }

    /// The size to provision for `required`/`limit` (0 = unset), or the error CSI prescribes.
    public func size(required: Int64, limit: Int64, fsType: String?) throws -> Int64 {
        if required < 0 { throw CairnError.invalidArgument("capacity_range.required_bytes must not be negative") }
        if limit < 0 { throw CairnError.invalidArgument("capacity_range.limit_bytes must not be negative") }
        if limit > 0 && required > limit {
            throw CairnError.invalidArgument("capacity_range.required_bytes (\(required)) exceeds limit_bytes (\(limit))")
        }
        let floor = Self.minimum(fsType: fsType)
        var size = required == 0 ? Self.defaultBytes : required
        if limit > 0 && required == 0 { size = min(size, limit) }
        size = max(size, floor)
        size = (size + Self.mib - 1) / Self.mib * Self.mib
        if limit > 0 && size > limit {
            throw CairnError.outOfRange(
                "capacity_range.limit_bytes \(limit) is below the smallest volume Cairn can make here (\(size) bytes: volumes are whole MiB, at least \(floor / Self.mib) MiB\(fsType == "xfs" ? " for xfs" : ""))")
        }
        if size > poolBytes {
            throw CairnError.outOfRange("\(size) bytes is more than this pool can ever hold (\(poolBytes) bytes)")
        }
        return size
    }

    public func fits(_ bytes: Int64, provisioned: Int64) -> Bool {
        provisioned + bytes <= poolBytes
    }
}
