import CairnCore
import Foundation

// Start-up: can one machine enforce QoS limits, and with what? The io controller is bound to one
// cgroup hierarchy at a time — cgroup v2 (`io` in the unified root's cgroup.controllers: io.max,
// IOThrottle.swift) or cgroup v1 (`blkio` mounted, usually at /sys/fs/cgroup/blkio: the throttle
// files, BlkioThrottle.swift) — and `--qos-cgroup` names a cgroup in that hierarchy.

public enum QoSCgroup {
    /// The workload cgroups looked for, in order, when `--qos-cgroup` names none: Kubernetes
    /// with the systemd cgroup driver, with the cgroupfs driver, and Mesos's cgroups isolator.
    public static let workloadCgroups = ["kubepods.slice", "kubepods", "mesos"]

    /// What start-up found: a throttle, or why ControllerModifyVolume cannot be offered.
    public enum Availability: Sendable {
        case available(any CgroupThrottle)
        case unavailable(String)
    }

    /// Decides whether one-machine QoS can be enforced, and how. `setting` is `--qos-cgroup`:
    /// nil or "auto" looks for `workloadCgroups` in the hierarchy that has the io controller;
    /// "none" turns it off; an absolute path names a cgroup under the cgroup v2 mount or the
    /// cgroup v1 blkio mount (which one decides the mechanism); a relative path is resolved
    /// against the hierarchy that has the io controller (v2 when its root lists `io`, else the
    /// v1 blkio mount). `mounts` is the machine's mount table.
    ///
    /// The root cgroup: v2 has no io.max there, so never; v1's root does have the throttle files
    /// and Cairn's rules then reach every cgroup of the machine — allowed, but only when named
    /// (the mount point itself), never found by `auto`.
    public static func locate(_ setting: String?, mounts: [MountInfo]) -> Availability {
        if setting == "none" { return .unavailable("--qos-cgroup none") }
        if let path = setting, path.split(separator: "/").contains("..") {
            return .unavailable("--qos-cgroup \(path) has a .. component; name the cgroup without one")
        }
        let v2 = mounts.filter { $0.fsType == "cgroup2" }.map(\.mountPoint)
        let v2Root = v2.first(where: { $0 == "/sys/fs/cgroup" }) ?? v2.first
        let v2Controllers = v2Root.map { ((try? ProcFile.text($0 + "/cgroup.controllers")) ?? "").split(whereSeparator: \.isWhitespace).map(String.init) } ?? []
        let v1 = mounts.first { $0.fsType == "cgroup" && $0.superOptions.contains("blkio") }?.mountPoint

        // An absolute path says which hierarchy.
        if let path = setting, path != "auto", path.hasPrefix("/") {
            let trimmed = trimSlash(path)
            if let v1, trimmed == v1 || trimmed.hasPrefix(v1 + "/") { return blkio(trimmed, mount: v1, named: path) }
            if let v2Root, trimmed == v2Root || trimmed.hasPrefix(v2Root + "/") {
                return ioMax(setting, root: v2Root, controllers: v2Controllers, v1: v1)
            }
            let mounts = [v2Root.map { "the cgroup v2 mount \($0)" }, v1.map { "the cgroup v1 blkio mount \($0)" }].compactMap { $0 }
            return .unavailable("--qos-cgroup \(path) is not under \(mounts.isEmpty ? "any cgroup mount (neither cgroup v2 nor cgroup v1 blkio is mounted)" : mounts.joined(separator: " or "))")
        }
        // auto or relative: the hierarchy with the io controller.
        if let v2Root, v2Controllers.contains("io") { return ioMax(setting, root: v2Root, controllers: v2Controllers, v1: v1) }
        if let v1 {
            switch setting {
            case nil, "auto":
                guard let found = workloadCgroups.map({ v1 + "/" + $0 }).first(where: isDirectory) else {
                    return .unavailable("the io controller is cgroup v1 blkio at \(v1), and no --qos-cgroup was given and none of \(workloadCgroups.map { v1 + "/" + $0 }.joined(separator: ", ")) exists; pass --qos-cgroup PATH, the cgroup under which the workloads run")
                }
                return blkio(found, mount: v1, named: nil)
            case let path?:
                return blkio(trimSlash(v1 + "/" + path), mount: v1, named: path)
            }
        }
        return ioMax(setting, root: v2Root, controllers: v2Controllers, v1: nil)
    }

    // MARK: cgroup v2

    private static func ioMax(_ setting: String?, root: String?, controllers: [String], v1: String?) -> Availability {
        guard let root else {
            return .unavailable("neither cgroup v2 nor a cgroup v1 blkio hierarchy is mounted; limits need the kernel's block throttle in one of them")
        }
        guard controllers.contains("io") else {
            if let v1 {
                return .unavailable("--qos-cgroup \(setting ?? "") is in the cgroup v2 hierarchy at \(root), which has no io controller (cgroup.controllers: \(controllers.joined(separator: " "))): the io controller is cgroup v1 blkio at \(v1); name a cgroup there, absolute (\(v1)/…) or relative")
            }
            return .unavailable("the cgroup v2 hierarchy at \(root) has no io controller (cgroup.controllers: \(controllers.joined(separator: " "))) and no cgroup v1 blkio hierarchy is mounted; the kernel needs CONFIG_BLK_CGROUP and CONFIG_BLK_DEV_THROTTLING")
        }
        let cgroup: String
        switch setting {
        case nil, "auto":
            guard let found = workloadCgroups.map({ root + "/" + $0 }).first(where: isDirectory) else {
                return .unavailable("no --qos-cgroup given and none of \(workloadCgroups.map { root + "/" + $0 }.joined(separator: ", ")) exists; pass --qos-cgroup PATH, the cgroup under which the workloads run")
            }
            cgroup = found
        case let path?:
            let trimmed = trimSlash(path.hasPrefix("/") ? path : root + "/" + path)
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
        if let reason = notWritable(ioMax) { return .unavailable(reason) }
        return .available(CgroupIOMax(cgroup: cgroup))
    }

    // MARK: cgroup v1

    /// `cgroup` in the v1 blkio hierarchy at `mount` (named: the setting it came from, nil for auto).
    private static func blkio(_ cgroup: String, mount: String, named: String?) -> Availability {
        guard isDirectory(cgroup) else {
            return .unavailable("--qos-cgroup \(cgroup) does not exist in the cgroup v1 blkio hierarchy; create it or name the cgroup under which the workloads run")
        }
        let rules = cgroup + "/blkio.throttle.write_iops_device"
        guard FileManager.default.fileExists(atPath: rules) else {
            return .unavailable("\(cgroup) has no blkio.throttle files (the cgroup v1 blkio controller without throttling); the kernel needs CONFIG_BLK_DEV_THROTTLING")
        }
        if let reason = notWritable(rules) { return .unavailable(reason) }
        return .available(CgroupBlkioThrottle(cgroup: cgroup))
    }

    // MARK: Helpers

    private static func notWritable(_ path: String) -> String? {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else {
            return "\(path) is not writable (\(String(cString: strerror(errno)))); the process that stages volumes must run as root in the host's cgroup namespace, with the host's /sys/fs/cgroup"
        }
        close(fd)
        return nil
    }

    private static func trimSlash(_ path: String) -> String {
        var path = path
        while path.count > 1 && path.hasSuffix("/") { path.removeLast() }
        return path
    }

    private static func isDirectory(_ path: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue
    }
}
