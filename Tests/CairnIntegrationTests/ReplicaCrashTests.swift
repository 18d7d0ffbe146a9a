import CairnCore
import CairnReplica
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Issue 16, part 2: a replica survives the death of the process holding it at any moment.
//
// Each round drives a real `cairn replica serve` (the node's ReplicaServer and ReplicaStore)
// through ReplicaClient as an engine does — several writer threads (mixed sizes, numbered
// generations, some trims) and flushes at random moments — then SIGKILLs it at a random
// moment (sometimes just after a flush was sent), and reads the replica back twice: opened in
// this process (on a copy of the directory, so recovery runs on exactly what the kill left),
// and through a restarted process. Every block must read without a checksum error, `verify`
// must find nothing, and each block must hold the version of the newest operation on it that
// was acknowledged before a completed flush was *sent*, or of a later operation on it
// (acknowledged or not) — never an older one, never garbage. The replica's flushed generation
// F must be honest: no block may hold a version older than the newest operation at or below F.
//
// Writers never have two operations on the same block in flight at once (as a filesystem on
// the volume would not): so per block, generation order is the order of the operations, and
// "newer" is well defined. Rounds share one replica: each round's starting state is what the
// previous round's check found, and the restarted process serves the next round.
//
// CAIRN_CRASH_ROUNDS sets the number of rounds (default 10); CAIRN_CRASH_SEED replays a
// round plan (kill delays, op mix; thread timing is the machine's); CAIRN_CRASH_KEEP_GOING=1
// goes on after a failing round (on a new replica) and fails at the end, to count failures;
// CAIRN_CRASH_FLUSH_THROUGH=0 sends flushes without the generation they cover, as an engine of
// protocol 2 does (by default they carry the engine's watermark; no expectation depends on it).

final class ReplicaCrashTests: XCTestCase {
    static let volumeID = "crash-vol"
    static let volumeSize: UInt64 = 64 << 20
    static let blockCount = Int(volumeSize) / ReplicaStore.blockSize
    static let writerThreads = 4

    private var server: ReplicaServerProcess?

    override func tearDown() {
        let failed = (testRun?.totalFailureCount ?? 0) > 0
        if let server {
            for problem in server.tearDown(testFailed: failed) { XCTFail("cleanup of \(server.root): \(problem)") }
        }
        server = nil
        super.tearDown()
    }

