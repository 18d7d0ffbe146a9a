import CDirectIO
import CairnCore
import Dispatch
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Write-through commits (docs/engine.md): while an application commits at queue depth 1 —
/// one write, then a flush, over and over — every write is already durable on every replica
/// when it is answered (a durable write), and its flush then syncs nothing. The flush still
/// costs a trip from the application through the loop device, FUSE and back (about 100 µs
/// here). So the engine makes every write and trim durable before answering it, and then tells
/// the kernel the volume's loop devices keep nothing volatile (write cache "write through"):
/// their flushes are answered by the block layer at once and never reach the engine.
///
/// The one rule: while any loop device over the volume's file is in write-through mode,
/// `allDurable` is set, and then no write or trim is answered before it is durable on every
/// in-sync replica (a durable write, or a flush of its own). So `allDurable` is set before
/// the first device is switched and cleared only after the last one was switched back; an
/// engine that starts and finds a device in that mode (its predecessor died in it) starts
/// with it set.
///
/// The kernel drains a device's I/O to switch it (about 15 ms), so switches are rare: in when
/// most flushes are commits (`commitScore`), out when writes stop looking like commits (several
/// in flight, large writes, trims: `score`), and out every `probeAfter` to look again — in write-through
/// mode no flush arrives to show whether the application still commits, and a stream of
/// writes at queue depth 1 with no flush would pay a sync each. All of it runs on one
/// background queue, never on a FUSE worker (a switch waits for the FUSE requests in flight).
final class WriteThrough: Sendable {
    /// Every write and trim is durable on every in-sync replica before it is answered.
    let allDurable = Atomic<Bool>(false)
    /// While write back: +1 per flush that synced nothing and came after exactly one write (a
    /// commit), −2 per other flush (not below 0). In at `enterScore`: when over two thirds of
    /// the flushes are commits.
    let commitScore = Atomic<Int>(0)
    /// While write-through: +2 per write that needed a flush of its own, had company in flight
    /// or was a trim; −1 per write that was alone and durable. Out at `leaveScore`: when over a
    /// third of the writes are not commits.
    let score = Atomic<Int>(0)
    /// Monotonic ns: no switch is tried before it (a switch or a failed attempt moves it on);
    /// when write-through began (0: adopted from a predecessor, leave at once).
    let notBefore = Atomic<UInt64>(0)
    let enteredAt = Atomic<UInt64>(0)
    /// Write-through found at start (a predecessor's): leave it at the first write.
    let adopted = Atomic<Bool>(false)
    let switchQueued = Atomic<Bool>(false)
    let stopping = Atomic<Bool>(false)
    /// Write-through is off for good on this engine (sysfs not writable, …).
    let disabled = Atomic<Bool>(false)
    let switches = Atomic<UInt64>(0)
    /// Writes and trims made durable by a flush of their own while write-through.
    let ownFlushes = Atomic<UInt64>(0)
    let queue = DispatchQueue(label: "cairn.write-through")
    /// The flushes made for writes and trims that were not durable as made share rounds.
    let rounds = FlushRounds()

    static let enterScore = 64
    static let leaveScore = 64
    static let minimumDwell: UInt64 = 2_000_000_000
    static let probeAfter: UInt64 = 30_000_000_000
    /// Attempts that found no loop device over the file wait this long before the next.
    static let retryAfter: UInt64 = 10_000_000_000
    /// Off unless `CAIRN_WRITE_THROUGH=on`: in testing, loop devices that the engine switched
    /// now and then stopped forwarding requests to FUSE for seconds (once, for good: a node
    /// wedged in NodeUnstageVolume), cause not found yet (docs/engine.md). Switching back out
    /// (a predecessor's mode found at start) is always done.
    static let enabled: Bool = getenv("CAIRN_WRITE_THROUGH").map { String(cString: $0) == "on" } ?? false
    /// Tests: switch in as if `CAIRN_WRITE_THROUGH=on`.
    let enabledForTesting = Atomic<Bool>(false)
}

extension VolumeEngine {
    /// The volume file's path as sysfs shows a loop device's backing file, found without
    /// looking inside the FUSE mount (a lookup there waits for this engine to serve it: at a
    /// resume, before it does, it would never return).
    var volumeFileRealPath: String {
        (Validate.realPath(mountDirectory) ?? mountDirectory) + "/volume"
    }

    /// The loop devices over this volume's file now.
    func loopDevicesOverFile() -> [String] {
        LoopWriteCache.devices(backing: volumeFileRealPath)
    }

    /// At start, before any request is served: a predecessor that died in write-through mode
    /// left the kernel skipping this volume's flushes, so every write must be durable from the
    /// first; the probe switches back soon.
    func adoptWriteThroughLeftByPredecessor() {
        let left = loopDevicesOverFile().filter { LoopWriteCache.mode($0) == .writeThrough }
        guard !left.isEmpty else { return }
        writeThrough.allDurable.store(true, ordering: .sequentiallyConsistent)
        writeThrough.adopted.store(true, ordering: .relaxed)
        writeThrough.enteredAt.store(0, ordering: .relaxed)
        logger.notice("the volume's loop device is in write-through mode (left by the engine before this one): every write is made durable before it is answered until it is switched back",
                      metadata: ["devices": "\(left.joined(separator: ","))"])
    }

