import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The multi-node test bed (`scripts/testbed`, see docs/testbed.md) driven from a test: etcd, the
/// controller and N nodes, each node in its own network namespace.
///
///     let bed = try Testbed.up(nodes: 3)
///     defer { bed.down() }          // or call down() from tearDown: it must run whatever happened
///     let controller = try GRPCChannel(endpoint: bed.controllerEndpoint)
///     try bed.partition("n2")
///
/// Every method runs the script and throws `FixtureError` with its output (which names the log
/// to read) when it fails. One bed per machine: the script serializes beds with a lock.
struct Testbed: Sendable {
    /// The state directory (`CAIRN_TESTBED_DIR` of the test process, which the script inherits).
    let stateDir: String
    /// `n1`…`nN`.
    let nodes: [String]
    /// From `scripts/testbed endpoints`: name (`etcd`, `controller`, `n1`…) to URL.
    let endpoints: [String: String]

    var controllerEndpoint: String { endpoints["controller"] ?? "unix://\(stateDir)/controller.sock" }
    var etcdEndpoint: String { endpoints["etcd"] ?? "http://10.77.0.1:2379" }
    /// What a cairn command in the ctl namespace passes to reach the bed's etcd: the endpoint
    /// and, on a TLS bed (the default), the controller's certificate as etcd's client.
    var etcdArguments: [String] {
        var arguments = ["--store", "etcd", "--etcd-endpoints", etcdEndpoint]
        if let ca = endpoints["etcd-ca"], let cert = endpoints["etcd-cert"], let key = endpoints["etcd-key"] {
            arguments += ["--etcd-ca", ca, "--etcd-cert", cert, "--etcd-key", key]
        }
        return arguments
    }
    /// curl's flags for etcd's HTTP gateway (the same certificate).
    var etcdCurlArguments: [String] {
        guard let ca = endpoints["etcd-ca"], let cert = endpoints["etcd-cert"], let key = endpoints["etcd-key"] else { return [] }
        return ["--cacert", ca, "--cert", cert, "--key", key]
    }
    func nodeEndpoint(_ node: String) -> String { endpoints[node] ?? "unix://\(stateDir)/\(node)/csi.sock" }
    /// Where node `n<i>` serves the data protocol.
    func dataAddress(_ node: String) -> String? {
        guard let i = nodes.firstIndex(of: node) else { return nil }
        return "10.77.0.\(11 + i):7410"
    }

