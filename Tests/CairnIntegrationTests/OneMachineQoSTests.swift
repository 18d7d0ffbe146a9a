import CSIProto
import CairnCore
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// One machine's QoS through the real plugin and the real kernel: a block volume staged by
/// `cairn serve --role all --qos-cgroup <a test cgroup>`, a writer process in a cgroup below it
/// doing O_DIRECT 4 KiB writes on the loop device, and ControllerModifyVolume changing
/// `iopsLimit` while it writes. The writes are counted by the kernel (cgroup v2: the test
/// cgroup's io.stat; cgroup v1: the writer cgroup's blkio.throttle.io_serviced), not by the writer.
///
/// Runs in whichever hierarchy has the io controller: cgroup v2 (io.max) or cgroup v1 (blkio
/// throttle files; there it also checks that a cgroup created after the limit was set gets its
/// copy). Needs root; skips with the reason on a machine with neither. The cgroups, the writer,
/// the loop device and the mounts are removed on every way out.
final class OneMachineQoSTests: IntegrationTestCase {
    static let limit = 500.0

    func testIOPSLimitSetLiveHoldsWithinTenPercentAndIsLiftedAgainAndLeavesNoLine() async throws {
        if getuid() != 0 { throw XCTSkip("one-machine QoS writes cgroup io.max and attaches loop devices: run as root") }
        let cgroups = try TestCgroups.make()
        defer { cgroups.remove() }

        let plugin = try await startPlugin(extraArguments: ["--qos-cgroup", cgroups.ancestor])
        let csi = CSIClient(plugin: plugin)
        let caps = try await csi.controllerGetCapabilities().capabilities.map(\.rpc.type)
        XCTAssertTrue(caps.contains(.modifyVolume), "with a usable cgroup, one machine offers ControllerModifyVolume:\n\(plugin.logTail(lines: 20))")
        print("one-machine QoS test: \(cgroups.mechanism) in \(cgroups.ancestor)")

        let name = "qos-\(UUID().uuidString.prefix(8))"
        let create = CSI.create(name: name, access: .block, required: 64 * CSI.mib)
        let volume = try await must("CreateVolume") { try await csi.createVolume(create) }.volume
        let published = try await must("ControllerPublishVolume") {
            try await csi.controllerPublish(CSI.controllerPublish(volume.volumeID, node: plugin.nodeID, access: .block))
        }
        let staging = plugin.stagingDir + "/" + name
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        _ = try await must("NodeStageVolume") {
            try await csi.nodeStage(CSI.stage(volume.volumeID, staging: staging, access: .block, publishContext: published.publishContext))
        }
        let backingFile = plugin.volumesDir + "/" + volume.volumeID + ".img"
        let device = try XCTUnwrap(plugin.loopDevices(backedUnder: backingFile).first?.device, "NodeStage attached no loop device")
        let number = try TestCgroups.deviceNumber(device)

        let writer = try cgroups.startWriter(device: device)
        defer { cgroups.stopWriter(writer) }

        let unlimited = try await cgroups.measureWriteIOPS(device: number, seconds: 2)
        guard unlimited > 1.5 * Self.limit else {
            throw XCTSkip("this machine writes only \(Int(unlimited)) IOPS to a loop device unthrottled: too slow to tell a limit of \(Int(Self.limit)) apart")
        }

        try await must("ControllerModifyVolume iopsLimit=\(Int(Self.limit))") {
            try await csi.controllerModify(volume.volumeID, ["iopsLimit": String(Int(Self.limit))])
        }
        let expected = "\(number) rbps=max wbps=max riops=500 wiops=500"
        XCTAssertEqual(cgroups.ioMaxLine(number), expected)
        if cgroups.isV1 {
            // v1 limits are per cgroup: the writer's cgroup has its copy, and one made later gets it.
            XCTAssertEqual(cgroups.ioMaxLine(number, in: cgroups.writerCgroup), expected, "the cgroup below has its copy")
            let late = cgroups.ancestor + "/late"
            try FileManager.default.createDirectory(atPath: late, withIntermediateDirectories: false)
            var copied = false
            for _ in 0..<50 where !copied {
                try await Task.sleep(for: .milliseconds(100))
                copied = cgroups.ioMaxLine(number, in: late) == expected
            }
            XCTAssertTrue(copied, "a cgroup created after the limit was set gets it within 5 s:\n\(plugin.logTail(lines: 20))")
        }
        try await Task.sleep(for: .seconds(1))  // the writes already queued drain at the new rate
        let limited = try await cgroups.measureWriteIOPS(device: number, seconds: 4)
        print("one-machine QoS test (\(cgroups.mechanism)): unlimited \(Int(unlimited)) write IOPS; iopsLimit=\(Int(Self.limit)) set live: \(String(format: "%.1f", limited)) write IOPS over 4 s")
        XCTAssertEqual(limited, Self.limit, accuracy: Self.limit * 0.1,
                       "measured \(limited) write IOPS with iopsLimit=\(Int(Self.limit)) (unlimited: \(Int(unlimited)))")

        // A restart re-applies the recorded limit (the restore stages again): take the rules away
        // behind the plugin's back, restart it, and they are back.
        try cgroups.clearLimits(number)
        XCTAssertNil(cgroups.ioMaxLine(number))
        try await plugin.restart()
        XCTAssertEqual(cgroups.ioMaxLine(number), expected, "the restore at start-up re-applies the recorded limit:\n\(plugin.logTail(lines: 20))")
        if cgroups.isV1 { XCTAssertEqual(cgroups.ioMaxLine(number, in: cgroups.writerCgroup), expected, "below too") }

        try await must("ControllerModifyVolume iopsLimit=0") { try await csi.controllerModify(volume.volumeID, ["iopsLimit": "0"]) }
        XCTAssertNil(cgroups.ioMaxLine(number), "no limit leaves no io.max line")
        try await Task.sleep(for: .seconds(1))
        let lifted = try await cgroups.measureWriteIOPS(device: number, seconds: 2)
        print("one-machine QoS test (\(cgroups.mechanism)): iopsLimit=0 set live: \(Int(lifted)) write IOPS")
        XCTAssertGreaterThan(lifted, 1.5 * Self.limit, "the limit is lifted: \(lifted) IOPS (unlimited before: \(unlimited))")
        if cgroups.isV1 { XCTAssertNil(cgroups.ioMaxLine(number, in: cgroups.writerCgroup), "lifted below too") }

        // A limit present at NodeUnstage goes with the device: a loop device is reused.
        try await must("ControllerModifyVolume iopsLimit=2000") { try await csi.controllerModify(volume.volumeID, ["iopsLimit": "2000"]) }
        XCTAssertNotNil(cgroups.ioMaxLine(number))
        cgroups.stopWriter(writer)
        _ = try await must("NodeUnstageVolume") { try await csi.nodeUnstage(CSI.unstage(volume.volumeID, staging: staging)) }
        XCTAssertNil(cgroups.ioMaxLine(number), "NodeUnstage removes the device's io.max line")
        if cgroups.isV1 {
            XCTAssertNil(cgroups.ioMaxLine(number, in: cgroups.writerCgroup), "and its copies below")
            XCTAssertNil(cgroups.ioMaxLine(number, in: cgroups.ancestor + "/late"), "and its copies below")
        }
        _ = try await must("ControllerUnpublishVolume") {
            try await csi.controllerUnpublish(CSI.controllerUnpublish(volume.volumeID, node: plugin.nodeID))
        }
        _ = try await must("DeleteVolume") { try await csi.deleteVolume(CSI.delete(volume.volumeID)) }
        assertNoLeftovers(plugin, "after the volume's life")
    }
}

