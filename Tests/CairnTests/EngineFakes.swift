import CairnEngine
@testable import CairnReplica
import Foundation
import Synchronization

/// An in-memory replica for engine tests: stores the bytes, records every write's generation,
/// and fails on demand.
final class FakeReplica: ReplicaIO {
    struct Write: Equatable { var offset: UInt64; var length: Int; var generation: UInt64 }

    struct State {
        var data: [UInt8]
        var epoch: UInt64 = 0
        var highestGeneration: UInt64 = 0
        var writes: [Write] = []
        var reads = 0
        var flushes = 0
        var trims: [(offset: UInt64, length: UInt64, generation: UInt64)] = []
        var closed = false
        /// Thrown by every later write, flush, trim and read.
        var failure: (any Error & Sendable)?
        /// Thrown by claim.
        var claimFailure: (any Error & Sendable)?
        /// Per block: the generation as the `generations` op reports it (bit 63: trimmed).
        var generations: [UInt64] = []
        /// Blocks whose data "does not match its checksum": reads of them fail, verify lists them.
        var corrupt: Set<UInt64> = []
        /// Resync copies received (if-newer writes and trims), applied or not, in bytes.
        var resyncBytes = 0
        var repairs: [UInt64] = []
        var summaryCalls = 0
        var generationCalls = 0
        /// Snapshots taken: id, a copy of the data then, and the writes in flight on this replica then.
        var snapshots: [(id: String, data: [UInt8], writesInFlight: Int)] = []
        /// Thrown by snapshot.
        var snapshotFailure: (any Error & Sendable)?
        /// Writes that started and have not finished.
        var writesInFlight = 0
        var grows: [UInt64] = []
        /// Writes that asked to be made durable (`write(...durable: true)`).
        var durableAsked = 0
        /// Blocks of writes answered as not durable and not flushed since (what a power loss
        /// could take): a flush empties it, a durable write of a block takes it out.
        var volatileBlocks: Set<UInt64> = []
    }

    let nodeID: String
    let storesData: Bool
    let state: Mutex<State>
    /// The replica store's activity log, for convergence (starts "restarted", as a store does).
    let log = ActivityLog()
    /// Called at the start of every write, outside the lock (to observe concurrency).
    let onWrite = Mutex<(@Sendable () -> Void)?>(nil)
    /// Called at the end of every flush (after it took effect), outside the lock.
    let onFlush = Mutex<(@Sendable () -> Void)?>(nil)
    /// Writes whose data was not 4 KiB-aligned memory (the store would have had to copy it for
    /// O_DIRECT).
    let unalignedWrites = Atomic<Int>(0)

    init(nodeID: String, size: Int, highestGeneration: UInt64 = 0, storesData: Bool = true) {
        self.nodeID = nodeID
        self.storesData = storesData
        var initial = State(data: storesData ? [UInt8](repeating: 0, count: size) : [], highestGeneration: highestGeneration)
        if storesData { initial.generations = [UInt64](repeating: 0, count: size / 4096) }
        state = Mutex(initial)
    }

    /// Whether a write asked to be durable is answered as durable (a journaling replica store);
    /// else it is answered as any write (an older replica server).
    let makesDurable = Atomic<Bool>(false)

    func fail(with error: (any Error & Sendable)?) { state.withLock { $0.failure = error } }
    var snapshot: (writes: [Write], reads: Int, flushes: Int, closed: Bool) {
        state.withLock { ($0.writes, $0.reads, $0.flushes, $0.closed) }
    }
    func bytes(_ offset: Int, _ count: Int) -> [UInt8] { state.withLock { Array($0.data[offset..<offset + count]) } }

    private func check(_ s: State, epoch: UInt64) throws {
        if let failure = s.failure { throw failure }
        if epoch < s.epoch { throw ReplicaError.staleEpoch(seen: s.epoch, got: epoch) }
    }

    private func checkAligned(_ offset: UInt64, _ length: Int) throws {
        guard offset % 4096 == 0, length % 4096 == 0 else {
            throw ReplicaError.badRequest("unaligned I/O at \(offset) length \(length)")
        }
    }

    func claim(volumeID: String, epoch: UInt64) throws -> ReplicaStatus {
        try state.withLock { s in
            if let failure = s.claimFailure { throw failure }
            if epoch < s.epoch { throw ReplicaError.staleEpoch(seen: s.epoch, got: epoch) }
            s.epoch = epoch
            return ReplicaStatus(volumeID: volumeID, size: UInt64(storesData ? s.data.count : Int.max / 2), blockSize: 4096,
                                 epoch: epoch, flushedGeneration: s.highestGeneration, highestGeneration: s.highestGeneration)
        }
    }

