import CairnFuzz
import CairnReplica
import Foundation
import XCTest

/// The data protocol's frame codec (docs/replica-format.md, "Data protocol (TCP)").
final class FrameCodecTests: XCTestCase {
    // MARK: Fixtures

    static let block = FrameSamples.block

    /// One request and one response of every op (shared with the fuzz target's seed corpus).
    static var everyOp: [Frame] { FrameSamples.everyOp }

    /// A frame from raw parts, with a correct header checksum unless told otherwise.
    static func rawFrame(
        magic: UInt32 = 0x464E_5243, version: UInt16 = 1, op: UInt8, flags: UInt8 = 0, requestID: UInt64 = 1,
        payloadLength: UInt32? = nil, epoch: UInt64 = 1, payload: [UInt8]
    ) -> [UInt8] {
        var h: [UInt8] = []
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { h.append(contentsOf: $0) } }
        put(magic)
        put(version)
        put(op)
        put(flags)
        put(requestID)
        put(payloadLength ?? UInt32(payload.count))
        put(epoch)
        put(CRC32C.checksum(h))
        return h + payload
    }

    static func volumeField(_ raw: [UInt8]) -> [UInt8] {
        [UInt8(raw.count & 0xFF), UInt8(raw.count >> 8)] + raw
    }

    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// Decodes `bytes` fed as one chunk, then checks EOF.
    static func decodeAll(_ bytes: [UInt8]) throws -> [Frame] {
        var d = FrameDecoder()
        let frames = try d.feed(bytes)
        try d.finish()
        return frames
    }

    func assertFrameError(
        _ bytes: [UInt8], _ kind: FrameError.Kind, containing text: String? = nil,
        file: StaticString = #filePath, line: UInt = #line
    ) {
        do {
            let frames = try Self.decodeAll(bytes)
            XCTFail("decoded \(frames.count) frames, expected \(kind)", file: file, line: line)
        } catch let error as FrameError {
            XCTAssertEqual(error.kind, kind, "reason: \(error.reason)", file: file, line: line)
            XCTAssertFalse(error.reason.isEmpty, file: file, line: line)
            if let text {
                XCTAssertTrue(error.reason.contains(text), "reason \"\(error.reason)\" lacks \"\(text)\"", file: file, line: line)
            }
        } catch {
            XCTFail("unexpected error type \(error)", file: file, line: line)
        }
    }

    // MARK: Round trips and layout

    func testEveryOpRequestAndResponseRoundTrips() throws {
        for frame in Self.everyOp {
            let bytes = frame.encode()
            XCTAssertEqual(try Self.decodeAll(bytes), [frame], "\(frame.opcode) response=\(frame.isResponse)")
            // The typed payloads round-trip on their own as well.
            let m = frame.message
            let op = try XCTUnwrap(DataOp.operation(m.opcode))
            XCTAssertEqual(try op.decode(response: frame.isResponse, flags: m.headerFlags, payload: m.encode()), m)
        }
        XCTAssertEqual(Set(Self.everyOp.filter { !$0.isResponse }.map(\.opcode)), Set(Opcode.allCases))
        XCTAssertEqual(Set(Self.everyOp.filter { $0.isResponse }.map(\.opcode)), Set(Opcode.allCases))
    }

    func testEveryOpIsDeclaredOnceWithAUniqueOpcodeAndRoundTrips() throws {
        let opcodes = DataOp.all.map { $0.opcode }
        XCTAssertEqual(opcodes.count, Set(opcodes).count, "two ops share an opcode: \(opcodes)")
        XCTAssertEqual(Set(opcodes), Set(Opcode.allCases), "every opcode is declared by exactly one op")
        XCTAssertEqual(Set(DataOp.all.map { $0.name }).count, DataOp.all.count, "op names are unique")
        for op in DataOp.all {
            XCTAssertEqual(DataOp.operation(op.opcode).map { ObjectIdentifier($0) }, ObjectIdentifier(op))
            // A failure response of every op round-trips through the op's own decoder.
            let failure = ReplyFailure(status: .staleEpoch, message: "stale epoch 3", epoch: 9)
            let frame = Frame(requestID: 1, epoch: 9, body: .response(op.failureResponse(failure)))
            XCTAssertEqual(try Self.decodeAll(frame.encode()), [frame], op.name)
        }
    }

    func testADamagedBlockTravelsAsAFieldOfAReadResponse() throws {
        let damaged = Frame(requestID: 3, epoch: 2, body: .response(DataOp.Read.response(
            ReadResponse(status: .checksumMismatch, damagedBlock: 12, message: "checksum mismatch in block 12"))))
        let bytes = damaged.encode()
        XCTAssertEqual(bytes[7], FrameFlags.response | FrameFlags.detail)
        XCTAssertEqual(try Self.decodeAll(bytes).first?.response(DataOp.Read.self)?.damagedBlock, 12)
        // Without the flag the layout is version 1's, byte for byte.
        let plain = Frame(requestID: 3, epoch: 2, body: .response(DataOp.Read.response(ReadResponse(status: .checksumMismatch, message: "x"))))
        XCTAssertEqual(Array(plain.encode()[32...]), [ReplyStatus.checksumMismatch.rawValue] + Self.le(UInt32(0)) + Self.le(UInt16(1)) + [0x78])
        // The flag belongs to a read response only, and names a checksum mismatch only.
        assertFrameError(Self.rawFrame(op: Opcode.read.rawValue, flags: FrameFlags.detail, payload: []), .reservedFlags, containing: "detail")
        assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.response | FrameFlags.detail, payload: [0, 0, 0]),
                         .reservedFlags, containing: "detail")
        assertFrameError(Self.rawFrame(op: Opcode.read.rawValue, flags: FrameFlags.response | FrameFlags.detail,
                                       payload: [ReplyStatus.ioError.rawValue] + Self.le(UInt32(0)) + [0, 0] + Self.le(UInt64(1))),
                         .malformedPayload, containing: "damaged block")
    }

    func testEveryStatusCodeRoundTrips() throws {
        for status in ReplyStatus.allCases {
            let frame = Frame(requestID: 5, epoch: 3, body: .response(DataOp.Write.response(WriteResponse(status: status))))
            XCTAssertEqual(try Self.decodeAll(frame.encode()), [frame])
        }
    }

    func testHeaderLayoutIsLittleEndianWithChecksumOverFirst28Bytes() throws {
        let frame = Frame(requestID: 0x0102_0304_0506_0708, epoch: 0x1112_1314_1516_1718, body: .response(DataOp.Trim.response(TrimResponse(status: .ok))))
        let bytes = frame.encode()
        XCTAssertEqual(bytes.count, 35)  // header + status + empty message (u16 length)
        XCTAssertEqual(Array(bytes[0..<4]), Array("CRNF".utf8))
        XCTAssertEqual(Array(bytes[4..<6]), [1, 0])
        XCTAssertEqual(bytes[6], Opcode.trim.rawValue)
        XCTAssertEqual(bytes[7], 0x01)  // response flag
        XCTAssertEqual(Array(bytes[8..<16]), [8, 7, 6, 5, 4, 3, 2, 1])
        XCTAssertEqual(Array(bytes[16..<20]), [3, 0, 0, 0])
        XCTAssertEqual(Array(bytes[20..<28]), [0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11])
        XCTAssertEqual(Array(bytes[28..<32]), Self.le(CRC32C.checksum(Array(bytes[0..<28]))))
        XCTAssertEqual(bytes, Self.rawFrame(op: 6, flags: 1, requestID: 0x0102_0304_0506_0708, epoch: 0x1112_1314_1516_1718, payload: [0, 0, 0]))
    }

    /// The in-place header decoder (every received frame's) against the general one, on valid
    /// headers of every op and flag combination and on each with one byte changed (checksum
    /// fixed up half the time, so the checks after it are reached): the same header, or the
    /// same error. A fast path that accepted what the general decoder refuses would let a
    /// malformed frame in.
    func testTheInPlaceHeaderDecoderAgreesWithTheGeneralOne() throws {
        var rng = SystemRandomNumberGenerator()
        var compared = 0, refused = 0
        func check(_ bytes: [UInt8]) {
            let general = Result { () throws(FrameError) in try FrameHeader(decoding: bytes) }
            let inPlace = bytes.withUnsafeBytes { raw in Result { () throws(FrameError) in try FrameHeader(decoding: raw) } }
            switch (general, inPlace) {
            case let (.success(a), .success(b)): XCTAssertEqual(a, b)
            case let (.failure(a), .failure(b)): XCTAssertEqual(a, b); refused += 1
            default: XCTFail("the decoders disagree on \(bytes): \(general) against \(inPlace)")
            }
            compared += 1
        }
        for opcode in Opcode.allCases {
            for flags in 0...UInt8.max {
                let header = FrameHeader(opcode: opcode, flags: flags, requestID: UInt64.random(in: 0...UInt64.max, using: &rng),
                                         payloadLength: UInt32.random(in: 0...UInt32(FrameLimits.maxPayloadLength) + 1, using: &rng),
                                         epoch: UInt64.random(in: 0...UInt64.max, using: &rng))
                let bytes = header.encode()
                check(bytes)
                var damaged = bytes
                let at = Int.random(in: 0..<FrameLimits.headerSize, using: &rng)
                damaged[at] ^= UInt8.random(in: 1...UInt8.max, using: &rng)
                if Bool.random(using: &rng) && at < FrameLimits.checksummedHeaderSize {
                    let crc = CRC32C.checksum(Array(damaged[0..<FrameLimits.checksummedHeaderSize]))
                    withUnsafeBytes(of: crc.littleEndian) { damaged.replaceSubrange(FrameLimits.checksummedHeaderSize..<FrameLimits.headerSize, with: $0) }
                }
                check(damaged)
            }
        }
        check(Array(FrameHeader(opcode: .write, flags: 0, requestID: 1, payloadLength: 0, epoch: 0).encode().dropLast()))
        XCTAssertGreaterThan(refused, compared / 4, "too few refusals to have exercised the checks")
    }

    func testLargestWriteIsAcceptedAndOneBlockMoreIsNot() throws {
        let data = [UInt8](repeating: 0xA5, count: FrameLimits.maxDataLength)
        let write = Frame(requestID: 1, epoch: 1, body: .request(DataOp.Write.request(WriteRequest(volume: String(repeating: "x", count: 128), generation: 1, offset: 0, data: data))))
        XCTAssertLessThanOrEqual(write.encode().count, FrameLimits.maxFrameSize)
        XCTAssertEqual(try Self.decodeAll(write.encode()), [write])

        let tooBig = Frame(requestID: 1, epoch: 1, body: .request(DataOp.Write.request(WriteRequest(volume: "v", generation: 1, offset: 0, data: data + Self.block))))
        assertFrameError(tooBig.encode(), .oversizedPayload, containing: "limit")
    }

    // MARK: Stream decoding

    func testDecodingByteByByteGivesTheSameFrames() throws {
        let frames = Self.everyOp
        let stream = frames.flatMap { $0.encode() }
        var d = FrameDecoder()
        var decoded: [Frame] = []
        for byte in stream {
            decoded += try d.feed([byte])
            XCTAssertLessThanOrEqual(d.bufferedByteCount, FrameLimits.maxFrameSize)
        }
        try d.finish()
        XCTAssertEqual(decoded, frames)
    }

    func testRandomChunkingsGiveTheSameFrames() throws {
        let frames = Self.everyOp
        let stream = frames.flatMap { $0.encode() }
        var rng = SplitMix64(seed: 0xC0FFEE)
        for _ in 0..<200 {
            var d = FrameDecoder()
            var decoded: [Frame] = []
            var i = 0
            while i < stream.count {
                let n = min(stream.count - i, Int(rng.next() % 9000) + 1)
                decoded += try d.feed(stream[i..<(i + n)])
                i += n
            }
            try d.finish()
            XCTAssertEqual(decoded, frames)
        }
    }

    func testPipelinedFramesWithInterleavedRequestIDsComeOutInStreamOrder() throws {
        let volume = "pvc-a"
        let requests: [Frame] = [
            Frame(requestID: 10, epoch: 4, body: .request(DataOp.Write.request(WriteRequest(volume: volume, generation: 1, offset: 0, data: Self.block)))),
            Frame(requestID: 11, epoch: 4, body: .request(DataOp.Read.request(ReadRequest(volume: volume, offset: 0, length: 4096)))),
            Frame(requestID: 12, epoch: 4, body: .request(DataOp.Flush.request(FlushRequest(volume: volume)))),
        ]
        // Responses complete out of order, interleaved with new requests on the same stream.
        let mixed: [Frame] = [
            Frame(requestID: 12, epoch: 4, body: .response(DataOp.Flush.response(FlushResponse(status: .ok, flushedGeneration: 1)))),
            Frame(requestID: 13, epoch: 4, body: .request(DataOp.Status.request(StatusRequest(volume: volume)))),
            Frame(requestID: 10, epoch: 4, body: .response(DataOp.Write.response(WriteResponse(status: .ok)))),
            Frame(requestID: 11, epoch: 4, body: .response(DataOp.Read.response(ReadResponse(status: .ok, data: Self.block)))),
            Frame(requestID: 13, epoch: 5, body: .response(DataOp.Status.response(StatusResponse(status: .staleEpoch, size: 0, replicaEpoch: 5, flushedGeneration: 1)))),
        ]
        let all = requests + mixed
        var d = FrameDecoder()
        let decoded = try d.feed(all.flatMap { $0.encode() })
        try d.finish()
        XCTAssertEqual(decoded, all)
        XCTAssertEqual(decoded.map(\.requestID), [10, 11, 12, 12, 13, 10, 11, 13])
        XCTAssertEqual(decoded.map(\.isResponse), [false, false, false, true, false, true, true, true])
        XCTAssertEqual(d.bufferedByteCount, 0)
    }

    func testAPartialFrameWaitsForTheRest() throws {
        let bytes = Self.everyOp[3].encode()
        var d = FrameDecoder()
        XCTAssertEqual(try d.feed(bytes[0..<31]), [])
        XCTAssertEqual(try d.feed(bytes[31..<40]), [])
        XCTAssertEqual(try d.feed(bytes[40...]), [Self.everyOp[3]])
        try d.finish()
    }

    // MARK: Malformed input

    func testBadMagicIsRejected() {
        var bytes = Self.everyOp[0].encode()
        bytes[0] = UInt8(ascii: "X")
        assertFrameError(bytes, .badMagic, containing: "magic")
        assertFrameError(Array("GET / HTTP/1.1\r\nHost: cairn\r\n\r\n".utf8), .badMagic)
        // A stranger is turned away after four bytes, without waiting for a whole header.
        var d = FrameDecoder()
        XCTAssertEqual(try d.feed(Array("CRN".utf8)), [])
        XCTAssertThrowsError(try d.feed(Array("X".utf8))) { error in
            XCTAssertEqual((error as? FrameError)?.kind, .badMagic)
        }
    }

    func testVersion2IsRejected() {
        let bytes = Self.rawFrame(version: 2, op: Opcode.flush.rawValue, payload: Self.volumeField(Array("v".utf8)))
        assertFrameError(bytes, .unsupportedVersion, containing: "version 2")
    }

    func testAFlippedHeaderBitFailsTheChecksum() {
        let good = Self.everyOp[4].encode()
        // Every bit after magic and version (which have their own, clearer errors).
        for bit in (6 * 8)..<(32 * 8) {
            var bytes = good
            bytes[bit / 8] ^= UInt8(1) << (bit % 8)
            assertFrameError(bytes, .headerChecksum, containing: "checksum")
        }
    }

    func testPayloadLength2To31IsRejectedFromTheHeaderAlone() throws {
        let header = Self.rawFrame(op: Opcode.write.rawValue, payloadLength: 1 << 31, payload: [])
        var d = FrameDecoder()
        XCTAssertThrowsError(try d.feed(header)) { error in
            XCTAssertEqual((error as? FrameError)?.kind, .oversizedPayload)
            XCTAssertTrue("\(error)".contains("2147483648"), "\(error)")
        }
        // Just over the limit is rejected too; the limit itself is only a length, not a frame.
        assertFrameError(Self.rawFrame(op: 4, payloadLength: UInt32(FrameLimits.maxPayloadLength + 1), payload: []), .oversizedPayload)
    }

    func testTruncatedPayloadThenEOFIsAnError() throws {
        let bytes = Self.everyOp[3].encode()
        var d = FrameDecoder()
        XCTAssertEqual(try d.feed(bytes.dropLast(100)), [])
        XCTAssertThrowsError(try d.finish()) { error in
            XCTAssertEqual((error as? FrameError)?.kind, .truncated)
            XCTAssertTrue("\(error)".contains("payload"), "\(error)")
        }
        // Sticky: the stream is dead.
        XCTAssertThrowsError(try d.feed(bytes.suffix(100)))
    }

    func testTruncatedHeaderThenEOFIsAnError() throws {
        var d = FrameDecoder()
        XCTAssertEqual(try d.feed(Self.everyOp[0].encode().prefix(10)), [])
        XCTAssertThrowsError(try d.finish()) { error in
            XCTAssertEqual((error as? FrameError)?.kind, .truncated)
            XCTAssertTrue("\(error)".contains("header"), "\(error)")
        }
        // A clean EOF between frames is fine.
        var clean = FrameDecoder()
        _ = try clean.feed(Self.everyOp[0].encode())
        XCTAssertNoThrow(try clean.finish())
    }

    func testAWriteWhoseDataIsNotAMultipleOf4096IsRejected() {
        for count in [1, 512, 4095, 4097, 8191] {
            let frame = Frame(requestID: 1, epoch: 1, body: .request(DataOp.Write.request(WriteRequest(volume: "v", generation: 1, offset: 0, data: [UInt8](repeating: 1, count: count)))))
            assertFrameError(frame.encode(), .malformedPayload, containing: "multiple of 4096")
        }
        let empty = Frame(requestID: 1, epoch: 1, body: .request(DataOp.Write.request(WriteRequest(volume: "v", generation: 1, offset: 0, data: []))))
        assertFrameError(empty.encode(), .malformedPayload)
    }

    func testUnalignedOrWrappingRangesAreRejected() {
        let bad: [FrameMessage] = [
            DataOp.Write.request(WriteRequest(volume: "v", generation: 1, offset: 512, data: Self.block)),
            DataOp.Write.request(WriteRequest(volume: "v", generation: 0, offset: 0, data: Self.block)),
            DataOp.Write.request(WriteRequest(volume: "v", generation: 1, offset: UInt64.max - 4095, data: Self.block)),
            DataOp.Read.request(ReadRequest(volume: "v", offset: 4096, length: 100)),
            DataOp.Read.request(ReadRequest(volume: "v", offset: 1, length: 4096)),
            DataOp.Read.request(ReadRequest(volume: "v", offset: 0, length: 0)),
            DataOp.Read.request(ReadRequest(volume: "v", offset: 0, length: UInt32(FrameLimits.maxDataLength + 4096))),
            DataOp.Read.request(ReadRequest(volume: "v", offset: UInt64.max - 4095, length: 4096)),
            DataOp.Trim.request(TrimRequest(volume: "v", offset: 0, length: 4097)),
            DataOp.Trim.request(TrimRequest(volume: "v", offset: 1 << 63, length: 1 << 63)),
        ]
        for request in bad {
            assertFrameError(Frame(requestID: 1, epoch: 1, body: .request(request)).encode(), .malformedPayload)
        }
    }

    func testAVolumeIDLongerThan128BytesIsRejected() {
        let frame = Frame(requestID: 1, epoch: 1, body: .request(DataOp.Claim.request(ClaimRequest(volume: String(repeating: "a", count: 129)))))
        assertFrameError(frame.encode(), .malformedPayload, containing: "volume id is 129 bytes")
        let empty = Frame(requestID: 1, epoch: 1, body: .request(DataOp.Status.request(StatusRequest(volume: ""))))
        assertFrameError(empty.encode(), .malformedPayload, containing: "volume id")
        // A length that claims more bytes than the payload has.
        assertFrameError(Self.rawFrame(op: Opcode.flush.rawValue, payload: [100, 0, 65, 65]), .malformedPayload, containing: "ends inside")
    }

    func testAVolumeIDThatIsNotUTF8IsRejected() {
        for raw: [UInt8] in [[0xFF], [0x61, 0xC3], [0xED, 0xA0, 0x80], [0xC0, 0xAF]] {
            let bytes = Self.rawFrame(op: Opcode.flush.rawValue, payload: Self.volumeField(raw))
            assertFrameError(bytes, .malformedPayload, containing: "UTF-8")
        }
    }

    func testAFlushCarriesItsThroughGenerationOnlyWhenGiven() throws {
        let plain = FlushRequest(volume: "pvc-1").encode()
        XCTAssertEqual(plain, VolumeRequest(volume: "pvc-1").encode(), "without it, the earlier versions' request byte for byte")
        XCTAssertNil(try FlushRequest(decoding: plain).through)
        let through = FlushRequest(volume: "pvc-1", through: 1 << 44 | 77)
        XCTAssertEqual(through.encode().count, plain.count + 8)
        XCTAssertEqual(try FlushRequest(decoding: through.encode()).through, 1 << 44 | 77)
    }

    func testUnknownOpcodeFlagsStatusAndTrailingBytesAreRejected() {
        let volume = Self.volumeField(Array("v".utf8))
        assertFrameError(Self.rawFrame(op: 0, payload: volume), .unknownOpcode)
        assertFrameError(Self.rawFrame(op: 200, payload: volume), .unknownOpcode)
        assertFrameError(Self.rawFrame(op: Opcode.flush.rawValue, flags: 0x80, payload: volume), .reservedFlags)
        assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: 1, payload: [99]), .malformedPayload, containing: "status")
        assertFrameError(Self.rawFrame(op: Opcode.status.rawValue, payload: volume + [0]), .malformedPayload, containing: "unexpected")
        // A flush's optional through generation is 8 bytes or nothing, and nothing after it.
        assertFrameError(Self.rawFrame(op: Opcode.flush.rawValue, payload: volume + [0]), .malformedPayload, containing: "ends inside")
        assertFrameError(Self.rawFrame(op: Opcode.flush.rawValue, payload: volume + [UInt8](repeating: 0, count: 9)), .malformedPayload, containing: "unexpected")
        // A failed read carries no data.
        assertFrameError(Self.rawFrame(op: Opcode.read.rawValue, flags: 1, payload: [ReplyStatus.ioError.rawValue] + Self.le(UInt32(4096)) + Self.block + [0, 0]), .malformedPayload, containing: "carries")
        // An oversized auth token.
        assertFrameError(Self.rawFrame(op: Opcode.hello.rawValue, payload: Self.le(UInt16(1)) + Self.le(UInt16(129)) + [UInt8](repeating: 0, count: 129)), .malformedPayload, containing: "auth token")
    }

    func testCreateSizeMustBeAPositiveMultipleOf4096() {
        for size: UInt64 in [0, 4095, 4097] {
            let frame = Frame(requestID: 1, epoch: 0, body: .request(DataOp.Create.request(CreateRequest(volume: "v", size: size))))
            assertFrameError(frame.encode(), .malformedPayload, containing: "size \(size) is not a positive multiple of 4096 (create request")
        }
    }

    func testResponseMessagesAreBoundedAndUTF8() throws {
        let tooLong = Self.rawFrame(op: Opcode.delete.rawValue, flags: 1, payload: [0] + Self.le(UInt16(1025)) + [UInt8](repeating: 65, count: 1025))
        assertFrameError(tooLong, .malformedPayload, containing: "message is 1025 bytes")
        let notUTF8 = Self.rawFrame(op: Opcode.delete.rawValue, flags: 1, payload: [0] + Self.le(UInt16(2)) + [0xC3, 0x28])
        assertFrameError(notUTF8, .malformedPayload, containing: "message is not valid UTF-8")
        // The sender cuts a long message on a character boundary, so it still decodes.
        let long = String(repeating: "é", count: 700)  // 1400 bytes
        let frame = Frame(requestID: 1, epoch: 0, body: .response(DataOp.Write.response(WriteResponse(status: .ioError, message: long))))
        let decoded = try Self.decodeAll(frame.encode())
        guard let m = decoded.first?.response(DataOp.Write.self) else { return XCTFail("decoded \(decoded)") }
        XCTAssertEqual(m.message, String(repeating: "é", count: 512))
    }

    func testTheHotPathWriteEncoderMatchesTheGenericOne() throws {
        let data = Self.block + Self.block
        let generic = Frame(requestID: 77, epoch: 9, body: .request(DataOp.Write.request(WriteRequest(volume: "vol-1", generation: 5, offset: 8192, data: data)))).encode()
        let fast = data.withUnsafeBytes {
            WriteRequest.encodeFrame(requestID: 77, epoch: 9, volume: "vol-1", generation: 5, offset: 8192, data: $0)
        }
        XCTAssertEqual(fast, generic)
    }

    func testTheHotPathEncoderCarriesTheIfNewerFlag() throws {
        let data = Self.block
        let generic = Frame(requestID: 78, epoch: 9, body: .request(DataOp.Write.request(WriteRequest(volume: "vol-1", generation: 5, offset: 0, data: data, ifNewer: true)))).encode()
        let fast = data.withUnsafeBytes {
            WriteRequest.encodeFrame(requestID: 78, epoch: 9, volume: "vol-1", generation: 5, offset: 0, data: $0, ifNewer: true)
        }
        XCTAssertEqual(fast, generic)
        XCTAssertEqual(fast[7], FrameFlags.ifNewer)
        // The flag lives in the header only: the payload is a plain write's.
        let plain = Frame(requestID: 78, epoch: 9, body: .request(DataOp.Write.request(WriteRequest(volume: "vol-1", generation: 5, offset: 0, data: data)))).encode()
        XCTAssertEqual(Array(fast[32...]), Array(plain[32...]))
        guard let decoded = try Self.decodeAll(fast).first?.request(DataOp.Write.self) else { return XCTFail("not a write") }
        XCTAssertTrue(decoded.ifNewer)
    }

    func testTheRepairFlagIsOnlyValidOnAWriteRequestWithoutIfNewer() {
        let volume = Self.volumeField(Array("v".utf8))
        assertFrameError(Self.rawFrame(op: Opcode.trim.rawValue, flags: FrameFlags.repair, payload: volume), .reservedFlags, containing: "repair")
        let write = WriteRequest(volume: "v", generation: 3, offset: 0, data: [UInt8](repeating: 1, count: 4096))
        let payload = write.encode()
        assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.repair | FrameFlags.ifNewer, payload: payload),
                         .reservedFlags, containing: "repair")
        assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.repair | FrameFlags.response, payload: [0, 0, 0, 0, 0, 0, 0]),
                         .reservedFlags, containing: "repair")
        let fast = [UInt8](repeating: 1, count: 4096).withUnsafeBytes {
            WriteRequest.encodeFrame(requestID: 1, epoch: 2, volume: "v", generation: 3, offset: 0, data: $0, repair: true)
        }
        guard let decoded = (try? Self.decodeAll(fast))?.first?.request(DataOp.Write.self) else { return XCTFail("not a write") }
        XCTAssertTrue(decoded.repair)
        XCTAssertFalse(decoded.ifNewer)
    }

    func testTheDurableFlagIsOnlyValidOnAPlainWriteAndItsOKResponse() throws {
        let data = Self.block
        let fast = data.withUnsafeBytes {
            WriteRequest.encodeFrame(requestID: 3, epoch: 4, volume: "v", generation: 5, offset: 0, data: $0, durable: true)
        }
        let generic = Frame(requestID: 3, epoch: 4, body: .request(DataOp.Write.request(
            WriteRequest(volume: "v", generation: 5, offset: 0, data: data, durable: true)))).encode()
        XCTAssertEqual(fast, generic)
        XCTAssertEqual(fast[7], FrameFlags.durable)
        guard let decoded = try Self.decodeAll(fast).first?.request(DataOp.Write.self) else { return XCTFail("not a write") }
        XCTAssertTrue(decoded.durable)
        XCTAssertFalse(decoded.ifNewer || decoded.repair)
        let payload = WriteRequest(volume: "v", generation: 3, offset: 0, data: [UInt8](repeating: 1, count: 4096)).encode()
        for flags in [FrameFlags.durable | FrameFlags.ifNewer, FrameFlags.durable | FrameFlags.repair] {
            assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: flags, payload: payload), .reservedFlags, containing: "durable")
        }
        assertFrameError(Self.rawFrame(op: Opcode.flush.rawValue, flags: FrameFlags.durable, payload: Self.volumeField(Array("v".utf8))),
                         .reservedFlags, containing: "durable")
        assertFrameError(Self.rawFrame(op: Opcode.trim.rawValue, flags: FrameFlags.durable | FrameFlags.response, payload: [0, 0, 0]),
                         .reservedFlags, containing: "durable")
        // The response: durable only with ok.
        let ok = Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.response | FrameFlags.durable, payload: [0, 0, 0])
        XCTAssertEqual(try? Self.decodeAll(ok).first?.body, .response(DataOp.Write.response(WriteResponse(status: .ok, durable: true))))
        let encoded = Frame(requestID: 1, epoch: 0, body: .response(DataOp.Write.response(WriteResponse(status: .ok, durable: true)))).encode()
        XCTAssertEqual(encoded[7], FrameFlags.response | FrameFlags.durable)
        assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.response | FrameFlags.durable,
                                       payload: [ReplyStatus.ioError.rawValue, 0, 0]), .malformedPayload, containing: "durable")
    }

    func testTheIfNewerFlagIsOnlyValidOnWrite() {
        let volume = Self.volumeField(Array("v".utf8))
        assertFrameError(Self.rawFrame(op: Opcode.flush.rawValue, flags: FrameFlags.ifNewer, payload: volume), .reservedFlags, containing: "only valid on write and trim")
        assertFrameError(Self.rawFrame(op: Opcode.generations.rawValue, flags: FrameFlags.ifNewer | FrameFlags.response, payload: [0, 0, 0, 0, 0, 0, 0]),
                         .reservedFlags, containing: "only valid on write and trim")
        // A conditional write's response carries the applied count; a plain one does not.
        let conditional = Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.response | FrameFlags.ifNewer, payload: [0] + Self.le(UInt32(2)) + [0, 0])
        XCTAssertEqual(try? Self.decodeAll(conditional).first?.body, .response(DataOp.Write.response(WriteResponse(status: .ok, appliedBlocks: 2))))
        assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.response, payload: [0] + Self.le(UInt32(2)) + [0, 0]), .malformedPayload)
    }

    func testSnapshotOpsRejectMalformedPayloadsAndTheBarrierFlagElsewhere() throws {
        let volume = Self.volumeField(Array("v".utf8))
        // The barrier flag belongs to snapshot only.
        assertFrameError(Self.rawFrame(op: Opcode.deleteSnapshot.rawValue, flags: FrameFlags.barrier, payload: volume + Self.volumeField([0x73])),
                         .reservedFlags, containing: "barrier")
        assertFrameError(Self.rawFrame(op: Opcode.write.rawValue, flags: FrameFlags.barrier, payload: volume), .reservedFlags, containing: "barrier")
        let barrier = Self.rawFrame(op: Opcode.snapshot.rawValue, flags: FrameFlags.barrier, payload: volume + Self.volumeField([0x73]))
        XCTAssertEqual(try Self.decodeAll(barrier).first?.body, .request(DataOp.Snapshot.request(SnapshotRequest(volume: "v", snapshotID: "s", barrier: true))))
        // Snapshot ids: 1...128 bytes of UTF-8, nothing after them.
        assertFrameError(Self.rawFrame(op: Opcode.snapshot.rawValue, payload: volume + Self.volumeField([])), .malformedPayload, containing: "snapshot id")
        assertFrameError(Self.rawFrame(op: Opcode.snapshot.rawValue, payload: volume + Self.volumeField([UInt8](repeating: 0x61, count: 129))),
                         .malformedPayload, containing: "snapshot id")
        assertFrameError(Self.rawFrame(op: Opcode.deleteSnapshot.rawValue, payload: volume + Self.volumeField([0xFF, 0xFE])),
                         .malformedPayload, containing: "UTF-8")
        assertFrameError(Self.rawFrame(op: Opcode.snapshot.rawValue, payload: volume + Self.volumeField([0x73]) + [0]),
                         .malformedPayload, containing: "unexpected")
        assertFrameError(Self.rawFrame(op: Opcode.snapshot.rawValue, payload: volume), .malformedPayload, containing: "snapshot id")
        // Clone and grow sizes are positive multiples of 4096.
        let clone = volume + Self.volumeField([0x77]) + Self.volumeField([0x73])
        assertFrameError(Self.rawFrame(op: Opcode.clone.rawValue, payload: clone + Self.le(UInt64(4097))), .malformedPayload, containing: "clone size")
        assertFrameError(Self.rawFrame(op: Opcode.clone.rawValue, payload: clone + Self.le(UInt64(0))), .malformedPayload, containing: "clone size")
        assertFrameError(Self.rawFrame(op: Opcode.clone.rawValue, payload: clone), .malformedPayload)
        assertFrameError(Self.rawFrame(op: Opcode.grow.rawValue, payload: volume + Self.le(UInt64(100))), .malformedPayload, containing: "(grow request")
        // A hold lasts 1 ms to 10 minutes: a coordinator cannot freeze a volume for longer.
        assertFrameError(Self.rawFrame(op: Opcode.holdWrites.rawValue, payload: volume + Self.le(UInt32(0))), .malformedPayload, containing: "hold timeout")
        assertFrameError(Self.rawFrame(op: Opcode.holdWrites.rawValue, payload: volume + Self.le(UInt32(600_001))), .malformedPayload, containing: "hold timeout")
        assertFrameError(Self.rawFrame(op: Opcode.holdWrites.rawValue, flags: FrameFlags.barrier, payload: volume + Self.le(UInt32(5))), .reservedFlags)
        // Responses: bounded node and snapshot counts; a failure carries no entries.
        let ok = [ReplyStatus.ok.rawValue]
        assertFrameError(Self.rawFrame(op: Opcode.snapshot.rawValue, flags: FrameFlags.response,
                                       payload: ok + Self.le(UInt64(0)) + Self.le(UInt64(0)) + Self.le(UInt16(65)) + [0, 0]),
                         .malformedPayload, containing: "nodes")
        assertFrameError(Self.rawFrame(op: Opcode.snapshot.rawValue, flags: FrameFlags.response,
                                       payload: ok + Self.le(UInt64(0)) + Self.le(UInt64(0)) + Self.le(UInt16(2)) + Self.volumeField([0x6E]) + [0, 0]),
                         .malformedPayload, containing: "node id")
        assertFrameError(Self.rawFrame(op: Opcode.listSnapshots.rawValue, flags: FrameFlags.response, payload: ok + Self.le(UInt16(513)) + [0, 0]),
                         .malformedPayload, containing: "limit")
        let entry = Self.volumeField([0x61]) + Self.le(UInt64(4096)) + Self.le(UInt64(1))
        assertFrameError(Self.rawFrame(op: Opcode.listSnapshots.rawValue, flags: FrameFlags.response,
                                       payload: [ReplyStatus.ioError.rawValue] + Self.le(UInt16(1)) + entry + [0, 0]),
                         .malformedPayload, containing: "carries")
        assertFrameError(Self.rawFrame(op: Opcode.listSnapshots.rawValue, flags: FrameFlags.response,
                                       payload: ok + Self.le(UInt16(1)) + Array(entry.dropLast(3))), .malformedPayload)
    }

    func testGenerationsPayloadLayoutAndLimits() throws {
        let request = GenerationsRequest(volume: "v", firstBlock: 0x0102, count: 3)
        XCTAssertEqual(request.encode(), Self.volumeField([0x76]) + Self.le(UInt64(0x0102)) + Self.le(UInt32(3)))
        // The count is the replica's to refuse (an answer, not a closed connection).
        XCTAssertEqual(try GenerationsRequest(decoding: GenerationsRequest(volume: "v", firstBlock: 0, count: 0).encode()).count, 0)
        XCTAssertThrowsError(try GenerationsRequest(decoding: request.encode() + [0]))

        let response = GenerationsResponse(status: .ok, generations: [5, 6 | BlockGenerations.trimmedBit])
        XCTAssertEqual(response.encode(), [0] + Self.le(UInt32(2)) + Self.le(UInt64(5)) + Self.le(6 | BlockGenerations.trimmedBit) + [0, 0])
        XCTAssertEqual(BlockGenerations.generation(response.generations[1]), 6)
        XCTAssertTrue(BlockGenerations.isTrimmed(response.generations[1]))
        XCTAssertFalse(BlockGenerations.isTrimmed(response.generations[0]))
        // A lying count, too many generations, or generations with a failure status are malformed.
        XCTAssertThrowsError(try GenerationsResponse(decoding: [0] + Self.le(UInt32(3)) + Self.le(UInt64(5)) + [0, 0]))
        XCTAssertThrowsError(try GenerationsResponse(decoding: [0] + Self.le(UInt32(65_537)) + [0, 0]))
        XCTAssertThrowsError(try GenerationsResponse(decoding: [ReplyStatus.ioError.rawValue] + Self.le(UInt32(1)) + Self.le(UInt64(5)) + [0, 0])) { error in
            XCTAssertTrue((error as? FrameError)?.reason.contains("carries") ?? false, "\(error)")
        }
        let largest = GenerationsResponse(status: .ok, generations: [UInt64](repeating: .max, count: FrameLimits.maxGenerationsCount))
        let frame = Frame(requestID: 1, epoch: 1, body: .response(DataOp.Generations.response(largest)))
        XCTAssertLessThanOrEqual(frame.encode().count, FrameLimits.maxFrameSize)
        XCTAssertEqual(try Self.decodeAll(frame.encode()), [frame])
    }

    func testSnapshotReadAndSnapshotGenerationsRequestsRoundTripAndRefuseMalformedPayloads() throws {
        XCTAssertEqual(Opcode.snapshotRead.rawValue, 21)
        XCTAssertEqual(Opcode.snapshotGenerations.rawValue, 22)
        XCTAssertTrue(DataOp.SnapshotRead.Response.self == ReadResponse.self)
        XCTAssertTrue(DataOp.SnapshotGenerations.Response.self == GenerationsResponse.self)
        let volume = Self.volumeField(Array("v".utf8)), snap = Self.volumeField(Array("s1".utf8))

        // Layout: volume | snapshot id | offset u64 | length u32, and both round-trip as frames.
        let read = SnapshotReadRequest(volume: "v", snapshotID: "s1", offset: 8192, length: 4096)
        XCTAssertEqual(read.encode(), volume + snap + Self.le(UInt64(8192)) + Self.le(UInt32(4096)))
        let generations = SnapshotGenerationsRequest(volume: "v", snapshotID: "s1", firstBlock: 0x0102, count: 3)
        XCTAssertEqual(generations.encode(), volume + snap + Self.le(UInt64(0x0102)) + Self.le(UInt32(3)))
        let frames = [Frame(requestID: 9, epoch: 0, body: .request(DataOp.SnapshotRead.request(read))),
                      Frame(requestID: 10, epoch: 0, body: .request(DataOp.SnapshotGenerations.request(generations)))]
        XCTAssertEqual(try Self.decodeAll(frames.flatMap { $0.encode() }), frames)
        XCTAssertEqual(try Self.decodeAll(frames[0].encode()).first?.request(DataOp.SnapshotRead.self), read)
        XCTAssertEqual(try Self.decodeAll(frames[1].encode()).first?.request(DataOp.SnapshotGenerations.self), generations)
        // A generations count is the replica's to refuse (an answer), like `generations`'.
        XCTAssertEqual(try SnapshotGenerationsRequest(decoding: volume + snap + Self.le(UInt64(0)) + Self.le(UInt32(0))).count, 0)

        let readOp = Opcode.snapshotRead.rawValue, generationsOp = Opcode.snapshotGenerations.rawValue
        // Reads: whole blocks, at most 8 MiB, no wrap.
        assertFrameError(Self.rawFrame(op: readOp, payload: volume + snap + Self.le(UInt64(100)) + Self.le(UInt32(4096))),
                         .malformedPayload, containing: "snapshot read offset")
        assertFrameError(Self.rawFrame(op: readOp, payload: volume + snap + Self.le(UInt64(0)) + Self.le(UInt32(0))),
                         .malformedPayload, containing: "snapshot read length")
        assertFrameError(Self.rawFrame(op: readOp, payload: volume + snap + Self.le(UInt64(0)) + Self.le(UInt32(FrameLimits.maxDataLength + 4096))),
                         .malformedPayload, containing: "exceeds the limit")
        assertFrameError(Self.rawFrame(op: readOp, payload: volume + snap + Self.le(UInt64.max - 4095) + Self.le(UInt32(8192))),
                         .malformedPayload, containing: "overflows")
        // The snapshot id is required, 1...128 bytes of UTF-8; nothing may follow, nothing may be missing.
        for op in [readOp, generationsOp] {
            let tail = Self.le(UInt64(0)) + Self.le(UInt32(4096))
            assertFrameError(Self.rawFrame(op: op, payload: volume + tail), .malformedPayload)
            assertFrameError(Self.rawFrame(op: op, payload: volume + Self.volumeField([]) + tail), .malformedPayload, containing: "snapshot id")
            assertFrameError(Self.rawFrame(op: op, payload: volume + Self.volumeField([UInt8](repeating: 0x61, count: 129)) + tail),
                             .malformedPayload, containing: "snapshot id")
            assertFrameError(Self.rawFrame(op: op, payload: volume + Self.volumeField([0xFF, 0xFE]) + tail), .malformedPayload, containing: "UTF-8")
            assertFrameError(Self.rawFrame(op: op, payload: volume + snap + tail + [0]), .malformedPayload, containing: "unexpected")
            assertFrameError(Self.rawFrame(op: op, payload: volume + snap + Array(tail.dropLast())), .malformedPayload)
            // Neither takes a flag.
            assertFrameError(Self.rawFrame(op: op, flags: FrameFlags.barrier, payload: volume + snap + tail), .reservedFlags)
            assertFrameError(Self.rawFrame(op: op, flags: FrameFlags.ifNewer, payload: volume + snap + tail), .reservedFlags)
        }
        // Their responses are read's and generations': data or generations only with ok.
        assertFrameError(Self.rawFrame(op: readOp, flags: FrameFlags.response,
                                       payload: [ReplyStatus.notFound.rawValue] + Self.le(UInt32(4096)) + Self.block + [0, 0]),
                         .malformedPayload, containing: "carries")
        assertFrameError(Self.rawFrame(op: generationsOp, flags: FrameFlags.response,
                                       payload: [ReplyStatus.notFound.rawValue] + Self.le(UInt32(1)) + Self.le(UInt64(5)) + [0, 0]),
                         .malformedPayload, containing: "carries")
    }

    func testTheFirstErrorIsSticky() throws {
        var d = FrameDecoder()
        XCTAssertThrowsError(try d.feed([0, 0, 0, 0] + [UInt8](repeating: 0, count: 28)))
        XCTAssertThrowsError(try d.feed(Self.everyOp[0].encode())) { error in
            XCTAssertEqual((error as? FrameError)?.kind, .badMagic)
        }
        XCTAssertThrowsError(try d.finish())
    }

    /// Found by the `frames` fuzz target (fuzz/corpus/frames/crash-activity-all-with-regions): an
    /// activity response saying "all" and listing regions decoded into a value no peer can send,
    /// which changed in a round trip. It is malformed.
    func testAnActivityResponseThatSaysAllAndListsRegionsIsMalformed() throws {
        let input = try Data(contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("fuzz/corpus/frames/crash-activity-all-with-regions"))
        // The fuzz input's first byte is the harness's mode (the whole stream at once); the rest is the stream.
        assertFrameError([UInt8](input.dropFirst()), .malformedPayload, containing: "says 'all' and also lists 3 regions")
        let listed = ActivityResponse(status: .ok, activity: ReplicaActivity(all: false, regions: [3, 9]))
        XCTAssertEqual(try ActivityResponse(decoding: listed.encode()), listed)
        XCTAssertEqual(try ActivityResponse(decoding: ActivityResponse(status: .ok).encode()).activity, .unknown)
    }

    func testPayloadErrorsNameTheRequestID() {
        let frame = Frame(requestID: 77, epoch: 1, body: .request(DataOp.Write.request(WriteRequest(volume: "v", generation: 1, offset: 0, data: [1]))))
        assertFrameError(frame.encode(), .malformedPayload, containing: "request id 77")
    }

    // MARK: Fuzz

    /// Random mutations of valid frames: the decoder throws or decodes, never traps, and never
    /// holds more than one maximal frame beyond the chunk being fed.
    func testRandomMutationsThrowOrDecodeAndNeverTrap() throws {
        let seeds = Self.everyOp.map { $0.encode() } + [
            Frame(requestID: 3, epoch: 3, body: .request(DataOp.Read.request(ReadRequest(volume: "r", offset: 0, length: 4096)))).encode(),
        ]
        var rng = SplitMix64(seed: 0x5EED_CA12)
        let deadline = Date().addingTimeInterval(30)
        var iterations = 0, decodedCount = 0, errorCount = 0
        while iterations < 20_000, Date() < deadline {
            iterations += 1
            var bytes = seeds[Int(rng.next() % UInt64(seeds.count))]
            if rng.next() % 4 == 0 { bytes += seeds[Int(rng.next() % UInt64(seeds.count))] }
            let mutations = Int(rng.next() % 4) + 1
            for _ in 0..<mutations {
                guard !bytes.isEmpty else { break }
                let i = Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 7 {
                case 0: bytes[i] ^= UInt8(1) << (rng.next() % 8)
                case 1: bytes[i] = UInt8(truncatingIfNeeded: rng.next())
                case 2: bytes.removeSubrange(i...)
                case 3: bytes.insert(contentsOf: (0..<(rng.next() % 8)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: i)
                case 4: bytes.removeSubrange(i..<min(bytes.count, i + Int(rng.next() % 16) + 1))
                case 5:
                    // Mutate inside the payload and keep the header valid, to reach the payload parsers.
                    if bytes.count > 32 {
                        let j = 32 + Int(rng.next() % UInt64(bytes.count - 32))
                        bytes[j] = [0x00, 0xFF, 0x80, 0x7F, UInt8(truncatingIfNeeded: rng.next())][Int(rng.next() % 5)]
                    }
                default:
                    // Lie about the payload length with a valid checksum.
                    if bytes.count >= 32 {
                        let lengths: [UInt32] = [0, 1, 31, 4096, UInt32(FrameLimits.maxPayloadLength), 1 << 31, .max, UInt32(truncatingIfNeeded: rng.next())]
                        let n = lengths[Int(rng.next() % UInt64(lengths.count))]
                        bytes.replaceSubrange(16..<20, with: Self.le(n))
                        bytes.replaceSubrange(28..<32, with: Self.le(CRC32C.checksum(Array(bytes[0..<28]))))
                    }
                }
            }
            var d = FrameDecoder()
            do throws(FrameError) {
                var i = 0
                while i < bytes.count {
                    let n = min(bytes.count - i, Int(rng.next() % 64) + 1)
                    let frames = try d.feed(bytes[i..<(i + n)])
                    decodedCount += frames.count
                    XCTAssertLessThanOrEqual(d.bufferedByteCount, FrameLimits.maxFrameSize + n)
                    i += n
                }
                try d.finish()
            } catch {
                errorCount += 1
                XCTAssertFalse(error.reason.isEmpty)
            }
        }
        XCTAssertGreaterThan(iterations, 1000)
        XCTAssertGreaterThan(errorCount, 0)
        XCTAssertGreaterThan(decodedCount, 0)
    }

    /// A write's data is decoded once into 4 KiB-aligned memory of its own (the store writes it
    /// with O_DIRECT as it is), whether its frame came whole in one chunk (decoded in place) or
    /// in pieces (through the decoder's buffer), and next to other frames and a partial one.
    func testWriteDataIsDecodedIntoAlignedMemoryWholeOrInPieces() throws {
        func frame(_ id: UInt64, _ count: Int) -> ([UInt8], [UInt8]) {
            let data = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(id)) }
            let bytes = data.withUnsafeBytes {
                WriteRequest.encodeFrame(requestID: id, epoch: 2, volume: "vol-a", generation: id, offset: 4096, data: $0)
            }
            return (bytes, data)
        }
        let big = frame(1, 1 << 20), small = frame(2, 4096), third = frame(3, 8192)
        let stream = big.0 + small.0 + third.0
        // Cuts: all at once; the third frame split; byte pieces of 7; the first split at its header.
        for cuts in [[stream.count], [big.0.count + small.0.count + 100, stream.count],
                     Array(stride(from: 7, to: stream.count, by: 7)) + [stream.count], [20, stream.count]] {
            var decoder = FrameDecoder()
            var frames: [Frame] = []
            var at = 0
            for cut in cuts {
                frames += try stream[at..<cut].withUnsafeBytes { try decoder.feed($0) }
                at = cut
            }
            try decoder.finish()
            XCTAssertEqual(frames.map(\.requestID), [1, 2, 3], "cuts \(cuts.prefix(3))")
            for (frame, expected) in zip(frames, [big.1, small.1, third.1]) {
                let m = try XCTUnwrap(frame.request(DataOp.Write.self))
                XCTAssertTrue(m.data == expected, "request \(frame.requestID)'s data")
                m.data.withUnsafeBytes { XCTAssertEqual(Int(bitPattern: $0.baseAddress) % 4096, 0, "request \(frame.requestID)'s data is aligned") }
            }
        }
        // A large buffer goes back to the pool and comes out again for the next large write.
        let a = BlockData(big.1)
        let address = a.withUnsafeBytes { Int(bitPattern: $0.baseAddress) }
        _ = consume a
        let b = BlockData(big.1)
        XCTAssertEqual(b.withUnsafeBytes { Int(bitPattern: $0.baseAddress) }, address, "the freed 1 MiB buffer was reused")
        XCTAssertTrue(b == big.1)
    }
}

/// A small seeded generator, so a failing fuzz case reproduces.
private struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE5_E9B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
