import CairnCore
import CairnCrypto
import CoreMetrics
@testable import CairnEngine
import CairnReplica
import Foundation
import Logging
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

#if arch(x86_64) || arch(i386)
private let directFlag: Int32 = 0o40000
#else
private let directFlag: Int32 = 0o200000
#endif
// fallocate(2) and its flags are behind _GNU_SOURCE in the Glibc module.
@_silgen_name("fallocate")
private func fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32
private let punchHole: Int32 = 0x02, keepSize: Int32 = 0x01

/// The engine on the real kernel: FUSE mounts over in-memory fake replicas, I/O through the
/// `volume` file, and a loop device with ext4 on top. Runs only as root with /dev/fuse; every
/// engine, mount and loop device the test makes is removed in tearDown, passed or not.
final class EngineFUSETests: XCTestCase {
    static let size = 64 << 20
    var dir = ""
    var engines: [VolumeEngine] = []
    var registries: [EngineRegistry] = []
    var loopDevices: [String] = []
    var mounts: [String] = []
    var openFiles: [Int32] = []
    let recorder = OutOfSyncRecorder()
    let logger = Logger(label: "engine-test")

    override func setUpWithError() throws {
        try XCTSkipUnless(getuid() == 0, "needs root: FUSE mounts and loop devices")
        try XCTSkipUnless(FileManager.default.fileExists(atPath: "/dev/fuse"), "needs /dev/fuse")
        dir = NSTemporaryDirectory() + "cairn-engine-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        for fd in openFiles { close(fd) }
        for mount in mounts.reversed() where run(["umount", mount]) != 0 { _ = run(["umount", "-l", mount]) }
        for device in loopDevices {
            // Never free one in write-through mode (the next user would lose its flushes).
            let name = LoopWriteCache.name(device)
            if LoopWriteCache.mode(name) == .writeThrough { try? LoopWriteCache.set(name, .writeBack) }
            _ = run(["losetup", "-d", device])
        }
        for engine in engines { engine.stop() }
        for registry in registries { registry.stopAll() }
        if !dir.isEmpty {
            // Only once nothing is mounted below it.
            let mountinfo = ProcFile.textIfReadable("/proc/self/mountinfo") ?? ""
            XCTAssertFalse(mountinfo.contains(dir), "a mount under \(dir) survived the test")
            if !mountinfo.contains(dir) { try? FileManager.default.removeItem(atPath: dir) }
        }
    }

    // MARK: Helpers

