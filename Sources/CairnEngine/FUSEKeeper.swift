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

/// A FUSE connection kept open for a volume while the process serving it restarts.
///
/// The kernel keeps a FUSE mount — and every request a loop device or filesystem has in flight
/// on it — for as long as one descriptor of its `/dev/fuse` file is open. The **FUSE keeper**
/// (`cairn fuse-keeper`, a small process of its own) holds a duplicate of each engine's
/// descriptor, received over a unix socket (SCM_RIGHTS). When the engine's process dies, the
/// connection stays; the next engine of the volume gets the descriptor back, serves the
/// connection again and has the kernel resend what the dead one had read but not answered
/// (FUSE_NOTIFY_RESEND, Linux 6.9). See docs/design.md "Engines survive their process".
public struct KeptConnection: Codable, Sendable, Equatable {
    public var volumeID: String
    /// The engine's mount directory (`<data-dir>/engines/<id>`).
    public var mountPoint: String
    /// The kernel's connection id (minor of the mount's st_dev).
    public var connection: UInt32
    /// The FUSE protocol minor the kernel negotiated (>= 40: resend works).
    public var protoMinor: UInt32
    /// An encrypted volume's data key (docs/encryption.md), kept in the keeper's memory with the
    /// descriptor so that the next engine serves the connection without a new NodeStage; only
    /// over the keeper's root-only socket, never on disk. A keeper of an older release drops it,
    /// and the next engine then waits for NodeStage with the passphrase.
    public var dataKey: VolumeDataKey?

    public init(volumeID: String, mountPoint: String, connection: UInt32, protoMinor: UInt32, dataKey: VolumeDataKey? = nil) {
        self.dataKey = dataKey
        self.volumeID = volumeID
        self.mountPoint = mountPoint
        self.connection = connection
        self.protoMinor = protoMinor
    }
}

/// One message of the keeper protocol (SOCK_SEQPACKET, one JSON object per packet, at most one
/// descriptor with it). Version 1.
struct KeeperMessage: Codable {
    static let version = 1
    var op: String?            // hello | hold | drop | list (requests)
    var ok: Bool?              // replies
    var error: String?
    var entry: KeptConnection? // hold (request), list (one reply per entry)
    var volumeID: String?      // drop
    var count: Int?            // list's last reply, hello
    var pid: Int32?            // hello
    var version: Int?          // hello
    var more: Bool?            // list: an entry follows
}

private func encode(_ message: KeeperMessage) -> [UInt8] {
    (try? Array(JSONEncoder().encode(message))) ?? Array("{}".utf8)
}

private func decode(_ bytes: ArraySlice<UInt8>) -> KeeperMessage? {
    try? JSONDecoder().decode(KeeperMessage.self, from: Data(bytes))
}

private let maxPacket = 64 * 1024

private func connectSeqpacket(_ path: String, timeoutSeconds: Int = 2) -> Int32? {
    guard let fd = UnixSocket.connect(path, type: Int32(SOCK_SEQPACKET.rawValue)) else { return nil }
    // A keeper that stops answering must never hang an engine's start or stop: every send and
    // receive gives up after the timeout (the caller then treats the keeper as absent).
    var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
    _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    return fd
}

private func send(_ socket: Int32, _ message: KeeperMessage, fd: Int32 = -1) -> Bool {
    let bytes = encode(message)
    return bytes.withUnsafeBytes { cfuse_send_with_fd(socket, $0.baseAddress, $0.count, fd) } == bytes.count
}

private func receive(_ socket: Int32) -> (KeeperMessage, Int32)? {
    var buffer = [UInt8](repeating: 0, count: maxPacket)
    var fd: Int32 = -1
    let n = buffer.withUnsafeMutableBytes { cfuse_receive_with_fd(socket, $0.baseAddress, $0.count, &fd) }
    guard n > 0, let message = decode(buffer[0..<Int(n)]) else {
        if fd >= 0 { close(fd) }
        return nil
    }
    return (message, fd)
}

// MARK: The keeper process

