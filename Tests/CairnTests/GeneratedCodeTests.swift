import CairnCore
import CairnProcess
import Foundation
import XCTest

/// Fails when a proto/*.proto changed without regenerating its target (Sources/CSIProto,
/// Sources/CairnProto…), or when generated code was edited by hand: every stamp written by
/// scripts/generate-protos.sh (Sources/*/GENERATED.sha256) must match, and every proto and every
/// generated file must be covered by one.
final class GeneratedCodeTests: XCTestCase {
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().path
    static let stampName = "GENERATED.sha256"

    /// Targets that hold generated code: those with a stamp.
    static func generatedTargets() throws -> [String] {
        let fm = FileManager.default
        return try fm.contentsOfDirectory(atPath: repoRoot + "/Sources").sorted()
            .filter { fm.fileExists(atPath: "\(repoRoot)/Sources/\($0)/\(stampName)") }
    }

    /// "<repo-relative path>" → sha256, from one stamp.
    static func readStamp(target: String) throws -> [String: String] {
        let stamp = try String(contentsOfFile: "\(repoRoot)/Sources/\(target)/\(stampName)", encoding: .utf8)
        var stamped: [String: String] = [:]
        for line in stamp.split(separator: "\n") where !line.hasPrefix("#") && !line.isEmpty {
            let parts = line.components(separatedBy: "  ")
            XCTAssertEqual(parts.count, 2, "malformed line in Sources/\(target)/\(stampName): \(line)")
            if parts.count == 2 { stamped[parts[1]] = parts[0] }
        }
        return stamped
    }

    func testEveryGeneratedTargetHasAStamp() throws {
        let targets = try Self.generatedTargets()
        for expected in ["CSIProto", "CairnProto", "EtcdProto"] {
            XCTAssert(targets.contains(expected), "Sources/\(expected)/\(Self.stampName) is missing: run scripts/generate-protos.sh")
        }
    }

    func testGeneratedProtobufCodeMatchesItsStamp() throws {
        let fm = FileManager.default
        var coveredProtos = Set<String>()
        for target in try Self.generatedTargets() {
            let stamped = try Self.readStamp(target: target)
            let generated = try fm.contentsOfDirectory(atPath: "\(Self.repoRoot)/Sources/\(target)")
                .filter { $0.hasSuffix(".pb.swift") }.map { "Sources/\(target)/\($0)" }
            XCTAssertFalse(generated.isEmpty, "Sources/\(target) has a stamp but no generated code")
            let protos = stamped.keys.filter { $0.hasPrefix("proto/") }
            XCTAssertFalse(protos.isEmpty, "Sources/\(target)/\(Self.stampName) names no proto file")
            coveredProtos.formUnion(protos)
            for path in generated where stamped[path] == nil {
                XCTFail("\(path) is not covered by its stamp: run scripts/generate-protos.sh")
            }
            for (path, expected) in stamped.sorted(by: { $0.key < $1.key }) {
                guard fm.fileExists(atPath: Self.repoRoot + "/" + path) else {
                    XCTFail("\(path), listed in Sources/\(target)/\(Self.stampName), is missing: run scripts/generate-protos.sh")
                    continue
                }
                let result = try Command.runBlocking(["sha256sum", Self.repoRoot + "/" + path])
                let actual = result.stdout.split(separator: " ").first.map(String.init) ?? ""
                XCTAssertEqual(actual, expected,
                               "\(path) does not match Sources/\(target)/\(Self.stampName): generated code is out of date with proto/ (or was edited by hand); run scripts/generate-protos.sh")
            }
        }
        // proto/*.proto and proto/*/*.proto (e.g. proto/etcd/rpc.proto), as the scripts see them.
        let protos = (try fm.subpathsOfDirectory(atPath: Self.repoRoot + "/proto"))
            .filter { $0.hasSuffix(".proto") && $0.split(separator: "/").count <= 2 }.map { "proto/\($0)" }
        XCTAssertFalse(protos.isEmpty)
        for proto in protos where !coveredProtos.contains(proto) {
            XCTFail("\(proto) is not covered by any Sources/*/\(Self.stampName): map it in scripts/generate-protos.sh and run it")
        }
    }
}
