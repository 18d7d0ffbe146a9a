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

/// `cairn volume attach|detach`: a volume staged through the real plugin is bound into a
/// *running* container's mount namespace and removed again, through the agent socket that
/// `--role all` serves. The "container" is `unshare --mount --pid --fork --root=ROOTFS busybox
/// sleep`, over a rootfs holding only a static busybox.
final class HotPlugTests: IntegrationTestCase {
    private var containers: [Container] = []

    /// A process in its own mount and PID namespaces, chrooted into `rootfs`.
    final class Container: @unchecked Sendable {
        let unshare: Process
        let pid: Int32
        let rootfs: String

        init(unshare: Process, pid: Int32, rootfs: String) {
            self.unshare = unshare
            self.pid = pid
            self.rootfs = rootfs
        }

        /// The container's view of `path` (through /proc/PID/root, i.e. its own mount namespace).
        func path(_ path: String) -> String { "/proc/\(pid)/root" + path }

        /// Mount points in the container's namespace.
        func mountPoints() -> [String] {
            guard let text = ProcFile.textIfReadable("/proc/\(pid)/mountinfo") else { return [] }
            return text.split(separator: "\n").compactMap(MountEntry.init).map(\.mountPoint)
        }

        /// Kills the container (its init ignores SIGTERM from outside its PID namespace).
        func stop() {
            kill(pid, SIGKILL)
            if unshare.isRunning { kill(unshare.processIdentifier, SIGKILL) }
            unshare.waitUntilExit()
        }
    }

    override func tearDown() async throws {
        // Containers first: a bind inside one would keep the volume's filesystem busy.
        for container in containers { container.stop() }
        containers = []
        try await super.tearDown()
    }

    // MARK: Fixture

    struct Env {
        let plugin: PluginProcess
        let csi: CSIClient
        let container: Container
    }

    func makeEnv() async throws -> Env {
        let plugin = try await startPlugin()
        let nsexec = (plugin.binary as NSString).deletingLastPathComponent + "/cairn-nsexec"
        guard FileManager.default.isExecutableFile(atPath: nsexec) else {
            throw XCTSkip("\(nsexec) is not built: hot-plug enters the container's namespace through it (swift build)")
        }
        let container = try startContainer(under: plugin.root)
        return Env(plugin: plugin, csi: CSIClient(plugin: plugin), container: container)
    }

    func startContainer(under root: String) throws -> Container {
        let busybox = "/bin/busybox"
        guard FileManager.default.isExecutableFile(atPath: busybox) else {
            throw XCTSkip("\(busybox) is missing: install busybox-static (scripts/setup) for the container tests")
        }
        guard try !Self.isDynamicELF(busybox) else {
            throw XCTSkip("\(busybox) is dynamically linked and cannot run alone in a rootfs: install busybox-static (scripts/setup)")
        }
        let rootfs = root + "/rootfs-\(containers.count)"
        try FileManager.default.createDirectory(atPath: rootfs + "/bin", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: busybox, toPath: rootfs + "/bin/busybox")

        let unshare = Process()
        unshare.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        unshare.arguments = ["--mount", "--pid", "--fork", "--kill-child", "--root=\(rootfs)", "/bin/busybox", "sleep", "600"]
        unshare.standardInput = FileHandle.nullDevice
        try unshare.run()
        // The container's process is unshare's child; wait until it runs busybox in its rootfs.
        let unsharePID = unshare.processIdentifier
        for _ in 0..<200 {
            let children = (ProcFile.textIfReadable("/proc/\(unsharePID)/task/\(unsharePID)/children")) ?? ""
            if let child = children.split(separator: " ").first.flatMap({ Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }),
               (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(child)/root")) == rootfs,
               ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(child)/exe")) ?? "").hasSuffix("busybox") {
                let container = Container(unshare: unshare, pid: child, rootfs: rootfs)
                containers.append(container)
                return container
            }
            if !unshare.isRunning { break }
            usleep(25_000)
        }
        kill(unsharePID, SIGKILL)
        unshare.waitUntilExit()
        throw FixtureError("the container (unshare --mount --pid --fork --root=\(rootfs) busybox sleep) did not start")
    }

