import CairnCore
import CairnProcess
import CairnRPC
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A real `cairn serve --role all` process on a private temporary directory, for tests that
/// drive the plugin through gRPC as a CO would.
///
/// Layout of the directory (`root`, made by mkdtemp as /tmp/cairn-it.XXXXXX):
///
///     root/csi.sock        the endpoint
///     root/agent.sock      the agent socket (hot-plug), unless extraArguments name another
///     root/cairn.log       stdout and stderr of every start of the process (appended)
///     root/data/           --data-dir (store, volumes/<id>.img)
///     root/staging/        where tests put staging paths (--path-root is root)
///     root/pods/           where tests put target paths
///
/// `tearDown` must run whatever happened (tests call it from XCTest's tearDown): it stops the
/// process, unmounts everything under `root` (and under any foreign path a test registered),
/// detaches every loop device backed by a file under `root`, and removes the directory.
final class PluginProcess: @unchecked Sendable {
    struct Exit: Sendable, CustomStringConvertible {
        var status: Int32
        var bySignal: Bool
        var seconds: Double
        /// True when SIGTERM was not enough and the process had to be SIGKILLed.
        var killed: Bool

        var cleanZero: Bool { !bySignal && status == 0 && !killed }
        var description: String {
            let how = bySignal ? "signal \(status)" : "exit status \(status)"
            return "\(how) after \(String(format: "%.2f", seconds)) s\(killed ? " (SIGKILLed: SIGTERM was ignored)" : "")"
        }
    }


    static let readyTimeout: Duration = .seconds(30)
    static let stopGrace: Duration = .seconds(15)

    let root: String
    let nodeID: String
    let capacity: String
    let binary: String
    let extraArguments: [String]
    /// How the endpoint and node id reach the process: as flags (the default), or the way a
    /// Mesos managed plugin gets them — `CSI_ENDPOINT` (a socket in a directory of its own, as
    /// Mesos's /tmp/mesos-csi-XXXXXX/endpoint.sock) and `MESOS_AGENT_ID` in the environment,
    /// with neither `--endpoint` nor `--node-id` on the command line.
    let launch: Launch
    /// A command the plugin is started through (its argv ends with `cairn serve …`), e.g.
    /// `unshare --mount …` for a plugin in a mount namespace of its own; empty: started directly.
    /// The command must exec the plugin, so that `pid` is the plugin's.
    let launchPrefix: [String]

    enum Launch: Sendable {
        case flags
        case mesosManagedPlugin
    }

    var dataDir: String { root + "/data" }
    var volumesDir: String { dataDir + "/volumes" }
    var socketPath: String {
        switch launch {
        case .flags: root + "/csi.sock"
        case .mesosManagedPlugin: root + "/mesos-csi-endpoint/endpoint.sock"
        }
    }
    var endpoint: String { "unix://" + socketPath }
    var logPath: String { root + "/cairn.log" }
    /// The agent socket `--role all` serves (for `cairn volume attach|detach`): one per
    /// fixture, so plugins never compete for /run/cairn/agent.sock.
    var agentSocketPath: String { root + "/agent.sock" }
    var stagingDir: String { root + "/staging" }
    var podsDir: String { root + "/pods" }

    private let lock = NSLock()
    private var process: Process?
    private var currentChannel: GRPCChannel?
    private var lastExit: Exit?
    /// Paths outside `root` a test pointed the plugin at (e.g. /etc/cairn-evil-…): if the plugin
    /// wrongly created or mounted anything there, tearDown undoes it.
    private var foreignPaths: [String] = []
    private var tornDown = false

    /// Makes the temporary directory; does not start the process (see `start`).
    init(capacity: String = "20Gi", nodeID: String = "it-node", extraArguments: [String] = [],
         launch: Launch = .flags, launchPrefix: [String] = []) throws {
        self.binary = try Self.locateBinary()
        self.launch = launch
        self.launchPrefix = launchPrefix
        self.capacity = capacity
        self.nodeID = nodeID
        self.extraArguments = extraArguments
        root = try Self.makeTemporaryRoot("cairn-it")
        for dir in [stagingDir, podsDir, (socketPath as NSString).deletingLastPathComponent] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
    }

