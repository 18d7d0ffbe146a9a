import CSIProto
import CairnCore
import Foundation
import XCTest

/// Issue 14: restarting the process that runs a volume's engine, under load, costs no I/O
/// error. fio with crc32c verification writes through a raw block volume and through ext4 (3
/// replicas each) while the process is SIGKILLed and started again; the FUSE keeper keeps the
/// connection and the kernel resends what was in flight. On the failover tests' bed (their
/// setUp and tearDown).
extension ReplicatedFailoverTests {
    /// SIGKILL of the node's engine-running process only (its FUSE keeper lives on), as a crash,
    /// a supervisor restart or an upgrade does it; then the same process is started again.
    func killAndRestartEngineProcess(_ node: String) throws {
        try bed.killEngineProcess(node)
        try bed.restartEngineProcess(node)
    }

    /// The pid in the node's FUSE keeper pid file (`<data-dir>/fuse-keeper.pid`); nil while none.
    func keeperPID(_ node: String) -> Int32? {
        (try? String(contentsOfFile: bed.stateDir + "/\(node)/fuse-keeper.pid", encoding: .utf8))
            .flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    func testEngineProcessKilledUnderBlockLoadLosesNoIO() async throws {
        let volume = try await createBlockVolume("restart-block")
        let attached = try await attach(volume, on: "n1")
        let fio = try Fio.start(file: attached.target, sizeMiB: 48, seconds: 14)
        try await Task.sleep(for: .seconds(4))
        try killAndRestartEngineProcess("n1")
        let result = try await fio.wait(seconds: 90)
        print("restart under block load: \(result.summary)")
        result.assertNoIOError()
        XCTAssertGreaterThan(result.writes, 100, "fio must have written before and after the restart")
        XCTAssertLessThanOrEqual(try fuseMounts("n1").count, 1, "the restart must not stack a mount")
        XCTAssertTrue(bed.logTail(bed.engineProcess("n1"), lines: 400).contains("resumed the volume's FUSE connection"),
                      "the new engine resumes the kept connection")

        // A CO repeating NodeStage/NodePublish after the restart gets OK for a volume that serves.
        let n1 = node("n1")
        _ = try await n1.nodeStage(CSI.stage(volume.id, staging: attached.staging, access: .block))
        _ = try await n1.nodePublish(CSI.publish(volume.id, staging: attached.staging, target: attached.target, access: .block))
        let stats = try await n1.nodeGetVolumeStats(CSI.stats(volume.id, path: attached.target))
        XCTAssertFalse(stats.volumeCondition.abnormal, stats.volumeCondition.message)
        let block = BlockWriter.block(index: 7, sequence: 99)
        try BlockWriter.writeDirect(device: attached.target, index: 7, block: block)
        XCTAssertEqual(try BlockWriter.readDirect(device: attached.target, index: 7), block)
        try await detach(volume, attached)
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [], "NodeUnstage stops the resumed engine")
    }

    /// The CSI node process SIGKILLed and restarted while fio writes through ext4 and through a
    /// raw block volume at once (3 replicas each): it holds nothing of the data path.
    func testCSINodeProcessKilledUnderExt4AndBlockLoadLosesNoIO() async throws {
        try XCTSkipUnless(bed.isSplit, "the bed runs one process per node (CAIRN_TESTBED_SPLIT=0)")
        let block = try await createBlockVolume("node-restart-block")
        let blockAttached = try await attach(block, on: "n1")
        let fsID = try await controller.createVolume(
            CSI.create(name: "node-restart-ext4", access: .mount(fsType: "ext4"), required: 128 << 20,
                       parameters: ["replicas": "3"])).volume.volumeID
        let fsAttached = try await bed.attach(fsID, on: "n1", access: .mount(fsType: "ext4"))
        let onBlock = try Fio.start(file: blockAttached.target, sizeMiB: 48, seconds: 12)
        let onExt4 = try Fio.start(file: fsAttached.target + "/fio.dat", sizeMiB: 32, seconds: 12)
        try await Task.sleep(for: .seconds(4))
        try bed.kill("n1-node")
        try await Task.sleep(for: .seconds(1))
        try bed.restart("n1-node")
        for (name, fio) in [("block", onBlock), ("ext4", onExt4)] {
            let result = try await fio.wait(seconds: 90)
            print("CSI node restart under \(name) load: \(result.summary)")
            result.assertNoIOError("\(name): ")
            XCTAssertGreaterThan(result.writes, 100, name)
        }
        try await bed.detach(fsID, fsAttached)
        _ = try await controller.deleteVolume(CSI.delete(fsID))
        try await detach(block, blockAttached)
    }