    func testFlushedWritesSurviveSIGKILLOfTheReplicaProcess() throws {
        let environment = ProcessInfo.processInfo.environment
        let rounds = environment["CAIRN_CRASH_ROUNDS"].flatMap { Int($0) } ?? 10
        let seed = environment["CAIRN_CRASH_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...UInt64(UInt32.max))
        let keepGoing = environment["CAIRN_CRASH_KEEP_GOING"] == "1"
        let sendsThrough = environment["CAIRN_CRASH_FLUSH_THROUGH"] != "0"
        print("ReplicaCrashTests: \(rounds) rounds, CAIRN_CRASH_SEED=\(seed)\(keepGoing ? ", going on after a failing round" : "")\(sendsThrough ? "" : ", flushes without a generation (protocol 2)")")
        let server = try ReplicaServerProcess()
        self.server = server
        let directory = server.replicasDir + "/" + Self.volumeID
        try ReplicaStore.create(directory: directory, volumeID: Self.volumeID, size: Self.volumeSize).close()

        var volume = VolumeModel(blocks: Self.blockCount)
        var random = SplitMix64(seed: seed)
        var failedRounds: [String] = []
        var port = try server.start()
        for round in 1...rounds {
            let plan = KillPlan(round: round, random: &random)
            let epoch = UInt64(round)
            let record = try drive(server: server, port: port, epoch: epoch, plan: plan,
                                   firstGeneration: volume.nextGeneration, seed: random.next(), sendsThrough: sendsThrough)
            volume.nextGeneration = record.nextGeneration

            let copy = directory + ".copy"
            try Self.run(["/bin/cp", "-a", "--sparse=always", directory, copy])
            let inProcess: ReplicaView
            do {
                defer { try? FileManager.default.removeItem(atPath: copy) }
                inProcess = try ReplicaView.inProcess(directory: copy, volumeID: Self.volumeID, epoch: epoch)
            }
            port = try server.start()
            let client = try ReplicaClient.connect(host: "127.0.0.1", port: port, requestTimeout: .seconds(60))
            let served: ReplicaView
            do {
                defer { client.close() }
                served = try ReplicaView.served(client, volumeID: Self.volumeID, epoch: epoch)
            }

            let check = CrashCheck(round: round, epoch: epoch, plan: plan, volume: volume, record: record,
                                   volumeSize: Self.volumeSize)
            let outcome = check.run(views: [inProcess, served])
            print(outcome.figures)
            if outcome.failures.isEmpty {
                volume.advance(to: outcome.found, flushedGeneration: served.status.flushedGeneration)
                continue
            }
            let shown = outcome.failures.prefix(40).joined(separator: "\n  ")
            let more = outcome.failures.count > 40 ? "\n  … and \(outcome.failures.count - 40) more" : ""
            let report = "round \(round) (CAIRN_CRASH_SEED=\(seed)): \(outcome.failures.count) problem(s) after the kill (\(outcome.kinds.joined(separator: ", "))):\n  \(shown)\(more)"
            guard keepGoing else {
                XCTFail(report)
                return
            }
            print(report)
            failedRounds.append("round \(round): \(outcome.kinds.joined(separator: ", ")); the first: \(outcome.failures[0])")
            // Start over on a new replica: the damaged one would fail every later round.
            server.stop()
            try FileManager.default.removeItem(atPath: directory)
            try ReplicaStore.create(directory: directory, volumeID: Self.volumeID, size: Self.volumeSize).close()
            volume = VolumeModel(blocks: Self.blockCount, nextGeneration: volume.nextGeneration)
            port = try server.start()
        }
        if !failedRounds.isEmpty {
            XCTFail("\(failedRounds.count) of \(rounds) rounds failed (CAIRN_CRASH_SEED=\(seed)):\n  " + failedRounds.joined(separator: "\n  "))
            return
        }
        // An orderly stop closes the replica cleanly: it opens again without recovery.
        let exit = server.stop()
        XCTAssertEqual(exit?.status, 0, "cairn replica serve did not exit cleanly on SIGTERM (killed: \(exit?.killed ?? false))")
        let reopened = try ReplicaStore.open(directory: directory, volumeID: Self.volumeID)
        XCTAssert(reopened.recovery.unflushedBlocks.isEmpty && reopened.recovery.rewrittenBlocks.isEmpty,
                  "a replica closed by SIGTERM was recovered as after a crash: \(reopened.recovery)")
        try reopened.close()
    }

    /// One round's I/O: claims `epoch`, starts the writers and the flusher, kills the process
    /// as `plan` says, waits for every thread. Returns what was sent and acknowledged.
    private func drive(server: ReplicaServerProcess, port: UInt16, epoch: UInt64, plan: KillPlan,
                       firstGeneration: UInt64, seed: UInt64, sendsThrough: Bool) throws -> CrashRecord {
        let client = try ReplicaClient.connect(host: "127.0.0.1", port: port, requestTimeout: .seconds(30))
        defer { client.close() }
        let claimed = try client.claim(volumeID: Self.volumeID, epoch: epoch)
        XCTAssertEqual(claimed.epoch, epoch, "the claim of epoch \(epoch) answered with epoch \(claimed.epoch)")
        let ledger = CrashLedger(blocks: Self.blockCount, firstGeneration: firstGeneration)
        let workload = CrashWorkload(client: client, ledger: ledger, volumeID: Self.volumeID, epoch: epoch,
                                     blocks: Self.blockCount, sendsThrough: sendsThrough)
        let threads = DispatchGroup()
        let started = ContinuousClock.now
        for i in 0..<Self.writerThreads {
            threads.enter()
            Thread.detachNewThread {
                defer { threads.leave() }
                workload.writer(seed: seed &+ UInt64(i) &* 0x9E37_79B9)
            }
        }
        threads.enter()
        Thread.detachNewThread {
            defer { threads.leave() }
            workload.flusher(seed: seed ^ 0xF1F1)
        }

        // The kill: after the delay (or at once when a thread met an unexpected error).
        _ = ledger.stopped.wait(timeout: .now() + .milliseconds(plan.delayMilliseconds))
        if plan.duringFlush {
            ledger.armKillAtNextFlush()
            _ = ledger.flushSent.wait(timeout: .now() + .milliseconds(500))
            usleep(plan.flushDelayMicroseconds)
        }
        ledger.markKill(afterMilliseconds: Self.milliseconds(ContinuousClock.now - started))
        guard server.crash() else { throw FixtureError("cairn replica serve did not die of SIGKILL within 10 s") }
        guard threads.wait(timeout: .now() + 60) == .success else {
            throw FixtureError("the I/O threads still ran 60 s after the kill")
        }
        return ledger.record()
    }

    static func milliseconds(_ d: Duration) -> Int {
        Int(d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000)
    }

    /// Runs a tool and waits; throws unless it exits 0.
    static func run(_ argv: [String]) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: argv[0])
        process.arguments = Array(argv.dropFirst())
        try process.run()
        process.waitUntilExit()
        guard process.terminationReason == .exit, process.terminationStatus == 0 else {
            throw FixtureError("\(argv.joined(separator: " ")) failed (status \(process.terminationStatus))")
        }
    }
}

// MARK: - The round's plan

