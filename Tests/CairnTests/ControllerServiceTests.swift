import CSIProto
import CairnCSI
import CairnController
import CairnCore
import CairnLocal
import CairnStore
import Foundation
import Logging
import XCTest

/// Controller semantics against the real embedded store and file backing in a temp directory.
final class ControllerServiceTests: XCTestCase {
    var dir = ""
    var store: SQLiteStore!
    var controller: ControllerService!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-ctl-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        try await store.registerNode(NodeRecord(id: "node-a", topology: ["topology.cairn.dev/node": "node-a"], maxVolumes: 0))
        try await store.registerNode(NodeRecord(id: "node-b", topology: ["topology.cairn.dev/node": "node-b"], maxVolumes: 0))
        controller = ControllerService(
            store: store, backing: try LocalFileBacking(dataDir: dir), capacity: CapacityPolicy(poolBytes: 1 << 30),
            localNodeID: "node-a", localTopology: ["topology.cairn.dev/node": "node-a"], locks: VolumeLocks(),
            logger: Logger(label: "test"))
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    static func capability(_ mode: AccessMode = .singleNodeWriter, block: Bool = false, fs: String = "") -> Csi_V1_VolumeCapability {
        var c = Csi_V1_VolumeCapability()
        c.accessMode.mode = mode
        if block { c.block = .init() } else { c.mount = .with { $0.fsType = fs } }
        return c
    }

    func create(_ name: String, required: Int64 = 64 << 20, limit: Int64 = 0, parameters: [String: String] = [:],
                mode: AccessMode = .singleNodeWriter) async throws -> Csi_V1_Volume {
        var r = Csi_V1_CreateVolumeRequest()
        r.name = name
        r.capacityRange = .with { $0.requiredBytes = required; $0.limitBytes = limit }
        r.volumeCapabilities = [Self.capability(mode)]
        r.parameters = parameters
        return try await controller.createVolume(r).volume
    }


    func testCreateVolumeIsIdempotentByNameAndRejectsIncompatibleRepeats() async throws {
        let a = try await create("pvc-1")
        let b = try await create("pvc-1")
        XCTAssertEqual(a.volumeID, b.volumeID)
        XCTAssertEqual(a.capacityBytes, 64 << 20)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/volumes/\(a.volumeID).img"))
        await assertStatus(.alreadyExists) { try await self.create("pvc-1", required: 128 << 20, limit: 128 << 20) }
        await assertStatus(.alreadyExists) { try await self.create("pvc-1", parameters: ["fsType": "xfs"]) }
        let volumes = try await store.listVolumes(afterID: nil, limit: 0)
        XCTAssertEqual(volumes.count, 1)
    }

    func testCapacityRangesRoundToWholeMiBAndRespectLimits() async throws {
        let exact = try await create("exact", required: 64 << 20, limit: 64 << 20)
        XCTAssertEqual(exact.capacityBytes, 64 << 20)
        let rounded = try await create("rounded", required: (10 << 20) + 1)
        XCTAssertEqual(rounded.capacityBytes, 16 << 20, "below the 16 MiB floor → floor")
        let odd = try await create("odd", required: (20 << 20) + 1)
        XCTAssertEqual(odd.capacityBytes, 21 << 20)
        await assertStatus(.outOfRange) { try await self.create("tiny", required: 0, limit: 1 << 20) }
        await assertStatus(.invalidArgument) { try await self.create("inverted", required: 2 << 30, limit: 1 << 30) }
        await assertStatus(.outOfRange) { try await self.create("huge", required: 2 << 30) }
        await assertStatus(.outOfRange) { try await self.create("xfs-small", required: 64 << 20, limit: 100 << 20, parameters: ["fsType": "xfs"]) }
        let xfs = try await create("xfs", required: 64 << 20, parameters: ["fsType": "xfs"])
        XCTAssertEqual(xfs.capacityBytes, 300 << 20)
    }