    /// The script, found from this file's path (Tests/CairnIntegrationTests/ → repo root).
    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/testbed").path
    }

    static var defaultStateDir: String {
        ProcessInfo.processInfo.environment["CAIRN_TESTBED_DIR"] ?? "/run/cairn-testbed"
    }

    /// The network namespaces' prefix (`CAIRN_TESTBED_PREFIX`, which the script inherits).
    static var namespacePrefix: String {
        (ProcessInfo.processInfo.environment["CAIRN_TESTBED_PREFIX"] ?? "cairntb") + "-"
    }

    /// Whether each node runs as an agent and a CSI node (the default; `CAIRN_TESTBED_SPLIT=0`
    /// in the test's environment: one process per node).
    var isSplit: Bool { FileManager.default.fileExists(atPath: "\(stateDir)/n1-agent.argv") }

    /// The process that runs `node`'s engines and replica server, whose log has their messages:
    /// `n<i>-agent` on a split bed, else `n<i>`.
    /// The bed name of the process running `node`'s engines and replica server: its agent, or on a
    /// one-process bed the node's process alone (`nN-node`; `nN` would be the whole node, its
    /// FUSE keeper included).
    func engineProcess(_ node: String) -> String { isSplit ? node + "-agent" : node + "-node" }

    /// Every Cairn process's log name: the controller, then each node's agent (split) and node.
    var processNames: [String] { ["controller"] + nodes.flatMap { isSplit ? [$0 + "-agent", $0] : [$0] } }

    /// Builds a bed of `nodes` nodes with the `cairn` next to the test bundle (`withCairn: false`:
    /// network and etcd only). Skips the test when not root. When `up` fails, runs `down` and
    /// throws with up's output (it ends with the failing process's log).
    /// `nodeArgs`/`controllerArgs`: extra `cairn serve` flags (kept across `restart`); `agentArgs`
    /// go to a split node's agent only, after `nodeArgs` (a flag given in both: the agent's wins).
    /// `controllers: 2` adds `controller2`, a standby waiting for the leader lease.
    static func up(nodes: Int, withCairn: Bool = true, pathRoots: [String] = [], nodeArgs: [String] = [],
                   agentArgs: [String] = [], controllerArgs: [String] = [], controllers: Int = 1) throws -> Testbed {
        if getuid() != 0 {
            throw XCTSkip("the test bed makes network namespaces, mounts and loop devices: run the tests as root")
        }
        var arguments = ["up", "--nodes", String(nodes)]
        if withCairn {
            arguments += ["--cairn", try PluginProcess.locateBinary()]
        } else {
            arguments.append("--no-cairn")
        }
        for root in pathRoots { arguments += ["--path-root", root] }
        let started = run(arguments, environment: [
            "CAIRN_TESTBED_NODE_ARGS": nodeArgs.joined(separator: " "),
            "CAIRN_TESTBED_AGENT_ARGS": agentArgs.joined(separator: " "),
            "CAIRN_TESTBED_CONTROLLER_ARGS": controllerArgs.joined(separator: " "),
            "CAIRN_TESTBED_CONTROLLERS": controllers == 1 ? "" : String(controllers),
        ])
        guard started.status == 0 else {
            // Refused because another bed is up (another test run's): that bed is not ours to remove.
            if started.output.contains("a test bed is already up") {
                throw FixtureError("scripts/testbed up --nodes \(nodes) was refused: \(started.output) (another run's bed; it was left alone. Wait for that run, or give this one its own CAIRN_TESTBED_DIR and CAIRN_TESTBED_PREFIX)")
            }
            let cleanup = run(["down"])
            throw FixtureError("""
                scripts/testbed up --nodes \(nodes) failed (exit status \(started.status)):
                \(started.output)
                (down afterwards: exit status \(cleanup.status)\(cleanup.status == 0 ? "" : ": " + cleanup.output))
                """)
        }
        let listed = run(["endpoints"])
        guard listed.status == 0 else {
            _ = run(["down"])
            throw FixtureError("scripts/testbed endpoints failed after up: \(listed.output)")
        }
        return Testbed(stateDir: defaultStateDir, nodes: (1...nodes).map { "n\($0)" },
                       endpoints: parseEndpoints(listed.stdout))
    }

    /// Lines `NAME URL`; the script's own messages start with `testbed:`.
    static func parseEndpoints(_ output: String) -> [String: String] {
        var result: [String: String] = [:]
        for line in output.split(separator: "\n") where !line.hasPrefix("testbed:") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if fields.count == 2 { result[String(fields[0])] = String(fields[1]) }
        }
        return result
    }

    /// Removes everything the bed made (processes, mounts, loop devices, namespaces, the state
    /// directory). Never throws, so it is safe in `defer` and tearDown; returns the problem when
    /// the script reported one (also printed), nil when all went.
    @discardableResult
    func down() -> String? {
        let result = Self.run(["down"])
        guard result.status == 0 else {
            let problem = "scripts/testbed down failed (exit status \(result.status)): \(result.output)"
            print(problem)
            return problem
        }
        return nil
    }

    /// A test's tearDown: prints the tail of every process's log when `run` failed, then `down`.
    /// Returns down's problem, nil when all went.
    func down(after run: XCTestRun?, logLines: Int = 60) -> String? {
        if let run, run.failureCount + run.unexpectedExceptionCount > 0 {
            for name in processNames { print("==> \(name).log\n" + logTail(name, lines: logLines)) }
        }
        return down()
    }

    /// SIGKILLs the process group of `node` (`controller`, `controller2`, `etcd`, `n<i>-agent`, `n<i>-node`),
    /// or a whole node `n<i>` (its agent, CSI node and FUSE keeper): a crash, nothing cleaned up.
    func kill(_ node: String) throws { try command(["kill", node]) }
    /// Starts `node` again with the same flags (killing it first if it runs) and waits until it serves.
    func restart(_ node: String) throws { try command(["restart", node]) }
    /// SIGKILL of the process that runs the node's engines (`nN-agent`, or `nN` in a one-process
    /// bed), not of its FUSE keeper; then the same process started again.
    func killEngineProcess(_ node: String) throws { try command(["kill", engineProcess(node)]) }
    func restartEngineProcess(_ node: String) throws { try command(["restart", engineProcess(node)]) }
    /// The executable a bed process runs now (its `.pid` file names the process, or the leader
    /// of the session it runs in), resolved; nil when it does not run.
    func executable(of name: String) -> String? {
        let file = name.hasSuffix("-node") ? String(name.dropLast(5)) : name
        guard let text = try? String(contentsOfFile: "\(stateDir)/\(file).pid", encoding: .utf8),
              let leader = Int32(text.split(separator: " ").first ?? "") else { return nil }
        var candidates = [leader]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), pid != leader else { continue }
            if getsid(pid) == leader { candidates.append(pid) }
        }
        for pid in candidates {
            if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe"),
               URL(fileURLWithPath: exe).lastPathComponent.hasPrefix("cairn") {
                return exe
            }
        }
        return nil
    }
    /// Restarts node `n<i>`'s processes one at a time with `cairn` (SIGTERM, same flags).
    func upgrade(_ node: String, cairn: String) throws { try command(["upgrade", node, "--cairn", cairn]) }
    /// `node` loses etcd and the controller (both directions) but keeps the other nodes.
    func partition(_ node: String) throws { try command(["partition", node]) }
    func heal(_ node: String) throws { try command(["heal", node]) }
    /// Probes the network (etcd from each node unless partitioned, every node from every other).
    func check() throws { try command(["check"]) }
    /// Runs a command in `node`'s network namespace (root mount namespace); returns its output.
    @discardableResult
    func exec(_ node: String, _ arguments: [String]) throws -> String {
        try command(["exec", node] + arguments)
    }
    /// `scripts/testbed status`: processes and partitions.
    func status() throws -> String { try command(["status"]) }

    /// The last lines of a process's log (`etcd`, `controller`, `n<i>`, `n<i>-agent`), for failure messages.
    /// The log of a bed process (`nN-node` is the process `nN`, whose log it keeps).
    func logPath(_ name: String) -> String {
        "\(stateDir)/\(name.hasSuffix("-node") ? String(name.dropLast(5)) : name).log"
    }

    func logTail(_ name: String, lines: Int = 40) -> String {
        guard let text = try? String(contentsOfFile: logPath(name), encoding: .utf8) else {
            return "(no log at \(logPath(name)))"
        }
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    @discardableResult
    private func command(_ arguments: [String]) throws -> String {
        let result = Self.run(arguments)
        guard result.status == 0 else {
            throw FixtureError("scripts/testbed \(arguments.joined(separator: " ")) failed (exit status \(result.status)): \(result.output)")
        }
        return result.output
    }

    /// Runs the script (through CairnProcess's `Command`, with a deadline: `up` waits at most 120 s
    /// for the lock plus its start-up timeouts). Failing to run it, or a timeout, reports exit
    /// status 127 with the reason.
    static func run(_ arguments: [String], environment: [String: String] = [:]) -> (status: Int32, stdout: String, output: String) {
        do {
            let env = environment.filter { !$0.value.isEmpty }.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
            let result = try Command.runBlocking((env.isEmpty ? [] : ["env"] + env) + [script] + arguments, timeout: .seconds(600))
            return (result.status, result.stdout, result.output)
        } catch {
            return (127, "", "scripts/testbed \(arguments.joined(separator: " ")): \(error)")
        }
    }
}