    /// The keeper itself dies (OOM killer, an operator): the engine process starts a new one
    /// and hands it every connection, so the next restart of the engine process still loses
    /// nothing.
    func testKeeperKilledThenEngineProcessKilledStillLosesNoIO() async throws {
        let volume = try await createBlockVolume("keeper-killed")
        let attached = try await attach(volume, on: "n1")
        let first = try XCTUnwrap(keeperPID("n1"), "n1's keeper pid file")
        XCTAssertEqual(kill(first, SIGKILL), 0, "SIGKILL of the keeper \(first)")
        // The engine process notices within its 2 s watch and starts a new keeper.
        var second: Int32?
        for _ in 0..<100 {
            try await Task.sleep(for: .milliseconds(100))
            if let pid = keeperPID("n1"), pid != first, kill(pid, 0) == 0 {
                second = pid
                break
            }
        }
        XCTAssertNotNil(second, "a new keeper must be started after the first one died")
        try await Task.sleep(for: .seconds(1))

        let fio = try Fio.start(file: attached.target, sizeMiB: 48, seconds: 10)
        try await Task.sleep(for: .seconds(3))
        try killAndRestartEngineProcess("n1")
        let result = try await fio.wait(seconds: 90)
        print("restart after a keeper restart: \(result.summary)")
        result.assertNoIOError()
        try await detach(volume, attached)
    }

    /// The keeper holds every staged volume's /dev/fuse descriptor and must cost their I/O
    /// nothing: the kernel wakes every waiter on such a descriptor for each request it queues,
    /// so a keeper that waited on them (even for errors only) woke once per I/O — on this
    /// machine kind's two CPUs, a third of the wake-ups of a random-read load. Its context
    /// switches during a load are counted against the reads done.
    func testTheKeeperIsNotWokenByItsVolumesIO() async throws {
        let volume = try await createBlockVolume("keeper-quiet")
        let attached = try await attach(volume, on: "n1")
        let keeper = try XCTUnwrap(keeperPID("n1"), "n1's keeper pid file")
        // Every thread's (the keeper's loop need not run on the main thread).
        func switches() throws -> Int {
            try FileManager.default.contentsOfDirectory(atPath: "/proc/\(keeper)/task").map { task in
                let status = (try? String(contentsOfFile: "/proc/\(keeper)/task/\(task)/status", encoding: .utf8)) ?? ""
                return status.split(separator: "\n")
                    .filter { $0.hasPrefix("voluntary_ctxt_switches") || $0.hasPrefix("nonvoluntary_ctxt_switches") }
                    .compactMap { Int($0.split(separator: ":").last!.trimmingCharacters(in: .whitespaces)) }.reduce(0, +)
            }.reduce(0, +)
        }
        let before = try switches()
        let result = try await Fio.start(file: attached.target, sizeMiB: 32, arguments: [
            "--rw=randread", "--bs=4k", "--ioengine=libaio", "--iodepth=32", "--runtime=4", "--time_based"]).wait(seconds: 60)
        let woken = try switches() - before
        print("keeper \(keeper): \(woken) context switches during \(result.reads) reads")
        result.assertNoIOError()
        XCTAssertGreaterThan(result.reads, 2_000, "the load must have reached the volume")
        // Once a second it looks at its connections, and the engine process talks to it now
        // and then; one wake-up per hundred reads would already be a wait on /dev/fuse.
        XCTAssertLessThan(woken, max(40, result.reads / 100),
                          "the keeper was woken \(woken) times by \(result.reads) reads: it waits on a /dev/fuse descriptor")
        XCTAssertEqual(kill(keeper, 0), 0, "the keeper still runs")
        try await detach(volume, attached)
    }

