#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Runs one operation per replica in parallel for a FUSE worker thread: the caller runs index 0
/// itself and hands the others to helper threads that may block (replica calls wait on the
/// network). No allocation per call: jobs live on the caller's stack, each caller thread has
/// one reusable waiter.
///
/// Why not `DispatchQueue.concurrentPerform`: its width is the CPU count and its workers are
/// shared, so with blocking replica calls on a busy node the iterations run one after another
/// on the caller (latency = sum of the replicas' instead of the slowest's).
final class FanOut: @unchecked Sendable {
    /// Process-wide: 16 FUSE threads per engine, each needing (replicas - 1) helpers at once;
    /// helpers are cheap while idle. When all are busy, the caller runs the job itself.
    static let shared = FanOut(threads: 48, capacity: 1024)

    private struct Job {
        var body: (Int) -> Void
        var index: Int
        var waiter: Waiter
    }

    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let ready = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// A ring of pointers to jobs on callers' stacks; guarded by `lock`.
    private let ring: UnsafeMutablePointer<UnsafeMutablePointer<Job>?>
    private let capacity: Int
    private var head = 0
    private var count = 0
    private var idle = 0

    private init(threads: Int, capacity: Int) {
        pthread_mutex_init(lock, nil)
        pthread_cond_init(ready, nil)
        self.capacity = capacity
        ring = .allocate(capacity: capacity)
        ring.initialize(repeating: nil, count: capacity)
        for _ in 0..<threads {
            var thread = pthread_t()
            let context = Unmanaged.passRetained(self).toOpaque()
            let rc = pthread_create(&thread, nil, { context in
                Unmanaged<FanOut>.fromOpaque(context!).takeRetainedValue().work()
            }, context)
            if rc == 0 { pthread_detach(thread) } else { Unmanaged<FanOut>.fromOpaque(context).release() }
        }
    }

    /// Calls `body(i)` for every i in 0..<count, in parallel, and returns when all returned.
    func run(_ count: Int, _ body: (Int) -> Void) {
        if count == 1 { return body(0) }
        withoutActuallyEscaping(body) { body in
            withUnsafeTemporaryAllocation(of: Job.self, capacity: count - 1) { jobs in
                let waiter = Waiter.current
                waiter.expect(count - 1)
                for i in 1..<count {
                    let job = jobs.baseAddress! + (i - 1)
                    job.initialize(to: Job(body: body, index: i, waiter: waiter))
                    if !submit(job) {
                        body(i)
                        waiter.done()
                    }
                }
                body(0)
                waiter.wait()
                jobs.baseAddress!.deinitialize(count: count - 1)
            }
        }
    }

    /// False when no helper is idle (the caller then runs the job itself).
    private func submit(_ job: UnsafeMutablePointer<Job>) -> Bool {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        guard idle > count, count < capacity else { return false }
        ring[(head + count) % capacity] = job
        count += 1
        pthread_cond_signal(ready)
        return true
    }

    private func work() -> Never {
        while true {
            pthread_mutex_lock(lock)
            idle += 1
            while count == 0 { pthread_cond_wait(ready, lock) }
            idle -= 1
            let job = ring[head]!
            head = (head + 1) % capacity
            count -= 1
            pthread_mutex_unlock(lock)
            let waiter = job.pointee.waiter
            Self.perform(job)
            // The job lives on the caller's stack and `run`'s withoutActuallyEscaping checks
            // that nobody still holds the closure: every reference to it is gone by now.
            waiter.done()
        }
    }

    @inline(never)
    private static func perform(_ job: UnsafeMutablePointer<Job>) {
        job.pointee.body(job.pointee.index)
    }
}

/// One per thread that fans out: counts the helpers' jobs still running.
final class Waiter: @unchecked Sendable {
    private let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let finished = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var remaining = 0

    private init() {
        pthread_mutex_init(lock, nil)
        pthread_cond_init(finished, nil)
    }

    deinit {
        pthread_mutex_destroy(lock)
        pthread_cond_destroy(finished)
        lock.deallocate()
        finished.deallocate()
    }

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { Unmanaged<Waiter>.fromOpaque($0!).release() }
        return key
    }()

    /// The calling thread's waiter (made on first use, released when the thread exits).
    static var current: Waiter {
        if let existing = pthread_getspecific(key) {
            return Unmanaged<Waiter>.fromOpaque(existing).takeUnretainedValue()
        }
        let waiter = Waiter()
        pthread_setspecific(key, Unmanaged.passRetained(waiter).toOpaque())
        return waiter
    }

    func expect(_ count: Int) {
        pthread_mutex_lock(lock)
        remaining = count
        pthread_mutex_unlock(lock)
    }

    func done() {
        pthread_mutex_lock(lock)
        remaining -= 1
        if remaining == 0 { pthread_cond_signal(finished) }
        pthread_mutex_unlock(lock)
    }

    func wait() {
        pthread_mutex_lock(lock)
        while remaining > 0 { pthread_cond_wait(finished, lock) }
        pthread_mutex_unlock(lock)
    }
}
