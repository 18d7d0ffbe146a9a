import CairnCore
import Foundation
import Synchronization

// QoS of a one-machine volume on a cgroup v1 machine: the blkio controller's throttle files
// (`blkio.throttle.{read,write}_{iops,bps}_device`, one "MAJ:MIN VALUE" rule per device; writing
// "MAJ:MIN 0" removes it). They limit the same four things as v2's io.max, with one difference
// that shapes this file: **v1 throttling is not hierarchical**. A rule holds only for the tasks
// that are directly in its cgroup — the kernel treats every v1 cgroup as a sibling of every other
// (blk-throttle.c: parent_sq is the device's root queue unless on the default hierarchy) — so a
// rule at kubepods alone would limit nobody: the workloads run in pod and container cgroups
// below it. Cairn therefore writes each volume's rule into the cgroup named (`--qos-cgroup`) and
// into **every cgroup below it**, and `reconcile()`, called every couple of seconds while any
// rule is set, copies the rules of the named cgroup into cgroups created since (a container that
// starts after its volume was staged). Each cgroup keeps its own count: a volume's limit holds
// per cgroup, not for all of them together (docs/engine.md, "QoS on one machine").

/// The four files, each holding one of IOMaxLine's limits.
private var blkioFiles: [(name: String, limit: WritableKeyPath<IOMaxLine, UInt64?>)] { [
    ("blkio.throttle.read_bps_device", \.readBytesPerSecond),
    ("blkio.throttle.write_bps_device", \.writeBytesPerSecond),
    ("blkio.throttle.read_iops_device", \.readIOPS),
    ("blkio.throttle.write_iops_device", \.writeIOPS),
] }

/// Reads and writes cgroup files: the kernel's, or (unit tests) a fake tree of plain files.
public protocol CgroupFiles: Sendable {
    func read(_ path: String) throws -> String
    /// One write(2) of `text`: the kernel takes each write as one command.
    func write(_ text: String, to path: String) throws
}

/// The kernel's cgroup files.
public struct KernelCgroupFiles: CgroupFiles {
    public init() {}

    public func read(_ path: String) throws -> String { try ProcFile.text(path) }

    public func write(_ text: String, to path: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else {
            throw SystemError("write \"\(text)\" to \(path)", errno: written < 0 ? errno : EIO)
        }
    }
}

/// The blkio throttle rules of one cgroup v1 subtree (`--qos-cgroup`): the named cgroup holds the
/// rules of record, and every cgroup below it a copy.
public final class CgroupBlkioThrottle: CgroupThrottle {
    /// The named cgroup, e.g. /sys/fs/cgroup/blkio/kubepods.
    public let cgroup: String
    let files: any CgroupFiles
    /// Apply, remove and reconcile one at a time: a reconcile that read the rules before a
    /// remove must not copy a removed rule into a new cgroup after it.
    private let serial = Mutex(())

    public init(cgroup: String, files: any CgroupFiles = KernelCgroupFiles()) {
        self.cgroup = cgroup
        self.files = files
    }

    public var location: String { cgroup + "/blkio.throttle.*_device (and every cgroup below it)" }
    public var mechanism: String { "cgroup v1 blkio throttle" }
    public var needsReconciling: Bool { true }

    @discardableResult
    public func apply(_ limits: QoSLimits, device: String) throws -> IOMaxLine {
        let (major, minor) = try CgroupIOMax.deviceNumber(device)
        return try apply(limits, major: major, minor: minor)
    }

    /// Writes the device's rules to the named cgroup, then to every cgroup below it.
    @discardableResult
    public func apply(_ limits: QoSLimits, major: UInt32, minor: UInt32) throws -> IOMaxLine {
        let line = IOMaxLine(major: major, minor: minor, limits: limits)
        try serial.withLock { _ in try writeEverywhere(line) }
        return line
    }

    public func remove(device: String) throws {
        // A cgroup that was removed took its rules with it.
        guard FileManager.default.fileExists(atPath: cgroup) else { return }
        let (major, minor) = try CgroupIOMax.deviceNumber(device)
        try remove(major: major, minor: minor)
    }

    public func remove(major: UInt32, minor: UInt32) throws {
        try serial.withLock { _ in try writeEverywhere(IOMaxLine(major: major, minor: minor)) }
    }

    public func current(device: String) throws -> IOMaxLine? {
        let (major, minor) = try CgroupIOMax.deviceNumber(device)
        return try current(major: major, minor: minor)
    }

    /// The named cgroup's rules for MAJ:MIN, nil when it has none.
    public func current(major: UInt32, minor: UInt32) throws -> IOMaxLine? {
        try rules(of: cgroup).first { $0.major == major && $0.minor == minor }
    }

    /// Copies the named cgroup's rules into the cgroups below it that lack them or differ.
    @discardableResult
    public func reconcile() throws -> Int {
        try serial.withLock { _ in
            let wanted = try rules(of: cgroup)
            guard !wanted.isEmpty else { return 0 }
            var written = 0
            for child in descendants() {
                // A cgroup removed meanwhile (its container ended) needs nothing.
                guard let have = try? rules(of: child) else { continue }
                for line in wanted where !have.contains(line) {
                    if (try? write(line, to: child)) != nil { written += 1 }
                }
            }
            return written
        }
    }

    // MARK: Files

    /// Writes every limit of `line` (0 where it has none, which removes that rule) to the named
    /// cgroup — whose failure fails the call — and to every cgroup below it, skipping those
    /// removed meanwhile.
    private func writeEverywhere(_ line: IOMaxLine) throws {
        try write(line, to: cgroup)
        for child in descendants() {
            do {
                try write(line, to: child)
            } catch {
                if FileManager.default.fileExists(atPath: child) { throw error }
            }
        }
    }

    private func write(_ line: IOMaxLine, to directory: String) throws {
        for file in blkioFiles {
            try files.write("\(line.device) \(line[keyPath: file.limit] ?? 0)", to: directory + "/" + file.name)
        }
    }

    /// The rules of one cgroup, one IOMaxLine per device that has any.
    func rules(of directory: String) throws -> [IOMaxLine] {
        var lines: [String: IOMaxLine] = [:]
        var order: [String] = []
        for file in blkioFiles {
            for rule in try files.read(directory + "/" + file.name).split(separator: "\n") {
                let fields = rule.split(separator: " ")
                guard fields.count == 2, let value = UInt64(fields[1]) else { continue }
                let numbers = fields[0].split(separator: ":")
                guard numbers.count == 2, let major = UInt32(numbers[0]), let minor = UInt32(numbers[1]) else { continue }
                let key = String(fields[0])
                if lines[key] == nil { order.append(key); lines[key] = IOMaxLine(major: major, minor: minor) }
                lines[key]![keyPath: file.limit] = value
            }
        }
        return order.compactMap { lines[$0] }
    }

    /// Every cgroup below the named one, parents before their children.
    func descendants() -> [String] {
        var found: [String] = []
        var pending = [cgroup]
        while let directory = pending.popLast() {
            guard let dir = opendir(directory) else { continue }
            defer { closedir(dir) }
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard name != ".", name != ".." else { continue }
                let path = directory + "/" + name
                let isDirectory: Bool
                if entry.pointee.d_type == UInt8(DT_DIR) {
                    isDirectory = true
                } else if entry.pointee.d_type == UInt8(DT_UNKNOWN) {
                    var st = stat()
                    isDirectory = lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
                } else {
                    isDirectory = false
                }
                guard isDirectory else { continue }
                found.append(path)
                pending.append(path)
            }
        }
        return found
    }
}