    func read(volumeID: String, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, epoch: UInt64) throws {
        try checkAligned(offset, buffer.count)
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.reads += 1
            let first = offset / 4096
            if let bad = (first..<first + UInt64(buffer.count / 4096)).first(where: { s.corrupt.contains($0) }) {
                throw ReplicaError.checksumMismatch(block: bad)
            }
            guard storesData else {
                _ = buffer.initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            s.data.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
        }
    }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws {
        try checkAligned(offset, data.count)
        if Int(bitPattern: data.baseAddress) % 4096 != 0 { unalignedWrites.wrappingAdd(1, ordering: .relaxed) }
        state.withLock { $0.writesInFlight += 1 }
        defer { state.withLock { $0.writesInFlight -= 1 } }
        onWrite.withLock { $0 }?()
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.volatileBlocks.formUnion((offset / 4096)..<((offset + UInt64(data.count)) / 4096))
            guard storesData else { return }
            log.note(offset: offset, length: data.count, generation: generation)
            s.writes.append(Write(offset: offset, length: data.count, generation: generation))
            s.data.withUnsafeMutableBytes { ($0.baseAddress! + Int(offset)).copyMemory(from: data.baseAddress!, byteCount: data.count) }
            for b in Int(offset / 4096)..<Int(offset / 4096) + data.count / 4096 {
                s.generations[b] = generation
                s.corrupt.remove(UInt64(b))
            }
            s.highestGeneration = max(s.highestGeneration, generation)
        }
    }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
               durable: Bool) throws -> Bool {
        if durable { state.withLock { $0.durableAsked += 1 } }
        try write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
        let made = durable && makesDurable.load(ordering: .relaxed)
        if made { state.withLock { $0.volatileBlocks.subtract((offset / 4096)..<((offset + UInt64(data.count)) / 4096)) } }
        return made
    }

    func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                    epoch: UInt64, durable: Bool) -> () throws -> Bool {
        do {
            let made = try write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch,
                                 durable: durable)
            return { made }
        } catch {
            return { throw error }
        }
    }

    func flush(volumeID: String, epoch: UInt64) throws {
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.flushes += 1
            s.volatileBlocks.removeAll()
        }
        onFlush.withLock { $0 }?()
    }

    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws {
        try checkAligned(offset, Int(length))
        try state.withLock { s in
            try check(s, epoch: epoch)
            log.note(offset: offset, length: Int(length), generation: generation)
            s.trims.append((offset, length, generation))
            s.volatileBlocks.formUnion((offset / 4096)..<((offset + length) / 4096))
            guard storesData else { return }
            for i in Int(offset)..<Int(offset + length) { s.data[i] = 0 }
            for b in Int(offset / 4096)..<Int((offset + length) / 4096) {
                s.generations[b] = generation | BlockGenerations.trimmedBit
                s.corrupt.remove(UInt64(b))
            }
            s.highestGeneration = max(s.highestGeneration, generation)
        }
    }

    func close() { state.withLock { $0.closed = true } }

    func snapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws {
        try state.withLock { s in
            try check(s, epoch: epoch)
            if let failure = s.snapshotFailure { throw failure }
            guard !s.snapshots.contains(where: { $0.id == snapshotID }) else { return }
            s.snapshots.append((snapshotID, s.data, s.writesInFlight))
        }
    }

    func grow(volumeID: String, sizeBytes: UInt64, epoch: UInt64) throws {
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.grows.append(sizeBytes)
            guard storesData, Int(sizeBytes) > s.data.count else { return }
            s.data += [UInt8](repeating: 0, count: Int(sizeBytes) - s.data.count)
            s.generations += [UInt64](repeating: 0, count: Int(sizeBytes) / 4096 - s.generations.count)
        }
    }

    // Resync, repair, scrub: the replica store's rules, in memory.

    func generations(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.generationCalls += 1
            return Array(s.generations[Int(firstBlock)..<Int(firstBlock) + count])
        }
    }

    func generationSummary(volumeID: String, firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.summaryCalls += 1
            // A replica that stores nothing has nothing written.
            guard storesData else { return [UInt64](repeating: 0, count: count) }
            return (0..<count).map { i in
                let start = (Int(firstRegion) + i) * 256
                let values = s.generations[start..<min(start + 256, s.generations.count)]
                guard values.contains(where: { $0 != 0 }) else { return 0 }
                return values.enumerated().reduce(UInt64(14_695_981_039_346_656_037)) { hash, item in
                    (hash ^ (item.element &+ UInt64(item.offset))) &* 1_099_511_628_211
                }
            }
        }
    }

    /// Applies whole blocks whose generation passes `applies`; returns how many.
    private func conditional(_ offset: UInt64, _ data: UnsafeRawBufferPointer, _ generation: UInt64, epoch: UInt64,
                             resync: Bool, _ applies: (UInt64) -> Bool) throws -> Int {
        try checkAligned(offset, data.count)
        return try state.withLock { s in
            try check(s, epoch: epoch)
            if resync { s.resyncBytes += data.count }
            log.note(offset: offset, length: data.count, generation: generation)
            var applied = 0
            for i in 0..<data.count / 4096 {
                let b = Int(offset / 4096) + i
                guard applies(BlockGenerations.generation(s.generations[b])) else { continue }
                s.data.withUnsafeMutableBytes {
                    ($0.baseAddress! + b * 4096).copyMemory(from: data.baseAddress! + i * 4096, byteCount: 4096)
                }
                s.generations[b] = generation
                s.corrupt.remove(UInt64(b))
                if !resync { s.repairs.append(UInt64(b)) }
                applied += 1
            }
            s.highestGeneration = max(s.highestGeneration, generation)
            return applied
        }
    }

    func writeIfNewer(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        try conditional(offset, data, generation, epoch: epoch, resync: true) { $0 < generation }
    }

    func repairWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        try conditional(offset, data, generation, epoch: epoch, resync: false) { $0 <= generation }
    }

    func trimIfNewer(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws -> Int {
        try checkAligned(offset, Int(length))
        return try state.withLock { s in
            try check(s, epoch: epoch)
            log.note(offset: offset, length: Int(length), generation: generation)
            var applied = 0
            for b in Int(offset / 4096)..<Int((offset + length) / 4096)
            where BlockGenerations.generation(s.generations[b]) < generation {
                for i in b * 4096..<(b + 1) * 4096 { s.data[i] = 0 }
                s.generations[b] = generation | BlockGenerations.trimmedBit
                s.corrupt.remove(UInt64(b))
                applied += 1
            }
            return applied
        }
    }

    func verify(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try state.withLock { s in
            try check(s, epoch: epoch)
            return s.corrupt.filter { $0 >= firstBlock && $0 < firstBlock + UInt64(count) }.sorted()
        }
    }

    var wireBytes: (sent: UInt64, received: UInt64) { (0, 0) }

    func activity(volumeID: String, cleanThrough: UInt64, converged: Bool, epoch: UInt64) throws -> ReplicaActivity {
        try state.withLock { s in try check(s, epoch: epoch) }
        return log.settle(cleanThrough: cleanThrough, converged: converged)
    }

    /// Simulates a write the engine never saw acknowledged (or silent corruption when
    /// `corrupt`): changes the bytes of `block` at `generation` behind the engine's back.
    func tamper(block: Int, byte: UInt8, generation: UInt64? = nil, corrupt: Bool = false) {
        state.withLock { s in
            for i in block * 4096..<(block + 1) * 4096 { s.data[i] = byte }
            if let generation {
                log.note(offset: UInt64(block * 4096), length: 4096, generation: generation)
                s.generations[block] = generation
                s.highestGeneration = max(s.highestGeneration, generation)
            }
            if corrupt { s.corrupt.insert(UInt64(block)) }
        }
    }
}

struct FakeFailure: Error, CustomStringConvertible {
    var description: String
}

/// Records markOutOfSync calls; throws while `failing` is set.
final class OutOfSyncRecorder: Sendable {
    let calls = Mutex<[(nodeID: String, reason: String)]>([])
    let failing = Mutex<(any Error & Sendable)?>(nil)
    /// Called inside markOutOfSync, before it returns (to observe ordering).
    let onMark = Mutex<(@Sendable (String) -> Void)?>(nil)

    var nodeIDs: [String] { calls.withLock { $0.map(\.nodeID) } }

    func mark(_ nodeID: String, _ reason: String) throws {
        if let failure = failing.withLock({ $0 }) { throw failure }
        onMark.withLock { $0 }?(nodeID)
        calls.withLock { $0.append((nodeID, reason)) }
    }
}
