import CairnCore
import Foundation

/// `cairn volume watch`: what one sample of a volume shows, and the rate measured between
/// samples. The engine records a resync's progress every couple of seconds; the rate is taken
/// from the recorded byte counts and their `updatedAt` times, so sampling faster than the
/// engine records does not read as a stall.
public struct ResyncRateEstimator: Sendable {
    private var last: [String: (at: Date, done: Int64)] = [:]
    private var rates: [String: Double] = [:]

    public init() {}

    /// Feeds one replica's recorded progress; returns the bytes per second measured between the
    /// last two distinct records, or the engine's own figure until there are two.
    public mutating func rate(replica key: String, _ progress: ResyncProgress) -> Double {
        if let previous = last[key], progress.updatedAt > previous.at {
            let done = progress.bytesDone - previous.done
            rates[key] = done >= 0 ? Double(done) / progress.updatedAt.timeIntervalSince(previous.at) : nil
        }
        if last[key].map({ progress.updatedAt > $0.at }) ?? true {
            last[key] = (progress.updatedAt, progress.bytesDone)
        }
        return rates[key] ?? Double(progress.bytesPerSecond)
    }

    public mutating func forget(replica key: String) {
        last[key] = nil
        rates[key] = nil
    }
}

/// One replica in a watch sample.
public struct WatchedReplica: Codable, Sendable, Equatable {
    public var nodeID: String
    public var address: String
    public var inSync: Bool
    /// diff, copy, joining, "waiting: …"; "in sync" once it is; nil while out of sync with no
    /// resync recorded (its node is away).
    public var phase: String?
    public var bytesDone: Int64?
    public var bytesTotal: Int64?
    /// 0…100; 100 for a replica that came back in sync during the watch.
    public var percent: Double?
    /// Measured between samples (bytes per second).
    public var bytesPerSecond: Double?
    public var etaSeconds: Double?
    public var reason: String?

    public init(nodeID: String, address: String, inSync: Bool, phase: String? = nil, bytesDone: Int64? = nil,
                bytesTotal: Int64? = nil, percent: Double? = nil, bytesPerSecond: Double? = nil,
                etaSeconds: Double? = nil, reason: String? = nil) {
        self.nodeID = nodeID
        self.address = address
        self.inSync = inSync
        self.phase = phase
        self.bytesDone = bytesDone
        self.bytesTotal = bytesTotal
        self.percent = percent
        self.bytesPerSecond = bytesPerSecond
        self.etaSeconds = etaSeconds
        self.reason = reason
    }

    /// Whether the watch draws a bar for it: it is or was out of sync during the watch.
    public var tracked: Bool { percent != nil || !inSync }
}

/// One sample: `--output json` prints each as a line of its own.
public struct WatchSample: Codable, Sendable, Equatable {
    public var time: Date
    public var volumeID: String
    public var epoch: UInt64
    public var condition: VolumeHealth.State
    public var message: String
    public var replicasInSync: Int
    /// The replicas the volume has (1 for a one-machine volume, which lists none).
    public var replicasTotal: Int
    public var replicas: [WatchedReplica]

    public init(time: Date, volumeID: String, epoch: UInt64, condition: VolumeHealth.State, message: String,
                replicasInSync: Int, replicasTotal: Int, replicas: [WatchedReplica]) {
        self.time = time
        self.volumeID = volumeID
        self.epoch = epoch
        self.condition = condition
        self.message = message
        self.replicasInSync = replicasInSync
        self.replicasTotal = replicasTotal
        self.replicas = replicas
    }

    public var allInSync: Bool { replicas.allSatisfy(\.inSync) }
}

/// Turns successive records of one volume into samples: measures rates, and remembers which
/// replicas were out of sync so that they show a full bar once they are back.
public struct VolumeWatcher: Sendable {
    private var estimator = ResyncRateEstimator()
    private var seenOut: Set<String> = []

    public init() {}

