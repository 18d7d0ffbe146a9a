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
    /// Callers of `join` that arrived since the running round started (the next round's).
    private var waiting: [(Int32) -> Void] = []
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
            runRounds(round, through: needed)
        }
        // The round that finished last covers this caller (rounds run one at a time, in order).
        return result
    }

    /// A caller that need not wait: `answer(result)` runs once a round that started after this
    /// call has finished, on whichever thread ran that round. Returns at once when a round is
    /// running (its runner takes the caller into the next one); otherwise this thread runs
    /// rounds until nobody is left waiting, answering each caller after its round.
    ///
    /// The FUSE worker of a write that must be durable before its answer gives the write to the
    /// rounds and goes back to the kernel: the round's runner answers it, so a round's end
    /// costs no wake-up per write (with a dozen writes per round, each woke its own worker
    /// only to send the answer).
    func join(_ answer: @escaping (Int32) -> Void, round: () -> Int32) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        callers &+= 1
        waiting.append(answer)
        if !running { runRounds(round, through: 0) }
    }

    /// Runs rounds one after another (`mutex` held on entry and exit, released while a round
    /// runs) until round `needed` has finished and no `join` caller is left waiting. A round
    /// covers the `join` callers that arrived before it started and answers them after it.
    private func runRounds(_ round: () -> Int32, through needed: UInt64) {
        while finished < needed || !waiting.isEmpty {
            running = true
            started &+= 1
            let mine = started
            let covered = waiting
            waiting.removeAll(keepingCapacity: true)
            pthread_mutex_unlock(mutex)
            let r = round()
            for answer in covered { answer(r) }
            pthread_mutex_lock(mutex)
            running = false
            finished = mine
            result = r
            rounds &+= 1
            pthread_cond_broadcast(done)
        }
    }

    var counts: (rounds: UInt64, callers: UInt64) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return (rounds, callers)
    }
}
