import CGRPCShim
import CairnCore
import Foundation
import SwiftProtobuf

/// A client for unary calls: used for Cairn's internal RPCs and by the tests to drive a real
/// plugin. A non-OK status is thrown as CairnError carrying that status.
public final class GRPCChannel: Sendable {
    private let pointer: ChannelPointer

    public init(target: String) {
        pointer = ChannelPointer(raw: cgrpc_channel_create(target))
    }

    deinit { cgrpc_channel_destroy(pointer.raw) }

    public func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ method: String, _ request: Request, as: Response.Type = Response.self,
        timeout: Duration = .seconds(60)
    ) async throws -> Response {
        let reply = await callRaw(method, try request.serializedBytes(), timeout: timeout)
        guard reply.code == .ok else { throw CairnError(reply.code, reply.message) }
        return try Response(serializedBytes: reply.response)
    }

    /// Sends raw bytes (tests use this to send garbage) and returns the status as received.
    public func callRaw(_ method: String, _ request: [UInt8], timeout: Duration = .seconds(60))
        async -> (code: StatusCode, message: String, response: [UInt8])
    {
        await withCheckedContinuation { continuation in
            let box = Unmanaged.passRetained(ReplyBox(continuation)).toOpaque()
            request.withUnsafeBufferPointer { buffer in
                cgrpc_unary_call(pointer.raw, method, buffer.baseAddress, buffer.count,
                                 timeout.milliseconds, replyCallback, box)
            }
        }
    }
}

private struct ChannelPointer: @unchecked Sendable { let raw: OpaquePointer }

private final class ReplyBox: @unchecked Sendable {
    let continuation: CheckedContinuation<(code: StatusCode, message: String, response: [UInt8]), Never>
    init(_ c: CheckedContinuation<(code: StatusCode, message: String, response: [UInt8]), Never>) { continuation = c }
}

private let replyCallback: cgrpc_unary_done_fn = { context, code, message, messageLength, response, responseLength in
    let box = Unmanaged<ReplyBox>.fromOpaque(context!).takeRetainedValue()
    let text = messageLength == 0 ? "" : String(decoding: UnsafeRawBufferPointer(start: message, count: messageLength), as: UTF8.self)
    let bytes = responseLength == 0 ? [] : [UInt8](UnsafeBufferPointer(start: response, count: responseLength))
    box.continuation.resume(returning: (StatusCode(rawValue: code) ?? .unknown, text, bytes))
}
