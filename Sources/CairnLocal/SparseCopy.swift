import CairnCore
import Foundation

/// Point-in-time copies of volume files for one machine's snapshots and clones.
///
/// On a filesystem with shared extents (xfs with reflink, btrfs) the copy is a clone of the
/// file (FICLONE): instant, no data written, and atomic against the file's writers — the
/// kernel drains direct I/O and holds new writes for the moment it takes. Elsewhere (ext4) it
/// is a sparse copy: only data extents (SEEK_DATA/SEEK_HOLE) are read and written. Either way
/// into a temporary file that is fsynced and renamed into place: the target is whole or absent.
public enum SparseCopy {
    public enum Method: Sendable, Equatable {
        /// FICLONE: the target shares the source's extents (copy-on-write).
        case reflink
        /// Data extents read and written.
        case copy
    }

    /// FICLONE, `_IOW(0x94, 9, int)`.
    static let ficlone: UInt = 0x4004_9409

    /// Copies `source` into `target`, `size` bytes long (cut or extended as sparse). With
    /// `requireReflink`, a filesystem without shared extents is an error instead of a copy.
    @discardableResult
    public static func copy(from source: String, to target: String, size: Int64, requireReflink: Bool = false) throws -> Method {
        let tmp = target + ".partial"
        let input = open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw SystemError("open \(source)", errno: errno) }
        defer { close(input) }
        let output = open(tmp, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard output >= 0 else { throw SystemError("create \(tmp)", errno: errno) }
        var ok = false
        defer {
            close(output)
            if !ok { unlink(tmp) }
        }
        let method: Method
        if ioctl(output, ficlone, input) == 0 {
            method = .reflink
            guard ftruncate(output, off_t(size)) == 0 else { throw SystemError("ftruncate \(tmp)", errno: errno) }
        } else {
            let e = errno
            // EOPNOTSUPP/ENOTTY/EINVAL: no shared extents here; EXDEV: another filesystem.
            guard !requireReflink else {
                throw SystemError("FICLONE \(source) → \(tmp) (this filesystem cannot share extents)", errno: e)
            }
            method = .copy
            guard ftruncate(output, 0) == 0, ftruncate(output, off_t(size)) == 0 else {
                throw SystemError("ftruncate \(tmp)", errno: errno)
            }
            try copyExtents(input: input, output: output, source: source, tmp: tmp, size: size)
        }
        guard fsync(output) == 0 else { throw SystemError("fsync \(tmp)", errno: errno) }
        guard rename(tmp, target) == 0 else { throw SystemError("rename \(tmp) → \(target)", errno: errno) }
        ok = true
        let dir = open((target as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
        return method
    }

    /// Whether files in `directory` can be cloned from files in `from` (FICLONE), tried on two
    /// small probe files.
    public static func canReflink(from: String, into directory: String) -> Bool {
        let source = from + "/.reflink-probe-\(getpid())"
        let target = directory + "/.reflink-probe-\(getpid()).clone"
        defer {
            unlink(source)
            unlink(target)
        }
        let input = open(source, O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0o600)
        guard input >= 0 else { return false }
        defer { close(input) }
        var block = [UInt8](repeating: 0x5A, count: 4096)
        guard pwrite(input, &block, block.count, 0) == block.count else { return false }
        let output = open(target, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o600)
        guard output >= 0 else { return false }
        defer { close(output) }
        return ioctl(output, ficlone, input) == 0
    }

    static func copyExtents(input: Int32, output: Int32, source: String, tmp: String, size: Int64) throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        // Glibc hides these behind _GNU_SOURCE; the values are Linux's.
        let seekData: Int32 = 3, seekHole: Int32 = 4
        var offset: off_t = 0
        while offset < off_t(size) {
            let data = lseek(input, offset, seekData)
            if data < 0 {
                if errno == ENXIO { break }  // only a hole is left
                throw SystemError("lseek SEEK_DATA \(source)", errno: errno)
            }
            if data >= off_t(size) { break }
            var end = lseek(input, data, seekHole)
            if end < 0 { throw SystemError("lseek SEEK_HOLE \(source)", errno: errno) }
            end = min(end, off_t(size))
            var at = data
            while at < end {
                let n = pread(input, buffer.baseAddress, min(buffer.count, Int(end - at)), at)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw SystemError("read \(source)", errno: errno)
                }
                if n == 0 { break }
                var written = 0
                while written < n {
                    let w = pwrite(output, buffer.baseAddress! + written, n - written, at + off_t(written))
                    if w < 0 {
                        if errno == EINTR { continue }
                        throw SystemError("write \(tmp)", errno: errno)
                    }
                    written += w
                }
                at += off_t(n)
            }
            offset = end
        }
    }

    /// Runs `body` with the filesystems mounted at `mountPaths` frozen (FIFREEZE … FITHAW):
    /// each is consistent on its device and its writes wait until the thaw.
    public static func frozen<T>(mountPaths: [String], _ body: () throws -> T) throws -> T {
        let freeze: UInt = 0xC004_5877  // _IOWR('X', 119, int)
        let thaw: UInt = 0xC004_5878    // _IOWR('X', 120, int)
        var held: [Int32] = []
        defer {
            for fd in held.reversed() {
                var zero: Int32 = 0
                _ = ioctl(fd, thaw, &zero)
                close(fd)
            }
        }
        for path in Set(mountPaths).sorted() {
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw SystemError("open \(path) to freeze its filesystem", errno: errno) }
            var zero: Int32 = 0
            guard ioctl(fd, freeze, &zero) == 0 else {
                let e = errno
                close(fd)
                throw SystemError("FIFREEZE \(path)", errno: e)
            }
            held.append(fd)
        }
        return try body()
    }
}
