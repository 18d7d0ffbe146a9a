import Foundation

/// A volume's condition in one word, as the status page and its API show it. Derived from the
/// record alone (which replicas are in sync, their resync progress), the same facts the CSI
/// volume condition's message spells out (`VolumeBacking.problem`).
public enum VolumeHealth: String, Codable, Sendable, CaseIterable {
    /// Every replica in sync (a one-machine volume always is).
    case healthy
    /// A replica is out of sync and nothing is copying it back (its node is away, or its
    /// resync waits to retry).
    case degraded
    /// A replica is out of sync and a resync is bringing it back.
    case resyncing
    /// No replica in sync, or fewer than minInSync: the volume refuses writes.
    case faulted
}

extension ResyncProgress {
    /// How long a progress record stays current without an update: the engine records one
    /// every few seconds while it copies, so an older one is from an engine that stopped.
    public static let staleAfter: TimeInterval = 30

    /// Whether a resync is copying now: a fresh record not waiting to retry.
    public func isActive(at now: Date = Date()) -> Bool {
        !phase.hasPrefix("waiting") && now.timeIntervalSince(updatedAt) < Self.staleAfter
    }
}

extension VolumeRecord {
    public func health(at now: Date = Date()) -> VolumeHealth {
        guard let replicas, !replicas.isEmpty else { return .healthy }
        let inSync = replicas.filter(\.inSync).count
        if inSync == 0 || inSync < minInSync { return .faulted }
        if inSync == replicas.count { return .healthy }
        let copying = replicas.contains { !$0.inSync && $0.resync?.isActive(at: now) == true }
        return copying ? .resyncing : .degraded
    }
}