    /// A replica node's process restarts (an upgrade) while the volume is written on another
    /// node: no I/O error, and the replica is back in sync within 30 s by a delta — the resync
    /// copies what changed while it was away, never the whole volume. The volume is written
    /// whole first, so a full rebuild would copy all 64 MiB, while a delta can only be blocks of
    /// the writer's first 48 MiB. (Without that, the proxy was "under half the volume", which a
    /// machine whose sync writer outpaces the outage's length — 1,570 writes/s, 9 s out — can
    /// exceed with a true delta.)
    func testReplicaNodeRestartedUnderLoadRejoinsByDeltaWithin30Seconds() async throws {
        let volume = try await createBlockVolume("replica-restart")
        let attached = try await attach(volume, on: "n1")
        let volumeMiB = volume.blocks * BlockWriter.blockSize >> 20
        let fill = try await Fio.start(file: attached.target, sizeMiB: volumeMiB, arguments: [
            "--rw=write", "--bs=1M", "--ioengine=libaio", "--iodepth=4"]).wait(seconds: 60)
        fill.assertNoIOError()
        let fio = try Fio.start(file: attached.target, sizeMiB: 48, seconds: 12)
        try await Task.sleep(for: .seconds(3))
        // The process holding n2's replicas (the agent on a split bed).
        try bed.kill(bed.engineProcess("n2"))
        try await Task.sleep(for: .seconds(1))
        try bed.restart(bed.engineProcess("n2"))
        let restarted = ContinuousClock.now
        var back: Duration?
        while ContinuousClock.now - restarted < .seconds(60) {
            let condition = try await controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition
            // Degraded first (n1's engine dropped the replica), then in sync again.
            if !condition.abnormal, bed.logTail(bed.engineProcess("n1"), lines: 400).contains("resync complete") {
                back = ContinuousClock.now - restarted
                break
            }
            try await Task.sleep(for: .milliseconds(250))
        }
        let result = try await fio.wait(seconds: 90)
        print("replica node restart under load: \(result.summary)")
        result.assertNoIOError()
        let line = bed.logTail(bed.engineProcess("n1"), lines: 400).split(separator: "\n").last { $0.contains("resync complete") && $0.contains("replica.node=n2") }
        print("replica node restart: back in sync after \(back.map { "\($0)" } ?? "never"); \(line.map(String.init) ?? "no resync line")")
        let inSync = try XCTUnwrap(back, "the restarted replica must be back in sync")
        XCTAssertLessThanOrEqual(inSync, .seconds(30))
        let copied = line.flatMap { Self.metric($0, "copied.bytes") } ?? Int64.max
        XCTAssertLessThanOrEqual(copied, Int64(48 << 20),
                                 "a restart costs a delta (blocks of the writer's 48 MiB), never a full rebuild (64 MiB): \(line.map(String.init) ?? "")")
        try await detach(volume, attached)
    }

