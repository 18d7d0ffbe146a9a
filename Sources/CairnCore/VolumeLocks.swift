import Synchronization

/// The per-volume in-flight set: at most one operation per volume at a time; a concurrent call
/// gets ABORTED (CSI's "operation pending for volume") instead of racing.
public final class VolumeLocks: Sendable {
    private let held = Mutex<Set<String>>([])

    public init() {}

    public func withLock<T: Sendable>(_ key: String, operation: String,
                                      _ body: () async throws -> T) async throws -> T {
        let acquired = held.withLock { $0.insert(key).inserted }
        guard acquired else {
            throw CairnError.aborted("an operation on \(key) is already in progress; retry \(operation) later")
        }
        defer { _ = held.withLock { $0.remove(key) } }
        return try await body()
    }

    public func isHeld(_ key: String) -> Bool { held.withLock { $0.contains(key) } }
}
