@testable import CairnController
import CairnCore
import XCTest

final class PlacementTests: XCTestCase {
    let gib: Int64 = 1 << 30

    func node(_ id: String, zone: String? = nil, rack: String? = nil, capacity: Int64 = 10 << 30,
              provisioned: Int64 = 0, address: String? = "10.0.0.1:7410") -> PlacementCandidate {
        var topology = ["topology.cairn.dev/node": id]
        if let zone { topology["topology.cairn.dev/zone"] = zone }
        if let rack { topology["topology.cairn.dev/rack"] = rack }
        return PlacementCandidate(nodeID: id, address: address, topology: topology, capacityBytes: capacity,
                                  provisionedBytes: provisioned)
    }

    func testReplicasGoToDistinctNodesAcrossZonesBeforeFillingOne() throws {
        // Zone a has the three emptiest nodes; the spread rule still takes one from each zone.
        let nodes = [node("a1", zone: "a"), node("a2", zone: "a"), node("a3", zone: "a"),
                     node("b1", zone: "b", provisioned: 5 * gib), node("c1", zone: "c", provisioned: 6 * gib)]
        let chosen = try Placement.choose(count: 3, size: gib, candidates: nodes)
        XCTAssertEqual(Set(chosen.map(\.nodeID)).count, 3)
        XCTAssertEqual(Set(chosen.map { $0.topology["topology.cairn.dev/zone"]! }), ["a", "b", "c"])
    }

    func testRacksSpreadInsideOneZone() throws {
        let nodes = [node("n1", zone: "a", rack: "r1"), node("n2", zone: "a", rack: "r1"),
                     node("n3", zone: "a", rack: "r2", provisioned: gib)]
        let chosen = try Placement.choose(count: 2, size: gib, candidates: nodes)
        XCTAssertEqual(Set(chosen.map { $0.topology["topology.cairn.dev/rack"]! }), ["r1", "r2"])
    }

    func testMostFreeSpaceWinsAmongEquals() throws {
        let nodes = [node("n1", provisioned: 3 * gib), node("n2"), node("n3", provisioned: 1 * gib)]
        XCTAssertEqual(try Placement.choose(count: 2, size: gib, candidates: nodes).map(\.nodeID), ["n2", "n3"])
    }

    func testNotEnoughRoomIsResourceExhaustedWithEveryNodesReason() {
        let nodes = [node("n1", capacity: 2 * gib), node("n2", capacity: 2 * gib, provisioned: 2 * gib),
                     node("n3", address: nil)]
        XCTAssertThrowsError(try Placement.choose(count: 2, size: gib, candidates: nodes)) { error in
            let status = RPCStatus.from(error)
            XCTAssertEqual(status.code, .resourceExhausted)
            XCTAssertTrue(status.message.contains("1 of 3 live nodes"), status.message)
            XCTAssertTrue(status.message.contains("n2: 0 bytes free"), status.message)
            XCTAssertTrue(status.message.contains("n3: serves no replica data"), status.message)
        }
    }

    func testNoNodesSaysToStartAgents() {
        XCTAssertThrowsError(try Placement.choose(count: 1, size: gib, candidates: [])) { error in
            XCTAssertTrue(RPCStatus.from(error).message.contains("start the node agents"))
        }
    }

    func testPreferredNodesGetAReplicaFirstWhenTheyHaveRoom() throws {
        let nodes = [node("n1", zone: "a"), node("n2", zone: "b"), node("n3", zone: "a", capacity: gib / 2)]
        XCTAssertEqual(try Placement.choose(count: 1, size: gib, candidates: nodes, preferred: ["n2"]).map(\.nodeID), ["n2"])
        // A preferred node without room is passed over; the spread rule places the rest.
        let chosen = try Placement.choose(count: 2, size: gib, candidates: nodes, preferred: ["n3", "n1", "n9"])
        XCTAssertEqual(chosen.map(\.nodeID), ["n1", "n2"])
    }

    func testNeverTheSameNodeTwice() throws {
        let nodes = (1...5).map { node("n\($0)") }
        for count in 1...5 {
            let chosen = try Placement.choose(count: count, size: gib, candidates: nodes)
            XCTAssertEqual(Set(chosen.map(\.nodeID)).count, count)
        }
        XCTAssertThrowsError(try Placement.choose(count: 6, size: gib, candidates: nodes))
    }
}
