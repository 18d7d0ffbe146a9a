// The data protocol's secure transport: a mutual TLS 1.3 handshake (OpenSSL) over the TCP
// socket, then records sealed with keys exported from that handshake (RFC 8446 7.5):
//
//   record = length (4 bytes, big-endian, 1…maxRecord) | data (length bytes) | tag (16 bytes)
//
// Each direction has its own key and IV; record n's nonce is the IV xor n, and the length is
// authenticated with the data, so a record that is changed, dropped, reordered, replayed or
// taken from another connection fails its tag and the connection is closed. `auth` sends the
// data in the clear with a Poly1305 tag over it (ChaCha20-Poly1305, the data as associated
// data); `secure` encrypts it with AES-256-GCM.
//
// Why not SSL_read/SSL_write: a replica connection sends on many threads while one thread
// receives, and an OpenSSL session may not be used by two threads at once. Two independent
// directions need no lock between them.
//
// Threading: `send` may be called from any thread (it serializes itself); `receive` from one
// thread only (the connection's reader).

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CTLSShim
import Synchronization

public struct SecureChannelError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

public final class SecureChannel: @unchecked Sendable {
    /// Largest data in one record; longer sends are split. A 1 MiB write's frame (its header,
    /// volume and offsets beside the data) fits in one.
    public static let maxRecord = (1 << 20) + (64 << 10)
    static let headerSize = 4
    static let tagSize = 16
    static let exporterLabel = "EXPORTER-cairn-data-v1"

    public let mode: DataSecurity
    /// Who the peer proved to be.
    public let peer: PeerIdentity
    private let fd: Int32
    /// The sending direction's cipher; held while a record is sealed and sent (records must go
    /// out in sequence-number order).
    private let sealer: OpaquePointer
    private let sendLock = Mutex(())
    /// Where `secure` records are encrypted before they are written (allocated at the first,
    /// reused by every later one); touched only under `sendLock`.
    private var sealBuffer: UnsafeMutableRawBufferPointer?
    // Receiving: touched only by the one reader thread.
    private let opener: OpaquePointer
    private let buffer: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0

    /// Runs the handshake on the connected socket `fd` within `timeout`. Throws when the peer's
    /// certificate is not from this identity's CAs, it presents none, its mode differs, or it
    /// does not finish in time; the caller then closes the socket.
    public static func establish(fd: Int32, asServer: Bool, mode: DataSecurity, context: TLSContext,
                                 timeout: Duration) throws -> SecureChannel {
        precondition(mode != .none, "a secure channel needs auth or secure")
        setTimeout(fd, timeout)
        defer { setTimeout(fd, .zero) }
        var peerMode: UInt8 = 0
        var uris = [CChar](repeating: 0, count: 4096)
        var keys = [UInt8](repeating: 0, count: 2 * (32 + 12))
        var err = [CChar](repeating: 0, count: 1024)
        guard ctls_handshake(context.raw, fd, asServer ? 1 : 0, mode.wireValue, &peerMode, &uris, uris.count,
                             exporterLabel, &keys, keys.count, &err, err.count) == 0 else {
            throw SecureChannelError(cString(err))
        }
        defer { for i in keys.indices { keys[i] = 0 } }
        guard peerMode == mode.wireValue else {
            let theirs = DataSecurity(wireValue: peerMode).map { "--data-security \($0)" } ?? "an unknown mode (\(peerMode))"
            throw SecureChannelError("the peer runs \(theirs) and this process --data-security \(mode): every node must run the same mode")
        }
        let joined = cString(uris)
        let peer = PeerIdentity(uris: joined.isEmpty ? [] : joined.split(separator: "\n").map(String.init))
        // keys: client→server key, IV; server→client key, IV.
        let (send, receive) = asServer ? (44, 0) : (0, 44)
        let encrypt: Int32 = mode == .secure ? 1 : 0
        let sealer = keys.withUnsafeBufferPointer { k in ctls_aead_new(k.baseAddress! + send, k.baseAddress! + send + 32, encrypt, 1) }
        let opener = keys.withUnsafeBufferPointer { k in ctls_aead_new(k.baseAddress! + receive, k.baseAddress! + receive + 32, encrypt, 0) }
        guard let sealer, let opener else {
            ctls_aead_free(sealer)
            ctls_aead_free(opener)
            throw SecureChannelError("cannot set up AES-256-GCM")
        }
        return SecureChannel(fd: fd, mode: mode, peer: peer, sealer: sealer, opener: opener)
    }

