import CairnCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Mutexes striped over 1 MiB regions of a replica: I/O to the same blocks is serialized (so a
/// block's data and its block-map entry always change together, and a read never sees one
/// without the other), I/O to different regions runs in parallel. A range takes its stripes in
/// ascending order, so two ranges cannot deadlock.
final class RegionLocks: @unchecked Sendable {
    static let stripes = 64
    static let regionShift: UInt64 = 20
    private let locks: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        locks = .allocate(capacity: Self.stripes)
        for i in 0..<Self.stripes { pthread_mutex_init(locks + i, nil) }
    }

    deinit {
        for i in 0..<Self.stripes { pthread_mutex_destroy(locks + i) }
        locks.deallocate()
    }

    /// Runs `body` holding every stripe that covers bytes [offset, offset+length).
    func withRange<R>(offset: UInt64, length: Int, _ body: () throws -> R) rethrows -> R {
        let first = offset >> Self.regionShift
        let last = (offset + UInt64(max(length, 1)) - 1) >> Self.regionShift
        if last - first < UInt64(Self.stripes) {
            // Stripe indices of consecutive regions, in ascending stripe order (they may wrap).
            let a = Int(first % UInt64(Self.stripes)), b = Int(last % UInt64(Self.stripes))
            if a <= b {
                for i in a...b { pthread_mutex_lock(locks + i) }
                defer { for i in a...b { pthread_mutex_unlock(locks + i) } }
                return try body()
            }
            for i in 0...b { pthread_mutex_lock(locks + i) }
            for i in a..<Self.stripes { pthread_mutex_lock(locks + i) }
            defer {
                for i in 0...b { pthread_mutex_unlock(locks + i) }
                for i in a..<Self.stripes { pthread_mutex_unlock(locks + i) }
            }
            return try body()
        }
        for i in 0..<Self.stripes { pthread_mutex_lock(locks + i) }
        defer { for i in 0..<Self.stripes { pthread_mutex_unlock(locks + i) } }
        return try body()
    }

    /// Runs `body` holding every stripe that covers any of `ranges` (offset, length), each
    /// stripe once, taken in ascending stripe order as `withRange` takes them, so the two never
    /// deadlock.
    func withRanges<R>(_ ranges: [(offset: UInt64, length: Int)], _ body: () throws -> R) rethrows -> R {
        var held = [Bool](repeating: false, count: Self.stripes)
        for r in ranges {
            let first = r.offset >> Self.regionShift
            let last = (r.offset + UInt64(max(r.length, 1)) - 1) >> Self.regionShift
            if last - first >= UInt64(Self.stripes) {
                for i in 0..<Self.stripes { held[i] = true }
                break
            }
            for region in first...last { held[Int(region % UInt64(Self.stripes))] = true }
        }
        for i in 0..<Self.stripes where held[i] { pthread_mutex_lock(locks + i) }
        defer { for i in 0..<Self.stripes where held[i] { pthread_mutex_unlock(locks + i) } }
        return try body()
    }
}

/// One 4 KiB-aligned scratch buffer per thread, grown on demand and freed when the thread
/// exits: O_DIRECT needs aligned memory, and the data path must not allocate per request. An
/// anonymous mapping, not malloc's: it is resident only as far as requests touched it, its
/// pages go back to the kernel when the thread has been idle (`drop`, docs/engine.md, "Idle
/// volumes give their buffers back"), and freeing it really unmaps it (a freed 1 MiB malloc
/// chunk raises glibc's mmap threshold, and the next ones then stay in an arena).
enum AlignedScratch {
    private final class Buffer {
        var pointer: UnsafeMutableRawPointer?
        var capacity = 0
        deinit { if let pointer { munmap(pointer, capacity) } }
    }

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { Unmanaged<Buffer>.fromOpaque($0!).release() }
        return key
    }()

    private static var current: Buffer? {
        pthread_getspecific(key).map { Unmanaged<Buffer>.fromOpaque($0).takeUnretainedValue() }
    }

    /// The calling thread's buffer, at least `count` bytes (valid until the next call on this
    /// thread).
    static func buffer(_ count: Int) -> UnsafeMutableRawBufferPointer {
        let buffer: Buffer
        if let existing = current {
            buffer = existing
        } else {
            buffer = Buffer()
            pthread_setspecific(key, Unmanaged.passRetained(buffer).toOpaque())
        }
        if buffer.capacity < count {
            if let old = buffer.pointer { munmap(old, buffer.capacity) }
            buffer.pointer = nil
            buffer.capacity = 0
            let capacity = (max(count, 1 << 20) + 4095) & ~4095
            let raw = mmap(nil, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            guard let raw, raw != MAP_FAILED else { fatalError("out of memory for a \(capacity)-byte I/O buffer") }
            buffer.pointer = raw
            buffer.capacity = capacity
        }
        return UnsafeMutableRawBufferPointer(start: buffer.pointer, count: count)
    }

    /// Gives the calling thread's buffer's pages back to the kernel (the mapping stays; the next
    /// request that needs a page gets a zeroed one). Only between two requests of this thread.
    static func drop() {
        guard let buffer = current, let pointer = buffer.pointer else { return }
        _ = madvise(pointer, buffer.capacity, MADV_DONTNEED)
    }

    /// Resident bytes of the calling thread's buffer (mincore).
    static func residentBytes() -> Int {
        guard let buffer = current, let pointer = buffer.pointer else { return 0 }
        var pages = [UInt8](repeating: 0, count: buffer.capacity / 4096)
        guard mincore(pointer, buffer.capacity, &pages) == 0 else { return 0 }
        return pages.reduce(0) { $0 + Int($1 & 1) } * 4096
    }
}

