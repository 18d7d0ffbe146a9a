import CairnAgent
import CairnCore
import CairnRPC
import CairnStore
import Foundation
import Logging
import Synchronization
import XCTest

/// The split node role's NodeBacking: AgentBacking → the agent protocol → AgentService → the
/// agent's own backing, in process on a temporary unix socket, with the agent reading volume
/// records from its store.
final class AgentBackingTests: XCTestCase {
    let dir = "/tmp/cairn-agentbacking-\(UUID().uuidString.prefix(8))"
    /// The node role's side.
    var backing: AgentBacking!
    /// Behind the socket: the agent's server, its own backing and its store.
    var agent: (server: GRPCServer, backing: RecordingNodeBacking, store: SQLiteStore)!
    var store: SQLiteStore { agent.store }
    var agentBacking: RecordingNodeBacking { agent.backing }

    override func setUp() async throws {
        try FileManager.default.createDirectory(atPath: dir + "/data/volumes", withIntermediateDirectories: true)
        let logger = Logger(label: "test")
        let store = try SQLiteStore(path: dir + "/cairn.db", logger: logger)
        let agentBacking = RecordingNodeBacking(file: dir + "/data/engines/vol-1/volume")
        let service = AgentService(mounter: NodeFakeMounter(),
                                   confinement: AgentConfinement(pathRoots: [dir], volumesDirectory: dir + "/data/volumes",
                                                                 enginesDirectory: dir + "/data/engines"),
                                   hotPlug: nil, backing: agentBacking, store: store, nodeID: "n1", logger: logger)
        let router = Router()
        service.register(on: router)
        let server = GRPCServer(router: router, logger: logger)
        try server.start(endpoints: ["unix://\(dir)/agent.sock"], socketMode: 0o600)
        agent = (server, agentBacking, store)
        backing = AgentBacking(client: try AgentClient(socket: dir + "/agent.sock", logger: logger))
        for id in ["vol-1", "vol-2"] {
            try await store.createVolume(VolumeRecord(id: id, name: "pvc-\(id)", capacityBytes: 64 << 20, parameters: [:],
                                                      fsType: "", accessModes: [], accessibleTopology: [:]))
        }
        _ = try await store.attach(volumeID: "vol-1", nodeID: "n1", readonly: false, accessMode: 1, exclusive: true, nodeLimit: 0)
    }

    override func tearDown() async throws {
        await agent?.server.shutdown(grace: .seconds(1))
        try? FileManager.default.removeItem(atPath: dir)
    }

    func volume(_ id: String) async throws -> VolumeRecord { try await store.volume(id: id)! }
    func attachedEpoch() async throws -> FencingEpoch { try await store.attachments(volumeID: "vol-1").first!.epoch }

    /// The engine's epoch is what fences: the agent takes it from its own store, and refuses a
    /// request that names another (a stale node call, or a caller trying to fence the writer).
    func testTheAgentActivatesOnlyWithTheAttachmentsEpochFromItsStore() async throws {
        let vol = try await volume("vol-1")
        let epoch = try await attachedEpoch()
        await assertStatus(.failedPrecondition) { try await self.backing.activate(vol, epoch: epoch.next) }
        await assertStatus(.failedPrecondition) { try await self.backing.activate(vol, epoch: FencingEpoch(epoch.rawValue - 1)) }
        XCTAssertEqual(agentBacking.calls.withLock { $0 }, [], "the agent's backing was never asked")
    }

    func testEveryStepReachesTheAgentsBackingWithTheAgentsRecord() async throws {
        let vol = try await volume("vol-1")
        let file = try await backing.file(volumeID: "vol-1")
        XCTAssertEqual(file, dir + "/data/engines/vol-1/volume")
        let epoch = try await attachedEpoch()
        let activated = try await backing.activate(vol, epoch: epoch)
        XCTAssertEqual(activated, file)
        agentBacking.condition.withLock {
            $0 = BackingCondition(problem: "degraded: 2 of 3 replicas in sync", healthy: "healthy: 3 of 3", stageBlocker: nil)
        }
        let degraded = try await backing.condition(vol)
        XCTAssertEqual(degraded, BackingCondition(problem: "degraded: 2 of 3 replicas in sync", healthy: "healthy: 3 of 3", stageBlocker: nil))
        agentBacking.condition.withLock { $0 = BackingCondition(problem: nil, healthy: "healthy", stageBlocker: "fenced") }
        let blocked = try await backing.condition(vol)
        XCTAssertEqual(blocked, BackingCondition(problem: nil, healthy: "healthy", stageBlocker: "fenced"))
        try await backing.expandOnNode(vol)
        try await backing.deactivate(volumeID: "vol-1")
        XCTAssertEqual(agentBacking.calls.withLock { $0 }, ["file vol-1", "activate vol-1 epoch=\(epoch.rawValue)", "condition vol-1",
                                                            "condition vol-1", "expand vol-1", "deactivate vol-1"])
    }

