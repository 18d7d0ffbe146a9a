import CSIProto
import CairnCore
import CairnProcess
import Foundation
import XCTest

/// What docs/design.md tells deploy manifests about mount propagation, pinned down: the agent
/// mounts in the host's namespace; a container whose view of the pods directory is an rslave
/// copy of a shared host mount (Kubernetes `HostToContainer`, Docker `rslave`) sees a volume
/// published *after* it started; one with private propagation does not.
extension VolumeLifecycleTests {
    func testAPublishReachesAnAlreadyRunningContainerOnlyThroughSlavePropagation() async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        // The pods directory as kubelet's is on a systemd host: a shared mount point.
        try FileManager.default.createDirectory(atPath: plugin.podsDir, withIntermediateDirectories: true)
        for argv in [["mount", "--bind", plugin.podsDir, plugin.podsDir], ["mount", "--make-shared", plugin.podsDir]] {
            let r = try Command.runBlocking(argv)
            XCTAssertEqual(r.status, 0, "\(argv.joined(separator: " ")): \(r.output)")
        }
        // Two "containers" started before the volume exists.
        let slave = try Self.startNamespace(propagation: "slave")
        let isolated = try Self.startNamespace(propagation: "private")
        defer {
            for p in [slave, isolated] where p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        }
        try Self.waitForOwnNamespace(slave)
        try Self.waitForOwnNamespace(isolated)

        let placed = try await place(csi, plugin, name: "propagation", access: .mount(fsType: "ext4"), sizeMiB: 64)
        XCTAssertTrue(try Self.mountPoints(of: slave.processIdentifier).contains(placed.target),
                      "a container with rslave propagation must see a target published after it started")
        XCTAssertFalse(try Self.mountPoints(of: isolated.processIdentifier).contains(placed.target),
                       "a container with private propagation cannot see it (why the manifests must set rslave)")

        let id = placed.volume.volumeID
        _ = try await csi.nodeUnpublish(CSI.unpublish(id, target: placed.target))
        XCTAssertFalse(try Self.mountPoints(of: slave.processIdentifier).contains(placed.target),
                       "NodeUnpublish on the host must also remove the container's copy")
        _ = try await csi.nodeUnstage(CSI.unstage(id, staging: placed.staging))
        _ = try await csi.controllerUnpublish(CSI.controllerUnpublish(id, node: plugin.nodeID))
        _ = try await csi.deleteVolume(CSI.delete(id))
        for p in [slave, isolated] { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        XCTAssertEqual(try Command.runBlocking(["umount", plugin.podsDir]).status, 0)
        assertNoLeftovers(plugin, "after the propagation test")
    }

    /// `unshare --mount --propagation MODE sleep`: unshare enters a new mount namespace and
    /// execs sleep, which is then the process living in it.
    static func startNamespace(propagation: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        p.arguments = ["--mount", "--propagation", propagation, "sleep", "600"]
        try p.run()
        return p
    }

    static func waitForOwnNamespace(_ process: Process) throws {
        let mine = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/mnt")
        for _ in 0..<100 {
            let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(process.processIdentifier)/exe")
            if let theirs = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(process.processIdentifier)/ns/mnt"),
               theirs != mine, exe?.hasSuffix("sleep") == true {
                return
            }
            usleep(20_000)
        }
        throw XCTSkip("unshare did not start sleep in a new mount namespace")
    }

    static func mountPoints(of pid: Int32) throws -> [String] {
        try ProcFile.text("/proc/\(pid)/mountinfo")
            .split(separator: "\n").compactMap { line in
                let fields = line.split(separator: " ")
                return fields.count > 4 ? String(fields[4]).replacingOccurrences(of: "\\040", with: " ") : nil
            }
    }
}
