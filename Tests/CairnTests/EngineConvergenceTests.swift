@testable import CairnCluster
import CairnCore
@testable import CairnEngine
import CairnReplica
import Foundation
import Logging
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Convergence at claim (docs/recovery.md, "Convergence after failover") and `minInSync`:
/// in-sync replicas that an earlier engine left different (writes that reached a subset, then
/// the engine died) are identical before the next engine serves its first read.
extension EngineFUSETests {
    func testDivergentInSyncReplicasAreRolledForwardBeforeTheFirstRead() throws {
        let fakes = fakes(3)
        // What an earlier engine (epoch 4) left: an acknowledged write everywhere, then writes
        // that failed and reached only some replicas.
        for fake in fakes { fake.tamper(block: 5, byte: 0x10, generation: 10) }
        fakes[1].tamper(block: 5, byte: 0x12, generation: 12)   // n2 and n3 got the failed write,
        fakes[2].tamper(block: 5, byte: 0x12, generation: 12)   // n1 did not
        fakes[1].tamper(block: 7, byte: 0x09, generation: 9)    // never written on n1 and n3
        fakes[0].tamper(block: 300, byte: 0x0B, generation: 11) // another region, only n1
        for fake in fakes { fake.tamper(block: 600, byte: 0x0D, generation: 13) }
        fakes[2].state.withLock { s in                           // a trim that reached only n3
            for i in 600 * 4096..<601 * 4096 { s.data[i] = 0 }
            s.generations[600] = 15 | BlockGenerations.trimmedBit
        }
        let engine = makeEngine(fakes, epoch: 5)
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)

