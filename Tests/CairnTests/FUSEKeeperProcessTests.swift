import CairnEngine
import Foundation
import Logging
import XCTest

/// The FUSE keeper process (`cairn fuse-keeper`) on its own: what it answers about the
/// connections it holds (docs/design.md "Engines survive their process").
final class FUSEKeeperProcessTests: XCTestCase {
    /// The keeper looks at its held descriptors only once a second (a wait on /dev/fuse is
    /// woken by every request), but what it tells an engine process is never that stale: a
    /// connection the kernel has ended is not counted or listed, even right after it ended.
    func testTheKeeperNeverReportsAConnectionTheKernelEnded() throws {
        let fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC)
        try XCTSkipIf(fuse < 0, "no /dev/fuse on this machine")
        // A /dev/fuse descriptor no mount ever used: the kernel reports it ended (POLLERR) at once.
        defer { close(fuse) }

        var template = Array("/tmp/cairn-keeper.XXXXXX".utf8CString)
        let dir = try XCTUnwrap(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }.map { String(cString: $0) })
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/keeper.sock"
        let keeper = Process()
        keeper.executableURL = URL(fileURLWithPath: try Self.cairnBinary())
        keeper.arguments = ["fuse-keeper", "--socket", socket, "--pid-file", dir + "/keeper.pid"]
        keeper.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        keeper.standardError = keeper.standardOutput
        try keeper.run()
        defer {
            keeper.terminate()
            keeper.waitUntilExit()
        }

        let client = FUSEKeeperClient(socketPath: socket, mode: .external, logger: Logger(label: "test.keeper"))
        var answered: (pid: Int32, held: Int)?
        for _ in 0..<100 where answered == nil {
            answered = client.hello()
            if answered == nil { usleep(100_000) }
        }
        XCTAssertEqual(answered?.pid, keeper.processIdentifier, "the keeper answers on its socket")

        for round in 0..<3 {
            client.hold(KeptConnection(volumeID: "ended-\(round)", mountPoint: dir + "/m", connection: 0, protoMinor: 40), fd: fuse)
            XCTAssertEqual(client.hello()?.held, 0, "round \(round): the keeper counts a connection the kernel ended")
            // The client's own duplicate goes too; the keeper answers a drop of what it let go.
            client.drop(volumeID: "ended-\(round)")
        }
        XCTAssertTrue(keeper.isRunning, "the keeper still runs")
    }

    /// `swift build` puts `cairn` beside the test bundle (.build/<triple>/debug/).
    static func cairnBinary() throws -> String {
        let beside = ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
        let candidates = [(beside as NSString).deletingLastPathComponent + "/cairn",
                          (Bundle.main.bundleURL.path as NSString).deletingLastPathComponent + "/cairn"]
        guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw CocoaError(.fileNoSuchFile, userInfo: [NSLocalizedDescriptionKey: "the cairn binary is not beside the tests (looked at \(candidates)): run `swift build` first"])
        }
        return found
    }
}
