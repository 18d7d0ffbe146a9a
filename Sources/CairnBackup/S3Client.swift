import CS3Shim
import CairnCore
import Foundation
import Synchronization

/// Where a backup target lives: an S3-compatible endpoint, a bucket in it, the region its
/// signatures name, the key prefix under which Cairn keeps this target's objects, and the key
/// pair (docs/backups.md, "Targets").
public struct S3Location: Sendable, Equatable {
    public var endpoint: String
    public var bucket: String
    public var region: String
    public var prefix: String
    public var accessKeyID: String
    public var secretAccessKey: String

    public init(endpoint: String, bucket: String, region: String = "us-east-1", prefix: String = "",
                accessKeyID: String, secretAccessKey: String) {
        self.endpoint = endpoint.hasSuffix("/") ? String(endpoint.dropLast()) : endpoint
        self.bucket = bucket
        self.region = region
        self.prefix = prefix
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
    }
}

/// What went over the wire: request and response bodies and requests by method, counted by
/// the client (the tests compare them with the server's own object sizes).
public struct S3Traffic: Sendable, Equatable, Codable {
    public var bytesSent: Int64 = 0
    public var bytesReceived: Int64 = 0
    public var puts = 0
    public var gets = 0
    public var otherRequests = 0
    public init() {}
}

/// One object in a listing.
public struct S3Object: Sendable, Equatable {
    public var key: String
    public var size: Int64
    public var lastModified: Date?
}

/// S3's REST API over path-style URLs (`endpoint/bucket/key`), each request signed SigV4 by
/// libcurl (CS3Shim). Blocking requests run on Dispatch's pool, so several packs travel at once
/// without holding Swift's cooperative threads.
public final class S3Client: Sendable {
    public let location: S3Location
    /// Objects above this size go up in parts (S3's multipart upload); parts are this size.
    public let multipartPartSize: Int
    private let traffic = Mutex(S3Traffic())

    public init(_ location: S3Location, multipartPartSize: Int = 8 << 20) {
        cs3_global_init()
        self.location = location
        self.multipartPartSize = max(5 << 20, multipartPartSize)
    }

    public var counters: S3Traffic { traffic.withLock { $0 } }

    /// The full key of `name` under the target's prefix.
    public func key(_ name: String) -> String {
        location.prefix.isEmpty ? name : location.prefix.trimmingCharacters(in: CharacterSet(charactersIn: "/")) + "/" + name
    }

    // MARK: Objects

    public func put(_ name: String, _ body: [UInt8]) async throws {
        if body.count > multipartPartSize {
            try await putMultipart(name, body)
            return
        }
        let response = try await request("PUT", path: key(name), body: body)
        try expect(response, [200], "store \(name)")
    }

    /// The object's bytes, or nil when there is none.
    public func get(_ name: String) async throws -> [UInt8]? {
        let response = try await request("GET", path: key(name))
        if response.status == 404 { return nil }
        try expect(response, [200], "read \(name)")
        return response.body
    }

    public func exists(_ name: String) async throws -> Bool {
        let response = try await request("HEAD", path: key(name))
        if response.status == 404 { return false }
        try expect(response, [200], "look up \(name)")
        return true
    }

    public func delete(_ name: String) async throws {
        let response = try await request("DELETE", path: key(name))
        try expect(response, [200, 204, 404], "delete \(name)")
    }

    /// Every object whose name (under the prefix) starts with `namePrefix`, names relative to
    /// the target's prefix. ListObjectsV2, page by page.
    public func list(_ namePrefix: String) async throws -> [S3Object] {
        let full = key(namePrefix)
        let strip = key("").count
        var objects: [S3Object] = []
        var token: String?
        repeat {
            // Query parameters in canonical (sorted) order: libcurl signs the query as given.
            var query = ""
            if let token { query += "continuation-token=\(Self.encode(token))&" }
            query += "list-type=2&max-keys=1000&prefix=\(Self.encode(full))"
            let response = try await request("GET", path: "", query: query)
            try expect(response, [200], "list \(namePrefix)")
            let xml = String(decoding: response.body, as: UTF8.self)
            for contents in XMLText.elements("Contents", in: xml) {
                guard let k = XMLText.value("Key", in: contents), let size = XMLText.value("Size", in: contents).flatMap({ Int64($0) })
                else { continue }
                let modified = XMLText.value("LastModified", in: contents).flatMap { Self.parseDate($0) }
                objects.append(S3Object(key: String(k.dropFirst(strip)), size: size, lastModified: modified))
            }
            token = XMLText.value("IsTruncated", in: xml) == "true" ? XMLText.value("NextContinuationToken", in: xml) : nil
        } while token != nil
        return objects
    }

