import CairnCore
import CairnEngine
import Foundation
import Logging

/// What a process that runs engines does besides serving them (docs/design.md, "Engines survive
/// their process"): one process per data directory runs them (a lock), a SIGTERM hands them
/// over to the FUSE keeper instead of stopping them, and the next process takes the kept
/// connections back before it serves. Shared by the cluster's `ReplicatedBacking` and one
/// machine's `LocalEngineBacking` (encrypted volumes).
public struct EngineHost: Sendable {
    let engines: EngineRegistry
    let enginesDirectory: String
    let logger: Logger

    /// SIGTERM with volumes staged: every engine stops serving and finishes what it serves; the
    /// FUSE keeper keeps the connections for the next process (`EngineRegistry.handOverAll`).
    public func handOverEngines() {
        engines.handOverAll()
    }

    /// Makes this process the only one running engines for this data directory, for as long as
    /// it lives (an exclusive lock on `<data-dir>/engines/.lock`, released by the kernel when
    /// the process dies). Two would serve the same kept FUSE connections and replicas at once.
    public func lockEnginesDirectory() throws {
        let path = enginesDirectory + "/.lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        // A predecessor that was just killed may take a while to exit (its threads finish the
        // disk I/O they are in, which a busy disk can make seconds): wait for it, not for a
        // live one.
        var waited = 0
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            guard waited < 600, Self.isExiting(pid: holder) else {
                close(fd)
                throw CairnError.failedPrecondition(
                    "another cairn process (pid \(holder)) runs the engines of \(enginesDirectory)\(waited > 0 ? " and did not exit within 60 s of being killed" : ""); stop it first, or give this one another --data-dir")
            }
            if waited == 0 {
                logger.warning("waiting for the killed cairn process that ran the engines to exit", metadata: [
                    "previous.pid": "\(holder)", "engines.dir": "\(enginesDirectory)"])
            }
            waited += 1
            usleep(100_000)
        }
        if waited > 0 {
            logger.info("the previous cairn process exited; this one runs the engines", metadata: [
                "waited.seconds": "\(Double(waited) / 10)"])
        }
        _ = ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { write(fd, $0, strlen($0)) }
        // Kept open (and locked) until the process exits.
    }

    /// Whether process `pid` is on its way out: gone already, a zombie, or with SIGKILL pending.
    static func isExiting(pid: String) -> Bool {
        guard let n = Int32(pid), n > 0 else { return false }
        guard let status = try? String(contentsOfFile: "/proc/\(n)/status", encoding: .utf8) else { return true }
        for line in status.split(separator: "\n") {
            if line.hasPrefix("State:"), line.contains("Z") || line.contains("X") { return true }
            if line.hasPrefix("SigPnd:") || line.hasPrefix("ShdPnd:"),
               let mask = UInt64(line.split(separator: "\t").last.map(String.init) ?? "", radix: 16),
               mask & (1 << (UInt64(SIGKILL) - 1)) != 0 { return true }
        }
        return false
    }

    /// At the start of the process that runs engines, before it serves: takes back the FUSE
    /// connections the keeper kept for the engines of a dead predecessor, cleans up the mounts
    /// nobody kept, runs `restore` (the node's records: NodeStage again for each staged volume,
    /// which resumes a kept connection), then lets go of kept connections no volume claimed.
    public func recoverEngines(inUse: @escaping @Sendable (String) async -> Bool, restore: () async -> Void) async {
        engines.adoptKeptConnections()
        await detachDeadEngineMounts(inUse: inUse)
        await restore()
        if !engines.releaseUnresumed().isEmpty {
            await detachDeadEngineMounts(inUse: inUse)
        }
    }

    /// At the node process's start, before it serves: every `fuse.cairn` mount under
    /// `<data-dir>/engines/` is a killed predecessor's (no engine of this process runs yet).
    /// Each is aborted; those whose file `inUse` says a loop device still holds stay mounted
    /// (the node finds such a device by that path; NodeUnstageVolume detaches it, then
    /// `deactivate` the mount), the others are detached now.
    public func detachDeadEngineMounts(inUse: @Sendable (String) async -> Bool) async {
        do {
            var held = Set<String>()
            for mount in try DeadFUSEMounts.find(under: enginesDirectory) where await inUse(mount.mountPoint + "/volume") {
                held.insert(mount.mountPoint)
            }
            let (directory, logger) = (enginesDirectory, self.logger)
            let kept = held
            let detached = try await offCooperativePool {
                try DeadFUSEMounts.detach(under: directory, logger: logger, keep: { kept.contains($0.mountPoint) })
            }
            if !detached.isEmpty || !held.isEmpty {
                logger.info("cleaned up the FUSE mounts of engines a previous process left behind",
                            metadata: ["detached": "\(detached.count)", "kept.until_unstage": "\(held.sorted())"])
            }
        } catch {
            logger.error("cannot look for dead FUSE mounts of earlier engines; NodeUnstageVolume and the next engine start detach them",
                         metadata: ["path": "\(enginesDirectory)", "error": "\(error)"])
        }
    }
}

/// A backing whose volumes may be served by engines in this process.
public protocol EngineHosting: AnyObject {
    var engineHost: EngineHost { get }
}
