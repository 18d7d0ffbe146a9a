import ArgumentParser
import CairnBackup
import CairnCLI
import CairnCluster
import CairnCore
import CairnLocal
import Foundation
import Logging

// `cairn backup …`: backups of snapshots to S3-compatible object storage (docs/backups.md).

struct BackupCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up snapshots to S3-compatible object storage, list, inspect, delete, prune and restore backups.",
        subcommands: [BackupCreate.self, BackupList.self, BackupInspect.self, BackupDelete.self, BackupPrune.self, BackupRestore.self])
}

struct BackupTargetOptions: ParsableArguments {
    @Option(name: .customLong("backup-targets"), help: "The backup targets file (JSON: {\"targets\": {NAME: {endpoint, bucket, region, prefix, credentialsFile}}}; docs/backups.md).")
    var targetsFile: String = "/etc/cairn/backup-targets.json"

    @Option(help: "The target's name in the targets file.")
    var target: String

    func open() throws -> BackupTarget {
        let quiet = Logger(label: "cairn.backup") { _ in SwiftLogNoOpLogHandler() }
        return try BackupTargets.load(targetsFile).target(target, logger: quiet)
    }
}

/// Progress to stderr: a bar with rate and ETA on a terminal, a line every few seconds
/// otherwise; with `--output json`, one JSON object per line on stdout (`"event": "progress"`).
final class TransferReporter: @unchecked Sendable {
    let json: Bool
    let verb: String
    private let lock = NSLock()
    private let started = Date()
    private var lastShown = Date.distantPast
    private var finishedShown = false
    private let tty = isatty(2) == 1

    init(json: Bool, verb: String) {
        self.json = json
        self.verb = verb
    }

    struct Line: Encodable {
        var event = "progress"
        var doneBytes: Int64
        var totalBytes: Int64
        var transferredBytes: Int64
        var bytesPerSecond: Double
        var etaSeconds: Double?
    }

    func report(_ p: TransferProgress) {
        lock.lock()
        defer { lock.unlock() }
        let now = Date()
        let finished = p.doneBytes >= p.totalBytes
        guard !finishedShown, finished || now.timeIntervalSince(lastShown) >= (tty && !json ? 0.2 : 2) else { return }
        lastShown = now
        finishedShown = finished
        let elapsed = max(0.001, now.timeIntervalSince(started))
        let rate = Double(p.doneBytes) / elapsed
        let eta = rate > 0 ? Double(p.totalBytes - p.doneBytes) / rate : nil
        if json {
            let line = Line(doneBytes: p.doneBytes, totalBytes: p.totalBytes, transferredBytes: p.transferredBytes, bytesPerSecond: rate, etaSeconds: eta)
            if let text = try? JSONOutput.encode(line, pretty: false) { FileHandle.standardOutput.write(Data((text + "\n").utf8)) }
            return
        }
        let fraction = p.totalBytes > 0 ? Double(p.doneBytes) / Double(p.totalBytes) : 1
        let text = "\(verb) \(ProgressBar.render(fraction: fraction)) \(Units.percent(fraction * 100)) "
            + "\(Units.bytes(p.doneBytes))/\(Units.bytes(p.totalBytes)) \(Units.rate(rate)), \(Units.bytes(p.transferredBytes)) transferred, ETA \(eta.map { Units.duration($0) } ?? "-")"
        FileHandle.standardError.write(Data(((tty ? "\r" : "") + text + (tty && !finished ? "" : "\n")).utf8))
    }
}

struct BackupSummary: Encodable {
    var id: String
    var volumeID: String
    var snapshotID: String
    var sizeBytes: Int64
    var createdAt: Date
    var parent: String?
    var packs: Int
    var dataBlocks: Int
    var newBlocks: Int
    var uploadedBytes: Int64
    /// Bytes read from the snapshot (less than its size when generations told what changed).
    var scannedBytes: Int64?
    var encrypted: Bool
    /// The snapshot's generation (cluster snapshots): the next backup reads what is newer.
    var sourceGeneration: UInt64?
    /// The pack objects it names (`inspect` only).
    var packNames: [String]?

