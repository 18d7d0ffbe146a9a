import CairnCore
import Foundation
import XCTest

/// `FencingEpoch` replaced an `Int64` in the records: the stores' JSON must not change.
final class FencingEpochTests: XCTestCase {
    private struct Old: Codable { var epoch: Int64 }
    private struct New: Codable { var epoch: FencingEpoch }

    func testARecordWrittenWithAnInt64EpochDecodesAndEncodesToTheSameBytes() throws {
        let old = try JSONEncoder().encode(Old(epoch: 41))
        XCTAssertEqual(try JSONDecoder().decode(New.self, from: old).epoch, 41)
        XCTAssertEqual(try JSONEncoder().encode(New(epoch: 41)), old)
        XCTAssertEqual(try JSONDecoder().decode(Old.self, from: JSONEncoder().encode(New(epoch: 7))).epoch, 7)
    }

    func testAVolumeRecordKeepsItsEpochThroughJSON() throws {
        let record = VolumeRecord(id: "v", name: "v", capacityBytes: 4096, parameters: [:], fsType: "", accessModes: [7],
                                  accessibleTopology: [:], epoch: 12)
        let json = try JSONEncoder().encode(record)
        XCTAssertTrue(String(decoding: json, as: UTF8.self).contains("\"epoch\":12"))
        XCTAssertEqual(try JSONDecoder().decode(VolumeRecord.self, from: json).epoch, 12)
    }

    func testTheNextEpochFencesTheCurrentOne() {
        let epoch: FencingEpoch = 3
        XCTAssertEqual(epoch.next, 4)
        XCTAssertLessThan(epoch, epoch.next)
        XCTAssertEqual(FencingEpoch.zero.rawValue, 0)
        XCTAssertEqual("\(epoch)", "3")
    }
}
