import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Reads the kernel's generated files (/proc, /sys) whole.
///
/// Such a file has no size (stat says 0 or 4096) and the kernel hands it out in pieces: one
/// `read()` of /proc/self/mountinfo returns only the mounts that fit in a page or so (4,010 of
/// 4,268 bytes, say). Foundation's `String(contentsOfFile:)` stops after that first piece on
/// Linux, so a node with a long mount table missed its own mounts. Every reader of a /proc or
/// /sys file in Cairn goes through here: open, read until `read()` returns 0.
public enum ProcFile {
    /// The whole file's bytes. Throws `SystemError` (with errno: ENOENT for a process that
    /// exited or a device that went away) when it cannot be opened or read.
    public static func bytes(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("read \(path)", errno: errno)
            }
            if n == 0 { return out }
            out.append(contentsOf: chunk[0..<n])
        }
    }

    /// The whole file as text (procfs and sysfs write UTF-8, or bytes decoded leniently).
    public static func text(_ path: String) throws -> String {
        String(decoding: try bytes(path), as: UTF8.self)
    }

    /// The whole file as text, nil when it cannot be read (absent attribute, unbound device).
    public static func textIfReadable(_ path: String) -> String? {
        try? text(path)
    }
}