    /// Makes the bucket (tests and `cairn backup target` set-up); an existing one of ours is fine.
    public func createBucket() async throws {
        let response = try await request("PUT", path: "")
        try expect(response, [200, 409], "create bucket \(location.bucket)")
    }

    // MARK: Multipart upload

    func putMultipart(_ name: String, _ body: [UInt8]) async throws {
        let objectKey = key(name)
        let started = try await request("POST", path: objectKey, query: "uploads=")
        try expect(started, [200], "start a multipart upload of \(name)")
        guard let uploadID = XMLText.value("UploadId", in: String(decoding: started.body, as: UTF8.self)) else {
            throw CairnError.unavailable("the object store answered no UploadId to a multipart upload of \(name)")
        }
        do {
            var etags: [String] = []
            var offset = 0
            var part = 1
            while offset < body.count {
                let end = min(body.count, offset + multipartPartSize)
                let response = try await request("PUT", path: objectKey, query: "partNumber=\(part)&uploadId=\(Self.encode(uploadID))",
                                                 body: Array(body[offset..<end]))
                try expect(response, [200], "upload part \(part) of \(name)")
                etags.append(response.etag)
                offset = end
                part += 1
            }
            var xml = "<CompleteMultipartUpload>"
            for (i, etag) in etags.enumerated() {
                xml += "<Part><PartNumber>\(i + 1)</PartNumber><ETag>\(etag)</ETag></Part>"
            }
            xml += "</CompleteMultipartUpload>"
            let done = try await request("POST", path: objectKey, query: "uploadId=\(Self.encode(uploadID))", body: Array(xml.utf8))
            try expect(done, [200], "complete the multipart upload of \(name)")
            // S3 may answer 200 with an <Error> body to a CompleteMultipartUpload.
            if XMLText.value("Code", in: String(decoding: done.body, as: UTF8.self)) != nil {
                throw CairnError.unavailable("the object store refused to complete the multipart upload of \(name): \(String(decoding: done.body, as: UTF8.self))")
            }
        } catch {
            _ = try? await request("DELETE", path: objectKey, query: "uploadId=\(Self.encode(uploadID))")
            throw error
        }
    }

    // MARK: Requests

    struct Response {
        var status: Int
        var body: [UInt8]
        var etag: String
        /// Request and response bytes on the wire (headers and bodies).
        var sent: Int64 = 0
        var received: Int64 = 0
    }