        for fake in fakes.dropFirst() {
            XCTAssertTrue(fake.bytes(0, Self.size) == fakes[0].bytes(0, Self.size), "\(fake.nodeID) differs from n1 after the claim")
            XCTAssertEqual(fake.state.withLock { $0.generations }, fakes[0].state.withLock { $0.generations },
                           "\(fake.nodeID)'s generations differ from n1's")
        }
        // The newest version won everywhere: nothing acknowledged was rolled back.
        XCTAssertEqual(fakes[0].bytes(5 * 4096, 4096), [UInt8](repeating: 0x12, count: 4096))
        XCTAssertEqual(fakes[0].bytes(7 * 4096, 4096), [UInt8](repeating: 0x09, count: 4096))
        XCTAssertEqual(fakes[1].bytes(300 * 4096, 4096), [UInt8](repeating: 0x0B, count: 4096))
        XCTAssertEqual(fakes[0].bytes(600 * 4096, 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertEqual(fakes[0].state.withLock { $0.generations[600] }, 15 | BlockGenerations.trimmedBit)
        // Reads through the volume file agree with every replica.
        XCTAssertEqual(Self.read(fd, 5 * 4096, 4096).1, [UInt8](repeating: 0x12, count: 4096))
        XCTAssertTrue(recorder.nodeIDs.isEmpty, "no replica was recorded out of sync")
        // Only the differing blocks moved: 3 blocks to n1 (5) or n2, n3 — counted per target.
        let copied = fakes.map { f in f.state.withLock { $0.resyncBytes } }
        XCTAssertEqual(copied, [2 * 4096, 4096, 2 * 4096], "n1 gets 5 and 7; n2 gets 300 (and 600 as a trim); n3 gets 7 and 300")
    }

    func testAnEngineNeverReusesAGenerationAnEarlierEngineLeftOnAnUnreachableReplica() throws {
        let fakes = fakes(3)
        // The epoch-4 engine's last write of block 3 reached only n3, which is now unreachable.
        let earlier = (UInt64(4) << VolumeEngine.epochShift) + 7
        fakes[2].tamper(block: 3, byte: 0x77, generation: earlier)
        fakes[2].state.withLock { $0.claimFailure = FakeFailure(description: "n3 is unreachable") }
        let engine = makeEngine(fakes, epoch: 5)
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        XCTAssertEqual(Self.write(fd, 3 * 4096, 4096, 0x55), 0)
        let written = fakes[0].state.withLock { $0.generations[3] }
        XCTAssertGreaterThan(written, earlier, "the new engine's write must be newer than anything an older engine numbered")
        XCTAssertEqual(VolumeEngine.firstGeneration(epoch: 5, highest: 9), 5 << VolumeEngine.epochShift)
        XCTAssertEqual(VolumeEngine.firstGeneration(epoch: 5, highest: (6 << VolumeEngine.epochShift)), 6 << VolumeEngine.epochShift)
    }

    func testAnExpansionCutOffHalfwayLeavesNoReplicaSmallerThanTheOthersAfterTheClaim() throws {
        let fakes = fakes(3)
        // ControllerExpandVolume grew n2, then its node died before n1 and n3 (and the record).
        try fakes[1].grow(volumeID: "vol-a", sizeBytes: UInt64(Self.size + (16 << 20)), epoch: 4)
        let engine = makeEngine(fakes)
        _ = try engine.start()
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.data.count } }, [Int](repeating: Self.size + (16 << 20), count: 3))
        XCTAssertEqual(engine.sizeBytes, UInt64(Self.size), "the volume keeps its recorded size")
    }

    func testIdenticalReplicasCostOnlyTheirDigestsAtClaim() throws {
        let fakes = fakes(3)
        for fake in fakes { fake.tamper(block: 42, byte: 0x42, generation: 42) }
        let engine = makeEngine(fakes)
        _ = try engine.start()
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.resyncBytes } }, [0, 0, 0])
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.generationCalls } }, [0, 0, 0],
                       "equal digests: no block generations were read")
    }

    func testWithoutARestartOnlyTheLoggedRegionsAreComparedAndTheWatermarkSettlesThem() throws {
        let fakes = fakes(3)
        // Replicas whose processes did not restart: their logs know what was written.
        for fake in fakes { _ = fake.log.settle(cleanThrough: 0, converged: true) }
        fakes[1].tamper(block: 2000, byte: 0x20, generation: 20)   // region 7, only n2
        let store = RecoveryStore(replicas(fakes))
        let engine = makeEngine(fakes, recovery: store.hooks())
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.summaryCalls } }, [0, 0, 0], "no digest of the whole volume")
        XCTAssertEqual(fakes[0].bytes(2000 * 4096, 4096), [UInt8](repeating: 0x20, count: 4096))
        XCTAssertEqual(fakes[2].bytes(2000 * 4096, 4096), [UInt8](repeating: 0x20, count: 4096))
        for fake in fakes {
            XCTAssertEqual(try fake.activity(volumeID: "vol-a", cleanThrough: 0, converged: false, epoch: 5),
                           ReplicaActivity(all: false, regions: []), "\(fake.nodeID)'s log is settled after the claim")
        }
        // Writes are logged until the recovery thread's watermark passes them.
        XCTAssertEqual(Self.write(fd, 3 << 20, 4096, 0x33), 0)
        waitUntil(5, "the watermark to settle the write") {
            fakes.allSatisfy { (try? $0.activity(volumeID: "vol-a", cleanThrough: 0, converged: false, epoch: 5))?.regions == [] }
        }
        // A write that fails after it was sent stops the watermark: its region stays logged.
        recorder.failing.withLock { $0 = FakeFailure(description: "store unreachable") }
        fakes[2].fail(with: FakeFailure(description: "n3 cut off"))
        XCTAssertEqual(Self.write(fd, 5 << 20, 4096, 0x55), EIO)
        XCTAssertEqual(Self.write(fd, 6 << 20, 4096, 0x66), EIO)
        usleep(600_000)
        XCTAssertEqual(try fakes[0].activity(volumeID: "vol-a", cleanThrough: 0, converged: false, epoch: 5).regions, [5, 6])
    }

    func testAReplicaFailingWhileConvergingIsRecordedOutOfSyncAndTheRestConverge() throws {
        let fakes = fakes(3)
        fakes[1].tamper(block: 9, byte: 0x19, generation: 19)
        // n3 answers the claim, then fails everything after it.
        let failing = FailAfterClaim(fakes[2])
        let byNode: [String: any ReplicaIO] = ["n1": fakes[0], "n2": fakes[1], "n3": failing]
        let recorder = recorder
        let engine = VolumeEngine(
            volumeID: "vol-a", sizeBytes: UInt64(Self.size), epoch: 5,
            replicas: replicas(fakes), localNodeID: "n1", mountDirectory: dir + "/mnt-vol-a",
            connect: { byNode[$0.nodeID]! }, markOutOfSync: { try recorder.mark($0, $1) }, logger: logger)
        engines.append(engine)
        _ = try engine.start()
        XCTAssertEqual(recorder.nodeIDs, ["n3"])
        XCTAssertEqual(engine.state.inSync, ["n1", "n2"])
        XCTAssertEqual(fakes[0].bytes(9 * 4096, 4096), [UInt8](repeating: 0x19, count: 4096))
    }

    func testMinInSyncRefusesWritesBelowItAndServesThemOnceAReplicaRejoins() throws {
        let fakes = fakes(3)
        let store = RecoveryStore(replicas(fakes))
        let engine = makeEngine(fakes, recovery: store.hooks())
        engine.setMinInSync(2)
        let fd = try Self.open(try engine.start())
        openFiles.append(fd)
        XCTAssertEqual(Self.write(fd, 0, 4096, 0x01), 0)
        fakes[1].fail(with: FakeFailure(description: "n2 is down"))
        fakes[2].fail(with: FakeFailure(description: "n3 is down"))
        // The write that finds the replicas gone reaches only n1: not acknowledged.
        XCTAssertEqual(Self.write(fd, 4096, 4096, 0x02), EIO)
        XCTAssertEqual(engine.state.inSync, ["n1"])
        XCTAssertEqual(Self.write(fd, 8192, 4096, 0x03), EIO, "writes are refused while 1 < minInSync")
        XCTAssertEqual(Self.read(fd, 0, 4096).1, [UInt8](repeating: 0x01, count: 4096), "reads go on")
        XCTAssertGreaterThanOrEqual(engine.state.refusedBelowMinInSync, 2)
        XCTAssertEqual(fakes[1].state.withLock { $0.generations[2] }, 0, "a refused write is sent nowhere")
        fakes[1].fail(with: nil)
        waitUntil(10, "n2 to rejoin") { store.inSync.withLock { $0 }.contains("n2") }
        XCTAssertEqual(Self.write(fd, 8192, 4096, 0x03), 0, "served again with 2 replicas in sync")
        XCTAssertEqual(fakes[1].bytes(8192, 4096), [UInt8](repeating: 0x03, count: 4096))
    }

    /// The same over three real replica servers (real stores on disk, the data protocol on
    /// 127.0.0.1): a write that reached a subset of them is on all of them after the next claim.
    func testRealReplicasLeftDivergentByAFailedWriteAreIdenticalAfterTheNextClaim() throws {
        var servers: [ReplicaServer] = []
        defer { servers.forEach { $0.stop() } }
        for node in ["n1", "n2", "n3"] {
            let server = try ReplicaServer(dataDir: dir + "/" + node, host: "127.0.0.1", port: 0, logger: logger)
            try server.start()
            servers.append(server)
        }
        let volume = "vol-conv", size = 8 << 20
        func client(_ i: Int) throws -> ReplicaClient { try ReplicaClient(host: "127.0.0.1", port: servers[i].boundPort) }
        let block = { (byte: UInt8) in [UInt8](repeating: byte, count: 4096) }
        for i in 0..<3 {
            let c = try client(i)
            defer { c.close() }
            try c.create(volumeID: volume, sizeBytes: UInt64(size))
            _ = try c.claim(volumeID: volume, epoch: 4)
            // Acknowledged everywhere.
            try block(0xA0).withUnsafeBytes { try c.write(volumeID: volume, offset: 0, data: $0, generation: 1, epoch: 4) }
            try block(0xA1).withUnsafeBytes { try c.write(volumeID: volume, offset: 4096 * 100, data: $0, generation: 2, epoch: 4) }
        }
        // The earlier engine's last writes, cut off: generation 3 reached n2 and n3, generation 4 only n1.
        for i in [1, 2] {
            let c = try client(i)
            defer { c.close() }
            try block(0xB3).withUnsafeBytes { try c.write(volumeID: volume, offset: 4096 * 100, data: $0, generation: 3, epoch: 4) }
        }
        do {
            let c = try client(0)
            defer { c.close() }
            try block(0xB4).withUnsafeBytes { try c.write(volumeID: volume, offset: 4096 * 1000, data: $0, generation: 4, epoch: 4) }
        }
        let engine = VolumeEngine(
            volumeID: volume, sizeBytes: UInt64(size), epoch: 5,
            replicas: servers.enumerated().map { EngineReplica(nodeID: "n\($0 + 1)", host: "127.0.0.1", port: $1.boundPort) },
            localNodeID: "n1", mountDirectory: dir + "/mnt-conv",
            connect: { ClientReplicaIO(try ReplicaClient(host: $0.host, port: $0.port)) },
            markOutOfSync: { [recorder] in try recorder.mark($0, $1) }, logger: logger)
        engines.append(engine)
        defer { engine.stop() }  // before the servers stop
        let fd = try Self.open(try engine.start())
        defer { close(fd) }

        var contents: [[UInt8]] = []
        var generations: [[UInt64]] = []
        for i in 0..<3 {
            let c = try client(i)
            defer { c.close() }
            contents.append(try c.read(volumeID: volume, offset: 0, length: size, epoch: 5))
            generations.append(try c.generations(volumeID: volume, firstBlock: 0, count: size / 4096, epoch: 5))
        }
        XCTAssertTrue(contents[1] == contents[0] && contents[2] == contents[0], "in-sync replicas differ after the claim")
        XCTAssertEqual(generations[1], generations[0])
        XCTAssertEqual(generations[2], generations[0])
        XCTAssertEqual(Array(contents[0][4096 * 100..<4096 * 101]), block(0xB3))
        XCTAssertEqual(Array(contents[0][4096 * 1000..<4096 * 1001]), block(0xB4))
        XCTAssertEqual(Self.read(fd, 4096 * 1000, 4096).1, block(0xB4))
        XCTAssertTrue(recorder.nodeIDs.isEmpty)
    }
}