    func testPoolExhaustionIsResourceExhaustedAndLeavesNothingBehind() async throws {
        _ = try await create("big", required: 900 << 20)
        await assertStatus(.resourceExhausted) { try await self.create("more", required: 200 << 20) }
        let files = try FileManager.default.contentsOfDirectory(atPath: dir + "/volumes")
        XCTAssertEqual(files.count, 1)
    }

    func testEveryParameterIsValidated() async throws {
        await assertStatus(.invalidArgument) { try await self.create("p1", parameters: ["fstype": "ext4"]) }
        await assertStatus(.invalidArgument) { try await self.create("p2", parameters: ["fsType": "btrfs"]) }
        await assertStatus(.invalidArgument) { try await self.create("p3", parameters: ["replicas": "0"]) }
        await assertStatus(.invalidArgument) { try await self.create("p4", parameters: ["replicas": "three"]) }
        await assertStatus(.resourceExhausted) { try await self.create("p5", parameters: ["replicas": "3"]) }
        _ = try await create("p6", parameters: ["csi.storage.k8s.io/pvc/name": "data", "replicas": "1"])
        await assertStatus(.invalidArgument) { try await self.create("p8", parameters: ["minInSync": "0"]) }
        await assertStatus(.invalidArgument) { try await self.create("p9", parameters: ["minInSync": "two"]) }
        // One machine keeps one copy: minInSync 2 could never be met.
        await assertStatus(.invalidArgument) { try await self.create("p10", parameters: ["minInSync": "2"]) }
        // encrypted: only true or false.
        await assertStatus(.invalidArgument) { try await self.create("p11", parameters: ["encrypted": "yes"]) }
        // writeThrough: only true or false, and stored as given.
        await assertStatus(.invalidArgument) { try await self.create("p12", parameters: ["writeThrough": "on"]) }
        let p13 = try await create("p13", parameters: ["writeThrough": "false"])
        let stored = try await store.volume(id: p13.volumeID)
        XCTAssertEqual(stored?.parameters["writeThrough"], "false")
        XCTAssertEqual(stored?.writeThrough, false)
        await assertStatus(.invalidArgument) { try await self.create("p7", mode: .multiNodeMultiWriter) }
        await assertStatus(.invalidArgument) { try await self.create("") }
        await assertStatus(.invalidArgument) { try await self.create(String(repeating: "n", count: 10 * 1024)) }
        let count = try await store.listVolumes(afterID: nil, limit: 0).count
        XCTAssertEqual(count, 2)
    }

    func testPublishRaisesTheEpochAndFencesSingleNodeVolumes() async throws {
        let v = try await create("pub")
        var p = Csi_V1_ControllerPublishVolumeRequest()
        p.volumeID = v.volumeID
        p.nodeID = "node-a"
        p.volumeCapability = Self.capability()
        let first = try await controller.controllerPublishVolume(p)
        XCTAssertEqual(first.publishContext["cairn.dev/epoch"], "1")
        let again = try await controller.controllerPublishVolume(p)
        XCTAssertEqual(again.publishContext["cairn.dev/epoch"], "1", "an identical publish is idempotent and keeps the epoch")

        var readonly = p
        readonly.readonly = true
        await assertStatus(.alreadyExists) { try await self.controller.controllerPublishVolume(readonly) }
        var elsewhere = p
        elsewhere.nodeID = "node-b"
        await assertStatus(.failedPrecondition) { try await self.controller.controllerPublishVolume(elsewhere) }
        var unknownNode = p
        unknownNode.nodeID = "fake-node-id-1c0e77aa-f"
        await assertStatus(.notFound) { try await self.controller.controllerPublishVolume(unknownNode) }
        var unknownVolume = p
        unknownVolume.volumeID = "fake-vol-id-3f2a9c1b-7"
        await assertStatus(.notFound) { try await self.controller.controllerPublishVolume(unknownVolume) }

        await assertStatus(.failedPrecondition) {
            try await self.controller.deleteVolume(.with { $0.volumeID = v.volumeID })
        }
        _ = try await controller.controllerUnpublishVolume(.with { $0.volumeID = v.volumeID; $0.nodeID = "node-a" })
        _ = try await controller.controllerUnpublishVolume(.with { $0.volumeID = v.volumeID; $0.nodeID = "node-a" })
        let moved = try await controller.controllerPublishVolume(elsewhere)
        XCTAssertEqual(moved.publishContext["cairn.dev/epoch"], "2", "a new attachment gets a higher epoch")
    }

