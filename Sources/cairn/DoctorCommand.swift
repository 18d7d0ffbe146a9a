import ArgumentParser
import CairnCLI
import CairnCore
import CairnEngine
import CairnNode
import CairnProcess
import CairnSecurity
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// `cairn doctor`: checks this machine before `cairn serve` runs on it and says what to fix.
/// Read-only: it probes files under /dev, /proc and /sys, runs the node's tools for their
/// versions, and reads the store (with --store etcd).
struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Check this machine before use: kernel FUSE features, io_uring, loop devices, tools, cgroup throttling, etcd and TLS, clock skew, free space.",
        discussion: """
            One line per check: ok, warn or FAIL with the fix. Exits 1 when a check failed.
            Examples:
              cairn doctor
              cairn doctor --store etcd --etcd-endpoints https://10.0.0.1:2379 --etcd-ca ca.pem --etcd-cert n1.pem --etcd-key n1.key
            """)

    @OptionGroup var storeOptions: StoreOptions
    @Option(name: .customLong("qos-cgroup"), help: "As `cairn serve --qos-cgroup` (one machine): where the workloads' I/O throttle rules go. Default: $CAIRN_QOS_CGROUP, else auto.")
    var qosCgroup: String?
    @Option(name: [.customShort("o"), .long], help: "table (one line per check) or json.")
    var output: OutputFormat = .table

    func run() async throws {
        let report = DoctorReport(checks: await checks())
        switch output {
        case .json: print(try JSONOutput.encode(report))
        case .table: print(report.render(), terminator: "")
        }
        if !report.ok { throw ExitCode(1) }
    }

    func checks() async -> [DoctorCheck] {
        let cluster = storeOptions.store == .etcd
        var checks = kernel(cluster: cluster)
        checks += tools()
        checks.append(throttle())
        checks.append(freeSpace())
        checks.append(getuid() == 0 ? DoctorCheck("root", .ok, "running as root")
                                     : DoctorCheck("root", .warn, "not root (uid \(getuid())): the loop, mount and FUSE checks may read less than `cairn serve` would see",
                                                   fix: "run `sudo cairn doctor`; `cairn serve` (all and agent roles) runs as root"))
        if cluster { checks += await etcd() }
        return checks
    }

    // MARK: Kernel

    func kernel(cluster: Bool) -> [DoctorCheck] {
        let features = KernelFeatures.probe()
        let release = FUSEResume.kernelRelease()
        var checks = [DoctorCheck("kernel", .ok, "Linux \(release)")]
        if features.fuse {
            checks.append(DoctorCheck("fuse", .ok, "/dev/fuse present"))
        } else {
            checks.append(DoctorCheck("fuse", cluster ? .fail : .warn,
                                      "no /dev/fuse: replicated volumes (--store etcd) cannot be staged" + (cluster ? "" : "; one machine does not need it"),
                                      fix: "modprobe fuse (in a container: pass /dev/fuse through)"))
        }
        if FUSEResume.kernelSupportsResend(release: release) {
            checks.append(DoctorCheck("fuse.resend", .ok, "the kernel resends FUSE requests in flight (6.9+): restarts of cairn keep the staged volumes' I/O"))
        } else {
            checks.append(DoctorCheck("fuse.resend", .warn, "kernel \(release) cannot resend FUSE requests in flight (needs 6.9): a restart or upgrade of cairn fails the I/O in flight on replicated volumes",
                                      fix: "upgrade to Linux 6.9 or later for restarts without I/O errors"))
        }
        switch features.fuseIOUring {
        case .none: checks.append(DoctorCheck("fuse.io_uring", .ok, "FUSE over io_uring absent (not used by Cairn yet)"))
        case .some(true): checks.append(DoctorCheck("fuse.io_uring", .ok, "FUSE over io_uring enabled (not used by Cairn yet)"))
        case .some(false): checks.append(DoctorCheck("fuse.io_uring", .ok, "FUSE over io_uring available, off (/sys/module/fuse/parameters/enable_uring; not used by Cairn yet)"))
        }
        let disabled = (try? ProcFile.text("/proc/sys/kernel/io_uring_disabled"))?.trimmingCharacters(in: .whitespacesAndNewlines)
        switch disabled {
        case "0": checks.append(DoctorCheck("io_uring", .ok, "enabled (kernel.io_uring_disabled=0): engines read their local replica asynchronously"))
        case let value?: checks.append(DoctorCheck("io_uring", .warn, "disabled for some or all processes (kernel.io_uring_disabled=\(value)): engines read their local replica synchronously, at about a third of the device's random-read rate",
                                                   fix: "sysctl -w kernel.io_uring_disabled=0 so that cairn's engines read asynchronously (docs/engine.md, \"Asynchronous reads\")"))
        case nil: checks.append(DoctorCheck("io_uring", features.ioUring ? .ok : .warn, features.ioUring ? "present" : "no /proc/sys/kernel/io_uring_disabled: kernel without io_uring or older than 6.6"))
        }
        let module = access("/sys/module/loop", F_OK) == 0 ? "loop module loaded" : "loop module not loaded"
        if features.loop {
            checks.append(DoctorCheck("loop", .ok, "/dev/loop-control present (\(module))"))
        } else {
            checks.append(DoctorCheck("loop", .fail, "no /dev/loop-control (\(module)): NodeStageVolume attaches every volume as a loop device and will fail",
                                      fix: "modprobe loop (in a container: pass /dev/loop-control and /dev/loop* through)"))
        }
        switch features.loopWriteThrough {
        case .offByEnvironment:
            checks.append(DoctorCheck("loop.write_through", .ok, "off here (CAIRN_WRITE_THROUGH=off): every volume's commits keep a flush round trip through the loop device and FUSE"))
        case .on:
            checks.append(DoctorCheck("loop.write_through", .ok, "/sys is writable: write-through volumes' loop devices skip their flushes (docs/engine.md, \"Write-through volumes\")"))
        case .readOnlySys:
            checks.append(DoctorCheck("loop.write_through", .warn, "/sys is read-only: write-through volumes' loop devices keep write back, and every commit a flush round trip (about 100 µs)",
                                      fix: "run cairn privileged (a writable /sys), or set CAIRN_WRITE_THROUGH=off"))
        }
        return checks
    }

    // MARK: Tools

    /// Each tool the node runs, with its version; mkfs.xfs and xfs_growfs only for xfs volumes.
    func tools() -> [DoctorCheck] {
        LinuxMounter.tools.map { tool in
            let optional = tool.contains("xfs")
            guard Command.missing([tool]).isEmpty else {
                return DoctorCheck("tool." + tool, optional ? .warn : .fail,
                                   "\(tool) is not installed" + (optional ? ": xfs volumes cannot be formatted or grown" : ""),
                                   fix: "apt-get install " + (optional ? "xfsprogs" : tool.contains("fs") || tool == "resize2fs" ? "e2fsprogs" : tool == "mount" || tool == "umount" ? "mount" : "util-linux"))
            }
            let flag = tool.hasPrefix("mkfs") || tool.hasPrefix("fsck") || tool == "xfs_growfs" ? "-V" : tool == "resize2fs" ? "-h" : "--version"
            let result = try? Command.runBlocking([tool, flag], timeout: .seconds(10))
            return DoctorCheck("tool." + tool, .ok, result.map { DoctorRules.versionLine($0.output) } ?? "installed, version unknown")
        }
    }

    // MARK: Cgroup throttling

    func throttle() -> DoctorCheck {
        let setting = qosCgroup ?? ProcessInfo.processInfo.environment["CAIRN_QOS_CGROUP"]
        switch QoSCgroup.locate(setting, mounts: (try? MountTable.read()) ?? []) {
        case .available(let throttle):
            return DoctorCheck("cgroup.io", .ok, "one-machine QoS limits are enforced with \(throttle.mechanism) in \(throttle.cgroup)")
        case .unavailable(let reason):
            return DoctorCheck("cgroup.io", .warn, "one-machine QoS limits cannot be enforced (ControllerModifyVolume is not offered): \(reason)",
                               fix: "pass --qos-cgroup PATH (the workloads' cgroup) to cairn serve, or ignore with --store etcd (the engine enforces limits)")
        }
    }

    // MARK: Disk

    func freeSpace() -> DoctorCheck {
        var path = storeOptions.dataDir
        while access(path, F_OK) != 0, path != "/" { path = (path as NSString).deletingLastPathComponent }
        var fs = statvfs()
        guard statvfs(path, &fs) == 0 else {
            return DoctorCheck("data-dir", .fail, "cannot stat \(path): \(String(cString: strerror(errno)))", fix: "create --data-dir \(storeOptions.dataDir) on a local filesystem")
        }
        var check = DoctorRules.freeSpace(path: storeOptions.dataDir, free: Int64(fs.f_bavail) * Int64(fs.f_frsize),
                                          total: Int64(fs.f_blocks) * Int64(fs.f_frsize))
        if path != storeOptions.dataDir { check.detail += " (does not exist yet: measured at \(path); cairn serve creates it)" }
        return check
    }

    // MARK: etcd

    /// Reachability and TLS through the store's own client, then the clock against etcd's.
    func etcd() async -> [DoctorCheck] {
        let endpoints = storeOptions.etcdEndpoints.flatMap { $0.split(separator: ",").map(String.init) }
        let secure = endpoints.contains { $0.hasPrefix("https://") }
        let tls = secure ? (storeOptions.etcdTLS.cert != nil ? "TLS with a client certificate" : "TLS, no client certificate") : "plaintext (no TLS)"
        var checks: [DoctorCheck] = []
        if let cert = storeOptions.etcdTLS.cert {
            do {
                checks.append(DoctorRules.certificate("etcd.cert", path: cert, notAfter: try CertificateInfo.read(cert).notAfter))
            } catch {
                checks.append(DoctorCheck("etcd.cert", .fail, "cannot read \(cert): \(error)", fix: "pass --etcd-cert a PEM certificate this process can read"))
            }
        }
        do {
            let store = try storeOptions.open()
            let nodes = try await store.liveNodes()
            let volumes = try await store.listVolumes(afterID: nil, limit: 0)
            checks.append(DoctorCheck("etcd", .ok, "reachable at \(endpoints.joined(separator: ",")) over \(tls): \(nodes.count) live node\(nodes.count == 1 ? "" : "s"), \(volumes.count) volume\(volumes.count == 1 ? "" : "s")"))
            if !secure {
                checks.append(DoctorCheck("etcd.tls", .warn, "etcd is reached without TLS: anyone on the network can read and change the cluster state",
                                          fix: "serve etcd over https with client certificates and pass --etcd-ca/--etcd-cert/--etcd-key (docs/security.md)"))
            }
        } catch {
            let message = (error as? ValidationError)?.message ?? RPCStatus.from(error).message
            return [DoctorCheck("etcd", .fail, "cannot read the store at \(endpoints.joined(separator: ",")) over \(tls): \(message)",
                                fix: "check that etcd runs and --etcd-endpoints; for https, --etcd-ca (and --etcd-cert/--etcd-key when etcd checks clients)")]
        }
        checks.append(clock(endpoint: endpoints.first ?? ""))
        return checks
    }

    /// etcd's clock, from the Date header of its /version endpoint (curl presents the same
    /// certificate as the store's client; there is no time in etcd's gRPC API).
    func clock(endpoint: String) -> DoctorCheck {
        guard Command.missing(["curl"]).isEmpty else {
            return DoctorCheck("clock", .warn, "not measured: curl is not installed", fix: "apt-get install curl, then run cairn doctor again")
        }
        var argv = ["curl", "-sS", "-i", "--max-time", "5"]
        if let ca = storeOptions.etcdTLS.ca { argv += ["--cacert", ca] }
        if let cert = storeOptions.etcdTLS.cert, let key = storeOptions.etcdTLS.key { argv += ["--cert", cert, "--key", key] }
        argv.append(endpoint.hasSuffix("/") ? endpoint + "version" : endpoint + "/version")
        let before = Date()
        guard let result = try? Command.runBlocking(argv, timeout: .seconds(10)), result.status == 0,
              let date = DoctorRules.httpDate(in: result.stdout) else {
            return DoctorCheck("clock", .warn, "not measured: etcd's /version answered no Date header", fix: "check that \(endpoint) serves HTTP (etcd's client URL)")
        }
        let after = Date()
        // The header truncates to the second: compare with the middle of the request, +0.5 s.
        let skew = date.timeIntervalSince1970 + 0.5 - (before.timeIntervalSince1970 + after.timeIntervalSince1970) / 2
        var check = DoctorRules.clockSkew(skew, against: "etcd")
        if let body = result.stdout.components(separatedBy: "\r\n\r\n").last, let version = body.split(separator: "\"").dropFirst(3).first {
            check.detail += "; etcd \(version)"
        }
        return check
    }
}