    /// A rolling upgrade: every node's Cairn processes replaced, one node at a time, by another
    /// build (`CAIRN_UPGRADE_BIN`, scripts/test builds the release binary for it) while fio writes
    /// through a 3-replica block volume on n1: no I/O error, and after each node the volume is
    /// back to all replicas in sync within 30 s.
    func testRollingUpgradeOfEveryNodeUnderLoadLosesNoIO() async throws {
        guard let other = ProcessInfo.processInfo.environment["CAIRN_UPGRADE_BIN"], !other.isEmpty else {
            throw XCTSkip("CAIRN_UPGRADE_BIN (another build of cairn to upgrade to) is not set; scripts/test sets it to the release build")
        }
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: other), "CAIRN_UPGRADE_BIN \(other) is not executable")
        let volume = try await createBlockVolume("rolling-upgrade")
        let attached = try await attach(volume, on: "n1")
        let fio = try Fio.start(file: attached.target, sizeMiB: 48, seconds: 60)
        try await Task.sleep(for: .seconds(3))
        var report: [String] = []
        for node in bed.nodes {
            let started = ContinuousClock.now
            try bed.upgrade(node, cairn: other)
            let upgraded = ContinuousClock.now - started
            var back: Duration?
            while ContinuousClock.now - started < .seconds(60) {
                try await Task.sleep(for: .milliseconds(250))
                if try await !controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition.abnormal {
                    back = ContinuousClock.now - started
                    break
                }
            }
            let exe = bed.executable(of: bed.engineProcess(node)) ?? "?"
            let resync = bed.logTail(bed.engineProcess("n1"), lines: 600).split(separator: "\n")
                .last { $0.contains("resync complete") && $0.contains("replica.node=\(node)") }
            report.append("\(node): upgraded in \(upgraded), all in sync after \(back.map { "\($0)" } ?? "never"), running \(exe); "
                          + "resync: copied.bytes=\(resync.flatMap { Self.metric($0, "copied.bytes") }.map(String.init) ?? "-") "
                          + "wire.sent=\(resync.flatMap { Self.metric($0, "wire.sent") }.map(String.init) ?? "-")")
            let inSync = try XCTUnwrap(back, "after upgrading \(node) the volume must be back to all replicas in sync")
            XCTAssertLessThanOrEqual(inSync, .seconds(30), "\(node)")
            XCTAssertEqual(exe, URL(fileURLWithPath: other).resolvingSymlinksInPath().path, "\(node) runs the other build")
        }
        let result = try await fio.wait(seconds: 120)
        print("rolling upgrade under load: \(result.summary)\n  " + report.joined(separator: "\n  "))
        // A graceful stop hands the engines over before the replica server stops: the engine's
        // own node never loses its replica to its upgrade.
        let droppedLocal = bed.logTail(bed.engineProcess("n1"), lines: 5000).split(separator: "\n").filter {
            $0.contains("replica recorded out of sync") && $0.contains("replica.node=n1")
        }
        XCTAssertEqual(droppedLocal, [], "upgrading n1 recorded its own replica out of sync")
        XCTAssertEqual(result.ioErrors, 0, result.errorText)
        XCTAssertFalse(result.errorText.contains("verify"), result.errorText)
        try await detach(volume, attached)
    }

    static func metric(_ line: Substring, _ key: String) -> Int64? {
        guard let range = line.range(of: key + "=") else { return nil }
        return Int64(line[range.upperBound...].prefix { $0.isNumber })
    }

    /// Random reads at queue depth 32 go through the engine's io_uring (docs/engine.md,
    /// "Asynchronous reads"): when the process dies, reads are queued, submitted or being
    /// answered there. The kernel resends every request the dead process had taken, so the
    /// restarted engine answers each: no read fails, none hangs, and every block still reads
    /// what was written (fio's crc32c headers, checked after).
    func testEngineProcessKilledUnderQueuedReadsLosesNoRead() async throws {
        let volume = try await createBlockVolume("restart-reads")
        let attached = try await attach(volume, on: "n1")
        let layout = ["--rw=write", "--bs=4k", "--ioengine=libaio", "--iodepth=32", "--verify=crc32c",
                      "--verify_state_save=0"]
        let written = try await Fio.start(file: attached.target, sizeMiB: 32, arguments: layout + ["--do_verify=0"]).wait(seconds: 120)
        written.assertNoIOError("laying out: ")
        XCTAssertEqual(written.writes, 32 * 256)

        let fio = try Fio.start(file: attached.target, sizeMiB: 32, arguments: [
            "--rw=randread", "--bs=4k", "--ioengine=libaio", "--iodepth=32", "--runtime=14", "--time_based"])
        try await Task.sleep(for: .seconds(4))
        try killAndRestartEngineProcess("n1")
        let result = try await fio.wait(seconds: 90)
        print("restart under queued reads: \(result.summary) reads=\(result.reads)")
        result.assertNoIOError()
        XCTAssertGreaterThan(result.reads, 10_000, "fio must have read before and after the restart")
        XCTAssertTrue(bed.logTail(bed.engineProcess("n1"), lines: 400).contains("resumed the volume's FUSE connection"),
                      "the new engine resumes the kept connection")

        // Every block still holds what the layout wrote (fio checks each block's crc32c header).
        let verified = try await Fio.start(file: attached.target, sizeMiB: 32,
                                           arguments: layout + ["--do_verify=1", "--verify_only=1", "--verify_fatal=1"]).wait(seconds: 120)
        verified.assertNoIOError("verifying after the restart: ")
        XCTAssertGreaterThanOrEqual(verified.reads, 32 * 256, "the verification read every block")
        try await detach(volume, attached)
    }

    func testEngineProcessKilledUnderExt4LoadLosesNoIO() async throws {
        let bytes: Int64 = 128 << 20
        let volumeID = try await controller.createVolume(
            CSI.create(name: "restart-ext4", access: .mount(fsType: "ext4"), required: bytes,
                       parameters: ["replicas": "3"])).volume.volumeID
        let attached = try await bed.attach(volumeID, on: "n1", access: .mount(fsType: "ext4"))
        let fio = try Fio.start(file: attached.target + "/fio.dat", sizeMiB: 32, seconds: 14)
        try await Task.sleep(for: .seconds(4))
        try killAndRestartEngineProcess("n1")
        let result = try await fio.wait(seconds: 90)
        print("restart under ext4 load: \(result.summary)")
        result.assertNoIOError()
        XCTAssertGreaterThan(result.writes, 100)
        // The filesystem saw no error either (ext4 remounts read-only on one).
        let mounted = try MountTable.read().last { $0.mountPoint == attached.staging }
        XCTAssertNotNil(mounted)
        XCTAssertFalse(mounted.map { $0.mountOptions.contains("ro") || $0.superOptions.contains("ro") } ?? true, "ext4 went read-only")
        try await bed.detach(volumeID, attached)
        _ = try await controller.deleteVolume(CSI.delete(volumeID))
    }
}