    init(_ m: BackupManifest) {
        id = m.id
        volumeID = m.volumeID
        snapshotID = m.snapshotID
        sizeBytes = m.sizeBytes
        createdAt = m.createdAt
        parent = m.parent
        packs = m.packs.count
        dataBlocks = m.dataBlocks
        newBlocks = m.newBlocks
        uploadedBytes = m.uploadedBytes
        scannedBytes = m.scannedBytes
        encrypted = m.encryption != nil
        sourceGeneration = m.sourceGeneration
    }

    static func table(_ rows: [BackupSummary]) -> String {
        var table = Table([.init("BACKUP"), .init("VOLUME"), .init("SNAPSHOT"), .init("SIZE", .right), .init("NEW", .right),
                           .init("UPLOADED", .right), .init("PARENT"), .init("AGE", .right)])
        for b in rows {
            table.append([b.id, b.volumeID, b.snapshotID, Units.bytes(b.sizeBytes), Units.bytes(Int64(b.newBlocks) * 4096),
                          Units.bytes(b.uploadedBytes), b.parent ?? "-", Units.age(of: b.createdAt)])
        }
        return rows.isEmpty ? "no backups\n" : table.render()
    }
}

struct BackupCreate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Back up a snapshot (one machine: its file; a cluster: read from a replica holding it) or a block file/device.",
        discussion: """
            Only blocks the target does not hold yet are uploaded (content addressed, zstd). Idempotent by --id:
            run it again after an interruption and it uploads only what is missing. In a cluster (--store etcd)
            only the blocks written since the volume's previous backup are read (the replicas' generations);
            the command connects to a replica with --tls-dir (a node's or a controller's identity).
              cairn backup create --target offsite --snapshot snap-123
              cairn backup create --target offsite --snapshot snap-456 --store etcd --etcd-endpoints https://10.0.0.1:2379 --tls-dir /etc/cairn/ctl
              cairn backup create --target offsite --volume db --file /dev/loop7 --id db-nightly
            """)
    @OptionGroup var targetOptions: BackupTargetOptions
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var outputOptions: OutputOptions
    @OptionGroup var security: DataSecurityOptions

    @Option(help: "The snapshot to back up (the store says its volume and size).")
    var snapshot: String?

    @Option(help: "Instead of a snapshot: a block file or device to back up (with --volume).")
    var file: String?

    @Option(help: "The volume the backup belongs to (with --file; retention and parents go by it).")
    var volume: String?

    @Option(help: "The backup's id (default: the snapshot's id, or the volume's with the time).")
    var id: String?

    @Option(name: .customLong("limit-rate"), help: "Upload at most this many bytes per second (suffixes Ki, Mi, Gi).")
    var limitRate: String?

    func run() async throws {
        try await readingStore {
            var target = try targetOptions.open()
            if let limitRate { target.uploadLimit = try Serve.parseBytes(limitRate) }
            let source: any BackupBlockSource, volumeID: String, snapshotID: String, size: Int64, fsType: String?
            var encryption: VolumeEncryption?
            var replicaSource: ReplicaSnapshotSource?
            defer { replicaSource?.close() }
            switch (snapshot, file) {
            case (let s?, nil):
                let store = try storeOptions.open()
                guard let record = try await store.snapshot(id: s), record.readyToUse else {
                    throw CairnError.notFound("snapshot \(s) does not exist or is not ready; `cairn snapshot list` shows them")
                }
                (volumeID, snapshotID, size, fsType) = (record.sourceVolumeID, s, record.sizeBytes, record.fsType)
                encryption = record.encryption
                if storeOptions.store == .sqlite {
                    source = try FileBlockSource(path: try LocalFileBacking(dataDir: storeOptions.dataDir).snapshotFile(snapshotID: s))
                } else {
                    // A cluster snapshot: read from a replica holding it, over the data protocol.
                    guard let volume = try await store.volume(id: record.sourceVolumeID) else {
                        throw CairnError.notFound("snapshot \(s)'s volume \(record.sourceVolumeID) no longer exists, and with it its replicas")
                    }
                    encryption = encryption ?? volume.encryption
                    let quiet = Logger(label: "cairn.backup") { _ in SwiftLogNoOpLogHandler() }
                    let opened = try await ReplicaSnapshotSource.open(snapshot: record, volume: volume,
                                                                      security: try security.resolve(dataDir: storeOptions.dataDir, logger: quiet),
                                                                      logger: quiet)
                    replicaSource = opened
                    source = opened
                }
            case (nil, let f?):
                guard let v = volume else { throw ValidationError("--file needs --volume (the volume the backup belongs to)") }
                source = try FileBlockSource(path: f)
                (volumeID, snapshotID, size, fsType) = (v, "file", try Self.size(of: f), nil)
            default:
                throw ValidationError("give either --snapshot or --file")
            }
            let backupID = id ?? (snapshot ?? "\(volumeID)-\(Int(Date().timeIntervalSince1970))")
            let reporter = TransferReporter(json: outputOptions.output == .json, verb: "backup")
            let manifest = try await target.create(id: backupID, volumeID: volumeID, snapshotID: snapshotID, source: source,
                                                   sizeBytes: size / 4096 * 4096, fsType: fsType, encryption: encryption) { reporter.report($0) }
            let traffic = target.client.counters
            struct Done: Encodable { var event = "done"; var backup: BackupSummary; var traffic: S3Traffic }
            try outputOptions.emit(Done(backup: BackupSummary(manifest), traffic: traffic)) {
                "backup \(manifest.id) of volume \(manifest.volumeID): \(manifest.newBlocks) new blocks of \(manifest.dataBlocks), \(Units.bytes(manifest.scannedBytes ?? manifest.sizeBytes)) read, \(Units.bytes(manifest.uploadedBytes)) uploaded in \(traffic.puts) PUTs\n"
            }
        }
    }

    static func size(of path: String) throws -> Int64 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CairnError.notFound("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0 else { throw CairnError.invalidArgument("cannot tell the size of \(path)") }
        return Int64(end)
    }
}