/// When a round kills the process.
struct KillPlan: CustomStringConvertible {
    /// Into the I/O.
    var delayMilliseconds: Int
    /// Then wait for the next flush to be sent and kill `flushDelayMicroseconds` later.
    var duringFlush: Bool
    var flushDelayMicroseconds: UInt32

    init(round: Int, random: inout SplitMix64) {
        delayMilliseconds = Int.random(in: 50...1500, using: &random)
        duringFlush = round % 3 == 0
        flushDelayMicroseconds = UInt32.random(in: 0...3000, using: &random)
    }

    var description: String {
        "after \(delayMilliseconds) ms" + (duringFlush ? ", then \(flushDelayMicroseconds) µs after sending a flush" : "")
    }
}

/// A seeded generator: a round's op mix and delays follow from CAIRN_CRASH_SEED.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

// MARK: - Block contents

/// Every block a write puts down is a function of (block, generation): its first word is the
/// generation, its second a tag and the block number, the rest derived from both. So a block
/// read back says which write put it there, and a torn or misplaced block is garbage.
enum BlockPattern {
    static let words = ReplicaStore.blockSize / 8
    static let tag: UInt64 = 0x4341_524E_0000_0000  // "CARN" in the high half
    static let blockMask: UInt64 = 0xFFFF_FFFF

    static func mix(block: UInt64, generation: UInt64) -> UInt64 {
        (block &* 0x9E37_79B9_7F4A_7C15) ^ (generation &* 0xBF58_476D_1CE4_E5B9)
    }

    /// Fills `count` blocks from `buffer`'s start with the contents of blocks `first…` at `generation`.
    static func fill(_ buffer: UnsafeMutableRawBufferPointer, first: UInt64, count: Int, generation: UInt64) {
        let out = buffer.bindMemory(to: UInt64.self)
        for b in 0..<count {
            let block = first + UInt64(b)
            let base = b * words
            let m = mix(block: block, generation: generation)
            out[base] = generation.littleEndian
            out[base + 1] = (tag | block).littleEndian
            for i in 2..<words { out[base + i] = (m &+ UInt64(i) &* 0x94D0_49BB_1331_11EB).littleEndian }
        }
    }

    /// What one 4 KiB block read back holds.
    static func identify(_ bytes: UnsafeRawBufferPointer) -> BlockContent {
        func word(_ i: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        let generation = word(0), header = word(1)
        if generation == 0 && header == 0 {
            for i in 2..<words where word(i) != 0 {
                return .garbage("zeros but word \(i) is 0x\(String(word(i), radix: 16))")
            }
            return .zeros
        }
        guard header & ~blockMask == tag else {
            return .garbage("no header: first words 0x\(String(generation, radix: 16)) 0x\(String(header, radix: 16))")
        }
        let block = header & blockMask
        let m = mix(block: block, generation: generation)
        for i in 2..<words where word(i) != m &+ UInt64(i) &* 0x94D0_49BB_1331_11EB {
            return .garbage("header says block \(block) generation \(generation), but word \(i) differs (torn or mixed)")
        }
        return .written(block: block, generation: generation)
    }
}

enum BlockContent: Equatable, CustomStringConvertible {
    case zeros
    case written(block: UInt64, generation: UInt64)
    case garbage(String)
    /// The read failed with a checksum mismatch; what the head layer's data file holds there
    /// (read around the store, for the report), when known.
    case checksumMismatch(onDisk: String?)

    var isChecksumMismatch: Bool {
        if case .checksumMismatch = self { return true }
        return false
    }

    var description: String {
        switch self {
        case .zeros: "zeros"
        case let .written(block, generation): "the data of block \(block) at generation \(generation)"
        case let .garbage(why): "garbage (\(why))"
        case let .checksumMismatch(onDisk): "a checksum mismatch (unreadable)" + (onDisk.map { "; the data file holds \($0) there" } ?? "")
        }
    }
}

// MARK: - The I/O and its record

/// What the test sent and what was acknowledged, with a logical clock: one tick per issue,
/// acknowledgement and flush send/reply. Thread-safe.
final class CrashLedger: @unchecked Sendable {
    private let lock = NSLock()
    private var clock: UInt64 = 0
    private var ops: [CrashRecord.Op] = []
    private var flushes: [CrashRecord.Flush] = []
    /// Blocks with an operation in flight (or one whose outcome is unknown: the kill).
    private var busy: [Bool]
    private var nextGeneration: UInt64
    private let firstGeneration: UInt64
    private var highestAcknowledged: UInt64 = 0
    private var acknowledged = 0
    /// Ops before this index are all acknowledged.
    private var finishedPrefix = 0
    private var killedAt: UInt64?
    private var killMilliseconds = 0
    private var unexpected: [String] = []
    private var isStopped = false
    private var killArmed = false
    private var flushAtKill: Int?
    /// Signalled when a thread stops on an unexpected error (the kill comes at once).
    let stopped = DispatchSemaphore(value: 0)
    /// Signalled when the flush the kill waits for is about to be sent.
    let flushSent = DispatchSemaphore(value: 0)