    func testAttachLimitPerNodeIsEnforced() async throws {
        try await store.registerNode(NodeRecord(id: "small", topology: [:], maxVolumes: 2))
        var ids: [String] = []
        for i in 0..<3 { ids.append(try await create("lim-\(i)").volumeID) }
        func publish(_ id: String) async throws {
            _ = try await controller.controllerPublishVolume(.with {
                $0.volumeID = id; $0.nodeID = "small"; $0.volumeCapability = Self.capability()
            })
        }
        try await publish(ids[0])
        try await publish(ids[1])
        try await publish(ids[1])  // idempotent repeat does not count twice
        await assertStatus(.resourceExhausted) { try await publish(ids[2]) }
        _ = try await controller.controllerUnpublishVolume(.with { $0.volumeID = ids[0]; $0.nodeID = "small" })
        try await publish(ids[2])
    }

    func testReaderOnlyVolumesMayBePublishedToManyNodes() async throws {
        let v = try await create("ro", mode: .multiNodeReaderOnly)
        for node in ["node-a", "node-b"] {
            var p = Csi_V1_ControllerPublishVolumeRequest()
            p.volumeID = v.volumeID
            p.nodeID = node
            p.readonly = true
            p.volumeCapability = Self.capability(.multiNodeReaderOnly)
            _ = try await controller.controllerPublishVolume(p)
        }
        let got = try await controller.controllerGetVolume(.with { $0.volumeID = v.volumeID })
        XCTAssertEqual(got.status.publishedNodeIds, ["node-a", "node-b"])
    }

    func testDeleteIsIdempotentAndRefusesMalformedIDs() async throws {
        let v = try await create("del")
        _ = try await controller.deleteVolume(.with { $0.volumeID = v.volumeID })
        _ = try await controller.deleteVolume(.with { $0.volumeID = v.volumeID })
        _ = try await controller.deleteVolume(.with { $0.volumeID = "fake-vol-id" })
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/volumes/\(v.volumeID).img"))
        await assertStatus(.invalidArgument) { try await self.controller.deleteVolume(.with { $0.volumeID = "../../etc" }) }
        await assertStatus(.invalidArgument) { try await self.controller.deleteVolume(.init()) }
        // The name is free again.
        let again = try await create("del")
        XCTAssertNotEqual(again.volumeID, v.volumeID)
    }

    func testListVolumesPagesWithStableTokens() async throws {
        var ids: [String] = []
        for i in 0..<5 { ids.append(try await create("list-\(i)").volumeID) }
        ids.sort()
        let page1 = try await controller.listVolumes(.with { $0.maxEntries = 2 })
        XCTAssertEqual(page1.entries.map(\.volume.volumeID), Array(ids[0..<2]))
        XCTAssertFalse(page1.nextToken.isEmpty)
        // Deleting the last volume of a page does not invalidate its token.
        _ = try await controller.deleteVolume(.with { $0.volumeID = ids[1] })
        let page2 = try await controller.listVolumes(.with { $0.maxEntries = 2; $0.startingToken = page1.nextToken })
        XCTAssertEqual(page2.entries.map(\.volume.volumeID), Array(ids[2..<4]))
        let page3 = try await controller.listVolumes(.with { $0.maxEntries = 2; $0.startingToken = page2.nextToken })
        XCTAssertEqual(page3.entries.map(\.volume.volumeID), [ids[4]])
        XCTAssertTrue(page3.nextToken.isEmpty)
        let all = try await controller.listVolumes(.init())
        XCTAssertEqual(all.entries.count, 4)
        XCTAssertTrue(all.entries.allSatisfy { $0.status.hasVolumeCondition && !$0.status.volumeCondition.abnormal })
        await assertStatus(.aborted) { try await self.controller.listVolumes(.with { $0.startingToken = "invalid-token" }) }
        await assertStatus(.invalidArgument) { try await self.controller.listVolumes(.with { $0.maxEntries = -1 }) }
    }