struct BackupList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "Every complete backup in a target, oldest first.")
    @OptionGroup var targetOptions: BackupTargetOptions
    @OptionGroup var outputOptions: OutputOptions
    @Option(help: "Only the backups of this volume.")
    var volume: String?

    func run() async throws {
        try await readingStore {
            let rows = try await targetOptions.open().backups().filter { volume == nil || $0.volumeID == volume }.map(BackupSummary.init)
            try outputOptions.emit(["backups": rows]) { BackupSummary.table(rows) }
        }
    }
}

struct BackupInspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "inspect", abstract: "One backup's manifest: its volume, snapshot, packs and sizes.")
    @OptionGroup var targetOptions: BackupTargetOptions
    @OptionGroup var outputOptions: OutputOptions
    @Argument(help: "The backup's id.")
    var id: String

    func run() async throws {
        try await readingStore {
            guard let m = try await targetOptions.open().manifest(id) else {
                throw CairnError.notFound("target \(targetOptions.target) has no backup \(id); `cairn backup list` shows them")
            }
            var summary = BackupSummary(m)
            summary.packNames = m.packs
            try outputOptions.emit(summary) {
                """
                backup:      \(m.id)
                volume:      \(m.volumeID)
                snapshot:    \(m.snapshotID)
                size:        \(Units.bytes(m.sizeBytes)) (\(m.dataBlocks) non-zero blocks of \(m.blockSize) bytes)
                created:     \(ISO8601DateFormatter().string(from: m.createdAt)) (\(Units.age(of: m.createdAt)) ago)
                parent:      \(m.parent ?? "-")
                new blocks:  \(m.newBlocks), \(Units.bytes(m.uploadedBytes)) uploaded, \(m.scannedBytes.map { Units.bytes($0) } ?? "-") read from the snapshot
                generation:  \(m.sourceGeneration.map { "\($0) (the next backup of the volume reads only blocks written after it)" } ?? "- (the next backup reads every block)")
                encrypted:   \(m.encryption == nil ? "no" : "yes (a restore takes the volume's wrapped key; it opens with the passphrase of the time of the backup)")
                packs:       \(m.packs.count), block map \(m.runs) runs
                restore as:  snapshot id backup:\(targetOptions.target)/\(m.id)

                """
            }
        }
    }
}

