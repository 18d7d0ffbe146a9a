import CairnCore
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A real `cairn replica serve` process (the node's replica server, standalone) on a private
/// temporary directory, for tests that kill the process holding replicas.
///
/// Layout of the directory (`root`, made by mkdtemp as /tmp/cairn-replica.XXXXXX):
///
///     root/data/          --data-dir (replicas/<volume-id>/)
///     root/port           the bound port, written by the process once it listens
///     root/replica.log    stdout and stderr of every start (appended)
///
/// `tearDown` must run whatever happened (tests call it from XCTest's tearDown): it SIGKILLs
/// the process if it still runs and removes the directory. The listening port is the kernel's
/// choice (127.0.0.1:0), so it dies with the process.
final class ReplicaServerProcess: @unchecked Sendable {
    static let readyTimeout: Duration = .seconds(30)
    static let stopGrace: Duration = .seconds(15)

    let root: String
    let binary: String
    var dataDir: String { root + "/data" }
    var replicasDir: String { dataDir + "/replicas" }
    var logPath: String { root + "/replica.log" }
    var portPath: String { root + "/port" }

    private let lock = NSLock()
    private var process: Process?
    private var tornDown = false

    /// Makes the temporary directory; does not start the process (see `start`).
    init() throws {
        binary = try PluginProcess.locateBinary()
        root = try PluginProcess.makeTemporaryRoot("cairn-replica")
        try FileManager.default.createDirectory(atPath: replicasDir, withIntermediateDirectories: true)
    }

    var pid: Int32? { lock.withLock { process.map(\.processIdentifier) } }
    var isRunning: Bool { lock.withLock { process?.isRunning ?? false } }

    /// Starts `cairn replica serve` and waits (at most 30 s) until it has written its port.
    /// Returns the port.
    func start() throws -> UInt16 {
        precondition(!isRunning, "the replica server is already running")
        _ = unlink(portPath)
        let arguments = ["replica", "serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--port-file", portPath,
                         "--data-security", "none", "--allow-unauthenticated-data", "--log-level", "info"]
        let process = try PluginProcess.launch([binary] + arguments, logPath: logPath)
        lock.withLock { self.process = process }

        let deadline = ContinuousClock.now + Self.readyTimeout
        while ContinuousClock.now < deadline {
            if !process.isRunning {
                throw FixtureError("cairn replica serve exited (status \(process.terminationStatus)) before listening; its log:\n\(logTail())")
            }
            if let text = try? String(contentsOfFile: portPath, encoding: .utf8),
               let port = UInt16(text.trimmingCharacters(in: .whitespacesAndNewlines)), port != 0 {
                return port
            }
            usleep(10_000)
        }
        throw FixtureError("cairn replica serve did not write \(portPath) within \(Self.readyTimeout); its log:\n\(logTail())")
    }

    /// SIGKILL: the process ends between two instructions, with no shutdown. Returns once it
    /// has exited (false if it had not within 10 s).
    @discardableResult
    func crash() -> Bool {
        guard let process = take() else { return true }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        return Self.waitForExit(process, within: .seconds(10))
    }

    /// SIGTERM (the replica server stops and closes every replica cleanly), then SIGKILL after
    /// 15 s. Returns how it ended: nil if it was not running, else (status, killed).
    @discardableResult
    func stop() -> (status: Int32, killed: Bool)? {
        guard let process = take() else { return nil }
        var killed = false
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            if !Self.waitForExit(process, within: Self.stopGrace) {
                killed = true
                kill(process.processIdentifier, SIGKILL)
                _ = Self.waitForExit(process, within: .seconds(10))
            }
        }
        return (process.isRunning ? -1 : process.terminationStatus, killed)
    }

    private func take() -> Process? {
        lock.withLock {
            defer { process = nil }
            return process
        }
    }

    private static func waitForExit(_ process: Process, within limit: Duration) -> Bool {
        let deadline = ContinuousClock.now + limit
        while process.isRunning && ContinuousClock.now < deadline { usleep(5_000) }
        return !process.isRunning
    }

    func logTail(lines: Int = 60) -> String {
        guard let text = try? String(contentsOfFile: logPath, encoding: .utf8) else { return "(no log at \(logPath))" }
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    /// Kills the process if it runs and removes the directory; prints the log's tail when
    /// `testFailed` or $CAIRN_IT_PRINT_LOGS is set. Idempotent. Returns what it could not clean.
    func tearDown(testFailed: Bool) -> [String] {
        if lock.withLock({ () -> Bool in defer { tornDown = true }; return tornDown }) { return [] }
        var problems: [String] = []
        if !crash() { problems.append("cairn replica serve (pid \(pid.map(String.init) ?? "?")) did not exit after SIGKILL") }
        if testFailed || ProcessInfo.processInfo.environment["CAIRN_IT_PRINT_LOGS"] != nil {
            print("----- tail of \(logPath) -----\n\(logTail())\n----- end of \(logPath) -----")
        }
        do {
            try FileManager.default.removeItem(atPath: root)
        } catch {
            problems.append("could not remove \(root): \(error)")
        }
        return problems
    }
}
