import CSIProto
import CairnCore
import Foundation
import XCTest

/// Issue 14: the split cluster node. Each bed node is an agent (`--role agent`: replica server,
/// engines, FUSE) and a CSI node (`--role node --agent-socket PATH --store etcd`) holding no
/// engine. Killing and restarting the CSI node must not touch a volume's I/O, and the CO's
/// repeated calls on the restarted node must find everything in place. On the failover tests'
/// bed (their setUp and tearDown).
extension ReplicatedFailoverTests {
    func testCSINodeKilledAndRestartedWhileWritingLosesNoWriteAndAnswersRepeatedCalls() async throws {
        try XCTSkipUnless(bed.isSplit, "the bed runs one process per node (CAIRN_TESTBED_SPLIT=0)")
        let volume = try await createBlockVolume("split-node-restart")
        let attached = try await attach(volume, on: "n1")
        let engineDir = bed.stateDir + "/n1/engines/\(volume.id)"
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [engineDir], "the agent runs the engine")
        XCTAssertTrue(bed.logTail("n1-agent", lines: 400).contains("the volume's engine is serving it"),
                      "the engine's start is the agent's: \(bed.logTail("n1-agent"))")
        XCTAssertFalse(bed.logTail("n1", lines: 400).contains("the volume's engine is serving it"),
                       "the CSI node must run no engine")

        let writer = try BlockWriter(device: attached.target, blocks: volume.blocks)
        writer.start()
        defer { writer.stop() }
        try await writer.waitForAcknowledged(100)

        try bed.kill("n1-node")
        let whileDead = writer.acknowledgedCount
        try await writer.waitForAcknowledged(whileDead + 200, seconds: 60)  // I/O goes on without it
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [engineDir], "killing the CSI node leaves the engine alone")
        try bed.restart("n1-node")
        let restarted = writer.acknowledgedCount
        try await writer.waitForAcknowledged(restarted + 200, seconds: 60)

        // The CO repeats its calls on the restarted node: the same answers, nothing redone.
        let published = try await controller.controllerPublish(CSI.controllerPublish(volume.id, node: "n1", access: .block))
        let n1 = node("n1")
        _ = try await n1.nodeStage(CSI.stage(volume.id, staging: attached.staging, access: .block,
                                             publishContext: published.publishContext))
        _ = try await n1.nodePublish(CSI.publish(volume.id, staging: attached.staging, target: attached.target, access: .block,
                                                 publishContext: published.publishContext))
        let stats = try await n1.nodeGetVolumeStats(CSI.stats(volume.id, path: attached.target))
        XCTAssertFalse(stats.volumeCondition.abnormal, stats.volumeCondition.message)
        XCTAssertTrue(stats.volumeCondition.message.contains("3 of 3 replicas in sync"), stats.volumeCondition.message)
        XCTAssertEqual(stats.usage.first?.total, Int64(volume.blocks * BlockWriter.blockSize))
        let more = writer.acknowledgedCount
        try await writer.waitForAcknowledged(more + 100, seconds: 60)

        try await writer.stopAndVerify("a write failed while the CSI node was killed and restarted")
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [engineDir], "exactly one engine: nothing stacked")
        XCTAssertEqual(PluginProcess.loopDevices(backedUnder: bed.stateDir + "/n1").count, 1, "exactly one loop device")

        // The node's record still carries the agent's data address: a volume placed now needs
        // all three nodes' replica servers.
        let placed = try await createBlockVolume("split-node-placed")
        _ = try await controller.deleteVolume(CSI.delete(placed.id))

        try await detach(volume, attached)
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [], "NodeUnstage through the agent stops the engine")
        XCTAssertEqual(PluginProcess.loopDevices(backedUnder: bed.stateDir + "/n1").map(\.device), [])
        _ = try await controller.deleteVolume(CSI.delete(volume.id))
    }

    /// `upgrade n1` restarts the agent, then the CSI node, with the same flags; the FUSE keeper
    /// the agent started outlives it, `kill n1` does not.
    func testUpgradeRestartsANodesProcessesOneByOneKeepingTheKeeperAndKillTakesTheWholeNode() async throws {
        try XCTSkipUnless(bed.isSplit, "the bed runs one process per node (CAIRN_TESTBED_SPLIT=0)")
        let keeperPID = try XCTUnwrap(Int32(try pid("n1/fuse-keeper").trimmingCharacters(in: .whitespacesAndNewlines)),
                                      "the agent started a FUSE keeper")
        func keeperRunning() -> Bool { kill(keeperPID, 0) == 0 }
        XCTAssertTrue(keeperRunning())

        let before = try ["n1-agent", "n1"].map(pid)
        try bed.upgrade("n1", cairn: try PluginProcess.locateBinary())
        let after = try ["n1-agent", "n1"].map(pid)
        XCTAssertNotEqual(before[0], after[0], "the agent was restarted")
        XCTAssertNotEqual(before[1], after[1], "the CSI node was restarted")
        XCTAssertTrue(keeperRunning(), "upgrade must not kill the FUSE keeper")
        let status = try bed.status()
        XCTAssertTrue(status.contains("n1-keeper") && status.contains("n1-agent") && status.contains("n1-node"), status)

        // Both serve again: a volume placed on every node is created, staged and unstaged on n1.
        let volume = try await createBlockVolume("split-node-upgraded")
        let attached = try await attach(volume, on: "n1")
        let block = BlockWriter.block(index: 5, sequence: 77)
        try BlockWriter.writeDirect(device: attached.target, index: 5, block: block)
        XCTAssertEqual(try BlockWriter.readDirect(device: attached.target, index: 5), block)
        try await detach(volume, attached)
        _ = try await controller.deleteVolume(CSI.delete(volume.id))

        try bed.kill("n1-agent")
        XCTAssertTrue(keeperRunning(), "kill n1-agent must not kill the FUSE keeper")
        try bed.kill("n1")
        for _ in 0..<50 where keeperRunning() { usleep(100_000) }
        XCTAssertFalse(keeperRunning(), "kill n1 takes the node's FUSE keeper with it")
    }

    /// The pid a bed process's `.pid` file records.
    private func pid(_ name: String) throws -> String {
        let text = try String(contentsOfFile: "\(bed.stateDir)/\(name).pid", encoding: .utf8)
        return String(text.split(separator: " ").first ?? "")
    }
}