    init(blocks: Int, firstGeneration: UInt64) {
        busy = [Bool](repeating: false, count: blocks)
        nextGeneration = firstGeneration
        self.firstGeneration = firstGeneration
    }

    var shouldStop: Bool { lock.withLock { isStopped } }

    /// Numbers an operation on blocks `first ..< first+count` unless one on any of them is in
    /// flight; nil then (or once stopped).
    func issue(first: Int, count: Int, isTrim: Bool) -> (index: Int, generation: UInt64)? {
        lock.withLock {
            guard !isStopped, !busy[first..<(first + count)].contains(true) else { return nil }
            for b in first..<(first + count) { busy[b] = true }
            let generation = nextGeneration
            nextGeneration += 1
            clock += 1
            ops.append(.init(generation: generation, firstBlock: first, blockCount: count, isTrim: isTrim, issuedAt: clock))
            return (ops.count - 1, generation)
        }
    }

    /// `durable`: the replica answered that the write is durable (a durable write).
    func acknowledge(_ index: Int, durable: Bool = false) {
        lock.withLock {
            clock += 1
            ops[index].acknowledgedAt = clock
            ops[index].durable = durable
            for b in ops[index].firstBlock..<(ops[index].firstBlock + ops[index].blockCount) { busy[b] = false }
            highestAcknowledged = max(highestAcknowledged, ops[index].generation)
            acknowledged += 1
        }
    }

    /// The operation's outcome is unknown; its blocks stay busy (nothing may overtake it).
    func fail(_ index: Int, _ error: any Error) {
        let op = lock.withLock { ops[index] }
        stop("\(op.isTrim ? "trim" : "write") generation \(op.generation) of blocks \(op.firstBlock)+\(op.blockCount) failed: \(error)")
    }

    /// Records a flush about to be sent; returns its index and the generation it may vouch
    /// for, as the engine's `flushWatermark`: every op at or below it has been acknowledged.
    func flushSending() -> (index: Int, through: UInt64) {
        lock.withLock {
            clock += 1
            while finishedPrefix < ops.count && ops[finishedPrefix].acknowledgedAt != nil { finishedPrefix += 1 }
            let through = finishedPrefix < ops.count ? ops[finishedPrefix].generation - 1 : nextGeneration - 1
            flushes.append(.init(sentAt: clock, highestAcknowledgedGeneration: highestAcknowledged,
                                 acknowledgedOps: acknowledged, through: through))
            if killArmed {
                killArmed = false
                flushAtKill = flushes.count - 1
                flushSent.signal()
            }
            return (flushes.count - 1, through)
        }
    }

    func flushed(_ index: Int, reportedGeneration: UInt64) {
        lock.withLock {
            clock += 1
            flushes[index].completedAt = clock
            flushes[index].reportedGeneration = reportedGeneration
        }
    }

    func flushFailed(_ index: Int, _ error: any Error) {
        stop("flush #\(index + 1) failed: \(error)")
    }

    private func stop(_ what: String) {
        let first = lock.withLock { () -> Bool in
            if killedAt == nil { unexpected.append(what) }
            defer { isStopped = true }
            return !isStopped
        }
        if first { stopped.signal() }
    }

    func armKillAtNextFlush() { lock.withLock { killArmed = !isStopped } }

    /// Everything from here on fails because of the kill.
    func markKill(afterMilliseconds ms: Int) {
        lock.withLock {
            killedAt = clock
            killMilliseconds = ms
            isStopped = true
            killArmed = false
        }
    }

    func record() -> CrashRecord {
        lock.withLock {
            CrashRecord(ops: ops, flushes: flushes, firstGeneration: firstGeneration, nextGeneration: nextGeneration,
                        killedAt: killedAt ?? clock, killMilliseconds: killMilliseconds, unexpectedErrors: unexpected,
                        flushAtKill: flushAtKill)
        }
    }
}

struct CrashRecord {
    struct Op {
        var generation: UInt64
        var firstBlock: Int
        var blockCount: Int
        var isTrim: Bool
        var issuedAt: UInt64
        var acknowledgedAt: UInt64?
        /// Acknowledged as durable (a durable write): it must survive without a flush.
        var durable = false
    }

    struct Flush {
        var sentAt: UInt64
        /// The highest generation acknowledged before it was sent, and how many ops were.
        var highestAcknowledgedGeneration: UInt64
        var acknowledgedOps: Int
        /// What it said it covers (`FlushRequest.through`, when sent): every op at or below was acknowledged.
        var through: UInt64
        var completedAt: UInt64?
        var reportedGeneration: UInt64?
    }

    /// In issue order, which is generation order.
    var ops: [Op]
    var flushes: [Flush]
    var firstGeneration: UInt64
    var nextGeneration: UInt64
    var killedAt: UInt64
    var killMilliseconds: Int
    var unexpectedErrors: [String]
    /// The flush the kill waited for.
    var flushAtKill: Int?

