import CairnCore
import Foundation
import Logging

/// One named target of `--backup-targets FILE` (docs/backups.md, "Targets").
public struct BackupTargetConfig: Codable, Sendable, Equatable {
    public var endpoint: String
    public var bucket: String
    public var region: String?
    public var prefix: String?
    /// A file with `access_key_id = …` and `secret_access_key = …` lines (the `aws_` spellings
    /// of an AWS credentials file work too). CSI secrets `accessKeyID`/`secretAccessKey` override it.
    public var credentialsFile: String?
    /// Bytes per second over all uploads of a backup (0 or absent: unthrottled).
    public var uploadLimitBytesPerSecond: Int64?
    /// Packs transferred at once (default 4).
    public var parallelism: Int?
}

/// The targets file: `{"targets": {"NAME": {"endpoint": …, "bucket": …, …}}}`.
public struct BackupTargets: Sendable, Equatable {
    public var targets: [String: BackupTargetConfig]

    public init(targets: [String: BackupTargetConfig]) { self.targets = targets }

    public static func load(_ path: String) throws -> BackupTargets {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CairnError.failedPrecondition("cannot read the backup targets file \(path); check --backup-targets")
        }
        struct File: Codable { var targets: [String: BackupTargetConfig] }
        do {
            let file = try JSONDecoder().decode(File.self, from: data)
            for name in file.targets.keys { try Validate.volumeID(name, field: "the target name \(name) in \(path)") }
            return BackupTargets(targets: file.targets)
        } catch let error as CairnError {
            throw error
        } catch {
            throw CairnError.invalidArgument("the backup targets file \(path) is not valid (\(error)); see docs/backups.md for its form")
        }
    }

    /// The target `name`, with credentials from `secrets` (CSI) or else its credentials file.
    public func target(_ name: String, secrets: [String: String] = [:], logger: Logger) throws -> BackupTarget {
        guard let config = targets[name] else {
            throw CairnError.notFound("no backup target named \(name); the targets file has \(targets.keys.sorted().joined(separator: ", "))")
        }
        var access = secrets["accessKeyID"], secret = secrets["secretAccessKey"]
        if access == nil || secret == nil {
            guard let file = config.credentialsFile else {
                throw CairnError.failedPrecondition(
                    "backup target \(name) has no credentials: give it a credentialsFile, or pass the CSI secrets accessKeyID and secretAccessKey")
            }
            let keys = try Self.credentials(file)
            access = keys.accessKeyID
            secret = keys.secretAccessKey
        }
        let location = S3Location(endpoint: config.endpoint, bucket: config.bucket, region: config.region ?? "us-east-1",
                                  prefix: config.prefix ?? "", accessKeyID: access!, secretAccessKey: secret!)
        let limit = config.uploadLimitBytesPerSecond.flatMap { $0 > 0 ? $0 : nil }
        return BackupTarget(client: S3Client(location), uploadLimit: limit, parallelism: config.parallelism ?? 4, logger: logger)
    }

    /// Reads `key = value` lines; `#` comments and `[section]` lines are skipped.
    public static func credentials(_ path: String) throws -> (accessKeyID: String, secretAccessKey: String) {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw CairnError.failedPrecondition("cannot read the backup credentials file \(path)")
        }
        var values: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            guard !trimmed.hasPrefix("#"), !trimmed.hasPrefix("["), let eq = trimmed.firstIndex(of: "=") else { continue }
            let key = trimmed[..<eq].trimmingCharacters(in: .whitespaces).lowercased()
            values[key.hasPrefix("aws_") ? String(key.dropFirst(4)) : key] = trimmed[trimmed.index(after: eq)...].trimmingCharacters(in: .whitespaces)
        }
        guard let access = values["access_key_id"], let secret = values["secret_access_key"] else {
            throw CairnError.failedPrecondition("the backup credentials file \(path) needs access_key_id = … and secret_access_key = … lines")
        }
        return (access, secret)
    }
}

extension BackupTargets {
    /// The backup `reference` names, NOT_FOUND when its target has none by that id.
    public func manifest(_ reference: BackupReference, secrets: [String: String], logger: Logger) async throws -> (BackupTarget, BackupManifest) {
        let target = try target(reference.target, secrets: secrets, logger: logger)
        guard let manifest = try await target.manifest(reference.backupID) else {
            throw CairnError.notFound("source snapshot \(reference) does not exist: target \(reference.target) has no backup \(reference.backupID)")
        }
        return (target, manifest)
    }

    /// DeleteSnapshot of a backup id: the manifest, then garbage older than an hour (a backup
    /// being made may be using what no manifest names yet).
    public func delete(_ reference: BackupReference, secrets: [String: String], logger: Logger) async throws {
        let target = try target(reference.target, secrets: secrets, logger: logger)
        let deleted = try await target.delete(id: reference.backupID, gracePeriod: 3600)
        logger.notice("backup deleted (DeleteSnapshot)", metadata: ["backup": "\(reference)", "backup.packs_deleted": "\(deleted)"])
    }

    public func describe(_ reference: BackupReference, secrets: [String: String], logger: Logger) async throws -> BackupDescription {
        let (_, manifest) = try await manifest(reference, secrets: secrets, logger: logger)
        return BackupDescription(sourceVolumeID: manifest.volumeID, sizeBytes: manifest.sizeBytes, fsType: manifest.fsType ?? "", createdAt: manifest.createdAt,
                                 encryption: manifest.encryption)
    }
}

/// CreateVolume from `backup:<target>/<id>` on one machine: the backup is restored into the
/// new volume's file, with a progress file beside it so a repeated CreateVolume resumes.
public struct LocalBackupSource: BackupSource {
    let targets: BackupTargets
    let volumeFile: @Sendable (String) throws -> String
    let logger: Logger

    public init(targets: BackupTargets, volumeFile: @escaping @Sendable (String) throws -> String, logger: Logger) {
        self.targets = targets
        self.volumeFile = volumeFile
        self.logger = logger
    }

    public func describe(_ reference: BackupReference, secrets: [String: String]) async throws -> BackupDescription {
        try await targets.describe(reference, secrets: secrets, logger: logger)
    }

    public func delete(_ reference: BackupReference, secrets: [String: String]) async throws {
        try await targets.delete(reference, secrets: secrets, logger: logger)
    }

    public func restore(_ reference: BackupReference, into volume: VolumeRecord, secrets: [String: String]) async throws {
        let target = try targets.target(reference.target, secrets: secrets, logger: logger)
        let path = try volumeFile(volume.id)
        logger.info("restoring a backup into a new volume", metadata: ["volume.id": "\(volume.id)", "backup": "\(reference)"])
        let result = try await target.restore(id: reference.backupID, to: path, progressPath: path + ".restore-progress", zeroFill: false)
        logger.info("restored", metadata: ["volume.id": "\(volume.id)", "backup": "\(reference)",
                                           "restore.packs_fetched": "\(result.packsFetched)",
                                           "restore.packs_already_done": "\(result.packsAlreadyDone)"])
    }
}
