import Foundation

/// `cairn doctor`'s findings: one per check, with what to do about it. The probes live with the
/// command (they read this machine); what they found, how it prints and the exit status are here.
public struct DoctorCheck: Codable, Sendable, Equatable {
    public enum Status: String, Codable, Sendable {
        case ok, warn, fail

        /// The column as printed: FAIL stands out.
        public var label: String {
            switch self {
            case .ok: "ok"
            case .warn: "warn"
            case .fail: "FAIL"
            }
        }
    }

    /// Short and stable: "kernel", "fuse", "fuse.resend", "tool.mkfs.ext4", "etcd", "clock.etcd"…
    public var name: String
    public var status: Status
    /// What was found.
    public var detail: String
    /// What to do (nil when ok).
    public var fix: String?

    public init(_ name: String, _ status: Status, _ detail: String, fix: String? = nil) {
        self.name = name
        self.status = status
        self.detail = detail
        self.fix = fix
    }

    /// "FAIL  loop  no /dev/loop-control — fix: modprobe loop".
    public func line(nameWidth: Int) -> String {
        let label = status.label + String(repeating: " ", count: 4 - status.label.count)
        let padded = name + String(repeating: " ", count: max(0, nameWidth - name.count))
        return "\(label)  \(padded)  \(detail)" + (fix.map { " — fix: \($0)" } ?? "")
    }
}

public struct DoctorReport: Codable, Sendable, Equatable {
    public var checks: [DoctorCheck]
    public var ok: Bool { !checks.contains { $0.status == .fail } }

    public init(checks: [DoctorCheck]) {
        self.checks = checks
    }

    /// One line per check, then a summary line.
    public func render() -> String {
        let width = checks.map(\.name.count).max() ?? 0
        let fails = checks.filter { $0.status == .fail }.count
        let warns = checks.filter { $0.status == .warn }.count
        return checks.map { $0.line(nameWidth: width) + "\n" }.joined()
            + (fails == 0 ? "ready: \(warns) warning\(warns == 1 ? "" : "s")\n"
                          : "not ready: \(fails) check\(fails == 1 ? "" : "s") failed, \(warns) warning\(warns == 1 ? "" : "s")\n")
    }

    private enum CodingKeys: String, CodingKey { case checks, ok }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(checks, forKey: .checks)
        try c.encode(ok, forKey: .ok)
    }

    public init(from decoder: any Decoder) throws {
        checks = try decoder.container(keyedBy: CodingKeys.self).decode([DoctorCheck].self, forKey: .checks)
    }
}

/// The judgements the probes share.
public enum DoctorRules {
    /// Clock skew between this machine and another clock (HTTP Date: whole seconds). Leases and
    /// fencing do not depend on it (etcd times leases itself), but progress times, ETAs, log
    /// correlation and TLS certificate validity do.
    public static func clockSkew(_ seconds: Double, against: String) -> DoctorCheck {
        let magnitude = abs(seconds)
        let detail = String(format: "%+.1f s against %@ (HTTP Date, 1 s resolution)", seconds, against)
        if magnitude <= 2 { return DoctorCheck("clock", .ok, detail) }
        let fix = "synchronise the clocks (chrony or systemd-timesyncd on every machine)"
        return DoctorCheck("clock", magnitude <= 30 ? .warn : .fail, detail, fix: fix)
    }

    /// Free space under the data directory.
    public static func freeSpace(path: String, free: Int64, total: Int64) -> DoctorCheck {
        let detail = "\(Units.bytes(free)) free of \(Units.bytes(total)) at \(path)"
        if free < 1 << 30 {
            return DoctorCheck("data-dir", .fail, detail, fix: "free space or point --data-dir at a larger filesystem: volumes and replicas live there")
        }
        if total > 0, Double(free) / Double(total) < 0.1 {
            return DoctorCheck("data-dir", .warn, detail, fix: "less than 10% is free; free space or use a larger filesystem before creating volumes")
        }
        return DoctorCheck("data-dir", .ok, detail)
    }

    /// A certificate this machine presents (e.g. `--etcd-cert`): expired fails, under 30 days warns.
    public static func certificate(_ name: String, path: String, notAfter: Date, now: Date = Date()) -> DoctorCheck {
        let left = notAfter.timeIntervalSince(now)
        let detail = "\(path) valid until \(notAfter.formatted(.iso8601))"
        let fix = "issue a new certificate (e.g. `cairn cert issue NAME --ca-dir CA_DIR --out DIR`) into the same path"
        if left <= 0 { return DoctorCheck(name, .fail, detail + ": expired", fix: fix) }
        if left < 30 * 86400 { return DoctorCheck(name, .warn, detail + ": expires in \(Units.duration(left))", fix: fix) }
        return DoctorCheck(name, .ok, detail + " (\(Units.duration(left)) left)")
    }

    /// The first line of a tool's version output, trimmed ("mke2fs 1.47.0 (5-Feb-2023)").
    public static func versionLine(_ output: String) -> String {
        let lines = output.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
        let line = lines.first { $0.rangeOfCharacter(from: .decimalDigits) != nil && !$0.lowercased().hasPrefix("usage") } ?? lines.first ?? ""
        return line.isEmpty ? "version unknown" : line
    }

    /// "Date: Thu, 03 Dec 2026 00:41:07 GMT" in an HTTP response's headers.
    public static func httpDate(in headers: String) -> Date? {
        for line in headers.split(whereSeparator: \.isNewline) {
            let parts = line.split(separator: ":", maxSplits: 1)
            guard parts.count == 2, parts[0].lowercased() == "date" else { continue }
            let value = parts[1].trimmingCharacters(in: .whitespaces)
            let formatter = DateFormatter()
            formatter.locale = Locale(identifier: "en_US_POSIX")
            formatter.timeZone = TimeZone(identifier: "GMT")
            formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
            return formatter.date(from: value)
        }
        return nil
    }
}