    /// The completed flush sent last: every op acknowledged before it was sent must survive.
    var lastCompletedFlush: Int? {
        flushes.indices.filter { flushes[$0].completedAt != nil }.max { flushes[$0].sentAt < flushes[$1].sentAt }
    }
}

/// The threads of one round: writers (and their occasional flushes) and a flusher, on one
/// shared client, as an engine's FUSE threads share one connection per replica.
struct CrashWorkload: Sendable {
    let client: ReplicaClient
    let ledger: CrashLedger
    let volumeID: String
    let epoch: UInt64
    let blocks: Int
    /// Whether flushes say which generation they cover (as the engine does since protocol 3)
    /// or not (an engine of an older release).
    let sendsThrough: Bool
    /// Half the ops land in the first 4 MiB, so blocks are overwritten often.
    static let hotBlocks = 1024

    func writer(seed: UInt64) {
        var random = SplitMix64(seed: seed)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * ReplicaStore.blockSize,
                                                           alignment: ReplicaStore.blockSize)
        defer { buffer.deallocate() }
        while !ledger.shouldStop {
            let r = Double.random(in: 0..<1, using: &random)
            let isTrim = r >= 0.95
            let count = r < 0.70 ? 1 : r < 0.80 ? Int.random(in: 2...15, using: &random)
                : r < 0.95 ? Int.random(in: 16...256, using: &random) : Int.random(in: 1...64, using: &random)
            let range = Bool.random(using: &random) || count > Self.hotBlocks ? blocks : Self.hotBlocks
            let first = Int.random(in: 0...(range - count), using: &random)
            guard let (index, generation) = ledger.issue(first: first, count: count, isTrim: isTrim) else {
                usleep(100)
                continue
            }
            let offset = UInt64(first * ReplicaStore.blockSize)
            let length = count * ReplicaStore.blockSize
            // A quarter of the small writes are durable writes (an engine's commits): each
            // one acknowledged as durable must survive the kill with no flush after it.
            let asksDurable = !isTrim && count <= 64 && Int.random(in: 0..<4, using: &random) == 0
            do {
                var durable = false
                if isTrim {
                    try client.trim(volumeID: volumeID, offset: offset, length: UInt64(length), generation: generation, epoch: epoch)
                } else {
                    BlockPattern.fill(buffer, first: UInt64(first), count: count, generation: generation)
                    durable = try client.write(volumeID: volumeID, offset: offset,
                                               data: UnsafeRawBufferPointer(rebasing: buffer[0..<length]),
                                               generation: generation, epoch: epoch, durable: asksDurable)
                }
                ledger.acknowledge(index, durable: durable)
            } catch {
                ledger.fail(index, error)
                return
            }
            if Int.random(in: 0..<50, using: &random) == 0 && !flush() { return }
        }
    }

    func flusher(seed: UInt64) {
        var random = SplitMix64(seed: seed)
        while !ledger.shouldStop {
            usleep(UInt32.random(in: 1_000...30_000, using: &random))
            if ledger.shouldStop || !flush() { return }
        }
    }

    private func flush() -> Bool {
        let (index, through) = ledger.flushSending()
        do {
            let generation = try client.flush(volumeID: volumeID, epoch: epoch, through: sendsThrough ? through : nil)
            ledger.flushed(index, reportedGeneration: generation)
            return true
        } catch {
            ledger.flushFailed(index, error)
            return false
        }
    }
}

// MARK: - Reading the replica back

/// Everything read back from the replica after a kill, one way or the other.
struct ReplicaView {
    var name: String
    var status: ReplicaStatus
    var contents: [BlockContent]
    /// The `generations` op's values (bit 63: trimmed).
    var reported: [UInt64]
    /// What `verify` found failing its checksum.
    var failingVerify: [UInt64]
    /// What the in-process open recovered (nil through the server).
    var recovery: RecoveryReport?

    static let chunkBlocks = 1024

    /// Opens the replica in this process (recovery runs), reads it whole, closes it.
    static func inProcess(directory: String, volumeID: String, epoch: UInt64) throws -> ReplicaView {
        let store = try ReplicaStore.open(directory: directory, volumeID: volumeID)
        defer { try? store.close() }
        let status = store.status
        let blocks = Int(status.size) / ReplicaStore.blockSize
        var view = try read(name: "opened in-process", status: status, recovery: store.recovery, blocks: blocks,
                        generations: { try store.generations(firstBlock: $0, count: $1, epoch: epoch) },
                        verify: { try store.verify(firstBlock: $0, count: $1, epoch: epoch) },
                        read: { try store.read(offset: $0 * UInt64(ReplicaStore.blockSize), length: $1 * ReplicaStore.blockSize, epoch: epoch) },
                        isChecksumMismatch: {
                            if case ReplicaError.checksumMismatch = $0 { return true }
                            return false
                        })
        for b in view.contents.indices where view.contents[b] == .checksumMismatch(onDisk: nil) {
            view.contents[b] = .checksumMismatch(onDisk: rawHeadBlock(directory: directory, block: b)?.description)
        }
        return view
    }

