import ArgumentParser
import Foundation

#if canImport(Glibc)
import Glibc
#endif

struct Failover: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The attached node is SIGKILLed (scripts/testbed kill); time until the volume is staged, published and written (O_DIRECT) on another node.")

    @Option(help: "The controller's CSI endpoint.") var controller: String
    @Option(name: .customLong("node"), help: "NAME=ENDPOINT of a bed node (repeat; at least the two used).") var nodes: [String]
    @Option(help: "The node the volume is attached to, then killed.") var from: String = "n1"
    @Option(help: "The node it fails over to.") var to: String = "n2"
    @Option(help: "The test bed script (its CAIRN_TESTBED_* environment is inherited).") var testbed: String
    @Option(help: "Iterations (the killed node is restarted between them).") var iterations: Int = 3
    @Option(help: "Replicas per volume.") var replicas: Int = 3
    @Option(help: "Volume size in MiB.") var sizeMiB: Int64 = 256
    @Option(help: "Directory for staging and target paths (under the nodes' --path-root).") var workDir: String
    @Option(help: "Where the JSON result goes.") var out: String

    func run() async throws {
        var endpoints: [String: String] = [:]
        for entry in nodes {
            let parts = entry.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { throw ValidationError("--node takes NAME=ENDPOINT, not '\(entry)'") }
            endpoints[parts[0]] = parts[1]
        }
        guard let fromEndpoint = endpoints[from], let toEndpoint = endpoints[to] else {
            throw ValidationError("--node must name both --from \(from) and --to \(to)")
        }
        let controller = CSIClient(endpoint: self.controller)
        var total = Samples(), detach = Samples(), attach = Samples(), write = Samples(), kill = Samples()
        for i in 0..<iterations {
            let oldNode = CSIClient(endpoint: fromEndpoint), newNode = CSIClient(endpoint: toEndpoint)
            let volume = try await createVolume(controller, name: "bench-failover-\(i)-\(UUID().uuidString.prefix(8))",
                                                bytes: sizeMiB << 20, replicas: replicas, preferredNode: from)
            let first = Attachment(volume: volume, nodeID: from, root: workDir)
            let second = Attachment(volume: volume, nodeID: to, root: workDir)
            var killed = false
            do {
                try await first.publish(controller: controller, node: oldNode)
                try directWrite(first.target + "/before-failover")

                // The clock starts when the kill command returns: the process group is dead.
                try await kill.time { try runTestbed("kill", from) }
                killed = true
                let start = ContinuousClock.now
                try await detach.time { try await first.unpublish(controller: controller, node: nil) }
                try await attach.time { try await second.publish(controller: controller, node: newNode) }
                try await write.time { try directWrite(second.target + "/after-failover") }
                total.ms.append(milliseconds(ContinuousClock.now - start))
                log("failover \(i + 1)/\(iterations): \(fmt(total.ms.last)) ms")
            } catch {
                try? await cleanUp(volume, first, second, killed: killed, controller, oldNode, newNode)
                throw error
            }
            try await cleanUp(volume, first, second, killed: killed, controller, oldNode, newNode, strict: true)
        }
        try writeJSON([
            "replicas": replicas, "iterations": iterations, "from": from, "to": to,
            "failover": total.summary, "controller_unpublish_old": detach.summary,
            "publish_chain_new": attach.summary, "first_direct_write": write.summary,
            "kill_command": kill.summary,
            "samples_ms": ["failover": total.ms],
        ], to: out)
    }

    /// Undoes an iteration: the new attachment, the killed node restarted and its stale staging
    /// (dead FUSE mount, loop device) removed through its own NodeUnstage, the volume deleted.
    func cleanUp(_ volume: String, _ first: Attachment, _ second: Attachment, killed: Bool, _ controller: CSIClient,
                 _ oldNode: CSIClient, _ newNode: CSIClient, strict: Bool = false) async throws {
        var problems: [String] = []
        func attempt(_ what: String, _ body: () async throws -> Void) async {
            do { try await body() } catch { problems.append("\(what): \(error)") }
        }
        await attempt("detach from \(to)") { try await second.unpublish(controller: controller, node: newNode) }
        if killed {
            await attempt("restart \(from)") {
                try runTestbed("restart", from)
                try await oldNode.waitUntilServing(seconds: 30)
            }
        }
        await attempt("clean the old attachment on \(from)") { try await first.unpublish(controller: controller, node: oldNode) }
        await attempt("delete \(volume)") { try await deleteVolume(controller, volume) }
        for a in [first, second] { try? FileManager.default.removeItem(atPath: workDir + "/\(volume)-\(a.nodeID)") }
        if strict && !problems.isEmpty {
            throw BenchError("cleaning up after a failover failed: " + problems.joined(separator: "; "))
        }
        for p in problems { log(p) }
    }

    func runTestbed(_ arguments: String...) throws {
        try runTestbedScript(testbed, arguments)
    }
}

/// One 4 KiB O_DIRECT|O_DSYNC write: the application's first durable write on the new node.
func directWrite(_ path: String) throws {
    let oDirect: Int32 = 0o40000  // Linux x86_64; Glibc's module does not export O_DIRECT
    let fd = open(path, O_CREAT | O_WRONLY | oDirect | O_DSYNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw BenchError("open \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    guard let memory = aligned_alloc(4096, 4096) else { throw BenchError("aligned_alloc failed") }
    defer { free(memory) }
    memset(memory, 0x5A, 4096)
    let n = pwrite(fd, memory, 4096, 0)
    guard n == 4096 else {
        throw BenchError("write \(path): \(n < 0 ? String(cString: strerror(errno)) : "short write of \(n) bytes")")
    }
}

/// Runs the test bed script; its output (stdout) on success, a BenchError with all output otherwise.
@discardableResult
func runTestbedScript(_ script: String, _ arguments: [String]) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: script)
    process.arguments = arguments
    let output = Pipe(), errors = Pipe()
    process.standardOutput = output
    process.standardError = errors
    try process.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    let problems = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw BenchError("\(script) \(arguments.joined(separator: " ")) failed (exit \(process.terminationStatus)): \(text)\(problems)")
    }
    return text
}
