import Foundation
import Logging
import Synchronization

/// logfmt lines on stderr: `ts=… level=info label=cairn msg="volume created" volume.id=vol-…`.
/// One line per event, keys sorted, values quoted when needed: greppable by operators and
/// parseable by log shippers.
struct LogfmtHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level
    let label: String

    init(label: String, level: Logger.Level) {
        self.label = label
        self.logLevel = level
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        if let explicit = event.metadata { all.merge(explicit) { _, new in new } }
        if let error = event.error { all["error"] = "\(error)" }
        var out = "ts=\(Self.timestamp()) level=\(event.level) msg=\(Self.quote(event.message.description))"
        for (key, value) in all.sorted(by: { $0.key < $1.key }) {
            out += " \(key)=\(Self.quote(value.description))"
        }
        out += "\n"
        Self.lock.withLock { _ in FileHandle.standardError.write(Data(out.utf8)) }
    }

    static let lock = Mutex(())

    static func timestamp() -> String {
        var tv = timeval()
        gettimeofday(&tv, nil)
        var tm = tm()
        var seconds = tv.tv_sec
        gmtime_r(&seconds, &tm)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                      tm.tm_hour, tm.tm_min, tm.tm_sec, Int(tv.tv_usec / 1000))
    }

    static func quote(_ s: String) -> String {
        if !s.isEmpty && !s.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0.isNewline }) { return s }
        return "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n") + "\""
    }
}