    /// A channel over `fd` with fixed keys and no handshake, for the record layer's fuzz target
    /// and tests: both directions use `key`/`iv`, so what one end sends the same end could open.
    @_spi(Testing)
    public static func withFixedKeys(fd: Int32, mode: DataSecurity, key: [UInt8], iv: [UInt8]) -> SecureChannel? {
        guard mode != .none, key.count == 32, iv.count == 12 else { return nil }
        let encrypt: Int32 = mode == .secure ? 1 : 0
        guard let sealer = ctls_aead_new(key, iv, encrypt, 1) else { return nil }
        guard let opener = ctls_aead_new(key, iv, encrypt, 0) else {
            ctls_aead_free(sealer)
            return nil
        }
        return SecureChannel(fd: fd, mode: mode, peer: PeerIdentity(uris: []), sealer: sealer, opener: opener)
    }

    private init(fd: Int32, mode: DataSecurity, peer: PeerIdentity, sealer: OpaquePointer, opener: OpaquePointer) {
        self.fd = fd
        self.mode = mode
        self.peer = peer
        self.sealer = sealer
        self.opener = opener
        self.buffer = .allocate(byteCount: 2 * (Self.maxRecord + Self.headerSize + Self.tagSize), alignment: 16)
    }

    deinit {
        ctls_aead_free(sealer)
        ctls_aead_free(opener)
        buffer.deallocate()
        sealBuffer?.deallocate()
    }

    // MARK: sending

    /// Seals `parts` (in order, as one stream of bytes) into records and writes them whole.
    /// A failure leaves the connection unusable.
    public func send(_ parts: [UnsafeRawBufferPointer]) throws {
        try sendLock.withLock { _ in
            let total = parts.reduce(0) { $0 + $1.count }
            if total <= Self.maxRecord {
                // The common case (every frame up to a 1 MiB write): one record, no copies.
                if total > 0 { try sendRecord(sealer, parts, length: total) }
                return
            }
            var pending = parts.filter { $0.count > 0 }[...]
            while !pending.isEmpty {
                // The parts (or pieces of them) that fill the next record.
                var record: [UnsafeRawBufferPointer] = []
                var length = 0
                while let part = pending.first, length < Self.maxRecord {
                    let take = min(part.count, Self.maxRecord - length)
                    record.append(UnsafeRawBufferPointer(rebasing: part[0..<take]))
                    length += take
                    if take == part.count { pending.removeFirst() } else {
                        pending[pending.startIndex] = UnsafeRawBufferPointer(rebasing: part[take...])
                    }
                }
                try sendRecord(sealer, record, length: length)
            }
        }
    }

    /// Seals `record` (`length` bytes in all, ≤ maxRecord) and writes it: `secure` as one
    /// contiguous buffer (header, ciphertext, tag), `auth` straight from the caller's memory.
    private func sendRecord(_ sealer: OpaquePointer, _ record: [UnsafeRawBufferPointer], length: Int) throws {
        var header = UInt32(length).bigEndian
        try withUnsafeTemporaryAllocation(of: ctls_part.self, capacity: record.count) { parts in
            var count = 0
            for r in record where r.count > 0 {
                parts[count] = ctls_part(base: r.baseAddress!.assumingMemoryBound(to: UInt8.self), len: r.count)
                count += 1
            }
            let partsBase = parts.baseAddress!
            if mode == .secure {
                // A fresh megabyte per record would cost an mmap, page faults and zeroing each time.
                let buffer = sealBuffer ?? .allocate(byteCount: Self.headerSize + Self.maxRecord + Self.tagSize, alignment: 16)
                sealBuffer = buffer
                let base = buffer.baseAddress!.assumingMemoryBound(to: UInt8.self)
                withUnsafeBytes(of: &header) { h in UnsafeMutableRawPointer(base).copyMemory(from: h.baseAddress!, byteCount: 4) }
                guard ctls_aead_seal(sealer, base, 4, partsBase, count, base + 4, base + 4 + length) == 0 else {
                    throw SecureChannelError("sealing a record failed")
                }
                try Self.writeAll(fd, [UnsafeRawBufferPointer(rebasing: buffer[0..<(Self.headerSize + length + Self.tagSize)])])
            } else {
                var tag: (UInt64, UInt64) = (0, 0)
                let rc = withUnsafeMutableBytes(of: &tag) { t in
                    withUnsafeBytes(of: &header) { h in
                        ctls_aead_seal(sealer, h.baseAddress!.assumingMemoryBound(to: UInt8.self), 4, partsBase, count, nil,
                                       t.baseAddress!.assumingMemoryBound(to: UInt8.self))
                    }
                }
                guard rc == 0 else { throw SecureChannelError("sealing a record failed") }
                try withUnsafeBytes(of: &header) { h in
                    try withUnsafeBytes(of: &tag) { t in try Self.writeAll(fd, [h] + record + [t]) }
                }
            }
        }
    }