/// `cairn fuse-keeper --socket PATH`: holds FUSE descriptors for the engines of one data
/// directory. It does nothing else — no store, no network, no FUSE I/O — so it never needs a
/// restart for an upgrade of the engines. It drops an entry when the engine asks (unstage), when
/// an entry for the same volume replaces it, or when the kernel reports the connection gone
/// (POLLERR: unmounted and released, or aborted). Started by an engine process (spawn mode) it
/// exits when it holds nothing and no engine process is connected (after a first 30 s of
/// grace); run as its own unit it stays. SIGTERM/SIGINT end it.
public enum FUSEKeeperServer {
    public static func run(socketPath: String, pidFile: String?, exitWhenIdle: Bool, logger: Logger) throws -> Never {
        var sigset = sigset_t()
        sigemptyset(&sigset)
        signal(SIGPIPE, SIG_IGN)

        if let existing = connectSeqpacket(socketPath) {
            close(existing)
            throw CairnError.failedPrecondition("a FUSE keeper already serves \(socketPath)")
        }
        unlink(socketPath)
        guard var address = UnixSocket.address(socketPath) else {
            throw CairnError.invalidArgument("the keeper socket path \(socketPath) is too long for a unix socket")
        }
        let listener = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard listener >= 0 else { throw SystemError("socket", errno: errno) }
        let old = umask(0o077)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(old)
        guard bound == 0 else { throw SystemError("bind \(socketPath)", errno: errno) }
        guard listen(listener, 16) == 0 else { throw SystemError("listen \(socketPath)", errno: errno) }
        if let pidFile {
            try? "\(getpid())\n".write(toFile: pidFile, atomically: true, encoding: .utf8)
        }
        logger.info("FUSE keeper serving", metadata: ["socket": "\(socketPath)", "pid": "\(getpid())"])

        var held: [String: (entry: KeptConnection, fd: Int32)] = [:]
        var clients: [Int32] = []
        let started = Date()
        var stopping = false
        // SIGTERM/SIGINT end the loop (signalfd-free: a flag set by the handler, poll wakes on EINTR).
        signal(SIGTERM) { _ in FUSEKeeperServer.stopRequested.store(true, ordering: .relaxed) }
        signal(SIGINT) { _ in FUSEKeeperServer.stopRequested.store(true, ordering: .relaxed) }

        // Held connections are looked at once a second (a poll that does not wait), never waited
        // on: the kernel wakes every waiter on a /dev/fuse descriptor each time it queues a
        // request (FUSE passes no event mask with the wake-up), so a wait for errors only still
        // woke this process once per I/O of every kept volume — tens of thousands of wake-ups a
        // second under load, on the CPUs the I/O itself needs (docs/engine.md, "The keeper's
        // wake-ups"). A connection the kernel ended is dropped within a second instead of at once.
        var lastHeldCheck = ContinuousClock.now
        while !stopping {
            let polled = clients
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
            fds += polled.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let n = poll(&fds, nfds_t(fds.count), 1000)
            if stopRequested.load(ordering: .relaxed) { stopping = true; break }
            let now = ContinuousClock.now
            if now - lastHeldCheck >= .seconds(1) {
                dropEnded(&held, logger: logger)
                lastHeldCheck = now
            }
            if n < 0 { continue }
            var closed = Set<Int32>()
            for (i, client) in polled.enumerated() where fds[1 + i].revents != 0 {
                guard let (message, fd) = receive(client) else {
                    closed.insert(client)
                    continue
                }
                handle(message, fd: fd, client: client, held: &held, logger: logger)
            }
            for client in closed { close(client) }
            clients.removeAll { closed.contains($0) }
            if fds[0].revents & Int16(POLLIN) != 0 {
                let client = accept(listener, nil, nil)
                if client >= 0 {
                    _ = fcntl(client, F_SETFD, FD_CLOEXEC)
                    clients.append(client)
                }
            }
            if exitWhenIdle && held.isEmpty && clients.isEmpty && Date().timeIntervalSince(started) > 30 {
                logger.info("FUSE keeper exiting: it holds no connection and no engine process is connected")
                break
            }
        }
        if !held.isEmpty {
            logger.warning("FUSE keeper stopping while it holds connections; they stay only while an engine holds them too",
                           metadata: ["held": "\(held.keys.sorted())"])
        }
        unlink(socketPath)
        if let pidFile { unlink(pidFile) }
        exit(0)
    }

