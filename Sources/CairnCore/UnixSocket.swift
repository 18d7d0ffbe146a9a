#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Unix-domain socket addresses and connections (the agent socket, the FUSE keeper's).
public enum UnixSocket {
    /// The address of `path`; nil when the path does not fit in `sun_path`.
    public static func address(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            buffer.copyBytes(from: bytes)
            buffer[bytes.count] = 0
        }
        return address
    }

    /// A connected close-on-exec socket of `type` (SOCK_STREAM, SOCK_SEQPACKET) to `path`, or
    /// nil when nothing serves it.
    public static func connect(_ path: String, type: Int32) -> Int32? {
        guard var address = address(path) else { return nil }
        let fd = socket(AF_UNIX, type | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return nil }
        let r = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if r != 0 { close(fd); return nil }
        return fd
    }
}
