import Foundation

/// Backups as CreateVolume content sources (docs/backups.md, "Restore through CSI"): a snapshot
/// id `backup:<target>/<backup-id>` names backup `<backup-id>` of the configured target
/// `<target>`. The controller asks a `BackupSource` (the executable wires one in when
/// `--backup-targets` is given) what the backup holds and to write it into a new volume.
public protocol BackupSource: Sendable {
    /// The backup's size and filesystem ("" raw block). NOT_FOUND when the target has no such
    /// backup; `secrets` are the request's CSI secrets (credentials that override the target's).
    func describe(_ reference: BackupReference, secrets: [String: String]) async throws -> (sizeBytes: Int64, fsType: String, createdAt: Date)

    /// Writes the backup into the volume's (just created) storage. Idempotent and resumable: a
    /// repeat after an interruption fetches only what the earlier run had not finished.
    func restore(_ reference: BackupReference, into volume: VolumeRecord, secrets: [String: String]) async throws
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
