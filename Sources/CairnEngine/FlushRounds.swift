import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Group commit for flushes the engine makes of its own (WriteThrough.swift): callers that
/// arrive while a flush round runs wait for the next round and share it, so a burst of writes
/// that each must be durable before its answer costs a few flush rounds, not one per write.
///
/// A caller is covered only by a round that *started* after it arrived: a round reads each
/// replica's unflushed count when it starts, and the caller's write moved that count before
/// the caller came here.
final class FlushRounds: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let done = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    // Under `mutex`.
    private var started: UInt64 = 0
    private var finished: UInt64 = 0
    private var running = false
    /// The result of the last finished round.
    private var result: Int32 = 0
    /// Rounds run, and callers served, so far (for tests and the engine's state).
    private(set) var rounds: UInt64 = 0
    private(set) var callers: UInt64 = 0

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(done, nil)
    }

    deinit {
        pthread_cond_destroy(done)
        pthread_mutex_destroy(mutex)
        done.deallocate()
        mutex.deallocate()
    }

    /// Runs `round` (a flush of the replicas; 0 or -errno) as a round that started after this
    /// call, or waits for one another caller runs. Returns that round's result.
    func flush(_ round: () -> Int32) -> Int32 {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        callers &+= 1
        // The first round to start from now on (the one running, if any, started before).
        let needed = started &+ 1
        while finished < needed {
            if running {
                pthread_cond_wait(done, mutex)
                continue
            }
            running = true
            started &+= 1
            let mine = started
            pthread_mutex_unlock(mutex)
            let r = round()
            pthread_mutex_lock(mutex)
            running = false
            finished = mine
            result = r
            rounds &+= 1
            pthread_cond_broadcast(done)
        }
        // The round that finished last covers this caller (rounds run one at a time, in order).
        return result
    }

    var counts: (rounds: UInt64, callers: UInt64) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return (rounds, callers)
    }
}
