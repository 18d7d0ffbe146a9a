import CairnReplica

/// One replica of a volume, as the engine reaches it.
public struct EngineReplica: Sendable, Equatable, CustomStringConvertible {
    public var nodeID: String
    public var host: String
    public var port: UInt16
    /// Whether the store has it in the in-sync set. The engine claims the in-sync replicas at
    /// start; the others are resync targets (when the engine has `EngineRecovery`).
    public var inSync: Bool

    public init(nodeID: String, host: String, port: UInt16, inSync: Bool = true) {
        self.nodeID = nodeID
        self.host = host
        self.port = port
        self.inSync = inSync
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
    /// may be sent from where it is (the data protocol's client does not copy it): keep it
    /// valid and unchanged until the returned function has returned. The default writes at once.
    func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                    epoch: UInt64) -> () throws -> Void
    /// `beginWrite` that, with `durable`, asks the replica to make the write durable before it
    /// answers, if it can do so cheaply (docs/engine.md, "Durable writes"). The returned
    /// function says whether it did: only then may a flush skip this replica for it. The
    /// default asks nothing and says false.
    func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                    epoch: UInt64, durable: Bool) -> () throws -> Bool
    /// `write` with `durable`, as `beginWrite(...durable:)`. The default says false.
    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
               durable: Bool) throws -> Bool
    func flush(volumeID: String, epoch: UInt64) throws
    /// A flush that records `through` as the flushed generation: every write numbered at or
    /// below it has finished on every in-sync replica. The default flushes without it.
    func flush(volumeID: String, epoch: UInt64, through: UInt64) throws
    /// Starts `flush(volumeID:epoch:through:)` and returns a function that waits for its
    /// outcome (called exactly once), as `beginWrite` does for writes: the engine flushes every
    /// replica from one thread, no helper threads. The default flushes at once.
    func beginFlush(volumeID: String, epoch: UInt64, through: UInt64) -> () throws -> Void
    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws
    func close()

    /// A read this process can do itself, asynchronously (`ReplicaStore.planRead`: the
    /// replica's data file, its offset, each block's checksum or a zero bit), for a replica
    /// whose files this process holds; nil (the default) when it cannot: the engine calls
    /// `read`. Each plan with a descriptor is ended by `endPlannedRead` once its read is done.
    func planRead(volumeID: String, offset: UInt64, length: Int, epoch: UInt64,
                  checksums: UnsafeMutablePointer<UInt32>) throws -> ReplicaStore.PlannedRead?
    func endPlannedRead()

    // Resync, repair and scrub (docs/recovery.md).

    /// Block generations as the `generations` op reports them (bit 63: trimmed); count ≤ 65,536.
    func generations(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64]
    /// One digest per 1 MiB region of the block generations (0 for a region never written);
    /// count ≤ 4,096.
    func generationSummary(volumeID: String, firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64]
    /// Forgets the regions written at or below `cleanThrough` (every write up to it reached
    /// every in-sync replica; with `converged`, the replica was compared whole) and returns the
    /// regions still unsettled (`ActivityLog`). The default knows nothing: compare everything.
    func activity(volumeID: String, cleanThrough: UInt64, converged: Bool, epoch: UInt64) throws -> ReplicaActivity
    /// A resync copy: applied to the blocks whose generation is lower than `generation`.
    /// Returns the blocks applied.
    func writeIfNewer(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                      epoch: UInt64) throws -> Int
    /// A repair: applied to the blocks whose generation is at most `generation` (the same
    /// block's good copy rewritten over a corrupted one, never over a newer write).
    func repairWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                     epoch: UInt64) throws -> Int
    /// A resync trim: applied to the blocks whose generation is lower than `generation`.
    func trimIfNewer(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws -> Int
    /// The blocks in `firstBlock ..< firstBlock+count` (count ≤ 16,384) whose data does not
    /// match its checksum.
    func verify(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64]
    // Snapshots and growth (docs/engine.md, "Snapshots").

    /// Takes snapshot `snapshotID` of this replica (it flushes first; idempotent by id). The
    /// engine calls it behind its write barrier.
    func snapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws
    /// Grows the replica to `sizeBytes` (the same size is a no-op).
    func grow(volumeID: String, sizeBytes: UInt64, epoch: UInt64) throws

    /// Bytes this handle sent and received on the network (0 for an in-process replica).
    var wireBytes: (sent: UInt64, received: UInt64) { get }
}

extension ReplicaIO {
    public func planRead(volumeID: String, offset: UInt64, length: Int, epoch: UInt64,
                         checksums: UnsafeMutablePointer<UInt32>) throws -> ReplicaStore.PlannedRead? {
        nil
    }

    public func endPlannedRead() {}

    public func flush(volumeID: String, epoch: UInt64, through: UInt64) throws {
        try flush(volumeID: volumeID, epoch: epoch)
    }

    public func activity(volumeID: String, cleanThrough: UInt64, converged: Bool, epoch: UInt64) throws -> ReplicaActivity {
        .unknown
    }

    public func beginFlush(volumeID: String, epoch: UInt64, through: UInt64) -> () throws -> Void {
        do {
            try flush(volumeID: volumeID, epoch: epoch, through: through)
            return {}
        } catch {
            return { throw error }
        }
    }

    public func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                           epoch: UInt64) -> () throws -> Void {
        do {
            try write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
            return {}
        } catch {
            return { throw error }
        }
    }

    public func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                           epoch: UInt64, durable: Bool) -> () throws -> Bool {
        let wait = beginWrite(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
        return {
            try wait()
            return false
        }
    }

    public func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
                      durable: Bool) throws -> Bool {
        try write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
        return false
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

/// An error that may say "this block's data does not match its checksum" (silent corruption,
/// detected by the replica on read): the engine then reads the block from another in-sync
/// replica and repairs the bad copy.
public protocol ReplicaDamageSignal: Error {
    /// The damaged block's number, when the error is a checksum mismatch.
    var damagedBlock: UInt64? { get }
}

extension ReplicaError: ReplicaDamageSignal {
    public var damagedBlock: UInt64? {
        if case .checksumMismatch(let block) = self { return block }
        return nil
    }
}

func damagedBlock(_ error: any Error) -> UInt64? {
    (error as? any ReplicaDamageSignal)?.damagedBlock
}

func isFencing(_ error: any Error) -> Bool {
    (error as? any ReplicaFencingSignal)?.isStaleEpoch == true
}
