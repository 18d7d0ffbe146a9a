import CairnCluster
import CairnCore
import CairnEngine
import CairnReplica
import CairnStore
import Foundation
import Logging
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// `ReplicatedBacking`'s snapshot, clone, growth and QoS calls against two real replica servers
/// on 127.0.0.1 (nodes n1 and n2) and an SQLite store; the attached case runs a real engine over
/// FUSE on n1. Every engine, server and directory is removed in tearDown, passed or not.
final class ReplicatedBackingSnapshotTests: XCTestCase {
    var dir = ""
    var servers: [ReplicaServer] = []
    var backing: ReplicatedBacking?
    var store: SQLiteStore?
    let logger = Logger(label: "backing-snapshot-test")
    let size: Int64 = 16 << 20
    let bs = 4096

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-backing-snap-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for node in ["n1", "n2"] {
            let server = try ReplicaServer(dataDir: dir + "/" + node, host: "127.0.0.1", port: 0, logger: logger)
            try server.start()
            servers.append(server)
        }
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        self.store = store
        let backing = try ReplicatedBacking(dataDir: dir + "/n1", nodeID: "n1", store: store, logger: logger)
        backing.serveLocalReplicas(from: servers[0])
        self.backing = backing
    }

    override func tearDown() async throws {
        if let backing {
            for id in ["vol-src", "vol-two"] { try? await backing.deactivate(volumeID: id) }
        }
        for server in servers { server.stop() }
        servers = []
        if !dir.isEmpty {
            let mountinfo = (ProcFile.textIfReadable("/proc/self/mountinfo")) ?? ""
            XCTAssertFalse(mountinfo.contains(dir), "a mount under \(dir) survived the test")
            if !mountinfo.contains(dir) { try? FileManager.default.removeItem(atPath: dir) }
        }
    }

    private func record(_ id: String, size: Int64? = nil, epoch: FencingEpoch = 1) -> VolumeRecord {
        VolumeRecord(id: id, name: id, capacityBytes: size ?? self.size, parameters: [:], fsType: "", accessModes: [7],
                     accessibleTopology: [:], epoch: epoch,
                     replicas: servers.enumerated().map { ReplicaRecord(nodeID: "n\($0 + 1)", address: "127.0.0.1:\($1.boundPort)") })
    }

    private func client(_ node: Int) throws -> ReplicaClient {
        try ReplicaClient(host: "127.0.0.1", port: servers[node].boundPort)
    }

    private func block(_ byte: UInt8) -> [UInt8] { [UInt8](repeating: byte, count: bs) }

    func testDetachedSnapshotCloneDeleteAndGrowReachEveryReplica() async throws {
        let backing = try XCTUnwrap(backing)
        let source = record("vol-src")
        try await backing.create(source)
        for node in 0..<2 {
            let c = try client(node)
            defer { c.close() }
            _ = try c.claim(volumeID: "vol-src", epoch: 1)
            try block(0xA1).withUnsafeBytes { try c.write(volumeID: "vol-src", offset: 0, data: $0, generation: 1, epoch: 1) }
        }
        let holders = try await backing.snapshot(volume: source, snapshotID: "snap-1", attachedNode: nil)
        XCTAssertEqual(holders, ["n1", "n2"])
        let again = try await backing.snapshot(volume: source, snapshotID: "snap-1", attachedNode: nil)
        XCTAssertEqual(again, ["n1", "n2"], "idempotent")
        do {
            _ = try await backing.snapshot(volume: source, snapshotID: "bad/id", attachedNode: nil)
            XCTFail("a bad snapshot id was accepted")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .invalidArgument)
        }
        // Writes after the snapshot are not in it.
        for node in 0..<2 {
            let c = try client(node)
            defer { c.close() }
            try block(0xB2).withUnsafeBytes { try c.write(volumeID: "vol-src", offset: 0, data: $0, generation: 2, epoch: 1) }
        }

        let clone = record("vol-clone", size: 2 * size, epoch: 0)
        try await backing.clone(source: source, snapshotID: "snap-1", into: clone)
        try await backing.clone(source: source, snapshotID: "snap-1", into: clone)  // idempotent
        for node in 0..<2 {
            let c = try client(node)
            defer { c.close() }
            XCTAssertEqual(try c.read(volumeID: "vol-clone", offset: 0, length: bs, epoch: 0), block(0xA1))
            XCTAssertEqual(try c.status(volumeID: "vol-clone", epoch: 0).size, UInt64(2 * size))
        }
        do {
            try await backing.clone(source: source, snapshotID: "nope", into: record("vol-x"))
            XCTFail("a clone of a missing snapshot was made")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .notFound)
        }

        try await backing.deleteSnapshot(volume: source, snapshotID: "snap-1")
        try await backing.deleteSnapshot(volume: source, snapshotID: "snap-1")
        try await backing.grow(volume: source, to: 2 * size)
        for node in 0..<2 {
            let c = try client(node)
            defer { c.close() }
            XCTAssertEqual(try c.listSnapshots(volumeID: "vol-src", epoch: 1), [])
            XCTAssertEqual(try c.read(volumeID: "vol-src", offset: 0, length: bs, epoch: 1), block(0xB2))
            XCTAssertEqual(try c.status(volumeID: "vol-src", epoch: 1).size, UInt64(2 * size))
            XCTAssertEqual(try c.read(volumeID: "vol-clone", offset: 0, length: bs, epoch: 0), block(0xA1), "the clone outlives the snapshot")
        }
        XCTAssertFalse(backing.setLimits(volumeID: "vol-src", iops: 100, bandwidth: 0), "no engine runs it here")
        // A node that is away: deleting there is best effort and the call succeeds.
        servers[1].stop()
        try await backing.deleteSnapshot(volume: source, snapshotID: "snap-2")
    }

    func testAGroupSnapshotHoldsTheAttachedVolumesAtOneBarrierAndSnapshotsTheDetachedOne() async throws {
        try XCTSkipUnless(getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/fuse"), "needs root and /dev/fuse")
        let backing = try XCTUnwrap(backing), store = try XCTUnwrap(store)
        var files: [Int32] = []
        defer { files.forEach { close($0) } }
        for id in ["vol-src", "vol-two"] {
            let volume = record(id)
            try await store.createVolume(volume)
            try await backing.create(volume)
            let fd = open(try await backing.activate(volume, epoch: 1), O_RDWR)
            XCTAssertGreaterThanOrEqual(fd, 0)
            files.append(fd)
            XCTAssertEqual(block(0xE5).withUnsafeBytes { pwrite(fd, $0.baseAddress, bs, 0) }, bs)
        }
        let detached = record("vol-idle")
        try await backing.create(detached)
        let nodes = try await backing.groupSnapshot([
            member(record("vol-src"), "g1-src", attachedNode: "n1"),
            member(record("vol-two"), "g1-two", attachedNode: "n1"),
            member(detached, "g1-idle", attachedNode: nil),
        ])
        XCTAssertEqual(nodes.mapValues { $0.sorted() }, ["vol-src": ["n1", "n2"], "vol-two": ["n1", "n2"], "vol-idle": ["n1", "n2"]])
        for node in 0..<2 {
            let c = try client(node)
            defer { c.close() }
            for (id, snap) in [("vol-src", "g1-src"), ("vol-two", "g1-two"), ("vol-idle", "g1-idle")] {
                XCTAssertEqual(try c.listSnapshots(volumeID: id, epoch: 1).map(\.id), [snap], "\(id) on n\(node + 1)")
            }
        }
        // Every hold was released: writes go on at once (a hold left behind would stall them 30 s).
        var started = Date()
        for fd in files { XCTAssertEqual(block(0xF6).withUnsafeBytes { pwrite(fd, $0.baseAddress, bs, 4096) }, bs) }
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "a write waited for a hold the group snapshot left behind")
        // A member whose node runs no engine fails the group, and the holds taken are released.
        do {
            _ = try await backing.groupSnapshot([
                member(record("vol-src"), "g2-src", attachedNode: "n1"),
                member(record("vol-two"), "g2-two", attachedNode: "n2"),
            ])
            XCTFail("a group with a member on a node without its engine succeeded")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .unavailable)
        }
        started = Date()
        XCTAssertEqual(block(0x17).withUnsafeBytes { pwrite(files[0], $0.baseAddress, bs, 8192) }, bs)
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "vol-src's hold was not released after the group failed")
    }

    func testAnAttachedSnapshotGoesThroughTheEngineAndGrowthAndLimitsReachIt() async throws {
        try XCTSkipUnless(getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/fuse"), "needs root and /dev/fuse")
        let backing = try XCTUnwrap(backing), store = try XCTUnwrap(store)
        var source = record("vol-src")
        source.parameters = ["iopsLimit": "2000", "bandwidthLimit": "oops"]
        try await store.createVolume(source)
        try await backing.create(source)
        let file = try await backing.activate(source, epoch: 1)
        let fd = open(file, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        XCTAssertEqual(block(0xC3).withUnsafeBytes { pwrite(fd, $0.baseAddress, bs, 0) }, bs)

        let started = Date()
        let holders = try await backing.snapshot(volume: source, snapshotID: "snap-a", attachedNode: "n1")
        print(String(format: "barrier snapshot through the engine (2 replica stores, one local, one over TCP): %.1f ms",
                     Date().timeIntervalSince(started) * 1000))
        XCTAssertEqual(holders.sorted(), ["n1", "n2"])
        for node in 0..<2 {
            let c = try client(node)
            defer { c.close() }
            XCTAssertEqual(try c.listSnapshots(volumeID: "vol-src", epoch: 1).map(\.id), ["snap-a"])
        }
        // Published to n2, which runs no engine for it yet: taken on each in-sync replica,
        // after claiming it with the attachment's epoch (here the running engine's own, so
        // it is not fenced; a real older engine would be).
        let direct = try await backing.snapshot(volume: source, snapshotID: "snap-b", attachedNode: "n2")
        XCTAssertEqual(direct.sorted(), ["n1", "n2"])
        // The snapshot holds what was written before it, not what came after.
        XCTAssertEqual(block(0xD4).withUnsafeBytes { pwrite(fd, $0.baseAddress, bs, 0) }, bs)
        XCTAssertEqual(fsync(fd), 0)
        let clone = record("vol-clone", epoch: 0)
        try await backing.clone(source: source, snapshotID: "snap-a", into: clone)
        let c = try client(1)
        defer { c.close() }
        XCTAssertEqual(try c.read(volumeID: "vol-clone", offset: 0, length: bs, epoch: 0), block(0xC3))
        XCTAssertEqual(try c.read(volumeID: "vol-src", offset: 0, length: bs, epoch: 1), block(0xD4))

        try await backing.grow(volume: source, to: 2 * size)
        var st = stat()
        XCTAssertEqual(stat(file, &st), 0)
        XCTAssertEqual(Int64(st.st_size), 2 * size, "the running engine grew the file")
        XCTAssertTrue(backing.setLimits(volumeID: "vol-src", iops: 0, bandwidth: 0))
    }

    /// A group member as the controller passes it: the snapshot's record, the volume, where it is attached.
    func member(_ volume: VolumeRecord, _ snapshotID: String, attachedNode: String?) -> GroupSnapshotMember {
        GroupSnapshotMember(snapshot: SnapshotRecord(id: snapshotID, name: snapshotID, sourceVolumeID: volume.id, sizeBytes: volume.capacityBytes),
                            volume: volume, use: VolumeUse(attachedNode: attachedNode))
    }
}
