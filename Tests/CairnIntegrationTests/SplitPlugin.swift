import CSIProto
import CairnCore
import CairnProcess
import CairnProto
import CairnRPC
import Foundation
import SwiftProtobuf

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Cairn split into its roles on one temporary directory, as on a Kubernetes node: the agent
/// (host namespaces), a controller, and the node role in its own mount namespace
/// (`unshare --mount --propagation slave`, like a container), all sharing `--data-dir` (SQLite
/// WAL) and `--node-id`.
///
///     root/agent.sock, root/controller.sock, root/node.sock
///     root/agent.log, root/controller.log, root/node.log   (appended across restarts)
///     root/data/  root/staging/  root/pods/                 (--path-root is root)
///
/// `tearDown` stops every process (node and controller first, the agent last), unmounts what is
/// left under root, detaches loop devices backed under root and removes the directory.
final class SplitPlugin: @unchecked Sendable {
    enum Role: String, CaseIterable, Sendable {
        case agent, controller, node
    }

    let root: String
    let nodeID = "split-node"
    let binary: String

    var dataDir: String { root + "/data" }
    var stagingDir: String { root + "/staging" }
    var podsDir: String { root + "/pods" }
    func socketPath(_ role: Role) -> String { "\(root)/\(role.rawValue).sock" }
    func endpoint(_ role: Role) -> String { "unix://" + socketPath(role) }
    func logPath(_ role: Role) -> String { "\(root)/\(role.rawValue).log" }

    private let lock = NSLock()
    private var processes: [Role: Process] = [:]
    private var channels: [Role: GRPCChannel] = [:]
    private var tornDown = false

    init() throws {
        binary = try PluginProcess.locateBinary()
        root = try PluginProcess.makeTemporaryRoot("cairn-split")
        for dir in [stagingDir, podsDir] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
    }

    func arguments(_ role: Role) -> [String] {
        var args = ["serve", "--role", role.rawValue, "--data-dir", dataDir, "--node-id", nodeID,
                    "--path-root", root, "--log-level", "debug"]
        switch role {
        case .agent: args += ["--agent-socket", socketPath(.agent)]
        case .controller: args += ["--endpoint", endpoint(.controller), "--capacity", "20Gi"]
        case .node: args += ["--endpoint", endpoint(.node), "--agent-socket", socketPath(.agent)]
        }
        return args
    }

    // MARK: Processes

    func pid(_ role: Role) -> Int32? { lock.withLock { processes[role].map(\.processIdentifier) } }
    func isRunning(_ role: Role) -> Bool { lock.withLock { processes[role]?.isRunning ?? false } }

    /// The channel to a CSI role (controller or node); a fresh one after every start.
    func channel(_ role: Role) -> GRPCChannel {
        lock.withLock {
            guard let channel = channels[role] else { preconditionFailure("cairn \(role) is not running") }
            return channel
        }
    }

    /// Starts every role: agent, controller, node.
    func startAll() async throws {
        for role in Role.allCases { try await start(role) }
    }

    /// Starts one role and waits until it answers (the agent: Hello; the others: Probe).
    func start(_ role: Role) async throws {
        precondition(!isRunning(role), "cairn \(role) is already running")
        // The node in its own mount namespace, as in a container. unshare execs cairn: same PID.
        let prefix = role == .node ? ["/usr/bin/unshare", "--mount", "--propagation", "slave"] : []
        let process = try PluginProcess.launch(prefix + [binary] + arguments(role), logPath: logPath(role))
        lock.withLock {
            processes[role] = process
            channels[role] = nil
        }
        try await waitUntilReady(role, process)
    }

