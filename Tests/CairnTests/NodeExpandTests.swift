import CairnCore
import CairnNode
import Foundation
import XCTest

/// Online growth on the real kernel: the backing file grows, the loop device is told, the
/// mounted filesystem grows without an unmount, and the data stays.
extension NodeLinuxMounterTests {
    func testExt4GrowsOnlineAfterItsBackingFileGrows() async throws {
        try XCTSkipUnless(Self.hasCapability(24), "online ext4 resize needs CAP_SYS_RESOURCE, which this environment withholds")
        try await growOnline(fsType: "ext4", from: 64 << 20, to: 128 << 20)
    }

    func testXFSGrowsOnlineAfterItsBackingFileGrows() async throws {
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/sbin/xfs_growfs"), "needs xfsprogs")
        try await growOnline(fsType: "xfs", from: 320 << 20, to: 512 << 20)
    }

    func testABlockDeviceSeesItsBackingFileGrow() async throws {
        let mounter = LinuxMounter(logger: logger)
        let file = try sparseFile("block.img", bytes: 64 << 20)
        let device = try await mounter.attachLoop(file: file, readOnly: false)
        try FileHandle(forWritingTo: URL(fileURLWithPath: file)).truncate(atOffset: 96 << 20)
        let size = try await mounter.expand(device: device, fsType: "", mountPath: "")
        XCTAssertEqual(size, 96 << 20)
        try await mounter.detachLoop(device: device)
    }

    /// Whether this process has Linux capability `bit` in its effective set.
    static func hasCapability(_ bit: Int) -> Bool {
        guard let status = ProcFile.textIfReadable("/proc/self/status"),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let mask = UInt64(line.split(separator: "\t").last ?? "", radix: 16) else { return false }
        return mask >> UInt64(bit) & 1 == 1
    }

    func testWithoutCapSysResourceGrowingMountedExt4SaysWhy() async throws {
        try XCTSkipIf(Self.hasCapability(24), "this environment has CAP_SYS_RESOURCE: the online grow itself is tested")
        do {
            try await growOnline(fsType: "ext4", from: 64 << 20, to: 128 << 20)
            XCTFail("growing mounted ext4 without CAP_SYS_RESOURCE cannot succeed")
        } catch let e as CairnError {
            XCTAssertEqual(e.code, .failedPrecondition)
            XCTAssertTrue(e.message.contains("CAP_SYS_RESOURCE"), e.message)
        }
    }

    func growOnline(fsType: String, from: Int64, to: Int64) async throws {
        let mounter = LinuxMounter(logger: logger)
        let file = try sparseFile("\(fsType).img", bytes: from)
        let mnt = try mkdir("mnt-\(fsType)")
        let device = try await mounter.attachLoop(file: file, readOnly: false)
        try await mounter.makeFilesystem(device: device, fsType: fsType)
        try await mounter.mount(device: device, at: mnt, fsType: fsType, options: [])
        try "kept".write(toFile: mnt + "/before", atomically: false, encoding: .utf8)
        let before = try await mounter.filesystemStats(path: mnt, in: .host).totalBytes

        try FileHandle(forWritingTo: URL(fileURLWithPath: file)).truncate(atOffset: UInt64(to))
        let deviceBytes = try await mounter.expand(device: device, fsType: fsType, mountPath: mnt)
        XCTAssertEqual(deviceBytes, to)
        let after = try await mounter.filesystemStats(path: mnt, in: .host).totalBytes
        XCTAssertGreaterThan(after, before + (to - from) / 2, "\(fsType) did not grow: \(before) → \(after) bytes")
        XCTAssertEqual(try String(contentsOfFile: mnt + "/before", encoding: .utf8), "kept")

        try await mounter.unmount(mnt, in: .host)
        try await mounter.detachLoop(device: device)
    }
}