    func request(_ method: String, path: String, query: String = "", body: [UInt8]? = nil) async throws -> Response {
        var url = location.endpoint + "/" + location.bucket
        if !path.isEmpty { url += "/" + path.split(separator: "/", omittingEmptySubsequences: false).map { Self.encode(String($0)) }.joined(separator: "/") }
        if !query.isEmpty { url += "?" + query }
        let location = self.location, target = url
        let response: Response = try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(with: Result { try Self.perform(method, url: target, location: location, body: body) })
            }
        }
        traffic.withLock {
            $0.bytesSent += response.sent
            $0.bytesReceived += response.received
            switch method {
            case "PUT": $0.puts += 1
            case "GET": $0.gets += 1
            default: $0.otherRequests += 1
            }
        }
        return response
    }

    private static func perform(_ method: String, url: String, location: S3Location, body: [UInt8]?) throws -> Response {
        var out = cs3_response()
        var err = [CChar](repeating: 0, count: 512)
        let rc: Int32
        if let body {
            rc = body.withUnsafeBufferPointer { buffer in
                cs3_perform(method, url, location.region, location.accessKeyID, location.secretAccessKey, nil, 0,
                            buffer.baseAddress, buffer.count, 300, &out, &err, err.count)
            }
        } else {
            rc = cs3_perform(method, url, location.region, location.accessKeyID, location.secretAccessKey, nil, 0,
                             nil, 0, 300, &out, &err, err.count)
        }
        guard rc == 0 else {
            throw CairnError.unavailable("cannot reach the object store at \(location.endpoint): \(String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)); check the target's endpoint and that the server runs")
        }
        defer { cs3_response_free(&out) }
        let bytes = out.body.map { Array(UnsafeBufferPointer(start: $0, count: out.body_len)) } ?? []
        let etag = withUnsafeBytes(of: out.etag) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        S3Client.recordWire(sent: out.bytes_sent, received: out.bytes_received)
        return Response(status: out.status, body: bytes, etag: etag, sent: out.bytes_sent, received: out.bytes_received)
    }

    private func expect(_ response: Response, _ statuses: Set<Int>, _ what: String) throws {
        guard !statuses.contains(response.status) else { return }
        let xml = String(decoding: response.body, as: UTF8.self)
        let code = XMLText.value("Code", in: xml) ?? "HTTP \(response.status)"
        let message = XMLText.value("Message", in: xml) ?? ""
        let hint: String
        switch response.status {
        case 403: hint = "check the target's access key and secret (credentials file) and region"
        case 404: hint = "check that bucket \(location.bucket) exists at \(location.endpoint)"
        default: hint = "the object store refused it; retry, or check the server's logs"
        }
        let error = "cannot \(what) in bucket \(location.bucket): \(code) \(message); \(hint)"
        throw response.status == 403 || response.status == 404 ? CairnError.failedPrecondition(error) : CairnError.unavailable(error)
    }

    // MARK: Wire counters

    /// Bytes on the wire, process-wide (every client): the shim reports them per request.
    private static let wire = Mutex((sent: Int64(0), received: Int64(0)))

    static func recordWire(sent: Int64, received: Int64) {
        wire.withLock { $0.sent += sent; $0.received += received }
    }

    /// Request and response body bytes this process sent and received, all clients together.
    public static var wireBytes: (sent: Int64, received: Int64) { wire.withLock { $0 } }

    // MARK: Encoding

    /// RFC 3986 percent-encoding of everything but unreserved characters, as SigV4 canonicalizes.
    static func encode(_ s: String) -> String {
        var out = ""
        for byte in s.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.append(Character(UnicodeScalar(byte)))
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }

    static func parseDate(_ s: String) -> Date? {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let d = f.date(from: s) { return d }
        f.formatOptions = [.withInternetDateTime]
        return f.date(from: s)
    }
}

/// The few elements of S3's XML answers Cairn reads (Key, Size, UploadId, Code…): flat text
/// elements without attributes, found by name.
enum XMLText {
    static func elements(_ name: String, in xml: String) -> [Substring] {
        var out: [Substring] = []
        var rest = xml[...]
        while let open = rest.range(of: "<\(name)>"), let close = rest[open.upperBound...].range(of: "</\(name)>") {
            out.append(rest[open.upperBound..<close.lowerBound])
            rest = rest[close.upperBound...]
        }
        return out
    }

    static func value<S: StringProtocol>(_ name: String, in xml: S) -> String? where S.SubSequence == Substring {
        guard let open = xml.range(of: "<\(name)>"), let close = xml[open.upperBound...].range(of: "</\(name)>") else { return nil }
        return unescape(String(xml[open.upperBound..<close.lowerBound]))
    }

    static func unescape(_ s: String) -> String {
        guard s.contains("&") else { return s }
        return s.replacingOccurrences(of: "&lt;", with: "<").replacingOccurrences(of: "&gt;", with: ">")
            .replacingOccurrences(of: "&quot;", with: "\"").replacingOccurrences(of: "&apos;", with: "'")
            .replacingOccurrences(of: "&amp;", with: "&")
    }
}
