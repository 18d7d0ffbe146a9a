import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The operator commands against a real cluster on the test bed (docs/cli.md): `cairn volume
/// watch` in a real terminal (tmux) during a rebuild, every list/inspect command's JSON, and
/// `cairn doctor` on this machine and against the bed's etcd.
final class OperatorCLITests: XCTestCase {
    var bed: Testbed?
    /// The tmux server this test started (its own socket), killed in tearDown whatever happened.
    var tmuxSocket: String?
    var tmuxServer: Int32?
    var background: Process?

    override func tearDown() async throws {
        if let background, background.isRunning {
            kill(background.processIdentifier, SIGKILL)
            background.waitUntilExit()
        }
        background = nil
        if let tmuxSocket {
            let panes = (try? Command.runBlocking(["tmux", "-L", tmuxSocket, "list-panes", "-a", "-F", "#{pane_pid}"], timeout: .seconds(10)))?.stdout ?? ""
            _ = try? Command.runBlocking(["tmux", "-L", tmuxSocket, "kill-server"], timeout: .seconds(10))
            // The pane's process group (the shell, the watch, its sleep), and the server itself if
            // it did not go.
            for pid in panes.split(separator: "\n").compactMap({ Int32($0) }) { kill(-pid, SIGKILL) }
            if let tmuxServer { kill(tmuxServer, SIGKILL) }
            unlink("\(ProcessInfo.processInfo.environment["TMUX_TMPDIR"] ?? "/tmp")/tmux-\(getuid())/\(tmuxSocket)")
        }
        tmuxSocket = nil
        tmuxServer = nil
        if let problem = bed?.down(after: testRun, logLines: 60) { XCTFail(problem) }
        bed = nil
    }

