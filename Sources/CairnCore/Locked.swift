#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// The pthread-backed locks of the data path: `ReadWriteLocked` for state every I/O reads and
// almost nothing changes, `PlainLocked` for state many I/O threads change for a few instructions.

/// A value behind a reader-writer lock (pthread rwlock, writers preferred so a claim, a flush or
/// a membership change is not starved by a steady stream of I/O). Shared holders read the value
/// (and may touch what is safe to touch concurrently, such as atomics it holds); exclusive
/// holders own it.
///
/// For state that every I/O reads and almost nothing changes: readers do not wait for each
/// other, where a mutex makes every I/O thread queue behind the others (and Swift's `Mutex` on
/// Linux spins and then takes a priority-inheriting futex, which costs most when a holder is
/// preempted — often, with many I/O threads on two cores).
public final class ReadWriteLocked<Value>: @unchecked Sendable {
    private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(lock, &attributes)
        pthread_rwlockattr_destroy(&attributes)
    }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    /// Reads the value while other readers may too.
    @inline(__always)
    public func withShared<R>(_ body: (Value) throws -> R) rethrows -> R {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body(value)
    }

    /// Owns the value: no reader or other writer runs meanwhile.
    @inline(__always)
    public func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body(&value)
    }
}
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
