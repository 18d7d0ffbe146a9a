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
    }

    let nodeID: String
    let storesData: Bool
    let state: Mutex<State>
    /// Called at the start of every write, outside the lock (to observe concurrency).
    let onWrite = Mutex<(@Sendable () -> Void)?>(nil)

    init(nodeID: String, size: Int, highestGeneration: UInt64 = 0, storesData: Bool = true) {
        self.nodeID = nodeID
        self.storesData = storesData
        state = Mutex(State(data: storesData ? [UInt8](repeating: 0, count: size) : [], highestGeneration: highestGeneration))
    }

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
            guard storesData else {
                _ = buffer.initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            s.data.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
        }
    }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws {
        try checkAligned(offset, data.count)
        onWrite.withLock { $0 }?()
        try state.withLock { s in
            try check(s, epoch: epoch)
            guard storesData else { return }
            s.writes.append(Write(offset: offset, length: data.count, generation: generation))
            s.data.withUnsafeMutableBytes { ($0.baseAddress! + Int(offset)).copyMemory(from: data.baseAddress!, byteCount: data.count) }
        }
    }

    func flush(volumeID: String, epoch: UInt64) throws {
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.flushes += 1
        }
    }

    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws {
        try checkAligned(offset, Int(length))
        try state.withLock { s in
            try check(s, epoch: epoch)
            s.trims.append((offset, length, generation))
            guard storesData else { return }
            for i in Int(offset)..<Int(offset + length) { s.data[i] = 0 }
        }
    }

    func close() { state.withLock { $0.closed = true } }
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
