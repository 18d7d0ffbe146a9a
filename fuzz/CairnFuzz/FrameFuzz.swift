import CairnReplica

/// The `frames` target: the data protocol's decoder (`FrameDecoder`, `FrameHeader`, `Frame`) and
/// every op's request and response payload decoder, as a replica server or an engine meets
/// them from a peer that may be anyone.
///
/// The first input byte chooses what the rest is:
/// - bit 1 set: a payload. The second byte is the header flags; the rest is decoded as the
///   request and the response of every op in `DataOp.all`.
/// - bit 1 clear: a byte stream fed to a `FrameDecoder` in chunks of `(byte >> 2) + 1` bytes
///   (`>> 2 == 63`: all at once), then `finish()`. With bit 0 set, the harness first rewrites
///   each 32-byte header in the stream into one that passes the header checks (magic, version,
///   a declared op, known flags, a payload length that fits, the CRC), so the fuzzer reaches
///   the payload decoders through the stream rather than stopping at the checksum.
/// Every frame the decoder returns must survive a round trip (encode, decode: the same frame),
/// and its payload is also decoded as every op's request and response.
public enum FrameFuzz {
    public static let target = FuzzTarget(name: "frames", run: run, seeds: seeds)

    static let payloadMode: UInt8 = 0x02
    static let fixHeaders: UInt8 = 0x01
    static let wholeStream: UInt8 = 63 << 2

    static func run(_ input: UnsafeRawBufferPointer) {
        guard let mode = input.first else { return }
        let rest = input.dropFirst()
        if mode & payloadMode != 0 {
            guard let flags = rest.first else { return }
            decodeAsEveryOp(rest.dropFirst(), flags: flags)
            return
        }
        let stream = mode & fixHeaders != 0 ? withValidHeaders(Array(rest)) : Array(rest)
        let chunk = Int(mode >> 2) == 63 ? max(stream.count, 1) : Int(mode >> 2) + 1
        var decoder = FrameDecoder()
        var offset = 0
        do {
            while offset < stream.count {
                let end = min(offset + chunk, stream.count)
                for frame in try decoder.feed(stream[offset..<end]) { check(frame) }
                offset = end
            }
            try decoder.finish()
        } catch {
            _ = error.reason
        }
    }

    /// The properties every decoded frame must have.
    static func check(_ frame: Frame) {
        let bytes = frame.encode()
        var again = FrameDecoder()
        let decoded: [Frame]
        do {
            decoded = try again.feed(bytes)
            try again.finish()
        } catch {
            fatalError("a decoded frame does not decode after encoding: \(error.reason); frame \(frame.message)")
        }
        precondition(decoded == [frame], "a decoded frame changes in a round trip: \(frame.message) → \(decoded.map(\.message))")
        _ = frame.message.description  // what a log line prints
        decodeAsEveryOp(frame.encodePayload()[...], flags: frame.headerFlags)
    }

    static func decodeAsEveryOp(_ payload: some Collection<UInt8>, flags: UInt8) {
        for op in DataOp.all {
            for response in [false, true] {
                do {
                    let message = try op.decode(response: response, flags: flags, payload: payload)
                    _ = message.encode()
                } catch {
                    _ = error.reason
                }
            }
        }
    }

    /// `stream` with each frame header rewritten to pass the header checks; a payload length
    /// beyond the stream's end is cut to what is left.
    static func withValidHeaders(_ stream: [UInt8]) -> [UInt8] {
        var bytes = stream
        var offset = 0
        while bytes.count - offset >= FrameLimits.headerSize {
            func field<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
                var value: T = 0
                for i in 0..<MemoryLayout<T>.size { value |= T(bytes[offset + at + i]) << (8 * i) }
                return value
            }
            let ops = Opcode.allCases
            let opcode = ops[Int(bytes[offset + 6]) % ops.count]
            let left = bytes.count - offset - FrameLimits.headerSize
            let length = min(field(16, UInt32.self), UInt32(left))
            let header = FrameHeader(opcode: opcode, flags: bytes[offset + 7] & FrameFlags.known,
                                     requestID: field(8, UInt64.self), payloadLength: length,
                                     epoch: field(20, UInt64.self))
            bytes.replaceSubrange(offset..<(offset + FrameLimits.headerSize), with: header.encode())
            offset += FrameLimits.headerSize + Int(length)
        }
        return bytes
    }

    static func seeds() -> [(name: String, bytes: [UInt8])] {
        var seeds: [(name: String, bytes: [UInt8])] = []
        var all: [UInt8] = []
        for (i, frame) in FrameSamples.everyOp.enumerated() {
            let kind = frame.isResponse ? "response" : "request"
            let name = "\(i < 10 ? "0" : "")\(i)-\(frame.opcode)-\(kind)"
            seeds.append(("stream-\(name)", [wholeStream] + frame.encode()))
            seeds.append(("payload-\(name)", [payloadMode, frame.headerFlags] + frame.encodePayload()))
            all += frame.encode()
        }
        // Every frame in one stream, fed 7 bytes at a time.
        seeds.append(("stream-every-op-chunked", [6 << 2] + all))
        return seeds
    }
}
