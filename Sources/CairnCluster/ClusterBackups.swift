import CairnBackup
import CairnCore
import CairnReplica
import CairnSecurity
import Foundation
import Logging
import Synchronization

// Backups of cluster snapshots and restores into cluster volumes (docs/backups.md, "Cluster").
//
// A backup reads the snapshot from one replica that holds it, over the data protocol's
// snapshot ops, and asks it which blocks carry a generation above the previous backup's: only
// those are read. A restore writes the backup into every replica of the new volume at once
// (epoch 0: nobody has claimed it yet; it cannot be attached before the restore is done), and
// records each finished pack in the volume's record, so a repeated CreateVolume resumes.

/// The incarnation of a volume its generations belong to: a volume made again with the same id
/// numbers its writes from 1 again.
public enum VolumeLineage {
    public static func of(_ volume: VolumeRecord) -> String {
        "\(volume.id)@\(Int64((volume.createdAt.timeIntervalSince1970 * 1000).rounded()))"
    }
}

/// Snapshot `snapshotID` of a cluster volume, read from one replica holding it.
public struct ReplicaSnapshotSource: BackupBlockSource {
    let client: ReplicaClient
    public let volumeID: String
    public let snapshotID: String
    /// The node whose replica is read.
    public let nodeID: String
    public let sizeBytes: Int64
    public let generations: SourceGenerations?

    /// Blocks per `snapshotGenerations` call (64 MiB of volume, 128 KiB of answer).
    public var changedWindow: Int { 16_384 }

    /// Connects to a replica that holds the snapshot: an in-sync one first, then the others the
    /// snapshot record names. UNAVAILABLE (naming each node's reason) when none answers.
    public static func open(snapshot: SnapshotRecord, volume: VolumeRecord, security: DataPlaneSecurity,
                            logger: Logger) async throws -> ReplicaSnapshotSource {
        let holders = Set(snapshot.holders ?? (volume.replicas ?? []).map(\.nodeID))
        let candidates = (volume.replicas ?? []).filter { holders.contains($0.nodeID) }.sorted { $0.inSync && !$1.inSync }
        guard !candidates.isEmpty else {
            throw CairnError.failedPrecondition("snapshot \(snapshot.id) of volume \(volume.id) is held by no replica the volume still has; it cannot be backed up")
        }
        var reasons: [String] = []
        for replica in candidates {
            do {
                return try await offCooperativePool {
                    let client = try ReplicatedBacking.connect(replica.address, volumeID: volume.id, nodeID: replica.nodeID,
                                                               doing: "read snapshot \(snapshot.id)", security: security)
                    do {
                        guard let entry = try client.listSnapshots(volumeID: volume.id, epoch: .max).first(where: { $0.id == snapshot.id }) else {
                            throw CairnError.notFound("its replica has no snapshot \(snapshot.id)")
                        }
                        return ReplicaSnapshotSource(client: client, volumeID: volume.id, snapshotID: snapshot.id, nodeID: replica.nodeID,
                                                     sizeBytes: Int64(entry.size),
                                                     generations: SourceGenerations(lineage: VolumeLineage.of(volume), generation: entry.generation))
                    } catch {
                        client.close()
                        throw error
                    }
                }
            } catch {
                logger.warning("cannot read a snapshot from this replica; trying another", metadata: [
                    "volume.id": "\(volume.id)", "snapshot.id": "\(snapshot.id)", "node.id": "\(replica.nodeID)", "error": "\(error)",
                ])
                reasons.append("\(replica.nodeID): \(error)")
            }
        }
        throw CairnError.unavailable(
            "no replica holding snapshot \(snapshot.id) of volume \(volume.id) could be read (\(reasons.joined(separator: "; "))); bring one of those nodes back and retry")
    }

    public func close() { client.close() }

