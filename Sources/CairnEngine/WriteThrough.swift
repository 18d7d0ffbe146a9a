import CairnCore
import CFUSEShim
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Write-through volumes (docs/engine.md, "Write-through volumes"): the engine answers no write
/// or trim before it is durable on every in-sync replica (`allDurable`). An application's
/// flush then has nothing left to make durable, so the loop device over the engine's file is
/// set to write-through mode when it is attached (`LinuxMounter.attachLoop`, while it is still
/// idle): the block layer answers its flushes at once and they never travel through the loop
/// device, FUSE and the engine (about 100 µs and three wake-ups per commit here).
///
/// The mode is set once per attachment and never switched while the device carries I/O: the
/// kernel drains a device's requests to switch it, and an earlier design that switched under
/// load could not rule out a wedge (docs/engine.md).
///
/// The one rule: while any loop device over the engine's file is in write-through mode,
/// `allDurable` is set. It is set at the engine's start, before it serves a request, when the
/// volume wants write-through (its `writeThrough` parameter, and `CAIRN_WRITE_THROUGH` not off
/// on this node), and also when a device over the file is found in that mode then (attached
/// while the setting was on); it is never cleared while the engine runs. Only then does the
/// engine vouch for its file (`LoopWriteCache.vouch`), and only a vouched file's loop device is
/// attached in write-through mode.
final class WriteThrough: Sendable {
    /// Every write and trim is durable on every in-sync replica before it is answered.
    let allDurable = Atomic<Bool>(false)
    /// Writes and trims made durable by a flush round of the engine's own (not durable as
    /// written: large, with company in flight, trims, or a replica that cannot write durably).
    let ownFlushes = Atomic<UInt64>(0)
    /// Those flushes share rounds (group commit).
    let rounds = FlushRounds()
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

    /// At start, before any request is served: every write durable when answered if the
    /// volume wants write-through (its parameter, and `CAIRN_WRITE_THROUGH` not off here), or
    /// if a loop device over the file is in that mode already (attached while it did). Once
    /// it serves, the engine then vouches for its file (`start`), so NodeStage attaches loop
    /// devices write-through.
    func decideDurabilityAtStart(enabled: Bool = LoopWriteCache.enabled) {
        if !(enabled && wantsWriteThrough) {
            let left = loopDevicesOverFile().filter { LoopWriteCache.mode($0) == .writeThrough }
            guard !left.isEmpty else { return }
            logger.notice("the volume's loop device is in write-through mode (attached while write-through was on for it): every write is made durable before it is answered until the volume is staged again",
                          metadata: ["devices": "\(left.joined(separator: ","))",
                                     "volume.write_through": "\(wantsWriteThrough)", "CAIRN_WRITE_THROUGH": "\(enabled ? "on" : "off")"])
        }
        writeThrough.allDurable.store(true, ordering: .sequentiallyConsistent)
    }

    /// Called after every write and trim while `allDurable`, before it is answered: makes it
    /// durable if it is not yet (a flush of the replicas that answered it without saying so).
    /// 0 or -errno.
    func makeAnswerDurable() -> Int32 {
        let (result, flushed) = makeDurable()
        if flushed {
            writeThrough.ownFlushes.wrappingAdd(1, ordering: .relaxed)
            metrics.durabilityFlush()
        }
        return result
    }

    /// Flushes the in-sync replicas holding a write or trim they did not make durable (none:
    /// nothing is sent), in a round shared with the other callers that arrive meanwhile.
    /// Returns 0 or -errno, and whether a flush was needed.
    func makeDurable() -> (Int32, Bool) {
        guard needsDurabilityFlush else { return (0, false) }
        return (writeThrough.rounds.flush { durabilityRound() }, true)
    }

    /// Whether an in-sync replica holds a write or trim it did not make durable.
    var needsDurabilityFlush: Bool {
        sets.withShared { s in s.inSync.contains { $0.pendingMark() != nil } }
    }

    /// One flush round of the engine's own: every in-sync replica holding something not yet
    /// durable. 0 or -errno.
    func durabilityRound() -> Int32 {
        let start = metrics.start()
        defer { metrics.durabilityRound(since: start) }
        enterGate()
        defer { leaveGate() }
        return flushInSyncMembers(volumeID: volumeID, epoch: epoch, through: flushWatermark()).0
    }

    /// For a write served on a FUSE worker that must be made durable before its answer: the
    /// answer is deferred to the flush round that makes it durable (`FlushRounds.join`), and
    /// `answer(result)` runs on that round's thread; the worker goes back to the kernel at
    /// once. The caller has seen `needsDurabilityFlush`. False when the write cannot be
    /// deferred (not on a FUSE worker's write, or `CAIRN_DEFERRED_WRITE_ANSWERS=off`): the
    /// caller then makes it durable itself.
    func deferUntilDurable(_ answer: @escaping (_ deferred: OpaquePointer, _ result: Int32) -> Void) -> Bool {
        guard Self.deferredWriteAnswers, let deferred = cfuse_defer_write() else { return false }
        writeThrough.ownFlushes.wrappingAdd(1, ordering: .relaxed)
        metrics.durabilityFlush()
        writeThrough.rounds.join({ answer(deferred, $0) }, round: { durabilityRound() })
        return true
    }

    /// `CAIRN_DEFERRED_WRITE_ANSWERS=off`: a write-through write's FUSE worker waits for the flush
    /// round and answers itself (an escape hatch, and the A/B switch for measurements).
    static let deferredWriteAnswers: Bool = getenv("CAIRN_DEFERRED_WRITE_ANSWERS").map { String(cString: $0) != "off" } ?? true
}

extension VolumeEngine {
    /// Tests: every write durable when answered (on or off, whatever the environment says).
    func setAllDurableForTesting(_ on: Bool) {
        writeThrough.allDurable.store(on, ordering: .sequentiallyConsistent)
    }
}
