#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

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
