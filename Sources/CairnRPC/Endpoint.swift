import CairnCore
import Foundation

/// Endpoint spellings: `unix:///abs/path`, `unix:/abs/path`, `tcp://host:port`.
public enum Endpoint {
    public static func unixPath(_ endpoint: String) -> String? {
        if endpoint.hasPrefix("unix://") { return String(endpoint.dropFirst("unix://".count)) }
        if endpoint.hasPrefix("unix:") { return String(endpoint.dropFirst("unix:".count)) }
        return nil
    }

    public static func validate(_ endpoint: String) throws {
        if let path = unixPath(endpoint) {
            guard path.hasPrefix("/") else {
                throw CairnError.invalidArgument("endpoint \(endpoint): a unix socket path must be absolute (unix:///run/cairn/csi.sock)")
            }
            return
        }
        guard endpoint.hasPrefix("tcp://"), endpoint.dropFirst(6).contains(":") else {
            throw CairnError.invalidArgument("endpoint \(endpoint) is neither unix:///path nor tcp://host:port")
        }
    }

    /// Creates the socket's directory and removes a stale socket left by a previous run. Refuses
    /// to replace anything that is not a socket.
    static func prepareSocketPath(_ path: String) throws {
        let dir = (path as NSString).deletingLastPathComponent
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o750])
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else {
            throw CairnError.failedPrecondition("\(path) exists and is not a socket; remove it or choose another endpoint")
        }
        if unlink(path) != 0 { throw SystemError("unlink stale socket \(path)", errno: errno) }
    }
}
