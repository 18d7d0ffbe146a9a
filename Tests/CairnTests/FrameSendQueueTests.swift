import CairnCore
@testable import CairnReplica
@_spi(Testing) import CairnSecurity
import Foundation
import Synchronization
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Send combining (FrameSendQueue): many threads sending on one connection, over a real socket,
/// in plaintext and through a secure channel; and what the replica client does when a send fails.
final class FrameSendQueueTests: XCTestCase {
    /// The data of frame `index` of sender `thread`: 1 MiB for every 25th, else one block;
    /// a byte of its own, with its first and last 64 bytes counting from there.
    private static func data(_ thread: Int, _ index: Int) -> [UInt8] {
        let seed = thread &* 7 &+ index
        var data = [UInt8](repeating: UInt8(truncatingIfNeeded: seed), count: index % 25 == 7 ? 1 << 20 : FrameLimits.blockSize)
        for i in 0..<64 {
            data[i] = UInt8(truncatingIfNeeded: seed &+ i)
            data[data.count - 1 - i] = UInt8(truncatingIfNeeded: seed &- i)
        }
        return data
    }

    private static func same(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        a.count == b.count && a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 } }
    }

    private static func requestID(_ thread: Int, _ index: Int) -> UInt64 { UInt64(thread) << 32 | UInt64(index) }

    private func socketPair() throws -> (Int32, Int32) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw SystemError("socketpair", errno: errno) }
        return (fds[0], fds[1])
    }

    /// `threads` threads send `perThread` write frames each through one queue over a socket
    /// pair; the far end decodes them. Every frame arrives whole, exactly once, and fewer
    /// writes than frames carried them.
    private func concurrentSends(_ mode: DataSecurity) throws {
        let (near, far) = try socketPair()
        defer { _ = Glibc.close(near); _ = Glibc.close(far) }
        let key = [UInt8](repeating: 9, count: 32), iv = [UInt8](repeating: 3, count: 12)
        let sender = mode == .none ? nil : SecureChannel.withFixedKeys(fd: near, mode: mode, key: key, iv: iv)
        let receiver = mode == .none ? nil : SecureChannel.withFixedKeys(fd: far, mode: mode, key: key, iv: iv)
        // A real write, made a little slow so the senders pile up behind it.
        let queue = FrameSendQueue { parts in
            usleep(200)
            if let sender { try sender.send(parts) } else { try StreamSocket.sendAll(near, parts) }
        }
        let threads = 16, perThread = 60
        let received = Mutex([UInt64: Int]())
        let receiveError = Mutex<String?>(nil)
        let done = DispatchSemaphore(value: 0)
        try startThread {
            defer { done.signal() }
            var decoder = FrameDecoder()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)
            defer { buffer.deallocate() }
            var count = 0
            do {
                while count < threads * perThread {
                    let chunk: UnsafeRawBufferPointer
                    if let receiver {
                        guard let c = try receiver.receive() else { throw SocketError("closed early") }
                        chunk = c
                    } else {
                        let n = recv(far, buffer.baseAddress, buffer.count, 0)
                        guard n > 0 else { throw SocketError("recv returned \(n)") }
                        chunk = UnsafeRawBufferPointer(rebasing: buffer[0..<n])
                    }
                    for frame in try decoder.feed(chunk) {
                        count += 1
                        let thread = Int(frame.requestID >> 32), index = Int(frame.requestID & 0xffff_ffff)
                        guard let m = frame.request(DataOp.Write.self), Self.same(Array(m.data), Self.data(thread, index)) else {
                            throw SocketError("frame \(thread)/\(index) arrived damaged")
                        }
                        received.withLock { $0[frame.requestID, default: 0] += 1 }
                    }
                }
            } catch {
                receiveError.withLock { $0 = "\(error)" }
            }
        }
        let failures = Atomic<Int>(0)
        let expectedBytes = Atomic<UInt64>(0)
        // Every third frame's data is borrowed (sent from the sender's memory, as the replica
        // client sends a write): that memory stays valid until the receiver has everything.
        final class Borrowed: @unchecked Sendable {
            let lock = NSLock()
            var memory: [UnsafeMutableRawBufferPointer] = []
            func keep(_ m: UnsafeMutableRawBufferPointer) { lock.lock(); memory.append(m); lock.unlock() }
            deinit { memory.forEach { $0.deallocate() } }
        }
        let borrowed = Borrowed()
        onThreads(threads) { t in
            for i in 0..<perThread {
                let data = Self.data(t, i)
                let parts: [FramePart]
                if i % 3 == 0 {
                    let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 16)
                    data.withUnsafeBytes { memory.copyMemory(from: $0) }
                    borrowed.keep(memory)
                    let head = WriteRequest.encodeFrameHead(requestID: Self.requestID(t, i), epoch: 1, volume: "vol-q",
                                                            generation: 1, offset: 0, dataCount: data.count)
                    parts = [.owned(head), .borrowed(UnsafeRawBufferPointer(memory))]
                } else {
                    let frame = data.withUnsafeBytes {
                        WriteRequest.encodeFrame(requestID: Self.requestID(t, i), epoch: 1, volume: "vol-q", generation: 1, offset: 0, data: $0)
                    }
                    // The header apart from the rest, as the server sends a reply.
                    parts = [.owned(Array(frame[0..<FrameLimits.headerSize])), .owned(Array(frame[FrameLimits.headerSize...]))]
                }
                expectedBytes.wrappingAdd(UInt64(parts.reduce(0) { $0 + $1.count }), ordering: .relaxed)
                if queue.send(parts) != nil {
                    failures.wrappingAdd(1, ordering: .relaxed)
                }
            }
        }
        XCTAssertEqual(done.wait(timeout: .now() + 60), .success, "the receiver got every frame")
        XCTAssertNil(receiveError.withLock { $0 })
        XCTAssertEqual(failures.load(ordering: .relaxed), 0)
        let counts = received.withLock { $0 }
        XCTAssertEqual(counts.count, threads * perThread)
        XCTAssertTrue(counts.values.allSatisfy { $0 == 1 }, "every frame arrived exactly once")
        XCTAssertEqual(queue.framesWritten, UInt64(threads * perThread))
        XCTAssertEqual(queue.bytesWritten, expectedBytes.load(ordering: .relaxed))
        XCTAssertLessThan(queue.writeCalls, queue.framesWritten / 2, "frames were combined (\(queue.writeCalls) writes for \(queue.framesWritten) frames)")
    }

    func testConcurrentSendsInPlaintext() throws { try concurrentSends(.none) }
    func testConcurrentSendsThroughAnAuthChannel() throws { try concurrentSends(.auth) }
    func testConcurrentSendsThroughASecureChannel() throws { try concurrentSends(.secure) }

    /// Nobody else sending: the frame is written by the caller's own thread before `send`
    /// returns, in a call of its own.
    func testALoneFrameGoesOutAtOnceOnItsOwnThread() throws {
        let (near, far) = try socketPair()
        defer { _ = Glibc.close(near); _ = Glibc.close(far) }
        let writer = Mutex<pthread_t?>(nil)
        let queue = FrameSendQueue { parts in
            writer.withLock { $0 = pthread_self() }
            try StreamSocket.sendAll(near, parts)
        }
        for round in 1...3 {
            let frame = Frame(requestID: UInt64(round), epoch: 0, body: .request(DataOp.Hello.request(HelloRequest(protocolVersion: 4))))
                .encode()
            XCTAssertNil(queue.send([.owned(frame)]))
            XCTAssertEqual(writer.withLock { $0 }.map { pthread_equal($0, pthread_self()) != 0 }, true, "written by the sender")
            XCTAssertEqual(queue.writeCalls, UInt64(round))
            var bytes = [UInt8](repeating: 0, count: frame.count)
            XCTAssertEqual(recv(far, &bytes, bytes.count, Int32(MSG_DONTWAIT)), frame.count, "already on the wire")
            XCTAssertEqual(bytes, frame)
        }
        queue.close {}
        XCTAssertNotNil(queue.send([.owned([1, 2, 3])]), "a closed queue refuses")
        XCTAssertEqual(queue.writeCalls, 3)
    }

    /// What makes borrowed memory safe to reuse after a failed request: `fence` returns only
    /// once the write under way has ended, and the frames queued behind it are never written.
    func testFenceWaitsForTheWriteUnderWayAndDropsWhatIsQueued() throws {
        let writing = Atomic<Bool>(false)
        let writes = Atomic<Int>(0)
        let release = DispatchSemaphore(value: 0)
        let queue = FrameSendQueue { _ in
            writing.store(true, ordering: .sequentiallyConsistent)
            release.wait()
            writes.wrappingAdd(1, ordering: .sequentiallyConsistent)
            writing.store(false, ordering: .sequentiallyConsistent)
        }
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
        defer { memory.deallocate() }
        let first = DispatchSemaphore(value: 0)
        let part = FramePart.borrowed(UnsafeRawBufferPointer(memory))
        try startThread {
            _ = queue.send([.owned([1]), part])
            first.signal()
        }
        while !writing.load(ordering: .sequentiallyConsistent) { usleep(1000) }
        XCTAssertNil(queue.send([.owned([2]), .borrowed(UnsafeRawBufferPointer(memory))]), "queued behind the write under way")
        let fenced = Atomic<Bool>(false)
        let fenceDone = DispatchSemaphore(value: 0)
        try startThread {
            queue.fence("the request failed")
            fenced.store(true, ordering: .sequentiallyConsistent)
            fenceDone.signal()
        }
        usleep(200_000)
        XCTAssertFalse(fenced.load(ordering: .sequentiallyConsistent), "fence returned while a write still read the memory")
        release.signal()
        XCTAssertEqual(fenceDone.wait(timeout: .now() + 10), .success)
        XCTAssertFalse(writing.load(ordering: .sequentiallyConsistent))
        XCTAssertEqual(first.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(writes.load(ordering: .sequentiallyConsistent), 1, "the frame queued behind was dropped, not written")
        XCTAssertNotNil(queue.send([.owned([3])]), "a fenced queue refuses")
        XCTAssertEqual(writes.load(ordering: .sequentiallyConsistent), 1)
    }

    /// A replica client through a server that stops reading: the socket fills, a write times
    /// out (SO_SNDTIMEO), and every caller — the one writing and those whose frames were queued
    /// behind it — gets the connection error; later calls fail fast.
    func testAFailedSendFailsEveryQueuedCaller() throws {
        let (listenFD, port) = try Socket.listen(host: "127.0.0.1", port: 0)
        defer { _ = Glibc.close(listenFD) }
        let served = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        try startThread {
            defer { served.signal() }
            let fd = accept(listenFD, nil, nil)
            guard fd >= 0 else { return }
            defer { _ = Glibc.close(fd) }
            // Answer the hello, then read nothing more until the test is done.
            var decoder = FrameDecoder()
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = recv(fd, &buffer, buffer.count, 0)
                guard n > 0, let frames = try? decoder.feed(buffer[0..<n]) else { return }
                if let hello = frames.first {
                    let reply = Frame(requestID: hello.requestID, epoch: 0, body: .response(DataOp.Hello.response(
                        HelloResponse(status: .ok, protocolVersion: FrameLimits.protocolVersion)))).encode()
                    _ = reply.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    break
                }
            }
            release.wait()
        }
        let client = try ReplicaClient(host: "127.0.0.1", port: port, requestTimeout: .seconds(60))
        defer { release.signal(); client.close(); served.wait() }
        var timeout = timeval(tv_sec: 0, tv_usec: 300_000)
        XCTAssertEqual(setsockopt(client.fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size)), 0)
        let data = [UInt8](repeating: 5, count: 1 << 20)
        let outcomes = Mutex([String]())
        let start = ContinuousClock.now
        onThreads(16) { t in
            for i in 0..<8 {
                do {
                    try data.withUnsafeBytes {
                        try client.write(volumeID: "vol-q", offset: UInt64(i) << 20, data: $0, generation: UInt64(t * 8 + i + 1), epoch: 1)
                    }
                    outcomes.withLock { $0.append("answered") }
                } catch {
                    outcomes.withLock { $0.append("\(error)") }
                }
            }
        }
        let elapsed = ContinuousClock.now - start
        let all = outcomes.withLock { $0 }
        XCTAssertEqual(all.count, 128)
        XCTAssertTrue(all.allSatisfy { $0.contains("replica connection failed") }, "every caller failed: \(Set(all))")
        XCTAssertTrue(all.contains { $0.contains("sending") }, "the send failure is the reason: \(Set(all))")
        XCTAssertLessThan(elapsed, .seconds(30), "nobody waited for the request timeout")
        XCTAssertTrue(client.isBroken)
    }
}