/// The bed's network on its own (`up --no-cairn`: namespaces, bridge, etcd), and `down` leaving
/// nothing behind. The Cairn processes are exercised by the tests that use the bed.
final class TestbedNetworkTests: XCTestCase {
    private var bed: Testbed?

    override func tearDown() async throws {
        if let problem = bed?.down() { XCTFail(problem) }
        bed = nil
        try await super.tearDown()
    }

    private func namespaces() throws -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
        return names.filter { $0.hasPrefix(Testbed.namespacePrefix) }.sorted()
    }

    func testPartitionCutsOnlyTheControlPlaneAndDownRemovesEverything() throws {
        let bed = try Testbed.up(nodes: 2, withCairn: false)
        self.bed = bed
        XCTAssertEqual(try namespaces(), ["ctl", "hub", "n1", "n2"].map { Testbed.namespacePrefix + $0 })
        XCTAssertEqual(bed.etcdEndpoint, "http://10.77.0.1:2379")
        XCTAssertNil(bed.endpoints["controller"], "--no-cairn starts no controller")
        try bed.check()

        let health = try bed.exec("n1", ["curl", "-fsS", "--max-time", "2", "http://10.77.0.1:2379/health"])
        XCTAssertTrue(health.contains("\"health\":\"true\""), "etcd from n1: \(health)")

        try bed.partition("n1")
        XCTAssertThrowsError(try bed.exec("n1", ["curl", "-fsS", "--max-time", "2", "http://10.77.0.1:2379/health"]),
                             "a partitioned node must not reach etcd")
        XCTAssertTrue(try bed.status().contains("PARTITIONED"))
        try bed.check()  // n1 -> etcd unreachable, ctl -> n1 unreachable, n1 <-> n2 reachable
        XCTAssertNoThrow(try bed.exec("n2", ["curl", "-fsS", "--max-time", "2", "http://10.77.0.1:2379/health"]))

        try bed.heal("n1")
        XCTAssertNoThrow(try bed.exec("n1", ["curl", "-fsS", "--max-time", "2", "http://10.77.0.1:2379/health"]))

        try bed.kill("etcd")
        XCTAssertThrowsError(try bed.exec("n2", ["curl", "-fsS", "--max-time", "2", "http://10.77.0.1:2379/health"]))
        try bed.restart("etcd")
        XCTAssertNoThrow(try bed.exec("n2", ["curl", "-fsS", "--max-time", "2", "http://10.77.0.1:2379/health"]))

        XCTAssertNil(bed.down())
        self.bed = nil
        XCTAssertEqual(try namespaces(), [])
        XCTAssertFalse(FileManager.default.fileExists(atPath: bed.stateDir), "down leaves \(bed.stateDir)")
        XCTAssertNil(bed.down(), "down again must succeed: it is idempotent")
    }

    func testSecondUpIsRefusedWhileABedIsUp() throws {
        let bed = try Testbed.up(nodes: 1, withCairn: false)
        self.bed = bed
        let second = Testbed.run(["up", "--no-cairn", "--nodes", "1"])
        XCTAssertNotEqual(second.status, 0)
        XCTAssertTrue(second.output.contains("testbed down"), "the refusal says what to do: \(second.output)")
        XCTAssertNoThrow(try bed.check(), "the refused up must leave the running bed alone")
    }
}

