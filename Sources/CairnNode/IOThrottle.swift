import CairnCore
import Foundation

// QoS of a one-machine volume: the kernel's block throttle on the volume's loop device — cgroup
// v2 `io.max` here, cgroup v1 `blkio.throttle.*` in BlkioThrottle.swift, which one decided at
// start-up by QoSCgroup.swift.
//
// A one-machine volume is a loop device straight on a file — no engine whose I/O path could
// count operations. The kernel's block throttle can: `io.max` in a cgroup limits, per device
// (MAJ:MIN), the I/O of every process in that cgroup *and its descendants* (cgroup v2's
// throttling is hierarchical). Cairn writes the line at one ancestor cgroup of the workloads
// (`--qos-cgroup`: kubepods.slice, kubepods, mesos), so whichever pod or container uses the
// volume is limited, and the limit is the volume's — all its users together.
//
// What this file may not touch: the records (NodeService owns them). It is told which device
// and which limits.

/// One line of a cgroup's `io.max`: the limits of one block device, nil meaning `max` (none).
/// (cgroup v1 keeps the same four limits in four files, `blkio.throttle.{read,write}_{iops,bps}_device`;
/// BlkioThrottle reads and writes them as this too.)
///
/// `io.max` cannot express a combined limit of reads and writes: it has one per direction. A
/// volume's `iopsLimit` becomes the same limit on each direction (`riops` and `wiops`), and
/// `bandwidthLimit` the same on `rbps` and `wbps` — a workload that only writes (or only reads)
/// gets exactly the limit; one that does both may reach up to twice it in total. (The replicated
/// engine counts both directions against one bucket; docs/engine.md, "QoS".)
public struct IOMaxLine: Equatable, Sendable, CustomStringConvertible {
    public var major: UInt32
    public var minor: UInt32
    public var readIOPS: UInt64?
    public var writeIOPS: UInt64?
    public var readBytesPerSecond: UInt64?
    public var writeBytesPerSecond: UInt64?

    public init(major: UInt32, minor: UInt32, readIOPS: UInt64? = nil, writeIOPS: UInt64? = nil,
                readBytesPerSecond: UInt64? = nil, writeBytesPerSecond: UInt64? = nil) {
        self.major = major
        self.minor = minor
        self.readIOPS = readIOPS
        self.writeIOPS = writeIOPS
        self.readBytesPerSecond = readBytesPerSecond
        self.writeBytesPerSecond = writeBytesPerSecond
    }

    /// The line that enforces a volume's limits on device MAJ:MIN (0 or absent: none).
    public init(major: UInt32, minor: UInt32, limits: QoSLimits) {
        let iops = limits.iops.flatMap { $0 == 0 ? nil : $0 }
        let bytes = limits.bytesPerSecond.flatMap { $0 == 0 ? nil : $0 }
        self.init(major: major, minor: minor, readIOPS: iops, writeIOPS: iops,
                  readBytesPerSecond: bytes, writeBytesPerSecond: bytes)
    }

    /// No limit at all: writing this line removes the device's entry from `io.max`.
    public var isUnlimited: Bool {
        readIOPS == nil && writeIOPS == nil && readBytesPerSecond == nil && writeBytesPerSecond == nil
    }

    public var device: String { "\(major):\(minor)" }

    /// The form written to `io.max`: every key, so that a write also lifts what it leaves out.
    public var description: String {
        func value(_ v: UInt64?) -> String { v.map(String.init) ?? "max" }
        return "\(device) rbps=\(value(readBytesPerSecond)) wbps=\(value(writeBytesPerSecond)) riops=\(value(readIOPS)) wiops=\(value(writeIOPS))"
    }

    /// Parses one line as the kernel prints it (`8:16 rbps=2097152 wbps=max riops=max wiops=120`;
    /// keys it does not know, such as a future one, are ignored). Nil for anything else.
    public init?(parsing line: Substring) {
        let fields = line.split(separator: " ")
        guard let first = fields.first else { return nil }
        let numbers = first.split(separator: ":")
        guard numbers.count == 2, let major = UInt32(numbers[0]), let minor = UInt32(numbers[1]) else { return nil }
        self.init(major: major, minor: minor)
        for field in fields.dropFirst() {
            let pair = field.split(separator: "=", maxSplits: 1)
            guard pair.count == 2 else { return nil }
            let limit: UInt64?
            if pair[1] == "max" { limit = nil } else if let n = UInt64(pair[1]) { limit = n } else { return nil }
            switch pair[0] {
            case "rbps": readBytesPerSecond = limit
            case "wbps": writeBytesPerSecond = limit
            case "riops": readIOPS = limit
            case "wiops": writeIOPS = limit
            default: continue
            }
        }
    }

