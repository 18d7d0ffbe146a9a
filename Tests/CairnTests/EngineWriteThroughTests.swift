import CairnCore
@testable import CairnEngine
import CairnNode
import CairnReplica
import Dispatch
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("fallocate")
private func punchHole(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32

/// Write-through volumes (docs/engine.md): the engine answers no write or trim before it is
/// durable on every in-sync replica, so the loop device over its file is attached in
/// write-through mode and the kernel sends it no flush. What must never happen is a write or
/// trim answered before it is durable everywhere — and a loop device freed in that mode, which
/// would drop the flushes of whatever is attached to it next.
extension EngineFUSETests {
    private func volatileBlocks(_ fakes: [FakeReplica]) -> [Set<UInt64>] { Self.volatileBlocks(fakes) }

    /// A loop device over `path` (detached in tearDown, in write-back mode) and its name.
    private func loopDevice(over path: String) throws -> (device: String, name: String) {
        let device = output(["losetup", "--direct-io=on", "-f", "--show", path])
        guard device.hasPrefix("/dev/loop") else { throw SystemError("losetup: \(device)", errno: EIO) }
        loopDevices.append(device)
        return (device, LoopWriteCache.name(device))
    }
    private static func volatileBlocks(_ fakes: [FakeReplica]) -> [Set<UInt64>] { fakes.map { f in f.state.withLock { $0.volatileBlocks } } }

    func testWhileWriteThroughNoWriteOrTrimIsAnsweredBeforeEveryReplicaHasItDurable() throws {
        let fakes = fakes(3)
        fakes[0].makesDurable.store(true, ordering: .relaxed)
        fakes[2].makesDurable.store(true, ordering: .relaxed)  // n2 is an older server: never durable
        let engine = makeEngine(fakes)
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        // The default (CAIRN_WRITE_THROUGH unset) is every write durable when answered.
        if LoopWriteCache.enabled { XCTAssertTrue(engine.state.writeThrough, "an engine starts without making every write durable") }
        engine.setAllDurableForTesting(true)
        for i in 0..<8 {
            XCTAssertEqual(Self.write(fd, i * 4096, 4096, UInt8(i + 1)), 0)
            XCTAssertEqual(volatileBlocks(fakes), [[], [], []], "write \(i) was answered while a replica held it unsynced")
        }
        // Large writes are never durable as written: each gets a flush of its own.
        XCTAssertEqual(Self.write(fd, 64 * 4096, 1 << 20, 0x5A), 0)
        XCTAssertEqual(volatileBlocks(fakes), [[], [], []], "a large write was answered unsynced")
        // A trim is never durable as made.
        XCTAssertEqual(punchHole(fd, 0x01 | 0x02, 8 * 4096, 8 * 4096), 0)  // KEEP_SIZE | PUNCH_HOLE
        XCTAssertEqual(volatileBlocks(fakes), [[], [], []], "a trim was answered unsynced")
        // Concurrent writers: each write checks, right after its answer, that its block is
        // durable everywhere (other writes' blocks may be volatile for a moment).
        let violations = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            for k in 0..<16 {
                let block = 512 + t * 16 + k
                XCTAssertEqual(Self.write(fd, block * 4096, 4096, UInt8(t + 1)), 0)
                for (fake, volatile) in zip(fakes, Self.volatileBlocks(fakes)) where volatile.contains(UInt64(block)) {
                    violations.withLock { $0.append("\(fake.nodeID): block \(block) answered unsynced") }
                }
            }
        }
        XCTAssertEqual(violations.withLock { $0 }.prefix(5), [])
        XCTAssertGreaterThan(engine.state.writeThroughOwnFlushes, 0)
        // No flush was sent by the application in all of this; n2 got one per write (or
        // shared one with a concurrent write).
        XCTAssertGreaterThanOrEqual(fakes[1].state.withLock { $0.flushes }, 8 + 1 + 1 + 16)
        XCTAssertTrue(engine.state.writeThrough)
    }

    /// NodeStage's attach: a loop device over an engine's file comes up in write-through mode
    /// (one over a plain file does not); commits through it never send the replicas a flush,
    /// and every write is durable on each replica when it is answered; detached, it is freed in
    /// write-back mode.
    func testALoopDeviceOverAnEngineFileIsAttachedWriteThroughAndCommitsSendNoFlush() async throws {
        try XCTSkipUnless(LoopWriteCache.enabled, "CAIRN_WRITE_THROUGH=off in this environment")
        let fakes = fakes(2)
        let engine = makeEngine(fakes)
        let file = try engine.start()
        XCTAssertTrue(LoopWriteCache.isVouched(file), "the engine did not vouch for its file")
        XCTAssertTrue(engine.state.writeThrough)
        let mounter = LinuxMounter(logger: logger)
        let device = try await mounter.attachLoop(file: file, readOnly: false)
        loopDevices.append(device)
        let name = LoopWriteCache.name(device)
        XCTAssertEqual(LoopWriteCache.mode(name), .writeThrough, "the engine's loop device was attached in write-back mode")
        let fd = try Self.open(device)
        let flushesBefore = fakes.map { f in f.state.withLock { $0.flushes } }
        // Neither replica makes writes durable as written: each write gets a flush round of
        // the engine's own before its answer, and the application's fdatasync none at all.
        for block in 0..<32 {
            XCTAssertEqual(Self.write(fd, block * 4096, 4096, UInt8(block + 1)), 0)
            XCTAssertEqual(volatileBlocks(fakes), [[], []], "write \(block) was answered while a replica held it unsynced")
            XCTAssertEqual(fdatasync(fd), 0)
        }
        let rounds = fakes.map { f in f.state.withLock { $0.flushes } }
        XCTAssertEqual(zip(rounds, flushesBefore).map { $0 - $1 }, [32, 32], "one flush round per write, and none for the application's fdatasync")
        // Concurrent writers share flush rounds and still find their blocks durable.
        let violations = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            for k in 0..<16 {
                let block = 256 + t * 16 + k
                XCTAssertEqual(Self.write(fd, block * 4096, 4096, 0x33), 0)
                for (fake, volatile) in zip(fakes, Self.volatileBlocks(fakes)) where volatile.contains(UInt64(block)) {
                    violations.withLock { $0.append("\(fake.nodeID): block \(block) answered unsynced") }
                }
            }
        }
        XCTAssertEqual(violations.withLock { $0 }.prefix(5), [])
        close(fd)
        // What was written reads back through a fresh open.
        let check = try Self.open(device)
        let (status, bytes) = Self.read(check, 7 * 4096, 4096)
        XCTAssertEqual(status, 0)
        XCTAssertEqual(Set(bytes), [8])
        close(check)
        try await mounter.detachLoop(device: device)
        XCTAssertNotEqual(LoopWriteCache.mode(name), .writeThrough, "a loop device was freed in write-through mode")
        // A plain file's loop device keeps its flushes.
        let plain = dir + "/plain.img"
        XCTAssertTrue(FileManager.default.createFile(atPath: plain, contents: nil))
        XCTAssertEqual(truncate(plain, 16 << 20), 0)
        XCTAssertFalse(LoopWriteCache.isVouched(plain))
        let other = try await mounter.attachLoop(file: plain, readOnly: false)
        loopDevices.append(other)
        XCTAssertEqual(LoopWriteCache.mode(LoopWriteCache.name(other)), .writeBack, "a plain file's loop device was attached in write-through mode")
        try await mounter.detachLoop(device: other)
        // A stopped engine vouches for nothing.
        engine.stop()
        XCTAssertFalse(LoopWriteCache.isVouched(file))
    }

    /// A volume created with `writeThrough: "false"`: its engine makes writes durable at the
    /// application's flushes (more throughput for writers that rarely flush), so its loop device
    /// must keep write back — and its flushes must reach the replicas.
    func testAVolumeWithoutWriteThroughKeepsWriteBackAndItsFlushesReachTheReplicas() async throws {
        let fakes = fakes(2)
        let engine = makeEngine(fakes, writeThrough: false)
        let file = try engine.start()
        XCTAssertFalse(engine.state.writeThrough)
        XCTAssertFalse(LoopWriteCache.isVouched(file))
        let mounter = LinuxMounter(logger: logger)
        let device = try await mounter.attachLoop(file: file, readOnly: false)
        loopDevices.append(device)
        XCTAssertEqual(LoopWriteCache.mode(LoopWriteCache.name(device)), .writeBack, "a write-back volume's loop device was attached in write-through mode")
        let fd = try Self.open(device)
        let before = fakes.map { f in f.state.withLock { $0.flushes } }
        // Many writes per flush: not durable as written, so the flush reaches both replicas.
        for block in 0..<8 { XCTAssertEqual(Self.write(fd, block * 4096, 4096, 0x21), 0) }
        XCTAssertFalse(volatileBlocks(fakes).allSatisfy(\.isEmpty), "writes were made durable before the flush")
        XCTAssertEqual(fdatasync(fd), 0)
        XCTAssertEqual(volatileBlocks(fakes), [[], []], "the application's flush did not make the writes durable")
        XCTAssertTrue(zip(fakes.map { f in f.state.withLock { $0.flushes } }, before).allSatisfy { $0 > $1 }, "the flush did not reach the replicas")
        close(fd)
        try await mounter.detachLoop(device: device)
    }

    /// CAIRN_WRITE_THROUGH=off: an engine makes writes durable only at flushes, unless it finds
    /// a loop device over its file in write-through mode at start (attached before the setting
    /// changed) — then every write, for its whole life.
    func testWithWriteThroughOffAnEngineThatFindsItsLoopDeviceInThatModeMakesEveryWriteDurable() throws {
        let fakes = fakes(2)
        let engine = makeEngine(fakes)
        let (device, name) = try loopDevice(over: try engine.start())
        engine.setAllDurableForTesting(false)
        engine.decideDurabilityAtStart(enabled: false)
        XCTAssertFalse(engine.state.writeThrough, "write-back devices only, write-through off: flushes make writes durable")
        try LoopWriteCache.set(name, .writeThrough)
        engine.decideDurabilityAtStart(enabled: false)
        XCTAssertTrue(engine.state.writeThrough)
        let fd = try Self.open(device)
        defer { close(fd) }
        // No replica makes writes durable as written: each write is flushed before its answer.
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x10), 0)
        XCTAssertEqual(volatileBlocks(fakes), [[], []])
        XCTAssertGreaterThan(engine.state.writeThroughOwnFlushes, 0)
    }

    func testALoopDeviceIsNeverFreedOrHandedOutInWriteThroughMode() async throws {
        let file = dir + "/plain.img"
        XCTAssertTrue(FileManager.default.createFile(atPath: file, contents: nil))
        XCTAssertEqual(truncate(file, 16 << 20), 0)
        let mounter = LinuxMounter(logger: logger)
        let device = try await mounter.attachLoop(file: file, readOnly: false)
        loopDevices.append(device)
        let name = LoopWriteCache.name(device)
        try LoopWriteCache.set(name, .writeThrough)
        try await mounter.detachLoop(device: device)
        XCTAssertEqual(LoopWriteCache.mode(name), .writeBack, "a loop device was freed in write-through mode")
        // And one that comes out of the pool so (left by someone else) is set back at attach.
        try LoopWriteCache.set(name, .writeThrough)
        let again = try await mounter.attachLoop(file: file, readOnly: false)
        loopDevices.append(again)
        let againName = LoopWriteCache.name(again)
        if againName != name { try LoopWriteCache.set(name, .writeBack) }
        XCTAssertEqual(LoopWriteCache.mode(againName), .writeBack)
        try await mounter.detachLoop(device: again)
    }
}

