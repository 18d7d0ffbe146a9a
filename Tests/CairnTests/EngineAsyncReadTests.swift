@testable import CairnCluster
import CairnCore
import CairnCrypto
@testable import CairnEngine
import CairnReplica
import Foundation
import Logging
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Asynchronous reads of the local replica (docs/engine.md, "Asynchronous reads"): the FUSE
/// shim reads what the store planned through its io_uring, and the engine checks every block
/// against the checksum it had when the read was planned. Real replica servers: n1 in this
/// process (`LocalReplicaIO`, the path that plans reads), n2 over the data protocol.
extension EngineFUSETests {
    static let asyncVolume = "vol-async"
    static let asyncSize = 16 << 20

    /// Two started replica servers with the volume created on both, and a started engine over
    /// them (n1 local), the volume file opened O_DIRECT. The servers stop after the engine.
    /// `inline`: whether a worker reads a lone read itself (the default) or hands every planned
    /// read to the ring (so one read at a time still goes through it).
    func asyncEngine(cipher: VolumeCipher? = nil, inline: Bool = true) throws -> (VolumeEngine, [ReplicaServer], Int32) {
        var servers: [ReplicaServer] = []
        do {
            for node in ["n1", "n2"] {
                let server = try ReplicaServer(dataDir: dir + "/" + node, host: "127.0.0.1", port: 0, logger: logger)
                try server.start()
                servers.append(server)
                let c = try ReplicaClient(host: "127.0.0.1", port: server.boundPort)
                defer { c.close() }
                try c.create(volumeID: Self.asyncVolume, sizeBytes: UInt64(Self.asyncSize))
            }
        } catch {
            servers.forEach { $0.stop() }
            throw error
        }
        let local = servers[0]
        let engine = VolumeEngine(
            volumeID: Self.asyncVolume, sizeBytes: UInt64(Self.asyncSize), epoch: 3,
            replicas: servers.enumerated().map { EngineReplica(nodeID: "n\($0 + 1)", host: "127.0.0.1", port: $1.boundPort) },
            localNodeID: "n1", mountDirectory: dir + "/mnt-async",
            connect: { replica in
                if replica.nodeID == "n1" { return try LocalReplicaIO(server: local, volumeID: Self.asyncVolume) }
                return ClientReplicaIO(try ReplicaClient(host: replica.host, port: replica.port))
            },
            markOutOfSync: { [recorder] in try recorder.mark($0, $1) }, cipher: cipher, logger: logger)
        engine.inlineReads.store(inline, ordering: .relaxed)
        engines.append(engine)
        let fd: Int32
        do {
            fd = try Self.open(try engine.start())
        } catch {
            engine.stop()
            servers.forEach { $0.stop() }
            throw error
        }
        return (engine, servers, fd)
    }