    func testVolumeConditionReportsAMissingBackingFile() async throws {
        let v = try await create("cond")
        try FileManager.default.removeItem(atPath: dir + "/volumes/\(v.volumeID).img")
        let got = try await controller.controllerGetVolume(.with { $0.volumeID = v.volumeID })
        XCTAssertTrue(got.status.volumeCondition.abnormal)
        XCTAssertTrue(got.status.volumeCondition.message.contains("missing"), got.status.volumeCondition.message)
    }

    func testValidateVolumeCapabilities() async throws {
        let v = try await create("val", parameters: ["fsType": "ext4"])
        var r = Csi_V1_ValidateVolumeCapabilitiesRequest()
        r.volumeID = v.volumeID
        r.volumeCapabilities = [Self.capability()]
        let confirmed = try await controller.validateVolumeCapabilities(r)
        XCTAssertTrue(confirmed.hasConfirmed)
        r.volumeCapabilities = [Self.capability(.multiNodeMultiWriter)]
        let refused = try await controller.validateVolumeCapabilities(r)
        XCTAssertFalse(refused.hasConfirmed)
        XCTAssertFalse(refused.message.isEmpty)
        r.volumeCapabilities = [Self.capability(fs: "xfs")]
        let otherFS = try await controller.validateVolumeCapabilities(r)
        XCTAssertFalse(otherFS.hasConfirmed)
        r.volumeCapabilities = []
        await assertStatus(.invalidArgument) { try await self.controller.validateVolumeCapabilities(r) }
        r.volumeCapabilities = [Self.capability()]
        r.volumeID = "fake-vol-id-3f2a9c1b-7"
        await assertStatus(.notFound) { try await self.controller.validateVolumeCapabilities(r) }
    }

    func testGetCapacityHonoursTopologyAndCapabilities() async throws {
        _ = try await create("cap", required: 100 << 20)
        let all = try await controller.getCapacity(.init())
        XCTAssertEqual(all.availableCapacity, (1 << 30) - (100 << 20))
        XCTAssertEqual(all.minimumVolumeSize.value, 16 << 20)
        let elsewhere = try await controller.getCapacity(.with {
            $0.accessibleTopology = .with { $0.segments = ["topology.cairn.dev/node": "node-z"] }
        })
        XCTAssertEqual(elsewhere.availableCapacity, 0)
        let unsupported = try await controller.getCapacity(.with { $0.volumeCapabilities = [Self.capability(.multiNodeMultiWriter)] })
        XCTAssertEqual(unsupported.availableCapacity, 0)
        await assertStatus(.invalidArgument) { try await self.controller.getCapacity(.with { $0.parameters = ["bogus": "1"] }) }
    }

    func testStateSurvivesReopeningTheStore() async throws {
        let v = try await create("persist")
        _ = try await controller.controllerPublishVolume(.with {
            $0.volumeID = v.volumeID; $0.nodeID = "node-a"; $0.volumeCapability = Self.capability()
        })
        store = nil
        let reopened = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        let record = try await reopened.volume(named: "persist")
        XCTAssertEqual(record?.id, v.volumeID)
        XCTAssertEqual(record?.epoch, 1)
        let attachments = try await reopened.attachments(volumeID: v.volumeID)
        XCTAssertEqual(attachments.map(\.nodeID), ["node-a"])
    }
}
