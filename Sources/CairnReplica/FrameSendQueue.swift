// Send combining for one connection (issue 16): many threads send frames on one socket; at
// most one of them writes at a time, and the others hand it their frames instead of waiting.
//
// A thread that sends while nobody is writing writes its frame at once, itself (queue depth
// 1: no timer, no hand-off, exactly one write as before). A thread that sends while another is
// writing appends its frame to the pending list and returns at once; the writer, after each
// write, takes everything pending and writes it in one call (one sendmsg with an iovec per
// part, or one record of the secure channel), until nothing is pending. So when sends overlap
// (many threads on many cores, a write that blocks or is preempted) the frames that piled up
// cost one system call, not one each, and no thread waits on a lock to send.
//
// Frames are never interleaved (a frame's parts go out together, in order) and go out in the
// order they were queued. Parts are kept by reference: a 1 MiB write is never copied into a
// combined buffer, and a write's data may be *borrowed* — the caller's own memory, sent from
// where it is — as long as the caller keeps it valid until its reply came or, when the reply
// will not come, until `fence` returned. After a failed write, `fence` or `close` nothing more
// is written: the frames still pending are dropped, and `send` tells the caller why, so it
// breaks the connection (the client fails every waiter, which includes the dropped frames'
// callers; the server shuts the socket).
//
// Used by ReplicaClient (requests) and ServerConnection (replies).

import CairnCore
import Synchronization

/// One piece of a frame: bytes the queue holds, or memory the sender keeps valid (see above).
enum FramePart: @unchecked Sendable {
    case owned([UInt8])
    case borrowed(UnsafeRawBufferPointer)

    var count: Int {
        switch self {
        case .owned(let bytes): bytes.count
        case .borrowed(let memory): memory.count
        }
    }
}

final class FrameSendQueue: Sendable {
    /// Writes `parts` to the connection as one stream, whole, or throws.
    typealias Writer = @Sendable ([UnsafeRawBufferPointer]) throws -> Void

    /// Frames written in one call at most (each frame's parts are one level of recursion in
    /// `withBuffers`; the rest wait for the next call).
    static let maxFramesPerWrite = 128

    private struct State {
        /// A thread is writing (it takes `pending` when its write is done).
        var writing = false
        /// Frames waiting for the writer, each its parts, oldest first.
        var pending: [[FramePart]] = []
        /// Why nothing more can be sent (closed, or a write failed); nil while it works.
        var failure: String?
    }

    /// Held while writing.
    private struct Wire {
        /// Nothing more is written (`fence` or `close` ran).
        var stopped = false
        /// `close`'s body ran: the descriptor may be gone.
        var closed = false
    }

    private let state = PlainLocked(State())
    private let wire = PlainLocked(Wire())
    private let writer: Writer
    private let bytes = Atomic<UInt64>(0)
    private let writes = Atomic<UInt64>(0)
    private let frames = Atomic<UInt64>(0)

    init(writer: @escaping Writer) {
        self.writer = writer
    }

    /// Every byte written (frames whole).
    var bytesWritten: UInt64 { bytes.load(ordering: .relaxed) }
    /// Calls of the writer (each usually one system call): fewer than `framesWritten` when
    /// frames were combined.
    var writeCalls: UInt64 { writes.load(ordering: .relaxed) }
    /// Frames written.
    var framesWritten: UInt64 { frames.load(ordering: .relaxed) }

    /// Sends one frame made of `parts`. Returns nil when the frame was written, or queued
    /// behind the thread writing now (which writes it next). Otherwise returns why the
    /// connection can no longer send — it is closed, or a write of this thread failed (its own
    /// frame's or frames combined with it, which are then lost) — and the caller must break the
    /// connection.
    func send(_ parts: [FramePart]) -> String? {
        let turn: Turn = state.withLock { s in
            if let failure = s.failure { return .refused(failure) }
            if s.writing {
                s.pending.append(parts)
                return .queued
            }
            s.writing = true
            return .write
        }
        switch turn {
        case .refused(let failure): return failure
        case .queued: return nil
        case .write: break
        }
        var batch = [parts]
        while true {
            let failed = write(batch)
            let (next, failure): ([[FramePart]]?, String?) = state.withLock { s in
                if let failed, s.failure == nil { s.failure = failed }
                if s.failure != nil || s.pending.isEmpty {
                    s.pending.removeAll(keepingCapacity: true)
                    s.writing = false
                    return (nil, s.failure)
                }
                let take = min(s.pending.count, Self.maxFramesPerWrite)
                defer { s.pending.removeFirst(take) }
                return (Array(s.pending.prefix(take)), nil)
            }
            // Frames may have been dropped after a close or another thread's failure even when
            // this thread's writes went out: the caller learns it as well.
            guard let next else { return failure }
            batch = next
        }
    }

    /// Stops sending: later sends fail, pending frames are dropped, and `body` (closing the
    /// descriptor) runs once no write is under way. Idempotent (`body` runs once).
    func close(_ reason: String = "the connection is closed", _ body: () -> Void) {
        state.withLock { s in
            if s.failure == nil { s.failure = reason }
        }
        wire.withLock { w in
            w.stopped = true
            guard !w.closed else { return }
            w.closed = true
            body()
        }
    }

    /// Stops sending (as `close`, but the descriptor stays open for `close`) and returns once
    /// no write is under way: after it, no frame's memory is read again. A caller whose frame
    /// borrowed memory and whose reply will not come calls it before reusing that memory.
    func fence(_ reason: String) {
        state.withLock { s in
            if s.failure == nil { s.failure = reason }
            s.pending.removeAll()
        }
        wire.withLock { $0.stopped = true }
    }

    /// What `send` does with a frame: write it (nobody else is), leave it to the thread
    /// writing now, or refuse it.
    private enum Turn {
        case write, queued, refused(String)
    }

    /// Writes the frames of `batch` in one writer call; returns why it failed.
    private func write(_ batch: [[FramePart]]) -> String? {
        let parts = batch.flatMap { $0 }
        return wire.withLock { w -> String? in
            guard !w.stopped else { return "the connection is closed" }
            do {
                var buffers: [UnsafeRawBufferPointer] = []
                buffers.reserveCapacity(parts.count)
                try Self.withBuffers(parts[...], &buffers, writer)
            } catch {
                return "\(error)"
            }
            writes.wrappingAdd(1, ordering: .relaxed)
            frames.wrappingAdd(UInt64(batch.count), ordering: .relaxed)
            bytes.wrappingAdd(UInt64(parts.reduce(0) { $0 + $1.count }), ordering: .relaxed)
            return nil
        }
    }

    /// Calls `body` with the memory of every part of `parts`, in order, without copying.
    private static func withBuffers(_ parts: ArraySlice<FramePart>, _ buffers: inout [UnsafeRawBufferPointer],
                                    _ body: ([UnsafeRawBufferPointer]) throws -> Void) throws {
        guard let first = parts.first else { return try body(buffers) }
        switch first {
        case .owned(let bytes):
            try bytes.withUnsafeBytes { b in
                buffers.append(b)
                try withBuffers(parts.dropFirst(), &buffers, body)
            }
        case .borrowed(let memory):
            buffers.append(memory)
            try withBuffers(parts.dropFirst(), &buffers, body)
        }
    }
}