/// A fixed set of threads running submitted jobs in order of submission. The replica server
/// runs requests on it: they block on disk I/O, and Dispatch's pool keeps only about one
/// thread per CPU running for them, so a replica would see two or three requests at a time
/// however many are queued.
///
/// A job wakes the thread that went idle last (each waiting thread has a condition of its own,
/// on a stack): a trickle of requests — a scrub, one volume's commits — keeps one or two
/// threads warm (their stacks, scratch buffers and caches) while the rest stay asleep long
/// enough to give their scratch back. Woken in turn, as one shared condition does, every
/// thread ran a job every few milliseconds and none was ever idle.
final class WorkerPool: @unchecked Sendable {
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let exited = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// A waiting thread's own condition, and whether a job or the shutdown woke it.
    private final class Sleeper {
        let ready = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        var woken = false
        init() { pthread_cond_init(ready, nil) }
        deinit {
            pthread_cond_destroy(ready)
            ready.deallocate()
        }
    }
    // Guarded by `lock`.
    private var jobs: [(@Sendable () -> Void)?] = []
    private var head = 0
    private var running = 0
    private var stopping = false
    /// The threads waiting for a job, the one that went idle last at the end.
    private var sleepers: [Sleeper] = []
    /// A thread that has had no job for this long drops its scratch buffer's pages
    /// (nanoseconds; 0: never).
    private let idleDrop: UInt64

    /// `idleSeconds`: how long a thread waits without a job before it gives its scratch
    /// buffer's pages back (`CAIRN_IDLE_TRIM_SECONDS` by default; 0 never).
    init(idleSeconds: Double = IdleHeapTrim.idleSeconds) {
        idleDrop = UInt64(max(0, idleSeconds) * 1e9)
        pthread_mutex_init(lock, nil)
        pthread_cond_init(exited, nil)
        sleepers.reserveCapacity(64)
    }

    deinit {
        pthread_mutex_destroy(lock)
        pthread_cond_destroy(exited)
        lock.deallocate()
        exited.deallocate()
    }

    /// Starts `threads` more threads.
    func start(threads: Int) throws {
        for _ in 0..<threads {
            pthread_mutex_lock(lock)
            running += 1
            pthread_mutex_unlock(lock)
            do {
                try startThread { [self] in work() }
            } catch {
                pthread_mutex_lock(lock)
                running -= 1
                pthread_mutex_unlock(lock)
                throw error
            }
        }
    }

    func submit(_ job: @escaping @Sendable () -> Void) {
        pthread_mutex_lock(lock)
        jobs.append(job)
        if let sleeper = sleepers.popLast() {
            sleeper.woken = true
            pthread_cond_signal(sleeper.ready)
        }
        pthread_mutex_unlock(lock)
    }

    /// Runs the jobs already submitted, then ends every thread and waits for them.
    func shutdown() {
        pthread_mutex_lock(lock)
        stopping = true
        for sleeper in sleepers {
            sleeper.woken = true
            pthread_cond_signal(sleeper.ready)
        }
        sleepers.removeAll()
        while running > 0 { pthread_cond_wait(exited, lock) }
        pthread_mutex_unlock(lock)
    }

    private func work() {
        let me = Sleeper()
        pthread_mutex_lock(lock)
        // Whether this thread's scratch holds nothing since its last job (or it never had one).
        var dropped = true
        while true {
            while head == jobs.count && !stopping {
                me.woken = false
                sleepers.append(me)
                var timedOut = false
                if dropped || idleDrop == 0 {
                    pthread_cond_wait(me.ready, lock)
                } else {
                    var deadline = timespec()
                    clock_gettime(CLOCK_REALTIME, &deadline)
                    let nanoseconds = UInt64(deadline.tv_nsec) + idleDrop
                    deadline.tv_sec += Int(nanoseconds / 1_000_000_000)
                    deadline.tv_nsec = Int(nanoseconds % 1_000_000_000)
                    timedOut = pthread_cond_timedwait(me.ready, lock, &deadline) == ETIMEDOUT
                }
                // Not taken off the stack by `submit` (a timeout, a spurious wake-up): off it now.
                if !me.woken, let at = sleepers.lastIndex(where: { $0 === me }) { sleepers.remove(at: at) }
                if timedOut, !me.woken, head == jobs.count, !stopping {
                    pthread_mutex_unlock(lock)
                    AlignedScratch.drop()
                    pthread_mutex_lock(lock)
                    dropped = true
                }
            }
            if head == jobs.count { break }
            let job = jobs[head]!
            jobs[head] = nil
            head += 1
            if head == jobs.count {
                // Drained: start over instead of growing (keeps the capacity).
                jobs.removeAll(keepingCapacity: true)
                head = 0
            } else if head >= 1024 && head * 2 >= jobs.count {
                jobs.removeFirst(head)
                head = 0
            }
            pthread_mutex_unlock(lock)
            job()
            dropped = false
            pthread_mutex_lock(lock)
        }
        running -= 1
        pthread_cond_broadcast(exited)
        pthread_mutex_unlock(lock)
    }
}