    /// Runs `cairn volume ARGS… --agent-socket <the plugin's>`.
    func cairnVolume(_ plugin: PluginProcess, _ arguments: [String]) async throws -> CommandResult {
        try await Command.run([plugin.binary, "volume"] + arguments + ["--agent-socket", plugin.agentSocketPath],
                              timeout: .seconds(120))
    }

    func attach(_ env: Env, _ volumeID: String, path: String, pid: Int32? = nil, readOnly: Bool = false) async throws -> CommandResult {
        try await cairnVolume(env.plugin, ["attach", volumeID, "--pid", "\(pid ?? env.container.pid)", "--path", path]
                                          + (readOnly ? ["--read-only"] : []))
    }

    func detach(_ env: Env, _ volumeID: String, path: String) async throws -> CommandResult {
        try await cairnVolume(env.plugin, ["detach", volumeID, "--pid", "\(env.container.pid)", "--path", path])
    }

    /// Runs a busybox shell command inside the container (its mount namespace and root).
    func inContainer(_ container: Container, _ script: String) async throws -> CommandResult {
        try await Command.run(["nsenter", "--target", "\(container.pid)", "--mount", "--root", "/bin/busybox", "sh", "-c", script],
                              timeout: .seconds(60))
    }

    // MARK: Tests

    func testHotPluggedVolumeIsSharedWithARunningContainerBothWaysAndGoesAwayOnDetach() async throws {
        let env = try await makeEnv()
        let volume = try await BadInputTests.Env(plugin: env.plugin, csi: env.csi, test: self).stagedVolume("hotplug")
        XCTAssertFalse(env.container.mountPoints().contains("/data"))

        let attached = try await attach(env, volume.id, path: "/data")
        XCTAssertEqual(attached.status, 0, "cairn volume attach: \(attached.output)")
        XCTAssertEqual(attached.stdout.split(separator: "\n").count, 1, "one line of result: \(attached.stdout)")
        XCTAssert(attached.stdout.contains("attached volume \(volume.id) at /data"), attached.stdout)
        XCTAssertEqual(env.container.mountPoints().filter { $0 == "/data" }.count, 1, "the container must see the volume at /data")
        XCTAssert(PluginProcess.mounts(under: ["/data"]).isEmpty, "nothing may be mounted at the host's /data")

        // Host → container: a file written through the staging mount is visible inside.
        let fromHost = VolumeIO.randomBytes(4096)
        try VolumeIO.writeFile(volume.staging + "/from-host", fromHost)
        XCTAssertEqual(try VolumeIO.readFile(env.container.path("/data/from-host")), fromHost,
                       "a file written on the host must be visible inside the container")
        // Container → volume: a file written by a process inside lands on the volume.
        let wrote = try await inContainer(env.container, "echo from-inside > /data/from-inside && sync")
        XCTAssertEqual(wrote.status, 0, "writing inside the container: \(wrote.output)")
        XCTAssertEqual(String(decoding: try VolumeIO.readFile(volume.staging + "/from-inside"), as: UTF8.self), "from-inside\n",
                       "a file written inside the container must be on the volume")

        // Idempotent.
        let again = try await attach(env, volume.id, path: "/data")
        XCTAssertEqual(again.status, 0, "a repeated attach must succeed: \(again.output)")
        XCTAssertEqual(env.container.mountPoints().filter { $0 == "/data" }.count, 1, "a repeated attach must not stack a second mount")

        // The record keeps the volume from being unstaged under the container.
        let unstage = await expectStatus(.failedPrecondition, "NodeUnstage while hot-plugged") {
            _ = try await env.csi.nodeUnstage(CSI.unstage(volume.id, staging: volume.staging))
        }
        XCTAssert(unstage.message.contains("/data"), unstage.message)

        let detached = try await detach(env, volume.id, path: "/data")
        XCTAssertEqual(detached.status, 0, "cairn volume detach: \(detached.output)")
        XCTAssert(detached.stdout.contains("detached volume \(volume.id) from /data"), detached.stdout)
        XCTAssertFalse(env.container.mountPoints().contains("/data"), "the volume must be gone from the container")
        XCTAssertFalse(FileManager.default.fileExists(atPath: env.container.path("/data")), "detach must remove the target it created")
        let twice = try await detach(env, volume.id, path: "/data")
        XCTAssertEqual(twice.status, 0, "a repeated detach must succeed: \(twice.output)")
        XCTAssert(twice.stdout.contains("not attached"), twice.stdout)

        _ = try await must("NodeUnstage after detach") { try await env.csi.nodeUnstage(CSI.unstage(volume.id, staging: volume.staging)) }
        assertNoLeftovers(env.plugin, "after detach and unstage")
    }

