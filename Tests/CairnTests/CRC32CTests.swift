import CCRC32C
import CairnReplica
import XCTest

final class CRC32CTests: XCTestCase {
    func testKnownVectors() {
        // RFC 3720 (iSCSI) B.4 test vectors and the common "123456789" check value.
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(CRC32C.checksum([]), 0)
    }

    func testChainingEqualsOneShot() {
        let bytes = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        for split in [0, 1, 7, 8, 9, 4096, 9_999] {
            let first = CRC32C.checksum(Array(bytes[..<split]))
            XCTAssertEqual(CRC32C.checksum(Array(bytes[split...]), continuing: first), CRC32C.checksum(bytes), "split at \(split)")
        }
    }

    func testTheTableAndTheInstructionAgree() {
        var generator = SystemRandomNumberGenerator()
        // Around the three-stream rounds of the instruction path (3 x 1360 bytes), at odd starts.
        for length in [0, 1, 7, 8, 9, 63, 4079, 4080, 4081, 4096, 4099, 8160, 8161, 12_345, 65_537, 1 << 20] {
            let bytes = (0..<(length + 3)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            for start in [0, 3] {
                let slice = Array(bytes[start..<(start + length)])
                let software = slice.withUnsafeBytes { cairn_crc32c_software(0x1234_5678, $0.baseAddress, $0.count) }
                XCTAssertEqual(CRC32C.checksum(slice, continuing: 0x1234_5678), software, "length \(length), start \(start)")
                let unaligned = bytes.withUnsafeBytes { cairn_crc32c(0x1234_5678, $0.baseAddress! + start, length) }
                XCTAssertEqual(unaligned, software, "length \(length) from byte \(start) of a buffer")
            }
        }
        // A block of zeros and of ones: the combining tables against a known answer.
        let zeros = [UInt8](repeating: 0, count: 4096), ones = [UInt8](repeating: 0xFF, count: 4096)
        XCTAssertEqual(CRC32C.checksum(zeros), zeros.withUnsafeBytes { cairn_crc32c_software(0, $0.baseAddress, $0.count) })
        XCTAssertEqual(CRC32C.checksum(ones), ones.withUnsafeBytes { cairn_crc32c_software(0, $0.baseAddress, $0.count) })
        XCTAssertEqual(Array("123456789".utf8).withUnsafeBytes { cairn_crc32c_software(0, $0.baseAddress, $0.count) }, 0xE306_9283)
    }
}
