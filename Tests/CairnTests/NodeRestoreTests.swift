import CSIProto
import CairnCore
import CairnNode
import Foundation
import XCTest

/// NodeService.restore(): what the agent does when it (re)starts.
extension NodeServiceTests {
    func testRestoreAfterARebootReattachesRemountsAndRebindsWithoutReformatting() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest())
        mounter.reboot()
        await node.restore()
        XCTAssertEqual(mounter.count("attach"), 2)
        XCTAssertEqual(mounter.count("mkfs"), 1, "restore checks the filesystem, it never recreates it")
        XCTAssertEqual(mounter.count("fsck"), 1)
        XCTAssertEqual(mounter.mounts(at: staging).count, 1)
        XCTAssertEqual(mounter.mounts(at: root + "/mount/target").count, 1, "the host target is bound again")
        // The CO's own retries are no-ops afterwards.
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest())
        XCTAssertEqual(mounter.count("attach"), 2)
        XCTAssertEqual(mounter.mounts(at: root + "/mount/target").count, 1)
    }

    func testRestoreAfterAnAgentCrashChangesNothing() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        _ = try await node.nodePublishVolume(publishRequest())
        let before = mounter.calls.count
        await node.restore()
        XCTAssertEqual(mounter.calls.filter { !$0.hasPrefix("probe") }.count,
                       mounter.calls.prefix(before).filter { !$0.hasPrefix("probe") }.count,
                       "everything is still in place: restore must not attach, mount or bind again")
    }

    func testRestoreSkipsAVolumeNoLongerAttachedToThisNode() async throws {
        _ = try await node.nodeStageVolume(stageRequest())
        mounter.reboot()
        try await store.detach(volumeID: "vol-1", nodeID: "node-a")
        await node.restore()
        XCTAssertEqual(mounter.count("attach"), 1, "a volume moved (or fenced) elsewhere must not be attached here again")
        XCTAssertEqual(mounter.mounts(at: staging).count, 0)
    }
}

extension NodeServiceTests {
    func testAReadOnlyBlockPublishNeedsAReadOnlyStage() async throws {
        let block = Self.capability(block: true)
        _ = try await node.nodeStageVolume(stageRequest(capability: block))
        let node = self.node!
        await assertStatus(.failedPrecondition) {
            try await node.nodePublishVolume(self.publishRequest(readonly: true, capability: block))
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: root + "/mount/target"), "a refused publish creates no target")
        _ = try await node.nodePublishVolume(publishRequest(readonly: false, capability: block))
    }

    func testAReaderOnlyBlockStageAttachesTheLoopDeviceReadOnlyAndAllowsReadOnlyPublish() async throws {
        try await createVolume("vol-r", modes: [.singleNodeReaderOnly])
        let block = Self.capability(.singleNodeReaderOnly, block: true)
        _ = try await node.nodeStageVolume(stageRequest("vol-r", capability: block))
        XCTAssertTrue(mounter.calls.contains { $0.hasPrefix("attach") && $0.hasSuffix(" ro") }, "\(mounter.calls)")
        _ = try await node.nodePublishVolume(publishRequest("vol-r", readonly: true, capability: block))
    }
}
