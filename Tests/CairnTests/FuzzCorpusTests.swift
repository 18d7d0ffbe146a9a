import CairnFuzz
import Foundation
import XCTest

/// The fuzz targets' committed corpus (fuzz/corpus/<target>/, docs/fuzzing.md): the seeds are
/// what the harnesses generate (so they stay valid inputs as the protocols change), and every
/// committed input — seeds, and the inputs of crashes found and fixed — runs through its target
/// without trapping. A crash's input stays here as its regression test.
final class FuzzCorpusTests: XCTestCase {
    static let corpus = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fuzz/corpus")

    /// `CAIRN_FUZZ_WRITE_SEEDS=1 swift test --filter FuzzCorpusTests` rewrites the seeds.
    func testCommittedSeedsAreWhatTheHarnessesGenerate() throws {
        let write = ProcessInfo.processInfo.environment["CAIRN_FUZZ_WRITE_SEEDS"] == "1"
        for target in FuzzTarget.all {
            let directory = Self.corpus.appendingPathComponent(target.name)
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            let seeds = target.seeds()
            XCTAssertEqual(Set(seeds.map(\.name)).count, seeds.count, "\(target.name): two seeds share a name")
            for seed in seeds {
                let file = directory.appendingPathComponent("seed-" + seed.name)
                if write {
                    try Data(seed.bytes).write(to: file)
                } else {
                    let committed = try? Data(contentsOf: file)
                    XCTAssertEqual(committed.map([UInt8].init), seed.bytes,
                                   "\(target.name): \(file.lastPathComponent) is missing or stale; run CAIRN_FUZZ_WRITE_SEEDS=1 swift test --filter FuzzCorpusTests")
                }
            }
        }
    }

    func testEveryCommittedInputRunsThroughItsTarget() throws {
        for target in FuzzTarget.all {
            let directory = Self.corpus.appendingPathComponent(target.name)
            let files = try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted()
            XCTAssertFalse(files.isEmpty, "no corpus for \(target.name)")
            for file in files {
                target.run([UInt8](try Data(contentsOf: directory.appendingPathComponent(file))))
            }
        }
    }
}