    /// A replica's node is down while 192 MiB are written; when it returns, `cairn volume watch`
    /// in a 120×30 tmux pane draws a progress bar for it that moves and reaches 100%, then exits
    /// 0 by itself. `--output json` of the same rebuild is one parseable object per line.
    func testVolumeWatchInATerminalShowsTheRebuildReachFullProgress() async throws {
        guard Command.missing(["tmux"]).isEmpty else {
            throw XCTSkip("tmux is not installed (scripts/setup installs it with the test packages)")
        }
        let bed = try Testbed.up(nodes: 3, nodeArgs: ["--rebuild-rate", "20", "--resync-retry", "0.5"])
        self.bed = bed
        let created = try await bed.controller.createVolume(
            CSI.create(name: "watched", access: .block, required: 256 << 20, parameters: ["replicas": "3"]))
        let volume = created.volume.volumeID
        let attached = try await bed.attachBlock(volume, on: "n1")
        try bed.kill("n3")
        let dd = try Command.runBlocking(["dd", "if=/dev/urandom", "of=\(attached.target)", "bs=1M", "count=192", "oflag=direct", "conv=fsync"],
                                         timeout: .seconds(120))
        XCTAssertEqual(dd.status, 0, dd.output)

        let cairn = try PluginProcess.locateBinary()
        let namespace = "/run/netns/" + Testbed.namespacePrefix + "ctl"
        let watch = ["nsenter", "--net=\(namespace)", "--", cairn, "volume", "watch", volume] + bed.etcdArguments
        let socket = "cairn-cli-test-\(getpid())"
        tmuxSocket = socket
        let shell = watch.map { "'\($0)'" }.joined(separator: " ") + "; echo \"watch exit status $?\"; sleep 600"
        let client = try Self.spawnWithDefaultSignals(["/usr/bin/tmux", "-L", socket, "new-session", "-d", "-s", "watch", "-x", "120", "-y", "30", shell])
        var status: Int32 = 0
        XCTAssertEqual(waitpid(client, &status, 0), client)
        XCTAssertEqual(status, 0, "tmux new-session failed (wait status \(status))")
        let server = try Command.runBlocking(["tmux", "-L", socket, "display-message", "-p", "#{pid}"], timeout: .seconds(10))
        tmuxServer = Int32(server.stdout.trimmingCharacters(in: .whitespacesAndNewlines))

        let jsonFile = bed.stateDir + "/watch.jsonl"
        let json = Process()
        json.executableURL = URL(fileURLWithPath: "/usr/bin/nsenter")
        json.arguments = Array(watch.dropFirst()) + ["--output", "json"]
        XCTAssertTrue(FileManager.default.createFile(atPath: jsonFile, contents: nil))
        json.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: jsonFile))
        try json.run()
        background = json

        try bed.restart("n3")
        var frames: [String] = []
        var moving: String?
        let deadline = Date().addingTimeInterval(180)
        while Date() < deadline {
            let pane = try Command.runBlocking(["tmux", "-L", socket, "capture-pane", "-p", "-t", "watch"], timeout: .seconds(10))
            XCTAssertEqual(pane.status, 0, pane.output)
            if frames.last != pane.stdout { frames.append(pane.stdout) }
            if moving == nil, let percent = Self.percent(ofReplica: "n3", in: pane.stdout), percent > 0, percent < 100 { moving = pane.stdout }
            if pane.stdout.contains("watch exit status") { break }
            try await Task.sleep(for: .milliseconds(300))
        }
        let last = frames.last ?? ""
        print("cairn volume watch: \(frames.count) distinct frames; one in progress:\n\(moving ?? "(none)")\nthe last:\n\(last)")
        XCTAssertNotNil(moving, "no frame showed n3's bar between 0% and 100%; frames:\n\(frames.joined(separator: "\n----\n"))")
        if let moving {
            XCTAssertTrue(moving.contains("[=") && moving.contains("ETA"), "no bar with an ETA:\n\(moving)")
        }
        XCTAssertEqual(Self.percent(ofReplica: "n3", in: last), 100, "the bar did not reach 100%:\n\(last)")
        XCTAssertTrue(last.contains("every replica of \(volume) is in sync"), last)
        XCTAssertTrue(last.contains("watch exit status 0"), "the watch did not end by itself with status 0:\n\(last)")
        XCTAssertTrue(last.split(separator: "\n").allSatisfy { $0.count <= 120 }, "a line wider than the pane")

        // The JSON watch of the same rebuild ends by itself too.
        let jsonDeadline = Date().addingTimeInterval(30)
        while json.isRunning && Date() < jsonDeadline { try await Task.sleep(for: .milliseconds(100)) }
        XCTAssertFalse(json.isRunning, "the --output json watch did not end once every replica was in sync")
        if !json.isRunning { XCTAssertEqual(json.terminationStatus, 0) }
        let lines = try String(contentsOfFile: jsonFile, encoding: .utf8).split(separator: "\n")
        XCTAssertGreaterThan(lines.count, 3, "one object per sample")
        var percents: [Double] = []
        for line in lines {
            let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], String(line))
            XCTAssertEqual(object["volumeID"] as? String, volume)
            let replicas = try XCTUnwrap(object["replicas"] as? [[String: Any]])
            if let n3 = replicas.first(where: { $0["nodeID"] as? String == "n3" }), let p = n3["percent"] as? Double { percents.append(p) }
        }
        XCTAssertEqual(percents.last, 100, "the last sample: \(lines.last ?? "")")
        XCTAssertEqual(percents, percents.sorted(), "progress went backwards: \(percents)")
        let final = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(lines.last!.utf8)) as? [String: Any])
        XCTAssertEqual(final["condition"] as? String, "healthy")

        // Not on a terminal (the bed's exec captures it): plain lines, no cursor movement.
        let plain = try cli(["volume", "watch", volume])
        XCTAssertTrue(plain.contains("\(volume) healthy 3/3 in sync") && plain.contains("every replica of \(volume) is in sync"), plain)
        XCTAssertFalse(plain.contains("\u{1B}["), "escape sequences in plain output:\n\(plain)")
        try await bed.detach(volume, attached)
    }

    /// Every list and inspect command with `--output json` against the bed's etcd, with volumes,
    /// an attachment, a snapshot and an away node in it: one document each, with the fields
    /// docs/cli.md names. The tables print their headers.
    func testEveryListAndInspectCommandPrintsJSONThatParses() async throws {
        let bed = try Testbed.up(nodes: 3)
        self.bed = bed
        let a = try await bed.controller.createVolume(CSI.create(name: "json-a", access: .block, required: 64 << 20, parameters: ["replicas": "3"])).volume.volumeID
        let b = try await bed.controller.createVolume(CSI.create(name: "json-b", access: .block, required: 32 << 20, parameters: ["replicas": "2"])).volume.volumeID
        let attached = try await bed.attachBlock(a, on: "n1")
        let snapshot = try await bed.controller.createSnapshot(CSI.snapshot(a, name: "json-snap")).snapshot.snapshotID
        try bed.kill("n3")
        // n3 is out of sync once a write finds it gone.
        let dd = try Command.runBlocking(["dd", "if=/dev/urandom", "of=\(attached.target)", "bs=1M", "count=4", "oflag=direct", "conv=fsync"], timeout: .seconds(60))
        XCTAssertEqual(dd.status, 0, dd.output)

        let volumes = try document(["volume", "list"])
        let listed = try XCTUnwrap(volumes["volumes"] as? [[String: Any]])
        XCTAssertEqual(Set(listed.compactMap { $0["id"] as? String }), [a, b])
        let rowA = try XCTUnwrap(listed.first { $0["id"] as? String == a })
        XCTAssertEqual(rowA["attachedTo"] as? [String], ["n1"])
        XCTAssertEqual(rowA["sizeBytes"] as? Int, 64 << 20)
        XCTAssertEqual((rowA["condition"] as? [String: Any])?["state"] as? String, "degraded")

        let inspect = try document(["volume", "inspect", a])
        XCTAssertEqual(inspect["id"] as? String, a)
        XCTAssertGreaterThan(inspect["epoch"] as? Int ?? 0, 0)
        let replicas = try XCTUnwrap(inspect["replicas"] as? [[String: Any]])
        XCTAssertEqual(replicas.count, 3)
        XCTAssertEqual(replicas.first { $0["nodeID"] as? String == "n3" }?["inSync"] as? Bool, false)
        XCTAssertEqual((inspect["attachments"] as? [[String: Any]])?.first?["nodeID"] as? String, "n1")
        XCTAssertEqual((inspect["snapshots"] as? [[String: Any]])?.first?["id"] as? String, snapshot)

        let nodes = try XCTUnwrap(try document(["node", "list"])["nodes"] as? [[String: Any]])
        XCTAssertEqual(nodes.compactMap { $0["id"] as? String }, ["n1", "n2", "n3"])
        XCTAssertEqual(nodes.first?["state"] as? String, "live")
        XCTAssertTrue(["live", "away"].contains(nodes.last?["state"] as? String ?? ""), "\(nodes)")
        XCTAssertNotNil(nodes.first?["dataAddress"] as? String)

        let n1 = try document(["node", "inspect", "n1"])
        XCTAssertEqual((n1["node"] as? [String: Any])?["id"] as? String, "n1")
        XCTAssertEqual(n1["attachedVolumes"] as? [String], [a])
        XCTAssertEqual((n1["replicas"] as? [[String: Any]])?.count, 2, "n1 holds a replica of both volumes")

        let all = try XCTUnwrap(try document(["replica", "list"])["replicas"] as? [[String: Any]])
        XCTAssertEqual(all.count, 5)
        let ofB = try XCTUnwrap(try document(["replica", "list", "--volume", b])["replicas"] as? [[String: Any]])
        XCTAssertEqual(ofB.count, 2)
        let onN2 = try XCTUnwrap(try document(["replica", "list", "--node", "n2"])["replicas"] as? [[String: Any]])
        XCTAssertTrue(onN2.allSatisfy { $0["nodeID"] as? String == "n2" } && !onN2.isEmpty, "\(onN2)")

        let snapshots = try XCTUnwrap(try document(["snapshot", "list"])["snapshots"] as? [[String: Any]])
        XCTAssertEqual(snapshots.first?["id"] as? String, snapshot)
        XCTAssertEqual(snapshots.first?["sourceVolumeID"] as? String, a)
        XCTAssertEqual(try XCTUnwrap(try document(["snapshot", "list", "--volume", b])["snapshots"] as? [[String: Any]]).count, 0)

        // The tables: a header and a row per thing.
        let table = try cli(["volume", "list"])
        XCTAssertTrue(table.hasPrefix("VOLUME"), table)
        XCTAssertTrue(table.contains(a) && table.contains("degraded"), table)
        let inspectTable = try cli(["volume", "inspect", a])
        XCTAssertTrue(inspectTable.contains("replicas (2 of 3 in sync)") && inspectTable.contains("n3"), inspectTable)
        print(inspectTable)
        print(try cli(["node", "list"]))
        XCTAssertTrue(try cli(["node", "inspect", "n1"]).contains("attached:"))

        // The doctor against the bed's etcd: reachable, TLS as the bed serves it, the clock measured.
        let doctor = try document(["doctor"])
        let checks = try XCTUnwrap(doctor["checks"] as? [[String: Any]])
        let etcd = try XCTUnwrap(checks.first { $0["name"] as? String == "etcd" })
        XCTAssertEqual(etcd["status"] as? String, "ok", "\(etcd)")
        XCTAssertNotNil(checks.first { $0["name"] as? String == "clock" }, "no clock check: \(checks)")
        if bed.etcdArguments.contains("--etcd-cert") {
            XCTAssertEqual(checks.first { $0["name"] as? String == "etcd.cert" }?["status"] as? String, "ok", "\(checks)")
        }
        print(try cli(["doctor"]))
        try await bed.controller.deleteSnapshot(snapshot)
    }

    /// `cairn doctor` on this machine: every line has a status, the JSON parses and says the
    /// same, and the exit status is 1 exactly when a check failed.
    func testTheDoctorChecksThisMachine() throws {
        let cairn = try PluginProcess.locateBinary()
        let text = try Command.runBlocking([cairn, "doctor"], timeout: .seconds(60))
        print(text.stdout)
        let lines = text.stdout.split(separator: "\n")
        XCTAssertGreaterThan(lines.count, 10)
        for line in lines.dropLast() {
            XCTAssertTrue(line.hasPrefix("ok ") || line.hasPrefix("warn ") || line.hasPrefix("FAIL "), "no status: \(line)")
        }
        for name in ["kernel", "fuse", "fuse.resend", "fuse.io_uring", "io_uring", "loop", "loop.write_through", "tool.mkfs.ext4", "tool.losetup", "cgroup.io", "data-dir"] {
            XCTAssertTrue(lines.contains { $0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.map(String.init) == name }, "no \(name) line")
        }
        let json = try Command.runBlocking([cairn, "doctor", "--output", "json"], timeout: .seconds(60))
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any], json.output)
        let checks = try XCTUnwrap(object["checks"] as? [[String: Any]])
        XCTAssertEqual(checks.count, lines.count - 1)
        let failed = checks.contains { $0["status"] as? String == "fail" }
        XCTAssertEqual(object["ok"] as? Bool, !failed)
        XCTAssertEqual(text.status, failed ? 1 : 0)
        XCTAssertTrue(checks.allSatisfy { ($0["status"] as? String) == "ok" || $0["fix"] is String }, "a warning or failure without a fix")

        // A store that cannot be reached fails, with the fix.
        let unreachable = try Command.runBlocking([cairn, "doctor", "--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:1"], timeout: .seconds(60))
        XCTAssertEqual(unreachable.status, 1, unreachable.output)
        XCTAssertTrue(unreachable.stdout.contains("FAIL  etcd"), unreachable.stdout)
    }

    /// `cairn replica latency --stores N --durable` (bench/run's "disk's share" stage): N scratch
    /// stores written in lockstep; it prints the rounds per second, makes nearly every commit
    /// durable as written (a flush follows only where a store could not), leaves nothing behind
    /// in --dir, and refuses a store count it cannot run.
    func testReplicaLatencyRunsStoresInLockstepAndLeavesNothingBehind() throws {
        let cairn = try PluginProcess.locateBinary()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("cairn-latency-test-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let run = try Command.runBlocking([cairn, "replica", "latency", "--dir", dir, "--stores", "3", "--durable",
                                           "--ops", "200", "--size-mib", "16"], timeout: .seconds(120))
        XCTAssertEqual(run.status, 0, run.output)
        XCTAssertTrue(run.stdout.contains("3 stores in lockstep"), run.stdout)
        let line = try XCTUnwrap(run.stdout.split(separator: "\n").first { $0.contains("write + flush (durable write)") }, run.stdout)
        let perSecond = try XCTUnwrap(line.split(separator: "(").last.flatMap { Int($0.split(separator: " ")[0]) }, String(line))
        XCTAssertGreaterThan(perSecond, 0)
        let missedLine = try XCTUnwrap(run.stdout.split(separator: "\n").first { $0.contains("could not make durable") }, run.stdout)
        let missed = try XCTUnwrap(missedLine.split(separator: " ").last.flatMap { Int($0) }, String(missedLine))
        // 3 stores × (50 warm-up + 200) commits: a store syncs its journal record as it writes.
        XCTAssertLessThan(missed, 3 * 250 / 10, run.stdout)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [], "scratch stores left in \(dir)")

        let refused = try Command.runBlocking([cairn, "replica", "latency", "--dir", dir, "--stores", "0"], timeout: .seconds(30))
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.output.contains("--stores takes 1 to 8"), refused.output)
    }

    // MARK: Steps

    /// Starts `argv` (an absolute path first) with stdin, stdout and stderr on /dev/null, no
    /// signal blocked and every signal at its default. Not through Foundation's Process: the tmux
    /// server the client forks would inherit the test process's blocked signals (so it and its
    /// panes ignore SIGHUP and SIGTERM) and the descriptor Process watches to see its child end.
    static func spawnWithDefaultSignals(_ argv: [String]) throws -> pid_t {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd: Int32 in 0...2 { posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", O_RDWR, 0) }
        // Every other descriptor this process holds open without close-on-exec.
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            guard let fd = Int32(entry), fd > 2 else { continue }
            let flags = fcntl(fd, F_GETFD)
            if flags >= 0 && flags & FD_CLOEXEC == 0 { posix_spawn_file_actions_addclose(&actions, fd) }
        }
        let arguments = argv.map { strdup($0) } + [nil]
        defer { for a in arguments { free(a) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attributes, arguments, environ)
        guard rc == 0 else { throw FixtureError("posix_spawn \(argv[0]): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// The percentage on `node`'s line of a watch screen, nil when it shows none.
    static func percent(ofReplica node: String, in screen: String) -> Double? {
        for line in screen.split(separator: "\n") where line.hasPrefix(node + " ") {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            if let word = words.first(where: { $0.hasSuffix("%") }), let value = Double(word.dropLast()) { return value }
        }
        return nil
    }

    /// Runs `cairn ARGS --store etcd …` in the bed's ctl namespace.
    func cli(_ arguments: [String]) throws -> String {
        guard let bed else { throw FixtureError("no bed") }
        return try bed.exec("ctl", [try PluginProcess.locateBinary()] + arguments + bed.etcdArguments)
    }

    /// `cli` with `--output json`, parsed as one JSON object.
    func document(_ arguments: [String]) throws -> [String: Any] {
        let text = try cli(arguments + ["--output", "json"])
        guard let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
            throw FixtureError("cairn \(arguments.joined(separator: " ")) --output json is not one JSON object:\n\(text)")
        }
        return object
    }
}
