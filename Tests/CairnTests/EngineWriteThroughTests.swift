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

/// Write-through commits (docs/engine.md): while the engine has a volume's loop device in
/// write-through mode the kernel sends no flush, so what must never happen is a write or trim
/// answered before it is durable on every in-sync replica — and a loop device freed in that
/// mode, which would drop the flushes of whatever is attached to it next.
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
        engine.holdWriteThroughForTesting()
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

    /// A loop device over the volume: commits at queue depth 1 switch it to write through (its
    /// flushes stop reaching the replicas, every write stays durable), concurrent writes switch
    /// it back, and a device detached while in that mode is freed in write-back mode.
    func testCommitsSwitchTheLoopDeviceToWriteThroughAndConcurrentWritesSwitchItBack() throws {
        let fakes = fakes(2)
        for fake in fakes { fake.makesDurable.store(true, ordering: .relaxed) }
        let engine = makeEngine(fakes)
        engine.writeThrough.enabledForTesting.store(true, ordering: .relaxed)  // off by default
        let (device, name) = try loopDevice(over: try engine.start())
        XCTAssertEqual(LoopWriteCache.mode(name), .writeBack)
        let fd = try Self.open(device)
        defer { close(fd) }
        func commit(_ block: Int) {
            XCTAssertEqual(Self.write(fd, block * 4096, 4096, UInt8(truncatingIfNeeded: block)), 0)
            XCTAssertEqual(fdatasync(fd), 0)
        }
        var block = 0
        let deadline = Date().addingTimeInterval(60)
        while LoopWriteCache.mode(name) != .writeThrough && Date() < deadline {
            commit(block)
            block += 1
        }
        XCTAssertEqual(LoopWriteCache.mode(name), .writeThrough, "\(block) commits did not switch the loop device")
        XCTAssertGreaterThanOrEqual(block, WriteThrough.enterScore)
        XCTAssertTrue(engine.state.writeThrough)
        // Flushes no longer reach the replicas, and every write is durable when answered.
        let flushesBefore = fakes.map { f in f.state.withLock { $0.flushes } }
        for _ in 0..<50 {
            commit(block)
            block += 1
            XCTAssertEqual(volatileBlocks(fakes), [[], []])
        }
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.flushes } }, flushesBefore, "flushes still reached the replicas")
        // Writes with company in flight: not commits any more; out once the dwell has passed.
        let out = Date().addingTimeInterval(60)
        var round = 0
        while LoopWriteCache.mode(name) != .writeBack && Date() < out {
            let base = round * 64
            DispatchQueue.concurrentPerform(iterations: 8) { t in
                for k in 0..<8 { XCTAssertEqual(Self.write(fd, (4096 + (base + t * 8 + k) % 8192) * 4096, 4096, 0x33), 0) }
            }
            round += 1
        }
        while engine.state.writeThrough && Date() < out { usleep(10_000) }  // cleared right after the switch
        XCTAssertEqual(LoopWriteCache.mode(name), .writeBack, "concurrent writes did not switch the loop device back")
        XCTAssertFalse(engine.state.writeThrough)
        XCTAssertGreaterThanOrEqual(engine.state.writeThroughSwitches, 2)
        // Flushes reach the replicas again.
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x44), 0)
        XCTAssertEqual(fdatasync(fd), 0)
        XCTAssertGreaterThan(fakes[1].state.withLock { $0.flushes }, flushesBefore[1])
    }

    func testAnEngineThatFindsItsLoopDeviceInWriteThroughMakesEveryWriteDurableThenSwitchesItBack() throws {
        let fakes = fakes(2)
        let engine = makeEngine(fakes)
        let (device, name) = try loopDevice(over: try engine.start())
        // As a predecessor that died in write-through mode leaves it.
        try LoopWriteCache.set(name, .writeThrough)
        engine.adoptWriteThroughLeftByPredecessor()
        XCTAssertTrue(engine.state.writeThrough)
        let fd = try Self.open(device)
        defer { close(fd) }
        // No replica makes writes durable as written: each write is flushed before its answer.
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x10), 0)
        XCTAssertEqual(volatileBlocks(fakes), [[], []])
        let deadline = Date().addingTimeInterval(10)
        while (LoopWriteCache.mode(name) != .writeBack || engine.state.writeThrough) && Date() < deadline { usleep(20_000) }
        XCTAssertEqual(LoopWriteCache.mode(name), .writeBack)
        XCTAssertFalse(engine.state.writeThrough)
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
