import Foundation

/// Input checks shared by every service. Each failure says which field is wrong and why, so
/// the caller (or the operator reading the CO's event) can fix the request.
public enum Validate {
    /// CSI's size limit for string fields.
    public static let maxStringBytes = 128

    /// A volume id Cairn generated: `[A-Za-z0-9._-]`, 1...128 bytes, not "." or "..".
    /// Ids are used in file names, so anything else is refused before it reaches the disk.
    public static func volumeID(_ id: String, field: String = "volume_id") throws {
        try identifier(id, field: field)
    }

    /// A node id: same alphabet as volume ids (it names records and paths).
    public static func nodeID(_ id: String, field: String = "node_id") throws {
        try identifier(id, field: field)
    }

    static func identifier(_ id: String, field: String) throws {
        if id.isEmpty { throw CairnError.invalidArgument("\(field) is required") }
        if id.utf8.count > maxStringBytes {
            throw CairnError.invalidArgument("\(field) is \(id.utf8.count) bytes; at most \(maxStringBytes) are allowed")
        }
        if id == "." || id == ".." {
            throw CairnError.invalidArgument("\(field) \"\(id)\" is not a valid id")
        }
        for b in id.utf8 where !isIDByte(b) {
            throw CairnError.invalidArgument(
                "\(field) \"\(printable(id))\" contains \(describe(b)); ids use only letters, digits, '.', '_' and '-'")
        }
    }

    static func isIDByte(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A)
            || b == 0x2E || b == 0x5F || b == 0x2D
    }

    static func describe(_ b: UInt8) -> String {
        switch b {
        case 0x2F: "'/'"
        case 0x20: "a space"
        case 0..<0x20, 0x7F: "a control character"
        case 0x80...: "a non-ASCII byte"
        default: "'\(Character(UnicodeScalar(b)))'"
        }
    }

    /// A volume name: required, at most 128 bytes, no control characters.
    public static func volumeName(_ name: String) throws {
        if name.isEmpty { throw CairnError.invalidArgument("name is required") }
        if name.utf8.count > maxStringBytes {
            throw CairnError.invalidArgument("name is \(name.utf8.count) bytes; at most \(maxStringBytes) are allowed")
        }
        if name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) {
            throw CairnError.invalidArgument("name contains a control character")
        }
    }

    /// Shortens user input for messages and logs.
    public static func printable(_ s: String, limit: Int = 64) -> String {
        let cleaned = String(s.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? "?" : Character($0) })
        return cleaned.count > limit ? String(cleaned.prefix(limit)) + "…" : cleaned
    }

    /// A staging or target path: absolute, at most 4096 bytes, no "." or ".." components, and
    /// inside one of `roots` — also after resolving symlinks in its existing ancestors, so a
    /// link cannot carry a mount outside the roots. Returns the normalised path.
    @discardableResult
    public static func path(_ path: String, field: String, roots: [String]) throws -> String {
        if path.isEmpty { throw CairnError.invalidArgument("\(field) is required") }
        if path.utf8.count > 4096 { throw CairnError.invalidArgument("\(field) is longer than 4096 bytes") }
        guard path.hasPrefix("/") else {
            throw CairnError.invalidArgument("\(field) \"\(printable(path))\" must be an absolute path")
        }
        if path.utf8.contains(0) { throw CairnError.invalidArgument("\(field) contains a NUL byte") }
        let components = path.split(separator: "/", omittingEmptySubsequences: true)
        if components.contains(where: { $0 == "." || $0 == ".." }) {
            throw CairnError.invalidArgument("\(field) \"\(printable(path))\" must not contain '.' or '..' components")
        }
        let normalised = "/" + components.joined(separator: "/")
        guard let root = roots.first(where: { isInside(normalised, root: $0) }) else {
            throw CairnError.invalidArgument(
                "\(field) \"\(printable(path))\" is outside the directories this plugin may use (\(roots.joined(separator: ", "))); start cairn with --path-root to allow another")
        }
        // Resolve the deepest existing ancestor and check it is still under the resolved root.
        let resolvedRoot = realPath(root) ?? root
        var probe = normalised
        while !probe.isEmpty {
            if let resolved = realPath(probe) {
                if !isInside(resolved, root: resolvedRoot) {
                    throw CairnError.invalidArgument(
                        "\(field) \"\(printable(path))\" resolves through a symbolic link to \(resolved), outside \(root)")
                }
                break
            }
            probe = (probe as NSString).deletingLastPathComponent
            if probe == "/" { break }
        }
        return normalised
    }

    /// A path in another mount namespace's view: absolute, no "." or ".." components, ≤ 4096
    /// bytes. Returns it normalised. (Whether it escapes that namespace's root is checked
    /// where it is resolved, inside the namespace.)
    @discardableResult
    public static func absolutePath(_ path: String, field: String) throws -> String {
        if path.isEmpty { throw CairnError.invalidArgument("\(field) is required") }
        if path.utf8.count > 4096 { throw CairnError.invalidArgument("\(field) is longer than 4096 bytes") }
        guard path.hasPrefix("/") else {
            throw CairnError.invalidArgument("\(field) \"\(printable(path))\" must be an absolute path")
        }
        if path.utf8.contains(0) { throw CairnError.invalidArgument("\(field) contains a NUL byte") }
        let components = path.split(separator: "/", omittingEmptySubsequences: true)
        if components.contains(where: { $0 == "." || $0 == ".." }) {
            throw CairnError.invalidArgument("\(field) \"\(printable(path))\" must not contain '.' or '..' components")
        }
        return "/" + components.joined(separator: "/")
    }

    public static func isInside(_ path: String, root: String) -> Bool {
        let r = root.hasSuffix("/") && root.count > 1 ? String(root.dropLast()) : root
        return r == "/" || path == r || path.hasPrefix(r + "/")
    }

    public static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }
}

/// "host:port" and "[ipv6]:port" split into their two parts (nil when the text has neither
/// shape); the callers check the parts and say what a good address of theirs looks like.
public enum HostPort {
    public static func split(_ text: String) -> (host: Substring, port: Substring)? {
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else { return nil }
            return (text[text.index(after: text.startIndex)..<close], text[text.index(close, offsetBy: 2)...])
        }
        guard let colon = text.lastIndex(of: ":"), !text[..<colon].contains(":") else { return nil }
        return (text[..<colon], text[text.index(after: colon)...])
    }
}