    public func read(offset: Int64, count: Int) async throws -> [UInt8] {
        let (client, volumeID, snapshotID, nodeID) = (self.client, self.volumeID, self.snapshotID, self.nodeID)
        do {
            return try await offCooperativePool {
                try client.readSnapshot(volumeID: volumeID, snapshotID: snapshotID, offset: UInt64(offset), length: count)
            }
        } catch {
            throw CairnError.unavailable("reading snapshot \(snapshotID) of volume \(volumeID) from node \(nodeID) at byte \(offset) failed: \(error); run the backup again (it resumes)")
        }
    }

    public func changed(since: UInt64, firstBlock: Int64, count: Int) async throws -> [Bool] {
        let (client, volumeID, snapshotID, nodeID) = (self.client, self.volumeID, self.snapshotID, self.nodeID)
        do {
            let generations = try await offCooperativePool {
                try client.snapshotGenerations(volumeID: volumeID, snapshotID: snapshotID, firstBlock: UInt64(firstBlock), count: count)
            }
            guard generations.count == count else {
                throw CairnError.internal("node \(nodeID) answered \(generations.count) generations for \(count) blocks")
            }
            // A trim counts by its generation too: the block reads as zeros since then.
            return generations.map { $0 & ~BlockGenerations.trimmedBit > since }
        } catch let error as CairnError where error.code == .internal {
            throw error
        } catch {
            throw CairnError.unavailable("listing the generations of snapshot \(snapshotID) of volume \(volumeID) on node \(nodeID) failed: \(error); run the backup again")
        }
    }
}

/// Every replica of a new volume, written at once: a restore's blocks at generation 1.
struct ReplicaRestoreSink: RestoreSink {
    let replicas: [(nodeID: String, client: ReplicaClient)]
    let volumeID: String
    let epoch: UInt64
    static let generation: UInt64 = 1

    func write(_ data: [UInt8], offset: Int64) async throws {
        let (replicas, volumeID, epoch) = (self.replicas, self.volumeID, self.epoch)
        try await offCooperativePool {
            // Sent to every replica before any answer is awaited. The data is sent from where it
            // is (not copied), so the answers are awaited while it is still borrowed.
            let failure: (any Error)? = data.withUnsafeBytes { bytes in
                let waits = replicas.map { r in
                    (r.nodeID, r.client.beginWrite(volumeID: volumeID, offset: UInt64(offset), data: bytes, generation: Self.generation, epoch: epoch))
                }
                var failure: (any Error)?
                for (nodeID, wait) in waits {
                    do { try wait() } catch {
                        failure = failure ?? CairnError.unavailable(
                            "writing restored data into volume \(volumeID)'s replica on node \(nodeID) failed: \(error); repeat the CreateVolume to resume the restore")
                    }
                }
                return failure
            }
            if let failure { throw failure }
        }
    }

    func sync() async throws {
        let (replicas, volumeID, epoch) = (self.replicas, self.volumeID, self.epoch)
        try await offCooperativePool {
            for r in replicas {
                do { try r.client.flush(volumeID: volumeID, epoch: epoch) } catch {
                    throw CairnError.unavailable(
                        "flushing restored data on volume \(volumeID)'s replica on node \(r.nodeID) failed: \(error); repeat the CreateVolume to resume the restore")
                }
            }
        }
    }
}

/// A cluster restore's progress, in the volume's record (`restoredPacks`): it survives the
/// controller, which may run elsewhere when the CreateVolume is repeated.
struct VolumeRecordRestoreJournal: RestoreJournal {
    let store: any MetadataStore
    let volumeID: String

    func begin(backupID: String) async throws -> Set<Int> {
        guard let volume = try await store.volume(id: volumeID) else {
            throw CairnError.notFound("volume \(volumeID) was deleted while it was being restored")
        }
        return Self.decode(volume.restoredPacks)
    }

    func finished(pack number: Int) async throws {
        _ = try await store.updateVolume(id: volumeID, what: "record pack \(number) of volume \(volumeID)'s restore") { record in
            var done = Self.decode(record.restoredPacks)
            guard done.insert(number).inserted else { return false }
            record.restoredPacks = Self.encode(done)
            return true
        }
    }

