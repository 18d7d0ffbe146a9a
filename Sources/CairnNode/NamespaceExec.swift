import CairnCore
import CairnProcess
import Foundation
import Logging

/// Runs `cairn-nsexec`, the single-threaded C helper that enters a process's mount namespace
/// (setns(CLONE_NEWNS) is refused to multithreaded processes such as this one) and works on
/// paths as that process sees them, refusing paths that escape its root.
struct NamespaceExec: Sendable {
    let binary: String
    let logger: Logger

    static func locate() -> String {
        if let override = ProcessInfo.processInfo.environment["CAIRN_NSEXEC"] { return override }
        let exe = (Validate.realPath("/proc/self/exe") ?? CommandLine.arguments[0])
        return (exe as NSString).deletingLastPathComponent + "/cairn-nsexec"
    }

    /// Runs one command and returns its `key=value` output.
    func run(_ command: String, _ namespace: MountNamespace, _ arguments: [String]) async throws -> [String: String] {
        guard case .process(let pid, let start) = namespace else {
            throw CairnError.internal("cairn-nsexec is only for process namespaces")
        }
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw CairnError.failedPrecondition(
                "\(binary) is missing: it is built with cairn (swift build) and must sit next to the cairn binary, or be named by CAIRN_NSEXEC")
        }
        let argv = [binary, command, "--pid", String(pid), "--start-time", String(start)] + arguments
        let result = try await Command.run(argv, timeout: LinuxMounter.quickTimeout, logger: logger)
        let message = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        switch result.status {
        case 0:
            var values: [String: String] = [:]
            for token in result.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
                let pair = token.split(separator: "=", maxSplits: 1).map(String.init)
                if pair.count == 2 { values[pair[0]] = pair[1] }
            }
            return values
        case 2: throw CairnError.invalidArgument(message.isEmpty ? "path escapes the container's root" : message)
        case 3: throw MountNamespaceGone(pid: pid, reason: message.isEmpty ? "has exited" : message)
        case 4, 5, 6: throw CairnError.failedPrecondition(message)
        default: throw CairnError.internal("\(command) in the mount namespace of process \(pid) failed (exit \(result.status)): \(message)")
        }
    }

    func mountinfo(_ namespace: MountNamespace) async throws -> String {
        guard case .process(let pid, let start) = namespace else { return "" }
        let result = try await Command.run([binary, "mountinfo", "--pid", String(pid), "--start-time", String(start)],
                                           timeout: LinuxMounter.quickTimeout, logger: logger)
        if result.status == 3 { throw MountNamespaceGone(pid: pid, reason: result.stderr) }
        guard result.status == 0 else {
            throw CairnError.internal("cannot read the mount table of process \(pid): \(result.output)")
        }
        return result.stdout
    }
}
