import CairnCSI
import CairnCore
import CairnProcess
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The Linux `Mounter`: util-linux, e2fsprogs and xfsprogs for the work that has edge cases
/// (they encode decades of them), sysfs and procfs for the questions (cheaper than a process and
/// exact), statvfs for capacity.
public struct LinuxMounter: Mounter {
    /// losetup, blkid, mount and umount answer in seconds; one stuck on a dead device is killed
    /// so the volume lock is released and the error reaches the CO. mkfs and fsck get longer.
    static let quickTimeout: Duration = .seconds(120)

    /// Every tool this mounter runs: start-up warns about a missing one, `cairn doctor` checks
    /// them and their versions. The xfs ones matter only for xfs volumes.
    public static let tools = ["losetup", "mount", "umount", "blkid", "mkfs.ext4", "fsck.ext4", "resize2fs", "mkfs.xfs", "xfs_growfs"]

    let logger: Logger
    /// Where the kernel's block-device directories live (a test may point it elsewhere).
    let sysBlock: String
    let mountInfoPath: String
    let nsexec: NamespaceExec

    public init(logger: Logger, sysBlock: String = "/sys/block", mountInfoPath: String = "/proc/self/mountinfo",
                nsexecBinary: String? = nil) {
        self.logger = logger
        self.sysBlock = sysBlock
        self.mountInfoPath = mountInfoPath
        self.nsexec = NamespaceExec(binary: nsexecBinary ?? NamespaceExec.locate(), logger: logger)
    }

    // MARK: Namespaces and target paths

    public func namespace(ofProcess pid: Int32) async throws -> MountNamespace {
        try HostPaths.namespace(ofProcess: pid)
    }

    public func inspect(_ path: String, in namespace: MountNamespace) async throws -> PathState {
        switch namespace {
        case .host:
            return HostPaths.inspect(path, mountTable: try await mountTable(in: .host))
        case .process:
            let out = try await nsexec.run("inspect", namespace, [path])
            return PathState(kind: PathKind(rawValue: out["kind"] ?? "") ?? .other, resolved: path,
                             isMountPoint: out["mounted"] == "1")
        }
    }

    public func makeTarget(_ path: String, for access: AccessType, in namespace: MountNamespace) async throws -> Bool {
        switch namespace {
        case .host: return try HostPaths.makeTarget(path, for: access)
        case .process: return try await nsexec.run(access == .mount ? "mkdir" : "mkfile", namespace, [path])["created"] == "1"
        }
    }

    public func removeTarget(_ path: String, in namespace: MountNamespace) async throws -> Bool {
        switch namespace {
        case .host: return try HostPaths.removeTarget(path)
        case .process: return try await nsexec.run("remove", namespace, [path])["removed"] == "1"
        }
    }

    // MARK: Loop devices

