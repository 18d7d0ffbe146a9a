import Dispatch

/// Runs blocking work (a system call that may wait on the kernel or a disk, a socket, key
/// derivation) on a dispatch thread, so the Swift concurrency pool — as many threads as CPUs —
/// keeps serving everything else meanwhile.
public func offCooperativePool<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(with: Result { try work() }) }
    }
}

/// `offCooperativePool` for work that cannot fail.
public func offCooperativePool<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(returning: work()) }
    }
}
