import CSIProto
import CairnCore
import Foundation
import XCTest

/// `minInSync` on the test bed (docs/recovery.md): a volume that asks for two in-sync copies
/// refuses writes while only one is left, says why in its condition, and takes writes again
/// once a replica is back in sync.
extension ReplicatedFailoverTests {
    func testMinInSyncRefusesWritesWithTwoReplicaNodesDownAndServesThemOnceOneIsBack() async throws {
        let bytes: Int64 = 64 << 20
        let created = try await controller.createVolume(
            CSI.create(name: "min-in-sync", access: .block, required: bytes, parameters: ["replicas": "3", "minInSync": "2"]))
        let volume = Volume(id: created.volume.volumeID, blocks: Int(bytes) / BlockWriter.blockSize)
        let attached = try await attach(volume, on: "n1")
        let first = BlockWriter.block(index: 1, sequence: 1)
        try BlockWriter.writeDirect(device: attached.target, index: 1, block: first)

        try bed.kill("n2")
        try bed.kill("n3")
        // The first write finds both replicas gone (they are recorded out of sync, it reached n1
        // alone: not acknowledged); the next ones are refused before they are sent.
        for sequence in 1...3 {
            XCTAssertThrowsError(try BlockWriter.writeDirect(device: attached.target, index: 2,
                                                             block: BlockWriter.block(index: 2, sequence: UInt64(sequence))),
                                 "write \(sequence) was acknowledged with one replica in sync and minInSync=2")
        }
        XCTAssertEqual(try BlockWriter.readDirect(device: attached.target, index: 1), first, "reads go on")
        let condition = try await controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition
        XCTAssertTrue(condition.abnormal)
        XCTAssertTrue(condition.message.contains("writes refused: minInSync=2"), condition.message)
        let stats = try await node("n1").nodeGetVolumeStats(CSI.stats(volume.id, path: attached.target))
        XCTAssertTrue(stats.volumeCondition.message.contains("writes refused"), stats.volumeCondition.message)

        try bed.restart("n2")
        let deadline = Date().addingTimeInterval(90)
        var message = condition.message
        while Date() < deadline {
            message = try await controller.controllerGetVolume(CSI.getVolume(volume.id)).status.volumeCondition.message
            if !message.contains("writes refused") { break }
            try await Task.sleep(for: .milliseconds(250))
        }
        XCTAssertFalse(message.contains("writes refused"), "n2 did not come back in sync within 90 s: \(message)")
        let later = BlockWriter.block(index: 2, sequence: 9)
        try BlockWriter.writeDirect(device: attached.target, index: 2, block: later)
        XCTAssertEqual(try BlockWriter.readDirect(device: attached.target, index: 2), later)
        try await detach(volume, attached)
    }
}
