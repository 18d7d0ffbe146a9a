import CairnCore
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The `cairn-nsexec` helper against the real kernel: a tiny "container" (a busybox rootfs run by
/// `unshare --mount --pid --fork --root`) gets mounts put into its mount namespace from the host.
/// Runs only as root and only when /bin/busybox (static) exists. tearDown always kills the
/// container and every helper process, unmounts everything under the temp dir on the host and
/// removes the temp dir, whether the test passed or not.
final class NamespaceExecTests: XCTestCase {
    var dir = ""  // mkdtemp; holds rootfs/ (the container) and staging/ (a tmpfs on the host)
    var pid: Int32 = 0  // busybox sleep inside the container (child of unshare)
    var startTime: UInt64 = 0
    var processes: [Process] = []  // unshare and every other process a test starts

    var rootfs: String { dir + "/rootfs" }
    var staging: String { dir + "/staging" }

    /// The helper is built next to the test bundle (CairnTests depends on the target).
    static var helper: String {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("cairn-nsexec").path
    }

    override func setUpWithError() throws {
        try XCTSkipUnless(getuid() == 0, "needs root: setns, chroot and mounts")
        try XCTSkipUnless(
            FileManager.default.isExecutableFile(atPath: "/bin/busybox"),
            "needs a static /bin/busybox for the test container: apt-get install -y busybox-static (scripts/setup)")
        guard FileManager.default.isExecutableFile(atPath: Self.helper) else {
            throw XCTSkip("cairn-nsexec not found at \(Self.helper); run swift build --build-tests first")
        }
        var template = Array("/tmp/cairn-nsexec-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        dir = String(cString: made)
        let files = FileManager.default
        for sub in ["rootfs/bin", "rootfs/data", "rootfs/etc", "staging"] {
            try files.createDirectory(atPath: dir + "/" + sub, withIntermediateDirectories: true)
        }
        try files.copyItem(atPath: "/bin/busybox", toPath: rootfs + "/bin/busybox")
        try expectSuccess(run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "cairn-staging", staging]))
        try "hello\n".write(toFile: staging + "/hello", atomically: false, encoding: .utf8)
        try startContainer()
    }

    override func tearDownWithError() throws {
        if pid > 0 { kill(pid, SIGKILL) }  // the container's init: its PID namespace dies with it
        for process in processes where process.isRunning { kill(process.processIdentifier, SIGKILL) }
        for process in processes { process.waitUntilExit() }
        guard !dir.isEmpty else { return }
        // Innermost first: mountinfo lists parents before children.
        for mountPoint in hostMounts(under: dir).reversed() where umount2(mountPoint, 0) != 0 {
            umount2(mountPoint, Int32(MNT_DETACH))
        }
        let left = hostMounts(under: dir)
        XCTAssertEqual(left, [], "mounts left under \(dir); not removing it")
        if left.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    // MARK: - Behaviour

    func testBindPutsTheMountIntoTheContainerOnly() throws {
        XCTAssertEqual(try nsexec("mkdir", "/data/vol").stdout, "created=1")
        XCTAssertEqual(try nsexec("mkdir", "/data/vol").stdout, "created=0")
        XCTAssertEqual(try nsexec("inspect", "/data/vol").stdout, "kind=directory mounted=0")
        XCTAssertEqual(try nsexec("bind", "--source", staging, "/data/vol").stdout, "mounted=1")
        XCTAssertEqual(try nsexec("inspect", "/data/vol").stdout, "kind=directory mounted=1")

        // Seen from inside: through nsenter, and through the container's root from the host.
        let inside = try run("/usr/bin/nsenter", ["--target", "\(pid)", "--mount", "--root",
                                                  "/bin/busybox", "cat", "/data/vol/hello"])
        XCTAssertEqual(inside.status, 0, inside.stderr)
        XCTAssertEqual(inside.stdout, "hello")
        XCTAssertEqual(try ProcFile.text("/proc/\(pid)/root/data/vol/hello"), "hello\n")

        // Not on the host: the mount went into the container's namespace only.
        XCTAssertEqual(hostMounts(under: rootfs), [])
        XCTAssertFalse(FileManager.default.fileExists(atPath: rootfs + "/data/vol/hello"))

        // mountinfo speaks the container's paths (its root is a chroot, so only mounts under it).
        let info = try nsexec("mountinfo")
        XCTAssertEqual(info.status, 0, info.stderr)
        let points = info.stdout.split(separator: "\n").map { $0.split(separator: " ")[4] }
        XCTAssertTrue(points.contains("/data/vol"), info.stdout)
        XCTAssertFalse(points.contains { $0.hasPrefix(dir) }, info.stdout)
    }

    func testBindUnmountAndRemoveAreIdempotent() throws {
        XCTAssertEqual(try nsexec("mkdir", "/data/vol").stdout, "created=1")
        XCTAssertEqual(try nsexec("bind", "--source", staging, "/data/vol").stdout, "mounted=1")
        XCTAssertEqual(try nsexec("bind", "--source", staging, "/data/vol").stdout, "mounted=0")
        XCTAssertEqual(try containerMountPoints().filter { $0 == "/data/vol" }.count, 1, "second bind stacked a mount")
        XCTAssertEqual(try nsexec("remove", "/data/vol").status, 5, "a mount point must not be removed")
        XCTAssertEqual(try nsexec("unmount", "/data/vol").stdout, "unmounted=1")
        XCTAssertEqual(try nsexec("unmount", "/data/vol").stdout, "unmounted=0")
        XCTAssertEqual(try nsexec("remove", "/data/vol").stdout, "removed=1")
        XCTAssertEqual(try nsexec("remove", "/data/vol").stdout, "removed=0")
        XCTAssertEqual(try nsexec("unmount", "/data/vol").stdout, "unmounted=0")
        XCTAssertFalse(FileManager.default.fileExists(atPath: rootfs + "/data/vol"))
        XCTAssertEqual(try containerMountPoints(), [])
    }

    func testReadOnlyBindRefusesWritesInside() throws {
        XCTAssertEqual(try nsexec("mkdir", "/data/ro").stdout, "created=1")
        XCTAssertEqual(try nsexec("bind", "--source", staging, "--read-only", "/data/ro").stdout, "mounted=1")
        let inside = try run("/usr/bin/nsenter", ["--target", "\(pid)", "--mount", "--root",
                                                  "/bin/busybox", "touch", "/data/ro/new"])
        XCTAssertNotEqual(inside.status, 0)
        XCTAssertTrue(inside.stderr.contains("Read-only"), inside.stderr)
        let fd = open("/proc/\(pid)/root/data/ro/new", O_WRONLY | O_CREAT, 0o600)
        let err = errno
        XCTAssertEqual(fd, -1)
        XCTAssertEqual(err, EROFS)
        // The clone was made read-only, not the source.
        XCTAssertTrue(FileManager.default.createFile(atPath: staging + "/host-side", contents: Data()))
    }

    func testBlockDeviceBindsOntoAnEmptyFile() throws {
        let node = dir + "/loop-node"
        let loop250 = dev_t((7 << 8) | 250)  // makedev(7, 250); a node needs no device behind it
        XCTAssertEqual(mknod(node, S_IFBLK | 0o600, loop250), 0, String(cString: strerror(errno)))
        XCTAssertEqual(try nsexec("mkfile", "/data/dev").stdout, "created=1")
        XCTAssertEqual(try nsexec("mkfile", "/data/dev").stdout, "created=0")
        XCTAssertEqual(try nsexec("inspect", "/data/dev").stdout, "kind=emptyfile mounted=0")
        XCTAssertEqual(try nsexec("mkdir", "/data/dev").status, 5)
        XCTAssertEqual(try nsexec("bind", "--source", staging, "/data/dev").status, 5, "directory onto a file")
        XCTAssertEqual(try nsexec("bind", "--source", node, "/data/dev").stdout, "mounted=1")
        XCTAssertEqual(try nsexec("inspect", "/data/dev").stdout, "kind=blockdevice mounted=1")
        XCTAssertEqual(hostMounts(under: rootfs), [])
        XCTAssertEqual(try nsexec("unmount", "/data/dev").stdout, "unmounted=1")
        XCTAssertEqual(try nsexec("remove", "/data/dev").stdout, "removed=1")
    }

    func testPathsThatLeaveTheContainerRootAreRefused() throws {
        XCTAssertEqual(symlink("/etc", rootfs + "/data/evil"), 0)
        XCTAssertEqual(symlink("../../..", rootfs + "/data/evil2"), 0)
        let name = "cairn-nsexec-escape-\(UUID().uuidString)"
        let paths = ["/../etc", "/data/../etc", "/data/./x", "data/x", "/", "/data/evil", "/data/evil/" + name,
                     "/data/evil2", "/data/evil2/" + name, "/data/evil2/etc"]
        for path in paths {
            for command in [["inspect"], ["mkdir"], ["mkfile"], ["remove"], ["unmount"],
                            ["bind", "--source", staging]] {
                // remove does not follow a final symlink: it refuses the link itself as the wrong kind.
                let finalLink = path == "/data/evil" || path == "/data/evil2"
                let result = try nsexec(command + [path])
                XCTAssertEqual(result.status, command[0] == "remove" && finalLink ? 5 : 2, "\(command) \(path): \(result.stdout) \(result.stderr)")
                XCTAssertTrue(result.stderr.hasPrefix("cairn-nsexec: "), result.stderr)
                XCTAssertEqual(result.stderr.filter { $0 == "\n" }.count, 1, "one line: \(result.stderr)")
            }
        }
        let named = try nsexec("mkdir", "/data/evil/" + name)
        XCTAssertTrue(named.stderr.contains("'evil'") && named.stderr.contains("'/etc'"), named.stderr)
        XCTAssertEqual(try containerMountPoints(), [], "nothing may be mounted")
        XCTAssertEqual(hostMounts(under: rootfs), [])
        for escaped in ["/etc/" + name, "/tmp/" + name, dir + "/" + name] {
            XCTAssertFalse(FileManager.default.fileExists(atPath: escaped), escaped)
        }
        // A relative symlink that stays inside the root is followed.
        XCTAssertEqual(symlink("../etc", rootfs + "/data/fine"), 0)
        XCTAssertEqual(try nsexec("inspect", "/data/fine").stdout, "kind=directory mounted=0")
    }

    func testMissingParentsAndWrongKinds() throws {
        XCTAssertEqual(try nsexec("mkdir", "/data/no/such").status, 4)
        XCTAssertEqual(try nsexec("mkfile", "/data/no/such").status, 4)
        XCTAssertEqual(try nsexec("bind", "--source", staging, "/data/absent").status, 4, "target must exist")
        XCTAssertEqual(try nsexec("mkdir", "/data/src-missing").stdout, "created=1")
        XCTAssertEqual(try nsexec("bind", "--source", dir + "/absent", "/data/src-missing").status, 4)
        XCTAssertEqual(try nsexec("inspect", "/data/no/such").stdout, "kind=missing mounted=0")
        XCTAssertEqual(try nsexec("remove", "/data/no/such").stdout, "removed=0")

        try "data".write(toFile: rootfs + "/data/full", atomically: false, encoding: .utf8)
        XCTAssertEqual(try nsexec("inspect", "/data/full").stdout, "kind=file mounted=0")
        XCTAssertEqual(try nsexec("mkfile", "/data/full").stdout, "created=0")
        XCTAssertEqual(try nsexec("mkdir", "/data/full").status, 5)
        XCTAssertEqual(try nsexec("mkdir", "/data/full/sub").status, 5)
        XCTAssertEqual(try nsexec("remove", "/data/full").status, 5, "a file with data")
        try FileManager.default.createDirectory(atPath: rootfs + "/data/dir/sub", withIntermediateDirectories: true)
        XCTAssertEqual(try nsexec("mkfile", "/data/dir").status, 5)
        XCTAssertEqual(try nsexec("remove", "/data/dir").status, 5, "a non-empty directory")
        XCTAssertEqual(try nsexec("inspect", "/bin/busybox").stdout, "kind=file mounted=0")
        XCTAssertTrue(FileManager.default.fileExists(atPath: rootfs + "/data/full"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: rootfs + "/data/dir/sub"))
    }

    func testBusyMountNeedsLazyUnmount() throws {
        XCTAssertEqual(try nsexec("mkdir", "/data/busy").stdout, "created=1")
        XCTAssertEqual(try nsexec("bind", "--source", staging, "/data/busy").stdout, "mounted=1")
        let user = try startProcess("/usr/bin/nsenter", ["--target", "\(pid)", "--mount", "--root", "/bin/busybox",
                                                         "sh", "-c", "cd /data/busy && exec /bin/busybox sleep 600"])
        try waitFor("a process working in /data/busy") { self.cmdline(user.processIdentifier) == ["/bin/busybox", "sleep", "600"] }
        let busy = try nsexec("unmount", "/data/busy")
        XCTAssertEqual(busy.status, 6, busy.stdout)
        XCTAssertTrue(busy.stderr.contains("--lazy"), busy.stderr)
        XCTAssertEqual(try nsexec("unmount", "--lazy", "/data/busy").stdout, "unmounted=1")
        XCTAssertEqual(try nsexec("inspect", "/data/busy").stdout, "kind=directory mounted=0")
    }

    func testIdentifyAndStaleProcesses() throws {
        XCTAssertEqual(try nsexec("identify", startTime: nil).stdout, "start-time=\(startTime)")
        XCTAssertEqual(try nsexec("inspect", "/data", startTime: 0).stdout, "kind=directory mounted=0")
        let reused = try nsexec("inspect", "/data", startTime: startTime + 1)
        XCTAssertEqual(reused.status, 3)
        XCTAssertTrue(reused.stderr.contains("reused"), reused.stderr)
        XCTAssertEqual(try nsexec("mkdir", "/data/x", startTime: startTime + 1).status, 3)
        XCTAssertFalse(FileManager.default.fileExists(atPath: rootfs + "/data/x"))

        // A process that has exited (its PID, if reused, has another start time).
        let gone = try startProcess("/bin/sleep", ["30"])
        let goneStart = try XCTUnwrap(Self.startTime(of: gone.processIdentifier))
        kill(gone.processIdentifier, SIGKILL)
        gone.waitUntilExit()
        for command in [["identify"], ["inspect", "/data"], ["mountinfo"], ["bind", "--source", staging, "/data"]] {
            let args = command[0] == "identify" ? [] : ["--start-time", "\(goneStart)"]
            let result = try run(Self.helper, [command[0], "--pid", "\(gone.processIdentifier)"] + args + command.dropFirst())
            XCTAssertEqual(result.status, 3, "\(command): \(result.stderr)")
        }

        // A zombie: the child of a process that never waits.
        let parent = try startProcess("/bin/sh", ["-c", "/bin/true & exec /bin/sleep 600"])
        var zombie: Int32 = 0
        try waitFor("a zombie child") {
            zombie = self.children(of: parent.processIdentifier).first ?? 0
            return zombie > 0 && self.state(of: zombie) == "Z"
        }
        XCTAssertEqual(try run(Self.helper, ["identify", "--pid", "\(zombie)"]).status, 3)
        XCTAssertEqual(try run(Self.helper, ["inspect", "--pid", "\(zombie)", "--start-time", "0", "/"]).status, 2,
                       "PATH is checked before the process")
        XCTAssertEqual(try run(Self.helper, ["inspect", "--pid", "\(zombie)", "--start-time", "0", "/x"]).status, 3)
    }

    func testUsageErrors() throws {
        for args in [[], ["frobnicate", "--pid", "1"], ["inspect", "--pid", "1", "/data"],
                     ["inspect", "--pid", "x1", "--start-time", "0", "/data"],
                     ["inspect", "--pid", "1", "--start-time", "0"],
                     ["inspect", "--pid", "1", "--start-time", "0", "--lazy", "/data"],
                     ["bind", "--pid", "1", "--start-time", "0", "/data"],
                     ["mountinfo", "--pid", "1", "--start-time", "0", "/data"],
                     ["identify", "--pid", "1", "--start-time", "0"]] {
            let result = try run(Self.helper, args)
            XCTAssertEqual(result.status, 1, "\(args): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains("usage:"), result.stderr)
        }
    }

    // MARK: - The container

    /// unshare forks the container's init (busybox sleep) into new mount and PID namespaces,
    /// chrooted to rootfs; we wait until it has exec'd so its root and namespace are final.
    func startContainer() throws {
        let unshare = try startProcess("/usr/bin/unshare", ["--mount", "--pid", "--fork", "--root=" + rootfs,
                                                            "/bin/busybox", "sleep", "600"])
        try waitFor("the container's init") {
            self.pid = self.children(of: unshare.processIdentifier).first ?? 0
            return self.pid > 0 && self.cmdline(self.pid) == ["/bin/busybox", "sleep", "600"]
        }
        startTime = try XCTUnwrap(Self.startTime(of: pid))
    }

    // MARK: - Helpers

    struct Outcome {
        var status: Int32
        var stdout: String  // trimmed
        var stderr: String
    }

    /// Runs the helper on the container with the start time recorded at start (the default,
    /// UInt64.max), the given one, or none (nil, for identify).
    func nsexec(_ args: String..., startTime: UInt64? = UInt64.max) throws -> Outcome {
        try nsexec(args, startTime: startTime)
    }

    func nsexec(_ args: [String], startTime: UInt64? = UInt64.max) throws -> Outcome {
        let ticks = startTime == UInt64.max ? self.startTime : startTime
        let timing = ticks.map { ["--start-time", "\($0)"] } ?? []
        return try run(Self.helper, [args[0], "--pid", "\(pid)"] + timing + args.dropFirst())
    }

    func run(_ executable: String, _ args: [String]) throws -> Outcome {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = args
        let out = Pipe(), err = Pipe()
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Outcome(status: process.terminationStatus,
                       stdout: String(decoding: stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines),
                       stderr: String(decoding: stderr, as: UTF8.self))
    }

    func expectSuccess(_ outcome: Outcome) throws {
        if outcome.status != 0 { throw POSIXError(.EIO, userInfo: [NSLocalizedDescriptionKey: outcome.stderr]) }
    }

    /// A background process that tearDown kills, whatever happens.
    func startProcess(_ executable: String, _ args: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = args
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        processes.append(process)
        return process
    }

    func waitFor(_ what: String, _ condition: () -> Bool) throws {
        for _ in 0..<500 {
            if condition() { return }
            usleep(10_000)
        }
        throw POSIXError(.ETIMEDOUT, userInfo: [NSLocalizedDescriptionKey: "timed out waiting for \(what)"])
    }

    func children(of pid: Int32) -> [Int32] {
        let text = (ProcFile.textIfReadable("/proc/\(pid)/task/\(pid)/children")) ?? ""
        return text.split(separator: " ").compactMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    func cmdline(_ pid: Int32) -> [String] {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return [] }
        return data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Fields after the command name in /proc/PID/stat, starting with field 3 (state).
    static func statFields(of pid: Int32) -> [Substring] {
        guard let text = ProcFile.textIfReadable("/proc/\(pid)/stat"),
              let close = text.lastIndex(of: ")") else { return [] }
        return text[text.index(after: close)...].split(separator: " ")
    }

    static func startTime(of pid: Int32) -> UInt64? {
        let fields = statFields(of: pid)
        return fields.count > 19 ? UInt64(fields[19]) : nil  // field 22
    }

    func state(of pid: Int32) -> String { Self.statFields(of: pid).first.map(String.init) ?? "" }

    /// Mount points in the container's namespace, as the helper reports them.
    func containerMountPoints() throws -> [String] {
        let info = try nsexec("mountinfo")
        XCTAssertEqual(info.status, 0, info.stderr)
        return info.stdout.split(separator: "\n").map { String($0.split(separator: " ")[4]) }
    }

    /// Mount points at or under `root` in the host's (this process's) namespace, unescaped.
    func hostMounts(under root: String) -> [String] {
        let text = (ProcFile.textIfReadable("/proc/self/mountinfo")) ?? ""
        return text.split(separator: "\n").compactMap { line -> String? in
            let fields = line.split(separator: " ")
            guard fields.count > 4 else { return nil }
            let point = Self.unescape(String(fields[4]))
            return point == root || point.hasPrefix(root + "/") ? point : nil
        }
    }

    /// mountinfo writes space, tab, newline and backslash as \ooo.
    static func unescape(_ field: String) -> String {
        var bytes: [UInt8] = []
        var input = Array(field.utf8)[...]
        while let byte = input.popFirst() {
            if byte == UInt8(ascii: "\\"), input.count >= 3, let value = UInt8(String(decoding: input.prefix(3), as: UTF8.self), radix: 8) {
                bytes.append(value)
                input = input.dropFirst(3)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