    public func attachLoop(file: String, readOnly: Bool) async throws -> String {
        // Direct I/O: the loop device then skips the page cache of the backing file; without it
        // every block is cached twice and throughput drops about 3× (design, "Data-path facts").
        var argv = ["losetup", "--find", "--show", "--direct-io=on"]
        if readOnly { argv.append("--read-only") }
        argv.append(file)
        let result = try await Command.run(argv, timeout: Self.quickTimeout, logger: logger)
        let device = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        guard result.status == 0, device.hasPrefix("/dev/") else {
            throw CairnError.internal(
                "could not attach \(file) as a loop device (losetup exit \(result.status): \(result.output)); check that the file exists, that free loop devices remain (losetup -a; modprobe loop max_loop=…) and that this process may use /dev/loop-control")
        }
        let name = (device as NSString).lastPathComponent
        guard sysBlock == "/sys/block" else { return try warnWithoutDirectIO(device, name: name, file: file) }
        // A device freed while in write-through mode keeps it (LoopWriteCache): flushes of the
        // file would never reach it.
        if LoopWriteCache.mode(name) == .writeThrough {
            do {
                try await offCooperativePool { try LoopWriteCache.set(name, .writeBack) }
                logger.notice("a loop device came out of the kernel's pool in write-through mode (left so by whoever detached it); set it back to write back",
                              metadata: ["device": "\(device)", "path": "\(file)"])
            } catch {
                _ = try? await Command.run(["losetup", "--detach", device], timeout: Self.quickTimeout, logger: logger)
                throw CairnError.internal(
                    "loop device \(device) is in write-through mode (its flushes would never reach \(file)) and cannot be set back to write back: \(error); check that /sys is writable for this process, or set it by hand: echo 'write back' > /sys/block/\(name)/queue/write_cache")
            }
        }
        // An engine's file whose every write is durable when answered (the engine vouched for
        // it): the device's flushes need not travel to it (docs/engine.md, "Write-through
        // volumes"). Set now, before anything uses the device: the kernel drains a device to
        // switch it.
        if !readOnly && LoopWriteCache.enabled && LoopWriteCache.isVouched(file) {
            do {
                try await offCooperativePool { try LoopWriteCache.set(name, .writeThrough) }
                logger.debug("loop device in write-through mode (the engine makes every write durable)", metadata: ["device": "\(device)"])
            } catch {
                logger.warning("cannot put the volume's loop device in write-through mode; every commit keeps a flush round trip through the loop device and FUSE (about 100 µs more)",
                               metadata: ["device": "\(device)", "error": "\(error)",
                                          "fix": "give the node plugin a writable /sys (a privileged container), or set CAIRN_WRITE_THROUGH=off to silence this"])
            }
        }
        return try warnWithoutDirectIO(device, name: name, file: file)
    }

    private func warnWithoutDirectIO(_ device: String, name: String, file: String) throws -> String {
        if let dio = ProcFile.textIfReadable("\(sysBlock)/\(name)/loop/dio"),
           dio.trimmingCharacters(in: .whitespacesAndNewlines) != "1" {
            logger.warning("loop device runs without direct I/O; the filesystem holding the backing file may not support O_DIRECT (expect about 3× lower throughput)",
                           metadata: ["device": "\(device)", "path": "\(file)"])
        }
        return device
    }

