#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A value behind a plain pthread mutex (adaptive: a short spin, then the kernel), with
/// `Mutex`'s `withLock` shape.
///
/// For state that many I/O threads take for a few instructions each, where the holder is often
/// preempted (dozens of threads on two cores): Swift's `Mutex` on Linux spins, then takes a
/// priority-inheriting futex, and profiles of the replica client under random writes showed
/// 5% of its process's CPU spinning in it (docs/engine.md).
public final class PlainLocked<Value>: @unchecked Sendable {
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        var attributes = pthread_mutexattr_t()
        pthread_mutexattr_init(&attributes)
        pthread_mutexattr_settype(&attributes, Int32(PTHREAD_MUTEX_ADAPTIVE_NP))
        pthread_mutex_init(lock, &attributes)
        pthread_mutexattr_destroy(&attributes)
    }

    deinit {
        pthread_mutex_destroy(lock)
        lock.deallocate()
    }

    /// Owns the value while `body` runs.
    @inline(__always)
    public func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return try body(&value)
    }
}