    static let stopRequested = Atomic<Bool>(false)

    /// Drops the held connections the kernel has ended (unmounted and released, or aborted):
    /// one poll of them that does not wait, so the keeper never sleeps on a /dev/fuse descriptor.
    static func dropEnded(_ held: inout [String: (entry: KeptConnection, fd: Int32)], logger: Logger) {
        let keys = held.keys.sorted()
        guard !keys.isEmpty else { return }
        var fds = keys.map { pollfd(fd: held[$0]!.fd, events: 0, revents: 0) }
        guard poll(&fds, nfds_t(fds.count), 0) > 0 else { return }
        for (i, key) in keys.enumerated() where fds[i].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
            guard let gone = held[key], gone.fd == fds[i].fd else { continue }
            held[key] = nil
            close(gone.fd)
            logger.info("the kernel ended a kept FUSE connection (unmounted or aborted); dropped it",
                        metadata: ["volume.id": "\(key)", "fuse.connection": "\(gone.entry.connection)"])
        }
    }

    private static func handle(_ message: KeeperMessage, fd: Int32, client: Int32,
                               held: inout [String: (entry: KeptConnection, fd: Int32)], logger: Logger) {
        switch message.op {
        case "hello":
            dropEnded(&held, logger: logger)
            _ = send(client, KeeperMessage(ok: true, count: held.count, pid: getpid(), version: KeeperMessage.version))
        case "hold":
            guard let entry = message.entry, fd >= 0 else {
                if fd >= 0 { close(fd) }
                _ = send(client, KeeperMessage(ok: false, error: "hold needs an entry and a descriptor"))
                return
            }
            if let old = held.updateValue((entry, fd), forKey: entry.volumeID), old.fd != fd { close(old.fd) }
            logger.info("holding a FUSE connection", metadata: [
                "volume.id": "\(entry.volumeID)", "fuse.connection": "\(entry.connection)", "path": "\(entry.mountPoint)"])
            _ = send(client, KeeperMessage(ok: true))
        case "drop":
            if fd >= 0 { close(fd) }
            if let id = message.volumeID, let old = held.removeValue(forKey: id) {
                close(old.fd)
                logger.info("dropped a FUSE connection", metadata: ["volume.id": "\(id)"])
            }
            _ = send(client, KeeperMessage(ok: true))
        case "list":
            if fd >= 0 { close(fd) }
            // Exact (as hello's count), not as of the last once-a-second look: a restarted engine
            // process must not take a connection the kernel already ended for one it can resume.
            dropEnded(&held, logger: logger)
            for key in held.keys.sorted() {
                _ = send(client, KeeperMessage(entry: held[key]!.entry, more: true), fd: held[key]!.fd)
            }
            _ = send(client, KeeperMessage(ok: true, count: held.count))
        default:
            if fd >= 0 { close(fd) }
            _ = send(client, KeeperMessage(ok: false, error: "unknown keeper operation \(message.op ?? "none")"))
        }
    }
}

// MARK: The engine side

/// How the engine-running process reaches its FUSE keeper.
public enum FUSEKeeperMode: String, Sendable, CaseIterable {
    /// Start `cairn fuse-keeper` (detached, its own session) when none serves the socket.
    case spawn
    /// Another unit runs it (Kubernetes DaemonSet, systemd unit); wait for it, never start one.
    case external
    /// No keeper: a restart of the engine process loses the volumes' I/O (as before issue 14).
    case off
}

/// The engine process's side of the keeper: hands each engine's descriptor over, takes them back
/// after a restart, and watches the keeper — if it dies, it is started again (spawn mode) and
/// given every descriptor this process still holds, so a keeper restart costs nothing either.
public final class FUSEKeeperClient: Sendable {
    public let socketPath: String
    public let mode: FUSEKeeperMode
    let logger: Logger
    private struct State {
        /// This process's own duplicates of what it handed over, to hand over again.
        var handed: [String: (entry: KeptConnection, fd: Int32)] = [:]
        /// The presence connection: the keeper stays while an engine process is connected.
        var presence: Int32 = -1
        var watching = false
        var warnedAbsent = false
    }
    private let state = Mutex<State>(State())