    @discardableResult
    func run(_ arguments: [String]) -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { return -1 }
        process.waitUntilExit()
        return process.terminationStatus
    }

    func output(_ arguments: [String]) -> String {
        let process = Process()
        let pipe = Pipe()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return "" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func makeEngine(_ fakes: [FakeReplica], local: String = "n1", epoch: UInt64 = 5, name: String = "vol-a",
                    outOfSync: Set<String> = [], spares: [FakeReplica] = [], recovery: EngineRecovery? = nil,
                    cipher: VolumeCipher? = nil, writeThrough: Bool = true,
                    metricsFactory: any MetricsFactory = MetricsSystem.factory) -> VolumeEngine {
        let byNode = Dictionary(uniqueKeysWithValues: (fakes + spares).map { ($0.nodeID, $0) })
        let recorder = recorder
        let engine = VolumeEngine(
            volumeID: name, sizeBytes: UInt64(Self.size), epoch: epoch,
            replicas: fakes.enumerated().map {
                EngineReplica(nodeID: $1.nodeID, host: "127.0.0.1", port: UInt16(7000 + $0), inSync: !outOfSync.contains($1.nodeID))
            },
            localNodeID: local, mountDirectory: dir + "/mnt-\(name)",
            connect: { replica in
                guard let fake = byNode[replica.nodeID] else { throw FakeFailure(description: "no such replica") }
                return fake
            },
            markOutOfSync: { try recorder.mark($0, $1) },
            recovery: recovery,
            cipher: cipher,
            writeThrough: writeThrough,
            metricsFactory: metricsFactory,
            logger: logger)
        engines.append(engine)
        return engine
    }

    /// Fake replicas n1…nN (n1 is the local node).
    func fakes(_ count: Int) -> [FakeReplica] {
        (1...count).map { FakeReplica(nodeID: "n\($0)", size: Self.size) }
    }

    /// A started engine over `count` fakes and the volume file opened O_DIRECT (closed in tearDown).
    func mounted(_ count: Int) throws -> (VolumeEngine, [FakeReplica], Int32) {
        let fakes = fakes(count)
        let engine = makeEngine(fakes)
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        return (engine, fakes, fd)
    }

    /// This process's threads named `name` now.
    static func threadsNamed(_ name: String) -> Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []).filter { task in
            (try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) == name
        }.count
    }

    /// A 4 KiB-aligned buffer filled with `byte` (O_DIRECT needs aligned memory).
    static func withAligned<R>(_ count: Int, fill byte: UInt8, _ body: (UnsafeMutableRawPointer) throws -> R) rethrows -> R {
        var raw: UnsafeMutableRawPointer?
        precondition(posix_memalign(&raw, 4096, count) == 0)
        defer { free(raw) }
        memset(raw!, Int32(byte), count)
        return try body(raw!)
    }

    static func open(_ path: String, direct: Bool = true) throws -> Int32 {
        let fd = Glibc.open(path, O_RDWR | (direct ? directFlag : 0))
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        return fd
    }

    /// pwrite of `count` bytes of `byte`; returns 0 or the errno.
    static func write(_ fd: Int32, _ offset: Int, _ count: Int, _ byte: UInt8) -> Int32 {
        Self.withAligned(count, fill: byte) { buffer in
            let n = pwrite(fd, buffer, count, off_t(offset))
            return n == count ? 0 : (n < 0 ? errno : EIO)
        }
    }

    static func read(_ fd: Int32, _ offset: Int, _ count: Int) -> (Int32, [UInt8]) {
        Self.withAligned(count, fill: 0xEE) { buffer in
            let n = pread(fd, buffer, count, off_t(offset))
            if n < 0 { return (errno, []) }
            return (0, Array(UnsafeRawBufferPointer(start: buffer, count: n)))
        }
    }

    // MARK: Tests

    func testWritesReachEveryReplicaWithIncreasingGenerationsAndReadsPreferTheLocalOne() throws {
        let fakes = [FakeReplica(nodeID: "n2", size: Self.size, highestGeneration: 40),
                     FakeReplica(nodeID: "n1", size: Self.size, highestGeneration: 41),
                     FakeReplica(nodeID: "n3", size: Self.size)]
        let engine = makeEngine(fakes)
        let path = try engine.start()
        XCTAssertEqual(path, dir + "/mnt-vol-a/volume")
        XCTAssertEqual(try engine.start(), path, "start is idempotent")

        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_size, off_t(Self.size))
        XCTAssertEqual(st.st_mode & 0o7777, 0o600)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFREG)
        XCTAssertEqual(st.st_uid, 0)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir + "/mnt-vol-a"), ["volume"])
        XCTAssertEqual(truncate(path, 4096), -1, "the volume's size is fixed")
        XCTAssertEqual(errno, EPERM)

        let fd = try Self.open(path)
        defer { close(fd) }
        XCTAssertEqual(Self.write(fd, 0, 4096, 0xA1), 0)
        XCTAssertEqual(Self.write(fd, 1 << 20, 1 << 20, 0xB2), 0)
        XCTAssertEqual(Self.write(fd, Self.size - 8192, 8192, 0xC3), 0)
        XCTAssertEqual(fsync(fd), 0)

        for fake in fakes {
            let generations = fake.snapshot.writes.map(\.generation)
            XCTAssertEqual(generations.count, 3, "\(fake.nodeID) got every write")
            XCTAssertEqual(generations.first, (5 << VolumeEngine.epochShift) + 1,
                           "generations start in the epoch's own range (above the 41 a replica holds)")
            XCTAssertEqual(generations, generations.sorted(), "generations increase")
            XCTAssertEqual(Set(generations).count, generations.count)
            XCTAssertGreaterThanOrEqual(fake.snapshot.flushes, 1, "fsync reached \(fake.nodeID)")
            XCTAssertEqual(fake.bytes(0, 4096), [UInt8](repeating: 0xA1, count: 4096))
            XCTAssertEqual(fake.bytes(Self.size - 8192, 8192), [UInt8](repeating: 0xC3, count: 8192))
        }
        XCTAssertEqual(fakes[0].snapshot.writes, fakes[1].snapshot.writes)

        let (err, data) = Self.read(fd, 1 << 20, 1 << 20)
        XCTAssertEqual(err, 0)
        XCTAssertEqual(data, [UInt8](repeating: 0xB2, count: 1 << 20))
        XCTAssertGreaterThan(fakes[1].snapshot.reads, 0, "reads come from the local replica")
        XCTAssertEqual(fakes[0].snapshot.reads + fakes[2].snapshot.reads, 0)

        // Reading at the end is short, past it empty; writing past it is refused.
        XCTAssertEqual(Self.read(fd, Self.size - 4096, 8192).1.count, 4096)
        XCTAssertEqual(Self.read(fd, Self.size, 4096).1.count, 0)
        XCTAssertEqual(Self.write(fd, Self.size, 4096, 1), ENOSPC)

        let state = engine.state
        XCTAssertEqual(state.inSync, ["n2", "n1", "n3"])
        XCTAssertEqual(state.writes, 3)
        XCTAssertEqual(state.bytesWritten, UInt64(4096 + (1 << 20) + 8192))
        XCTAssertFalse(state.fenced)
        XCTAssertEqual(state.path, path)
        XCTAssertEqual(fakes.map { $0.state.withLock(\.epoch) }, [5, 5, 5], "every replica claimed with the epoch")

        close(fd)
        engine.stop()
        engine.stop()
        XCTAssertNil(engine.state.path)
        XCTAssertTrue(fakes.allSatisfy(\.snapshot.closed))
        XCTAssertFalse(FileManager.default.fileExists(atPath: path), "unmounted")
    }

    func testUnalignedWritesAndReadsAreReadModifyWrite() throws {
        let fakes = fakes(2)
        let path = try makeEngine(fakes).start()
        let fd = try Self.open(path, direct: false)
        defer { close(fd) }
        XCTAssertEqual(Self.write(fd, 4096, 4096, 0x11), 0)
        let text = Array("hello, replicas".utf8)
        XCTAssertEqual(text.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 4100) }, text.count)
        var back = [UInt8](repeating: 0, count: text.count + 2)
        XCTAssertEqual(back.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 4099) }, back.count)
        XCTAssertEqual(back, [0x11] + text + [0x11])
        for fake in fakes { XCTAssertEqual(fake.bytes(4100, text.count), text) }

        // Punching a hole: whole blocks trimmed, the partial edges written with zeros.
        XCTAssertEqual(Self.write(fd, 8192, 8192, 0x22), 0)
        XCTAssertEqual(fallocate(fd, punchHole | keepSize, 4096 + 100, 8192), 0)
        for fake in fakes {
            XCTAssertEqual(fake.bytes(4096, 100), [0x11, 0x11, 0x11, 0x11] + text + [UInt8](repeating: 0x11, count: 100 - 4 - text.count))
            XCTAssertEqual(fake.bytes(12388, 16384 - 12388), [UInt8](repeating: 0x22, count: 16384 - 12388), "past the hole")
            XCTAssertEqual(fake.bytes(4196, 8192), [UInt8](repeating: 0, count: 8192))
            XCTAssertEqual(fake.state.withLock { $0.trims.count }, 1)
        }
        XCTAssertEqual(fallocate(fd, 0, 0, 4096), -1, "preallocation is refused")
        XCTAssertEqual(errno, EOPNOTSUPP)
    }

    /// An encrypted volume (docs/encryption.md): the replicas get the same ciphertext, which
    /// decrypts to what was written at that place only; partial writes and reads, unwritten and
    /// trimmed blocks read as on a plain volume.
    func testAnEncryptedEngineSendsOnlyCiphertextToTheReplicas() throws {
        let cipher = try VolumeCipher(VolumeDataKey((0..<64).map { UInt8(($0 * 7 + 3) & 0xff) }))
        let fakes = fakes(2)
        let path = try makeEngine(fakes, cipher: cipher).start()
        let direct = try Self.open(path)
        defer { close(direct) }
        XCTAssertEqual(Self.write(direct, 4096, 8192, 0x5A), 0)
        let plain = [UInt8](repeating: 0x5A, count: 8192)
        let stored = fakes[0].bytes(4096, 8192)
        XCTAssertNotEqual(stored, plain)
        XCTAssertEqual(fakes[1].bytes(4096, 8192), stored, "the replicas differ")
        var opened = stored
        try opened.withUnsafeMutableBytes { try cipher.decrypt(offset: 4096, $0) }
        XCTAssertEqual(opened, plain)
        XCTAssertNotEqual(Array(stored[0..<4096]), Array(stored[4096..<8192]), "two blocks of one plaintext share a ciphertext")
        XCTAssertEqual(Self.read(direct, 4096, 8192).1, plain)
        XCTAssertEqual(Self.read(direct, 65536, 4096).1, [UInt8](repeating: 0, count: 4096), "an unwritten block")

        let buffered = try Self.open(path, direct: false)
        defer { close(buffered) }
        let text = Array("a known plaintext".utf8)
        XCTAssertEqual(text.withUnsafeBytes { pwrite(buffered, $0.baseAddress, $0.count, 4100) }, text.count)
        XCTAssertEqual(fsync(buffered), 0)
        XCTAssertEqual(Self.read(direct, 4096, 4096).1, [0x5A, 0x5A, 0x5A, 0x5A] + text + [UInt8](repeating: 0x5A, count: 4096 - 4 - text.count))
        for fake in fakes {
            let block = fake.bytes(4096, 4096)
            XCTAssertFalse(block.indices.dropLast(text.count).contains { Array(block[$0..<$0 + text.count]) == text },
                           "the plaintext reached replica \(fake.nodeID)")
        }
        // A hole: the trimmed block is zeros on the replicas and reads as zeros.
        XCTAssertEqual(fallocate(buffered, punchHole | keepSize, 8192, 4096), 0)
        for fake in fakes { XCTAssertEqual(fake.bytes(8192, 4096), [UInt8](repeating: 0, count: 4096)) }
        XCTAssertEqual(Self.read(direct, 8192, 4096).1, [UInt8](repeating: 0, count: 4096))
    }

    func testAFailingReplicaIsRecordedOutOfSyncBeforeTheWriteReturnsAndIsSkippedAfterwards() throws {
        let (engine, fakes, fd) = try mounted(3)
        XCTAssertEqual(Self.write(fd, 0, 4096, 1), 0)

        // While markOutOfSync runs, the write has not been answered: the engine still counts 1.
        let writesWhileMarking = Mutex<UInt64?>(nil)
        recorder.onMark.withLock { $0 = { _ in writesWhileMarking.withLock { $0 = engine.state.writes } } }
        fakes[1].fail(with: FakeFailure(description: "connection reset"))
        XCTAssertEqual(Self.write(fd, 8192, 4096, 2), 0, "acknowledged by the replicas still in sync")
        XCTAssertEqual(recorder.nodeIDs, ["n2"])
        XCTAssertTrue(recorder.calls.withLock { $0[0].reason }.contains("connection reset"))
        XCTAssertEqual(writesWhileMarking.withLock { $0 }, 1, "recorded before the write was answered")
        XCTAssertEqual(engine.state.inSync, ["n1", "n3"])
        XCTAssertEqual(engine.state.outOfSync.keys.sorted(), ["n2"])

        let n2Writes = fakes[1].snapshot.writes.count
        for i in 0..<8 { XCTAssertEqual(Self.write(fd, 16384 + i * 4096, 4096, 3), 0) }
        XCTAssertEqual(fakes[1].snapshot.writes.count, n2Writes, "later writes skip the out-of-sync replica")
        XCTAssertEqual(fakes[0].snapshot.writes.count, 10)
        XCTAssertEqual(fakes[2].snapshot.writes.count, 10)
        XCTAssertEqual(recorder.nodeIDs, ["n2"], "recorded once")

        // A failing local replica: the read goes to the next one, after recording it.
        fakes[0].fail(with: FakeFailure(description: "disk gone"))
        let (err, data) = Self.read(fd, 8192, 4096)
        XCTAssertEqual(err, 0)
        XCTAssertEqual(data, [UInt8](repeating: 2, count: 4096))
        XCTAssertEqual(recorder.nodeIDs, ["n2", "n1"])
        XCTAssertEqual(engine.state.inSync, ["n3"])

        // The last in-sync replica is never recorded out of sync: its failure is EIO.
        fakes[2].fail(with: FakeFailure(description: "also gone"))
        XCTAssertEqual(Self.write(fd, 0, 4096, 4), EIO)
        XCTAssertEqual(engine.state.inSync, ["n3"])
        XCTAssertEqual(recorder.nodeIDs, ["n2", "n1"])
    }

    func testConcurrentFailuresRecordAReplicaOnce() throws {
        let fakes = fakes(2)
        let engine = makeEngine(fakes)
        let path = try engine.start()
        recorder.onMark.withLock { $0 = { _ in usleep(50_000) } }
        fakes[1].fail(with: FakeFailure(description: "timeout"))
        let results = Mutex<[Int32]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            guard let fd = try? Self.open(path) else { return }
            let r = Self.write(fd, i * 4096, 4096, UInt8(i))
            close(fd)
            results.withLock { $0.append(r) }
        }
        XCTAssertEqual(results.withLock { $0 }, [Int32](repeating: 0, count: 8))
        XCTAssertEqual(recorder.nodeIDs, ["n2"])
        XCTAssertEqual(engine.state.inSync, ["n1"])
    }

    func testAWriteFailsWithEIOWhenTheStoreCannotRecordTheFailure() throws {
        let (engine, fakes, fd) = try mounted(2)
        recorder.failing.withLock { $0 = FakeFailure(description: "store unreachable") }
        fakes[1].fail(with: FakeFailure(description: "io error"))
        XCTAssertEqual(Self.write(fd, 0, 4096, 7), EIO)
        XCTAssertEqual(engine.state.inSync, ["n1", "n2"], "nothing removed without the store's record")
        XCTAssertEqual(engine.state.errors, 1)

        // Once the store answers, the next write records it and succeeds.
        recorder.failing.withLock { $0 = nil }
        XCTAssertEqual(Self.write(fd, 0, 4096, 8), 0)
        XCTAssertEqual(recorder.nodeIDs, ["n2"])
        XCTAssertEqual(engine.state.inSync, ["n1"])
    }

    func testAStaleEpochFencesTheEngine() throws {
        let (engine, fakes, fd) = try mounted(2)
        XCTAssertEqual(Self.write(fd, 0, 4096, 1), 0)
        // Another node claimed n2 with a newer epoch.
        _ = try fakes[1].claim(volumeID: "vol-a", epoch: 6)
        XCTAssertEqual(Self.write(fd, 0, 4096, 2), EIO)
        XCTAssertEqual(Self.read(fd, 0, 4096).0, EIO, "every later I/O fails")
        XCTAssertEqual(fsync(fd), -1)
        XCTAssertEqual(Self.write(fd, 4096, 4096, 3), EIO)
        XCTAssertTrue(engine.state.fenced)
        XCTAssertEqual(recorder.nodeIDs, [], "a fenced engine records nothing out of sync")
        XCTAssertEqual(engine.state.inSync, ["n1", "n2"])
        XCTAssertEqual(fakes[0].snapshot.writes.count, 2, "the fenced write went nowhere after fencing")
    }

    func testStartRecordsUnclaimableReplicasAndRefusesWhenNoneAnswers() throws {
        let fakes = fakes(2)
        fakes[1].state.withLock { $0.claimFailure = FakeFailure(description: "connection refused") }
        let engine = makeEngine(fakes)
        _ = try engine.start()
        XCTAssertEqual(recorder.nodeIDs, ["n2"])
        XCTAssertEqual(engine.state.inSync, ["n1"])
        engine.stop()

        let dead = self.fakes(1)
        dead[0].state.withLock { $0.claimFailure = FakeFailure(description: "connection refused") }
        XCTAssertThrowsError(try makeEngine(dead, name: "vol-b").start()) { error in
            XCTAssertEqual(RPCStatus.from(error).code, .unavailable)
            XCTAssertTrue(RPCStatus.from(error).message.contains("connection refused"))
        }
        XCTAssertEqual(recorder.nodeIDs, ["n2"], "nothing recorded when no replica answers")

        let newer = self.fakes(1)
        _ = try newer[0].claim(volumeID: "vol-c", epoch: 9)
        XCTAssertThrowsError(try makeEngine(newer, name: "vol-c").start()) { error in
            XCTAssertEqual(RPCStatus.from(error).code, .failedPrecondition)
        }
    }

    func testRegistryIsIdempotentPerEpoch() throws {
        let registry = EngineRegistry(logger: logger)
        registries.append(registry)
        let fake = FakeReplica(nodeID: "n1", size: Self.size)
        let recorder = recorder
        func start(_ epoch: UInt64) throws -> String {
            try registry.start(volumeID: "vol-r", sizeBytes: UInt64(Self.size), epoch: epoch,
                               replicas: [EngineReplica(nodeID: "n1", host: "127.0.0.1", port: 7000)], localNodeID: "n1",
                               mountDirectory: dir + "/mnt-r", connect: { _ in fake }, markOutOfSync: { try recorder.mark($0, $1) })
        }
        let path = try start(3)
        XCTAssertEqual(try start(3), path)
        XCTAssertEqual(registry.state(volumeID: "vol-r")?.epoch, 3)
        XCTAssertEqual(try start(4), path)
        XCTAssertEqual(registry.state(volumeID: "vol-r")?.epoch, 4)
        XCTAssertEqual(fake.state.withLock(\.epoch), 4)
        XCTAssertThrowsError(try start(3)) { XCTAssertEqual(RPCStatus.from($0).code, .failedPrecondition) }
        XCTAssertEqual(registry.volumeIDs, ["vol-r"])
        registry.stop(volumeID: "vol-r")
        registry.stop(volumeID: "vol-r")
        XCTAssertNil(registry.state(volumeID: "vol-r"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
    }

    func testLoopDeviceWithExt4OnTheVolumeFile() throws {
        let fakes = fakes(2)
        let engine = makeEngine(fakes)
        let path = try engine.start()
        let device = output(["losetup", "--direct-io=on", "-f", "--show", path])
        XCTAssertTrue(device.hasPrefix("/dev/loop"), "losetup: \(device)")
        guard device.hasPrefix("/dev/loop") else { return }
        loopDevices.append(device)
        XCTAssertEqual(run(["mkfs.ext4", "-q", "-F", device]), 0)
        let target = dir + "/fs"
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
        XCTAssertEqual(run(["mount", device, target]), 0)
        mounts.append(target)
        let content = Data((0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try content.write(to: URL(fileURLWithPath: target + "/data.bin"))
        XCTAssertEqual(run(["sync", "-f", target + "/data.bin"]), 0)
        XCTAssertEqual(run(["umount", target]), 0)
        mounts.removeAll()
        XCTAssertEqual(run(["fsck.ext4", "-n", device]), 0, "the filesystem is clean")
        // Mount again: the data came back from the replicas.
        XCTAssertEqual(run(["mount", device, target]), 0)
        mounts.append(target)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: target + "/data.bin")), content)
        XCTAssertEqual(run(["umount", target]), 0)
        mounts.removeAll()
        XCTAssertEqual(run(["losetup", "-d", device]), 0)
        loopDevices.removeAll()
        XCTAssertEqual(fakes[0].bytes(0, Self.size), fakes[1].bytes(0, Self.size), "both replicas hold the same volume")
        XCTAssertGreaterThan(engine.state.flushes, 0)
    }

    func testStopAbortsAConnectionStillUsedByALoopDevice() throws {
        let fakes = fakes(1)
        let engine = makeEngine(fakes)
        let path = try engine.start()
        let device = output(["losetup", "--direct-io=on", "-f", "--show", path])
        guard device.hasPrefix("/dev/loop") else { return XCTFail("losetup: \(device)") }
        loopDevices.append(device)
        engine.stop()   // must return although the loop device still holds the file
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
        // The loop device over the engine's file was released with it (it could never serve
        // again, and after the lazy unmount nobody could find it by its path).
        let backing = "/sys/block/\((device as NSString).lastPathComponent)/loop/backing_file"
        var released = false
        for _ in 0..<50 where !released {
            released = !FileManager.default.fileExists(atPath: backing)
            if !released { usleep(20_000) }
        }
        XCTAssertTrue(released, "\(device) still holds the stopped engine's file")
    }

    // MARK: Dead FUSE mounts (issue 13)

    /// A FUSE mount whose daemon is gone, as a SIGKILLed node process leaves one: mounted over
    /// /dev/fuse as `fuse.cairn`, then the descriptor closed (the kernel aborts the connection).
    func deadMount(at path: String) throws {
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw SystemError("mkdir \(path)", errno: errno) }
        let fd = Glibc.open("/dev/fuse", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open /dev/fuse", errno: errno) }
        defer { close(fd) }
        guard mount("cairn:dead", path, "fuse.cairn", 0, "fd=\(fd),rootmode=40000,user_id=0,group_id=0") == 0 else {
            throw SystemError("mount fuse.cairn at \(path)", errno: errno)
        }
    }

    func fuseMounts(at path: String) throws -> [MountInfo] {
        try MountTable.read().filter { $0.mountPoint == path && $0.fsType == "fuse.cairn" }
    }

    /// Unmounts whatever FUSE mounts remain at `path` (lazily), for the tear-down.
    func detachAll(at path: String) {
        for _ in 0..<4 where !((try? fuseMounts(at: path)) ?? []).isEmpty { umount2(path, Int32(MNT_DETACH)) }
    }

    func testStartDetachesDeadMountsStackedAtItsMountPointAndNeverStacks() throws {
        let fakes = fakes(1)
        let engine = makeEngine(fakes)
        defer { engine.stop(); detachAll(at: engine.mountDirectory) }
        try deadMount(at: engine.mountDirectory)
        try deadMount(at: engine.mountDirectory)
        XCTAssertEqual(try fuseMounts(at: engine.mountDirectory).count, 2, "two dead mounts stacked, as after two crashes")
        let fd = try Self.open(try engine.start())
        defer { close(fd) }
        let left = try fuseMounts(at: engine.mountDirectory)
        XCTAssertEqual(left.count, 1, "the engine's own mount only: \(left.map(\.source))")
        XCTAssertEqual(left.first?.source, "cairn:vol-a")
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x5A), 0)
        XCTAssertEqual(Self.read(fd, 0, 4096).1, [UInt8](repeating: 0x5A, count: 4096))
        XCTAssertEqual(try DeadFUSEMounts.find(under: dir), [], "a live engine of this process is not dead")
    }

    func testSweepDetachesOnlyDeadMountsAndLeavesALiveEngineServing() throws {
        let (engine, _, fd) = try mounted(1)  // stopped by the tear-down, after fd is closed
        let dead = dir + "/mnt-vol-gone"
        defer { detachAll(at: dead) }
        try deadMount(at: dead)
        XCTAssertEqual(try DeadFUSEMounts.find(under: dir).map(\.mountPoint), [dead])
        // What the node does at its start and in NodeUnstage.
        XCTAssertEqual(try DeadFUSEMounts.detach(under: dir, logger: logger), [dead])
        XCTAssertEqual(try fuseMounts(at: dead), [])
        XCTAssertEqual(try fuseMounts(at: engine.mountDirectory).count, 1, "the live engine's mount stays")
        XCTAssertEqual(Self.write(fd, 8192, 4096, 0x33), 0, "the live engine still serves writes")
        XCTAssertEqual(Self.read(fd, 8192, 4096).1, [UInt8](repeating: 0x33, count: 4096))
        // A kept mount (a loop device still holds its file) is aborted but stays mounted.
        try deadMount(at: dead)
        XCTAssertEqual(try DeadFUSEMounts.detach(under: dir, logger: logger, keep: { $0.mountPoint == dead }), [])
        XCTAssertEqual(try fuseMounts(at: dead).count, 1)
        XCTAssertEqual(try DeadFUSEMounts.detach(under: dead, exactly: true, logger: logger), [dead])
        XCTAssertEqual(try fuseMounts(at: dead), [])
    }

    /// The open reply carries FOPEN_PARALLEL_DIRECT_WRITES: two direct writes to the file reach
    /// the engine at the same time (without it the kernel holds the inode lock per write and the
    /// second arrives only after the first returned).
    func testDirectWritesToTheFileReachTheEngineConcurrently() throws {
        let (_, fakes, fd) = try mounted(1)
        final class Counts: Sendable { let inFlight = Atomic<Int>(0), most = Atomic<Int>(0) }
        let counts = Counts()
        fakes[0].onWrite.withLock {
            $0 = {
                let now = counts.inFlight.wrappingAdd(1, ordering: .sequentiallyConsistent).newValue
                _ = counts.most.max(now, ordering: .sequentiallyConsistent)
                // Hold this write until a second one is in flight too (or 2 s passed).
                let deadline = DispatchTime.now() + .seconds(2)
                while counts.most.load(ordering: .sequentiallyConsistent) < 2 && DispatchTime.now() < deadline { usleep(1000) }
                counts.inFlight.wrappingSubtract(1, ordering: .sequentiallyConsistent)
            }
        }
        let results = Mutex<[Int32]>([])
        DispatchQueue.concurrentPerform(iterations: 2) { i in
            let r = Self.write(fd, i * 65536, 4096, 0x30 + UInt8(i))
            results.withLock { $0.append(r) }
        }
        XCTAssertEqual(results.withLock { $0 }, [0, 0])
        XCTAssertEqual(counts.most.load(ordering: .sequentiallyConsistent), 2, "direct writes to the volume file were serialized by the kernel")
    }

    /// A write's data reaches the replicas in page-aligned memory straight from the FUSE
    /// request (the shim's workers place it so), so the local store writes it with O_DIRECT
    /// and the client sends it without a copy. With libfuse's own loop it sat 80 bytes into a
    /// malloc'd buffer and every write was copied.
    func testWriteDataArrivesPageAlignedFromTheKernel() throws {
        // Threads named as FUSE workers before this engine starts: an earlier test's thread
        // pools (a thread inherits the name of the thread that creates it).
        let before = Self.threadsNamed("cairn-fuse")
        let (_, fakes, fd) = try mounted(1)
        for (i, size) in [4096, 65536, 1 << 20, 8192].enumerated() {
            XCTAssertEqual(Self.write(fd, i * (1 << 20), size, 0x40 + UInt8(i)), 0)
        }
        XCTAssertGreaterThanOrEqual(fakes[0].snapshot.writes.count, 4)
        XCTAssertEqual(fakes[0].unalignedWrites.load(ordering: .relaxed), 0, "write data was not page-aligned")
        // One request at a time needs one worker and one waiting: the shim starts workers as
        // load needs them, so a node with many quiet volumes does not hold 32 threads each. (A
        // worker still finishing its answer when the next request comes makes another start:
        // a few, never the limit.)
        let workers = Self.threadsNamed("cairn-fuse") - before
        XCTAssertGreaterThan(workers, 0)
        XCTAssertLessThanOrEqual(workers, 4, "FUSE workers started before any load needed them")
    }

    /// The fear: two writes of one block in flight at once reach the replicas in different
    /// orders (each connection, each server worker, races on its own) and the replicas end up
    /// holding different data, every write acknowledged. The engine must keep them one after the
    /// other. Each fake here applies a write after its own random delay, as a replica server
    /// running requests in parallel would.
    func testConcurrentWritesOfOneBlockLeaveEveryReplicaIdentical() throws {
        let fakes = fakes(3)
        let engine = makeEngine(fakes)
        let path = try engine.start()
        let fd = try Self.open(path)
        openFiles.append(fd)
        // Unaligned writes through a descriptor without O_DIRECT (the file is FOPEN_DIRECT_IO:
        // they still reach the engine as they are).
        let buffered = try Self.open(path, direct: false)
        openFiles.append(buffered)
        for fake in fakes {
            fake.onWrite.withLock { $0 = { usleep(UInt32.random(in: 0...1500)) } }
        }
        let writers = 4, rounds = 40
        let failures = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: writers) { w in
            for r in 0..<rounds {
                // Whole-block writes of block 3, and a partial one of it now and then.
                let result = r % 5 == 4 ? Self.writeUnaligned(buffered, 3 * 4096 + 100, 200, UInt8(w * 50 + r % 50))
                                        : Self.write(fd, 3 * 4096, 4096, UInt8(w * 50 + r % 50))
                if result != 0 { failures.wrappingAdd(1, ordering: .relaxed) }
            }
        }
        XCTAssertEqual(failures.load(ordering: .relaxed), 0)
        // Every replica applied the block's writes in one order, the order of their generations
        // (what a resync or convergence compares), and ended with the same data.
        let orders = fakes.map { fake in fake.state.withLock { s in s.writes.filter { $0.offset == 3 * 4096 }.map(\.generation) } }
        XCTAssertEqual(orders[0].count, writers * rounds)
        XCTAssertEqual(orders[0], orders[0].sorted(), "replica n1 applied the block's writes out of generation order")
        for i in 1..<fakes.count {
            XCTAssertEqual(orders[i], orders[0], "replica \(fakes[i].nodeID) applied the block's writes in another order than n1")
        }
        let contents = fakes.map { $0.bytes(3 * 4096, 4096) }
        let generations = fakes.map { fake in fake.state.withLock { $0.generations[3] } }
        for i in 1..<fakes.count {
            XCTAssertEqual(contents[i], contents[0], "replica \(fakes[i].nodeID) holds other data for the block than \(fakes[0].nodeID)")
            XCTAssertEqual(generations[i], generations[0], "replica \(fakes[i].nodeID) holds another generation of the block")
        }
        XCTAssertGreaterThan(engine.overlaps.waits, 0, "no write ever waited: the test did not make overlapping writes")
        XCTAssertEqual(engine.overlaps.held, 0)
    }

    /// pwrite of `count` bytes of `byte` at any offset (buffered file I/O: the kernel sends the
    /// engine the unaligned range); returns 0 or the errno.
    static func writeUnaligned(_ fd: Int32, _ offset: Int, _ count: Int, _ byte: UInt8) -> Int32 {
        let bytes = [UInt8](repeating: byte, count: count)
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, count, off_t(offset)) }
        return n == count ? 0 : (n < 0 ? errno : EIO)
    }

    func testThroughputThroughFUSE() throws {
        for replicas in [1, 2] {
            let fakes = (1...replicas).map { FakeReplica(nodeID: "n\($0)", size: Self.size, storesData: false) }
            let engine = makeEngine(fakes, name: "vol-t\(replicas)")
            let path = try engine.start()
            let fd = try Self.open(path)
            defer { close(fd) }
            for blockSize in [4096, 1 << 20] {
                let total = blockSize == 4096 ? 64 << 20 : 512 << 20
                let count = total / blockSize
                try Self.withAligned(blockSize, fill: 0x5A) { buffer in
                    let start = DispatchTime.now()
                    for i in 0..<count {
                        let offset = off_t((i * blockSize) % Self.size)
                        guard pwrite(fd, buffer, blockSize, offset) == blockSize else {
                            throw SystemError("pwrite", errno: errno)
                        }
                    }
                    let seconds = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
                    print(String(format: "engine throughput: %d replica(s), %7d-byte O_DIRECT pwrite: %8.0f IOPS, %7.1f MiB/s",
                                 replicas, blockSize, Double(count) / seconds, Double(total) / seconds / 1048576))
                }
            }
        }
    }
}