    /// Called by `flush` with what it did: scores commits and asks for write-through.
    /// (Flushes race only with each other here; a lost update only delays a switch.)
    @inline(__always)
    func noteFlushForWriteThrough(syncedNothing: Bool, afterOneWrite: Bool) {
        let w = writeThrough
        let score = w.commitScore.load(ordering: .relaxed)
        guard syncedNothing && afterOneWrite else {
            if score != 0 { w.commitScore.store(max(0, score - 2), ordering: .relaxed) }
            return
        }
        if score < WriteThrough.enterScore {
            w.commitScore.store(score + 1, ordering: .relaxed)
        } else if !w.allDurable.load(ordering: .relaxed) {
            requestWriteThroughSwitch(on: true)
        }
    }

    /// Called after every write and trim while `allDurable`, before it is answered: makes it
    /// durable if it is not yet (a flush of the replicas that answered it without saying so)
    /// and judges whether the workload still looks like commits. 0 or -errno.
    func finishWriteThrough(alone: Bool, trim: Bool) -> Int32 {
        let w = writeThrough
        let (result, flushed) = makeDurable()
        let costly = flushed || !alone || trim
        if costly {
            if flushed { w.ownFlushes.wrappingAdd(1, ordering: .relaxed) }
            if w.score.wrappingAdd(2, ordering: .relaxed).newValue >= WriteThrough.leaveScore { requestWriteThroughSwitch(on: false) }
        } else if w.score.load(ordering: .relaxed) > 0 {
            w.score.wrappingSubtract(1, ordering: .relaxed)
        }
        if monotonicNanoseconds() &- w.enteredAt.load(ordering: .relaxed) > WriteThrough.probeAfter { requestWriteThroughSwitch(on: false) }
        return result
    }

    /// Flushes the in-sync replicas holding a write or trim they did not make durable (none:
    /// nothing is sent), in a round shared with the other callers that arrive meanwhile.
    /// Returns 0 or -errno, and whether a flush was needed.
    func makeDurable() -> (Int32, Bool) {
        let pending = sets.withShared { s in s.inSync.contains { $0.pendingMark() != nil } }
        guard pending else { return (0, false) }
        let result = writeThrough.rounds.flush {
            enterGate()
            defer { leaveGate() }
            return flushInSyncMembers(volumeID: volumeID, epoch: epoch, through: flushWatermark()).0
        }
        return (result, true)
    }

    /// Asks the background queue to switch in (`on`) or out; one request at a time, and one
    /// that finds the engine already so by the time it runs does nothing.
    func requestWriteThroughSwitch(on: Bool) {
        let w = writeThrough
        guard !on || ((WriteThrough.enabled || w.enabledForTesting.load(ordering: .relaxed)) && VolumeEngine.durableWritesEnabled),
              !w.stopping.load(ordering: .relaxed),
              !w.disabled.load(ordering: .relaxed) || w.allDurable.load(ordering: .relaxed),
              monotonicNanoseconds() >= w.notBefore.load(ordering: .relaxed) || w.adopted.load(ordering: .relaxed) else { return }
        if w.switchQueued.exchange(true, ordering: .acquiringAndReleasing) { return }
        w.queue.async { [self] in
            defer { w.switchQueued.store(false, ordering: .releasing) }
            // A switch waits for the volume's I/O in flight: this thread's allocations must
            // never wait for writeback to the volume.
            _ = cdio_mark_io_flusher()
            guard !w.stopping.load(ordering: .acquiring) else { return }
            let now = w.allDurable.load(ordering: .sequentiallyConsistent)
            if now && !on { leaveWriteThrough() } else if !now && on { enterWriteThrough() }
        }
    }