    public init(socketPath: String, mode: FUSEKeeperMode, logger: Logger) {
        self.socketPath = socketPath
        self.mode = mode
        var logger = logger
        logger[metadataKey: "keeper.socket"] = "\(socketPath)"
        self.logger = logger
    }

    public var enabled: Bool { mode != .off }

    /// Connects (starting the keeper in spawn mode) and starts watching it. Returns the
    /// connections it holds for this data directory: the engines of a dead predecessor.
    public func start() -> [(KeptConnection, Int32)] {
        guard enabled else { return [] }
        // Watched whether or not it answers now: an external keeper may start after this
        // process; once it answers, it is handed every connection this process holds.
        defer { startWatching() }
        guard ensureConnected() else { return [] }
        return list()
    }

    /// Hands `fd` (the session's /dev/fuse descriptor; duplicated here) to the keeper.
    public func hold(_ entry: KeptConnection, fd: Int32) {
        guard enabled else { return }
        let own = fcntl(fd, F_DUPFD_CLOEXEC, 3)
        guard own >= 0 else {
            logger.warning("cannot duplicate a FUSE descriptor for the keeper; this volume's I/O will not survive a restart of this process",
                           metadata: ["volume.id": "\(entry.volumeID)", "error": "\(String(cString: strerror(errno)))"])
            return
        }
        let previous = state.withLock { $0.handed.updateValue((entry, own), forKey: entry.volumeID) }
        if let previous { close(previous.fd) }
        if !request(KeeperMessage(op: "hold", entry: entry), fd: own) {
            logger.warning("the FUSE keeper did not take the volume's connection; it is handed over when the keeper is back",
                           metadata: ["volume.id": "\(entry.volumeID)"])
        }
    }

    /// The engine stopped for good (unstage): the keeper lets go of the connection.
    public func drop(volumeID: String) {
        guard enabled else { return }
        if let previous = state.withLock({ $0.handed.removeValue(forKey: volumeID) }) { close(previous.fd) }
        _ = request(KeeperMessage(op: "drop", volumeID: volumeID))
    }

    /// Whether the keeper answers (for status output).
    public func hello() -> (pid: Int32, held: Int)? {
        guard enabled, let fd = connectSeqpacket(socketPath) else { return nil }
        defer { close(fd) }
        guard send(fd, KeeperMessage(op: "hello")), let (reply, extra) = receive(fd) else { return nil }
        if extra >= 0 { close(extra) }
        return (reply.pid ?? 0, reply.count ?? 0)
    }

    private func list() -> [(KeptConnection, Int32)] {
        guard let fd = connectSeqpacket(socketPath) else { return [] }
        defer { close(fd) }
        guard send(fd, KeeperMessage(op: "list")) else { return [] }
        var result: [(KeptConnection, Int32)] = []
        while let (message, received) = receive(fd) {
            if let entry = message.entry, received >= 0 {
                result.append((entry, received))
            } else if received >= 0 {
                close(received)
            }
            if message.more != true { break }
        }
        return result
    }

    private func request(_ message: KeeperMessage, fd: Int32 = -1) -> Bool {
        guard let socket = connectSeqpacket(socketPath) else { return false }
        defer { close(socket) }
        guard send(socket, message, fd: fd), let (reply, extra) = receive(socket) else { return false }
        if extra >= 0 { close(extra) }
        if reply.ok != true {
            logger.warning("the FUSE keeper refused a request", metadata: ["error": "\(reply.error ?? "")"])
        }
        return reply.ok == true
    }

    /// Connects the presence socket, starting the keeper if allowed. True when connected.
    private func ensureConnected() -> Bool {
        if let fd = connectSeqpacket(socketPath) {
            setPresence(fd)
            return true
        }
        guard mode == .spawn else {
            if state.withLock({ s in defer { s.warnedAbsent = true }; return !s.warnedAbsent }) {
                logger.warning("no FUSE keeper answers (--fuse-keeper external); until one runs, staged volumes' I/O does not survive a restart of this process: start `cairn fuse-keeper --socket \(socketPath)` (its own unit or DaemonSet)")
            }
            return false
        }
        spawnKeeper()
        for _ in 0..<50 {
            if let fd = connectSeqpacket(socketPath) {
                setPresence(fd)
                return true
            }
            usleep(100_000)
        }
        logger.error("started a FUSE keeper but it does not answer; see its log beside the socket",
                     metadata: ["log": "\(logPath)"])
        return false
    }

