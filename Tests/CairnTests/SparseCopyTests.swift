import CairnCore
import CairnLocal
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// One machine's snapshot copies: sparse on ext4 (holes stay holes), clones (FICLONE) on a
/// filesystem that shares extents — an xfs with reflink on a loop device, made and removed here.
final class SparseCopyTests: XCTestCase {
    var dir = ""
    var mountPoint: String?
    var loopDevice: String?

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-copy-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() async throws {
        if let mountPoint { _ = Self.run(["umount", mountPoint]) }
        if let loopDevice { _ = Self.run(["losetup", "-d", loopDevice]) }
        try? FileManager.default.removeItem(atPath: dir)
    }

    static func run(_ arguments: [String]) -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        guard (try? process.run()) != nil else { return (-1, "cannot run \(arguments)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    func makeFile(_ path: String, size: Int64, data: [(offset: Int64, bytes: [UInt8])]) throws {
        let fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(ftruncate(fd, off_t(size)), 0)
        for (offset, bytes) in data { XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }, bytes.count) }
    }

    func read(_ path: String, at offset: Int64, count: Int) throws -> [UInt8] {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: UInt64(offset))
        return [UInt8](try handle.read(upToCount: count) ?? Data())
    }

    func allocated(_ path: String) -> Int64 {
        var st = stat()
        return stat(path, &st) == 0 ? Int64(st.st_blocks) * 512 : -1
    }

    func testACopyOnAFilesystemWithoutSharedExtentsKeepsItsHolesAndData() throws {
        let source = dir + "/source.img", target = dir + "/target.img"
        let a = [UInt8](repeating: 0xA1, count: 8192), b = [UInt8](repeating: 0xB2, count: 4096)
        try makeFile(source, size: 256 << 20, data: [(1 << 20, a), (200 << 20, b)])
        let method = try SparseCopy.copy(from: source, to: target, size: 300 << 20)
        if method == .reflink { throw XCTSkip("this temporary directory shares extents; the sparse path is covered elsewhere") }
        XCTAssertEqual(try read(target, at: 1 << 20, count: a.count), a)
        XCTAssertEqual(try read(target, at: 200 << 20, count: b.count), b)
        XCTAssertEqual(try read(target, at: 100 << 20, count: 16), [UInt8](repeating: 0, count: 16))
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: target)[.size] as? Int64, 300 << 20)
        XCTAssertLessThan(allocated(target), 1 << 20, "holes were written as data")
        XCTAssertFalse(FileManager.default.fileExists(atPath: target + ".partial"))
        XCTAssertThrowsError(try SparseCopy.copy(from: source, to: dir + "/must-clone.img", size: 256 << 20, requireReflink: true))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/must-clone.img"), "a refused copy left a file")
        XCTAssertFalse(SparseCopy.canReflink(from: dir, into: dir))
    }

    func testOnXFSWithReflinkTheCopyIsACloneThatDivergesFromItsSource() throws {
        guard getuid() == 0 else { throw XCTSkip("mkfs, losetup and mount need root") }
        try XCTSkipUnless(FileManager.default.isExecutableFile(atPath: "/usr/sbin/mkfs.xfs"), "needs xfsprogs")
        let image = dir + "/xfs.img"
        try makeFile(image, size: 512 << 20, data: [])
        let mkfs = Self.run(["mkfs.xfs", "-q", "-m", "reflink=1", image])
        XCTAssertEqual(mkfs.status, 0, mkfs.output)
        let attach = Self.run(["losetup", "--find", "--show", image])
        XCTAssertEqual(attach.status, 0, attach.output)
        loopDevice = attach.output.trimmingCharacters(in: .whitespacesAndNewlines)
        let mnt = dir + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let mount = Self.run(["mount", "-t", "xfs", loopDevice!, mnt])
        XCTAssertEqual(mount.status, 0, mount.output)
        mountPoint = mnt

        XCTAssertTrue(SparseCopy.canReflink(from: mnt, into: mnt))
        let source = mnt + "/volume.img", target = mnt + "/snapshot.img"
        let data = [UInt8](repeating: 0xC3, count: 1 << 20)
        try makeFile(source, size: 128 << 20, data: [(4 << 20, data)])
        XCTAssertEqual(try SparseCopy.copy(from: source, to: target, size: 160 << 20, requireReflink: true), .reflink)
        XCTAssertEqual(try read(target, at: 4 << 20, count: data.count), data)
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: target)[.size] as? Int64, 160 << 20)
        // Copy-on-write: a write to the source after the clone leaves the clone as it was.
        try makeFileWrite(source, at: 4 << 20, [UInt8](repeating: 0xD4, count: 4096))
        XCTAssertEqual(try read(target, at: 4 << 20, count: 4096), [UInt8](repeating: 0xC3, count: 4096))
        XCTAssertEqual(try read(source, at: 4 << 20, count: 4096), [UInt8](repeating: 0xD4, count: 4096))
    }

    func makeFileWrite(_ path: String, at offset: Int64, _ bytes: [UInt8]) throws {
        let fd = open(path, O_WRONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }, bytes.count)
        XCTAssertEqual(fsync(fd), 0)
    }
}
