// POSIX TCP plumbing shared by the replica server and client: resolve, listen, connect with a
// timeout, send fully, and plain threads. No framing here (Frame*.swift) and no policy.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CDirectIO
import CairnCore

enum Socket {
    /// Resolves `host` (a name or a literal address) for a TCP socket; the caller frees the list.
    private static func resolve(_ host: String, port: UInt16, passive: Bool) throws -> UnsafeMutablePointer<addrinfo> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &list)
        guard rc == 0, let list else {
            let reason = rc == EAI_SYSTEM ? String(cString: strerror(errno)) : String(cString: gai_strerror(rc))
            throw SocketError("cannot resolve \(host):\(port): \(reason)")
        }
        return list
    }

    /// Binds and listens (SO_REUSEADDR) on the first address `host` resolves to; returns the
    /// descriptor and the bound port (the kernel's choice when `port` is 0).
    static func listen(host: String, port: UInt16, backlog: Int32 = 128) throws -> (fd: Int32, port: UInt16) {
        let list = try resolve(host, port: port, passive: true)
        defer { freeaddrinfo(list) }
        var lastError = "no address"
        var ai: UnsafeMutablePointer<addrinfo>? = list
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            guard fd >= 0 else { lastError = "socket: \(String(cString: strerror(errno)))"; continue }
            var one: Int32 = 1
            _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            guard bind(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 else {
                lastError = "bind: \(String(cString: strerror(errno)))"
                Glibc.close(fd)
                continue
            }
            guard Glibc.listen(fd, backlog) == 0 else {
                lastError = "listen: \(String(cString: strerror(errno)))"
                Glibc.close(fd)
                continue
            }
            return (fd, localPort(fd))
        }
        throw SocketError("cannot listen on \(ReplicaAddress(host: host, port: port)): \(lastError)")
    }

    /// Connects within `timeout` to the first address that answers; returns a blocking socket
    /// with TCP_NODELAY on.
    static func connect(host: String, port: UInt16, timeout: Duration) throws -> Int32 {
        let list = try resolve(host, port: port, passive: false)
        defer { freeaddrinfo(list) }
        let deadline = ContinuousClock.now + timeout
        var lastError = "no address"
        var ai: UnsafeMutablePointer<addrinfo>? = list
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), a.pointee.ai_protocol)
            guard fd >= 0 else { lastError = "socket: \(String(cString: strerror(errno)))"; continue }
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            if Glibc.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) != 0 {
                guard errno == EINPROGRESS else {
                    lastError = String(cString: strerror(errno))
                    Glibc.close(fd)
                    continue
                }
                var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                var ready: Int32 = -1
                repeat {
                    let left = ContinuousClock.now.duration(to: deadline)
                    let ms = max(0, Int32(clamping: left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
                    ready = poll(&pfd, 1, ms)
                } while ready < 0 && errno == EINTR
                guard ready > 0 else {
                    lastError = ready == 0 ? "timed out after \(timeout)" : String(cString: strerror(errno))
                    Glibc.close(fd)
                    continue
                }
                var soError: Int32 = 0
                var len = socklen_t(MemoryLayout<Int32>.size)
                _ = getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len)
                guard soError == 0 else {
                    lastError = String(cString: strerror(soError))
                    Glibc.close(fd)
                    continue
                }
            }
            _ = fcntl(fd, F_SETFL, flags)
            setNoDelay(fd)
            return fd
        }
        throw SocketError("cannot connect to replica server \(ReplicaAddress(host: host, port: port)): \(lastError)")
    }

    static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Writes every byte (retrying short writes and EINTR); never raises SIGPIPE.
    static func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        let flags = Int32(MSG_NOSIGNAL)
        while done < bytes.count {
            let n = send(fd, bytes.baseAddress! + done, bytes.count - done, flags)
            if n < 0 {
                if errno == EINTR { continue }
                throw SocketError("send: \(String(cString: strerror(errno)))")
            }
            done += n
        }
    }

    static func localPort(_ fd: Int32) -> UInt16 {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        guard rc == 0 else { return 0 }
        return port(of: storage)
    }

    /// "host:port" of the socket's peer, for logs.
    static func peerName(_ fd: Int32) -> String {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) }
        }
        guard rc == 0 else { return "unknown peer" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        let ok = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, len, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST) == 0
            }
        }
        let name = ok ? String(decoding: host.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
        return ReplicaAddress(host: name, port: port(of: storage)).description
    }

    private static func port(of storage: sockaddr_storage) -> UInt16 {
        var storage = storage
        return withUnsafePointer(to: &storage) { p in
            switch Int32(p.pointee.ss_family) {
            case AF_INET: p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
            case AF_INET6: p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            default: 0
            }
        }
    }
}

struct SocketError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Runs `body` on a new detached POSIX thread (the replica server's and client's readers block
/// in recv, so they get threads of their own rather than a shared pool's).
func startThread(_ body: @escaping @Sendable () -> Void) throws {
    final class Box { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { arg in
        let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
        // These threads serve replica I/O that a volume's writes wait for (on this node, for a
        // volume staged here): their allocations must never wait for writeback to it.
        _ = cdio_mark_io_flusher()
        box.body()
        return nil
    }, box)
    guard rc == 0 else {
        Unmanaged<Box>.fromOpaque(box).release()
        throw SystemError("pthread_create", errno: rc)
    }
    pthread_detach(thread)
}

/// A replica server's address, "host:port" (IPv6 literals in brackets: "[::1]:7420").
public struct ReplicaAddress: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    /// Parses "host:port" or "[ipv6]:port"; the port is required (1–65535).
    public init(_ string: String) throws {
        guard let (host, portText) = HostPort.split(string) else {
            throw CairnError.invalidArgument(string.hasPrefix("[")
                ? "replica address \"\(string)\" must look like [ipv6]:port"
                : "replica address \"\(string)\" must look like host:port (IPv6 in brackets: [::1]:7420)")
        }
        guard !host.isEmpty else { throw CairnError.invalidArgument("replica address \"\(string)\" has no host") }
        guard let port = UInt16(portText), port != 0 else {
            throw CairnError.invalidArgument("replica address \"\(string)\" has no valid port (1–65535)")
        }
        self.init(host: String(host), port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