    /// Block `b` as the head layer's data file holds it, read around the store (the layout of
    /// docs/replica-format.md: the highest-numbered `layers/` entry, block i at i*4096); nil if
    /// that layout is not there.
    static func rawHeadBlock(directory: String, block b: Int) -> BlockContent? {
        guard let head = (try? FileManager.default.contentsOfDirectory(atPath: directory + "/layers"))?.max() else { return nil }
        let fd = open(directory + "/layers/" + head + "/data", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: ReplicaStore.blockSize)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, $0.count, off_t(b * ReplicaStore.blockSize)) }
        guard n == ReplicaStore.blockSize else { return nil }
        return bytes.withUnsafeBytes { BlockPattern.identify($0) }
    }

    /// Reads the replica whole through a restarted `cairn replica serve`.
    static func served(_ client: ReplicaClient, volumeID: String, epoch: UInt64) throws -> ReplicaView {
        let status = try client.status(volumeID: volumeID, epoch: epoch)
        let blocks = Int(status.size) / ReplicaStore.blockSize
        return try read(name: "served by the restarted process", status: status, recovery: nil, blocks: blocks,
                        generations: { try client.generations(volumeID: volumeID, firstBlock: $0, count: $1, epoch: epoch) },
                        verify: { try client.verify(volumeID: volumeID, firstBlock: $0, count: $1, epoch: epoch) },
                        read: { try client.read(volumeID: volumeID, offset: $0 * UInt64(ReplicaStore.blockSize),
                                                length: $1 * ReplicaStore.blockSize, epoch: epoch) },
                        isChecksumMismatch: { ($0 as? ReplicaClientError)?.replyStatus == .checksumMismatch })
    }

    private static func read(name: String, status: ReplicaStatus, recovery: RecoveryReport?, blocks: Int,
                             generations: (UInt64, Int) throws -> [UInt64], verify: (UInt64, Int) throws -> [UInt64],
                             read: (UInt64, Int) throws -> [UInt8], isChecksumMismatch: (any Error) -> Bool) throws -> ReplicaView {
        var view = ReplicaView(name: name, status: status, contents: [], reported: [], failingVerify: [], recovery: recovery)
        view.contents.reserveCapacity(blocks)
        var first = 0
        while first < blocks {
            let count = min(chunkBlocks, blocks - first)
            view.reported += try generations(UInt64(first), count)
            view.failingVerify += try verify(UInt64(first), count)
            do {
                try identify(read(UInt64(first), count), into: &view.contents)
            } catch where isChecksumMismatch(error) {
                // Block by block, to name every unreadable one.
                for b in first..<(first + count) {
                    do {
                        try identify(read(UInt64(b), 1), into: &view.contents)
                    } catch where isChecksumMismatch(error) {
                        view.contents.append(.checksumMismatch(onDisk: nil))
                    }
                }
            }
            first += count
        }
        return view
    }

    private static func identify(_ bytes: [UInt8], into contents: inout [BlockContent]) {
        bytes.withUnsafeBytes { raw in
            for b in 0..<(raw.count / ReplicaStore.blockSize) {
                contents.append(BlockPattern.identify(UnsafeRawBufferPointer(
                    rebasing: raw[(b * ReplicaStore.blockSize)..<((b + 1) * ReplicaStore.blockSize)])))
            }
        }
    }
}

// MARK: - The check

/// What each block held at a round's start: what the previous round's check found there.
struct VolumeModel {
    struct Start: Equatable {
        /// The version's generation: 0 for never written.
        var generation: UInt64 = 0
        var isZeros = true
        /// What `generations` reported (it may name another version than the data's after recovery).
        var reported: UInt64 = 0
    }

    var blocks: [Start]
    var nextGeneration: UInt64 = 1
    var flushedGeneration: UInt64 = 0

    init(blocks: Int, nextGeneration: UInt64 = 1) {
        self.blocks = [Start](repeating: Start(), count: blocks)
        self.nextGeneration = nextGeneration
    }

    mutating func advance(to found: [Start], flushedGeneration: UInt64) {
        blocks = found
        self.flushedGeneration = flushedGeneration
    }
}

struct CrashCheck {
    let round: Int
    let epoch: UInt64
    let plan: KillPlan
    let volume: VolumeModel
    let record: CrashRecord
    let volumeSize: UInt64

    struct Outcome {
        var failures: [String] = []
        /// Each kind of failure and how many.
        var kinds: [String] = []
        var figures = ""
        /// Each block's version as found (the next round's start).
        var found: [VolumeModel.Start] = []
    }

