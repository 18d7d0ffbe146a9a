import CairnCore
import Foundation
import Synchronization

/// A resync's rate and time to go, from the successive progress records the controller reads
/// (each one the engine's `bytesDone` at its `updatedAt`), kept in memory: the rate over the
/// last `window` seconds of samples. Until two samples of one resync are seen (just after it
/// started, or after a controller restart) it falls back to the rate the engine recorded.
public final class ResyncRates: Sendable {
    public struct Estimate: Sendable, Equatable {
        /// Bytes per second; 0 when not known.
        public var bytesPerSecond: Double
        /// Seconds to go; nil while the rate is unknown (or nothing moves).
        public var etaSeconds: Double?
    }

    public struct Key: Hashable, Sendable {
        public var volumeID: String
        public var nodeID: String

        public init(volumeID: String, nodeID: String) {
            self.volumeID = volumeID
            self.nodeID = nodeID
        }
    }

    struct Sample {
        var time: Date
        var bytesDone: Int64
    }

    struct Track {
        /// Identifies the resync: a new one (new start) drops the old samples.
        var startedAt: Date
        var samples: [Sample]
    }

    let window: TimeInterval
    private let tracks = Mutex<[Key: Track]>([:])

    public init(window: TimeInterval = 20) {
        self.window = window
    }

    /// Adds the record as a sample (once per distinct `updatedAt`) and estimates from the samples.
    public func observe(volumeID: String, nodeID: String, _ progress: ResyncProgress) -> Estimate {
        let key = Key(volumeID: volumeID, nodeID: nodeID)
        let samples = tracks.withLock { tracks -> [Sample] in
            var track = tracks[key].flatMap { $0.startedAt == progress.startedAt ? $0 : nil }
                ?? Track(startedAt: progress.startedAt, samples: [])
            if let last = track.samples.last, last.time >= progress.updatedAt {
                // The same record again (or an older one read late): nothing new.
            } else {
                track.samples.append(Sample(time: progress.updatedAt, bytesDone: progress.bytesDone))
            }
            let horizon = progress.updatedAt.addingTimeInterval(-window)
            // Keep one sample at or before the horizon, so the window stays spanned.
            while track.samples.count > 2, track.samples[1].time <= horizon { track.samples.removeFirst() }
            tracks[key] = track
            return track.samples
        }
        return Self.estimate(samples: samples, progress: progress)
    }

    /// Forgets the resyncs not in `keep` (finished ones, deleted volumes).
    public func retain(_ keep: Set<Key>) {
        tracks.withLock { tracks in tracks = tracks.filter { keep.contains($0.key) } }
    }

    static func estimate(samples: [Sample], progress: ResyncProgress) -> Estimate {
        var rate = 0.0
        if let first = samples.first, let last = samples.last, last.time.timeIntervalSince(first.time) >= 1 {
            rate = max(0, Double(last.bytesDone - first.bytesDone) / last.time.timeIntervalSince(first.time))
        }
        if rate == 0, samples.count < 2 {
            rate = Double(max(progress.bytesPerSecond, 0))
        }
        let remaining = Double(max(progress.bytesTotal - progress.bytesDone, 0))
        let eta: Double? = remaining == 0 ? 0 : rate > 0 ? remaining / rate : nil
        return Estimate(bytesPerSecond: rate, etaSeconds: eta)
    }
}
