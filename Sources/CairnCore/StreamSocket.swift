#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Writing to a connected stream socket from several buffers at once.
public enum StreamSocket {
    /// sendmsg with one iovec per part until every byte of `parts` is written (short writes,
    /// EINTR); never raises SIGPIPE. Usually one system call, whatever the number of parts (up to
    /// IOV_MAX, 1024 on Linux, per call).
    public static func sendAll(_ fd: Int32, _ parts: [UnsafeRawBufferPointer]) throws(SystemError) {
        var iov = parts.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress!), iov_len: $0.count) }
        var first = 0
        while first < iov.count {
            let n = iov.withUnsafeMutableBufferPointer { v -> Int in
                var msg = msghdr()
                msg.msg_iov = v.baseAddress! + first
                msg.msg_iovlen = min(v.count - first, 1024)
                return sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("send", errno: errno)
            }
            var left = n
            while left > 0, first < iov.count {
                if left >= iov[first].iov_len {
                    left -= iov[first].iov_len
                    first += 1
                } else {
                    iov[first].iov_base += left
                    iov[first].iov_len -= left
                    left = 0
                }
            }
        }
    }
}