    /// `count` bytes at `offset` where block b holds the byte (b % 251) + 1 (never zero).
    private static func pattern(_ offset: Int, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(((offset + $0) / 4096) % 251 + 1) }
    }

    /// What a racing load saw: I/O that failed, reads that answered a mix of two versions of a
    /// block (or zeros), and I/Os done.
    private final class RacingLoad: Sendable {
        let stop = Atomic<Bool>(false)
        let failed = Atomic<Int>(0), torn = Atomic<Int>(0), done = Atomic<Int>(0)
        let group = DispatchGroup()

        /// Two writers and four readers on blocks 0 ..< `blocks` of `fd`, each block always
        /// written whole with one byte value (never zero), until `finish`.
        init(fd: Int32, blocks: Int) {
            for w in 0..<2 {
                group.enter()
                Thread { [self] in
                    var value = UInt8(2 + w), i = w
                    while !stop.load(ordering: .relaxed) {
                        if EngineFUSETests.write(fd, (i % blocks) * 4096, 4096, value) != 0 { failed.wrappingAdd(1, ordering: .relaxed) }
                        value = value == 250 ? 2 : value + 1
                        i += 1
                        done.wrappingAdd(1, ordering: .relaxed)
                    }
                    group.leave()
                }.start()
            }
            for r in 0..<4 {
                group.enter()
                Thread { [self] in
                    var i = r
                    while !stop.load(ordering: .relaxed) {
                        let (e, got) = EngineFUSETests.read(fd, (i % blocks) * 4096, 4096)
                        if e != 0 || got.count != 4096 {
                            failed.wrappingAdd(1, ordering: .relaxed)
                        } else if got.contains(where: { $0 != got[0] }) || got[0] == 0 {
                            torn.wrappingAdd(1, ordering: .relaxed)
                        }
                        i += 1
                        done.wrappingAdd(1, ordering: .relaxed)
                    }
                    group.leave()
                }.start()
            }
        }

        /// Stops the load; false if its threads did not end within `seconds`.
        func finish(within seconds: Double) -> Bool {
            stop.store(true, ordering: .relaxed)
            return group.wait(timeout: .now() + seconds) == .success
        }
    }

    func testReadsOfTheLocalReplicaAreAsynchronousAndAnswerWhatWasWritten() throws {
        let engine = try readsAnswerWhatWasWritten(inline: false)
        XCTAssertEqual(engine.state.readsInline, 0, "every planned read went through the ring")
    }

    /// One read at a time: each is the only read in flight, so its worker reads it itself (no
    /// hand-off to the ring's thread), checked the same way.
    func testALoneReadIsReadByItsWorkerAndAnswersWhatWasWritten() throws {
        let engine = try readsAnswerWhatWasWritten(inline: true)
        // At least the three single-block reads and the 64 KiB one (a larger read may reach
        // the engine as requests in parallel, which go to the ring).
        XCTAssertGreaterThanOrEqual(engine.state.readsInline, 4)
    }

    private func readsAnswerWhatWasWritten(inline: Bool) throws -> VolumeEngine {
        let (engine, servers, fd) = try asyncEngine(inline: inline)
        defer { close(fd); engine.stop(); servers.forEach { $0.stop() } }
        XCTAssertTrue(engine.state.asyncReads, "io_uring is enabled on this kernel: reads should be asynchronous")

        // 2 MiB written, 1 MiB at a time; the rest of the volume never written.
        let written = 2 << 20
        for offset in stride(from: 0, to: written, by: 1 << 20) {
            let data = Self.pattern(offset, 1 << 20)
            let n = data.withUnsafeBytes { bytes in
                Self.withAligned(1 << 20, fill: 0) { buffer in
                    buffer.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
                    return pwrite(fd, buffer, 1 << 20, off_t(offset))
                }
            }
            XCTAssertEqual(n, 1 << 20)
        }
        let before = engine.state.reads
        // Single blocks, runs up to the asynchronous limit (256 KiB) and past it (synchronous),
        // across the written edge, and wholly unwritten (zeros without I/O).
        for (offset, count) in [(0, 4096), (4096 * 77, 4096), (4096 * 3, 65536), (0, 262_144), (4096 * 100, 1 << 20),
                                (written - 8192, 16384), (written + 4096 * 9, 8192), (Self.asyncSize - 4096, 4096)] {
            let (e, got) = Self.read(fd, offset, count)
            XCTAssertEqual(e, 0, "read of \(count) bytes at \(offset)")
            let expected = (0..<count).map { i -> UInt8 in offset + i < written ? Self.pattern(offset + i, 1)[0] : 0 }
            XCTAssertTrue(got == expected, "read of \(count) bytes at \(offset) answered other data")
        }
        XCTAssertGreaterThanOrEqual(engine.state.reads - before, 8)
        XCTAssertEqual(engine.state.readsRedone, 0, "nothing raced these reads")
        XCTAssertEqual(engine.state.errors, 0)
        return engine
    }

    /// An encrypted volume: what the ring reads is ciphertext, decrypted once checked; blocks
    /// never written read as zeros whether the plan needed I/O or not.
    func testAsynchronousReadsOfAnEncryptedVolumeAnswerThePlaintext() throws {
        try encryptedReadsAnswerThePlaintext(inline: false)
    }

    func testLoneReadsOfAnEncryptedVolumeAnswerThePlaintext() throws {
        try encryptedReadsAnswerThePlaintext(inline: true)
    }

    private func encryptedReadsAnswerThePlaintext(inline: Bool) throws {
        let cipher = try VolumeCipher(VolumeDataKey((0..<64).map { UInt8(($0 * 5 + 1) & 0xff) }))
        let (engine, servers, fd) = try asyncEngine(cipher: cipher, inline: inline)
        defer { close(fd); engine.stop(); servers.forEach { $0.stop() } }
        XCTAssertTrue(engine.state.asyncReads)
        XCTAssertEqual(Self.write(fd, 4096 * 20, 8192, 0x3C), 0)
        // Written blocks, a run half written, and a run of holes only.
        XCTAssertEqual(Self.read(fd, 4096 * 20, 8192).1, [UInt8](repeating: 0x3C, count: 8192))
        XCTAssertEqual(Self.read(fd, 4096 * 18, 16384).1,
                       [UInt8](repeating: 0, count: 8192) + [UInt8](repeating: 0x3C, count: 8192))
        XCTAssertEqual(Self.read(fd, 4096 * 200, 65536).1, [UInt8](repeating: 0, count: 65536))
        // The replica holds ciphertext, not the plaintext.
        let store = try servers[0].openStore(volumeID: Self.asyncVolume)
        XCTAssertNotEqual(try store.read(offset: 4096 * 20, length: 4096, epoch: 3), [UInt8](repeating: 0x3C, count: 4096))
        XCTAssertEqual(engine.state.readsRedone, 0)
        XCTAssertEqual(engine.state.errors, 0)
    }

    /// Stopping the engine under a stream of reads: the ring's reads in flight are answered
    /// and its thread ends before `stop` returns; nothing waits forever.
    func testStoppingTheEngineUnderAStreamOfReadsReturns() throws {
        let (engine, servers, fd) = try asyncEngine()
        defer { close(fd); servers.forEach { $0.stop() } }
        XCTAssertTrue(engine.state.asyncReads)
        XCTAssertEqual(Self.write(fd, 0, 1 << 20, 0x11), 0)
        let stop = Atomic<Bool>(false)
        let group = DispatchGroup()
        for r in 0..<4 {
            group.enter()
            Thread {
                var i = r
                while !stop.load(ordering: .relaxed) {
                    let (e, got) = Self.read(fd, (i % 256) * 4096, 4096)
                    // Once the engine has stopped, reads fail (the connection is gone).
                    if e != 0 { break }
                    if got != [UInt8](repeating: 0x11, count: 4096) { XCTFail("read answered other data") }
                    i += 7
                }
                group.leave()
            }.start()
        }
        usleep(300_000)
        XCTAssertGreaterThan(engine.state.reads, 0)
        let stopped = DispatchSemaphore(value: 0)
        Thread { engine.stop(); stopped.signal() }.start()
        XCTAssertEqual(stopped.wait(timeout: .now() + 20), .success, "the engine did not stop under a stream of reads")
        stop.store(true, ordering: .relaxed)
        XCTAssertEqual(group.wait(timeout: .now() + 20), .success, "a reader never got its answer")
        XCTAssertEqual(Self.threadsNamed("cairn-fuse-io"), 0, "the ring's thread outlived the engine")
    }

    /// The race the checksum check is for: a read planned before a write of its block, done
    /// after it. Every read answers one whole version of the block (old or new, never a mix),
    /// and none is taken for damage: no replica recorded out of sync, no repair.
    func testReadsRacingWritesOfTheirBlocksAnswerWholeVersionsAndAreNotTakenForDamage() throws {
        let (engine, servers, fd) = try asyncEngine()
        defer { close(fd); engine.stop(); servers.forEach { $0.stop() } }
        XCTAssertTrue(engine.state.asyncReads)
        let blocks = 8
        for b in 0..<blocks { XCTAssertEqual(Self.write(fd, b * 4096, 4096, 1), 0) }

        let load = RacingLoad(fd: fd, blocks: blocks)
        // Until a race was seen (and redone), at most 20 s.
        let deadline = Date().addingTimeInterval(20)
        while engine.state.readsRedone < 3 && Date() < deadline { usleep(50_000) }
        usleep(300_000)
        XCTAssertTrue(load.finish(within: 60), "the racing load's I/O did not end")

        XCTAssertEqual(load.failed.load(ordering: .relaxed), 0, "a read or write failed")
        XCTAssertEqual(load.torn.load(ordering: .relaxed), 0, "a read answered a mix of two versions of a block")
        XCTAssertGreaterThan(load.done.load(ordering: .relaxed), 100)
        XCTAssertGreaterThan(engine.state.readsRedone, 0, "no read raced a write of its block: the test did not test the race")
        XCTAssertEqual(engine.state.repairedBlocks, 0, "a raced read was taken for damage")
        XCTAssertTrue(recorder.nodeIDs.isEmpty, "a replica was recorded out of sync: \(recorder.nodeIDs)")
        XCTAssertEqual(engine.state.inSync, ["n1", "n2"])
    }

    /// Snapshots taken and deleted on the local replica under reads racing writes of their
    /// blocks. A deletion's merge closes the dropped layer holding the store's lock exclusively,
    /// after every planned read has ended; a read redone meanwhile needs that lock shared. Were
    /// the redo done by the thread that ends the planned reads, each would wait for the other
    /// and every I/O of the volume would stop. A watchdog ends the test process if reads or
    /// snapshots stop moving for 30 s (a deadlock cannot be undone from inside the process).
    func testSnapshotsDeletedUnderRacingReadsAndWritesNeverStopTheVolume() throws {
        let (engine, servers, fd) = try asyncEngine()
        defer { close(fd); engine.stop(); servers.forEach { $0.stop() } }
        XCTAssertTrue(engine.state.asyncReads)
        let store = try servers[0].openStore(volumeID: Self.asyncVolume)
        let blocks = 16
        for b in 0..<blocks { XCTAssertEqual(Self.write(fd, b * 4096, 4096, 1), 0) }

        let load = RacingLoad(fd: fd, blocks: blocks)
        let stopSnapshots = Atomic<Bool>(false)
        let snapshotFailures = Atomic<Int>(0), snapshots = Atomic<Int>(0)
        let group = DispatchGroup()
        group.enter()
        Thread {
            var k = 0
            while !stopSnapshots.load(ordering: .relaxed) {
                do {
                    _ = try store.snapshot(id: "s\(k)", epoch: 3)
                    usleep(2_000)
                    try store.deleteSnapshot(id: "s\(k)", epoch: 3)
                    snapshots.wrappingAdd(1, ordering: .relaxed)
                } catch {
                    snapshotFailures.wrappingAdd(1, ordering: .relaxed)
                }
                k += 1
            }
            group.leave()
        }.start()

        // Each of the two counters must move at least once every 30 s.
        var last = (-1, -1), moved = (Date(), Date())
        func watch() {
            let now = (load.done.load(ordering: .relaxed), snapshots.load(ordering: .relaxed))
            if now.0 != last.0 { moved.0 = Date() }
            if now.1 != last.1 { moved.1 = Date() }
            last = now
            if min(moved.0, moved.1).timeIntervalSinceNow < -30 {
                fatalError("the volume's I/O or its snapshots stopped for 30 s: a deadlock between a redone read and a snapshot deletion")
            }
        }
        let until = Date().addingTimeInterval(8)
        while Date() < until {
            usleep(200_000)
            watch()
        }
        stopSnapshots.store(true, ordering: .relaxed)
        load.stop.store(true, ordering: .relaxed)
        while group.wait(timeout: .now() + 1) == .timedOut || load.group.wait(timeout: .now() + 1) == .timedOut {
            // The snapshots stop on purpose now: only the I/O must move.
            moved.1 = Date()
            watch()
        }
        XCTAssertEqual(load.failed.load(ordering: .relaxed), 0, "a read or write failed")
        XCTAssertEqual(load.torn.load(ordering: .relaxed), 0, "a read answered a mix of two versions of a block")
        XCTAssertEqual(snapshotFailures.load(ordering: .relaxed), 0, "a snapshot or its deletion failed")
        XCTAssertGreaterThan(snapshots.load(ordering: .relaxed), 10)
        XCTAssertGreaterThan(engine.state.readsRedone, 0, "no read raced a write: the test did not test the redo")
        XCTAssertTrue(recorder.nodeIDs.isEmpty, "a replica was recorded out of sync: \(recorder.nodeIDs)")
    }

    /// Real damage on the local replica still is damage: the read that finds it is answered
    /// from n2 and the local copy repaired.
    func testADamagedBlockFoundByAnAsynchronousReadIsAnsweredFromAnotherReplicaAndRepaired() throws {
        try damagedBlockIsAnsweredFromAnotherReplicaAndRepaired(inline: false)
    }

    /// The same damage found by a lone read its worker read itself.
    func testADamagedBlockFoundByALoneReadIsAnsweredFromAnotherReplicaAndRepaired() throws {
        try damagedBlockIsAnsweredFromAnotherReplicaAndRepaired(inline: true)
    }

    private func damagedBlockIsAnsweredFromAnotherReplicaAndRepaired(inline: Bool) throws {
        let (engine, servers, fd) = try asyncEngine(inline: inline)
        defer { close(fd); engine.stop(); servers.forEach { $0.stop() } }
        XCTAssertTrue(engine.state.asyncReads)
        XCTAssertEqual(Self.write(fd, 4096 * 10, 4096, 0x6C), 0)
        XCTAssertEqual(fsync(fd), 0)

        // Flip bytes of block 10 in n1's data file, as the store reads it (O_DIRECT).
        let layers = dir + "/n1/replicas/\(Self.asyncVolume)/layers"
        let head = try XCTUnwrap(try FileManager.default.contentsOfDirectory(atPath: layers).sorted().last)
        let data = Glibc.open("\(layers)/\(head)/data", O_RDWR | 0o40000)
        XCTAssertGreaterThanOrEqual(data, 0)
        Self.withAligned(4096, fill: 0) { buffer in
            XCTAssertEqual(pread(data, buffer, 4096, 4096 * 10), 4096)
            buffer.storeBytes(of: 0x5A5A_5A5A as UInt32, toByteOffset: 200, as: UInt32.self)
            XCTAssertEqual(pwrite(data, buffer, 4096, 4096 * 10), 4096)
        }
        close(data)

        let (e, got) = Self.read(fd, 4096 * 10, 4096)
        XCTAssertEqual(e, 0)
        XCTAssertEqual(got, [UInt8](repeating: 0x6C, count: 4096), "answered from n2")
        XCTAssertGreaterThanOrEqual(engine.state.readsRedone, 1)
        if inline { XCTAssertGreaterThanOrEqual(engine.state.readsInline, 1, "the damaged read was read by its worker") }
        XCTAssertEqual(engine.state.repairedBlocks, 1, "the local copy is repaired")
        let store = try servers[0].openStore(volumeID: Self.asyncVolume)
        XCTAssertEqual(try store.read(offset: 4096 * 10, length: 4096, epoch: 3), [UInt8](repeating: 0x6C, count: 4096))
        XCTAssertEqual(engine.state.inSync, ["n1", "n2"])
    }
}
