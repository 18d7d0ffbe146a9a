import CSIProto
import CairnCore
import Foundation
import XCTest

/// Two `--role controller` processes on the test bed: the second waits for the leader lease
/// (Controller calls UNAVAILABLE, Probe not ready) and serves once the leader is SIGKILLed and
/// its lease (the default TTL, 10 s) has expired.
final class ControllerTakeoverTests: XCTestCase {
    var bed: Testbed?
    /// The leader lease's TTL the bed's controllers run with (the `--leader-lease-ttl` default).
    static let leaseTTL: Duration = .seconds(10)

    override func setUp() async throws {
        bed = try Testbed.up(nodes: 1, controllers: 2)
    }

    override func tearDown() async throws {
        if let bed {
            if let run = testRun, run.failureCount + run.unexpectedExceptionCount > 0 {
                for name in ["controller", "controller2"] + bed.nodes { print("==> \(name).log\n" + bed.logTail(name, lines: 60)) }
            }
            if let problem = bed.down() { XCTFail(problem) }
        }
        bed = nil
    }

    func create(_ name: String) -> Csi_V1_CreateVolumeRequest {
        CSI.create(name: name, access: .block, required: 16 << 20, parameters: ["replicas": "1"])
    }

    func testAStandbyControllerServesWithinTheLeaseTTLOnceTheLeaderIsKilled() async throws {
        let bed = try XCTUnwrap(bed)
        let standby = bed.controller2
        _ = try await bed.controller.createVolume(create("before-takeover"))

        do {
            _ = try await standby.createVolume(create("on-the-standby"))
            XCTFail("a standby controller created a volume while the leader holds the lease")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .unavailable, error.message)
            XCTAssertTrue(error.message.contains("leader lease"), error.message)
        }
        let standbyProbe = try await standby.probe()
        XCTAssertFalse(standbyProbe.ready.value, "a standby is not ready: a CO's sidecars wait on it")

        try bed.kill("controller")
        let killed = ContinuousClock.now
        let deadline = killed + Self.leaseTTL + .seconds(5)
        var lastError = ""
        while true {
            do {
                _ = try await standby.createVolume(create("after-takeover"))
                break
            } catch let error as CairnError where error.code == .unavailable {
                lastError = error.message
            }
            guard ContinuousClock.now < deadline else {
                return XCTFail("the standby did not serve CreateVolume within the lease TTL + 5 s: \(lastError)")
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        let takeover = ContinuousClock.now - killed
        print("controller takeover: the standby served CreateVolume \(takeover) after the leader's SIGKILL (lease TTL \(Self.leaseTTL))")
        XCTAssertLessThan(takeover, Self.leaseTTL + .seconds(5))
        let probe = try await standby.probe()
        XCTAssertTrue(probe.ready.value, "the new leader is ready")
        // Idempotent across the takeover: the volume the old leader created is known to the new one.
        _ = try await standby.createVolume(create("before-takeover"))
    }
}
