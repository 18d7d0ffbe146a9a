// Errors that already carry their gRPC status. Every layer throws CairnError (or lets a
// system error escape); RPCStatus.from(_:) below is the one place an Error becomes a status.

/// gRPC status codes (numbering fixed by grpc/status.h).
public enum StatusCode: Int32, Sendable, CustomStringConvertible {
    case ok = 0, cancelled, unknown, invalidArgument, deadlineExceeded, notFound, alreadyExists,
         permissionDenied, resourceExhausted, failedPrecondition, aborted, outOfRange,
         unimplemented, `internal`, unavailable, dataLoss, unauthenticated

    public var description: String {
        switch self {
        case .ok: "OK"
        case .cancelled: "CANCELLED"
        case .unknown: "UNKNOWN"
        case .invalidArgument: "INVALID_ARGUMENT"
        case .deadlineExceeded: "DEADLINE_EXCEEDED"
        case .notFound: "NOT_FOUND"
        case .alreadyExists: "ALREADY_EXISTS"
        case .permissionDenied: "PERMISSION_DENIED"
        case .resourceExhausted: "RESOURCE_EXHAUSTED"
        case .failedPrecondition: "FAILED_PRECONDITION"
        case .aborted: "ABORTED"
        case .outOfRange: "OUT_OF_RANGE"
        case .unimplemented: "UNIMPLEMENTED"
        case .internal: "INTERNAL"
        case .unavailable: "UNAVAILABLE"
        case .dataLoss: "DATA_LOSS"
        case .unauthenticated: "UNAUTHENTICATED"
        }
    }
}

/// A failure with the status the caller should see and a message that says what to do.
///
/// How to choose (the CSI question):
/// - `invalidArgument`: the request itself is wrong; retrying it unchanged can never succeed.
/// - `notFound`: a referenced volume, node or path does not exist.
/// - `alreadyExists`: the name/target exists with an incompatible definition.
/// - `failedPrecondition`: the request is fine but the system is not in a state that allows it
///   (e.g. published on another node); the caller must change the state first.
/// - `aborted`: another operation on the same object is in flight; retry later.
/// - `unavailable`: a transient fault (store, device); retrying may succeed.
/// - `internal`: a broken invariant or a failed system command; logs say more.
public struct CairnError: Error, Sendable, CustomStringConvertible {
    public var code: StatusCode
    public var message: String

    public init(_ code: StatusCode, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }

    public static func invalidArgument(_ m: String) -> CairnError { .init(.invalidArgument, m) }
    public static func notFound(_ m: String) -> CairnError { .init(.notFound, m) }
    public static func alreadyExists(_ m: String) -> CairnError { .init(.alreadyExists, m) }
    public static func failedPrecondition(_ m: String) -> CairnError { .init(.failedPrecondition, m) }
    public static func aborted(_ m: String) -> CairnError { .init(.aborted, m) }
    public static func outOfRange(_ m: String) -> CairnError { .init(.outOfRange, m) }
    public static func resourceExhausted(_ m: String) -> CairnError { .init(.resourceExhausted, m) }
    public static func unavailable(_ m: String) -> CairnError { .init(.unavailable, m) }
    public static func unimplemented(_ m: String) -> CairnError { .init(.unimplemented, m) }
    public static func `internal`(_ m: String) -> CairnError { .init(.internal, m) }
}

/// An error type of another module that knows its status (so RPCStatus stays the one mapping
/// without knowing every module's errors).
public protocol StatusConvertible: Error {
    var status: (code: StatusCode, message: String) { get }
}

/// The single mapping from any thrown error to a gRPC status.
public enum RPCStatus {
    public static func from(_ error: any Error) -> (code: StatusCode, message: String) {
        switch error {
        case let e as CairnError:
            return (e.code, e.message)
        case let e as any StatusConvertible:
            return e.status
        case is CancellationError:
            return (.cancelled, "the call was cancelled (client went away or its deadline passed)")
        case let e as SystemError:
            return (.internal, e.description)
        default:
            return (.internal, "unexpected error: \(String(describing: error))")
        }
    }
}

/// A failed libc call, with errno. Kept apart from CairnError so callers can branch on errno.
public struct SystemError: Error, Sendable, CustomStringConvertible {
    public var operation: String
    public var errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
