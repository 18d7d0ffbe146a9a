import CairnCore
import Foundation
import XCTest

/// Fails when proto/*.proto changed without regenerating Sources/CSIProto, or when generated
/// code was edited by hand: the stamp written by scripts/generate-protos.sh must match.
final class GeneratedCodeTests: XCTestCase {
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path

    func testGeneratedProtobufCodeMatchesItsStamp() throws {
        let stampPath = Self.repoRoot + "/Sources/CSIProto/GENERATED.sha256"
        let stamp = try String(contentsOfFile: stampPath, encoding: .utf8)
        var stamped: [String: String] = [:]
        for line in stamp.split(separator: "\n") where !line.hasPrefix("#") && !line.isEmpty {
            let parts = line.components(separatedBy: "  ")
            XCTAssertEqual(parts.count, 2, "malformed stamp line: \(line)")
            stamped[parts[1]] = parts[0]
        }
        let fm = FileManager.default
        let protos = try fm.contentsOfDirectory(atPath: Self.repoRoot + "/proto").filter { $0.hasSuffix(".proto") }.map { "proto/\($0)" }
        let generated = try fm.contentsOfDirectory(atPath: Self.repoRoot + "/Sources/CSIProto").filter { $0.hasSuffix(".pb.swift") }.map { "Sources/CSIProto/\($0)" }
        XCTAssertFalse(protos.isEmpty)
        XCTAssertFalse(generated.isEmpty)
        for path in protos + generated {
            guard let expected = stamped[path] else {
                XCTFail("\(path) is not covered by the stamp: run scripts/generate-protos.sh")
                continue
            }
            let result = try Command.runBlocking(["sha256sum", Self.repoRoot + "/" + path])
            let actual = result.stdout.split(separator: " ").first.map(String.init) ?? ""
            XCTAssertEqual(actual, expected,
                           "\(path) does not match its stamp: generated code is out of date with proto/ (or was edited by hand); run scripts/generate-protos.sh")
        }
    }
}
