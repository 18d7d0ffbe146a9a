import CSIProto
import CairnCSI
import CairnController
import CairnCore
import CairnCrypto
import CairnLocal
import CairnStore
import Foundation
import Logging
import Synchronization
import XCTest

/// CreateVolume and GetSnapshot with `backup:<target>/<id>` ids, against the real embedded store
/// and file backing, with a `BackupSource` that stands for the object store (the restore itself
/// is tested against a real S3 server in CairnIntegrationTests: BackupTests, BackupCSITests).
final class ControllerBackupSourceTests: XCTestCase {
    /// One backup `offsite/nightly` of 96 MiB, ext4; its restore writes a marker at offset 0,
    /// failing the first `failures` times (a restore cut off half-way).
    final class Source: BackupSource {
        let dir: String
        let calls = Mutex((restores: 0, failures: 0, secrets: [String: String](), deleted: Set<String>()))

        init(dir: String, failures: Int) {
            self.dir = dir
            calls.withLock { $0.failures = failures }
        }

        /// `offsite/sealed`: the backup of an encrypted volume, with its wrapped key.
        static let sealed = try! VolumeKeys.create(passphrase: "pass", iterations: 1000).0

        func describe(_ reference: BackupReference, secrets: [String: String]) async throws -> BackupDescription {
            switch reference {
            case BackupReference(target: "offsite", backupID: "nightly"):
                if calls.withLock({ $0.deleted.contains(reference.backupID) }) { throw CairnError.notFound("source snapshot \(reference) does not exist") }
                return BackupDescription(sourceVolumeID: "vol-db", sizeBytes: 96 << 20, fsType: "ext4", createdAt: Date(timeIntervalSince1970: 1_700_000_000), encryption: nil)
            case BackupReference(target: "offsite", backupID: "sealed"):
                return BackupDescription(sourceVolumeID: "vol-sealed", sizeBytes: 64 << 20, fsType: "", createdAt: Date(), encryption: Self.sealed)
            default:
                throw CairnError.notFound("source snapshot \(reference) does not exist")
            }
        }

        func delete(_ reference: BackupReference, secrets: [String: String]) async throws {
            calls.withLock { _ = $0.deleted.insert(reference.backupID) }
        }

