import CSIProto
import CairnCore
import Foundation
import XCTest

/// Issue 13: a node process killed with SIGKILL leaves its engines' FUSE mounts behind (and the
/// loop device on the FUSE file of a staged volume). After the node's restart, NodeUnstage must
/// leave no dead FUSE mount and no loop device, nothing may stack, and staging again works.
/// On the failover tests' bed (their setUp and tearDown: `down` removes whatever a failure left).
extension ReplicatedFailoverTests {
    /// The `fuse.cairn` mounts under `node`'s data directory (in mount order).
    func fuseMounts(_ node: String) throws -> [MountInfo] {
        let dataDir = bed.stateDir + "/\(node)/"
        return try MountTable.read().filter { $0.fsType == "fuse.cairn" && $0.mountPoint.hasPrefix(dataDir) }
    }

    func testKilledNodeLeavesNoDeadFUSEMountAfterRestartAndUnstageAndStagesAgain() async throws {
        let bytes: Int64 = 64 << 20
        let volumeID = try await controller.createVolume(
            CSI.create(name: "dead-mounts", access: .block, required: bytes, parameters: ["replicas": "3"])).volume.volumeID
        let engineDir = bed.stateDir + "/n1/engines/\(volumeID)"

        let first = try await bed.attachBlock(volumeID, on: "n1")
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [engineDir], "one engine mount while staged")
        let block = BlockWriter.block(index: 3, sequence: 42)
        try BlockWriter.writeDirect(device: first.target, index: 3, block: block)

        try bed.kill("n1")
        XCTAssertEqual(try fuseMounts("n1").count, 1, "SIGKILL leaves the engine's FUSE mount behind")
        XCTAssertEqual(PluginProcess.loopDevices(backedUnder: bed.stateDir + "/n1").count, 1,
                       "and the loop device on its file")

        try bed.restart("n1")
        XCTAssertLessThanOrEqual(try fuseMounts("n1").count, 1, "the restart must not stack a mount on the dead one")

        // The CO cleans up after the lost node: unpublish, unstage, then stage again.
        let n1 = bed.node("n1")
        _ = try await n1.nodeUnpublish(CSI.unpublish(volumeID, target: first.target))
        _ = try await n1.nodeUnstage(CSI.unstage(volumeID, staging: first.staging))
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [], "NodeUnstage must leave no dead FUSE mount")
        XCTAssertEqual(PluginProcess.loopDevices(backedUnder: bed.stateDir + "/n1").map(\.device), [],
                       "NodeUnstage must detach the loop device on the dead FUSE file")

        let published = try await controller.controllerPublish(CSI.controllerPublish(volumeID, node: "n1", access: .block))
        _ = try await n1.nodeStage(CSI.stage(volumeID, staging: first.staging, access: .block,
                                             publishContext: published.publishContext))
        _ = try await n1.nodePublish(CSI.publish(volumeID, staging: first.staging, target: first.target, access: .block,
                                                 publishContext: published.publishContext))
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [engineDir], "exactly one engine mount after staging again")
        XCTAssertEqual(try BlockWriter.readDirect(device: first.target, index: 3), block,
                       "the data written before the kill reads back through the new engine")

        try await bed.detach(volumeID, first)
        XCTAssertEqual(try fuseMounts("n1").map(\.mountPoint), [], "NodeUnstage stops the engine and unmounts it")
        XCTAssertEqual(PluginProcess.loopDevices(backedUnder: bed.stateDir + "/n1").map(\.device), [])
        _ = try await controller.deleteVolume(CSI.delete(volumeID))
    }
}
