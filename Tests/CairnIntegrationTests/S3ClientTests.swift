import CairnBackup
import CairnCore
import Foundation
import XCTest

/// The S3 client against a real S3-compatible server (moto, SigV4 verified).
final class S3ClientTests: XCTestCase {
    func testPutGetListDeleteAndMultipartAgainstARealServer() async throws {
        let server = try await S3TestServer.start()
        defer { server.stop() }
        let client = try await server.client()

        try await client.put("a/one", Array("hello".utf8))
        let one = try await client.get("a/one")
        XCTAssertEqual(one, Array("hello".utf8))
        let missing = try await client.get("a/none")
        XCTAssertNil(missing)

        // Above the part size: three parts through CreateMultipartUpload/UploadPart/Complete.
        let big = (0..<(17 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 2_654_435_761 >> 13) }
        try await client.put("a/big", big)
        let bigBack = try await client.get("a/big")
        XCTAssertEqual(bigBack, big)

        let listed = try await client.list("a/").sorted { $0.key < $1.key }
        XCTAssertEqual(listed.map(\.key), ["a/big", "a/one"])
        XCTAssertEqual(listed.map(\.size), [Int64(big.count), 5])
        XCTAssertGreaterThanOrEqual(client.counters.puts, 4)

        try await client.delete("a/one")
        let afterDelete = try await client.exists("a/one")
        XCTAssertFalse(afterDelete)
    }

    func testAnUnreachableServerIsUnavailableAndSaysWhere() async throws {
        let port = try S3TestServer.freePort()
        let client = S3Client(S3Location(endpoint: "http://127.0.0.1:\(port)", bucket: "b", accessKeyID: "a", secretAccessKey: "s"))
        do {
            _ = try await client.get("x")
            XCTFail("a request to a closed port was answered")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .unavailable)
            XCTAssertTrue(error.message.contains("127.0.0.1:\(port)") && error.message.contains("Couldn't connect"), error.message)
        }
    }

    func testAWrongSecretKeyIsRefused() async throws {
        let server = try await S3TestServer.start()
        defer { server.stop() }
        let good = try await server.client(bucket: "signed")
        try await good.put("x", [1, 2, 3])
        let bad = S3Client(server.location(bucket: "signed", secret: server.secretAccessKey + "x"))
        do {
            _ = try await bad.get("x")
            XCTFail("a request signed with the wrong secret was answered")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .failedPrecondition)
            XCTAssertTrue(error.message.contains("SignatureDoesNotMatch"), error.message)
        }
        do {
            try await bad.put("y", [1])
            XCTFail("a write signed with the wrong secret was accepted")
        } catch is CairnError {}
        let y = try await good.exists("y")
        XCTAssertFalse(y)
    }
}