/// A cgroup made for one test — the "ancestor of the workloads" the plugin is pointed at — with a
/// `writer` cgroup below it for the load: under the cgroup v2 root when it has the io controller,
/// else in the cgroup v1 blkio hierarchy. Removing it kills whatever still runs inside, removes
/// every cgroup below it, and (v2) restores the root's controllers as they were.
struct TestCgroups {
    let root: String
    let ancestor: String
    var writerCgroup: String { ancestor + "/writer" }
    /// Whether the test enabled io in the root's subtree_control (and so disables it again).
    let enabledIO: Bool
    /// cgroup v1 blkio (throttle files) rather than cgroup v2 (io.max).
    let isV1: Bool
    var mechanism: String { isV1 ? "cgroup v1 blkio throttle" : "cgroup v2 io.max" }

    static func make() throws -> TestCgroups {
        let mounts = (try? MountTable.read()) ?? []
        let v2Root = mounts.first(where: { $0.fsType == "cgroup2" && $0.mountPoint == "/sys/fs/cgroup" })?.mountPoint
            ?? mounts.first(where: { $0.fsType == "cgroup2" })?.mountPoint
        let v1 = mounts.first { $0.fsType == "cgroup" && $0.superOptions.contains("blkio") }?.mountPoint
        let controllers = v2Root.flatMap { try? String(contentsOfFile: $0 + "/cgroup.controllers", encoding: .utf8) } ?? ""
        let name = "cairn-qos-it-\(getpid())-\(UUID().uuidString.prefix(8))"
        let made: TestCgroups
        if let root = v2Root, controllers.split(whereSeparator: \.isWhitespace).contains("io") {
            let subtree = (try? String(contentsOfFile: root + "/cgroup.subtree_control", encoding: .utf8)) ?? ""
            let enabledIO = !subtree.split(whereSeparator: \.isWhitespace).contains("io")
            if enabledIO { try write("+io", to: root + "/cgroup.subtree_control") }
            made = TestCgroups(root: root, ancestor: root + "/" + name, enabledIO: enabledIO, isV1: false)
        } else if let v1 {
            guard FileManager.default.fileExists(atPath: v1 + "/blkio.throttle.write_iops_device") else {
                throw XCTSkip("the cgroup v1 blkio hierarchy at \(v1) has no throttle files (CONFIG_BLK_DEV_THROTTLING): one-machine QoS cannot be tested here")
            }
            made = TestCgroups(root: v1, ancestor: v1 + "/" + name, enabledIO: false, isV1: true)
        } else {
            throw XCTSkip("neither the cgroup v2 io controller (\(v2Root.map { "\($0): \(controllers.trimmingCharacters(in: .whitespacesAndNewlines))" } ?? "cgroup v2 not mounted")) nor a cgroup v1 blkio hierarchy: one-machine QoS cannot be tested here")
        }
        do {
            try FileManager.default.createDirectory(atPath: made.writerCgroup, withIntermediateDirectories: true)
        } catch {
            made.remove()
            throw error
        }
        return made
    }