    /// sendmsg until every byte of `parts` is written (short writes, EINTR); never SIGPIPE.
    static func writeAll(_ fd: Int32, _ parts: [UnsafeRawBufferPointer]) throws {
        do {
            try StreamSocket.sendAll(fd, parts)
        } catch {
            throw SecureChannelError("send: \(String(cString: strerror(error.errno)))")
        }
    }

    // MARK: receiving

    /// Whether received bytes wait in the channel's buffer (`receive` may then answer without
    /// waiting for the socket to become readable).
    public var hasBufferedBytes: Bool { end > start }

    /// Whether a whole record waits in the channel's buffer: `receive` then answers it without
    /// a system call or a wait. A reader takes every such record before it acts on what they
    /// carry, as a plaintext reader takes everything one `recv` returned (a queue of requests
    /// then goes to its workers as one batch, not one request at a time).
    public var hasCompleteRecord: Bool {
        guard end - start >= Self.headerSize else { return false }
        let length = Int(UInt32(bigEndian: UnsafeRawPointer(buffer.baseAddress! + start).loadUnaligned(as: UInt32.self)))
        // A bad length is `receive`'s to report.
        guard length > 0, length <= Self.maxRecord else { return true }
        return end - start >= Self.headerSize + length + Self.tagSize
    }

    /// The data of the next record, valid until the next call; nil when the peer closed the
    /// connection between records. Throws on a record that fails its tag, a bad length, a
    /// connection closed inside a record, or a receive error.
    public func receive() throws -> UnsafeRawBufferPointer? {
        // Bytes to read at most: all that fits, but never past the end of a large record whose
        // header is in (so a megabyte write is never moved to the front to make room).
        var want = Int.max
        while true {
            if start == end { start = 0; end = 0 }
            if end - start >= Self.headerSize {
                let length = Int(UInt32(bigEndian: UnsafeRawPointer(buffer.baseAddress! + start).loadUnaligned(as: UInt32.self)))
                guard length > 0, length <= Self.maxRecord else {
                    throw SecureChannelError("a record of \(length) bytes (most: \(Self.maxRecord)): not a peer of this protocol")
                }
                let total = Self.headerSize + length + Self.tagSize
                if end - start >= total {
                    let record = buffer.baseAddress! + start
                    start += total
                    let data = (record + Self.headerSize).assumingMemoryBound(to: UInt8.self)
                    let rc = ctls_aead_open(opener, record.assumingMemoryBound(to: UInt8.self), 4, data, length,
                                            mode == .secure ? data : nil,
                                            (record + Self.headerSize + length).assumingMemoryBound(to: UInt8.self))
                    guard rc == 0 else {
                        throw SecureChannelError("a record failed its integrity check (changed, replayed or out of order): the connection is closed")
                    }
                    return UnsafeRawBufferPointer(start: data, count: length)
                }
                if start + total > buffer.count { compact() }
                let missing = total - (end - start)
                want = missing >= 64 << 10 ? missing : Int.max
            } else if start > 0, buffer.count - end < Self.headerSize {
                compact()
            }
            let n = recv(fd, buffer.baseAddress! + end, min(buffer.count - end, want), 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw SecureChannelError("receive: \(String(cString: strerror(errno)))")
            }
            if n == 0 {
                if end == start { return nil }
                throw SecureChannelError("the peer closed the connection inside a record")
            }
            end += n
        }
    }

    private func compact() {
        let count = end - start
        if count > 0 { memmove(buffer.baseAddress!, buffer.baseAddress! + start, count) }
        start = 0
        end = count
    }

    private static func setTimeout(_ fd: Int32, _ d: Duration) {
        let (s, atto) = d.components
        var tv = timeval(tv_sec: Int(s), tv_usec: Int(atto / 1_000_000_000_000))
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }
}