    /// One version a block may hold: its start, or an op of this round on it.
    private struct Version {
        var generation: UInt64
        var isZeros: Bool
        var reported: UInt64
        var what: String
    }

    func run(views: [ReplicaView]) -> Outcome {
        var outcome = Outcome()
        var failures: [(kind: String, text: String)] = []
        for error in record.unexpectedErrors { failures.append(("error before the kill", "before the kill: \(error)")) }
        let lastFlush = record.lastCompletedFlush
        let durableBefore = lastFlush.map { record.flushes[$0].sentAt } ?? 0
        let highestIssued = record.nextGeneration - 1

        // Per block, this round's ops on it in generation order.
        var touching = [[Int]](repeating: [], count: volume.blocks.count)
        for (i, op) in record.ops.enumerated() {
            for b in op.firstBlock..<(op.firstBlock + op.blockCount) { touching[b].append(i) }
        }

        for view in views {
            let s = view.status
            let F = s.flushedGeneration
            func fail(_ kind: String, _ text: String) { failures.append((kind, "[\(view.name)] \(text)")) }
            if s.size != volumeSize { fail("status", "status: size \(s.size), expected \(volumeSize)") }
            if s.epoch != epoch { fail("status", "status: epoch \(s.epoch), but epoch \(epoch) was claimed (and acknowledged) before the I/O") }
            if F > highestIssued { fail("status", "status: flushed generation \(F) is above every generation ever sent (\(highestIssued))") }
            if s.highestGeneration > highestIssued {
                fail("status", "status: highest generation \(s.highestGeneration) is above every generation ever sent (\(highestIssued))")
            }
            if F < volume.flushedGeneration {
                fail("status", "status: flushed generation \(F) is below the previous round's \(volume.flushedGeneration): it went back")
            }
            if !view.failingVerify.isEmpty {
                fail("verify", "verify reports \(view.failingVerify.count) block(s) failing their checksum: \(view.failingVerify.prefix(20).map(String.init).joined(separator: ", "))")
            }
            if view.contents.count != volume.blocks.count || view.reported.count != volume.blocks.count {
                fail("read", "read \(view.contents.count) blocks and \(view.reported.count) generations of \(volume.blocks.count)")
                continue
            }
            var found: [VolumeModel.Start] = []
            found.reserveCapacity(volume.blocks.count)
            for b in 0..<volume.blocks.count {
                let start = volume.blocks[b]
                var versions = [Version(generation: start.generation, isZeros: start.isZeros, reported: start.reported,
                                        what: start.generation == 0 ? "never written" : "the round's starting version (generation \(start.generation))")]
                var durable = 0  // index in versions of the newest op that must have survived
                for i in touching[b] {
                    let op = record.ops[i]
                    let state = op.acknowledgedAt.map { $0 < durableBefore ? "acknowledged before flush #\(lastFlush! + 1) was sent, which completed"
                        : op.durable ? "acknowledged as durable, not flushed"
                        : $0 <= record.killedAt ? "acknowledged, not flushed" : "acknowledged as the kill came" }
                        ?? "in flight at the kill"
                    if let acked = op.acknowledgedAt, acked < durableBefore || op.durable { durable = versions.count }
                    versions.append(Version(generation: op.generation, isZeros: op.isTrim,
                                            reported: op.generation | (op.isTrim ? BlockGenerations.trimmedBit : 0),
                                            what: "\(op.isTrim ? "trim" : "write") generation \(op.generation) (\(state))"))
                }
                let content = view.contents[b]
                let holds: [Int] = versions.indices.filter { v in
                    switch content {
                    case .zeros: versions[v].isZeros
                    case let .written(block, generation): block == UInt64(b) && !versions[v].isZeros && versions[v].generation == generation
                    case .garbage, .checksumMismatch: false
                    }
                }
                let allowed = versions[durable...]
                let reported = view.reported[b]
                let where_ = "block \(b) (offset \(b * ReplicaStore.blockSize))"
                let later = allowed.dropFirst().prefix(6).map(\.what) + (allowed.count > 7 ? ["…"] : [])
                let expected = "expected \(versions[durable].what)\(later.isEmpty ? "" : " or a later one: " + later.joined(separator: "; "))"
                let entry = "its block-map entry says \(Self.show(reported))"
                    + (versions.first { $0.reported == reported }.map { " (\($0.what))" } ?? "")
                guard let newest = holds.last(where: { $0 >= durable }) else {
                    switch content {
                    case .checksumMismatch, .garbage:
                        fail(content.isChecksumMismatch ? "checksum mismatch on read" : "garbage", "\(where_): reads \(content); \(entry); \(expected)")
                    case .zeros, .written:
                        if let older = holds.last {
                            fail("flushed write lost", "\(where_): holds \(content) — \(versions[older].what), OLDER than \(versions[durable].what): a flushed write was lost; \(entry); \(expected)")
                        } else {
                            fail("unknown version", "\(where_): holds \(content), which no operation on it wrote; \(entry); \(expected)")
                        }
                    }
                    found.append(start)
                    continue
                }
                // The flushed generation's claim: every op at or below it is durable.
                if let claimed = versions.lastIndex(where: { $0.generation <= F }), claimed > newest {
                    fail("flushed generation claims a missing write", "\(where_): the replica reports flushed generation \(F), but holds \(versions[newest].what), older than \(versions[claimed].what) ≤ \(F): the flushed generation claims a write that is not there")
                }
                if !allowed.contains(where: { $0.reported == reported }) {
                    fail("reported generation", "\(where_): generations reports \(Self.show(reported)), none of the versions it may hold (\(allowed.map { Self.show($0.reported) }.joined(separator: ", "))); it holds \(content)")
                }
                found.append(.init(generation: versions[newest].generation, isZeros: versions[newest].isZeros, reported: reported))
            }
            if outcome.found.isEmpty {
                outcome.found = found
            } else if outcome.found != found {
                let b = found.indices.first { outcome.found[$0] != found[$0] } ?? 0
                fail("views differ", "differs from the other view at block \(b): \(found[b]) vs \(outcome.found[b])")
            }
        }
        if views.count == 2 && views[0].status.flushedGeneration != views[1].status.flushedGeneration {
            failures.append(("views differ", "the views report different flushed generations: \(views.map { "\($0.name): \($0.status.flushedGeneration)" })"))
        }
        // Every kind shows up front (a few of each), then the rest.
        var kinds: [String] = []
        for f in failures where !kinds.contains(f.kind) { kinds.append(f.kind) }
        outcome.kinds = kinds.map { kind in "\(kind) ×\(failures.filter { $0.kind == kind }.count)" }
        let firsts = kinds.flatMap { kind in failures.filter { $0.kind == kind }.prefix(4).map(\.text) }
        outcome.failures = firsts + failures.map(\.text).filter { !firsts.contains($0) }
        outcome.figures = figures(views: views, lastFlush: lastFlush, touching: touching, found: outcome.found)
        return outcome
    }

