import CairnCore
import XCTest

/// Which loop devices NodeStage attaches in write-through mode (docs/engine.md, "Write-through
/// volumes"): only those over an engine's file, whose every write is durable when answered. A
/// plain file's device in that mode would drop the application's flushes.
final class LoopWriteCacheTests: XCTestCase {
    private func table(_ lines: [String]) -> [MountInfo] {
        MountTable.parse(lines.joined(separator: "\n"))
    }

    func testOnlyTheVolumeFileAtTheTopOfAnEngineMountIsAnEngineFile() {
        let mounts = table([
            "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw",
            "40 22 0:40 / /var/lib/cairn/engines/vol-a rw,nosuid,nodev,relatime - fuse.cairn cairn:vol-a rw,user_id=0,group_id=0",
            "41 22 0:41 / /var/lib/cairn/engines/vol-b rw,relatime - ext4 /dev/vdb rw",
            "42 22 0:42 / /var/lib/cairn/engines/vol-c rw,nosuid,nodev,relatime - fuse.cairn cairn:vol-c rw",
            "43 42 0:43 / /var/lib/cairn/engines/vol-c rw,relatime - tmpfs tmpfs rw",
            "44 22 0:44 / /srv/other rw,relatime - fuse.sshfs host:/ rw",
        ])
        XCTAssertTrue(LoopWriteCache.isEngineFile("/var/lib/cairn/engines/vol-a/volume", mounts: mounts))
        XCTAssertFalse(LoopWriteCache.isEngineFile("/var/lib/cairn/engines/vol-a/other", mounts: mounts), "not the volume file")
        XCTAssertFalse(LoopWriteCache.isEngineFile("/var/lib/cairn/engines/vol-b/volume", mounts: mounts), "a plain filesystem")
        XCTAssertFalse(LoopWriteCache.isEngineFile("/var/lib/cairn/engines/vol-c/volume", mounts: mounts), "covered by another mount")
        XCTAssertFalse(LoopWriteCache.isEngineFile("/srv/other/volume", mounts: mounts), "another FUSE file system")
        XCTAssertFalse(LoopWriteCache.isEngineFile("/var/lib/cairn/volumes/vol-d.img", mounts: mounts), "a one-machine volume's file")
    }
}