    func testBlockVolumeHotPlugsAsADeviceNodeAndReadOnlyOnlyWhenTheDeviceIsReadOnly() async throws {
        let env = try await makeEnv()
        let created = try await env.csi.createVolume(CSI.create(name: "hotplug-block", access: .block, required: 64 * CSI.mib))
        let id = created.volume.volumeID
        let published = try await env.csi.controllerPublish(CSI.controllerPublish(id, node: env.plugin.nodeID, access: .block))
        let staging = env.plugin.stagingDir + "/hotplug-block"
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        _ = try await env.csi.nodeStage(CSI.stage(id, staging: staging, access: .block, publishContext: published.publishContext))
        let device = try XCTUnwrap(env.plugin.loopDevices().first?.device)
        let payload = VolumeIO.randomBytes(4096)
        try VolumeIO.writeDevice(device, at: 0, payload)

        // A read-only bind of a device node would not stop writes through it: refused.
        let readOnly = try await attach(env, id, path: "/disk", readOnly: true)
        XCTAssertNotEqual(readOnly.status, 0, "a read-only attach of a read-write block stage must be refused")
        XCTAssert(readOnly.stderr.contains("read-only bind cannot stop writes"), readOnly.output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: env.container.path("/disk")), "a refused attach creates nothing")

        let attached = try await attach(env, id, path: "/disk")
        XCTAssertEqual(attached.status, 0, "cairn volume attach (block): \(attached.output)")
        XCTAssert(attached.stdout.contains("block device, read-write"), attached.stdout)
        var st = stat()
        XCTAssertEqual(stat(env.container.path("/disk"), &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFBLK, "the container must see the volume's device node at /disk")
        XCTAssertEqual(try VolumeIO.readDevice(env.container.path("/disk"), at: 0, count: payload.count), payload)
        let write = try await inContainer(env.container, "printf inside | dd of=/disk bs=512 seek=8 conv=notrunc,fsync 2>&1")
        XCTAssertEqual(write.status, 0, "writing the device inside the container: \(write.output)")
        XCTAssertEqual(String(decoding: try VolumeIO.readDevice(device, at: 8 * 512, count: 6), as: UTF8.self), "inside",
                       "bytes written inside the container must be on the volume's device")

        let detached = try await detach(env, id, path: "/disk")
        XCTAssertEqual(detached.status, 0, "cairn volume detach (block): \(detached.output)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: env.container.path("/disk")))
        _ = try await env.csi.nodeUnstage(CSI.unstage(id, staging: staging))
        assertNoLeftovers(env.plugin, "after detach and unstage")
    }

    func testAttachOfAVolumeThatIsNotStagedIsRefused() async throws {
        let env = try await makeEnv()
        let volume = try await BadInputTests.Env(plugin: env.plugin, csi: env.csi, test: self).publishedVolume("not-staged")
        let result = try await attach(env, volume.id, path: "/data")
        XCTAssertNotEqual(result.status, 0, "attach of an unstaged volume must fail")
        XCTAssert(result.stderr.contains("volume \(volume.id) is not staged on this node; stage it first"), result.output)
        XCTAssertFalse(env.container.mountPoints().contains("/data"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: env.container.path("/data")))
    }

    func testAttachToADeadProcessIsRefusedWithAClearMessageAndMountsNothing() async throws {
        let env = try await makeEnv()
        let volume = try await BadInputTests.Env(plugin: env.plugin, csi: env.csi, test: self).stagedVolume("dead-pid")
        let dead = try AgentSplitTests.deadPID()
        let mountsBefore = Set(AgentSplitTests.hostMountIDs())

        let result = try await attach(env, volume.id, path: "/data", pid: dead)
        XCTAssertNotEqual(result.status, 0, "attach into a process that has exited must fail")
        XCTAssert(result.stderr.contains("process \(dead)") && result.stderr.contains("name a running process"), result.output)
        XCTAssertEqual(Set(AgentSplitTests.hostMountIDs()).subtracting(mountsBefore), [], "nothing may be mounted")
        _ = try await must("NodeUnstage after the refusal (no publish was recorded)") {
            try await env.csi.nodeUnstage(CSI.unstage(volume.id, staging: volume.staging))
        }
        assertNoLeftovers(env.plugin, "after a refused attach and unstage")
    }

    func testPathsThatEscapeTheContainerRootAreRefusedAndMountNothing() async throws {
        let env = try await makeEnv()
        let volume = try await BadInputTests.Env(plugin: env.plugin, csi: env.csi, test: self).stagedVolume("escape")
        // Symlinks planted in the container: absolute (to /etc) and relative (climbing out).
        try FileManager.default.createSymbolicLink(atPath: env.container.rootfs + "/data", withDestinationPath: "/etc")
        try FileManager.default.createSymbolicLink(atPath: env.container.rootfs + "/up", withDestinationPath: "../../../../../../etc")
        let hostMountsBefore = Set(AgentSplitTests.hostMountIDs())
        let containerMountsBefore = env.container.mountPoints()
        let etcBefore = try FileManager.default.contentsOfDirectory(atPath: "/etc").sorted()

        for path in ["/data", "/data/cairn-escape", "/up/cairn-escape", "/bin/../../etc/cairn-escape"] {
            let result = try await attach(env, volume.id, path: path)
            XCTAssertNotEqual(result.status, 0, "attach at \(path) must be refused: \(result.output)")
            XCTAssertFalse(result.stderr.isEmpty, "attach at \(path) must say why it was refused")
            XCTAssertEqual(env.container.mountPoints(), containerMountsBefore, "attach at \(path) must mount nothing in the container")
            XCTAssertEqual(Set(AgentSplitTests.hostMountIDs()).subtracting(hostMountsBefore), [],
                           "attach at \(path) must mount nothing on the host")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: "/etc").sorted(), etcBefore, "the host's /etc must be untouched")
        XCTAssertFalse(FileManager.default.fileExists(atPath: env.container.rootfs + "/etc"), "nothing may be created in the container either")
        _ = try await must("NodeUnstage after the refusals") { try await env.csi.nodeUnstage(CSI.unstage(volume.id, staging: volume.staging)) }
        assertNoLeftovers(env.plugin, "after refused attaches and unstage")
    }

    // MARK: Helpers

    /// Whether `path` is an ELF executable with a program interpreter (dynamically linked).
    static func isDynamicELF(_ path: String) throws -> Bool {
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe))
        guard bytes.count > 64, bytes[0] == 0x7F, bytes[1] == 0x45, bytes[4] == 2 /* 64-bit */ else { return false }
        func u(_ offset: Int, _ size: Int) -> Int { (0..<size).reduce(0) { $0 | Int(bytes[offset + $1]) << (8 * $1) } }
        let phoff = u(0x20, 8), phentsize = u(0x36, 2), phnum = u(0x38, 2)
        for i in 0..<phnum where phoff + i * phentsize + 4 <= bytes.count {
            if u(phoff + i * phentsize, 4) == 3 /* PT_INTERP */ { return true }
        }
        return false
    }
}
