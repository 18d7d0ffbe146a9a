import CairnCore
import Foundation

// QoS of a one-machine volume: cgroup v2 `io.max` on the volume's loop device.
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

/// Limits the I/O of a block device for the machine's workloads. One Linux implementation
/// (`CgroupIOMax`); the unit tests use a fake.
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
}

/// `io.max` of one cgroup v2 directory (`--qos-cgroup`).
public struct CgroupIOMax: IOThrottle {
    /// The cgroup directory, e.g. /sys/fs/cgroup/kubepods.slice.
    public let cgroup: String

    public init(cgroup: String) {
        self.cgroup = cgroup
    }

    public var location: String { cgroup + "/io.max" }

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
    static func deviceNumber(_ device: String) throws -> (UInt32, UInt32) {
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

// MARK: Whether limits can be enforced here

extension CgroupIOMax {
    /// The workload cgroups looked for, in order, when `--qos-cgroup` names none: Kubernetes
    /// with the systemd cgroup driver, with the cgroupfs driver, and Mesos's cgroups isolator.
    public static let workloadCgroups = ["kubepods.slice", "kubepods", "mesos"]

    /// What start-up found: a throttle, or why ControllerModifyVolume cannot be offered.
    public enum Availability: Sendable {
        case available(CgroupIOMax)
        case unavailable(String)
    }

    /// Decides whether one-machine QoS can be enforced: cgroup v2 mounted, its io controller
    /// available, and the workloads' cgroup (`setting`: a path, absolute or relative to the
    /// cgroup v2 mount; nil or "auto" to look for `workloadCgroups`; "none" to turn it off)
    /// existing with io.max writable. `mounts` is the machine's mount table.
    public static func locate(_ setting: String?, mounts: [MountInfo]) -> Availability {
        if setting == "none" { return .unavailable("--qos-cgroup none") }
        let v2 = mounts.filter { $0.fsType == "cgroup2" }.map(\.mountPoint)
        guard let root = v2.first(where: { $0 == "/sys/fs/cgroup" }) ?? v2.first else {
            return .unavailable("cgroup v2 is not mounted (no cgroup2 filesystem in the mount table); io.max needs the unified hierarchy (boot with systemd.unified_cgroup_hierarchy=1)")
        }
        let controllers = ((try? ProcFile.text(root + "/cgroup.controllers")) ?? "").split(whereSeparator: \.isWhitespace)
        guard controllers.contains("io") else {
            if let v1 = mounts.first(where: { $0.fsType == "cgroup" && $0.superOptions.contains("blkio") }) {
                return .unavailable("the io controller is bound to cgroup v1 (blkio at \(v1.mountPoint)), so the cgroup v2 hierarchy at \(root) cannot limit devices; run the machine on cgroup v2 alone (boot with systemd.unified_cgroup_hierarchy=1), or unmount the v1 blkio hierarchy")
            }
            return .unavailable("the cgroup v2 hierarchy at \(root) has no io controller (cgroup.controllers: \(controllers.joined(separator: " "))); the kernel needs CONFIG_BLK_CGROUP and CONFIG_BLK_DEV_THROTTLING")
        }
        let cgroup: String
        switch setting {
        case nil, "auto":
            guard let found = workloadCgroups.map({ root + "/" + $0 }).first(where: isDirectory) else {
                return .unavailable("no --qos-cgroup given and none of \(workloadCgroups.map { root + "/" + $0 }.joined(separator: ", ")) exists; pass --qos-cgroup PATH, the cgroup under which the workloads run")
            }
            cgroup = found
        case let path?:
            let absolute = path.hasPrefix("/") ? path : root + "/" + path
            let trimmed = absolute.count > 1 && absolute.hasSuffix("/") ? String(absolute.dropLast()) : absolute
            guard trimmed.hasPrefix(root + "/") else {
                return .unavailable(trimmed == root
                    ? "--qos-cgroup \(path) is the root cgroup, which has no io.max (limits exist only below it); name the cgroup under which the workloads run, e.g. \(root)/kubepods.slice"
                    : "--qos-cgroup \(path) is not under the cgroup v2 mount \(root)")
            }
            guard isDirectory(trimmed) else {
                return .unavailable("--qos-cgroup \(trimmed) does not exist; create it or name the cgroup under which the workloads run")
            }
            cgroup = trimmed
        }
        let ioMax = cgroup + "/io.max"
        guard FileManager.default.fileExists(atPath: ioMax) else {
            let parent = (cgroup as NSString).deletingLastPathComponent
            return .unavailable("the io controller is not enabled for \(cgroup) (it has no io.max): add it to its parent's controllers (echo +io > \(parent)/cgroup.subtree_control; under systemd, IOAccounting=yes on the parent slice)")
        }
        let fd = open(ioMax, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            return .unavailable("\(ioMax) is not writable (\(String(cString: strerror(errno)))); the process that stages volumes must run as root in the host's cgroup namespace, with the host's /sys/fs/cgroup")
        }
        close(fd)
        return .available(CgroupIOMax(cgroup: cgroup))
    }

    private static func isDirectory(_ path: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue
    }
}
