import CSIProto
import CairnCSI
import CairnController
import CairnCore
import CairnLocal
import CairnStore
import Foundation
import Logging
import XCTest

/// Snapshot, clone, expansion and modify semantics against the real embedded store and file
/// backing in a temp directory (volumes not staged: no mounts needed).
final class ControllerSnapshotTests: XCTestCase {
    var dir = ""
    var store: SQLiteStore!
    var controller: ControllerService!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-snap-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        try await store.registerNode(NodeRecord(id: "node-a", topology: [:], maxVolumes: 0))
        controller = ControllerService(
            store: store, backing: try LocalFileBacking(dataDir: dir), capacity: CapacityPolicy(poolBytes: 1 << 30),
            localNodeID: "node-a", localTopology: [:], locks: VolumeLocks(), logger: Logger(label: "test"))
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func create(_ name: String, mib: Int64 = 64, source: ContentSource? = nil, block: Bool = true) async throws -> Csi_V1_Volume {
        var r = Csi_V1_CreateVolumeRequest()
        r.name = name
        r.capacityRange = .with { $0.requiredBytes = mib << 20 }
        r.volumeCapabilities = [ControllerServiceTests.capability(block: block)]
        switch source {
        case .snapshot(let id): r.volumeContentSource.snapshot.snapshotID = id
        case .volume(let id): r.volumeContentSource.volume.volumeID = id
        case nil: break
        }
        return try await controller.createVolume(r).volume
    }

    func snapshot(_ volumeID: String, _ name: String) async throws -> Csi_V1_Snapshot {
        try await controller.createSnapshot(.with { $0.sourceVolumeID = volumeID; $0.name = name }).snapshot
    }

    func file(_ volumeID: String) -> String { dir + "/volumes/\(volumeID).img" }

    func write(_ bytes: [UInt8], to path: String, at offset: UInt64) throws {
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.seek(toOffset: offset)
        try handle.write(contentsOf: Data(bytes))
        try handle.close()
    }

    func read(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        return [UInt8](try handle.read(upToCount: count) ?? Data())
    }