    private func waitUntilReady(_ role: Role, _ process: Process) async throws {
        let deadline = ContinuousClock.now + PluginProcess.readyTimeout
        var last = "the socket \(socketPath(role)) never appeared"
        while ContinuousClock.now < deadline {
            if !process.isRunning {
                throw FixtureError("cairn \(role) exited (status \(process.terminationStatus)) before answering; its log:\n\(logTail(role))")
            }
            if FileManager.default.fileExists(atPath: socketPath(role)) {
                let candidate = GRPCChannel(target: endpoint(role))
                let reply: (code: StatusCode, message: String, response: [UInt8])
                if role == .agent {
                    let hello = try Cairn_Agent_V1_HelloRequest.with { $0.protocolVersion = 2 }.serializedBytes() as [UInt8]
                    reply = await candidate.callRaw("/cairn.agent.v1.Agent/Hello", hello, timeout: .seconds(2))
                } else {
                    reply = await candidate.callRaw("/csi.v1.Identity/Probe", [], timeout: .seconds(2))
                }
                if reply.code == .ok {
                    lock.withLock { channels[role] = candidate }
                    return
                }
                last = "it answered \(reply.code): \(reply.message)"
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        throw FixtureError("cairn \(role) did not answer within \(PluginProcess.readyTimeout) (\(last)); its log:\n\(logTail(role))")
    }

    /// Sends `signal` (SIGTERM: waits up to 15 s, then SIGKILL) and waits for the exit.
    func stop(_ role: Role, signal: Int32 = SIGTERM) async {
        guard let process = lock.withLock({ () -> Process? in
            defer { processes[role] = nil; channels[role] = nil }
            return processes[role]
        }) else { return }
        guard process.isRunning else { return }
        kill(process.processIdentifier, signal)
        if !(await Self.waitForExit(process, within: PluginProcess.stopGrace)) {
            kill(process.processIdentifier, SIGKILL)
            _ = await Self.waitForExit(process, within: .seconds(10))
        }
    }

    static func waitForExit(_ process: Process, within limit: Duration) async -> Bool {
        let deadline = ContinuousClock.now + limit
        while process.isRunning && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(10))
        }
        return !process.isRunning
    }

    // MARK: CSI calls

    func controller<Q: SwiftProtobuf.Message, R: SwiftProtobuf.Message>(_ method: String, _ request: Q, as: R.Type) async throws -> R {
        try await channel(.controller).call("/csi.v1.Controller/" + method, request, as: R.self)
    }

    func node<Q: SwiftProtobuf.Message, R: SwiftProtobuf.Message>(_ method: String, _ request: Q, as: R.Type) async throws -> R {
        try await channel(.node).call("/csi.v1.Node/" + method, request, as: R.self)
    }

    // MARK: Inspection and cleanup

    func logTail(_ role: Role, lines: Int = 60) -> String {
        guard let text = try? String(contentsOfFile: logPath(role), encoding: .utf8) else { return "(no log at \(logPath(role)))" }
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    /// Mounts under root in the host's namespace and loop devices backed under root.
    func leftovers() -> [String] {
        PluginProcess.mounts(under: [root]).map { "mount \($0.source) (\($0.fsType)) at \($0.mountPoint)" }
            + PluginProcess.loopDevices(backedUnder: root).map { "loop device \($0.device) backed by \($0.backingFile)" }
    }

    func tearDown(testFailed: Bool) async -> [String] {
        if lock.withLock({ () -> Bool in defer { tornDown = true }; return tornDown }) { return [] }
        for role in [Role.node, .controller, .agent] { await stop(role) }
        var problems = await PluginProcess.unmountAll(under: [root])
        problems += await PluginProcess.detachLoops(backedUnder: root)
        if testFailed || !problems.isEmpty || ProcessInfo.processInfo.environment["CAIRN_IT_PRINT_LOGS"] != nil {
            for role in Role.allCases {
                print("----- tail of \(logPath(role)) -----\n\(logTail(role))\n----- end of \(logPath(role)) -----")
            }
        }
        if PluginProcess.mounts(under: [root]).isEmpty {
            _ = try? await Command.run(["rm", "-rf", "--one-file-system", root])
            if FileManager.default.fileExists(atPath: root) { problems.append("could not remove \(root)") }
        } else {
            problems.append("left \(root) in place: something is still mounted under it")
        }
        return problems
    }
}