extension EngineFUSETests {
    /// PF_MEMALLOC_NOIO of the calling thread, from /proc/thread-self/stat (field 9, flags).
    static func threadDoesNoIOOnReclaim() -> Bool {
        guard let stat = ProcFile.textIfReadable("/proc/thread-self/stat"),
              let close = stat.lastIndex(of: ")") else { return false }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // After "pid (comm)": state is field 3, flags field 9.
        guard fields.count > 6, let flags = UInt64(fields[6]) else { return false }
        return flags & 0x0008_0000 != 0
    }

    /// The FUSE workers serve a volume whose page cache may need them to write it back: their
    /// allocations must never wait for that writeback (PR_SET_IO_FLUSHER), or memory pressure
    /// deadlocks the volume against itself.
    func testFUSEWorkersAreIOFlushers() throws {
        // PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which some sandboxes drop even for root.
        let capabilities = ProcFile.textIfReadable("/proc/self/status")?.split(separator: "\n")
            .first { $0.hasPrefix("CapEff:") }.flatMap { UInt64($0.dropFirst(7).trimmingCharacters(in: .whitespaces), radix: 16) } ?? 0
        try XCTSkipUnless(capabilities & (1 << 24) != 0, "no CAP_SYS_RESOURCE here: a thread cannot be made an I/O flusher")
        let fakes = fakes(1)
        let seen = Mutex<[Bool]>([])
        fakes[0].onWrite.withLock { $0 = { seen.withLock { $0.append(Self.threadDoesNoIOOnReclaim()) } } }
        let engine = makeEngine(fakes)
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        XCTAssertEqual(Self.write(fd, 0, 4096, 1), 0)
        XCTAssertEqual(seen.withLock { $0 }, [true], "a FUSE worker may wait for writeback while it allocates")
    }
}
