import CairnCore
import CairnNode
import CairnProcess
import Foundation
import Logging
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// `ProcFile` reads a /proc file to its end, however long: a process in a mount namespace of its
/// own with 400 extra mounts (over 64 KiB of /proc/PID/mountinfo) has every one of them read,
/// and `LinuxMounter` finds the last one.
final class ProcFileTests: XCTestCase {
    private var holder: Process?

    override func tearDown() {
        // The namespace, and every mount in it, ends with its only process.
        if let holder, holder.isRunning {
            kill(holder.processIdentifier, SIGKILL)
            holder.waitUntilExit()
        }
        holder = nil
        super.tearDown()
    }

    func testReadsALongMountTableToTheEnd() async throws {
        try XCTSkipUnless(getuid() == 0, "needs root: mounts in a private mount namespace")
        let ready = NSTemporaryDirectory() + "cairn-procfile-\(UUID().uuidString)"
        defer { unlink(ready) }
        let script = """
            set -e
            mount -t tmpfs -o size=4m,mode=0700 cairn-procfile /mnt
            long=$(printf 'y%.0s' $(seq 1 200))
            for i in $(seq 1 400); do mkdir "/mnt/$i-$long"; mount -t tmpfs -o size=4k cairn-procfile "/mnt/$i-$long"; done
            touch "$0"
            exec sleep 120
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        process.arguments = ["--mount", "--propagation", "private", "/bin/sh", "-c", script, ready]
        try process.run()
        holder = process
        let deadline = Date().addingTimeInterval(60)
        while !FileManager.default.fileExists(atPath: ready) {
            guard process.isRunning, Date() < deadline else { return XCTFail("the namespace's mounts were not made in time") }
            try await Task.sleep(for: .milliseconds(100))
        }
        let path = "/proc/\(process.processIdentifier)/mountinfo"
        let bytes = try ProcFile.bytes(path)
        XCTAssertGreaterThan(bytes.count, 64 << 10)
        let table = MountTable.parse(String(decoding: bytes, as: UTF8.self))
        let bulk = table.filter { $0.source == "cairn-procfile" }
        XCTAssertEqual(bulk.count, 401, "/mnt and all 400 mounts on it")
        XCTAssert(table.last?.mountPoint.hasPrefix("/mnt/400-") ?? false, "the last line is the last mount: \(table.last?.mountPoint ?? "none")")
        // What `cat` reads (to EOF) is what ProcFile read.
        let cat = try await Command.run(["cat", path])
        XCTAssertEqual(Array(cat.stdout.utf8), bytes)
        let mounter = LinuxMounter(logger: Logger(label: "procfile-test"), mountInfoPath: path)
        let seen = try await mounter.mountTable(in: .host)
        XCTAssert(seen.contains { $0.mountPoint.hasPrefix("/mnt/400-") }, "LinuxMounter must see the last mount of a long table")
    }
}
