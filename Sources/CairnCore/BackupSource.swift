import Foundation

/// Backups as CreateVolume content sources (docs/backups.md, "Restore through CSI"): a snapshot
/// id `backup:<target>/<backup-id>` names backup `<backup-id>` of the configured target
/// `<target>`. The controller asks a `BackupSource` (the executable wires one in when
/// `--backup-targets` is given) what the backup holds and to write it into a new volume.
public protocol BackupSource: Sendable {
    /// What the backup holds. NOT_FOUND when the target has no such backup; `secrets` are the
    /// request's CSI secrets (credentials that override the target's).
    func describe(_ reference: BackupReference, secrets: [String: String]) async throws -> BackupDescription

    /// Writes the backup into the volume's (just created) storage. Idempotent and resumable: a
    /// repeat after an interruption fetches only what the earlier run had not finished.
    func restore(_ reference: BackupReference, into volume: VolumeRecord, secrets: [String: String]) async throws

    /// Deletes the backup (DeleteSnapshot of its id): its manifest at once, the packs no other
    /// backup uses after the target's grace period. A backup that is not there is fine.
    func delete(_ reference: BackupReference, secrets: [String: String]) async throws
}

/// A backup as a content source: its size, filesystem ("" raw block), when it was made, and
/// the wrapped key of an encrypted volume's backup (a volume restored from it takes that key).
public struct BackupDescription: Sendable, Equatable {
    /// The volume the backup was made of.
    public var sourceVolumeID: String
    public var sizeBytes: Int64
    public var fsType: String
    public var createdAt: Date
    public var encryption: VolumeEncryption?

    public init(sourceVolumeID: String, sizeBytes: Int64, fsType: String, createdAt: Date, encryption: VolumeEncryption?) {
        self.sourceVolumeID = sourceVolumeID
        self.sizeBytes = sizeBytes
        self.fsType = fsType
        self.createdAt = createdAt
        self.encryption = encryption
    }
}

/// `backup:<target>/<backup-id>`.
public struct BackupReference: Sendable, Equatable, CustomStringConvertible {
    public static let scheme = "backup:"
    public var target: String
    public var backupID: String

    public init(target: String, backupID: String) {
        self.target = target
        self.backupID = backupID
    }

    /// nil when `snapshotID` is not a backup reference at all; INVALID_ARGUMENT when it starts
    /// like one but is malformed.
    public static func parse(_ snapshotID: String) throws -> BackupReference? {
        guard snapshotID.hasPrefix(scheme) else { return nil }
        let rest = snapshotID.dropFirst(scheme.count)
        let parts = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
            throw CairnError.invalidArgument("snapshot id \(Validate.printable(snapshotID)) is not of the form backup:<target>/<backup-id>")
        }
        try Validate.volumeID(String(parts[0]), field: "the backup target in \(Validate.printable(snapshotID))")
        try Validate.volumeID(String(parts[1]), field: "the backup id in \(Validate.printable(snapshotID))")
        return BackupReference(target: String(parts[0]), backupID: String(parts[1]))
    }

    public var description: String { "\(Self.scheme)\(target)/\(backupID)" }
}