/// CSI steps on the bed shared by the tests that use it: a block volume attached the way a CO
/// does it (ControllerPublish, NodeStage, NodePublish) and detached again.
extension Testbed {
    struct Attached {
        let node: String
        let staging: String
        let target: String
    }

    var controller: CSIClient { CSIClient(endpoint: controllerEndpoint) }
    /// The standby controller of a bed brought up with `controllers: 2`.
    var controller2: CSIClient { CSIClient(endpoint: endpoints["controller2"] ?? "unix://\(stateDir)/controller2.sock") }
    func node(_ name: String) -> CSIClient { CSIClient(endpoint: nodeEndpoint(name)) }

    func attachBlock(_ volumeID: String, on name: String, secrets: [String: String] = [:]) async throws -> Attached {
        try await attach(volumeID, on: name, access: .block, secrets: secrets)
    }

    /// `secrets` go with NodeStage (an encrypted volume's `passphrase`).
    func attach(_ volumeID: String, on name: String, access: Access, secrets: [String: String] = [:]) async throws -> Attached {
        let published = try await controller.controllerPublish(CSI.controllerPublish(volumeID, node: name, access: access))
        let root = stateDir + "/mnt/\(volumeID)-\(name)"
        let staging = root + "/staging"
        let target = root + "/target"
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        let client = node(name)
        var stage = CSI.stage(volumeID, staging: staging, access: access, publishContext: published.publishContext)
        stage.secrets = secrets
        _ = try await client.nodeStage(stage)
        _ = try await client.nodePublish(CSI.publish(volumeID, staging: staging, target: target, access: access,
                                                     publishContext: published.publishContext))
        return Attached(node: name, staging: staging, target: target)
    }

    func detach(_ volumeID: String, _ attached: Attached) async throws {
        let client = node(attached.node)
        _ = try await client.nodeUnpublish(CSI.unpublish(volumeID, target: attached.target))
        _ = try await client.nodeUnstage(CSI.unstage(volumeID, staging: attached.staging))
        _ = try await controller.controllerUnpublish(CSI.controllerUnpublish(volumeID, node: attached.node))
    }
}

/// The filesystems a test mounts on its volumes' devices (ext4); `removeAll` in tearDown
/// unmounts what a failed test left.
final class TestMounts: @unchecked Sendable {
    private var dirs: [String] = []

    /// Mounts `device` (ext4) at `dir`, created first; returns `dir`.
    func mount(_ device: String, at dir: String) throws -> String {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try BackgroundCommand.succeed(["mount", "-t", "ext4", device, dir])
        dirs.append(dir)
        return dir
    }

    func unmount(_ dir: String) throws {
        try BackgroundCommand.succeed(["umount", dir])
        dirs.removeAll { $0 == dir }
    }

    func removeAll() {
        for dir in dirs.reversed() { _ = Testbed.run(["umount", dir]) }
        dirs = []
    }
}
