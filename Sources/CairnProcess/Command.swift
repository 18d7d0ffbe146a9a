import CairnCore
import Foundation
import Logging
import Synchronization

/// Runs an external tool (losetup, mkfs, fsck, mount…) and captures its output. Kernel-facing
/// work goes through these tools because they encode decades of edge cases we must not re-learn.
public struct CommandResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String

    public var output: String {
        [stdout, stderr].map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
            .filter { !$0.isEmpty }.joined(separator: "\n")
    }
}

public enum Command {
    /// How long a tool may run before it is killed. Long enough for mkfs and fsck of large
    /// volumes; short enough that a tool stuck on a dead device does not hold a volume lock
    /// for ever.
    public static let defaultTimeout: Duration = .seconds(30 * 60)

    /// Runs `argv` to completion off the cooperative thread pool.
    public static func run(_ argv: [String], timeout: Duration = defaultTimeout,
                           logger: Logger? = nil) async throws -> CommandResult {
        logger?.debug("exec", metadata: ["command": "\(argv.joined(separator: " "))"])
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                do {
                    continuation.resume(returning: try runBlocking(argv, timeout: timeout))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// Runs `argv` and throws INTERNAL with the tool's own message when it exits non-zero.
    @discardableResult
    public static func check(_ argv: [String], timeout: Duration = defaultTimeout,
                             logger: Logger? = nil) async throws -> CommandResult {
        let result = try await run(argv, timeout: timeout, logger: logger)
        guard result.status == 0 else {
            throw CairnError.internal("\(argv.joined(separator: " ")) failed with exit status \(result.status): \(result.output)")
        }
        return result
    }

    public static func runBlocking(_ argv: [String], timeout: Duration = defaultTimeout) throws -> CommandResult {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try locate(argv[0]))
        process.arguments = Array(argv.dropFirst())
        var env = ProcessInfo.processInfo.environment
        env["LC_ALL"] = "C"
        process.environment = env
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            throw CairnError.internal("could not start \(argv[0]): \(error)")
        }
        let expired = ManagedAtomicFlag()
        let pid = process.processIdentifier
        let killer = DispatchWorkItem {
            expired.set()
            kill(pid, SIGKILL)
        }
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(Int(timeout.components.seconds * 1000)), execute: killer)
        defer { killer.cancel() }
        // Read both pipes concurrently so a chatty tool cannot block on a full pipe.
        let group = DispatchGroup()
        nonisolated(unsafe) var errData = Data()
        group.enter()
        DispatchQueue.global().async {
            errData = err.fileHandleForReading.readDataToEndOfFile()
            group.leave()
        }
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        process.waitUntilExit()
        if expired.isSet {
            throw CairnError.unavailable(
                "\(argv.joined(separator: " ")) did not finish within \(timeout.components.seconds) s and was killed; the device may be hung (check dmesg), then retry")
        }
        return CommandResult(status: process.terminationStatus,
                             stdout: String(decoding: outData, as: UTF8.self),
                             stderr: String(decoding: errData, as: UTF8.self))
    }

    static let searchPath = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]

    /// The tools in `names` that are not installed (checked on the search path, no process run).
    public static func missing(_ names: [String]) -> [String] {
        names.filter { (try? locate($0)) == nil }
    }

    static func locate(_ tool: String) throws -> String {
        if tool.hasPrefix("/") { return tool }
        for dir in searchPath where FileManager.default.isExecutableFile(atPath: "\(dir)/\(tool)") {
            return "\(dir)/\(tool)"
        }
        throw CairnError.failedPrecondition("\(tool) is not installed on this node; install it (e.g. apt-get install util-linux e2fsprogs xfsprogs)")
    }
}

/// A flag set from the timeout's queue and read by the waiting thread.
final class ManagedAtomicFlag: Sendable {
    private let value = Mutex(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}
