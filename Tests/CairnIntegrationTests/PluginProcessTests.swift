import CSIProto
import CairnCore
import Foundation
import XCTest

/// The fixture's own promise (style habit 8): whatever a test leaves behind — the process,
/// mounts, loop devices, files — tearDown removes it.
final class PluginProcessTests: IntegrationTestCase {
    func testTearDownStopsThePluginAndRemovesTheMountsLoopDevicesAndFilesATestLeftBehind() async throws {
        let env = try await BadInputTests.Env.make(self)
        let staged = try await env.stagedVolume("left-staged")
        try FileManager.default.createDirectory(atPath: env.plugin.podsDir + "/left", withIntermediateDirectories: true)
        _ = try await env.csi.nodePublish(CSI.publish(staged.id, staging: staged.staging, target: env.plugin.podsDir + "/left/target",
                                                      access: .mount(fsType: "ext4"), publishContext: staged.publishContext))
        let block = try await env.publishedVolume("left-block")
        let blockStaging = try env.freshStagingDir("left-block")
        _ = try await env.csi.nodeStage(CSI.stage(block.id, staging: blockStaging, access: .block, publishContext: block.publishContext))
        XCTAssertGreaterThanOrEqual(env.plugin.mounts().count, 2, "the test should have left mounts: \(env.plugin.leftovers())")
        XCTAssertEqual(env.plugin.loopDevices().count, 2, "the test should have left loop devices: \(env.plugin.leftovers())")
        let pid = try XCTUnwrap(env.plugin.pid)

        let problems = await env.plugin.tearDown(testFailed: false)

        XCTAssertEqual(problems, [], "tearDown reported problems")
        XCTAssertFalse(env.plugin.isRunning, "the plugin must be stopped")
        XCTAssertNotEqual(kill(pid, 0), 0, "process \(pid) must be gone")
        XCTAssertEqual(PluginProcess.mounts(under: [env.plugin.root]).count, 0, "mounts under the root remain")
        XCTAssertEqual(PluginProcess.loopDevices(backedUnder: env.plugin.root).count, 0, "loop devices remain")
        XCTAssertFalse(FileManager.default.fileExists(atPath: env.plugin.root), "\(env.plugin.root) must be removed")
    }
}
