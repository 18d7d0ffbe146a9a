import Foundation

/// A volume's condition as the cluster store alone shows it, for operators (`cairn volume
/// list|inspect|watch`, the status page and its API): no engine state, so it is the same from
/// any machine that reads the store. The controller's CSI VolumeCondition (`VolumeBacking.problem`) adds what the local
/// engine knows (fenced, repairs) on top of the same replica rules.
public struct VolumeHealth: Sendable, Equatable {
    public enum State: String, Codable, Sendable, CaseIterable {
        /// Every replica is in sync (or a one-machine volume: a local file).
        case healthy
        /// A replica is out of sync and no resync of it is under way (its node is away, or the
        /// last attempt failed and waits to retry).
        case degraded
        /// Every out-of-sync replica is being copied back (a resync or a full rebuild).
        case resyncing
        /// No replica is in sync, or fewer than `minInSync`: the volume refuses writes (or
        /// cannot be staged at all).
        case faulted
    }

    public var state: State
    public var inSync: Int
    public var total: Int
    /// One sentence: what is wrong and what happens next.
    public var message: String

    /// `now`: when the replicas' progress records are judged (a stale one is from an engine
    /// that stopped copying).
    public init(_ volume: VolumeRecord, at now: Date = Date()) {
        guard let replicas = volume.replicas else {
            self.init(state: .healthy, inSync: 1, total: 1, message: "healthy: a local file on one machine")
            return
        }
        let inSync = replicas.filter(\.inSync)
        let out = replicas.filter { !$0.inSync }
        let counts = "\(inSync.count) of \(replicas.count) replicas in sync"
        if inSync.isEmpty {
            self.init(state: .faulted, inSync: 0, total: replicas.count,
                      message: "faulted: no replica is in sync; the volume cannot be staged until one of its nodes (\(replicas.map(\.nodeID).joined(separator: ", "))) returns with its data")
        } else if inSync.count < volume.minInSync {
            self.init(state: .faulted, inSync: inSync.count, total: replicas.count,
                      message: "faulted: writes refused (minInSync=\(volume.minInSync), \(counts)); they are served again once a replica is back in sync")
        } else if out.isEmpty {
            self.init(state: .healthy, inSync: inSync.count, total: replicas.count, message: "healthy: \(counts)")
        } else if out.allSatisfy({ $0.resync?.isActive(at: now) ?? false }) {
            self.init(state: .resyncing, inSync: inSync.count, total: replicas.count,
                      message: "resyncing: \(counts); copying to \(out.map(\.nodeID).joined(separator: ", "))")
        } else {
            let waiting = out.filter { !($0.resync?.isActive(at: now) ?? false) }
            self.init(state: .degraded, inSync: inSync.count, total: replicas.count,
                      message: "degraded: \(counts); no copy under way to \(waiting.map(\.nodeID).joined(separator: ", ")) (its node is away, the resync waits to retry or its engine stopped; the replica is re-created elsewhere after the controller's --replica-timeout)")
        }
    }

    public init(state: State, inSync: Int, total: Int, message: String) {
        self.state = state
        self.inSync = inSync
        self.total = total
        self.message = message
    }
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
    /// `VolumeHealth(self, at: now).state`.
    public func health(at now: Date = Date()) -> VolumeHealth.State {
        VolumeHealth(self, at: now).state
    }
}

/// A node's state as the cluster store shows it (`cairn node list`, the status page).
public enum NodeState: String, Codable, Sendable {
    /// Registered and its registration is alive (etcd: its lease; SQLite: every registered node).
    case live
    /// Holds replicas or attachments but is not registered now: stopped, crashed or cut off.
    case away
    /// `cairn node remove`d: may not register again.
    case removed
}