    public func loopDevices(backing file: String) async throws -> [String] {
        // sysfs shows the backing file's path as the kernel resolved it; compare resolved paths.
        // A file deleted while attached shows as "<path> (deleted)".
        let wanted = Validate.realPath(file) ?? file
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: sysBlock)
        } catch {
            throw CairnError.internal("cannot list \(sysBlock) to find the loop devices of \(file): \(error); is sysfs mounted in this container?")
        }
        var devices: [String] = []
        for name in names where name.hasPrefix("loop") {
            guard let raw = ProcFile.textIfReadable("\(sysBlock)/\(name)/loop/backing_file") else {
                continue  // not bound
            }
            var backing = raw.trimmingCharacters(in: .newlines)
            if backing.hasSuffix(" (deleted)") { backing = String(backing.dropLast(" (deleted)".count)) }
            if backing == wanted || backing == file { devices.append("/dev/\(name)") }
        }
        return devices.sorted { loopNumber($0) < loopNumber($1) }
    }

    private func loopNumber(_ device: String) -> Int {
        Int(device.drop { !$0.isNumber }) ?? Int.max
    }

    public func detachLoop(device: String) async throws {
        let name = (device as NSString).lastPathComponent
        guard FileManager.default.fileExists(atPath: "\(sysBlock)/\(name)/loop") else { return }  // already free
        // Never free a device in write-through mode (an engine's, docs/engine.md): the next
        // file attached to it would lose its flushes. Before the detach (nothing uses the
        // device by now, so the kernel has nothing to drain), and again after it: a device
        // still held open is only marked to go at its last close, still bound.
        await restoreWriteBack(name)
        let result = try await Command.run(["losetup", "--detach", device], timeout: Self.quickTimeout, logger: logger)
        await restoreWriteBack(name)
        guard result.status == 0 else {
            if !FileManager.default.fileExists(atPath: "\(sysBlock)/\(name)/loop") { return }  // lost a race; it is free
            throw CairnError.internal(
                "could not detach loop device \(device) (losetup exit \(result.status): \(result.output)); check what still uses it with `losetup -l \(device)` and `grep \(name) /proc/self/mountinfo`")
        }
    }

    /// Sets loop device `name` back to write back if it is in write-through mode (off the
    /// concurrency pool: the kernel may take its time).
    private func restoreWriteBack(_ name: String) async {
        guard sysBlock == "/sys/block" else { return }
        let logger = logger
        await offCooperativePool { LoopWriteCache.restoreWriteBack(name, logger: logger) }
    }

    // MARK: Filesystems

    public func probe(device: String) async throws -> DeviceContent {
        // -p: low-level probe of the device itself, not blkid's cache, which can be stale.
        let result = try await Command.run(["blkid", "-p", "-o", "export", device], timeout: Self.quickTimeout, logger: logger)
        switch result.status {
        case 0:
            var values: [String: String] = [:]
            for line in result.stdout.split(separator: "\n") {
                guard let eq = line.firstIndex(of: "=") else { continue }
                values[String(line[..<eq])] = String(line[line.index(after: eq)...])
            }
            if let type = values["TYPE"], !type.isEmpty {
                let usage = values["USAGE"] ?? "filesystem"
                return usage == "filesystem" ? .filesystem(type) : .other("\(type) (\(usage))")
            }
            if let table = values["PTTYPE"] { return .other("a \(table) partition table") }
            return .other("an unrecognised signature (\(values.keys.sorted().joined(separator: ", ")))")
        case 2:
            return .empty
        case 8:
            throw CairnError.failedPrecondition(
                "\(device) carries signatures of more than one filesystem (blkid -p: \(result.output)); Cairn will neither mount nor format it: inspect it with `wipefs \(device)` and remove the stale signature by hand")
        default:
            throw CairnError.internal("blkid -p \(device) failed with exit status \(result.status): \(result.output); check that the device exists and is readable")
        }
    }

    public func makeFilesystem(device: String, fsType: String) async throws {
        let argv: [String]
        switch fsType {
        case "ext4":
            // nodiscard: the backing file is sparse and new, discarding it is wasted time.
            // lazy init: the kernel zeroes inode tables and the journal in the background.
            argv = ["mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", device]
        case "xfs":
            argv = ["mkfs.xfs", "-f", "-q", "-K", device]
        default:
            throw CairnError.invalidArgument("filesystem \"\(fsType)\" is not supported; use one of \(AccessRules.supportedFilesystems.joined(separator: ", "))")
        }
        let result = try await Command.run(argv, logger: logger)
        guard result.status == 0 else {
            throw CairnError.internal(
                "could not create a \(fsType) filesystem on \(device) (\(argv[0]) exit \(result.status): \(result.output)); check the kernel log (dmesg) and the space left under the volume's backing file")
        }
    }

    public func checkFilesystem(device: String, fsType: String) async throws {
        switch fsType {
        case "ext4":
            let result = try await Command.run(["fsck.ext4", "-p", device], logger: logger)
            // 0: clean; 1: errors corrected. Anything else (2: reboot advised, 4: errors left,
            // 8: operational error…) means the filesystem must not be mounted as it is.
            guard result.status == 0 || result.status == 1 else {
                throw CairnError.failedPrecondition(
                    "the ext4 filesystem on \(device) needs manual repair (fsck.ext4 -p exit \(result.status): \(result.output)); it was not mounted. Stop every user of the volume, run `fsck.ext4 -f \(device)` by hand, then stage the volume again")
            }
            if result.status == 1 {
                logger.warning("fsck.ext4 corrected errors before mounting", metadata: ["device": "\(device)", "fsck.output": "\(result.output)"])
            }
        case "xfs":
            return  // xfs replays its log on mount; xfs_repair is never safe to run unattended.
        default:
            throw CairnError.invalidArgument("filesystem \"\(fsType)\" is not supported; use one of \(AccessRules.supportedFilesystems.joined(separator: ", "))")
        }
    }

    // MARK: Mounts

    public func mount(device: String, at target: String, fsType: String, options: [String]) async throws {
        var argv = ["mount", "-t", fsType]
        if !options.isEmpty { argv += ["-o", options.joined(separator: ",")] }
        argv += [device, target]
        let result = try await Command.run(argv, timeout: Self.quickTimeout, logger: logger)
        guard result.status == 0 else {
            throw CairnError.internal(
                "could not mount \(device) (\(fsType)) at \(target) (mount exit \(result.status): \(result.output)); the kernel's reason is in `dmesg | tail`; check the mount flags and that \(target) is a directory")
        }
    }

    public func bindMount(source: String, at target: String, in namespace: MountNamespace, readOnly: Bool,
                          options: [String]) async throws {
        guard case .process = namespace else {
            return try await hostBindMount(source: source, at: target, readOnly: readOnly, options: options)
        }
        if !options.isEmpty {
            logger.notice("per-mount flags are not applied to binds into a container's namespace; only read-only is",
                          metadata: ["path": "\(target)", "mount.flags": "\(options.joined(separator: ","))"])
        }
        _ = try await nsexec.run("bind", namespace, ["--source", source] + (readOnly ? ["--read-only"] : []) + [target])
    }

    func hostBindMount(source: String, at target: String, readOnly: Bool, options: [String]) async throws {
        let bind = try await Command.run(["mount", "--bind", source, target], timeout: Self.quickTimeout, logger: logger)
        guard bind.status == 0 else {
            throw CairnError.internal(
                "could not bind-mount \(source) at \(target) (mount exit \(bind.status): \(bind.output)); check that both exist and are of the same kind (directory or file)")
        }
        // A bind mount inherits the source's flags; read-only and the per-mount flags need a
        // second, remount step (MS_REMOUNT|MS_BIND changes only this mount point).
        guard readOnly || !options.isEmpty else { return }
        let flags = ["remount", "bind"] + (readOnly ? ["ro"] : []) + options
        let remount = try await Command.run(["mount", "-o", flags.joined(separator: ","), target], timeout: Self.quickTimeout, logger: logger)
        guard remount.status == 0 else {
            // Never leave a writable mount where a read-only one was asked for.
            let undo = try? await Command.run(["umount", target], timeout: Self.quickTimeout, logger: logger)
            let undone = undo?.status == 0 ? "the bind mount was undone" : "the bind mount could NOT be undone: unmount \(target) by hand"
            throw CairnError.internal(
                "could not apply \(flags.joined(separator: ",")) to the bind mount at \(target) (mount exit \(remount.status): \(remount.output)); \(undone)")
        }
    }

    public func unmount(_ target: String, in namespace: MountNamespace) async throws {
        if case .process = namespace {
            _ = try await nsexec.run("unmount", namespace, [target])
            return
        }
        let result = try await Command.run(["umount", target], timeout: Self.quickTimeout, logger: logger)
        guard result.status == 0 else {
            // A dead mount (its FUSE daemon gone: ENOTCONN; its device gone: EIO/ESTALE) cannot be
            // used by anyone; when a normal unmount fails on it, detach it lazily — the last
            // resort, and only here, so a target is never left half-mounted.
            if let dead = Self.deadMountReason(target) {
                logger.warning("unmounting a dead mount lazily (umount -l)", metadata: [
                    "path": "\(target)", "reason": "\(dead)", "umount.error": "\(result.output)",
                ])
                let lazy = try await Command.run(["umount", "-l", target], timeout: Self.quickTimeout, logger: logger)
                if lazy.status == 0 { return }
                throw CairnError.internal("could not detach the dead mount at \(target) (\(dead)), even lazily: \(lazy.output)")
            }
            if result.output.contains("busy") {
                throw CairnError.failedPrecondition(
                    "\(target) is busy: processes still use it (find them with `fuser -vm \(target)`); stop them and retry")
            }
            throw CairnError.internal("could not unmount \(target) (umount exit \(result.status): \(result.output))")
        }
    }

    /// Why the mount at `path` is dead (stat fails with ENOTCONN, EIO or ESTALE), or nil.
    static func deadMountReason(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) != 0 else { return nil }
        switch errno {
        case ENOTCONN: return "its FUSE daemon is gone (ENOTCONN)"
        case EIO: return "I/O error on its device (EIO)"
        case ESTALE: return "stale file handle (ESTALE)"
        default: return nil
        }
    }

    public func mountTable(in namespace: MountNamespace) async throws -> [MountInfo] {
        if case .process = namespace { return MountTable.parse(try await nsexec.mountinfo(namespace)) }
        do {
            return try MountTable.read(mountInfoPath)
        } catch {
            throw CairnError.internal("cannot read \(mountInfoPath): \(error); is /proc mounted in this container?")
        }
    }

    // MARK: Capacity

    public func filesystemStats(path: String, in namespace: MountNamespace) async throws -> FilesystemStats {
        // A process's namespace is reachable through /proc/PID/root without entering it.
        var path = path
        if case .process(let pid, _) = namespace { path = "/proc/\(pid)/root" + path }
        var st = statvfs()
        guard statvfs(path, &st) == 0 else {
            let e = errno
            throw CairnError.internal("statvfs \(path) failed: \(String(cString: strerror(e))); is the volume still mounted there?")
        }
        let fragment = Int64(st.f_frsize)
        let total = Int64(st.f_blocks) * fragment
        let free = Int64(st.f_bfree) * fragment
        let available = Int64(st.f_bavail) * fragment
        return FilesystemStats(
            totalBytes: total, availableBytes: available, usedBytes: max(0, total - free),
            totalInodes: Int64(st.f_files), freeInodes: Int64(st.f_favail),
            usedInodes: max(0, Int64(st.f_files) - Int64(st.f_ffree)))
    }

    public func expand(device: String, fsType: String, mountPath: String) async throws -> Int64 {
        let refresh = try await Command.run(["losetup", "--set-capacity", device], timeout: Self.quickTimeout, logger: logger)
        guard refresh.status == 0 else {
            throw CairnError.internal("could not make \(device) see its backing file's new size (losetup --set-capacity: \(refresh.output))")
        }
        let argv: [String]
        switch fsType {
        case "": return try await blockDeviceSize(device: device)
        case "ext4": argv = ["resize2fs", device]
        case "xfs": argv = ["xfs_growfs", mountPath]
        default: throw CairnError.invalidArgument("filesystem \"\(fsType)\" cannot be expanded; use ext4 or xfs")
        }
        let grow = try await Command.run(argv, logger: logger)
        if grow.status != 0 && fsType == "ext4" && grow.output.contains("Permission denied") {
            throw CairnError.failedPrecondition(
                "the kernel refused to grow the mounted ext4 filesystem on \(device): online ext4 resize needs CAP_SYS_RESOURCE, which this agent lacks; run the agent with all capabilities (privileged), or grow the volume while it is unstaged")
        }
        guard grow.status == 0 else {
            throw CairnError.internal("could not grow the \(fsType) filesystem on \(device) (\(argv[0]) exit \(grow.status): \(grow.output)); it is still usable at its old size")
        }
        return try await blockDeviceSize(device: device)
    }

    public func blockDeviceSize(device: String) async throws -> Int64 {
        // sysfs reports the size in 512-byte sectors whatever the logical block size is.
        let name = ((Validate.realPath(device) ?? device) as NSString).lastPathComponent
        let path = "/sys/class/block/\(name)/size"
        guard let text = ProcFile.textIfReadable(path),
              let sectors = Int64(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw CairnError.internal("cannot read the size of \(device) from \(path); is the device still attached?")
        }
        return sectors * 512
    }
}
