import CairnReplica

/// One replica of a volume, as the engine reaches it.
public struct EngineReplica: Sendable, Equatable, CustomStringConvertible {
    public var nodeID: String
    public var host: String
    public var port: UInt16

    public init(nodeID: String, host: String, port: UInt16) {
        self.nodeID = nodeID
        self.host = host
        self.port = port
    }

    public var description: String { "\(nodeID) (\(host):\(port))" }
}

/// What the engine needs of one replica: blocking, thread-safe calls (FUSE worker threads call
/// them concurrently). The data protocol's client (`ClientReplicaIO`) and the in-process
/// replica store (`LocalReplicaIO`, when this node's replica server holds the replica) conform;
/// unit tests use an in-memory fake. Reads and writes are whole 4 KiB blocks at aligned offsets: the engine
/// aligns what the kernel asks for.
public protocol ReplicaIO: AnyObject, Sendable {
    func claim(volumeID: String, epoch: UInt64) throws -> ReplicaStatus
    /// Fills `buffer` (its count is the length) with whole blocks from `offset`. The engine
    /// passes 4 KiB-aligned memory when it can (the FUSE reply buffer).
    func read(volumeID: String, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, epoch: UInt64) throws
    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws
    /// Starts `write` and returns a function that waits for its outcome (called exactly once),
    /// so the engine can have a write in flight to several replicas from one thread. The data
    /// may be reused once this returns. The default writes at once.
    func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                    epoch: UInt64) -> () throws -> Void
    func flush(volumeID: String, epoch: UInt64) throws
    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws
    func close()
}

extension ReplicaIO {
    public func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                           epoch: UInt64) -> () throws -> Void {
        do {
            try write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
            return {}
        } catch {
            return { throw error }
        }
    }
}

/// An error that may say "the replica has seen a newer epoch": the engine was fenced.
///
/// The engine asks every error a replica throws (and every error `markOutOfSync` throws)
/// whether it is a fencing signal; one that is makes the engine fail all I/O from then on and
/// mark nothing out of sync. The replica client's error conforms with
/// `extension ReplicaClientError: ReplicaFencingSignal` (`.remote(.staleEpoch, _)` is fenced).
public protocol ReplicaFencingSignal: Error {
    var isStaleEpoch: Bool { get }
}

extension ReplicaError: ReplicaFencingSignal {
    public var isStaleEpoch: Bool {
        if case .staleEpoch = self { return true }
        return false
    }
}

/// The engine's own fencing error, for `markOutOfSync` implementations that find the
/// attachment's epoch superseded in the store.
public struct EngineFenced: ReplicaFencingSignal, Sendable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var isStaleEpoch: Bool { true }
    public var description: String { "fenced: \(reason)" }
}

func isFencing(_ error: any Error) -> Bool {
    (error as? any ReplicaFencingSignal)?.isStaleEpoch == true
}
