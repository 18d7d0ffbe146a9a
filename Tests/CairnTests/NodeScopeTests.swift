@testable import CairnController
import CSIProto
import CairnCore
import CairnStore
import Foundation
import Logging
import XCTest

/// `--list-scope node`: controllers run one per node (Mesos's per-agent storage resource
/// provider) against one store, each answering ListVolumes and GetCapacity for its own node.
final class NodeScopeTests: XCTestCase {
    var dir = ""
    var store: SQLiteStore!
    let logger = Logger(label: "test")
    static let gib: Int64 = 1 << 30

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-scope-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        // n1 is the small one: a pool with a replica on n1 is limited by n1.
        for (i, size) in [4, 10, 10, 10].enumerated() {
            try await store.registerNode(NodeRecord(id: "n\(i + 1)", topology: [:], maxVolumes: 0,
                                                    dataAddress: "10.0.0.\(i + 1):7410", capacityBytes: Int64(size) * Self.gib))
        }
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func controller(on node: String, scoped: Bool) -> ControllerService {
        ControllerService(store: store, backing: ReplicaRepairerTests.RecordingBacking(), capacity: CapacityPolicy(poolBytes: 1 << 40),
                          localNodeID: node, localTopology: [:], locks: VolumeLocks(), logger: logger,
                          cluster: ClusterConfig(defaultReplicas: 3, scopedToNode: scoped))
    }

    func create(_ name: String, on controller: ControllerService, gib: Int64 = 1) async throws -> Csi_V1_Volume {
        try await controller.createVolume(.with {
            $0.name = name
            $0.capacityRange = .with { $0.requiredBytes = gib * Self.gib; $0.limitBytes = gib * Self.gib }
            $0.volumeCapabilities = [.with { $0.mount = .init(); $0.accessMode = .with { $0.mode = .singleNodeWriter } }]
            $0.parameters = ["replicas": "2"]
        }).volume
    }

    func testEachScopedControllerListsOnlyTheVolumesCreatedThroughItWithAReplicaOnItsNode() async throws {
        let (one, two) = (controller(on: "n1", scoped: true), controller(on: "n2", scoped: true))
        let a = try await create("a", on: one)
        let b = try await create("b", on: two)
        let c = try await create("c", on: one)

        let listedByOne = try await one.listVolumes(.init()).entries.map(\.volume.volumeID)
        let listedByTwo = try await two.listVolumes(.init()).entries.map(\.volume.volumeID)
        XCTAssertEqual(Set(listedByOne), [a.volumeID, c.volumeID])
        XCTAssertEqual(listedByTwo, [b.volumeID])
        let everything = try await controller(on: "n3", scoped: false).listVolumes(.init()).entries.map(\.volume.volumeID)
        XCTAssertEqual(Set(everything), [a.volumeID, b.volumeID, c.volumeID], "unscoped, a controller lists the whole cluster")
        let listedByThree = try await controller(on: "n3", scoped: true).listVolumes(.init()).entries
        XCTAssertEqual(listedByThree, [], "a scoped controller through which nothing was created lists nothing")

        for (volume, node) in [(a, "n1"), (b, "n2"), (c, "n1")] {
            let record = try await store.volume(id: volume.volumeID)
            XCTAssertEqual(record?.createdByNode, node)
            XCTAssert(record?.replicas?.contains { $0.nodeID == node } ?? false,
                      "\(volume.volumeID) must have a replica on \(node), whose agent offers it: \(record?.replicas?.map(\.nodeID) ?? [])")
        }

        // Paging stays consistent within the scope.
        let first = try await one.listVolumes(.with { $0.maxEntries = 1 })
        XCTAssertEqual(first.entries.count, 1)
        XCTAssertFalse(first.nextToken.isEmpty)
        let second = try await one.listVolumes(.with { $0.maxEntries = 1; $0.startingToken = first.nextToken })
        XCTAssertEqual(Set((first.entries + second.entries).map(\.volume.volumeID)), [a.volumeID, c.volumeID])
        XCTAssertEqual(second.nextToken, "")
    }

    func testScopedCapacityIsTheLargestVolumeThatFitsWithAReplicaOnThisNode() async throws {
        func capacity(_ c: ControllerService, replicas: Int) async throws -> Int64 {
            try await c.getCapacity(.with { $0.parameters = ["replicas": "\(replicas)"] }).availableCapacity
        }
        let one = controller(on: "n1", scoped: true)
        let two = controller(on: "n2", scoped: true)
        let unscoped = controller(on: "n1", scoped: false)
        var got: Int64
        got = try await capacity(one, replicas: 3)
        XCTAssertEqual(got, 4 * Self.gib, "n1 holds 4 GiB: a replica there limits the volume")
        got = try await capacity(unscoped, replicas: 3)
        XCTAssertEqual(got, 10 * Self.gib, "unscoped, the three 10 GiB nodes decide")
        got = try await capacity(two, replicas: 3)
        XCTAssertEqual(got, 10 * Self.gib)
        got = try await capacity(two, replicas: 4)
        XCTAssertEqual(got, 4 * Self.gib)
        got = try await capacity(two, replicas: 5)
        XCTAssertEqual(got, 0, "five replicas need five nodes")
        got = try await capacity(controller(on: "ctl", scoped: true), replicas: 1)
        XCTAssertEqual(got, 0,
                                      "a controller whose node holds no replicas offers no pool")
        _ = try await create("big", on: two, gib: 3)
        got = try await capacity(two, replicas: 1)
        XCTAssertEqual(got, 7 * Self.gib, "n2's own replica of big takes 3 GiB of its 10")
    }
}
