import CairnCore
import Foundation

/// How the CLI writes quantities for people: binary byte units, rates, durations and ages.
/// JSON output carries the raw numbers instead.
public enum Units {
    /// "512 B", "1.0 GiB" (the same as `cairn volume inspect` always printed).
    public static func bytes(_ n: Int64) -> String { ResyncProgress.bytes(n) }

    /// "48.0 MiB/s"; "0 B/s" for nothing moving.
    public static func rate(_ bytesPerSecond: Double) -> String {
        guard bytesPerSecond.isFinite, bytesPerSecond > 0 else { return "0 B/s" }
        return bytes(Int64(bytesPerSecond.rounded())) + "/s"
    }

    /// "0s", "45s", "2m05s", "1h02m", "3d04h": the two largest units, for ETAs and ages.
    public static func duration(_ seconds: Double) -> String {
        guard seconds.isFinite else { return "-" }
        let s = max(0, Int(seconds.rounded()))
        switch s {
        case ..<60: return "\(s)s"
        case ..<3600: return "\(s / 60)m" + pad(s % 60) + "s"
        case ..<86400: return "\(s / 3600)h" + pad(s % 3600 / 60) + "m"
        default: return "\(s / 86400)d" + pad(s % 86400 / 3600) + "h"
        }
    }

    /// How long ago `date` was, as `duration`; a date in the future (a clock ahead) reads "0s".
    public static func age(of date: Date, now: Date = Date()) -> String {
        duration(now.timeIntervalSince(date))
    }

    /// "42.5%".
    public static func percent(_ value: Double) -> String {
        String(format: "%.1f%%", min(100, max(0, value)))
    }

    private static func pad(_ n: Int) -> String { n < 10 ? "0\(n)" : "\(n)" }
}
