#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Keeps writes and trims of the same blocks one after the other (docs/engine.md, "I/O rules").
///
/// Two writes of one block in flight at once take two generations, and each replica applies
/// them in the order *it* receives them: one connection may carry them one way round, another
/// the other way, and a replica server running requests in parallel may reorder them itself.
/// Replicas would then hold different data for a block at different generations, while every
/// write was acknowledged. So a write waits until no write or trim in flight overlaps its blocks;
/// writes of different blocks (all of them, in practice: filesystems and databases do not
/// overwrite a block before the last write of it has completed) never wait.
///
/// A short list under a mutex: it holds at most one entry per request in flight (the FUSE
/// queue depth), and a scan of it costs far less than the I/O.
final class OverlapGate: @unchecked Sendable {
    private struct Span { var start: UInt64; var end: UInt64 }
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let released = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var spans: [Span] = []
    private var waiting = 0
    /// Writes that had to wait for an overlapping one (tests and diagnostics).
    private(set) var waits: UInt64 = 0

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(released, nil)
        spans.reserveCapacity(128)
    }

    deinit {
        pthread_cond_destroy(released)
        pthread_mutex_destroy(mutex)
        released.deallocate()
        mutex.deallocate()
    }

    /// Runs `body` once no other holder's blocks overlap bytes [start, end) (whole blocks:
    /// the caller rounds), holding them meanwhile.
    func with<R>(start: UInt64, end: UInt64, _ body: () throws -> R) rethrows -> R {
        enter(start: start, end: end)
        defer { leave(start: start, end: end) }
        return try body()
    }

    private func enter(start: UInt64, end: UInt64) {
        pthread_mutex_lock(mutex)
        var counted = false
        while spans.contains(where: { $0.start < end && start < $0.end }) {
            if !counted { waits &+= 1; counted = true }
            waiting += 1
            pthread_cond_wait(released, mutex)
            waiting -= 1
        }
        spans.append(Span(start: start, end: end))
        pthread_mutex_unlock(mutex)
    }

    private func leave(start: UInt64, end: UInt64) {
        pthread_mutex_lock(mutex)
        if let i = spans.firstIndex(where: { $0.start == start && $0.end == end }) {
            spans.swapAt(i, spans.count - 1)
            spans.removeLast()
        }
        if waiting > 0 { pthread_cond_broadcast(released) }
        pthread_mutex_unlock(mutex)
    }

    /// Spans held now (tests).
    var held: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return spans.count
    }
}