    /// Sixteen `dd`s, each rewriting its own 4 MiB of the (64 MiB) device in O_DIRECT 4 KiB
    /// writes, over and over, inside `writer`: a dd has one write in flight, and many keep the
    /// kernel's throttle queue full even when the machine is busy and the throttle's dispatch
    /// work runs late — so the rate measured is the limit's, not the writers' latency. All share
    /// the cgroup, and so the limit.
    func startWriter(device: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", """
            echo $$ > "$1/cgroup.procs" || exit 1
            i=0
            while [ $i -lt 16 ]; do
                (while :; do dd if=/dev/zero of="$2" bs=4096 oflag=direct seek=$((i * 1024)) count=1024 status=none || exit 1; done) &
                i=$((i + 1))
            done
            wait
            """, "sh", writerCgroup, device]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Kills everything in the writer cgroup (the shell and its dd).
    func stopWriter(_ process: Process) {
        // Until the cgroup is empty: a shell may have started a dd between the read and the kill.
        for _ in 0..<50 {
            Self.killAll(in: writerCgroup)
            let left = (try? String(contentsOfFile: writerCgroup + "/cgroup.procs", encoding: .utf8)) ?? ""
            if left.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty { break }
            usleep(100_000)
        }
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }

    /// Writes completed to `device` by the writer per second, over `seconds` (the kernel's
    /// count: v2 the test cgroup's io.stat, v1 the writer cgroup's blkio.throttle.io_serviced).
    func measureWriteIOPS(device: String, seconds: Double) async throws -> Double {
        let start = try writes(device)
        let began = ContinuousClock.now
        try await Task.sleep(for: .seconds(seconds))
        let end = try writes(device)
        let elapsed = ContinuousClock.now - began
        return Double(end - start) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
    }

    private func writes(_ device: String) throws -> UInt64 {
        if isV1 {
            // "7:0 Write 1234"
            let serviced = try String(contentsOfFile: writerCgroup + "/blkio.throttle.io_serviced", encoding: .utf8)
            for line in serviced.split(separator: "\n") {
                let fields = line.split(separator: " ")
                if fields.count == 3, fields[0] == device, fields[1] == "Write" { return UInt64(fields[2]) ?? 0 }
            }
            return 0
        }
        let stat = try String(contentsOfFile: ancestor + "/io.stat", encoding: .utf8)
        for line in stat.split(separator: "\n") where line.hasPrefix(device + " ") {
            for field in line.split(separator: " ") where field.hasPrefix("wios=") {
                return UInt64(field.dropFirst(5)) ?? 0
            }
        }
        return 0  // no I/O to the device yet
    }

    /// The device's limits in `cgroup` (default: the ancestor) as an io.max line, nil when it
    /// has none. v1: put together from the four blkio.throttle files.
    func ioMaxLine(_ device: String, in cgroup: String? = nil) -> String? {
        let cgroup = cgroup ?? ancestor
        guard isV1 else {
            let text = (try? String(contentsOfFile: cgroup + "/io.max", encoding: .utf8)) ?? ""
            return text.split(separator: "\n").first { $0.hasPrefix(device + " ") }.map(String.init)
        }
        var values: [String] = []
        for (key, file) in [("rbps", "read_bps"), ("wbps", "write_bps"), ("riops", "read_iops"), ("wiops", "write_iops")] {
            let text = (try? String(contentsOfFile: cgroup + "/blkio.throttle.\(file)_device", encoding: .utf8)) ?? ""
            let value = text.split(separator: "\n").first { $0.hasPrefix(device + " ") }?.split(separator: " ").last.map(String.init)
            values.append("\(key)=\(value ?? "max")")
        }
        return values.allSatisfy { $0.hasSuffix("=max") } ? nil : "\(device) " + values.joined(separator: " ")
    }

    /// Removes the device's limits from the test cgroup (and, v1, the cgroups below it) as if
    /// they had been lost.
    func clearLimits(_ device: String) throws {
        guard isV1 else { return try Self.write("\(device) rbps=max wbps=max riops=max wiops=max", to: ancestor + "/io.max") }
        for cgroup in [ancestor, writerCgroup, ancestor + "/late"] where FileManager.default.fileExists(atPath: cgroup) {
            for file in ["read_bps", "write_bps", "read_iops", "write_iops"] {
                try Self.write("\(device) 0", to: cgroup + "/blkio.throttle.\(file)_device")
            }
        }
    }

    func remove() {
        // Deepest first: a cgroup is removed only once it has no children.
        var cgroups = [ancestor]
        var index = 0
        while index < cgroups.count {
            let children = (try? FileManager.default.contentsOfDirectory(atPath: cgroups[index])) ?? []
            for child in children {
                var isDirectory: ObjCBool = false
                let path = cgroups[index] + "/" + child
                if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue { cgroups.append(path) }
            }
            index += 1
        }
        for cgroup in cgroups.reversed() {
            for _ in 0..<50 {
                // Again each time: a shell may have started a dd between the read and the kill.
                Self.killAll(in: cgroup)
                if rmdir(cgroup) == 0 || errno == ENOENT { break }
                usleep(100_000)  // the killed processes leave the cgroup a moment later
            }
        }
        if enabledIO { try? Self.write("-io", to: root + "/cgroup.subtree_control") }
    }

    static func killAll(in cgroup: String) {
        if (try? write("1", to: cgroup + "/cgroup.kill")) != nil { return }
        let procs = (try? String(contentsOfFile: cgroup + "/cgroup.procs", encoding: .utf8)) ?? ""
        for pid in procs.split(separator: "\n").compactMap({ Int32($0) }) { kill(pid, SIGKILL) }
    }

    static func write(_ text: String, to path: String) throws {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard Glibc.write(fd, bytes, bytes.count) == bytes.count else { throw SystemError("write \(text) to \(path)", errno: errno) }
    }

    /// "MAJ:MIN" of a block device, as io.max and io.stat name it.
    static func deviceNumber(_ device: String) throws -> String {
        let name = (device as NSString).lastPathComponent
        return try String(contentsOfFile: "/sys/class/block/\(name)/dev", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
