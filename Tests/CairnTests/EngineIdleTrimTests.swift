@testable import CairnEngine
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Idle volumes give their FUSE buffers back (docs/engine.md, "Idle volumes give their buffers
/// back"): once no request has come for the idle time, every worker drops its request and read
/// buffers and the read ring its kept buffers — and nothing is ever dropped while a request is
/// in one. Real replica servers (n1 local, so reads also go through the ring).
extension EngineFUSETests {
    /// `count` bytes where every byte is `value`, written at `offset` and read back whole.
    private static func writeAndCheck(_ fd: Int32, _ offset: Int, _ count: Int, _ value: UInt8) -> String? {
        if let e = Optional(write(fd, offset, count, value)), e != 0 { return "write at \(offset): errno \(e)" }
        let (e, got) = read(fd, offset, count)
        if e != 0 { return "read at \(offset): errno \(e)" }
        if got.count != count || got.contains(where: { $0 != value }) {
            let bad = got.firstIndex(where: { $0 != value }) ?? got.count
            return "\(count) bytes at \(offset) should all be \(value); byte \(bad) is \(bad < got.count ? String(got[bad]) : "missing")"
        }
        return nil
    }

    func testAnIdleVolumeGivesItsFUSEBuffersBackAndStillAnswersWhatWasWritten() throws {
        let (engine, servers, fd) = try asyncEngine()
        defer { close(fd); engine.stop(); servers.forEach { $0.stop() } }
        engine.setIdleTrim(milliseconds: 0)

        // Eight writers, each over its own 2 MiB: 1 MiB writes and reads (the workers' request
        // and read buffers) and 256 KiB reads (the ring's buffers), in parallel.
        let slice = Self.asyncSize / 8
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            for part in 0..<2 {
                let offset = t * slice + part * (1 << 20)
                if let f = Self.writeAndCheck(fd, offset, 1 << 20, UInt8(t * 2 + part + 1)) { failures.withLock { $0.append(f) } }
                for quarter in 0..<4 {
                    let (e, got) = Self.read(fd, offset + quarter * (256 << 10), 256 << 10)
                    if e != 0 || got.contains(where: { $0 != UInt8(t * 2 + part + 1) }) {
                        failures.withLock { $0.append("256 KiB read at \(offset + quarter * (256 << 10))") }
                    }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, [])
        let busy = engine.state
        XCTAssertGreaterThan(busy.bufferBytesResident, 4 << 20, "1 MiB requests on several workers leave MiBs resident")
        XCTAssertEqual(busy.idleTrims, 0, "no trim while the idle trim is off")

        engine.setIdleTrim(milliseconds: 100)
        let deadline = Date().addingTimeInterval(10)
        var idle = engine.state
        while Date() < deadline, idle.idleTrims == 0 || idle.bufferBytesResident > 64 << 10 {
            usleep(20_000)
            idle = engine.state
        }
        XCTAssertEqual(idle.idleTrims, 1, "one trim for one idle spell")
        XCTAssertLessThanOrEqual(idle.bufferBytesResident, 64 << 10,
                                 "every worker's and the ring's buffers went back (\(idle.bufferBytesResident) bytes still resident)")
        XCTAssertGreaterThanOrEqual(idle.bufferBytesReleased, busy.bufferBytesResident - (1 << 20))
        usleep(500_000)
        XCTAssertEqual(engine.state.idleTrims, 1, "an idle spell is trimmed once, not at every tick")

        // Everything still reads back, through fresh buffers.
        for t in 0..<8 {
            for part in 0..<2 {
                let offset = t * slice + part * (1 << 20)
                let (e, got) = Self.read(fd, offset, 1 << 20)
                XCTAssertEqual(e, 0)
                XCTAssertFalse(got.contains { $0 != UInt8(t * 2 + part + 1) }, "1 MiB at \(offset) after the trim")
            }
        }
        XCTAssertNil(Self.writeAndCheck(fd, 0, 1 << 20, 99))
        let next = Date().addingTimeInterval(10)
        while Date() < next, engine.state.idleTrims < 2 { usleep(20_000) }
        // (At least: a pause of 100 ms among the reads above is an idle spell of its own.)
        XCTAssertGreaterThanOrEqual(engine.state.idleTrims, 2, "the next idle spell after requests is trimmed again")
        XCTAssertEqual(engine.state.errors, 0)
    }

    /// The bug to fear: a buffer dropped while a request is in it (a write's data or a request's
    /// header turning into zeros on its way, a read answered with zeros). Bursts of 1 MiB writes
    /// and reads with pauses, under an idle time of 1 ms, so trims are asked for while requests
    /// are in flight and as they arrive. A request broken that way may never be answered: the
    /// load runs on threads of its own and a stall fails the test (stopping the engine aborts
    /// the connection, which ends the stuck I/O).
    func testIdleTrimsRacingBurstsOfIONeverTouchARequest() throws {
        let (engine, servers, fd) = try asyncEngine()
        defer { close(fd); engine.stop(); servers.forEach { $0.stop() } }
        engine.setIdleTrim(milliseconds: 1)
        let failures = Mutex<[String]>([])
        let done = Atomic<Int>(0)
        let until = Date().addingTimeInterval(4)
        let group = DispatchGroup()
        for t in 0..<4 {
            group.enter()
            Thread {
                defer { group.leave() }
                var value = UInt8(t * 50 + 1)
                var rng = SystemRandomNumberGenerator()
                while Date() < until {
                    let offset = t * (4 << 20) + Int.random(in: 0..<3, using: &rng) * (1 << 20)
                    if let f = Self.writeAndCheck(fd, offset, 1 << 20, value) { failures.withLock { $0.append(f) } }
                    let (e, got) = Self.read(fd, offset + (128 << 10), 128 << 10)
                    if e != 0 || got.contains(where: { $0 != value }) { failures.withLock { $0.append("128 KiB read at \(offset + (128 << 10))") } }
                    done.wrappingAdd(1, ordering: .relaxed)
                    value = value % 250 + 1
                    usleep(UInt32.random(in: 0..<20_000, using: &rng))
                }
            }.start()
        }
        guard group.wait(timeout: .now() + 60) == .success else {
            XCTFail("I/O stopped: a request was never answered (\(done.load(ordering: .relaxed)) bursts done)")
            return
        }
        let state = engine.state
        XCTAssertEqual(failures.withLock { $0 }, [], "a trim reached a buffer in use")
        XCTAssertGreaterThanOrEqual(state.idleTrims, 20, "trims were asked for all along (\(done.load(ordering: .relaxed)) bursts)")
        XCTAssertGreaterThan(state.bufferBytesReleased, 0)
        XCTAssertEqual(state.errors, 0)
        // A write whose buffer changed under it leaves a block that fails its checksum on one
        // replica (found and repaired on read, so the answers above may still be right).
        XCTAssertEqual(state.repairedBlocks, 0, "a replica held a block that did not match its checksum")
        XCTAssertEqual(state.unrepairableBlocks, 0)
    }
}