    func testASnapshotIsAPointInTimeCopyThatStaysSparse() async throws {
        let volume = try await create("src")
        try write([1, 2, 3], to: file(volume.volumeID), at: 10 << 20)
        let snap = try await snapshot(volume.volumeID, "s1")
        XCTAssertTrue(snap.readyToUse)
        XCTAssertEqual(snap.sizeBytes, 64 << 20)
        try write([9, 9, 9], to: file(volume.volumeID), at: 10 << 20)  // after the snapshot
        let restored = try await create("restored", mib: 128, source: .snapshot(id: snap.snapshotID))
        XCTAssertEqual(restored.capacityBytes, 128 << 20)
        XCTAssertEqual(restored.contentSource.snapshot.snapshotID, snap.snapshotID)
        XCTAssertEqual(try read(file(restored.volumeID), at: 10 << 20, count: 3), [1, 2, 3])
        var st = stat()
        XCTAssertEqual(stat(dir + "/snapshots/\(snap.snapshotID).img", &st), 0)
        XCTAssertLessThan(Int64(st.st_blocks) * 512, 1 << 20, "the snapshot copied holes as data")
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: file(restored.volumeID))[.size] as? Int64, 128 << 20)
    }

    func testCreateSnapshotIsIdempotentByNameAndFinishesAnInterruptedOne() async throws {
        let a = try await create("a")
        let b = try await create("b")
        let first = try await snapshot(a.volumeID, "nightly")
        let again = try await snapshot(a.volumeID, "nightly")
        XCTAssertEqual(first.snapshotID, again.snapshotID)
        await assertStatus(.alreadyExists) { _ = try await self.snapshot(b.volumeID, "nightly") }
        await assertStatus(.notFound) { _ = try await self.snapshot("vol-missing", "other") }
        await assertStatus(.invalidArgument) { _ = try await self.snapshot("", "other") }
        await assertStatus(.invalidArgument) {
            _ = try await self.controller.createSnapshot(.with { $0.sourceVolumeID = a.volumeID; $0.name = "p"; $0.parameters = ["x": "y"] })
        }
        // A CreateSnapshot cut off after its record was written (no data yet): the repeat
        // takes that same snapshot instead of leaving it half made.
        let pending = SnapshotRecord(id: "snap-00000000-0000-0000-0000-000000000001", name: "cut-off", sourceVolumeID: a.volumeID,
                                     sizeBytes: 64 << 20, fsType: "")
        try await store.createSnapshot(pending)
        let finished = try await snapshot(a.volumeID, "cut-off")
        XCTAssertEqual(finished.snapshotID, pending.id)
        XCTAssertTrue(finished.readyToUse)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/snapshots/\(pending.id).img"))
    }

    func testListSnapshotsFiltersAndPagesAndGetSnapshotFindsOne() async throws {
        var ids: [String] = []
        var sources: [String] = []
        for i in 0..<5 {
            let v = try await create("v\(i)")
            sources.append(v.volumeID)
            ids.append(try await snapshot(v.volumeID, "s\(i)").snapshotID)
        }
        let all = try await controller.listSnapshots(.init()).entries.map(\.snapshot.snapshotID)
        XCTAssertEqual(Set(all), Set(ids))
        let page1 = try await controller.listSnapshots(.with { $0.maxEntries = 2 })
        XCTAssertEqual(page1.entries.count, 2)
        let rest = try await controller.listSnapshots(.with { $0.startingToken = page1.nextToken })
        XCTAssertEqual(rest.entries.count, 3)
        XCTAssertEqual(rest.nextToken, "")
        XCTAssertEqual(Set(page1.entries.map(\.snapshot.snapshotID) + rest.entries.map(\.snapshot.snapshotID)), Set(ids))
        let bySource = try await controller.listSnapshots(.with { $0.sourceVolumeID = sources[3] }).entries
        XCTAssertEqual(bySource.map(\.snapshot.snapshotID), [ids[3]])
        let byID = try await controller.listSnapshots(.with { $0.snapshotID = ids[1] }).entries
        XCTAssertEqual(byID.map(\.snapshot.sourceVolumeID), [sources[1]])
        let mismatch = try await controller.listSnapshots(.with { $0.snapshotID = ids[1]; $0.sourceVolumeID = sources[2] }).entries
        XCTAssertTrue(mismatch.isEmpty)
        let none = try await controller.listSnapshots(.with { $0.snapshotID = "snap-nope" }).entries
        XCTAssertTrue(none.isEmpty)
        await assertStatus(.aborted) { _ = try await self.controller.listSnapshots(.with { $0.startingToken = "garbage" }) }
        let got = try await controller.getSnapshot(.with { $0.snapshotID = ids[4] }).snapshot
        XCTAssertEqual(got.sourceVolumeID, sources[4])
        await assertStatus(.notFound) { _ = try await self.controller.getSnapshot(.with { $0.snapshotID = "snap-nope" }) }
    }

    func testDeletingASnapshotKeepsVolumesRestoredFromItAndIsIdempotent() async throws {
        let v = try await create("v")
        try write([5], to: file(v.volumeID), at: 0)
        let s = try await snapshot(v.volumeID, "s")
        let restored = try await create("r", source: .snapshot(id: s.snapshotID))
        _ = try await controller.deleteSnapshot(.with { $0.snapshotID = s.snapshotID })
        _ = try await controller.deleteSnapshot(.with { $0.snapshotID = s.snapshotID })
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/snapshots/\(s.snapshotID).img"))
        XCTAssertEqual(try read(file(restored.volumeID), at: 0, count: 1), [5])
        await assertStatus(.notFound) { _ = try await self.create("r2", source: .snapshot(id: s.snapshotID)) }
        // One machine: the source volume's snapshot is a file of its own, so the volume may go first.
        let s2 = try await snapshot(v.volumeID, "s2")
        _ = try await controller.deleteVolume(.with { $0.volumeID = v.volumeID })
        _ = try await create("r3", source: .snapshot(id: s2.snapshotID))
    }

    func testARestoreCutOffBeforeItsDataIsFinishedByItsRepeatAndCannotBePublishedMeanwhile() async throws {
        let v = try await create("v")
        try write([4, 2], to: file(v.volumeID), at: 0)
        let s = try await snapshot(v.volumeID, "s")
        // What a CreateVolume that died after writing its record leaves: a pending record, no file.
        let cut = VolumeRecord(id: "vol-00000000-0000-0000-0000-00000000000a", name: "restore", capacityBytes: 64 << 20,
                               parameters: [:], fsType: "", accessModes: [AccessMode.singleNodeWriter.rawValue],
                               accessibleTopology: [:], contentSource: .snapshot(id: s.snapshotID))
        var pending = cut
        pending.contentPending = true
        try await store.createVolume(pending)
        await assertStatus(.failedPrecondition) {
            _ = try await self.controller.controllerPublishVolume(.with {
                $0.volumeID = cut.id; $0.nodeID = "node-a"; $0.volumeCapability = ControllerServiceTests.capability(block: true)
            })
        }
        let finished = try await create("restore", source: .snapshot(id: s.snapshotID))
        XCTAssertEqual(finished.volumeID, cut.id, "the repeat finishes the same volume")
        XCTAssertEqual(try read(file(cut.id), at: 0, count: 2), [4, 2])
        let record = try await store.volume(id: cut.id)
        XCTAssertNil(record?.contentPending)
        _ = try await controller.controllerPublishVolume(.with {
            $0.volumeID = cut.id; $0.nodeID = "node-a"; $0.volumeCapability = ControllerServiceTests.capability(block: true)
        })
    }

    func testACloneIsAtLeastAsLargeAsItsSourceAndKeepsItsFilesystem() async throws {
        let v = try await create("fs", mib: 96, block: false)
        await assertStatus(.outOfRange) {
            var r = Csi_V1_CreateVolumeRequest()
            r.name = "small"
            r.capacityRange = .with { $0.requiredBytes = 64 << 20; $0.limitBytes = 64 << 20 }
            r.volumeCapabilities = [ControllerServiceTests.capability()]
            r.volumeContentSource.volume.volumeID = v.volumeID
            _ = try await self.controller.createVolume(r)
        }
        let clone = try await create("clone", mib: 64, source: .volume(id: v.volumeID), block: false)
        XCTAssertEqual(clone.capacityBytes, 96 << 20, "a clone smaller than its source is grown to it")
        XCTAssertEqual(clone.volumeContext["fsType"], "ext4")
        await assertStatus(.alreadyExists) { _ = try await self.create("clone", mib: 96, block: false) }
        let snapshots = try await store.listSnapshots(afterID: nil, limit: 0)
        XCTAssertTrue(snapshots.isEmpty, "one machine: the clone's base snapshot is gone once the clone is a copy")
    }

    func testExpansionGrowsNeverShrinksAndIsIdempotent() async throws {
        let v = try await create("grow")
        await assertStatus(.invalidArgument) { _ = try await self.controller.controllerExpandVolume(.with { $0.volumeID = v.volumeID }) }
        await assertStatus(.notFound) {
            _ = try await self.controller.controllerExpandVolume(.with { $0.volumeID = "vol-nope"; $0.capacityRange.requiredBytes = 1 })
        }
        let grown = try await controller.controllerExpandVolume(.with { $0.volumeID = v.volumeID; $0.capacityRange.requiredBytes = 100 << 20 })
        XCTAssertEqual(grown.capacityBytes, 100 << 20)
        XCTAssertTrue(grown.nodeExpansionRequired)
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: file(v.volumeID))[.size] as? Int64, 100 << 20)
        let same = try await controller.controllerExpandVolume(.with { $0.volumeID = v.volumeID; $0.capacityRange.requiredBytes = 80 << 20 })
        XCTAssertEqual(same.capacityBytes, 100 << 20, "a smaller request leaves the volume as it is")
        await assertStatus(.outOfRange) {
            _ = try await self.controller.controllerExpandVolume(.with {
                $0.volumeID = v.volumeID; $0.capacityRange.requiredBytes = 70 << 20; $0.capacityRange.limitBytes = 70 << 20
            })
        }
        let provisioned = try await store.provisionedBytes()
        XCTAssertEqual(provisioned, 100 << 20, "the store's capacity accounting follows the growth")
        _ = try await create("filler", mib: 800)
        await assertStatus(.resourceExhausted) {
            _ = try await self.controller.controllerExpandVolume(.with { $0.volumeID = v.volumeID; $0.capacityRange.requiredBytes = 300 << 20 })
        }
        let unchanged = try await store.volume(id: v.volumeID)
        XCTAssertEqual(unchanged?.capacityBytes, 100 << 20, "a refused growth changes nothing")
    }

    func testModifyVolumeNeedsTheReplicatedDataPathAndValidatesItsKeys() async throws {
        let v = try await create("qos")
        await assertStatus(.unimplemented) {
            _ = try await self.controller.controllerModifyVolume(.with { $0.volumeID = v.volumeID; $0.mutableParameters = ["iopsLimit": "500"] })
        }
        XCTAssertEqual(try QoSLimits(["iopsLimit": "500", "bandwidthLimit": "100Mi"]).bytesPerSecond, 100 << 20)
        XCTAssertEqual(try QoSLimits(["bandwidthLimit": "20M"]).stored, ["bandwidthLimit": "20000000"])
        XCTAssertThrowsError(try QoSLimits(["XXX_FakeKey": "1"]))
        XCTAssertThrowsError(try QoSLimits(["iopsLimit": "-3"]))
        XCTAssertThrowsError(try QoSLimits(["bandwidthLimit": "99999999999Gi"]))
        let caps = try await controller.controllerGetCapabilities(.init()).capabilities.map(\.rpc.type)
        XCTAssertFalse(caps.contains(.modifyVolume), "one machine must not advertise what it cannot enforce")
        XCTAssertTrue(caps.contains(.createDeleteSnapshot) && caps.contains(.cloneVolume) && caps.contains(.expandVolume))
    }
}