    /// Every line of an `io.max` file.
    public static func parse(_ contents: String) -> [IOMaxLine] {
        contents.split(separator: "\n").compactMap { IOMaxLine(parsing: $0) }
    }
}

/// Limits the I/O of a block device for the machine's workloads. Two Linux implementations
/// (`CgroupIOMax`, cgroup v2; `CgroupBlkioThrottle`, cgroup v1); the unit tests use a fake.
public protocol IOThrottle: Sendable {
    /// Where the limits are written, for logs and messages (e.g. the cgroup's io.max).
    var location: String { get }
    /// Sets `device`'s limits to `limits` (absent or 0: none; all absent removes its entry).
    /// Returns the line written.
    @discardableResult
    func apply(_ limits: QoSLimits, device: String) throws -> IOMaxLine
    /// Removes every limit of `device` (before it is detached: a loop device is reused by the
    /// next volume attached, which must not inherit them). No error when it has none.
    func remove(device: String) throws
    /// The limits `device` has now, nil when none.
    func current(device: String) throws -> IOMaxLine?
    /// Whether `reconcile()` has work to do now and then (cgroup v1: limits are per cgroup, so
    /// cgroups created after a limit was set need their copy).
    var needsReconciling: Bool { get }
    /// Brings cgroups created since the last apply up to date; returns how many limits it wrote.
    @discardableResult
    func reconcile() throws -> Int
}

extension IOThrottle {
    public var needsReconciling: Bool { false }
    @discardableResult
    public func reconcile() throws -> Int { 0 }
}

/// A throttle bound to one cgroup, as start-up found it (QoSCgroup.locate).
public protocol CgroupThrottle: IOThrottle {
    /// The cgroup directory the limits are written at.
    var cgroup: String { get }
    /// How, for the start-up log: "cgroup v2 io.max" or "cgroup v1 blkio throttle".
    var mechanism: String { get }
}

/// `io.max` of one cgroup v2 directory (`--qos-cgroup`). Throttling in v2 is hierarchical: the
/// line holds for every process below the cgroup, all together.
public struct CgroupIOMax: CgroupThrottle {
    /// The cgroup directory, e.g. /sys/fs/cgroup/kubepods.slice.
    public let cgroup: String

    public init(cgroup: String) {
        self.cgroup = cgroup
    }

    public var location: String { cgroup + "/io.max" }
    public var mechanism: String { "cgroup v2 io.max" }

    @discardableResult
    public func apply(_ limits: QoSLimits, device: String) throws -> IOMaxLine {
        let (major, minor) = try Self.deviceNumber(device)
        let line = IOMaxLine(major: major, minor: minor, limits: limits)
        try write(line)
        return line
    }

    public func remove(device: String) throws {
        // A cgroup that was removed took its limits with it.
        guard FileManager.default.fileExists(atPath: location) else { return }
        let (major, minor) = try Self.deviceNumber(device)
        try write(IOMaxLine(major: major, minor: minor))
    }

    public func current(device: String) throws -> IOMaxLine? {
        let (major, minor) = try Self.deviceNumber(device)
        let text = try ProcFile.text(location)
        return IOMaxLine.parse(text).first { $0.major == major && $0.minor == minor }
    }

    /// One write(2) per line: the kernel parses each write as one device's settings.
    private func write(_ line: IOMaxLine) throws {
        let path = location
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path) to limit device \(line.device)", errno: errno) }
        defer { close(fd) }
        let bytes = Array(line.description.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else {
            throw SystemError("write \"\(line)\" to \(path)", errno: written < 0 ? errno : EIO)
        }
    }

    /// The MAJ:MIN of a block device node.
    public static func deviceNumber(_ device: String) throws -> (UInt32, UInt32) {
        var st = stat()
        guard stat(device, &st) == 0 else { throw SystemError("stat \(device)", errno: errno) }
        guard (st.st_mode & S_IFMT) == S_IFBLK else {
            throw CairnError.internal("\(device) is not a block device; cannot limit its I/O")
        }
        let dev = UInt64(st.st_rdev)
        // glibc's gnu_dev_major/minor encoding (sys/sysmacros.h).
        let major = UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff)))
        let minor = UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff)))
        return (major, minor)
    }
}
