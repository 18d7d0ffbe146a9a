import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A loop device's write cache as the block layer sees it (`/sys/block/loopN/queue/write_cache`).
///
/// A loop device over a file that can be fsynced says "write back": the block layer then sends
/// it every flush (an application's fdatasync, a filesystem's journal commit), and the loop
/// device fsyncs its file. "write through" tells the block layer the device keeps nothing
/// volatile: flushes are answered at once and never reach the file. Cairn's engine answers no
/// write before it is durable on every replica, so a loop device over an engine's FUSE file is
/// put in write-through mode when it is attached, while it is idle (docs/engine.md,
/// "Write-through volumes"), and a commit costs one round trip to the replicas, not two.
///
/// The setting belongs to the device, not to what is attached to it: a device freed while it
/// says "write through" says so still for the next file attached to it, whose flushes would
/// then be dropped. So whoever attaches or detaches a loop device in Cairn sets it back to
/// "write back" first (`LinuxMounter.attachLoop`/`detachLoop`, `DeadFUSEMounts`).
public enum LoopWriteCache {
    public enum Mode: String, Sendable {
        case writeBack = "write back"
        case writeThrough = "write through"
    }

    static let sysBlock = "/sys/block"

    /// Loop devices over an engine's file are put in write-through mode, unless
    /// `CAIRN_WRITE_THROUGH=off` (an escape hatch: every commit then keeps its flush round trip
    /// through the loop device and FUSE, about 100 µs more). Engines make every write durable
    /// when answered either way.
    public static let enabled: Bool = getenv("CAIRN_WRITE_THROUGH").map { String(cString: $0) != "off" } ?? true

    /// Files whose engine (in this process) answers every write only once it is durable on
    /// every in-sync replica: a loop device over one may skip its flushes. Real paths.
    private static let vouched = Mutex<Set<String>>([])

    /// An engine's word that every write to `file` is durable when answered, for as long as it
    /// serves it (until `withdraw`).
    public static func vouch(_ file: String) { _ = vouched.withLock { $0.insert(canonical(file)) } }

    public static func withdraw(_ file: String) { _ = vouched.withLock { $0.remove(canonical(file)) } }

    /// Whether an engine in this process vouched for `file`: NodeStage then attaches its loop
    /// device in write-through mode (the mounter and the engines always share a process: the
    /// node plugin's, or the agent's).
    public static func isVouched(_ file: String) -> Bool { vouched.withLock { $0.contains(canonical(file)) } }

    /// `file` with its directory resolved (the file itself is not looked up: inside an engine's
    /// FUSE mount that waits for the engine to serve it).
    static func canonical(_ file: String) -> String {
        let directory = (file as NSString).deletingLastPathComponent
        return (Validate.realPath(directory) ?? directory) + "/" + (file as NSString).lastPathComponent
    }

    /// The loop devices (`loop3`, …) whose backing file is `file` (a real path, as sysfs shows it).
    public static func devices(backing file: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: sysBlock)) ?? []
        return names.filter { $0.hasPrefix("loop") && backingFile($0) == file }.sorted()
    }

    /// The backing file of loop device `device` (`loop3`), nil when it has none.
    public static func backingFile(_ device: String) -> String? {
        guard let raw = ProcFile.textIfReadable("\(sysBlock)/\(device)/loop/backing_file") else { return nil }
        let path = raw.trimmingCharacters(in: .newlines)
        return path.isEmpty ? nil : path
    }

    /// The device's setting now; nil when it cannot be read (no such device).
    public static func mode(_ device: String) -> Mode? {
        guard let raw = ProcFile.textIfReadable("\(sysBlock)/\(device)/queue/write_cache") else { return nil }
        return Mode(rawValue: raw.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Sets the device's write cache. The kernel drains the device's requests in flight to
    /// apply it (about 15 ms on an idle device here): never call it from a thread that serves
    /// the device's I/O. Throws `SystemError` (EACCES/EROFS: sysfs is read-only here, as in
    /// an unprivileged container).
    public static func set(_ device: String, _ mode: Mode) throws {
        let path = "\(sysBlock)/\(device)/queue/write_cache"
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        let text = mode.rawValue
        while true {
            let n = text.withCString { write(fd, $0, strlen($0)) }
            if n >= 0 { return }
            if errno == EINTR { continue }
            throw SystemError("write '\(text)' to \(path)", errno: errno)
        }
    }

    /// Sets `device` back to write back if it is in write-through mode, before it is freed or
    /// handed out (logged, with the command to do it by hand, when it cannot be).
    public static func restoreWriteBack(_ device: String, logger: Logger) {
        guard mode(device) == .writeThrough else { return }
        do {
            try set(device, .writeBack)
        } catch {
            logger.error("cannot set a loop device back to write back; the next file attached to it would lose its flushes: set it by hand",
                         metadata: ["device": "/dev/\(device)", "error": "\(error)",
                                    "fix": "echo 'write back' > /sys/block/\(device)/queue/write_cache"])
        }
    }

    /// `device` as a name (`loop3`) from a path (`/dev/loop3`) or a name.
    public static func name(_ device: String) -> String {
        (device as NSString).lastPathComponent
    }
}
