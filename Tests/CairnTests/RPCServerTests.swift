import CSIProto
import CairnCore
import CairnRPC
import Foundation
import Logging
import Synchronization
import XCTest

/// The gRPC façade over the C++ shim, in-process on a temporary unix socket.
final class RPCServerTests: XCTestCase {
    var dir = ""
    var server: GRPCServer!
    var channel: GRPCChannel!
    let cancelled = CancelFlag()

    override func setUp() async throws {
        dir = "/tmp/cairn-rpc-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let router = Router()
        router.register("/test.T/Echo") { (q: Csi_V1_GetPluginInfoRequest, _) -> Csi_V1_GetPluginInfoResponse in
            .with { $0.name = "echo" }
        }
        router.register("/test.T/Fail") { (_: Csi_V1_ProbeRequest, _) -> Csi_V1_ProbeResponse in
            throw CairnError.failedPrecondition("volume is published elsewhere")
        }
        let flag = cancelled
        router.register("/test.T/Slow") { (_: Csi_V1_ProbeRequest, _) -> Csi_V1_ProbeResponse in
            do {
                try await Task.sleep(for: .seconds(30))
            } catch {
                flag.set()
                throw error
            }
            return .init()
        }
        server = GRPCServer(router: router, logger: Logger(label: "test"))
        try server.start(endpoints: ["unix://\(dir)/csi.sock"])
        channel = GRPCChannel(target: "unix://\(dir)/csi.sock")
    }

    override func tearDown() async throws {
        await server?.shutdown(grace: .seconds(1))
        try? FileManager.default.removeItem(atPath: dir)
    }

    func testTypedCallsRoundTrip() async throws {
        let reply = try await channel.call("/test.T/Echo", Csi_V1_GetPluginInfoRequest(), as: Csi_V1_GetPluginInfoResponse.self)
        XCTAssertEqual(reply.name, "echo")
    }

    func testTCPEndpointsServeToo() async throws {
        let port = Int.random(in: 20000..<60000)
        let tcp = GRPCServer(router: {
            let r = Router()
            r.register("/test.T/Echo") { (_: Csi_V1_GetPluginInfoRequest, _) -> Csi_V1_GetPluginInfoResponse in .with { $0.name = "tcp" } }
            return r
        }(), logger: Logger(label: "test"))
        try tcp.start(endpoints: ["tcp://127.0.0.1:\(port)"])
        let reply = try await GRPCChannel(target: "tcp://127.0.0.1:\(port)")
            .call("/test.T/Echo", Csi_V1_GetPluginInfoRequest(), as: Csi_V1_GetPluginInfoResponse.self, timeout: .seconds(10))
        XCTAssertEqual(reply.name, "tcp")
        await tcp.shutdown(grace: .seconds(1))
    }

    func testSocketIsNotWorldAccessible() throws {
        var st = stat()
        XCTAssertEqual(stat("\(dir)/csi.sock", &st), 0)
        XCTAssertEqual(st.st_mode & 0o007, 0, "socket mode must be 0660 or stricter")
    }

    func testUnknownMethodsAreUnimplemented() async {
        let reply = await channel.callRaw("/csi.v1.Controller/Nope", [])
        XCTAssertEqual(reply.code, .unimplemented)
    }

    func testUndecodableBytesAreInvalidArgument() async {
        let reply = await channel.callRaw("/test.T/Echo", [0xFF, 0xFF, 0xFF, 0x0F, 0x01])
        XCTAssertEqual(reply.code, .invalidArgument)
        XCTAssertTrue(reply.message.contains("GetPluginInfoRequest"), reply.message)
    }

    func testThrownErrorsKeepTheirStatusAndMessage() async {
        let reply = await channel.callRaw("/test.T/Fail", [])
        XCTAssertEqual(reply.code, .failedPrecondition)
        XCTAssertEqual(reply.message, "volume is published elsewhere")
    }

    func testDeadlineAnswersPromptlyButNeverAbandonsTheOperationHalfway() async throws {
        let start = ContinuousClock.now
        let reply = await channel.callRaw("/test.T/Slow", [], timeout: .milliseconds(300))
        XCTAssertEqual(reply.code, .deadlineExceeded)
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(5))
        // The handler keeps running (it would hold its volume lock): not cancelled.
        try await Task.sleep(for: .seconds(1))
        XCTAssertFalse(cancelled.isSet, "a storage operation must not be cancelled halfway")
    }

    func testShutdownIsBoundedByTheGracePeriod() async throws {
        let channel = self.channel!
        let slow = Task { await channel.callRaw("/test.T/Slow", []) }
        try await Task.sleep(for: .milliseconds(200))
        let start = ContinuousClock.now
        await server.shutdown(grace: .milliseconds(500))
        server = nil
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(10))
        let reply = await slow.value
        XCTAssertNotEqual(reply.code, .ok)
    }

    func testAStaleSocketFileIsReplacedButOtherFilesAreNot() async throws {
        let other = GRPCServer(router: Router(), logger: Logger(label: "test"))
        _ = FileManager.default.createFile(atPath: "\(dir)/plain", contents: Data("x".utf8))
        XCTAssertThrowsError(try other.start(endpoints: ["unix://\(dir)/plain"]))
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir)/plain"))
    }
}

final class CancelFlag: Sendable {
    private let value = Mutex(false)
    func set() { value.withLock { $0 = true } }
    var isSet: Bool { value.withLock { $0 } }
}
