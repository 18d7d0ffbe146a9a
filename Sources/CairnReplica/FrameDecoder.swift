/// Turns a TCP byte stream into `Frame`s, whatever the chunking: feed bytes as they arrive
/// (one at a time or many frames at once) and take the complete frames.
///
/// The header is validated as soon as its 32 bytes are in, so an oversized or garbage frame is
/// rejected before its payload is buffered: the decoder never holds more than one maximal frame
/// (`FrameLimits.maxFrameSize`) plus the bytes of the chunk being fed. Lengths from the wire
/// never size an allocation on their own.
///
/// The first error is final: the stream has lost framing, so every later call throws the same
/// `FrameError` and the connection should be closed with "closing connection: \(error.reason)".
/// At EOF call `finish()`: bytes left inside a frame are a `truncated` error.
public struct FrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    /// Bytes of `buffer` before this index are consumed.
    private var start = 0
    private var pendingHeader: FrameHeader?
    private var failure: FrameError?

    public init() {}

    /// Bytes held that are not yet part of a returned frame.
    public var bufferedByteCount: Int { buffer.count - start }

    /// Appends `bytes` and returns every frame they complete, in stream order.
    public mutating func feed(_ bytes: some Collection<UInt8>) throws(FrameError) -> [Frame] {
        if let failure { throw failure }
        compact()
        if bufferedByteCount == 0, pendingHeader == nil,
           let direct = bytes.withContiguousStorageIfAvailable({ chunk in
               Result { () throws(FrameError) -> [Frame] in try feedDirect(UnsafeRawBufferPointer(chunk)) }
           }) {
            return try direct.get()
        }
        buffer.append(contentsOf: bytes)
        var frames: [Frame] = []
        while let frame = try next() {
            frames.append(frame)
        }
        compact()
        return frames
    }

    /// `feed` with nothing held: the whole frames of `chunk` are decoded from it in place (a
    /// write's data is copied once, into its aligned `BlockData`, instead of into this buffer
    /// first); only a partial frame at its end is kept.
    private mutating func feedDirect(_ chunk: UnsafeRawBufferPointer) throws(FrameError) -> [Frame] {
        var frames: [Frame] = []
        var at = 0
        do throws(FrameError) {
            while chunk.count - at >= FrameLimits.headerSize {
                let header = try FrameHeader(decoding: UnsafeRawBufferPointer(rebasing: chunk[at..<(at + FrameLimits.headerSize)]))
                let total = FrameLimits.headerSize + Int(header.payloadLength)
                guard chunk.count - at >= total else { break }
                let payload = UnsafeRawBufferPointer(rebasing: chunk[(at + FrameLimits.headerSize)..<(at + total)])
                frames.append(try Frame(header: header, payload: payload))
                at += total
            }
        } catch {
            failure = error
            throw error
        }
        if at < chunk.count {
            // The partial frame waits here; its header (when in) is checked now, as `feed` does.
            buffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: chunk[at...]))
            while let frame = try next() { frames.append(frame) }
        }
        return frames
    }

    /// Call at EOF: throws if the stream stopped inside a frame.
    public mutating func finish() throws(FrameError) {
        if let failure { throw failure }
        let left = bufferedByteCount
        guard left == 0 else {
            let error: FrameError
            if let header = pendingHeader {
                error = FrameError(.truncated, "stream ended inside the payload of \(header.opcode) request id \(header.requestID) (\(left - FrameLimits.headerSize) of \(header.payloadLength) bytes)")
            } else {
                error = FrameError(.truncated, "stream ended inside a frame header (\(left) of \(FrameLimits.headerSize) bytes)")
            }
            failure = error
            throw error
        }
    }

    private mutating func next() throws(FrameError) -> Frame? {
        do throws(FrameError) {
            let available = buffer.count - start
            let header: FrameHeader
            if let pendingHeader {
                header = pendingHeader
            } else {
                guard available >= FrameLimits.headerSize else {
                    // Reject a stranger (an HTTP probe, a port scanner) as soon as the magic is in.
                    if available >= 4 {
                        try FrameHeader.checkMagic(buffer[start..<(start + 4)])
                    }
                    return nil
                }
                header = try FrameHeader(decoding: buffer[start..<(start + FrameLimits.headerSize)])
                pendingHeader = header
            }
            // Bounded by FrameLimits.maxFrameSize: the header check rejected anything larger.
            let total = FrameLimits.headerSize + Int(header.payloadLength)
            guard available >= total else { return nil }
            let payloadStart = start + FrameLimits.headerSize
            let frame = try Frame(header: header, payload: buffer[payloadStart..<(start + total)])
            start += total
            pendingHeader = nil
            return frame
        } catch {
            failure = error
            throw error
        }
    }

    /// Drops consumed bytes once they dominate the buffer, so a long-lived connection's buffer
    /// stays around one frame and copying stays amortized O(1) per byte.
    private mutating func compact() {
        guard start > 0 else { return }
        if start == buffer.count {
            buffer.removeAll(keepingCapacity: buffer.capacity <= 2 * FrameLimits.maxFrameSize)
            start = 0
        } else if start >= buffer.count - start {
            buffer.removeSubrange(0..<start)
            start = 0
        }
    }
}