    private func enterWriteThrough() {
        let w = writeThrough
        let now = monotonicNanoseconds()
        guard !w.disabled.load(ordering: .relaxed), now >= w.notBefore.load(ordering: .relaxed),
              !fenced.load(ordering: .relaxed) else { return }
        let file = volumeFileRealPath
        let devices = LoopWriteCache.devices(backing: file)
        guard !devices.isEmpty else {
            // The application uses the file itself: its flushes must reach the engine.
            w.notBefore.store(now &+ WriteThrough.retryAfter, ordering: .relaxed)
            return
        }
        // First every write from now on durable, then everything answered before now.
        w.allDurable.store(true, ordering: .sequentiallyConsistent)
        guard makeDurable().0 == 0 else {
            w.allDurable.store(false, ordering: .sequentiallyConsistent)
            w.notBefore.store(monotonicNanoseconds() &+ WriteThrough.minimumDwell, ordering: .relaxed)
            return
        }
        var switched: [String] = []
        var failure: String?
        var stuck: [String] = []  // left in write-through mode by a failed attempt
        do {
            for device in devices {
                do {
                    try LoopWriteCache.set(device, .writeThrough)
                    switched.append(device)
                    // Detached (and perhaps reused) meanwhile: not ours to leave so.
                    if LoopWriteCache.backingFile(device) != file {
                        try LoopWriteCache.set(device, .writeBack)
                        switched.removeLast()
                    }
                } catch {
                    failure = "\(error)"
                    break
                }
            }
            if failure != nil {
                for device in switched where (try? LoopWriteCache.set(device, .writeBack)) == nil { stuck.append(device) }
                switched = []
            }
        }
        w.notBefore.store(monotonicNanoseconds() &+ WriteThrough.minimumDwell, ordering: .relaxed)
        if let failure {
            // A device still in write-through mode keeps every write durable (the flag stays).
            if stuck.isEmpty { w.allDurable.store(false, ordering: .sequentiallyConsistent) }
            w.disabled.store(true, ordering: .relaxed)
            logger.warning("cannot put the volume's loop device in write-through mode; every commit keeps a flush round trip (about 100 µs more)",
                           metadata: ["error": "\(failure)", "devices": "\(devices.joined(separator: ","))",
                                      "left_write_through": "\(stuck.joined(separator: ","))",
                                      "fix": "give the node plugin a writable /sys (a privileged container), or set CAIRN_WRITE_THROUGH=off to silence this"])
            return
        }
        guard !switched.isEmpty else {
            w.allDurable.store(false, ordering: .sequentiallyConsistent)
            return
        }
        w.enteredAt.store(monotonicNanoseconds(), ordering: .relaxed)
        w.adopted.store(false, ordering: .relaxed)
        w.score.store(0, ordering: .relaxed)
        w.switches.wrappingAdd(1, ordering: .relaxed)
        metrics.writeThroughSwitch()
        logger.info("commits at queue depth 1: every write is now durable when answered, and the loop device no longer sends flushes (write through)",
                    metadata: ["devices": "\(switched.joined(separator: ","))",
                               "commit.score": "\(w.commitScore.load(ordering: .relaxed))"])
    }

    private func leaveWriteThrough() {
        let w = writeThrough
        let now = monotonicNanoseconds()
        guard now >= w.notBefore.load(ordering: .relaxed) || w.adopted.load(ordering: .relaxed) else { return }
        let file = volumeFileRealPath
        var failure: String?
        var devices: [String] = []
        do {
            devices = LoopWriteCache.devices(backing: file).filter { LoopWriteCache.mode($0) == .writeThrough }
            for device in devices {
                do { try LoopWriteCache.set(device, .writeBack) } catch { failure = "\(error)" }
            }
        }
        w.notBefore.store(monotonicNanoseconds() &+ WriteThrough.minimumDwell, ordering: .relaxed)
        if let failure {
            // Still skipping flushes somewhere: every write stays durable.
            logger.error("cannot switch the volume's loop device back to write back; every write stays durable when answered",
                         metadata: ["error": "\(failure)", "devices": "\(devices.joined(separator: ","))"])
            return
        }
        w.commitScore.store(0, ordering: .relaxed)
        let adopted = w.adopted.exchange(false, ordering: .relaxed)
        w.allDurable.store(false, ordering: .sequentiallyConsistent)
        w.switches.wrappingAdd(1, ordering: .relaxed)
        metrics.writeThroughSwitch()
        let probe = now &- w.enteredAt.load(ordering: .relaxed) > WriteThrough.probeAfter
        logger.info("the loop device sends flushes again (write back)",
                    metadata: ["devices": "\(devices.joined(separator: ","))",
                               "why": "\(adopted ? "found in write-through mode at start" : probe ? "periodic look at the workload (no flush arrives while write through)" : "writes no longer look like commits at queue depth 1")"])
    }

    /// Before a stop or a hand-over: no switch starts any more, and one running has finished
    /// (a switch waits for the FUSE requests in flight, which are still served here) — or,
    /// if it has not within 5 s, the stop goes on and says so.
    func quiesceWriteThrough() {
        writeThrough.stopping.store(true, ordering: .sequentiallyConsistent)
        let done = DispatchSemaphore(value: 0)
        writeThrough.queue.async { done.signal() }
        if done.wait(timeout: .now() + 5) == .timedOut {
            logger.error("a switch of the volume's loop device write cache has not finished in 5 s; stopping anyway",
                         metadata: ["devices": "\(loopDevicesOverFile().joined(separator: ","))"])
        }
    }
}

extension VolumeEngine {
    /// Tests: every write durable when answered, as in write-through mode, with no loop device
    /// and no switch out for an hour.
    func holdWriteThroughForTesting() {
        writeThrough.allDurable.store(true, ordering: .sequentiallyConsistent)
        writeThrough.enteredAt.store(monotonicNanoseconds(), ordering: .relaxed)
        writeThrough.notBefore.store(monotonicNanoseconds() &+ 3_600_000_000_000, ordering: .relaxed)
    }
}
