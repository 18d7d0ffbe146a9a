import CairnCore
import CairnProcess
import CairnStore
import Foundation
import Logging
import XCTest

final class SQLiteStoreTests: XCTestCase {
    var dir = ""

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-store-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() async throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    // The behaviour shared with the etcd store (publishes, volumes, attachments…) is in
    // StoreContract, run by SQLiteStoreContractTests; this class keeps what is SQLite's own.

    func testAVersion1DatabaseIsMigratedWithItsPublishes() async throws {
        let path = dir + "/cairn.db"
        let old = StoreContract.publish("/var/lib/kubelet/pods/x/data", .host)
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .millisecondsSince1970
        let json = String(decoding: try encoder.encode(old), as: UTF8.self).replacingOccurrences(of: "'", with: "''")
        let v1 = """
            CREATE TABLE grdb_migrations (identifier TEXT NOT NULL PRIMARY KEY);
            INSERT INTO grdb_migrations VALUES ('v1');
            CREATE TABLE nodes (id TEXT PRIMARY KEY, doc BLOB NOT NULL);
            CREATE TABLE volumes (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, capacity INTEGER NOT NULL, doc BLOB NOT NULL);
            CREATE TABLE attachments (volume_id TEXT NOT NULL, node_id TEXT NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (volume_id, node_id));
            CREATE TABLE stages (volume_id TEXT NOT NULL, node_id TEXT NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (volume_id, node_id));
            CREATE TABLE publishes (volume_id TEXT NOT NULL, target_path TEXT NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (volume_id, target_path));
            INSERT INTO publishes VALUES ('vol-1', '\(old.targetPath)', CAST('\(json)' AS BLOB));
            """
        let result = try Command.runBlocking(["sqlite3", path, v1])
        XCTAssertEqual(result.status, 0, result.output)
        let store = try SQLiteStore(path: path, logger: Logger(label: "test"))
        let migrated = try await store.publishes(volumeID: "vol-1")
        XCTAssertEqual(migrated, [old])
        try await store.removePublish(old)
        let afterRemove = try await store.publishes(volumeID: "vol-1")
        XCTAssertTrue(afterRemove.isEmpty)
    }
}