/// A replica that answers its claim and fails every call after it.
private final class FailAfterClaim: ReplicaIO, @unchecked Sendable {
    let inner: FakeReplica
    init(_ inner: FakeReplica) { self.inner = inner }
    struct Down: Error, CustomStringConvertible { var description: String { "n3 went away after its claim" } }

    func claim(volumeID: String, epoch: UInt64) throws -> ReplicaStatus { try inner.claim(volumeID: volumeID, epoch: epoch) }
    func read(volumeID: String, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, epoch: UInt64) throws { throw Down() }
    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws { throw Down() }
    func flush(volumeID: String, epoch: UInt64) throws { throw Down() }
    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws { throw Down() }
    func close() { inner.close() }
    func generations(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] { throw Down() }
    func generationSummary(volumeID: String, firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] { throw Down() }
    func writeIfNewer(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int { throw Down() }
    func repairWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int { throw Down() }
    func trimIfNewer(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws -> Int { throw Down() }
    func verify(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] { throw Down() }
    func snapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws { throw Down() }
    func grow(volumeID: String, sizeBytes: UInt64, epoch: UInt64) throws { throw Down() }
    var wireBytes: (sent: UInt64, received: UInt64) { (0, 0) }
}

final class ActivityLogTests: XCTestCase {
    func testARestartedLogKnowsNothingUntilConverged() {
        let log = ActivityLog()
        log.note(offset: 0, length: 4096, generation: 1)
        XCTAssertEqual(log.settle(cleanThrough: 0, converged: false), .unknown)
        XCTAssertEqual(log.settle(cleanThrough: 0, converged: true), ReplicaActivity(all: false, regions: [0]))
    }

    func testRegionsAreSettledOnlyWhenTheWatermarkPassesTheirNewestWrite() {
        let log = ActivityLog()
        _ = log.settle(cleanThrough: 0, converged: true)
        log.note(offset: 3 << 20, length: 4096, generation: 5)
        log.note(offset: (4 << 20) - 4096, length: 8192, generation: 6)  // spans regions 3 and 4
        log.note(offset: 9 << 20, length: 4096, generation: 9)
        XCTAssertEqual(log.settle(cleanThrough: 0, converged: false).regions, [3, 4, 9])
        XCTAssertEqual(log.settle(cleanThrough: 5, converged: false).regions, [3, 4, 9], "region 3's newest write is 6")
        XCTAssertEqual(log.settle(cleanThrough: 6, converged: false).regions, [9])
        XCTAssertEqual(log.settle(cleanThrough: 9, converged: false).regions, [])
    }

    func testAnOverflowMeansEverythingUntilTheWatermarkPassesIt() {
        let log = ActivityLog()
        _ = log.settle(cleanThrough: 0, converged: true)
        log.note(offset: 0, length: (ActivityLog.maxTracked + 1) << 20, generation: 7)  // a discard of 64 GiB
        XCTAssertTrue(log.settle(cleanThrough: 6, converged: false).all)
        log.note(offset: 0, length: 4096, generation: 8)
        XCTAssertTrue(log.settle(cleanThrough: 7, converged: false).all, "generation 8 came during the overflow")
        XCTAssertEqual(log.settle(cleanThrough: 8, converged: false), ReplicaActivity(all: false, regions: []))
    }

    /// The log is sharded by region; one shard filling up overflows (everything until the
    /// watermark passes it), as the whole log did, and regions of other shards settle normally.
    func testAShardThatFillsUpOverflowsAndConcurrentNotesAreAllKept() {
        let log = ActivityLog()
        _ = log.settle(cleanThrough: 0, converged: true)
        let perShard = ActivityLog.maxTracked / ActivityLog.shardCount
        for i in 0...perShard {  // one more than a shard holds, all in shard 0
            log.note(offset: UInt64(i * ActivityLog.shardCount) << 20, length: 4096, generation: UInt64(10 + i))
        }
        XCTAssertTrue(log.settle(cleanThrough: 0, converged: false).all)
        XCTAssertEqual(log.settle(cleanThrough: UInt64(10 + perShard), converged: false), ReplicaActivity(all: false, regions: []))
        onThreads(8) { t in
            for i in 0..<200 { log.note(offset: UInt64(t * 1000 + i) << 20, length: 4096, generation: 100_000 + UInt64(i)) }
        }
        let left = log.settle(cleanThrough: UInt64(10 + perShard), converged: false)
        XCTAssertFalse(left.all)
        XCTAssertEqual(left.regions, (0..<8).flatMap { t in (0..<200).map { UInt64(t * 1000 + $0) } }.sorted())
    }

    func testTheReplicaStoreLogsWritesAndTrimsAndRefusesAStaleEngine() throws {
        let dir = NSTemporaryDirectory() + "cairn-activity-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ReplicaStore.create(directory: dir, volumeID: "vol-x", size: 16 << 20, logger: ReplicaStore.discardingLogger)
        try store.claim(epoch: 3)
        XCTAssertTrue(try store.activity(cleanThrough: 0, converged: false, epoch: 3).all, "a store just opened cannot tell")
        _ = try store.activity(cleanThrough: 0, converged: true, epoch: 3)
        try store.write(offset: 2 << 20, data: [UInt8](repeating: 1, count: 4096), generation: 4, epoch: 3)
        try store.trim(offset: 5 << 20, length: 8192, generation: 5, epoch: 3)
        XCTAssertEqual(try store.activity(cleanThrough: 0, converged: false, epoch: 3).regions, [2, 5])
        XCTAssertThrowsError(try store.activity(cleanThrough: 9, converged: true, epoch: 2), "a fenced engine settles nothing")
        XCTAssertEqual(try store.activity(cleanThrough: 5, converged: false, epoch: 3).regions, [])
    }
}
