import CairnCore
import Foundation
import XCTest

/// Which loop devices NodeStage attaches in write-through mode (docs/engine.md, "Write-through
/// volumes"): only those over a file whose engine vouched that every write is durable when
/// answered. A plain file's device in that mode would drop the application's flushes.
final class LoopWriteCacheTests: XCTestCase {
    func testOnlyAFileAnEngineVouchesForIsVouchedForWhateverPathNamesIt() throws {
        let dir = NSTemporaryDirectory() + "loopwc-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir + "/engines/vol-a", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createSymbolicLink(atPath: dir + "/link", withDestinationPath: dir + "/engines")
        let file = dir + "/engines/vol-a/volume"
        XCTAssertFalse(LoopWriteCache.isVouched(file))
        LoopWriteCache.vouch(file)
        XCTAssertTrue(LoopWriteCache.isVouched(file))
        XCTAssertTrue(LoopWriteCache.isVouched(dir + "/link/vol-a/volume"), "the same file through a symbolic link")
        XCTAssertFalse(LoopWriteCache.isVouched(dir + "/engines/vol-a/other"))
        XCTAssertFalse(LoopWriteCache.isVouched(dir + "/engines/vol-b/volume"))
        LoopWriteCache.withdraw(dir + "/link/vol-a/volume")
        XCTAssertFalse(LoopWriteCache.isVouched(file), "withdrawn under another name of the same file")
    }
}
