/// A volume's fencing epoch: raised on every attachment, carried by every replica request, and
/// persisted by each replica, which refuses requests older than the newest it saw. One type for
/// the records, the stores and the backing (the data protocol carries its `rawValue`, a u64).
///
/// Encoded as a bare number (etcd JSON, the SQLite store's JSON), exactly as the `Int64` it
/// replaces: existing records decode unchanged (an epoch was never negative).
public struct FencingEpoch: RawRepresentable, Sendable, Hashable, Comparable, Codable, CustomStringConvertible,
    ExpressibleByIntegerLiteral {
    public var rawValue: UInt64

    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public init(integerLiteral value: UInt64) { self.rawValue = value }

    /// Before any attachment.
    public static let zero = FencingEpoch(0)

    /// The epoch the next attachment takes (it fences every holder of this one).
    public var next: FencingEpoch { FencingEpoch(rawValue + 1) }

    public static func < (a: FencingEpoch, b: FencingEpoch) -> Bool { a.rawValue < b.rawValue }

    public init(from decoder: any Decoder) throws {
        rawValue = try decoder.singleValueContainer().decode(UInt64.self)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(rawValue)
    }

    public var description: String { String(rawValue) }
}
