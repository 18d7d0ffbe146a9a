import CSIProto
import CairnCore
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// One machine's QoS through the real plugin and the real kernel: a block volume staged by
/// `cairn serve --role all --qos-cgroup <a test cgroup>`, a writer process inside that cgroup
/// doing O_DIRECT 4 KiB writes on the loop device, and ControllerModifyVolume changing
/// `iopsLimit` while it writes. The writes are counted by the kernel (the test cgroup's io.stat),
/// not by the writer.
///
/// Needs root and the cgroup v2 io controller; skips with the reason otherwise. The cgroups,
/// the writer, the loop device and the mounts are removed on every way out.
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
        XCTAssertEqual(cgroups.ioMaxLine(number), "\(number) rbps=max wbps=max riops=500 wiops=500")
        try await Task.sleep(for: .seconds(1))  // the writes already queued drain at the new rate
        let limited = try await cgroups.measureWriteIOPS(device: number, seconds: 4)
        XCTAssertEqual(limited, Self.limit, accuracy: Self.limit * 0.1,
                       "measured \(limited) write IOPS with iopsLimit=\(Int(Self.limit)) (unlimited: \(Int(unlimited)))")

        try await must("ControllerModifyVolume iopsLimit=0") { try await csi.controllerModify(volume.volumeID, ["iopsLimit": "0"]) }
        XCTAssertNil(cgroups.ioMaxLine(number), "no limit leaves no io.max line")
        try await Task.sleep(for: .seconds(1))
        let lifted = try await cgroups.measureWriteIOPS(device: number, seconds: 2)
        XCTAssertGreaterThan(lifted, 1.5 * Self.limit, "the limit is lifted: \(lifted) IOPS (unlimited before: \(unlimited))")

        // A limit present at NodeUnstage goes with the device: a loop device is reused.
        try await must("ControllerModifyVolume iopsLimit=2000") { try await csi.controllerModify(volume.volumeID, ["iopsLimit": "2000"]) }
        XCTAssertNotNil(cgroups.ioMaxLine(number))
        cgroups.stopWriter(writer)
        _ = try await must("NodeUnstageVolume") { try await csi.nodeUnstage(CSI.unstage(volume.volumeID, staging: staging)) }
        XCTAssertNil(cgroups.ioMaxLine(number), "NodeUnstage removes the device's io.max line")
        _ = try await must("ControllerUnpublishVolume") {
            try await csi.controllerUnpublish(CSI.controllerUnpublish(volume.volumeID, node: plugin.nodeID))
        }
        _ = try await must("DeleteVolume") { try await csi.deleteVolume(CSI.delete(volume.volumeID)) }
        assertNoLeftovers(plugin, "after the volume's life")
    }
}

/// A cgroup made for one test under the cgroup v2 root — the "ancestor of the workloads" the
/// plugin is pointed at — with a `writer` cgroup below it for the load. Removing it kills
/// whatever still runs inside and restores the root's controllers as they were.
struct TestCgroups {
    let root: String
    let ancestor: String
    var writerCgroup: String { ancestor + "/writer" }
    /// Whether the test enabled io in the root's subtree_control (and so disables it again).
    let enabledIO: Bool

    static func make() throws -> TestCgroups {
        let mounts = (try? MountTable.read()) ?? []
        guard let root = mounts.first(where: { $0.fsType == "cgroup2" && $0.mountPoint == "/sys/fs/cgroup" })?.mountPoint
                ?? mounts.first(where: { $0.fsType == "cgroup2" })?.mountPoint else {
            throw XCTSkip("cgroup v2 is not mounted: one-machine QoS (io.max) cannot be tested here")
        }
        let controllers = (try? String(contentsOfFile: root + "/cgroup.controllers", encoding: .utf8)) ?? ""
        guard controllers.split(whereSeparator: \.isWhitespace).contains("io") else {
            let v1 = mounts.first { $0.fsType == "cgroup" && $0.superOptions.contains("blkio") }
            throw XCTSkip("the cgroup v2 hierarchy at \(root) has no io controller (cgroup.controllers: \(controllers.trimmingCharacters(in: .whitespacesAndNewlines)))\(v1.map { "; it is bound to cgroup v1 at \($0.mountPoint)" } ?? ""): one-machine QoS (io.max) cannot be tested here")
        }
        let subtree = (try? String(contentsOfFile: root + "/cgroup.subtree_control", encoding: .utf8)) ?? ""
        let enabledIO = !subtree.split(whereSeparator: \.isWhitespace).contains("io")
        if enabledIO { try write("+io", to: root + "/cgroup.subtree_control") }
        let ancestor = root + "/cairn-qos-it-\(UUID().uuidString.prefix(8))"
        let made = TestCgroups(root: root, ancestor: ancestor, enabledIO: enabledIO)
        do {
            try FileManager.default.createDirectory(atPath: made.writerCgroup, withIntermediateDirectories: true)
        } catch {
            made.remove()
            throw error
        }
        return made
    }

    /// `dd` rewriting the device in O_DIRECT 4 KiB writes, over and over, inside `writer`.
    func startWriter(device: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", """
            echo $$ > "$1/cgroup.procs" || exit 1
            while :; do dd if=/dev/zero of="$2" bs=4096 oflag=direct count=16384 status=none || exit 1; done
            """, "sh", writerCgroup, device]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// Kills everything in the writer cgroup (the shell and its dd).
    func stopWriter(_ process: Process) {
        Self.killAll(in: writerCgroup)
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }

    /// Writes completed to `device` by the test cgroup's processes per second, over `seconds`
    /// (io.stat: the kernel's count).
    func measureWriteIOPS(device: String, seconds: Double) async throws -> Double {
        let start = try writes(device)
        let began = ContinuousClock.now
        try await Task.sleep(for: .seconds(seconds))
        let end = try writes(device)
        let elapsed = ContinuousClock.now - began
        return Double(end - start) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
    }

    private func writes(_ device: String) throws -> UInt64 {
        let stat = try String(contentsOfFile: ancestor + "/io.stat", encoding: .utf8)
        for line in stat.split(separator: "\n") where line.hasPrefix(device + " ") {
            for field in line.split(separator: " ") where field.hasPrefix("wios=") {
                return UInt64(field.dropFirst(5)) ?? 0
            }
        }
        return 0  // no I/O to the device yet
    }

    /// The device's line in the ancestor's io.max, nil when it has none.
    func ioMaxLine(_ device: String) -> String? {
        let text = (try? String(contentsOfFile: ancestor + "/io.max", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").first { $0.hasPrefix(device + " ") }.map(String.init)
    }

    func remove() {
        for cgroup in [writerCgroup, ancestor] {
            Self.killAll(in: cgroup)
            for _ in 0..<50 {
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