    static func show(_ reported: UInt64) -> String {
        reported & BlockGenerations.trimmedBit != 0 ? "trim \(reported & ~BlockGenerations.trimmedBit)" : "\(reported)"
    }

    private func figures(views: [ReplicaView], lastFlush: Int?, touching: [[Int]], found: [VolumeModel.Start]) -> String {
        let ops = record.ops
        let writes = ops.filter { !$0.isTrim }
        let trims = ops.count - writes.count
        let acked = ops.filter { $0.acknowledgedAt != nil }.count
        let durable = ops.filter(\.durable).count
        let completed = record.flushes.filter { $0.completedAt != nil }.count
        let covered = lastFlush.map { record.flushes[$0] }
        var kill = "kill at \(record.killMilliseconds) ms (\(plan))"
        if let f = record.flushAtKill {
            kill += record.flushes[f].completedAt == nil ? ", flush #\(f + 1) in flight" : ", flush #\(f + 1) had completed"
        }
        let mustSurvive = touching.indices.filter { b in
            touching[b].contains { ops[$0].acknowledgedAt.map { $0 < (covered?.sentAt ?? 0) } ?? false }
        }.count
        let unacknowledged = ops.filter { $0.acknowledgedAt == nil }.prefix(8).map {
            "\($0.isTrim ? "trim" : "write") \($0.generation) of blocks \($0.firstBlock)+\($0.blockCount)"
        }
        let s = views.last?.status
        let recovery = views.compactMap(\.recovery).first
        let reportedOther = found.filter { start in
            start.reported & ~BlockGenerations.trimmedBit != start.generation && start.generation != 0
        }.count
        return """
            round \(round): \(ops.count) ops (\(writes.count) writes, \(trims) trims) from generation \(record.firstGeneration), \
            \(acked) acknowledged (\(durable) as durable writes), \(ops.count - acked) not (\(unacknowledged.joined(separator: ", "))); \(record.flushes.count) flushes, \(completed) completed \
            (the last covers \(covered?.acknowledgedOps ?? 0) ops up to generation \(covered?.highestAcknowledgedGeneration ?? 0)); \
            \(kill); flushes answered up to flushed generation \(record.flushes.compactMap(\.reportedGeneration).max() ?? 0); \
            after the kill: flushed generation \(s?.flushedGeneration ?? 0), highest \(s?.highestGeneration ?? 0); \
            recovery: \(recovery?.unflushedBlocks.count ?? 0) unflushed blocks, \(recovery?.rewrittenBlocks.count ?? 0) rewritten; \
            verified \(found.count) blocks × \(views.count) views (\(found.filter { !$0.isZeros }.count) written, \
            \(mustSurvive) held a flushed op this round, \(reportedOther) report another generation than their data's)
            """
    }
}
