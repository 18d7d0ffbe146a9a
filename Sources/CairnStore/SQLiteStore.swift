import CairnCore
import Foundation
import GRDB
import Logging

/// The embedded metadata store: one SQLite database in WAL mode, through GRDB.
///
/// Records are stored as JSON documents keyed by their identity columns, so adding a field
/// to a record needs no migration; the columns that queries filter on are real columns.
/// Every mutation is one SQLite transaction (GRDB's `write`), which is what makes each state
/// change atomic across a crash: a plugin restart sees either the old or the new state.
public final class SQLiteStore: MetadataStore {
    private let pool: DatabasePool
    private let logger: Logger

    public init(path: String, logger: Logger) throws {
        self.logger = logger
        var config = Configuration()
        config.busyMode = .timeout(10)
        config.prepareDatabase { db in
            // WAL plus synchronous=FULL: a transaction acknowledged is on stable storage.
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        do {
            pool = try DatabasePool(path: path, configuration: config)
        } catch {
            throw CairnError.unavailable("cannot open the metadata store at \(path): \(error)")
        }
        try Self.migrator.migrate(pool)
        logger.debug("metadata store open", metadata: ["store.path": "\(path)"])
    }

    private static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE nodes (id TEXT PRIMARY KEY, doc BLOB NOT NULL);
                CREATE TABLE volumes (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
                                      capacity INTEGER NOT NULL, doc BLOB NOT NULL);
                CREATE TABLE attachments (volume_id TEXT NOT NULL, node_id TEXT NOT NULL,
                                          doc BLOB NOT NULL, PRIMARY KEY (volume_id, node_id));
                CREATE TABLE stages (volume_id TEXT NOT NULL, node_id TEXT NOT NULL,
                                     doc BLOB NOT NULL, PRIMARY KEY (volume_id, node_id));
                CREATE TABLE publishes (volume_id TEXT NOT NULL, target_path TEXT NOT NULL,
                                        doc BLOB NOT NULL, PRIMARY KEY (volume_id, target_path));
                """)
        }
        // v2: a target is identified by node and mount namespace too — one volume hot-plugged at
        // /data in two containers is two publishes.
        migrator.registerMigration("v2-publish-namespace") { db in
            try db.execute(sql: """
                CREATE TABLE publishes_v2 (volume_id TEXT NOT NULL, node_id TEXT NOT NULL,
                                           namespace TEXT NOT NULL, target_path TEXT NOT NULL,
                                           doc BLOB NOT NULL,
                                           PRIMARY KEY (volume_id, node_id, namespace, target_path));
                """)
            for doc in try Data.fetchAll(db, sql: "SELECT doc FROM publishes") {
                let record = try decode(PublishRecord.self, doc)
                try db.execute(sql: "INSERT OR REPLACE INTO publishes_v2 VALUES (?, ?, ?, ?, ?)",
                               arguments: [record.volumeID, record.nodeID, record.namespace.key, record.targetPath, doc])
            }
            try db.execute(sql: "DROP TABLE publishes; ALTER TABLE publishes_v2 RENAME TO publishes")
        }
        migrator.registerMigration("v3-removed-nodes") { db in
            try db.execute(sql: "CREATE TABLE removed_nodes (id TEXT PRIMARY KEY, removed_at REAL NOT NULL)")
        }
        migrator.registerMigration("v4-snapshots") { db in
            try db.execute(sql: """
                CREATE TABLE snapshots (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, doc BLOB NOT NULL);
                CREATE TABLE group_snapshots (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, doc BLOB NOT NULL);
                """)
        }
        migrator.registerMigration("v5-replica-deletions") { db in
            try db.execute(sql: """
                CREATE TABLE replica_deletions (node_id TEXT NOT NULL, volume_id TEXT NOT NULL, doc BLOB NOT NULL,
                                                PRIMARY KEY (node_id, volume_id));
                """)
        }
        return migrator
    }

    // MARK: encoding

    private static func encode<T: Encodable>(_ value: T) throws -> Data { try StoreRules.encode(value) }

    private static func decode<T: Decodable>(_ type: T.Type, _ data: Data) throws -> T { try StoreRules.decode(type, data) }

    private static func fetchAll<T: Decodable>(_ db: Database, _ type: T.Type, _ sql: String,
                                               _ arguments: StatementArguments = []) throws -> [T] {
        try Data.fetchAll(db, sql: sql, arguments: arguments).map { try decode(type, $0) }
    }

    private static func fetchOne<T: Decodable>(_ db: Database, _ type: T.Type, _ sql: String,
                                               _ arguments: StatementArguments = []) throws -> T? {
        try Data.fetchOne(db, sql: sql, arguments: arguments).map { try decode(type, $0) }
    }

    private func read<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws -> T {
        do { return try await StoreMetrics.timed("sqlite", "read") { try await pool.read(body) } } catch let e as CairnError { throw e } catch {
            Self.countConflict(error)
            throw CairnError.unavailable("metadata store read failed: \(error)")
        }
    }

    private func write<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws -> T {
        do { return try await StoreMetrics.timed("sqlite", "write") { try await pool.write(body) } } catch let e as CairnError { throw e } catch {
            Self.countConflict(error)
            throw CairnError.unavailable("metadata store write failed: \(error)")
        }
    }

    /// Another connection held the database past the busy timeout: SQLite's kind of conflict.
    private static func countConflict(_ error: any Error) {
        if let error = error as? DatabaseError, error.resultCode == .SQLITE_BUSY || error.resultCode == .SQLITE_LOCKED {
            StoreMetrics.conflicts.increment(["sqlite"])
        }
    }

    // MARK: nodes

    public func registerNode(_ node: NodeRecord) async throws {
        let doc = try Self.encode(node)
        try await write { db in
            if try Bool.fetchOne(db, sql: "SELECT 1 FROM removed_nodes WHERE id = ?", arguments: [node.id]) == true {
                throw StoreRules.nodeRemoved(node.id)
            }
            try db.execute(sql: "INSERT OR REPLACE INTO nodes (id, doc) VALUES (?, ?)", arguments: [node.id, doc])
        }
    }

    public func removeNode(id: String) async throws {
        try await write { db in
            try db.execute(sql: "INSERT OR IGNORE INTO removed_nodes (id, removed_at) VALUES (?, ?)",
                           arguments: [id, Date().timeIntervalSince1970])
            try db.execute(sql: "DELETE FROM nodes WHERE id = ?", arguments: [id])
        }
        logger.notice("node removed", metadata: ["node": "\(id)"])
    }

    public func removedNodes() async throws -> [String] {
        try await read { db in try String.fetchAll(db, sql: "SELECT id FROM removed_nodes ORDER BY id") }
    }

    public func node(id: String) async throws -> NodeRecord? {
        try await read { db in try Self.fetchOne(db, NodeRecord.self, "SELECT doc FROM nodes WHERE id = ?", [id]) }
    }

    public func liveNodes() async throws -> [NodeRecord] {
        try await read { db in try Self.fetchAll(db, NodeRecord.self, "SELECT doc FROM nodes ORDER BY id") }
    }

    // MARK: volumes

    public func createVolume(_ volume: VolumeRecord) async throws {
        let doc = try Self.encode(volume)
        try await write { db in
            if try Bool.fetchOne(db, sql: "SELECT 1 FROM volumes WHERE id = ? OR name = ?", arguments: [volume.id, volume.name]) == true {
                throw CairnError.alreadyExists("a volume named \"\(volume.name)\" or with id \(volume.id) already exists")
            }
            try db.execute(sql: "INSERT INTO volumes (id, name, capacity, doc) VALUES (?, ?, ?, ?)",
                           arguments: [volume.id, volume.name, volume.capacityBytes, doc])
        }
    }

    public func volume(id: String) async throws -> VolumeRecord? {
        try await read { db in try Self.fetchOne(db, VolumeRecord.self, "SELECT doc FROM volumes WHERE id = ?", [id]) }
    }

    public func volume(named name: String) async throws -> VolumeRecord? {
        try await read { db in try Self.fetchOne(db, VolumeRecord.self, "SELECT doc FROM volumes WHERE name = ?", [name]) }
    }

    public func listVolumes(afterID: String?, limit: Int) async throws -> [VolumeRecord] {
        try await read { db in
            try Self.fetchAll(db, VolumeRecord.self,
                              "SELECT doc FROM volumes WHERE id > ? ORDER BY id LIMIT ?",
                              [afterID ?? "", limit > 0 ? limit : -1])
        }
    }

    public func deleteVolume(id: String, recordingReplicaDeletions replicaDeletions: [ReplicaDeletion]) async throws {
        let docs = try replicaDeletions.map { ($0, try Self.encode($0)) }
        try await write { db in
            for table in ["attachments", "stages", "publishes", "volumes"] {
                let column = table == "volumes" ? "id" : "volume_id"
                try db.execute(sql: "DELETE FROM \(table) WHERE \(column) = ?", arguments: [id])
            }
            try Self.insertReplicaDeletions(db, docs)
        }
    }

    // MARK: replica deletions

    private static func insertReplicaDeletions(_ db: Database, _ docs: [(ReplicaDeletion, Data)]) throws {
        for (deletion, doc) in docs {
            try db.execute(sql: "INSERT OR REPLACE INTO replica_deletions (node_id, volume_id, doc) VALUES (?, ?, ?)",
                           arguments: [deletion.nodeID, deletion.volumeID, doc])
        }
    }

    public func recordReplicaDeletions(_ deletions: [ReplicaDeletion]) async throws {
        let docs = try deletions.map { ($0, try Self.encode($0)) }
        try await write { db in try Self.insertReplicaDeletions(db, docs) }
    }

    public func replicaDeletions(nodeID: String?) async throws -> [ReplicaDeletion] {
        try await read { db in
            try Self.fetchAll(db, ReplicaDeletion.self,
                              "SELECT doc FROM replica_deletions WHERE ? IS NULL OR node_id = ? ORDER BY node_id, volume_id",
                              [nodeID, nodeID])
        }
    }

    public func removeReplicaDeletion(nodeID: String, volumeID: String, token: String?) async throws {
        try await write { db in
            if let token {
                let recorded = try Self.fetchOne(db, ReplicaDeletion.self,
                                                 "SELECT doc FROM replica_deletions WHERE node_id = ? AND volume_id = ?",
                                                 [nodeID, volumeID])
                guard recorded?.token == token else { return }
            }
            try db.execute(sql: "DELETE FROM replica_deletions WHERE node_id = ? AND volume_id = ?",
                           arguments: [nodeID, volumeID])
        }
    }

    public func provisionedBytes() async throws -> Int64 {
        try await read { db in try Int64.fetchOne(db, sql: "SELECT COALESCE(SUM(capacity), 0) FROM volumes") ?? 0 }
    }

    // MARK: attachments

    public func attachments(volumeID: String) async throws -> [AttachmentRecord] {
        try await read { db in
            try Self.fetchAll(db, AttachmentRecord.self,
                              "SELECT doc FROM attachments WHERE volume_id = ? ORDER BY node_id", [volumeID])
        }
    }

    public func attach(volumeID: String, nodeID: String, readonly: Bool, accessMode: Int,
                       exclusive: Bool, nodeLimit: Int64, signer: (any ClaimSigner)?) async throws -> AttachmentRecord {
        try await write { db in
            guard var volume = try Self.fetchOne(db, VolumeRecord.self, "SELECT doc FROM volumes WHERE id = ?", [volumeID]) else {
                throw StoreRules.volumeNotFound(volumeID)
            }
            let existing = try Self.fetchAll(db, AttachmentRecord.self,
                                             "SELECT doc FROM attachments WHERE volume_id = ?", [volumeID])
            let onNode = nodeLimit > 0
                ? try Int64.fetchOne(db, sql: "SELECT COUNT(*) FROM attachments WHERE node_id = ?", arguments: [nodeID]) ?? 0 : 0
            try StoreRules.checkAttach(volumeID: volumeID, nodeID: nodeID, volumeAttachments: existing,
                                       attachedToNode: onNode, exclusive: exclusive, nodeLimit: nodeLimit)
            volume.epoch = volume.epoch.next
            let attachment = AttachmentRecord(volumeID: volumeID, nodeID: nodeID, readonly: readonly,
                                              accessMode: accessMode, epoch: volume.epoch,
                                              grant: try signer?.grant(volumeID: volumeID, nodeID: nodeID, epoch: volume.epoch))
            try db.execute(sql: "UPDATE volumes SET doc = ? WHERE id = ?", arguments: [try Self.encode(volume), volumeID])
            try db.execute(sql: "INSERT OR REPLACE INTO attachments (volume_id, node_id, doc) VALUES (?, ?, ?)",
                           arguments: [volumeID, nodeID, try Self.encode(attachment)])
            return attachment
        }
    }

    public func detach(volumeID: String, nodeID: String) async throws {
        try await write { db in
            try db.execute(sql: "DELETE FROM attachments WHERE volume_id = ? AND node_id = ?", arguments: [volumeID, nodeID])
        }
    }

    // MARK: replicas

    public func markReplicaOutOfSync(volumeID: String, nodeID: String, epoch: FencingEpoch, reason: String) async throws {
        let changed = try await write { db in
            guard var volume = try Self.fetchOne(db, VolumeRecord.self, "SELECT doc FROM volumes WHERE id = ?", [volumeID]) else {
                throw StoreRules.volumeNotFound(volumeID)
            }
            guard try volume.markReplicaOutOfSync(nodeID: nodeID, epoch: epoch, reason: reason) else { return false }
            try db.execute(sql: "UPDATE volumes SET doc = ? WHERE id = ?", arguments: [try Self.encode(volume), volumeID])
            return true
        }
        if changed {
            logger.notice("replica left the in-sync set", metadata: [
                "volume": "\(volumeID)", "replica.node": "\(nodeID)", "epoch": "\(epoch)", "reason": "\(reason)"])
        }
    }

    public func updateVolume(id: String, what: String,
                             _ change: @escaping @Sendable (inout VolumeRecord) throws -> Bool) async throws -> Bool {
        try await write { db in
            guard var volume = try Self.fetchOne(db, VolumeRecord.self, "SELECT doc FROM volumes WHERE id = ?", [id]) else {
                throw StoreRules.volumeNotFound(id)
            }
            guard try change(&volume) else { return false }
            try db.execute(sql: "UPDATE volumes SET doc = ?, capacity = ? WHERE id = ?",
                           arguments: [try Self.encode(volume), volume.capacityBytes, id])
            return true
        }
    }

    // MARK: snapshots and group snapshots (tables of named documents)

    public func createSnapshot(_ snapshot: SnapshotRecord) async throws {
        try await insertNamed("snapshots", id: snapshot.id, name: snapshot.name, try Self.encode(snapshot), what: "a snapshot")
    }

    public func updateSnapshot(_ snapshot: SnapshotRecord) async throws {
        try await updateNamed("snapshots", id: snapshot.id, try Self.encode(snapshot), what: "snapshot")
    }

    public func snapshot(id: String) async throws -> SnapshotRecord? {
        try await read { db in try Self.fetchOne(db, SnapshotRecord.self, "SELECT doc FROM snapshots WHERE id = ?", [id]) }
    }

    public func snapshot(named name: String) async throws -> SnapshotRecord? {
        try await read { db in try Self.fetchOne(db, SnapshotRecord.self, "SELECT doc FROM snapshots WHERE name = ?", [name]) }
    }

    public func listSnapshots(afterID: String?, limit: Int) async throws -> [SnapshotRecord] {
        try await read { db in
            try Self.fetchAll(db, SnapshotRecord.self, "SELECT doc FROM snapshots WHERE id > ? ORDER BY id LIMIT ?",
                              [afterID ?? "", limit > 0 ? limit : -1])
        }
    }

    public func deleteSnapshot(id: String) async throws {
        try await write { db in try db.execute(sql: "DELETE FROM snapshots WHERE id = ?", arguments: [id]) }
    }

    public func createGroupSnapshot(_ group: GroupSnapshotRecord) async throws {
        try await insertNamed("group_snapshots", id: group.id, name: group.name, try Self.encode(group), what: "a group snapshot")
    }

    public func updateGroupSnapshot(_ group: GroupSnapshotRecord) async throws {
        try await updateNamed("group_snapshots", id: group.id, try Self.encode(group), what: "group snapshot")
    }

    public func groupSnapshot(id: String) async throws -> GroupSnapshotRecord? {
        try await read { db in try Self.fetchOne(db, GroupSnapshotRecord.self, "SELECT doc FROM group_snapshots WHERE id = ?", [id]) }
    }

    public func groupSnapshot(named name: String) async throws -> GroupSnapshotRecord? {
        try await read { db in try Self.fetchOne(db, GroupSnapshotRecord.self, "SELECT doc FROM group_snapshots WHERE name = ?", [name]) }
    }

    public func deleteGroupSnapshot(id: String) async throws {
        try await write { db in try db.execute(sql: "DELETE FROM group_snapshots WHERE id = ?", arguments: [id]) }
    }

    private func insertNamed(_ table: String, id: String, name: String, _ doc: Data, what: String) async throws {
        try await write { db in
            if try Bool.fetchOne(db, sql: "SELECT 1 FROM \(table) WHERE id = ? OR name = ?", arguments: [id, name]) == true {
                throw CairnError.alreadyExists("\(what) named \"\(name)\" or with id \(id) already exists")
            }
            try db.execute(sql: "INSERT INTO \(table) (id, name, doc) VALUES (?, ?, ?)", arguments: [id, name, doc])
        }
    }

    private func updateNamed(_ table: String, id: String, _ doc: Data, what: String) async throws {
        try await write { db in
            try db.execute(sql: "UPDATE \(table) SET doc = ? WHERE id = ?", arguments: [doc, id])
            if db.changesCount == 0 { throw CairnError.notFound("\(what) \(id) does not exist") }
        }
    }

    // MARK: node-side records

    public func stage(volumeID: String, nodeID: String) async throws -> StageRecord? {
        try await read { db in
            try Self.fetchOne(db, StageRecord.self, "SELECT doc FROM stages WHERE volume_id = ? AND node_id = ?", [volumeID, nodeID])
        }
    }

    public func stages(nodeID: String) async throws -> [StageRecord] {
        try await read { db in
            try Self.fetchAll(db, StageRecord.self, "SELECT doc FROM stages WHERE node_id = ? ORDER BY volume_id", [nodeID])
        }
    }

    public func putStage(_ record: StageRecord) async throws {
        let doc = try Self.encode(record)
        try await write { db in
            try db.execute(sql: "INSERT OR REPLACE INTO stages (volume_id, node_id, doc) VALUES (?, ?, ?)",
                           arguments: [record.volumeID, record.nodeID, doc])
        }
    }

    public func removeStage(volumeID: String, nodeID: String) async throws {
        try await write { db in
            try db.execute(sql: "DELETE FROM stages WHERE volume_id = ? AND node_id = ?", arguments: [volumeID, nodeID])
        }
    }

    public func publishes(volumeID: String) async throws -> [PublishRecord] {
        try await read { db in
            try Self.fetchAll(db, PublishRecord.self,
                              "SELECT doc FROM publishes WHERE volume_id = ? ORDER BY target_path", [volumeID])
        }
    }

    public func putPublish(_ record: PublishRecord) async throws {
        let doc = try Self.encode(record)
        try await write { db in
            try db.execute(sql: """
                INSERT OR REPLACE INTO publishes (volume_id, node_id, namespace, target_path, doc) VALUES (?, ?, ?, ?, ?)
                """, arguments: [record.volumeID, record.nodeID, record.namespace.key, record.targetPath, doc])
        }
    }

    public func removePublish(_ record: PublishRecord) async throws {
        try await write { db in
            try db.execute(sql: """
                DELETE FROM publishes WHERE volume_id = ? AND node_id = ? AND namespace = ? AND target_path = ?
                """, arguments: [record.volumeID, record.nodeID, record.namespace.key, record.targetPath])
        }
    }
}
