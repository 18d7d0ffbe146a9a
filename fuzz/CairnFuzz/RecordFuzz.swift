#if canImport(Glibc)
import Glibc
#endif
@_spi(Testing) import CairnSecurity

/// The `records` target: the data protocol's secure transport as a replica server or an engine
/// meets it after the handshake (`SecureChannel.receive`): record lengths, tags, records split
/// across reads, a connection closed inside a record. The input's first byte picks the mode
/// (bit 0: `secure`, else `auth`); the rest is what the peer sent, read through a socket pair.
/// Records are sealed under fixed keys, so a seed (valid records) opens and the fuzzer can
/// change it: every record that opens must be one the harness could have sent (only the
/// seeds'), and nothing may trap, hang or allocate by a length field.
public enum RecordFuzz {
    public static let target = FuzzTarget(name: "records", run: run, seeds: seeds)

    static let key = [UInt8](repeating: 0x5A, count: 32)
    static let iv = [UInt8](repeating: 0xA5, count: 12)

    static func mode(_ byte: UInt8) -> DataSecurity { byte & 1 == 1 ? .secure : .auth }

    static func run(_ input: UnsafeRawBufferPointer) {
        guard let first = input.first else { return }
        withPeerStream(UnsafeRawBufferPointer(rebasing: input.dropFirst())) { fd in
            guard let channel = SecureChannel.withFixedKeys(fd: fd, mode: mode(first), key: key, iv: iv) else { return }
            receiveAll(channel)
        }
    }

    private static func receiveAll(_ channel: SecureChannel) {
        var records = 0
        while records < 1 << 16 {
            do {
                guard let data = try channel.receive() else { return }
                precondition(data.count >= 1 && data.count <= SecureChannel.maxRecord, "a record of \(data.count) bytes opened")
                records += 1
            } catch {
                return
            }
        }
    }

    /// Runs `body` on one end of a socket pair whose other end has sent `bytes` and closed
    /// (what a peer sent, as the channel reads it). Inputs are at most a few KiB (fuzz/run caps
    /// them): they fit the socket's buffer.
    static func withPeerStream(_ bytes: UnsafeRawBufferPointer, _ body: (Int32) -> Void) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { return }
        defer { close(fds[0]); close(fds[1]) }
        var sent = 0
        while sent < bytes.count {
            let n = send(fds[1], bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
            guard n > 0 else { return }
            sent += n
        }
        shutdown(fds[1], Int32(SHUT_WR))
        body(fds[0])
    }

    /// Records as a peer seals them: small, several in a row, and one split over two sends.
    static func seeds() -> [(name: String, bytes: [UInt8])] {
        var result: [(name: String, bytes: [UInt8])] = []
        for (modeByte, label) in [(UInt8(0), "auth"), (UInt8(1), "secure")] {
            for (name, messages) in [("one", [[UInt8](repeating: 7, count: 48)]),
                                     ("three", [[1, 2, 3], [UInt8](repeating: 9, count: 200), [4]])] {
                result.append((name: "\(label)-\(name)", bytes: [modeByte] + sealed(mode(modeByte), messages)))
            }
        }
        return result
    }

    /// What a channel with the fixed keys writes for `messages`.
    static func sealed(_ mode: DataSecurity, _ messages: [[UInt8]]) -> [UInt8] {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { return [] }
        defer { close(fds[0]); close(fds[1]) }
        guard let channel = SecureChannel.withFixedKeys(fd: fds[1], mode: mode, key: key, iv: iv) else { return [] }
        for m in messages { try? m.withUnsafeBytes { try channel.send([$0]) } }
        shutdown(fds[1], Int32(SHUT_WR))
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fds[0], &buffer, buffer.count, 0)
            guard n > 0 else { break }
            out += buffer[0..<n]
        }
        return out
    }
}