    func complete() async throws {
        _ = try await store.updateVolume(id: volumeID, what: "finish volume \(volumeID)'s restore") { record in
            guard record.restoredPacks != nil else { return false }
            record.restoredPacks = nil
            return true
        }
    }

    /// A bitmap, bit n for pack n, base64.
    static func encode(_ packs: Set<Int>) -> String {
        var bits = [UInt8](repeating: 0, count: ((packs.max() ?? 0) + 8) / 8)
        for n in packs { bits[n / 8] |= 1 << (n % 8) }
        return Data(bits).base64EncodedString()
    }

    static func decode(_ text: String?) -> Set<Int> {
        guard let text, let bits = Data(base64Encoded: text) else { return [] }
        var out = Set<Int>()
        for (i, byte) in bits.enumerated() {
            for b in 0..<8 where byte & (1 << b) != 0 { out.insert(i * 8 + b) }
        }
        return out
    }
}

/// CreateVolume from `backup:<target>/<id>` in a cluster: the backup is written into every
/// replica of the new volume, packs in parallel, resumable through the volume's record.
public struct ClusterBackupSource: BackupSource {
    let targets: BackupTargets
    let backing: ReplicatedBacking
    let logger: Logger

    public init(targets: BackupTargets, backing: ReplicatedBacking, logger: Logger) {
        self.targets = targets
        self.backing = backing
        self.logger = logger
    }

    public func describe(_ reference: BackupReference, secrets: [String: String]) async throws -> BackupDescription {
        try await targets.describe(reference, secrets: secrets, logger: logger)
    }

    public func delete(_ reference: BackupReference, secrets: [String: String]) async throws {
        try await targets.delete(reference, secrets: secrets, logger: logger)
    }

    public func restore(_ reference: BackupReference, into volume: VolumeRecord, secrets: [String: String]) async throws {
        let (target, manifest) = try await targets.manifest(reference, secrets: secrets, logger: logger)
        guard let replicas = volume.replicas, !replicas.isEmpty else {
            throw CairnError.internal("volume \(volume.id) has no replicas placed; this is a controller bug")
        }
        let security = backing.security
        var clients: [(nodeID: String, client: ReplicaClient)] = []
        defer { for c in clients { c.client.close() } }
        for replica in replicas {
            let client = try await offCooperativePool {
                try ReplicatedBacking.connect(replica.address, volumeID: volume.id, nodeID: replica.nodeID,
                                              doing: "restore \(reference)", security: security)
            }
            clients.append((replica.nodeID, client))
        }
        let sink = ReplicaRestoreSink(replicas: clients, volumeID: volume.id, epoch: volume.epoch.rawValue)
        let journal = VolumeRecordRestoreJournal(store: backing.store, volumeID: volume.id)
        let (logger, started) = (self.logger, ContinuousClock.now)
        let lastLogged = Mutex(ContinuousClock.now)
        logger.info("restoring a backup into a new volume's replicas", metadata: [
            "volume.id": "\(volume.id)", "backup": "\(reference)", "backup.bytes": "\(manifest.sizeBytes)",
            "replicas": "\(replicas.map(\.nodeID).joined(separator: ","))",
        ])
        let result = try await target.restore(manifest, into: sink, journal: journal, zeroFill: false) { p in
            let now = ContinuousClock.now
            guard lastLogged.withLock({ last in
                guard now - last >= .seconds(5) else { return false }
                last = now
                return true
            }) else { return }
            logger.info("restore progress", metadata: [
                "volume.id": "\(volume.id)", "backup": "\(reference)",
                "restore.percent": "\(p.totalBytes > 0 ? p.doneBytes * 100 / p.totalBytes : 100)",
                "restore.downloaded_bytes": "\(p.transferredBytes)", "restore.seconds": "\((now - started).components.seconds)",
            ])
        }
        logger.info("restored", metadata: [
            "volume.id": "\(volume.id)", "backup": "\(reference)", "restore.packs_fetched": "\(result.packsFetched)",
            "restore.packs_already_done": "\(result.packsAlreadyDone)", "restore.downloaded_bytes": "\(result.bytesDownloaded)",
        ])
    }
}
