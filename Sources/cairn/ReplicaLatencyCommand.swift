import ArgumentParser
import CairnCore
import CairnReplica
import Foundation

/// `cairn replica latency` (hidden): what replica stores cost per small write and per flush on
/// this machine's disk, without network, FUSE or engine (docs/engine.md, "Where the cycles
/// go"). Creates scratch replicas in --dir, runs --ops rounds of a 4 KiB write at a random block
/// followed by a flush (the database pattern: commit = write + fdatasync), then --ops writes
/// without a flush, and prints p50/p99 of each, in µs. Set CAIRN_REPLICA_JOURNAL=off to
/// measure the in-place path (data file + block map synced). Every block is written once
/// before the rounds (commits overwrite blocks a volume has).
///
/// `--stores N` runs N stores side by side in lockstep, each round writing the same block to
/// every store (the first from the calling thread, each other from a thread of its own) and
/// ending when the slowest is done: what the replicas of one volume ask of a disk they share
/// (bench/run's test bed puts every node on one disk).
/// `--durable` sends the commit's write as the engine does for a lone write (the store syncs
/// its journal record before answering; a flush follows only when a store could not). The
/// rounds per second are then the most write+fdatasync pairs per second N replicas of a volume
/// could give on this disk, whatever the rest of the path costs.
struct ReplicaLatencyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "latency",
        abstract: "Measure scratch replica stores' 4 KiB write and write+flush latency on this disk (benchmarks).",
        shouldDisplay: false)

    @Option(help: "A directory on the disk to measure (scratch replicas are made and removed there).")
    var dir: String

    @Option(help: "Rounds of each measurement.")
    var ops = 2000

    @Option(help: "The scratch volume's size in MiB.")
    var sizeMib: UInt64 = 256

    @Option(help: "Stores written side by side in lockstep, as the replicas of one volume on this disk (1–8).")
    var stores = 1

    @Flag(help: "Send each commit's write as a durable write (as the engine does for a lone write) instead of a write and a flush.")
    var durable = false

    func validate() throws {
        guard (1...8).contains(stores) else { throw ValidationError("--stores takes 1 to 8, not \(stores)") }
        guard ops > 0 else { throw ValidationError("--ops must be positive") }
        guard sizeMib >= 16 else { throw ValidationError("--size-mib must be at least 16") }
    }

    func run() throws {
        let base = dir + "/cairn-latency-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: base) }
        if stores > 1 { try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true) }
        var opened: [ReplicaStore] = []
        defer { for store in opened { try? store.close() } }
        for i in 0..<stores {
            opened.append(try ReplicaStore.create(directory: stores == 1 ? base : base + "/\(i)", volumeID: "latency",
                                                  size: sizeMib << 20))
        }
        // Every block written once first: commits overwrite blocks the volume has, and a first
        // write into a hole of the data file costs the filesystem an allocation as well.
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { chunk.deallocate() }
        for i in 0..<chunk.count { chunk[i] = UInt8(truncatingIfNeeded: i &* 131) }
        for store in opened {
            for mib in 0..<sizeMib {
                try store.write(offset: mib << 20, bytes: UnsafeRawBufferPointer(chunk), generation: 1, epoch: 0)
            }
            try store.flush(epoch: 0)
        }
        let runner = LockstepStores(stores: opened)
        defer { runner.stop() }
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { block.deallocate() }
        var rng = SystemRandomNumberGenerator()
        var state = UInt64.random(in: 1...UInt64.max, using: &rng)
        let blocks = (sizeMib << 20) / 4096
        var generation: UInt64 = 1
        func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
        let mode: LockstepStores.Mode = durable ? .durableWrite : .writeAndFlush
        func round(flush: Bool) throws -> Double {
            // New contents each round (xorshift, not the system generator: a system call per
            // word would leave the disk idle between rounds, which the commits of a busy
            // database do not).
            for word in 0..<(block.count / 8) {
                state ^= state << 13
                state ^= state >> 7
                state ^= state << 17
                block.storeBytes(of: state, toByteOffset: word * 8, as: UInt64.self)
            }
            generation += 1
            let offset = UInt64.random(in: 0..<blocks, using: &rng) * 4096
            let start = now()
            try runner.round(offset: offset, bytes: UnsafeRawBufferPointer(block), generation: generation,
                             mode: flush ? mode : .write)
            return Double(now() - start) / 1000
        }
        func summary(_ v: [Double]) -> String {
            let s = v.sorted()
            let mean = s.reduce(0, +) / Double(s.count)
            return String(format: "p50 %.0f µs, p99 %.0f µs, mean %.0f µs (%.0f per second)",
                          s[s.count / 2], s[min(s.count - 1, s.count * 99 / 100)], mean, 1_000_000 / mean)
        }
        for _ in 0..<50 { _ = try round(flush: true) }  // warm-up
        let synced = try (0..<ops).map { _ in try round(flush: true) }
        let unsynced = try (0..<ops).map { _ in try round(flush: false) }
        let journal = ProcessInfo.processInfo.environment["CAIRN_REPLICA_JOURNAL"] == "off" ? "off (in place)" : "on"
        let side = stores == 1 ? "1 store" : "\(stores) stores in lockstep"
        print("replica store on \(dir), \(side), journal \(journal), \(ops) rounds each")
        print("  4 KiB write + flush\(durable ? " (durable write)" : ""): \(summary(synced))")
        print("  4 KiB write alone:   \(summary(unsynced))")
        if durable { print("  writes the stores could not make durable as written: \(runner.notDurable)") }
    }
}