        func restore(_ reference: BackupReference, into volume: VolumeRecord, secrets: [String: String]) async throws {
            let fail = calls.withLock { c -> Bool in
                c.restores += 1
                c.secrets = secrets
                if c.failures > 0 { c.failures -= 1; return true }
                return false
            }
            if fail { throw CairnError.unavailable("the object store went away half-way") }
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: dir + "/volumes/\(volume.id).img"))
            try handle.write(contentsOf: Data([7, 7, 7]))
            try handle.close()
        }
    }

    var dir = ""
    var store: SQLiteStore!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-bksrc-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        store = try SQLiteStore(path: dir + "/cairn.db", logger: Logger(label: "test"))
        try await store.registerNode(NodeRecord(id: "node-a", topology: [:], maxVolumes: 0))
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func controller(_ backups: (any BackupSource)?) throws -> ControllerService {
        ControllerService(store: store, backing: try LocalFileBacking(dataDir: dir), capacity: CapacityPolicy(poolBytes: 1 << 30),
                          localNodeID: "node-a", localTopology: [:], locks: VolumeLocks(), logger: Logger(label: "test"),
                          backups: backups)
    }

    func request(_ name: String, from snapshotID: String) -> Csi_V1_CreateVolumeRequest {
        var r = Csi_V1_CreateVolumeRequest()
        r.name = name
        r.capacityRange = .with { $0.requiredBytes = 64 << 20 }
        r.volumeCapabilities = [ControllerServiceTests.capability(block: false)]
        r.volumeContentSource.snapshot.snapshotID = snapshotID
        r.secrets = ["accessKeyID": "AK", "secretAccessKey": "SK"]
        return r
    }

    func testACreateVolumeFromABackupCutOffIsFinishedByItsRepeat() async throws {
        let source = Source(dir: dir, failures: 1)
        let controller = try controller(source)
        await assertStatus(.unavailable) { _ = try await controller.createVolume(self.request("r", from: "backup:offsite/nightly")) }
        let pending = try await store.volume(named: "r")
        XCTAssertEqual(pending?.contentPending, true, "the record is there, marked pending")
        await assertStatus(.failedPrecondition) {
            _ = try await controller.controllerPublishVolume(.with {
                $0.volumeID = pending!.id; $0.nodeID = "node-a"; $0.volumeCapability = ControllerServiceTests.capability(block: false)
            })
        }
        let volume = try await controller.createVolume(request("r", from: "backup:offsite/nightly")).volume
        XCTAssertEqual(volume.volumeID, pending?.id)
        XCTAssertEqual(volume.capacityBytes, 96 << 20, "a volume is at least as large as the backup")
        XCTAssertEqual(volume.volumeContext["fsType"], "ext4", "the backup's filesystem comes with it")
        XCTAssertEqual(volume.contentSource.snapshot.snapshotID, "backup:offsite/nightly")
        let data = try FileHandle(forReadingFrom: URL(fileURLWithPath: dir + "/volumes/\(volume.volumeID).img")).read(upToCount: 3)
        XCTAssertEqual(data.map(Array.init), [7, 7, 7])
        let record = try await store.volume(id: volume.volumeID)
        XCTAssertNil(record?.contentPending)
        let calls = source.calls.withLock { $0 }
        XCTAssertEqual(calls.restores, 2)
        XCTAssertEqual(calls.secrets["accessKeyID"], "AK", "the request's secrets reach the backup source")
        let again = try await controller.createVolume(request("r", from: "backup:offsite/nightly")).volume
        XCTAssertEqual(again.volumeID, volume.volumeID)
        XCTAssertEqual(source.calls.withLock { $0.restores }, 2, "a finished volume is not restored again")
    }

    func testBackupIDsAreCheckedAndGetSnapshotDescribesThem() async throws {
        let controller = try controller(Source(dir: dir, failures: 0))
        let got = try await controller.getSnapshot(.with { $0.snapshotID = "backup:offsite/nightly" }).snapshot
        XCTAssertTrue(got.readyToUse)
        XCTAssertEqual(got.sizeBytes, 96 << 20)
        XCTAssertEqual(got.creationTime.seconds, 1_700_000_000)
        await assertStatus(.notFound) { _ = try await controller.getSnapshot(.with { $0.snapshotID = "backup:offsite/other" }) }
        await assertStatus(.invalidArgument) { _ = try await controller.createVolume(self.request("a", from: "backup:offsite")) }
        await assertStatus(.invalidArgument) { _ = try await controller.createVolume(self.request("b", from: "backup:/x")) }
        await assertStatus(.notFound) { _ = try await controller.createVolume(self.request("c", from: "backup:offsite/other")) }
        let volumes = try await store.listVolumes(afterID: nil, limit: 0)
        XCTAssertEqual(volumes.count, 0, "a refused source leaves no volume")

        // ListSnapshots by a backup's id (how the external-snapshotter checks a pre-provisioned
        // content), then DeleteSnapshot of it; both idempotent.
        let listed = try await controller.listSnapshots(.with { $0.snapshotID = "backup:offsite/nightly" }).entries
        XCTAssertEqual(listed.map(\.snapshot.snapshotID), ["backup:offsite/nightly"])
        XCTAssertEqual(listed.first?.snapshot.sourceVolumeID, "vol-db")
        let unknown = try await controller.listSnapshots(.with { $0.snapshotID = "backup:offsite/other" }).entries
        XCTAssertEqual(unknown.count, 0)
        let otherVolume = try await controller.listSnapshots(.with {
            $0.snapshotID = "backup:offsite/nightly"; $0.sourceVolumeID = "vol-else"
        }).entries
        XCTAssertEqual(otherVolume.count, 0)
        let source = Source(dir: dir, failures: 0)
        let deleting = try self.controller(source)
        _ = try await deleting.deleteSnapshot(.with { $0.snapshotID = "backup:offsite/nightly" })
        _ = try await deleting.deleteSnapshot(.with { $0.snapshotID = "backup:offsite/nightly" })
        XCTAssertEqual(source.calls.withLock { $0.deleted }, ["nightly"])
        let gone = try await deleting.listSnapshots(.with { $0.snapshotID = "backup:offsite/nightly" }).entries
        XCTAssertEqual(gone.count, 0)

        // An encrypted volume's backup restores only into an encrypted volume, which takes its key.
        await assertStatus(.invalidArgument) { _ = try await controller.createVolume(self.request("e", from: "backup:offsite/sealed")) }
        var encrypted = request("e", from: "backup:offsite/sealed")
        encrypted.parameters = ["encrypted": "true"]
        let restored = try await controller.createVolume(encrypted).volume
        let record = try await store.volume(id: restored.volumeID)
        XCTAssertEqual(record?.encryption, Source.sealed, "the restored volume does not take the backup's wrapped key")
        await assertStatus(.invalidArgument) {
            var plain = self.request("f", from: "backup:offsite/nightly")
            plain.parameters = ["encrypted": "true"]
            _ = try await controller.createVolume(plain)
        }

        let without = try self.controller(nil)
        await assertStatus(.notFound) { _ = try await without.createVolume(self.request("d", from: "backup:offsite/nightly")) }
    }
}
