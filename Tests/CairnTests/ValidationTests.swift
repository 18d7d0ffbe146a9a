import CairnCore
import CairnProcess
import Foundation
import XCTest

final class ValidationTests: XCTestCase {
    func testVolumeIDsThatCouldEscapeADirectoryAreRefused() {
        for bad in ["", ".", "..", "../../etc", "a/b", "/abs", "a b", "a\0b", String(repeating: "a", count: 129), "vol\n1"] {
            XCTAssertThrowsError(try Validate.volumeID(bad), "accepted \(bad.debugDescription)") { error in
                XCTAssertEqual((error as? CairnError)?.code, .invalidArgument)
            }
        }
        for good in ["vol-0b7f", "fake-vol-id-3f2a9c1b-7", "fake-vol-id", "a.b_c-D", String(repeating: "a", count: 128)] {
            XCTAssertNoThrow(try Validate.volumeID(good), good)
        }
    }

    func testNamesAreLimitedTo128Bytes() {
        XCTAssertNoThrow(try Validate.volumeName(String(repeating: "a", count: 128)))
        XCTAssertThrowsError(try Validate.volumeName(String(repeating: "a", count: 10 * 1024)))
        XCTAssertThrowsError(try Validate.volumeName(""))
        // 43 three-byte characters = 129 bytes: the limit is in bytes, not characters.
        XCTAssertThrowsError(try Validate.volumeName(String(repeating: "€", count: 43)))
    }

    func testPathsMustStayInsideTheRoots() throws {
        let root = NSTemporaryDirectory() + "cairn-validate-\(getpid())"
        try FileManager.default.createDirectory(atPath: root + "/inside", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createSymbolicLink(atPath: root + "/escape", withDestinationPath: "/etc")

        XCTAssertEqual(try Validate.path(root + "//inside/target", field: "target_path", roots: [root]), root + "/inside/target")
        for bad in ["relative/path", "/etc/passwd", root + "/../etc", root + "/inside/../../x", root + "/escape/cairn", root + "x/y"] {
            XCTAssertThrowsError(try Validate.path(bad, field: "target_path", roots: [root]), bad) { error in
                XCTAssertEqual((error as? CairnError)?.code, .invalidArgument)
            }
        }
    }

    func testVolumeLocksAbortAConcurrentOperation() async throws {
        let locks = VolumeLocks()
        let (started, startedCont) = AsyncStream<Void>.makeStream()
        let (release, releaseCont) = AsyncStream<Void>.makeStream()
        let holder = Task {
            try await locks.withLock("vol-1", operation: "NodeStageVolume") {
                startedCont.yield()
                for await _ in release { break }
            }
        }
        for await _ in started { break }
        do {
            try await locks.withLock("vol-1", operation: "NodeStageVolume") {}
            XCTFail("a second operation on the same volume must be ABORTED")
        } catch let e as CairnError {
            XCTAssertEqual(e.code, .aborted)
        }
        try await locks.withLock("vol-2", operation: "NodeStageVolume") {}  // other volumes proceed
        releaseCont.yield()
        try await holder.value
        try await locks.withLock("vol-1", operation: "NodeStageVolume") {}  // released afterwards
    }

    func testAHungToolIsKilledAtItsTimeout() throws {
        let start = ContinuousClock.now
        XCTAssertThrowsError(try Command.runBlocking(["sleep", "30"], timeout: .seconds(1))) { error in
            XCTAssertEqual((error as? CairnError)?.code, .unavailable)
        }
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(10))
        XCTAssertEqual(try Command.runBlocking(["true"], timeout: .seconds(5)).status, 0)
    }

    func testEveryErrorMapsToOneStatus() {
        XCTAssertEqual(RPCStatus.from(CairnError.notFound("x")).code, .notFound)
        XCTAssertEqual(RPCStatus.from(CancellationError()).code, .cancelled)
        XCTAssertEqual(RPCStatus.from(SystemError("open", errno: ENOENT)).code, .internal)
        struct Odd: Error {}
        XCTAssertEqual(RPCStatus.from(Odd()).code, .internal)
    }
}