/// N replica stores written in lockstep: the calling thread writes the first store and one
/// thread of its own each of the others (so the stores' device waits overlap, as separate
/// replica processes' do) — the shape of the engine's `fromThisThread`, local replica on the
/// caller. A round returns when every store is done.
private final class LockstepStores: @unchecked Sendable {
    enum Mode { case write, writeAndFlush, durableWrite }

    private struct Job {
        var offset: UInt64
        var bytes: UnsafeRawBufferPointer
        var generation: UInt64
        var mode: Mode
    }

    private let stores: [ReplicaStore]
    private let lock = NSCondition()
    // Under `lock`: the round's job and number (a worker runs each number once), the workers
    // not done with it, the first error, whether to stop, the workers still running, the
    // writes not durable as written.
    private var job: Job?
    private var number = 0
    private var pending = 0
    private var failure: (any Error)?
    private var stopping = false
    private var running = 0
    private var missed = 0

    init(stores: [ReplicaStore]) {
        self.stores = stores
        running = stores.count - 1
        for (i, store) in stores.enumerated().dropFirst() {
            let thread = Thread { [self] in work(store) }
            thread.name = "cairn-latency-\(i)"
            thread.start()
        }
    }

    var notDurable: Int { lock.withLock { missed } }

    func round(offset: UInt64, bytes: UnsafeRawBufferPointer, generation: UInt64, mode: Mode) throws {
        let job = Job(offset: offset, bytes: bytes, generation: generation, mode: mode)
        lock.withLock {
            self.job = job
            number += 1
            pending = stores.count - 1
            failure = nil
            lock.broadcast()
        }
        var error: (any Error)?
        do { if try Self.run(job, on: stores[0]) { finished(true, nil, worker: false) } } catch let e { error = e }
        try lock.withLock {
            while pending > 0 { lock.wait() }
            if let failure = error ?? failure { throw failure }
        }
    }

    func stop() {
        lock.withLock {
            stopping = true
            lock.broadcast()
            while running > 0 { lock.wait() }
        }
    }

    /// Records one store's part of the round (`wasMissed`: not durable as written); a worker's
    /// (`worker`) also counts it done, in the same hold of the lock.
    private func finished(_ wasMissed: Bool, _ error: (any Error)?, worker: Bool) {
        lock.withLock {
            if wasMissed { missed += 1 }
            if let error, failure == nil { failure = error }
            if worker {
                pending -= 1
                if pending == 0 { lock.broadcast() }
            }
        }
    }

    private func work(_ store: ReplicaStore) {
        var done = 0
        while true {
            let job: Job? = lock.withLock {
                while !stopping && number == done { lock.wait() }
                if stopping {
                    running -= 1
                    lock.broadcast()
                    return nil
                }
                done = number
                return self.job
            }
            guard let job else { return }
            var wasMissed = false
            var error: (any Error)?
            do { wasMissed = try Self.run(job, on: store) } catch let e { error = e }
            finished(wasMissed, error, worker: true)
        }
    }

    /// Runs one store's part of a round; true when a durable write was not durable as written
    /// (a flush then followed, as the engine would send).
    private static func run(_ job: Job, on store: ReplicaStore) throws -> Bool {
        switch job.mode {
        case .write:
            try store.write(offset: job.offset, bytes: job.bytes, generation: job.generation, epoch: 0)
            return false
        case .writeAndFlush:
            try store.write(offset: job.offset, bytes: job.bytes, generation: job.generation, epoch: 0)
            try store.flush(epoch: 0)
            return false
        case .durableWrite:
            let isDurable = try store.write(offset: job.offset, bytes: job.bytes, generation: job.generation,
                                            epoch: 0, durable: true)
            if !isDurable { try store.flush(epoch: 0) }
            return !isDurable
        }
    }
}