/// fio with JSON output, direct I/O: by default the restart tests' writer (synchronous 4 KiB
/// random writes with crc32c verification of every block written, as it goes and at the end),
/// or any job given by its arguments.
struct Fio {
    let process: Process
    let output: URL

    struct Result {
        var exitStatus: Int32
        var ioErrors: Int
        var writes: Int
        var reads = 0
        /// The longest single write, seconds: the restart's stall as the application saw it.
        var longestWrite: Double
        var errorText: String
        /// fio exited 0 and saw no I/O error (a verify error makes it exit non-zero).
        func assertNoIOError(_ prefix: String = "", file: StaticString = #filePath, line: UInt = #line) {
            XCTAssertEqual(exitStatus, 0, "\(prefix)fio failed: \(errorText)", file: file, line: line)
            XCTAssertEqual(ioErrors, 0, "\(prefix)\(errorText)", file: file, line: line)
        }
        var summary: String {
            "fio exit=\(exitStatus) writes=\(writes) io_errors=\(ioErrors) longest_write=\(String(format: "%.3f", longestWrite)) s"
        }
    }

    static func start(file: String, sizeMiB: Int, seconds: Int) throws -> Fio {
        try start(file: file, sizeMiB: sizeMiB, arguments: [
            "--rw=randwrite", "--bs=4k", "--sync=1", "--ioengine=psync", "--iodepth=1",
            "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
            "--runtime=\(seconds)", "--time_based",
        ])
    }

    /// One direct-I/O job of `arguments` on the first `sizeMiB` MiB of `file`.
    static func start(file: String, sizeMiB: Int, arguments: [String]) throws -> Fio {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("fio-\(UUID().uuidString).json")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        process.arguments = ["--name=restart", "--filename=\(file)", "--size=\(sizeMiB)M", "--direct=1", "--numjobs=1"]
            + arguments + ["--output-format=json", "--output=\(output.path)"]
        process.standardOutput = FileHandle.nullDevice
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        return Fio(process: process, output: output)
    }

    func wait(seconds: Int) async throws -> Result {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while process.isRunning {
            if ContinuousClock.now > deadline {
                process.terminate()
                throw FixtureError("fio still runs after \(seconds) s: I/O on the volume hangs")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        defer { try? FileManager.default.removeItem(at: output) }
        let stderr = String(decoding: (process.standardError as? Pipe)?.fileHandleForReading.readDataToEndOfFile() ?? Data(),
                            as: UTF8.self)
        var result = Result(exitStatus: process.terminationStatus, ioErrors: 0, writes: 0, longestWrite: 0, errorText: stderr)
        guard let data = try? Data(contentsOf: output),
              let json = try? JSONSerialization.jsonObject(with: Self.jsonPart(data)) as? [String: Any],
              let job = (json["jobs"] as? [[String: Any]])?.first else {
            result.errorText += " (no fio JSON output)"
            result.ioErrors = -1
            return result
        }
        result.ioErrors = job["error"] as? Int ?? 0
        result.reads = (job["read"] as? [String: Any])?["total_ios"] as? Int ?? 0
        if let write = job["write"] as? [String: Any] {
            result.writes = write["total_ios"] as? Int ?? 0
            if let clat = write["clat_ns"] as? [String: Any], let max = clat["max"] as? Double ?? (clat["max"] as? Int).map(Double.init) {
                result.longestWrite = max / 1e9
            }
        }
        return result
    }

    /// fio prints notes before the JSON object on some versions.
    static func jsonPart(_ data: Data) -> Data {
        guard let start = data.firstIndex(of: UInt8(ascii: "{")) else { return data }
        return data[start...]
    }
}