    func testTheAgentStartsNoEngineForAVolumeNotAttachedToItsNode() async throws {
        let vol = try await volume("vol-2")
        await assertStatus(.failedPrecondition) { try await self.backing.activate(vol, epoch: 1) }
        await assertStatus(.failedPrecondition) { try await self.backing.expandOnNode(vol) }
        await assertStatus(.invalidArgument) { try await self.backing.file(volumeID: "../etc") }
        var gone = vol
        gone.id = "vol-gone"
        await assertStatus(.notFound) { try await self.backing.condition(gone) }
        XCTAssertEqual(agentBacking.calls.withLock { $0 }, [], "the agent's backing was never asked")
    }

    func testTheBackingsErrorKeepsItsCodeAndMessageAcrossTheSocket() async throws {
        agentBacking.failure.withLock { $0 = CairnError.failedPrecondition("volume vol-1 has no replica in sync (n2: gone)") }
        do {
            _ = try await backing.activate(try await volume("vol-1"), epoch: try await attachedEpoch())
            XCTFail("expected the agent's error")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .failedPrecondition)
            XCTAssertEqual(error.message, "volume vol-1 has no replica in sync (n2: gone)")
        }
        agentBacking.failure.withLock { $0 = CairnError.unavailable("the metadata store did not answer") }
        do {
            try await backing.deactivate(volumeID: "vol-1")
            XCTFail("expected the agent's error")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .unavailable)
            XCTAssertEqual(error.message, "the metadata store did not answer", "the agent's own UNAVAILABLE is not 'cannot reach'")
        }
    }

    func testTheAgentAttachesEngineFilesOfValidVolumesOnly() throws {
        let confinement = AgentConfinement(pathRoots: [dir], volumesDirectory: dir + "/data/volumes",
                                           enginesDirectory: dir + "/data/engines")
        XCTAssertNoThrow(try confinement.backingFile(dir + "/data/engines/vol-1/volume"))
        XCTAssertNoThrow(try confinement.listedFile("/volume"), "a detached engine file's devices may be listed")
        for refused in [dir + "/data/engines/vol-1/other", dir + "/data/engines/a/b/volume", dir + "/data/engines/../x/volume",
                        "/volume-x", dir + "/data/engines/volume"] {
            XCTAssertThrowsError(try confinement.backingFile(refused), refused)
        }
        XCTAssertThrowsError(try confinement.backingFile("/volume"), "/volume is never attached")
        let oneMachine = AgentConfinement(pathRoots: [dir], volumesDirectory: dir + "/data/volumes")
        XCTAssertThrowsError(try oneMachine.backingFile(dir + "/data/engines/vol-1/volume"), "no engines on one machine")
    }
}

/// A NodeBacking that records its calls and answers what the test sets.
final class RecordingNodeBacking: NodeBacking {
    let file: String
    let calls = Mutex<[String]>([])
    let condition = Mutex(BackingCondition(problem: nil, healthy: "healthy", stageBlocker: nil))
    let failure = Mutex<CairnError?>(nil)

    init(file: String) { self.file = file }

    private func record(_ call: String) throws {
        if let failure = failure.withLock({ $0 }) { throw failure }
        calls.withLock { $0.append(call) }
    }

    func file(volumeID: String) throws -> String {
        try record("file \(volumeID)")
        return file
    }

    func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) throws -> String {
        try record("activate \(volume.id) epoch=\(epoch.rawValue)")
        return file
    }

    func deactivate(volumeID: String) throws { try record("deactivate \(volumeID)") }

    func condition(_ volume: VolumeRecord) throws -> BackingCondition {
        try record("condition \(volume.id)")
        return condition.withLock { $0 }
    }

    func expandOnNode(_ volume: VolumeRecord) throws { try record("expand \(volume.id)") }
}
