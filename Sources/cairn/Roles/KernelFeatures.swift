// What the kernel under this process offers that Cairn's data path uses or could use, read once
// at start-up and logged in one line (I/O throttling is reported by the QoS check, QoSCgroup), with a warning for what a role needs and is missing — so a
// user sees "no loop devices" at start-up, not as a failed NodeStage later.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import Logging

struct KernelFeatures {
    var fuse: Bool
    /// `/sys/module/fuse/parameters/enable_uring`: nil when the kernel has no FUSE over io_uring.
    var fuseIOUring: Bool?
    var ioUring: Bool
    var loop: Bool
    var deviceMapper: Bool
    var kernelTLS: Bool
    /// `/sys` is writable here: a loop device over an engine's file can be put in write-through
    /// mode (docs/engine.md, "Write-through volumes").
    var sysWritable: Bool

    /// Whether write-through volumes' loop devices skip their flushes on this node.
    enum LoopWriteThrough { case on, offByEnvironment, readOnlySys }
    var loopWriteThrough: LoopWriteThrough {
        !LoopWriteCache.enabled ? .offByEnvironment : sysWritable ? .on : .readOnlySys
    }

    static func probe() -> KernelFeatures {
        func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }
        func read(_ path: String) -> String? {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            defer { close(fd) }
            var buffer = [UInt8](repeating: 0, count: 256)
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { return nil }
            return String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "\n").first.map(String.init) ?? ""
        }
        let uring = read("/sys/module/fuse/parameters/enable_uring")
        let uringDisabled = read("/proc/sys/kernel/io_uring_disabled")
        return KernelFeatures(
            fuse: exists("/dev/fuse"),
            fuseIOUring: uring.map { $0 == "Y" || $0 == "1" },
            ioUring: uringDisabled.map { $0 == "0" } ?? exists("/proc/sys/kernel/io_uring_disabled"),
            loop: exists("/dev/loop-control"),
            deviceMapper: exists("/dev/mapper/control"),
            kernelTLS: exists("/sys/module/tls"),
            sysWritable: {
                var fs = statvfs()
                return statvfs("/sys/block", &fs) == 0 && fs.f_flag & UInt(ST_RDONLY) == 0
            }())
    }

    /// One info line with everything, and a warning per missing thing the role needs.
    func log(to logger: Logger, servesVolumes: Bool, runsEngines: Bool) {
        let uring: String = switch fuseIOUring {
        case .none: "absent"
        case .some(true): "enabled (not used yet: requests are served through /dev/fuse)"
        case .some(false): "available, off (/sys/module/fuse/parameters/enable_uring)"
        }
        let writeThrough = switch loopWriteThrough {
        case .offByEnvironment: "off (CAIRN_WRITE_THROUGH=off: commits keep a flush round trip)"
        case .on: "on (engines' loop devices are attached in write-through mode)"
        case .readOnlySys: "unavailable (/sys is read-only: commits keep a flush round trip)"
        }
        logger.info("kernel features", metadata: [
            "kernel.fuse": "\(fuse)", "kernel.fuse_io_uring": "\(uring)", "kernel.io_uring": "\(ioUring)",
            "kernel.loop": "\(loop)", "kernel.device_mapper": "\(deviceMapper)", "kernel.tls": "\(kernelTLS)",
            "loop.write_through": "\(writeThrough)",
        ])
        if servesVolumes && !loop {
            logger.warning("no loop devices (/dev/loop-control is missing): NodeStageVolume will fail; load the loop module (modprobe loop)")
        }
        if servesVolumes && runsEngines && loopWriteThrough == .readOnlySys {
            logger.warning("/sys is read-only: replicated volumes' loop devices stay in write-back mode and every commit keeps a flush round trip through the loop device and FUSE (about 100 µs); run the node plugin privileged (a writable /sys), or set CAIRN_WRITE_THROUGH=off to silence this")
        }
        if runsEngines && !ioUring {
            logger.warning("io_uring is disabled here (kernel.io_uring_disabled): engines read their local replica synchronously, one read per FUSE worker, at about a third of the device's random-read rate; sysctl -w kernel.io_uring_disabled=0 to allow it (docs/engine.md, \"Asynchronous reads\")")
        }
        if runsEngines && !fuse {
            logger.warning("no /dev/fuse: replicated and encrypted volumes cannot be staged on this node; load the fuse module (modprobe fuse) or, in a container, pass /dev/fuse through")
        }
    }
}
