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

    /// A TLS channel: the server's certificate must verify against `tls.caFile` and name
    /// `serverName` (nil: the target's host); the client presents `tls.certFile` when it has one.
    /// The files are read now, so a channel created after a rotation uses the new ones. Throws
    /// INVALID_ARGUMENT naming the unusable file.
    public init(target: String, tls: TLSCredentials, serverName: String? = nil) throws {
        var err = [CChar](repeating: 0, count: 1024)
        let raw = tls.withFiles { files in
            if let serverName {
                return serverName.withCString { cgrpc_channel_create_tls(target, files, $0, &err, err.count) }
            }
            return cgrpc_channel_create_tls(target, files, nil, &err, err.count)
        }
        guard let raw else { throw CairnError.invalidArgument("TLS files (\(tls)): \(String(cString: err))") }
        pointer = ChannelPointer(raw: raw)
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