    public mutating func sample(_ volume: VolumeRecord, at now: Date = Date()) -> WatchSample {
        let health = VolumeHealth(volume)
        var replicas: [WatchedReplica] = []
        for r in volume.replicas ?? [] {
            var w = WatchedReplica(nodeID: r.nodeID, address: r.address, inSync: r.inSync, reason: r.reason)
            if r.inSync {
                estimator.forget(replica: r.nodeID)
                if seenOut.contains(r.nodeID) {
                    w.phase = "in sync"
                    w.percent = 100
                }
            } else {
                seenOut.insert(r.nodeID)
                if let p = r.resync {
                    let rate = estimator.rate(replica: r.nodeID, p)
                    w.phase = p.phase
                    w.bytesDone = p.bytesDone
                    w.bytesTotal = p.bytesTotal
                    w.percent = p.percent
                    w.bytesPerSecond = rate
                    w.etaSeconds = rate > 0 && p.bytesTotal >= p.bytesDone ? Double(p.bytesTotal - p.bytesDone) / rate : nil
                } else {
                    w.percent = 0
                }
            }
            replicas.append(w)
        }
        return WatchSample(time: now, volumeID: volume.id, epoch: volume.epoch.rawValue, condition: health.state,
                           message: health.message, replicasInSync: health.inSync, replicasTotal: health.total, replicas: replicas)
    }
}

/// How a sample reads: a screen for a terminal, or a line per tracked replica for a pipe.
public enum WatchRendering {
    /// "n3  [=======>        ]  42.5%  215.0 MiB/512.0 MiB  20.0 MiB/s  ETA 14s  copy".
    public static func replicaLine(_ r: WatchedReplica, barWidth: Int = 32) -> String {
        let fraction = (r.percent ?? 0) / 100
        var parts = [ProgressBar.render(fraction: fraction, width: barWidth), Units.percent(r.percent ?? 0)]
        if let done = r.bytesDone, let total = r.bytesTotal {
            parts.append("\(Units.bytes(done))/\(Units.bytes(total))")
        }
        if let rate = r.bytesPerSecond, !r.inSync { parts.append(Units.rate(rate)) }
        if !r.inSync { parts.append("ETA " + (r.etaSeconds.map(Units.duration) ?? "-")) }
        parts.append(r.phase ?? "waiting for its node" + (r.reason.map { " (\($0))" } ?? ""))
        return parts.joined(separator: "  ")
    }

    /// The whole screen: a header, a table of the replicas, a bar per tracked replica.
    public static func screen(_ s: WatchSample, interval: Double) -> [String] {
        var lines = ["volume \(s.volumeID)  epoch \(s.epoch)  \(s.condition.rawValue)  \(s.replicasInSync)/\(s.replicasTotal) in sync  (every \(Units.duration(interval)); \(timeOfDay(s.time)))",
                     s.message, ""]
        let width = s.replicas.map(\.nodeID.count).max() ?? 0
        for r in s.replicas {
            let name = r.nodeID + String(repeating: " ", count: width - r.nodeID.count)
            lines.append("\(name)  " + (r.tracked ? replicaLine(r) : "in sync"))
        }
        if s.replicas.isEmpty { lines.append("a local file on one machine: nothing to resync") }
        return lines
    }

    /// Plain mode: one line per tracked replica, with the time; one line when nothing is out.
    public static func plainLines(_ s: WatchSample) -> [String] {
        let tracked = s.replicas.filter(\.tracked)
        let head = "\(timeOfDay(s.time)) \(s.volumeID) \(s.condition.rawValue) \(s.replicasInSync)/\(s.replicasTotal) in sync"
        guard !tracked.isEmpty else { return [head] }
        return tracked.map { head + "  \($0.nodeID)  " + replicaLine($0) }
    }

    static func timeOfDay(_ date: Date) -> String {
        let c = Calendar.current.dateComponents([.hour, .minute, .second], from: date)
        return [c.hour ?? 0, c.minute ?? 0, c.second ?? 0].map { $0 < 10 ? "0\($0)" : "\($0)" }.joined(separator: ":")
    }
}