    // MARK: Finding the binary

    /// `swift build` puts `cairn` next to the test bundle (.build/<triple>/debug/). Looks there
    /// first, then at $CAIRN_BINARY.
    static func locateBinary() throws -> String {
        var candidates: [String] = []
        if let exe = Validate.realPath("/proc/self/exe") {
            candidates.append((exe as NSString).deletingLastPathComponent + "/cairn")
        }
        let bundle = Bundle.main.bundleURL.path
        candidates.append(bundle + "/cairn")
        candidates.append((bundle as NSString).deletingLastPathComponent + "/cairn")
        if let argv0 = CommandLine.arguments.first, let resolved = Validate.realPath(argv0) {
            candidates.append((resolved as NSString).deletingLastPathComponent + "/cairn")
        }
        if let env = ProcessInfo.processInfo.environment["CAIRN_BINARY"], !env.isEmpty {
            candidates.append(env)
        }
        var seen = Set<String>()
        candidates = candidates.filter { seen.insert($0).inserted }
        for candidate in candidates {
            var st = stat()
            if stat(candidate, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, access(candidate, X_OK) == 0 {
                warnIfStale(candidate, builtAt: st.st_mtim.tv_sec)
                return candidate
            }
        }
        throw FixtureError(
            "the cairn binary was not found (looked at \(candidates.joined(separator: ", "))): run `swift build` first (or set CAIRN_BINARY to its path)")
    }

    private static let staleWarning = LockedBox(false)

    /// Prints (once) when a file under Sources/ is newer than the binary: the tests would then
    /// exercise yesterday's plugin. A warning, not a failure: colleagues edit Sources/ while tests run.
    static func warnIfStale(_ binary: String, builtAt: Int) {
        guard staleWarning.withLock({ (warned: inout Bool) -> Bool in defer { warned = true }; return !warned }) else { return }
        let sources = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources").path
        guard let walker = FileManager.default.enumerator(atPath: sources) else { return }
        for case let file as String in walker where file.hasSuffix(".swift") || file.hasSuffix(".cpp") || file.hasSuffix(".h") {
            var st = stat()
            if stat(sources + "/" + file, &st) == 0, st.st_mtim.tv_sec > builtAt {
                print("warning: \(binary) is older than Sources/\(file); run `swift build` so the tests exercise the current plugin")
                return
            }
        }
    }

    // MARK: Process

    var channel: GRPCChannel {
        lock.withLock {
            guard let currentChannel else { preconditionFailure("the plugin is not running; call start() first") }
            return currentChannel
        }
    }

    var isRunning: Bool { lock.withLock { process?.isRunning ?? false } }
    var pid: Int32? { lock.withLock { process.map(\.processIdentifier) } }

    /// Starts `cairn serve` and waits (at most 30 s) until Probe answers OK.
    func start() async throws {
        precondition(!isRunning, "the plugin is already running")
        var environment = ProcessInfo.processInfo.environment
        environment["CSI_ENDPOINT"] = nil
        environment["MESOS_AGENT_ID"] = nil
        let identity: [String]
        switch launch {
        case .flags:
            identity = ["--endpoint", endpoint, "--node-id", nodeID]
        case .mesosManagedPlugin:
            identity = []
            environment["CSI_ENDPOINT"] = endpoint
            environment["MESOS_AGENT_ID"] = nodeID
        }
        let arguments = ["serve", "--role", "all"] + identity + [
            "--data-dir", dataDir, "--path-root", root, "--capacity", capacity, "--log-level", "debug",
        ] + (extraArguments.contains("--agent-socket") ? [] : ["--agent-socket", agentSocketPath]) + extraArguments
        let shownEnvironment = launch == .flags ? "" : "CSI_ENDPOINT=\(endpoint) MESOS_AGENT_ID=\(nodeID) "
        // launchPrefix[0]: an absolute path
        let process = try Self.launch(launchPrefix + [binary] + arguments, environment: environment,
                                      shownEnvironment: shownEnvironment, logPath: logPath)
        lock.withLock {
            self.process = process
            self.currentChannel = nil
        }
        try await waitUntilReady(process)
    }

    private func waitUntilReady(_ process: Process) async throws {
        let deadline = ContinuousClock.now + Self.readyTimeout
        var last = "the socket \(socketPath) never appeared"
        while ContinuousClock.now < deadline {
            if !process.isRunning {
                throw FixtureError(
                    "cairn exited (status \(process.terminationStatus)) before answering Probe; its log:\n\(logTail())")
            }
            if FileManager.default.fileExists(atPath: socketPath) {
                // A fresh channel per attempt: a channel that failed to connect backs off.
                let candidate = GRPCChannel(target: endpoint)
                let reply = await candidate.callRaw("/csi.v1.Identity/Probe", [], timeout: .seconds(2))
                if reply.code == .ok {
                    lock.withLock { currentChannel = candidate }
                    return
                }
                last = "Probe answered \(reply.code): \(reply.message)"
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
        throw FixtureError("cairn did not answer Probe with OK within \(Self.readyTimeout) (\(last)); its log:\n\(logTail())")
    }

    /// SIGTERM, wait up to 15 s, then SIGKILL. Returns how the process ended (nil if it was never
    /// started). Safe to call when it has already exited.
    @discardableResult
    func stop() async -> Exit? {
        guard let process = lock.withLock({ () -> Process? in
            let p = self.process
            self.process = nil
            self.currentChannel = nil
            return p
        }) else { return lock.withLock { lastExit } }

        let started = ContinuousClock.now
        var killed = false
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            if !(await waitForExit(process, within: Self.stopGrace)) {
                killed = true
                kill(process.processIdentifier, SIGKILL)
                _ = await waitForExit(process, within: .seconds(10))
            }
        }
        let elapsed = ContinuousClock.now - started
        let exit = Exit(
            status: process.isRunning ? -1 : process.terminationStatus,
            bySignal: process.isRunning ? false : process.terminationReason == .uncaughtSignal,
            seconds: Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18,
            killed: killed)
        lock.withLock { lastExit = exit }
        return exit
    }

    private func waitForExit(_ process: Process, within limit: Duration) async -> Bool {
        let deadline = ContinuousClock.now + limit
        while process.isRunning && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        return !process.isRunning
    }

    /// SIGKILL, as a power loss or reboot ends it: no graceful shutdown. Returns once it has exited.
    func crash() async {
        guard let process = lock.withLock({ () -> Process? in
            let p = self.process
            self.process = nil
            self.currentChannel = nil
            return p
        }) else { return }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            _ = await waitForExit(process, within: .seconds(10))
        }
    }

    /// Stops (gracefully) and starts again on the same directory.
    @discardableResult
    func restart() async throws -> Exit? {
        let exit = await stop()
        try await start()
        return exit
    }

    // MARK: Shared by the process fixtures

    /// A new private directory /tmp/<prefix>.XXXXXX (mkdtemp), symlinks resolved.
    static func makeTemporaryRoot(_ prefix: String) throws -> String {
        var template = Array("/tmp/\(prefix).XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw FixtureError("mkdtemp /tmp/\(prefix).XXXXXX failed: \(String(cString: strerror(errno)))")
        }
        let path = String(cString: made)
        return Validate.realPath(path) ?? path
    }

    /// Starts `argv` (argv[0] an absolute path) with `environment` (nil: this process's), its
    /// stdout and stderr appended to `logPath` after a line saying what started and when.
    static func launch(_ argv: [String], environment: [String: String]? = nil, shownEnvironment: String = "",
                       logPath: String) throws -> Process {
        let fd = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FixtureError("cannot open \(logPath): \(String(cString: strerror(errno)))") }
        let log = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        defer { try? log.close() }
        log.write(Data("=== \(Date()) starting \(shownEnvironment)\(argv.joined(separator: " "))\n".utf8))
        let process = Process()
        if let environment { process.environment = environment }
        process.executableURL = URL(fileURLWithPath: argv[0])
        process.arguments = Array(argv.dropFirst())
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            throw FixtureError("could not start \(argv[0]): \(error)")
        }
        return process
    }

    // MARK: Foreign paths

    /// Registers a path outside `root` that a test hands to the plugin (and that must not exist
    /// yet): tearDown unmounts and removes it if the plugin created it anyway.
    func registerForeignPath(_ path: String) {
        lock.withLock { foreignPaths.append(path) }
    }

    // MARK: Inspection

    /// Mount points at or under any of `paths`, from /proc/self/mountinfo (in mount order).
    static func mounts(under paths: [String], table: String = "/proc/self/mountinfo") -> [MountEntry] {
        guard let text = ProcFile.textIfReadable(table) else { return [] }
        return text.split(separator: "\n").compactMap(MountEntry.init).filter { entry in
            paths.contains { Validate.isInside(entry.mountPoint, root: $0) }
        }
    }

    func mounts(under path: String? = nil) -> [MountEntry] { Self.mounts(under: [path ?? root], table: mountTablePath) }

    /// The mount table the plugin sees: its own namespace's when `launchPrefix` may have given
    /// it one (while it runs), else this process's.
    var mountTablePath: String {
        if !launchPrefix.isEmpty, let pid, isRunning { return "/proc/\(pid)/mountinfo" }
        return "/proc/self/mountinfo"
    }

    /// Loop devices whose backing file is at or under `path` (also after that file was deleted).
    static func loopDevices(backedUnder path: String) -> [LoopDevice] {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/sys/block") else { return [] }
        var result: [LoopDevice] = []
        for name in names where name.hasPrefix("loop") {
            guard let raw = ProcFile.textIfReadable("/sys/block/\(name)/loop/backing_file") else {
                continue
            }
            var backing = raw.trimmingCharacters(in: .newlines)
            if backing.hasSuffix(" (deleted)") { backing = String(backing.dropLast(" (deleted)".count)) }
            if Validate.isInside(backing, root: path) { result.append(LoopDevice(device: "/dev/\(name)", backingFile: backing)) }
        }
        return result.sorted { $0.device < $1.device }
    }

    func loopDevices(backedUnder path: String? = nil) -> [LoopDevice] { Self.loopDevices(backedUnder: path ?? root) }

    /// What the test left behind: mounts under root and loop devices backed under root.
    func leftovers() -> [String] {
        mounts().map { "mount \($0.source) (\($0.fsType)) at \($0.mountPoint)" }
            + loopDevices().map { "loop device \($0.device) backed by \($0.backingFile)" }
    }

    /// cairn.log from the most recent start on.
    func logSinceLastStart() -> String {
        guard let text = try? String(contentsOfFile: logPath, encoding: .utf8) else { return "" }
        guard let range = text.range(of: "=== ", options: .backwards) else { return text }
        return String(text[range.lowerBound...])
    }

    func logTail(lines: Int = 80) -> String {
        guard let text = try? String(contentsOfFile: logPath, encoding: .utf8) else { return "(no log at \(logPath))" }
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    // MARK: Cleanup

    /// Unmounts everything at or under `paths`, deepest first; `umount -l` as the last resort.
    /// Returns what could not be unmounted.
    @discardableResult
    static func unmountAll(under paths: [String]) async -> [String] {
        for round in 0..<8 {
            let mounts = Self.mounts(under: paths)
            if mounts.isEmpty { return [] }
            // Deepest first; for mounts stacked on one path the newest (highest id) first.
            let ordered = mounts.sorted {
                let (a, b) = ($0.mountPoint.split(separator: "/").count, $1.mountPoint.split(separator: "/").count)
                return a != b ? a > b : $0.mountID > $1.mountID
            }
            for entry in ordered {
                let result = try? await Command.run(["umount", entry.mountPoint])
                if result?.status != 0 && round >= 2 {
                    _ = try? await Command.run(["umount", "-l", entry.mountPoint])
                }
            }
        }
        return Self.mounts(under: paths).map { "could not unmount \($0.mountPoint) (\($0.source), \($0.fsType))" }
    }

    /// Detaches every loop device backed by a file under `path`. Returns those that stay.
    @discardableResult
    static func detachLoops(backedUnder path: String) async -> [String] {
        for _ in 0..<5 {
            let devices = Self.loopDevices(backedUnder: path)
            if devices.isEmpty { return [] }
            for loop in devices { _ = try? await Command.run(["losetup", "--detach", loop.device]) }
            if Self.loopDevices(backedUnder: path).isEmpty { return [] }
            try? await Task.sleep(for: .milliseconds(200))
        }
        return Self.loopDevices(backedUnder: path).map { "could not detach \($0.device) (backed by \($0.backingFile))" }
    }

    /// Ends the FUSE keeper whose pid file is `pidFile` (SIGTERM, then SIGKILL after 5 s); nil
    /// when none runs or it ended, else what went wrong.
    static func stopKeeper(pidFile: String) async -> String? {
        guard let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
              let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0,
              let cmdline = try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8), cmdline.contains("fuse-keeper")
        else { return nil }
        kill(pid, SIGTERM)
        for _ in 0..<50 where kill(pid, 0) == 0 {
            if (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8))?.contains("State:\tZ") == true { return nil }
            try? await Task.sleep(for: .milliseconds(100))
        }
        guard kill(pid, 0) == 0 else { return nil }
        kill(pid, SIGKILL)
        return "the FUSE keeper (pid \(pid)) ignored SIGTERM and was killed"
    }

    /// Stops the process and removes every trace of the test. Idempotent. Returns the problems
    /// it met (things it could not clean, or a plugin that ignored SIGTERM); prints the tail of
    /// cairn.log when `testFailed`, when there were problems, or when $CAIRN_IT_PRINT_LOGS is set.
    func tearDown(testFailed: Bool) async -> [String] {
        if lock.withLock({ () -> Bool in defer { tornDown = true }; return tornDown }) { return [] }
        var problems: [String] = []
        if let exit = await stop(), exit.killed {
            problems.append("cairn did not exit within \(Self.stopGrace) of SIGTERM and was killed")
        }
        // The FUSE keeper `cairn serve` spawned (encrypted volumes' engines) outlives it by design.
        if let problem = await Self.stopKeeper(pidFile: dataDir + "/fuse-keeper.pid") { problems.append(problem) }
        let foreign = lock.withLock { foreignPaths }
        problems += await Self.unmountAll(under: [root] + foreign)
        problems += await Self.detachLoops(backedUnder: root)

        if testFailed || !problems.isEmpty || ProcessInfo.processInfo.environment["CAIRN_IT_PRINT_LOGS"] != nil {
            print("----- tail of \(logPath) -----\n\(logTail())\n----- end of \(logPath) -----")
        }
        for path in foreign where FileManager.default.fileExists(atPath: path) {
            if Self.mounts(under: [path]).isEmpty {
                _ = try? await Command.run(["rm", "-rf", "--one-file-system", path])
            }
        }
        if Self.mounts(under: [root]).isEmpty {
            _ = try? await Command.run(["rm", "-rf", "--one-file-system", root])
            if FileManager.default.fileExists(atPath: root) { problems.append("could not remove \(root)") }
        } else {
            problems.append("left \(root) in place: something is still mounted under it")
        }
        return problems
    }
}

/// One line of /proc/self/mountinfo, the fields the tests need.
struct MountEntry: Sendable, Equatable {
    var mountID: Int
    var mountPoint: String
    var root: String
    var fsType: String
    var source: String
    var options: String

    init?(_ line: Substring) {
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count >= 10, let id = Int(fields[0]),
              let separator = fields[6...].firstIndex(of: "-"), fields.count >= separator + 3 else { return nil }
        mountID = id
        root = Self.unescape(fields[3])
        mountPoint = Self.unescape(fields[4])
        options = String(fields[5])
        fsType = Self.unescape(fields[separator + 1])
        source = Self.unescape(fields[separator + 2])
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    static func unescape(_ field: Substring) -> String {
        guard field.contains("\\") else { return String(field) }
        var out: [UInt8] = []
        let bytes = Array(field.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
               let value = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(value)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// A value behind a lock (the test target does not import Synchronization).
final class LockedBox<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<T>(_ body: (inout Value) -> T) -> T { lock.withLock { body(&value) } }
}

struct LoopDevice: Sendable, Equatable {
    var device: String
    var backingFile: String
}

struct FixtureError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