    private var logPath: String { (socketPath as NSString).deletingPathExtension + ".log" }
    private var pidPath: String { (socketPath as NSString).deletingPathExtension + ".pid" }

    private func setPresence(_ fd: Int32) {
        let old = state.withLock { s in
            defer { s.presence = fd; s.warnedAbsent = false }
            return s.presence
        }
        if old >= 0 { close(old) }
    }

    private func spawnKeeper() {
        let executable = "/proc/self/exe"
        let arguments = ["cairn", "fuse-keeper", "--socket", socketPath, "--pid-file", pidPath, "--exit-when-idle"]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // None of this process's descriptors (sockets, replicas' files, FUSE devices) go along.
        cfuse_spawn_close_from(&actions, 3)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Its own session and process group: a signal to this process's group (a supervisor's
        // kill, the test bed's) does not reach it.
        let setsid: Int16 = 0x80  // POSIX_SPAWN_SETSID
        posix_spawnattr_setflags(&attributes, setsid | Int16(POSIX_SPAWN_SETSIGMASK) | Int16(POSIX_SPAWN_SETSIGDEF))
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var defaults = sigset_t()
        sigfillset(&defaults)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var spawned: pid_t = 0
        let r = posix_spawn(&spawned, executable, &actions, &attributes, &argv, environ)
        let pid = spawned
        if r == 0 {
            logger.info("started a FUSE keeper: it holds the volumes' FUSE connections while this process restarts",
                        metadata: ["keeper.pid": "\(pid)", "log": "\(logPath)"])
            // Reaped by nobody while we live: detach it from us (it is its own session; its
            // zombie, should it exit first, is collected by the reaper thread below).
            Thread.detachNewThread { var status: Int32 = 0; waitpid(pid, &status, 0) }
        } else {
            logger.error("cannot start the FUSE keeper", metadata: ["error": "\(String(cString: strerror(r)))"])
        }
    }

    /// Every 2 s: if the keeper went away (its presence socket hung up), connect again — starting
    /// it in spawn mode — and hand over every descriptor this process holds.
    private func startWatching() {
        let start = state.withLock { s in
            defer { s.watching = true }
            return !s.watching
        }
        guard start else { return }
        Thread.detachNewThread { [self] in
            while true {
                sleep(2)
                let presence = state.withLock { $0.presence }
                var alive = false
                if presence >= 0 {
                    var p = pollfd(fd: presence, events: Int16(POLLIN), revents: 0)
                    alive = poll(&p, 1, 0) == 0
                }
                if alive { continue }
                guard ensureConnected() else { continue }
                let handed = state.withLock { $0.handed }
                for (_, item) in handed {
                    _ = request(KeeperMessage(op: "hold", entry: item.entry), fd: item.fd)
                }
                logger.notice("a FUSE keeper answers (again); handed it every connection this process holds",
                               metadata: ["volumes": "\(handed.keys.sorted())"])
            }
        }
    }
}

/// What this kernel can do to keep I/O across a restart of the engines' process, checked at
/// start-up and shown by `cairn` (the per-connection truth is the protocol minor at INIT).
public enum FUSEResume {
    /// FUSE_NOTIFY_RESEND came with protocol 7.40, Linux 6.9.
    public static func kernelSupportsResend(release: String = kernelRelease()) -> Bool {
        let parts = release.split(whereSeparator: { !$0.isNumber }).prefix(2).compactMap { Int($0) }
        guard parts.count == 2 else { return false }
        return parts[0] > 6 || (parts[0] == 6 && parts[1] >= 9)
    }

    public static func kernelRelease() -> String {
        var name = utsname()
        uname(&name)
        return withUnsafeBytes(of: &name.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }
}

/// A kept connection's descriptor as the keeper handed it back, owned: closed when released.
public final class KeptFUSE: Sendable {
    public let entry: KeptConnection
    public let fd: Int32

    public init(entry: KeptConnection, fd: Int32) {
        self.entry = entry
        self.fd = fd
    }

    deinit { close(fd) }
}
