@testable import CairnEngine
import CairnReplica
import Dispatch
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("fallocate")
private func punch(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32

/// Durable writes (docs/engine.md, "Durable writes"): a database's commit at queue depth 1 —
/// one write, then a flush — has its write made durable by every replica as it is written, and
/// the flush then sends nothing. What must never happen: a flush that returns while a replica
/// holds a write it acknowledged before the flush began and has not made durable.
extension EngineFUSETests {
    private func durableFakes(_ count: Int) -> [FakeReplica] {
        let fakes = fakes(count)
        for fake in fakes { fake.makesDurable.store(true, ordering: .relaxed) }
        return fakes
    }

    private func commit(_ fd: Int32, block: Int, byte: UInt8, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(Self.write(fd, block * 4096, 4096, byte), 0, file: file, line: line)
        XCTAssertEqual(fdatasync(fd), 0, file: file, line: line)
    }

    private func volatile(_ fakes: [FakeReplica]) -> [Set<UInt64>] { fakes.map { f in f.state.withLock { $0.volatileBlocks } } }

    func testACommitAtQueueDepthOneIsMadeDurableByItsWriteAndItsFlushSendsNothing() throws {
        let fakes = durableFakes(3)
        let engine = makeEngine(fakes)
        let fd = try Self.open(try engine.start())
        engine.setAllDurableForTesting(false)  // as with CAIRN_WRITE_THROUGH=off: flushes make writes durable
        openFiles.append(fd)
        for i in 0..<10 { commit(fd, block: i, byte: UInt8(i + 1)) }
        // The first two commits teach the engine the pattern (one write per flush); from the
        // third on, each write is durable on every replica and its flush is answered at once.
        for fake in fakes {
            let (flushes, asked) = fake.state.withLock { ($0.flushes, $0.durableAsked) }
            XCTAssertEqual(flushes, 2, "\(fake.nodeID) was flushed although every write since was durable")
            XCTAssertEqual(asked, 8, "\(fake.nodeID)")
            XCTAssertEqual(fake.bytes(9 * 4096, 4096), [UInt8](repeating: 10, count: 4096))
        }
        XCTAssertEqual(engine.state.durableWrites, 8)
        XCTAssertEqual(engine.state.flushesWithoutSync, 8)
        XCTAssertEqual(volatile(fakes), [[], [], []])
    }

    func testAReplicaThatDoesNotMakeTheWriteDurableIsStillFlushedAndTheOthersAreNot() throws {
        let fakes = durableFakes(3)
        fakes[1].makesDurable.store(false, ordering: .relaxed)  // an older replica server
        let engine = makeEngine(fakes)
        let fd = try Self.open(try engine.start())
        engine.setAllDurableForTesting(false)  // as with CAIRN_WRITE_THROUGH=off: flushes make writes durable
        openFiles.append(fd)
        for i in 0..<10 {
            commit(fd, block: i, byte: UInt8(i + 1))
            XCTAssertEqual(volatile(fakes), [[], [], []], "commit \(i): a flush returned with an unsynced write")
        }
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.flushes } }, [2, 10, 2])
        XCTAssertEqual(engine.state.flushesWithoutSync, 0)
    }

    func testWritesWithoutFlushesOrSeveralPerFlushOrAJournalCommitAreNotMadeDurableAndATrimIsFlushed() throws {
        let fakes = durableFakes(2)
        let engine = makeEngine(fakes)
        let fd = try Self.open(try engine.start())
        engine.setAllDurableForTesting(false)  // as with CAIRN_WRITE_THROUGH=off: flushes make writes durable
        openFiles.append(fd)
        // Streaming writes with no flush: a sync per write would be wasted.
        for i in 0..<20 { XCTAssertEqual(Self.write(fd, i * 4096, 4096, 0x11), 0) }
        XCTAssertEqual(fdatasync(fd), 0)
        // Two writes per flush: the first cannot know a second follows, so neither is asked.
        for i in 0..<5 {
            XCTAssertEqual(Self.write(fd, (40 + 2 * i) * 4096, 4096, 0x22), 0)
            XCTAssertEqual(Self.write(fd, (41 + 2 * i) * 4096, 4096, 0x23), 0)
            XCTAssertEqual(fdatasync(fd), 0)
        }
        // A filesystem's journal commits: several journal writes, a flush, the commit block, a
        // flush — one write between two flushes every other time is not a commit pattern.
        for i in 0..<5 {
            for j in 0..<3 { XCTAssertEqual(Self.write(fd, (60 + 4 * i + j) * 4096, 4096, 0x24), 0) }
            XCTAssertEqual(fdatasync(fd), 0)
            XCTAssertEqual(Self.write(fd, (63 + 4 * i) * 4096, 4096, 0x25), 0)
            XCTAssertEqual(fdatasync(fd), 0)
        }
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.durableAsked } }, [0, 0])
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.flushes } }, [16, 16])
        // One write per flush again (the commit block's flush was the first of the run): the
        // second commit on is durable and its flush sends nothing.
        commit(fd, block: 100, byte: 0x33)
        commit(fd, block: 101, byte: 0x34)
        commit(fd, block: 102, byte: 0x35)
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.flushes } }, [17, 17])
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.durableAsked } }, [2, 2])
        // A trim is never durable as it is made: the flush after it goes everywhere.
        XCTAssertEqual(Self.write(fd, 103 * 4096, 4096, 0x36), 0)
        XCTAssertEqual(punch(fd, 0x02 | 0x01, 200 * 4096, 8192), 0)
        XCTAssertEqual(fdatasync(fd), 0)
        XCTAssertEqual(fakes.map { f in f.state.withLock { $0.flushes } }, [18, 18])
        XCTAssertEqual(volatile(fakes), [[], []])
    }

    /// The race that matters: a writer at queue depth 1 on other blocks while a committer
    /// writes and flushes — every other write durable (whatever the guess would say), one
    /// replica sometimes refusing, one slow. After every flush, no replica may hold as volatile
    /// a block whose write was acknowledged before that flush began. Each block is written
    /// once, so a volatile block names one write.
    func testNoFlushReturnsWhileAReplicaHoldsAWriteAcknowledgedBeforeItUnsynced() throws {
        let fakes = durableFakes(3)
        let engine = makeEngine(fakes)
        _ = try engine.start()
        engine.alternateDurableForTesting.store(true, ordering: .relaxed)
        let clock = Atomic<UInt64>(1)
        let blocks = 4096
        // The tick at which each block's write was acknowledged (0: not yet).
        let acked = Mutex([UInt64](repeating: 0, count: blocks))
        let next = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
        let violations = Mutex<[String]>([])
        let flushes = Atomic<Int>(0)
        let group = DispatchGroup()
        // Threads of their own: a dispatch pool of two cores may start the committer last.
        func spawn(_ body: @escaping @Sendable () -> Void) {
            group.enter()
            Thread { body(); group.leave() }.start()
        }
        // n2 answers some durable writes as not durable.
        spawn {
            var on = true
            while !stop.load(ordering: .relaxed) {
                fakes[1].makesDurable.store(on, ordering: .relaxed)
                on.toggle()
                usleep(700)
            }
        }
        @Sendable func writeNext() -> Bool {
            let block = next.wrappingAdd(1, ordering: .relaxed).oldValue
            guard block < blocks else { return false }
            // Straight into the engine, as FUSE workers call it: the kernel's inode lock
            // would otherwise keep this file's writes and fsyncs apart.
            let rc = Self.withAligned(4096, fill: UInt8(truncatingIfNeeded: block)) {
                engine.enterGate()
                defer { engine.leaveGate() }
                return engine.writeBlocks(offset: UInt64(block * 4096), data: UnsafeRawBufferPointer(start: $0, count: 4096))
            }
            XCTAssertEqual(rc, 0)
            let tick = clock.wrappingAdd(1, ordering: .relaxed).oldValue
            acked.withLock { $0[block] = tick }
            return true
        }
        // n3's writes and flushes take a while (a slow disk), so writes and flushes overlap on
        // it often — also a write landing after a flush took effect but before it answered.
        fakes[2].onWrite.withLock { $0 = { usleep(300) } }
        fakes[2].onFlush.withLock { $0 = { usleep(300) } }
        // A sparse writer beside the committer: most commits are alone (their writes durable),
        // and now and then a write of its own lands around one.
        spawn {
            while !stop.load(ordering: .relaxed), writeNext() { usleep(1_500) }
        }
        spawn {
            while !stop.load(ordering: .relaxed) {
                guard writeNext() else { break }
                let began = clock.wrappingAdd(1, ordering: .relaxed).oldValue
                let rc = engine.flush()
                guard rc == 0 else {
                    violations.withLock { $0.append("flush failed: \(rc)") }
                    break
                }
                flushes.wrappingAdd(1, ordering: .relaxed)
                let ticks = acked.withLock { $0 }
                for fake in fakes {
                    for block in fake.state.withLock({ $0.volatileBlocks }) {
                        let tick = ticks[Int(block)]
                        if tick != 0 && tick < began {
                            violations.withLock { $0.append("\(fake.nodeID): block \(block) acknowledged at \(tick), unsynced after the flush begun at \(began)") }
                        }
                    }
                }
            }
            stop.store(true, ordering: .relaxed)
        }
        group.wait()
        XCTAssertEqual(violations.withLock { $0 }.prefix(10), [])
        XCTAssertGreaterThan(flushes.load(ordering: .relaxed), 50)
        print("durable-write race: \(flushes.load(ordering: .relaxed)) flushes, \(engine.state.durableWrites) durable writes, \(engine.state.flushesWithoutSync) flushes without a sync")
    }
}