struct BackupDelete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete",
        abstract: "Delete a backup; packs no other backup uses go too (never one a remaining backup needs).")
    @OptionGroup var targetOptions: BackupTargetOptions
    @OptionGroup var outputOptions: OutputOptions
    @Argument(help: "The backup's id.")
    var id: String
    @Option(help: "Unreferenced packs younger than this are kept (a backup being made uploads packs before its manifest), e.g. 1h, 0s.")
    var grace: String = "1h"

    func run() async throws {
        try await readingStore {
            let target = try targetOptions.open()
            guard try await target.manifest(id) != nil else {
                throw CairnError.notFound("target \(targetOptions.target) has no backup \(id); `cairn backup list` shows them")
            }
            let packs = try await target.delete(id: id, gracePeriod: try parseDuration(grace))
            struct Done: Encodable { var deleted: String; var packsDeleted: Int }
            try outputOptions.emit(Done(deleted: id, packsDeleted: packs)) { "deleted backup \(id); \(packs) pack(s) no other backup used are gone\n" }
        }
    }
}

struct BackupPrune: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Retention: per volume, delete backups beyond the newest N and/or older than D, then unused packs.")
    @OptionGroup var targetOptions: BackupTargetOptions
    @OptionGroup var outputOptions: OutputOptions
    @Option(help: "Keep the newest N backups of each volume.")
    var keep: Int?
    @Option(name: .customLong("older-than"), help: "Delete backups older than this (e.g. 30d, 12h); a volume's newest backup is kept.")
    var olderThan: String?
    @Option(help: "Unreferenced packs younger than this are kept, e.g. 1h, 0s.")
    var grace: String = "1h"

    func run() async throws {
        guard keep != nil || olderThan != nil else { throw ValidationError("give --keep N, --older-than D, or both") }
        if let keep, keep < 0 { throw ValidationError("--keep must be 0 or more") }
        try await readingStore {
            let result = try await targetOptions.open().prune(keep: keep, olderThan: try olderThan.map(parseDuration),
                                                              gracePeriod: try parseDuration(grace))
            struct Done: Encodable { var removed: [String]; var packsDeleted: Int }
            try outputOptions.emit(Done(removed: result.removed, packsDeleted: result.packsDeleted)) {
                "removed \(result.removed.count) backup(s)\(result.removed.isEmpty ? "" : ": " + result.removed.joined(separator: ", ")); \(result.packsDeleted) unused pack(s) deleted\n"
            }
        }
    }
}

struct BackupRestore: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore a backup into a file or block device (a new volume: CreateVolume from snapshot backup:<target>/<id>).",
        discussion: """
            Packs are fetched in parallel; each one is recorded in the progress file once its blocks are on disk, so a
            restore that was killed and is run again fetches only what it had not finished.
              cairn backup restore --target offsite db-nightly --to /dev/loop9 --zero-fill
            """)
    @OptionGroup var targetOptions: BackupTargetOptions
    @OptionGroup var outputOptions: OutputOptions
    @Argument(help: "The backup's id.")
    var id: String
    @Option(help: "The file (made when missing) or block device to write.")
    var to: String
    @Option(name: .customLong("progress-file"), help: "Where the restore records the packs it finished. Default: the --to path with .restore-progress, or /var/lib/cairn/restore-ID.progress for a device.")
    var progressFile: String?
    @Flag(name: .customLong("zero-fill"), help: "Write the backup's zero blocks too (a device or file that may hold other data).")
    var zeroFill = false

    func run() async throws {
        try await readingStore {
            let target = try targetOptions.open()
            let progress = progressFile ?? (to.hasPrefix("/dev/") ? "/var/lib/cairn/restore-\(id).progress" : to + ".restore-progress")
            let reporter = TransferReporter(json: outputOptions.output == .json, verb: "restore")
            let result = try await target.restore(id: id, to: to, progressPath: progress, zeroFill: zeroFill) { reporter.report($0) }
            struct Done: Encodable { var event = "done"; var restore: RestoreResult; var traffic: S3Traffic }
            try outputOptions.emit(Done(restore: result, traffic: target.client.counters)) {
                "restored backup \(id) into \(to): \(result.packsFetched) pack(s) fetched (\(Units.bytes(result.bytesDownloaded))), \(result.packsAlreadyDone) done by an earlier run\n"
            }
        }
    }
}

/// "90s", "15m", "12h", "30d", "0" → seconds.
func parseDuration(_ text: String) throws -> TimeInterval {
    let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604_800]
    if let n = Double(text) { return n }
    guard let unit = text.last.flatMap({ units[$0] }), let n = Double(text.dropLast()), n >= 0 else {
        throw ValidationError("\(text) is not a duration: write e.g. 90s, 15m, 12h, 30d")
    }
    return n * unit
}
