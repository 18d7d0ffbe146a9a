import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Debian's chromium, headless, driven over the DevTools protocol on `--remote-debugging-pipe`:
/// the browser reads NUL-terminated JSON commands on fd 3 and writes answers and events on fd 4.
/// No websocket, no driver: one page target, commands answered in order.
///
/// Runs in its own process group with a temporary profile; `stop()` closes the browser, kills
/// the group and any process still naming the profile, and removes it — call it from a `defer`
/// or tearDown so it runs whatever happened.
final class HeadlessChromium: @unchecked Sendable {
    let pid: pid_t
    let profile: String
    /// Where the browser's own output goes (printed by the test when it fails).
    let logPath: String
    private let commands: Int32
    private let answers: Int32
    private var pending: [UInt8] = []
    private var nextID = 1
    private var stopped = false
    /// The page's session (`Target.attachToTarget` with flatten).
    private(set) var session: String?

    /// The first of Debian's names found on PATH (or in /usr/bin, /usr/lib/chromium).
    static func locate() -> String? {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init)
            + ["/usr/bin", "/usr/lib/chromium"]
        for name in ["chromium", "chromium-headless-shell", "chromium-browser", "google-chrome"] {
            for directory in path where access("\(directory)/\(name)", X_OK) == 0 {
                return "\(directory)/\(name)"
            }
        }
        return nil
    }

    /// Starts the browser (`prefix`, e.g. `ip netns exec NS`, runs it inside a namespace).
    init(binary: String, prefix: [String] = [], logPath: String, width: Int = 1280, height: Int = 1000) throws {
        profile = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-chromium-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: profile, withIntermediateDirectories: true)
        self.logPath = logPath
        let arguments = prefix + [
            binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking", "--disable-sync",
            "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe", "--user-data-dir=\(profile)",
            "--window-size=\(width),\(height)", "about:blank",
        ]
        // Every end moved above fd 10, close-on-exec (dup2 in the child clears that on the
        // browser's ends, which become its fds 3 and 4).
        var toBrowser: [Int32] = [0, 0], fromBrowser: [Int32] = [0, 0]
        guard pipe(&toBrowser) == 0, pipe(&fromBrowser) == 0 else {
            throw FixtureError("pipe: \(String(cString: strerror(errno)))")
        }
        let high = { (fd: Int32) -> Int32 in
            let moved = fcntl(fd, F_DUPFD_CLOEXEC, 10)
            close(fd)
            return moved
        }
        let browserReads = high(toBrowser[0]), browserWrites = high(fromBrowser[1])
        commands = high(toBrowser[1])
        answers = high(fromBrowser[0])
        defer {
            close(browserReads)
            close(browserWrites)
        }

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_adddup2(&actions, browserReads, 3)
        posix_spawn_file_actions_adddup2(&actions, browserWrites, 4)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP))
        posix_spawnattr_setpgroup(&attributes, 0)

        let argv = arguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var child: pid_t = 0
        let result = posix_spawnp(&child, arguments[0], &actions, &attributes, argv, environ)
        guard result == 0 else {
            close(commands)
            close(answers)
            try? FileManager.default.removeItem(atPath: profile)
            throw FixtureError("cannot start \(arguments.joined(separator: " ")): \(String(cString: strerror(result)))")
        }
        pid = child
    }

    deinit { stop() }

    // MARK: The protocol

    /// Sends a command and returns its result; throws with the browser's error, or when no
    /// answer comes within `timeout` seconds.
    @discardableResult
    func call(_ method: String, _ params: [String: Any] = [:], session: String? = nil,
              timeout: Double = 30) throws -> [String: Any] {
        let id = nextID
        nextID += 1
        var message: [String: Any] = ["id": id, "method": method, "params": params]
        if let session { message["sessionId"] = session }
        var bytes = [UInt8](try JSONSerialization.data(withJSONObject: message))
        bytes.append(0)
        var written = 0
        while written < bytes.count {
            let n = bytes[written...].withUnsafeBytes { Glibc.write(commands, $0.baseAddress, $0.count) }
            guard n > 0 else {
                if n < 0 && errno == EINTR { continue }
                throw FixtureError("the browser stopped reading its commands (\(method)); its log: \(logTail())")
            }
            written += n
        }
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            let answer = try readMessage(until: deadline, waitingFor: method)
            guard answer["id"] as? Int == id else { continue }  // an event, or an older answer
            if let error = answer["error"] as? [String: Any] {
                throw FixtureError("DevTools \(method) failed: \(error["message"] ?? error)")
            }
            return answer["result"] as? [String: Any] ?? [:]
        }
    }

    private func readMessage(until deadline: Date, waitingFor method: String) throws -> [String: Any] {
        while true {
            if let end = pending.firstIndex(of: 0) {
                let message = Array(pending[..<end])
                pending.removeFirst(end + 1)
                guard let object = try? JSONSerialization.jsonObject(with: Data(message)) as? [String: Any] else { continue }
                return object
            }
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else { throw FixtureError("the browser did not answer \(method) in time; its log: \(logTail())") }
            var descriptor = pollfd(fd: answers, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(min(left, 1) * 1000))
            if ready < 0 && errno != EINTR { throw FixtureError("poll: \(String(cString: strerror(errno)))") }
            guard ready > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            let n = chunk.withUnsafeMutableBytes { Glibc.read(answers, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw FixtureError("the browser closed its DevTools pipe (it exited?); its log: \(logTail())") }
            pending += chunk[..<n]
        }
    }

    /// Opens `url` in a new page and attaches to it; later calls go to that page.
    func open(_ url: String) throws {
        let target = try call("Target.createTarget", ["url": url])
        guard let targetID = target["targetId"] as? String else { throw FixtureError("Target.createTarget answered \(target)") }
        let attached = try call("Target.attachToTarget", ["targetId": targetID, "flatten": true])
        guard let session = attached["sessionId"] as? String else { throw FixtureError("Target.attachToTarget answered \(attached)") }
        self.session = session
        try call("Runtime.enable", session: session)
    }

    /// Evaluates a JavaScript expression in the page; its value (returned by value).
    func evaluate(_ expression: String) throws -> Any? {
        let result = try call("Runtime.evaluate", ["expression": expression, "returnByValue": true], session: session)
        if let exception = result["exceptionDetails"] as? [String: Any] {
            let detail = (exception["exception"] as? [String: Any])?["description"] ?? exception["text"] ?? exception
            throw FixtureError("the page's script failed: \(detail)")
        }
        return (result["result"] as? [String: Any])?["value"]
    }

    /// The page as a PNG, written to `path`.
    func screenshot(to path: String) throws {
        let result = try call("Page.captureScreenshot", ["format": "png", "captureBeyondViewport": true], session: session)
        guard let base64 = result["data"] as? String, let data = Data(base64Encoded: base64) else {
            throw FixtureError("Page.captureScreenshot returned no image")
        }
        try data.write(to: URL(fileURLWithPath: path))
    }

    func logTail(lines: Int = 30) -> String {
        let text = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "(no log at \(logPath))"
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    // MARK: Shutting down

    /// Closes the browser and kills everything it started: its process group, then any process
    /// left that names the profile. Removes the profile. Safe to call again.
    func stop() {
        guard !stopped else { return }
        stopped = true
        try? call("Browser.close", timeout: 3)
        close(commands)
        close(answers)
        let deadline = Date().addingTimeInterval(3)
        var status: Int32 = 0
        while waitpid(pid, &status, WNOHANG) == 0 && Date() < deadline { usleep(50_000) }
        for _ in 0..<50 {
            let left = Self.processes(inGroup: pid, orNaming: profile)
            if left.isEmpty { break }
            kill(-pid, SIGKILL)
            for process in left { kill(process, SIGKILL) }
            _ = waitpid(pid, &status, WNOHANG)
            usleep(100_000)
        }
        _ = waitpid(pid, &status, WNOHANG)
        try? FileManager.default.removeItem(atPath: profile)
    }

    /// Live processes (not zombies) in process group `group`, or whose command line names `text`.
    static func processes(inGroup group: pid_t, orNaming text: String) -> [pid_t] {
        var found: [pid_t] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let process = pid_t(entry), process != getpid() else { continue }
            guard let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            // After "(comm)": state, ppid, pgrp.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 2, fields[0] != "Z" else { continue }
            let commandLine = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(entry)/cmdline"))) ?? Data()
            if pid_t(fields[2]) == group || String(decoding: commandLine, as: UTF8.self).contains(text) {
                found.append(process)
            }
        }
        return found
    }
}
