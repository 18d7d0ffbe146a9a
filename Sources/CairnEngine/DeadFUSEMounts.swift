import CFUSEShim
import CairnCore
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Finds and removes the FUSE mounts of engines that no longer run.
///
/// A node process killed with SIGKILL leaves its engines' `fuse.cairn` mounts behind. The kernel
/// aborts such a connection when the last /dev/fuse descriptor closes, yet `stat()` of the mount
/// point still succeeds (the root's attributes are cached), so no ENOTCONN check finds it — and
/// the next engine start would mount on top of it. The rule here is ownership instead: a
/// `fuse.cairn` mount is **dead** unless an engine of *this process* serves it (its connection
/// id — the minor of the mount's device, `0:N` in mountinfo — is one this process mounted and has
/// not unmounted). One data directory belongs to one node process, so at its start every such
/// mount under `<data-dir>/engines/` is dead.
///
/// Removing one: abort its connection (fusectl `/sys/fs/fuse/connections/N/abort`: anything
/// still waiting on it fails at once instead of hanging), then detach it lazily (`MNT_DETACH`:
/// a loop device may still hold the file; it keeps the detached file until it is detached).
/// Only the topmost mount at a mount point can be unmounted; a dead mount under a live one is
/// aborted and reported, never unmounted, so a live engine is never detached.
public enum DeadFUSEMounts {
    /// The FUSE mounts this process's engines serve: resolved mount point → connection id
    /// (0 when unknown: then every mount at that point counts as live).
    private static let live = Mutex<[String: UInt32]>([:])

    static func register(mountPoint: String, connection: UInt32) {
        let key = Validate.realPath(mountPoint) ?? mountPoint
        live.withLock { $0[key] = connection }
    }

    static func unregister(mountPoint: String) {
        let key = Validate.realPath(mountPoint) ?? mountPoint
        live.withLock { $0[key] = nil }
    }

    /// Whether an engine of this process serves `mount`.
    public static func isLive(_ mount: MountInfo) -> Bool {
        live.withLock { table in
            guard let connection = table[mount.mountPoint] else { return false }
            return connection == 0 || connection == mount.minor
        }
    }

    /// The dead `fuse.cairn` mounts whose mount point is `directory` itself (`exactly`) or lies
    /// under it, in mountinfo order (a mount stacked on another comes after it).
    public static func find(under directory: String, exactly: Bool = false,
                            mountInfo: String = "/proc/self/mountinfo") throws -> [MountInfo] {
        let root = Validate.realPath(directory) ?? directory
        return try MountTable.read(mountInfo).filter { m in
            m.fsType == "fuse.cairn" && !isLive(m)
                && (m.mountPoint == root || (!exactly && m.mountPoint.hasPrefix(root.hasSuffix("/") ? root : root + "/")))
        }
    }

    /// Aborts and lazily unmounts every dead mount `find` names, stacked ones included, skipping
    /// the mount points `keep` says to leave mounted (they are aborted all the same). Returns the
    /// mount points it detached (one entry per mount). Throws when the mount table cannot be read.
    @discardableResult
    public static func detach(under directory: String, exactly: Bool = false, logger: Logger,
                              keep: (MountInfo) -> Bool = { _ in false },
                              mountInfo: String = "/proc/self/mountinfo") throws -> [String] {
        var detached: [String] = []
        var aborted = Set<UInt32>()
        var kept = Set<String>()
        // Each round unmounts the topmost mount of each point; stacked ones take more rounds.
        for _ in 0..<32 {
            let dead = try find(under: directory, exactly: exactly, mountInfo: mountInfo)
            for mount in dead where aborted.insert(mount.minor).inserted {
                cfuse_abort_connection(mount.minor)
            }
            let table = try MountTable.read(mountInfo)
            var progressed = false
            for point in Set(dead.map(\.mountPoint)).sorted(by: >) where !kept.contains(point) {
                guard let top = table.last(where: { $0.mountPoint == point }) else { continue }
                guard top.fsType == "fuse.cairn", !isLive(top) else {
                    logger.warning("a dead FUSE mount lies under a live mount; it was aborted, not unmounted",
                                   metadata: ["path": "\(point)", "top.fs_type": "\(top.fsType)", "top.source": "\(top.source)"])
                    kept.insert(point)
                    continue
                }
                if keep(top) {
                    logger.notice("aborted a dead engine's FUSE mount; left mounted until the volume's loop device is detached (NodeUnstageVolume)",
                                  metadata: ["path": "\(point)", "fuse.connection": "\(top.minor)", "source": "\(top.source)"])
                    kept.insert(point)
                    continue
                }
                // A loop device over the dead file can never serve again; detached lazily, it
                // would name "/volume" and nobody could find it by its path any more.
                releaseLoopDevices(over: point + "/volume", logger: logger)
                if umount2(point, Int32(MNT_DETACH)) == 0 {
                    logger.warning("detached a dead engine's FUSE mount (its process is gone)",
                                   metadata: ["path": "\(point)", "fuse.connection": "\(top.minor)", "source": "\(top.source)"])
                    detached.append(point)
                    progressed = true
                } else {
                    let e = errno
                    logger.error("could not detach a dead engine's FUSE mount; detach it by hand (umount -l)",
                                 metadata: ["path": "\(point)", "error": "\(String(cString: strerror(e)))"])
                    kept.insert(point)
                }
            }
            if !progressed { break }
        }
        return detached
    }

    /// Clears every loop device backed by `file` (LOOP_CLR_FD: at once when nothing else holds
    /// it open, otherwise the kernel marks it autoclear and it goes when its last opener closes).
    static func releaseLoopDevices(over file: String, logger: Logger) {
        let loopClearFD: UInt = 0x4C01
        for entry in LoopWriteCache.devices(backing: file) {
            let fd = open("/dev/\(entry)", O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                logger.error("cannot open a loop device over a dead engine's file to detach it; detach it by hand (losetup -d)",
                             metadata: ["device": "/dev/\(entry)", "file": "\(file)", "error": "\(String(cString: strerror(errno)))"])
                continue
            }
            defer { close(fd) }
            // Freed in write-through mode, it would drop the flushes of the next file attached.
            LoopWriteCache.restoreWriteBack(entry, logger: logger)
            if ioctl(fd, loopClearFD, 0) == 0 {
                logger.warning("detached a loop device over a dead engine's file (it goes once nothing holds it open)",
                               metadata: ["device": "/dev/\(entry)", "file": "\(file)"])
            } else {
                logger.error("could not detach a loop device over a dead engine's file; detach it by hand (losetup -d)",
                             metadata: ["device": "/dev/\(entry)", "file": "\(file)", "error": "\(String(cString: strerror(errno)))"])
            }
        }
    }
}
