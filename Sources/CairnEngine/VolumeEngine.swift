#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CFUSEShim
import CairnCore
import CairnCrypto
import CairnReplica
import CoreMetrics
import Logging
import Synchronization

/// What an engine is doing, for logs, metrics and the operator.
public struct EngineState: Sendable, Equatable {
    public var volumeID: String
    public var epoch: UInt64
    /// `<mountDirectory>/volume` while mounted, nil otherwise.
    public var path: String?
    /// Node ids of the replicas every write goes to, in the order given.
    public var inSync: [String]
    /// Node ids removed from the in-sync set (recorded in the store), with the reason.
    public var outOfSync: [String: String]
    /// A replica has seen a newer epoch: every I/O fails with EIO.
    public var fenced: Bool
    /// The generation of the last write or trim sent.
    public var generation: UInt64
    public var reads: UInt64 = 0
    public var writes: UInt64 = 0
    public var flushes: UInt64 = 0
    public var trims: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// I/O answered with an error.
    public var errors: UInt64 = 0
    /// The resync in progress, if any (one at a time per engine).
    public var resync: ResyncReport?
    /// Corrupted blocks found (by reads or the scrub) and repaired from another replica.
    public var repairedBlocks: UInt64 = 0
    /// Corrupted blocks no in-sync replica could supply.
    public var unrepairableBlocks: UInt64 = 0
    /// Blocks the scrub has verified since the engine started, and completed passes.
    public var scrubbedBlocks: UInt64 = 0
    public var scrubPasses: UInt64 = 0
    /// Of `scrubbedBlocks`, those verified while the volume served I/O (the scrub's slower pace).
    public var scrubbedWhileBusyBlocks: UInt64 = 0
    /// The volume's `minInSync`: writes, trims and flushes are refused (EIO) while fewer
    /// replicas are in sync.
    public var minInSync: Int = 1
    /// Writes, trims and flushes refused because fewer than `minInSync` replicas were in sync.
    public var refusedBelowMinInSync: UInt64 = 0
    /// Writes sent as durable writes (docs/engine.md, "Durable writes"), and flushes answered
    /// without flushing any replica because every write since the last was durable already.
    public var durableWrites: UInt64 = 0
    public var flushesWithoutSync: UInt64 = 0
    /// Every write and trim is durable on every replica before it is answered (the volume's
    /// loop device may be in write-through mode: docs/engine.md, "Write-through volumes").
    public var writeThrough: Bool = false
    /// Writes and trims that needed a flush round of the engine's own to be durable.
    public var writeThroughOwnFlushes: UInt64 = 0
    /// Reads of the local replica go through the FUSE shim's io_uring (docs/engine.md,
    /// "Asynchronous reads"); those whose data did not match the block map when they arrived
    /// (a write or trim of the block raced them, or damage) and were read again.
    public var asyncReads: Bool = false
    public var readsRedone: UInt64 = 0
    /// Planned reads a FUSE worker read itself, being the only read in flight (queue depth 1:
    /// no batch to share, so no hand-off to the ring's thread).
    public var readsInline: UInt64 = 0
    /// Idle trims (no request for `CAIRN_IDLE_TRIM_SECONDS`: docs/engine.md, "Idle volumes give
    /// their buffers back"), the bytes of FUSE buffers they gave back, and the bytes of those
    /// buffers resident now (the FUSE workers' request and read buffers, the read ring's).
    public var idleTrims: UInt64 = 0
    public var bufferBytesReleased: UInt64 = 0
    public var bufferBytesResident: UInt64 = 0
}

/// One replica as the engine holds it.
final class Member: Sendable {
    let replica: EngineReplica
    let io: any ReplicaIO
    /// True once the replica was recorded out of sync; the lock serializes the recording so
    /// that concurrent failures record it once (and against a rejoin's store transaction).
    let recordedOut = Mutex(false)
    /// Set when a write or trim failed on a catching-up replica: its resync stops and the
    /// write is answered from the in-sync replicas alone.
    let catchUpFailure = Mutex<String?>(nil)

    /// The replica's size when it was claimed (0 when not known).
    let claimedSize: UInt64

    /// Writes and trims this replica answered without saying they were durable, counted after
    /// each answer and before the application's; and that count as the last successful flush
    /// of the replica read it before it was sent. While the two are equal, everything the
    /// replica acknowledged is durable and a flush need not be sent to it. Starts unequal: the
    /// first flush of a member always goes out.
    let unflushed = Atomic<UInt64>(1)
    let flushedThrough = Atomic<UInt64>(0)

    /// Sequentially consistent: a flush round (WriteThrough.swift) reads these counts after
    /// the write that moved one was answered by its replicas.
    @inline(__always)
    func noteUnflushed() { unflushed.wrappingAdd(1, ordering: .sequentiallyConsistent) }

    /// The count a flush of this member records, when it holds a write or trim it did not make
    /// durable since its last flush; nil when it holds none.
    @inline(__always)
    func pendingMark() -> UInt64? {
        let mark = unflushed.load(ordering: .sequentiallyConsistent)
        return mark != flushedThrough.load(ordering: .relaxed) ? mark : nil
    }

    init(replica: EngineReplica, io: any ReplicaIO, claimedSize: UInt64 = 0) {
        self.replica = replica
        self.io = io
        self.claimedSize = claimedSize
    }

    var nodeID: String { replica.nodeID }
}

/// The volume on the node where it is staged: a FUSE mount whose one file, `volume`, is the
/// volume. A loop device on that file is the block device.
///
/// Writes go to every in-sync replica in parallel and are answered when all acknowledged; a
/// replica that fails is first recorded out of sync in the store (`markOutOfSync`, conditional
/// on the epoch), then dropped from the set, and only then is the write answered. A replica that
/// reports a newer epoch fences the engine: every I/O fails from then on. Reads come from the
/// local replica while it is in sync.
///
/// FUSE worker threads call in synchronously and block until the replicas answer: no Swift
/// concurrency on the I/O path, no allocation per aligned write.
public final class VolumeEngine: Sendable {
    public static let blockSize = 4096

    public let volumeID: String
    /// The volume's size now (raised by `grow`).
    public var sizeBytes: UInt64 { size.load(ordering: .acquiring) }
    let size: Atomic<UInt64>
    /// The size every replica should have: the volume's, or more when an expansion grew some
    /// replicas and was cut off before the volume's record (convergence grows the others to it).
    let replicaSize = Atomic<UInt64>(0)
    public let epoch: UInt64
    public let replicas: [EngineReplica]
    public let localNodeID: String
    public let mountDirectory: String
    let connect: @Sendable (EngineReplica) throws -> any ReplicaIO
    private let markOutOfSync: @Sendable (_ nodeID: String, _ reason: String) throws -> Void
    let recovery: EngineRecovery?
    let logger: Logger
    /// Where the FUSE descriptor is kept while this process restarts (nil: nowhere).
    let keeper: FUSEKeeperClient?
    /// A dead predecessor's connection to serve instead of mounting (taken from the keeper).
    private let resume = Mutex<KeptFUSE?>(nil)

    private struct Lifecycle: ~Copyable {
        var session: OpaquePointer?
        var retained: Unmanaged<VolumeEngine>?
        var members: [Member] = []
        var stopped = false
        var driver: RecoveryDriver?
    }

    struct Sets {
        /// Local replica first (reads try it first), then the others in the order given.
        var inSync: [Member] = []
        var outOfSync: [String: String] = [:]
        /// Replicas being resynced: every write and trim reaches them too, but their failures
        /// do not fail the I/O (they stop the resync).
        var catchingUp: [Member] = []
        /// The volume's replicas as last known (from the store): resync targets come from here.
        var known: [EngineReplica] = []
        /// Raised by `changeMembers`; writes register in `inflight[version & 1]`.
        var version: Int = 0
        var resync: ResyncReport?
        /// Corrupted blocks a repair could not rewrite, by node: its resync copies them whatever
        /// their generation says.
        var damaged: [String: Set<UInt64>] = [:]
    }

    private let lifecycle = Mutex(Lifecycle())
    /// Read under the shared lock by every I/O (`enter`), changed under the exclusive one.
    let sets = ReadWriteLocked(Sets())
    /// Writes and trims between reading the member sets and finishing, by the parity of the
    /// sets' version they read (see `changeMembers`).
    let inflightEven = Atomic<Int>(0)
    let inflightOdd = Atomic<Int>(0)
    let fenced = Atomic<Bool>(false)
    /// FUSE requests being served now, and whether the engine was handed over (`handOver`).
    let serving = Atomic<Int>(0)
    let handedOver = Atomic<Bool>(false)
    /// A write or trim failed after it was sent: the in-sync replicas may now differ on it, so
    /// the clean watermark stops (Convergence.swift) and the next engine compares those regions.
    let unsettled = Atomic<Bool>(false)
    let generation = Atomic<UInt64>(0)
    /// The generations of the writes and trims in flight (numbered, not yet answered by every
    /// replica): a flush records as flushed only what lies below all of them.
    let inflightGenerations = InflightGenerations()
    let repaired = Atomic<UInt64>(0)
    let unrepairable = Atomic<UInt64>(0)
    let scrubbed = Atomic<UInt64>(0)
    let scrubPasses = Atomic<UInt64>(0)
    /// Blocks the scrub verified while the volume was serving I/O (at its slower pace).
    let scrubbedWhileBusy = Atomic<UInt64>(0)
    /// Writes and trims of the same blocks wait for each other (OverlapGate.swift): every
    /// replica then applies them in one order. Also what orders a partial block's
    /// read-modify-write against other writes of that block.
    let overlaps = OverlapGate()
    /// The write barrier (VolumeEngineControl.swift): 0 while open, else the monotonic deadline
    /// (ns) after which the hold lapses by itself.
    let holdDeadline = Atomic<UInt64>(0)
    /// Writes, trims and flushes past the barrier's gate and not finished yet.
    let gatedInFlight = Atomic<Int>(0)
    /// QoS: the volume's IOPS and bandwidth limits (none by default).
    let limiter = IOLimiter()
    /// Serializes `grow` calls.
    private let growth = Mutex(())
    /// `minInSync` (at least 1) and what it refused; the last refusal logged (monotonic s).
    let minimumInSync = Atomic<Int>(1)
    let refusedBelowMinimum = Atomic<UInt64>(0)
    private let refusalLogged = Mutex<Double>(0)
    /// Durable writes (docs/engine.md): writes since the application's last flush (counted up
    /// to 2 only, so a stream of writes reads this word and does not write it), and the recent
    /// flushes that came after exactly one write (one bit per flush that followed any write,
    /// newest lowest: 1 when it followed one). Whether a write is alone comes from the
    /// barrier's count of I/O in flight (`gatedInFlight`), which every write already keeps.
    let writesSinceFlush = Atomic<UInt64>(0)
    let recentSingleWriteFlushes = Atomic<UInt64>(0)
    /// The last this many flushes (after writes) each came after exactly one write: commits.
    static let commitRun: UInt64 = 2
    /// Tests: instead of the guess, every other write is a durable write (the flush skipping
    /// logic then meets durable and plain writes mixed under any concurrency).
    let alternateDurableForTesting = Atomic<Bool>(false)
    let alternation = Atomic<UInt64>(0)
    let durableWriteCount = Atomic<UInt64>(0)
    let flushesWithoutSync = Atomic<UInt64>(0)
    /// Write-through volumes (WriteThrough.swift): every write durable when answered, so the
    /// kernel may skip the volume's flushes.
    let writeThrough = WriteThrough()
    /// The volume's `writeThrough` parameter (true unless the volume was created with "false").
    let wantsWriteThrough: Bool
    /// `CAIRN_DURABLE_WRITES=off` never asks for durable writes (every flush goes to every
    /// replica, as before they existed): an escape hatch and the benchmark's comparison.
    static let durableWritesEnabled: Bool = getenv("CAIRN_DURABLE_WRITES").map { String(cString: $0) != "off" } ?? true
    /// Longest durable write: what a replica journals (`Journal.smallWriteLimit`).
    static let durableWriteLimit = 256 << 10

    /// Reads, writes, flushes and trims the application has issued: the scrub compares it
    /// between steps to tell a busy volume from an idle one.
    var foregroundOperations: UInt64 {
        reads.load(ordering: .relaxed) &+ writes.load(ordering: .relaxed) &+ flushes.load(ordering: .relaxed)
            &+ trims.load(ordering: .relaxed)
    }

    private let reads = Atomic<UInt64>(0)
    /// Asynchronous reads whose data did not match the block map when they arrived, read again.
    private let readsRedone = Atomic<UInt64>(0)
    private let readsInline = Atomic<UInt64>(0)
    /// Whether the running session reads asynchronously.
    private let asyncReadsOn = Atomic<Bool>(false)

    /// Asynchronous reads unless `CAIRN_ASYNC_READS` is `off` (or `0`/`false`): the way back to
    /// one synchronous read per FUSE worker, for comparing the two or working around a kernel.
    static let asyncReads = switchedOn("CAIRN_ASYNC_READS")
    /// A switch in the environment: on unless set to `off`, `0`, `false` or `no`.
    private static func switchedOn(_ name: String) -> Bool {
        guard let value = getenv(name).map({ String(cString: $0).lowercased() }) else { return true }
        return !["off", "0", "false", "no"].contains(value)
    }
    /// Whether a FUSE worker reads a planned read itself when it is the only read in flight
    /// (queue depth 1: a hand-off to the ring's thread would only add a wake-up). On unless
    /// `CAIRN_INLINE_READS` is `off` (or `0`/`false`); tests turn it off per engine, before its
    /// start, to exercise the ring with one read at a time.
    static let inlineReadsDefault = switchedOn("CAIRN_INLINE_READS")
    let inlineReads = Atomic<Bool>(VolumeEngine.inlineReadsDefault)
    /// How long a volume must go without a request before its FUSE buffers go back to the
    /// kernel (milliseconds, 0: never): `CAIRN_IDLE_TRIM_SECONDS` (default 30; 0 turns it off).
    static let idleTrimDefault = UInt32((IdleHeapTrim.idleSeconds * 1000).rounded())
    private let idleTrimMilliseconds = Atomic<UInt32>(VolumeEngine.idleTrimDefault)
    /// The first engine to find the idle trim's signal taken says so at warning level.
    private static let toldTrimSignalMissing = Atomic<Bool>(false)
    /// The first engine to find io_uring refused says so at warning level; later ones at debug.
    private static let toldAsyncReadsMissing = Atomic<Bool>(false)
    private let writes = Atomic<UInt64>(0)
    private let flushes = Atomic<UInt64>(0)
    private let trims = Atomic<UInt64>(0)
    private let bytesRead = Atomic<UInt64>(0)
    private let bytesWritten = Atomic<UInt64>(0)
    private let errors = Atomic<UInt64>(0)
    /// This volume's series on the process's metrics endpoint (VolumeMetrics.swift).
    let metrics: VolumeMetrics
    /// An encrypted volume's data cipher (docs/encryption.md): every block is encrypted here,
    /// before it leaves for any replica, and decrypted after a read; nil for a plain volume.
    /// Resync, repair, scrub and snapshots move the replicas' blocks as they are: ciphertext.
    let cipher: VolumeCipher?

    public init(volumeID: String, sizeBytes: UInt64, epoch: UInt64, replicas: [EngineReplica], localNodeID: String,
                mountDirectory: String,
                connect: @escaping @Sendable (EngineReplica) throws -> any ReplicaIO,
                markOutOfSync: @escaping @Sendable (_ nodeID: String, _ reason: String) throws -> Void,
                recovery: EngineRecovery? = nil,
                keeper: FUSEKeeperClient? = nil, resume: KeptFUSE? = nil,
                cipher: VolumeCipher? = nil,
                writeThrough: Bool = true,
                metricsFactory: any MetricsFactory = MetricsSystem.factory,
                logger: Logger) {
        self.metrics = VolumeMetrics(volumeID: volumeID, factory: metricsFactory)
        self.wantsWriteThrough = writeThrough
        self.cipher = cipher
        self.keeper = keeper
        self.resume.withLock { $0 = resume }
        self.volumeID = volumeID
        self.size = Atomic(sizeBytes)
        self.epoch = epoch
        self.replicas = replicas
        self.localNodeID = localNodeID
        self.mountDirectory = mountDirectory
        self.connect = connect
        self.markOutOfSync = markOutOfSync
        self.recovery = recovery
        var logger = logger
        logger[metadataKey: "volume.id"] = "\(volumeID)"
        logger[metadataKey: "engine.epoch"] = "\(epoch)"
        self.logger = logger
    }

    public var path: String { mountDirectory + "/volume" }

    // MARK: Lifecycle

    /// Claims every replica with the epoch, mounts FUSE and returns the volume file's path.
    /// Idempotent while running.
    ///
    /// A replica that cannot be connected or claimed is recorded out of sync before the mount
    /// — but only when another replica was claimed: if none answers, nothing is recorded (no
    /// write was acknowledged without them, and recording all would leave the volume with no
    /// in-sync replica) and start fails with UNAVAILABLE. A replica reporting a newer epoch
    /// fails start with FAILED_PRECONDITION (this attachment was superseded).
    public func start() throws -> String {
        try lifecycle.withLock { life in
            if life.session != nil { return path }
            guard !life.stopped else {
                throw CairnError.failedPrecondition("the engine for volume \(volumeID) was stopped; start a new engine")
            }
            guard sizeBytes > 0, sizeBytes % UInt64(Self.blockSize) == 0 else {
                throw CairnError.invalidArgument("volume size \(sizeBytes) is not a positive multiple of \(Self.blockSize) bytes")
            }
            guard replicas.contains(where: \.inSync) else {
                throw CairnError.invalidArgument("volume \(volumeID) has no in-sync replica to serve it from")
            }
            try makeDirectory(mountDirectory)

            var (claimed, failures, highest) = try claimAll()
            if claimed.isEmpty {
                let reasons = failures.map { "\($0.replica): \($0.reason)" }.joined(separator: "; ")
                throw CairnError.unavailable(
                    "no replica of volume \(volumeID) could be claimed with epoch \(epoch) (\(reasons)); check that the agents on those nodes run and are reachable, then retry")
            }
            do {
                for failure in failures {
                    try markOutOfSync(failure.replica.nodeID, failure.reason)
                    logger.warning("replica recorded out of sync at start", metadata: [
                        "replica.node": "\(failure.replica.nodeID)", "reason": "\(failure.reason)"])
                }
            } catch {
                claimed.forEach { $0.io.close() }
                throw CairnError.unavailable(
                    "cannot record the unreachable replicas of volume \(volumeID) out of sync (\(error)); the volume cannot be served until the store accepts it, retry")
            }
            let convergence: ConvergenceReport
            do {
                convergence = try convergeAtClaim(&claimed, failures: &failures, highest: highest)
            } catch {
                claimed.forEach { $0.io.close() }
                throw error
            }
            generation.store(Self.firstGeneration(epoch: epoch, highest: highest), ordering: .relaxed)
            let local = claimed.filter { $0.nodeID == localNodeID }
            let ordered = local + claimed.filter { $0.nodeID != localNodeID }
            sets.withLock { s in
                s.inSync = ordered
                s.known = replicas
                for failure in failures { s.outOfSync[failure.replica.nodeID] = failure.reason }
                for replica in replicas where !replica.inSync {
                    s.outOfSync[replica.nodeID] = "out of sync in the store when the engine started"
                }
            }
            life.members = claimed

            // Before the first request: whether every write is durable when answered.
            decideDurabilityAtStart()
            let retained = Unmanaged.passRetained(self)
            var callbacks = cfuse_callbacks(read: engineRead, write: engineWrite, flush: engineFlush, trim: engineTrim,
                                            read_begin: Self.asyncReads ? engineReadBegin : nil,
                                            read_end: Self.asyncReads ? engineReadEnd : nil,
                                            read_again: Self.asyncReads ? engineReadAgain : nil,
                                            buffers_released: engineBuffersReleased)
            var message = [CChar](repeating: 0, count: 512)
            // A predecessor in this data directory died with the volume staged and the keeper
            // kept its connection: serve that one (the loop device and every request in flight
            // are on it) rather than mount anew.
            var session: OpaquePointer? = nil
            var resumedFrom: KeptConnection?
            if let kept = resume.withLock({ r in defer { r = nil }; return r }) {
                session = resumeKept(kept, callbacks: &callbacks, context: retained.toOpaque())
                if session != nil { resumedFrom = kept.entry }
            }
            if session == nil {
                // Never stack on a mount left here by a killed process (docs/engine.md).
                do {
                    try DeadFUSEMounts.detach(under: mountDirectory, exactly: true, logger: logger)
                } catch {
                    retained.release()
                    claimed.forEach { $0.io.close() }
                    life.members = []
                    throw CairnError.internal("cannot check \(mountDirectory) for a dead FUSE mount before mounting: \(error)")
                }
                if let other = (try? MountTable.read())?.last(where: { $0.mountPoint == (Validate.realPath(mountDirectory) ?? mountDirectory) }),
                   other.fsType == "fuse.cairn" {
                    retained.release()
                    claimed.forEach { $0.io.close() }
                    life.members = []
                    throw CairnError.internal(
                        "another engine of this process already serves \(mountDirectory) (FUSE connection \(other.minor)); Cairn will not mount a second one on top")
                }
                session = withUnsafePointer(to: &callbacks) { cb in
                    cfuse_mount(mountDirectory, volumeID, sizeBytes, cb, retained.toOpaque(), &message, message.count)
                }
            }
            guard let session else {
                retained.release()
                claimed.forEach { $0.io.close() }
                life.members = []
                let reason = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                throw CairnError.internal("cannot expose volume \(volumeID) through FUSE: \(reason)")
            }
            life.session = session
            life.retained = retained
            var why = [CChar](repeating: 0, count: 256)
            let async = cfuse_async_reads(session, &why, why.count) == 1
            asyncReadsOn.store(async, ordering: .relaxed)
            cfuse_set_inline_reads(session, inlineReads.load(ordering: .relaxed) ? 1 : 0)
            cfuse_set_idle_trim(session, idleTrimMilliseconds.load(ordering: .relaxed))
            var trimWhy = [CChar](repeating: 0, count: 160)
            if cfuse_idle_trim_signal(&trimWhy, trimWhy.count) == 0,
               !Self.toldTrimSignalMissing.exchange(true, ordering: .relaxed) {
                let reason = String(decoding: trimWhy.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                logger.warning("idle volumes keep their FUSE workers' buffers (up to 3 MiB per worker): no signal is free to wake the workers; only the read ring's buffers are given back",
                               metadata: ["reason": "\(reason)"])
            }
            if !async && Self.asyncReads {
                let reason = String(decoding: why.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                let first = !Self.toldAsyncReadsMissing.exchange(true, ordering: .relaxed)
                logger.log(level: first ? .warning : .debug,
                           "reads of the local replica stay synchronous (one per FUSE worker, about a third of the device's random-read rate): io_uring is not available",
                           metadata: ["reason": "\(reason)", "hint": "allow io_uring for this process (sysctl kernel.io_uring_disabled=0, or the container's seccomp profile)"])
            }
            // Serving now: NodeStage may attach the file's loop device write-through.
            if writeThrough.allDurable.load(ordering: .relaxed) { LoopWriteCache.vouch(volumeFileRealPath) }
            DeadFUSEMounts.register(mountPoint: mountDirectory, connection: UInt32(cfuse_connection_id(session)))
            keeper?.hold(KeptConnection(volumeID: volumeID, mountPoint: mountDirectory,
                                        connection: UInt32(cfuse_connection_id(session)),
                                        protoMinor: UInt32(cfuse_protocol_minor(session)), dataKey: cipher?.key),
                         fd: cfuse_device_fd(session))
            if resumedFrom != nil {
                // Only now — claimed, converged, serving — may the kernel hand out again what the
                // dead engine had read and not answered; every such request is served once more.
                let r = cfuse_resend(session)
                if r == 0 {
                    logger.notice("resumed the volume's FUSE connection after its engine's process died: the kernel resends the requests that were in flight",
                                  metadata: ["fuse.connection": "\(cfuse_connection_id(session))"])
                } else {
                    logger.error("resumed the volume's FUSE connection but the kernel refused to resend the requests in flight; those wait until the volume is unstaged",
                                 metadata: ["error": "\(String(cString: strerror(-r)))"])
                }
            }
            if let recovery {
                life.driver = RecoveryDriver(engine: self, recovery: recovery)
            }
            logger.info("volume engine started", metadata: [
                "path": "\(path)", "replicas.in_sync": "\(ordered.map(\.nodeID))",
                "replicas.out_of_sync": "\(failures.map(\.replica.nodeID))", "generation": "\(highest)",
                "converged.blocks": "\(convergence.blocksConverged)",
                "converge.regions": "\(convergence.compareWhole ? "all" : String(convergence.regionsCompared))",
                "converge.seconds": "\(String(format: "%.3f", convergence.seconds))",
                "fuse.connection": "\(cfuse_connection_id(session))",
                "fuse.resumed": "\(resumedFrom != nil)",
                "write_through": "\(writeThrough.allDurable.load(ordering: .relaxed))",
                "writes.answered_by_round": "\(writeThrough.allDurable.load(ordering: .relaxed) && Self.deferredWriteAnswers)",
                "reads.async": "\(async)", "reads.inline_when_alone": "\(async && inlineReads.load(ordering: .relaxed))",
                "buffers.idle_trim_seconds": "\(Double(idleTrimMilliseconds.load(ordering: .relaxed)) / 1000)"])
            return path
        }
    }

    /// The kept connection this engine was given and did not get to (start failed before it).
    func takeUnusedResume() -> KeptFUSE? {
        resume.withLock { r in defer { r = nil }; return r }
    }

    /// Serves the kept connection `kept` if the kernel still has it mounted here; nil (after
    /// logging why) when it cannot be, the caller then mounts anew.
    private func resumeKept(_ kept: KeptFUSE, callbacks: inout cfuse_callbacks,
                            context: UnsafeMutableRawPointer) -> OpaquePointer? {
        let entry = kept.entry
        let root = Validate.realPath(mountDirectory) ?? mountDirectory
        let mounted = (try? MountTable.read())?.last(where: { $0.mountPoint == root })
        guard let mounted, mounted.fsType == "fuse.cairn", mounted.minor == entry.connection else {
            logger.warning("the kept FUSE connection is no longer mounted at the engine's directory; mounting anew",
                           metadata: ["fuse.connection": "\(entry.connection)", "mounted": "\(mounted.map { "\($0.fsType) 0:\($0.minor)" } ?? "nothing")"])
            DeadFUSEMounts.unregister(mountPoint: mountDirectory)
            return nil
        }
        var message = [CChar](repeating: 0, count: 512)
        let session = withUnsafePointer(to: &callbacks) { cb in
            cfuse_resume(kept.fd, mountDirectory, volumeID, sizeBytes, entry.protoMinor, cb, context, &message, message.count)
        }
        if session == nil {
            let reason = String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            logger.error("cannot resume the kept FUSE connection; it is aborted (I/O in flight on it fails) and the volume is mounted anew",
                         metadata: ["fuse.connection": "\(entry.connection)", "reason": "\(reason)"])
            DeadFUSEMounts.unregister(mountPoint: mountDirectory)
        }
        return session
    }

    /// Unmounts FUSE (no callback runs after it returns) and closes the replicas. Idempotent.
    public func stop() {
        // The recovery thread first (it may hold a catching-up replica): outside the lifecycle
        // lock, because its resync may be waiting for writes that FUSE threads are finishing.
        let driver = lifecycle.withLock { life in
            defer { life.driver = nil }
            return life.driver
        }
        // Each step logged: a stop that hangs says where (docs/soak.md, the open split-bed case).
        LoopWriteCache.withdraw(volumeFileRealPath)
        logger.info("stopping the volume engine: its recovery thread first", metadata: ["fenced": "\(fenced.load(ordering: .relaxed))"])
        driver?.stop()
        logger.info("the volume engine's recovery thread stopped; unmounting FUSE")
        lifecycle.withLock { life in
            if let session = life.session {
                // A loop device still on the file (the process is shutting down with the volume
                // staged) can never serve again once this engine is gone; after the lazy
                // unmount it would name "/volume" and nobody could find it by its path.
                DeadFUSEMounts.releaseLoopDevices(over: Validate.realPath(path) ?? path, logger: logger)
                if cfuse_unmount(session) != 0 {
                    logger.warning("the FUSE connection was still in use (a loop device on the file?) and was aborted")
                }
                DeadFUSEMounts.unregister(mountPoint: mountDirectory)
                keeper?.drop(volumeID: volumeID)
                life.session = nil
                life.retained?.release()
                life.retained = nil
                logger.info("volume engine stopped", metadata: ["path": "\(path)"])
            }
            // Every handle: those claimed at start and those a resync added since.
            let current = sets.withLock { s in
                defer { s.catchingUp = [] }
                return s.inSync + s.catchingUp
            }
            var closed = Set<ObjectIdentifier>()
            for member in life.members + current where closed.insert(ObjectIdentifier(member)).inserted {
                member.io.close()
            }
            life.members = []
            life.stopped = true
        }
        metrics.destroy()
    }

    /// Grows the volume online to `newSize` (a multiple of 4 KiB; the same size is a no-op,
    /// smaller is refused): every in-sync replica first — one that fails is recorded out of
    /// sync like a failed write, and its resync grows it — then the FUSE file, whose new size
    /// the kernel sees at once (`losetup -c` on the loop device then picks it up).
    public func grow(to newSize: UInt64) throws {
        guard newSize > 0, newSize % UInt64(Self.blockSize) == 0 else {
            throw CairnError.invalidArgument("volume size \(newSize) is not a positive multiple of \(Self.blockSize) bytes")
        }
        try growth.withLock { _ in
            let current = sizeBytes
            guard newSize >= current else {
                throw CairnError.invalidArgument("volume \(volumeID) is \(current) bytes; it cannot shrink to \(newSize)")
            }
            guard newSize > current else { return }
            if fenced.load(ordering: .acquiring) {
                throw CairnError.failedPrecondition("the engine for volume \(volumeID) was fenced (attached elsewhere); grow it there")
            }
            let members = sets.withShared { $0.inSync }
            var failures: [(Member, any Error)] = []
            for member in members {
                do { try member.io.grow(volumeID: volumeID, sizeBytes: newSize, epoch: epoch) } catch { failures.append((member, error)) }
            }
            if !failures.isEmpty, !settle(failures, succeeded: members.count - failures.count, what: "grow to \(newSize)") {
                throw CairnError.unavailable(
                    "volume \(volumeID) could not grow to \(newSize) bytes on any in-sync replica (\(failures.map { "\($0.0.nodeID): \($0.1)" }.joined(separator: "; "))); retry")
            }
            size.store(newSize, ordering: .releasing)
            replicaSize.max(newSize, ordering: .relaxed)
            let refreshed = lifecycle.withLock { life -> Int32 in
                guard let session = life.session else { return 0 }
                return cfuse_set_size(session, newSize)
            }
            if refreshed != 0 {
                logger.warning("the kernel was not told the volume file's new size; a stat may show the old one until its attribute cache expires",
                               metadata: ["volume.size": "\(newSize)", "errno": "\(-refreshed)"])
            }
            logger.info("volume grown", metadata: ["volume.size": "\(newSize)", "volume.previous_size": "\(current)"])
        }
    }

    /// Sets how long the volume must go without a request before its FUSE buffers go back to the
    /// kernel (0: never); applies to the running session at once.
    public func setIdleTrim(milliseconds: UInt32) {
        idleTrimMilliseconds.store(milliseconds, ordering: .relaxed)
        lifecycle.withLock { life in
            if let session = life.session { cfuse_set_idle_trim(session, milliseconds) }
        }
    }

    fileprivate func buffersReleased(bytes: UInt64) { metrics.buffersReleased(bytes: bytes) }

    public var state: EngineState {
        var buffers: (trims: UInt64, released: UInt64, resident: UInt64) = (0, 0, 0)
        let running = lifecycle.withLock { life in
            if let session = life.session { cfuse_buffer_stats(session, &buffers.trims, &buffers.released, &buffers.resident) }
            return life.session != nil
        }
        let (inSync, outOfSync, resync, known) = sets.withShared { s in (s.inSync.map(\.nodeID), s.outOfSync, s.resync, s.known) }
        let order = (replicas + known).map(\.nodeID)
        return EngineState(
            volumeID: volumeID, epoch: epoch, path: running ? path : nil,
            inSync: inSync.sorted { (order.firstIndex(of: $0) ?? 0) < (order.firstIndex(of: $1) ?? 0) },
            outOfSync: outOfSync, fenced: fenced.load(ordering: .acquiring),
            generation: generation.load(ordering: .relaxed),
            reads: reads.load(ordering: .relaxed), writes: writes.load(ordering: .relaxed),
            flushes: flushes.load(ordering: .relaxed), trims: trims.load(ordering: .relaxed),
            bytesRead: bytesRead.load(ordering: .relaxed), bytesWritten: bytesWritten.load(ordering: .relaxed),
            errors: errors.load(ordering: .relaxed), resync: resync,
            repairedBlocks: repaired.load(ordering: .relaxed), unrepairableBlocks: unrepairable.load(ordering: .relaxed),
            scrubbedBlocks: scrubbed.load(ordering: .relaxed), scrubPasses: scrubPasses.load(ordering: .relaxed),
            scrubbedWhileBusyBlocks: scrubbedWhileBusy.load(ordering: .relaxed),
            minInSync: minimumInSync.load(ordering: .relaxed),
            refusedBelowMinInSync: refusedBelowMinimum.load(ordering: .relaxed),
            durableWrites: durableWriteCount.load(ordering: .relaxed),
            flushesWithoutSync: flushesWithoutSync.load(ordering: .relaxed),
            writeThrough: writeThrough.allDurable.load(ordering: .relaxed),
            writeThroughOwnFlushes: writeThrough.ownFlushes.load(ordering: .relaxed),
            asyncReads: asyncReadsOn.load(ordering: .relaxed), readsRedone: readsRedone.load(ordering: .relaxed),
            readsInline: readsInline.load(ordering: .relaxed),
            idleTrims: buffers.trims, bufferBytesReleased: buffers.released, bufferBytesResident: buffers.resident)
    }

    private struct ClaimFailure { var replica: EngineReplica; var reason: String }

    /// Bits of a generation below the epoch: each engine numbers its writes from
    /// `epoch << epochShift` (or above what its claimed replicas hold), so two engines never use
    /// the same generation — not even when the new one could not claim a replica that holds a
    /// higher generation from the old one (an unacknowledged write on an unreachable replica).
    /// Two writes of one block with one generation and different data would look equal to
    /// resync and convergence forever. 2^44 writes per attachment (5 years at 100k IOPS);
    /// 2^19 attachments per volume before the numbering falls back to "above the highest".
    static let epochShift: UInt64 = 44

    static func firstGeneration(epoch: UInt64, highest: UInt64) -> UInt64 {
        guard epoch < 1 << (63 - epochShift) else { return highest }
        return max(highest, epoch << epochShift)
    }

    /// Converges the claimed in-sync replicas (Convergence.swift) before the first I/O. A
    /// replica that fails meanwhile is recorded out of sync and dropped, like one that could not
    /// be claimed, and the others converge again; a fencing signal fails the start.
    private func convergeAtClaim(_ claimed: inout [Member], failures: inout [ClaimFailure],
                                 highest: UInt64) throws -> ConvergenceReport {
        while true {
            do {
                let report = try converge(claimed, settledThrough: highest)
                if report.blocksConverged > 0 {
                    logger.warning("in-sync replicas differed at claim (writes an earlier engine never acknowledged); rolled forward to the newest version", metadata: [
                        "regions": "\(report.regionsDiffering)", "blocks": "\(report.blocksConverged)",
                        "bytes": "\(report.bytesCopied)", "seconds": "\(String(format: "%.3f", report.seconds))",
                        "replicas": "\(claimed.map(\.nodeID))"])
                }
                return report
            } catch {
                let member = error.member
                if isFencing(error.error) {
                    logger.error("fenced while converging the replicas at start", metadata: [
                        "replica.node": "\(member.nodeID)", "error": "\(error.error)"])
                    throw CairnError.failedPrecondition(
                        "volume \(volumeID): replica on \(member.nodeID) has seen an epoch newer than \(epoch) (\(error.error)); this attachment was superseded — publish the volume again")
                }
                let reason = "converging the in-sync replicas at claim failed: \(error.error)"
                do {
                    try markOutOfSync(member.nodeID, reason)
                } catch {
                    throw CairnError.unavailable(
                        "cannot record replica \(member.nodeID) of volume \(volumeID) out of sync after it failed while converging (\(error)); retry")
                }
                logger.warning("replica recorded out of sync at start", metadata: [
                    "replica.node": "\(member.nodeID)", "reason": "\(reason)"])
                member.io.close()
                claimed.removeAll { $0 === member }
                failures.append(ClaimFailure(replica: member.replica, reason: reason))
            }
        }
    }

    /// Connects and claims every replica; returns the claimed ones, the failures and the highest
    /// generation any claimed replica holds.
    private func claimAll() throws -> ([Member], [ClaimFailure], UInt64) {
        var claimed: [Member] = []
        var failures: [ClaimFailure] = []
        var highest: UInt64 = 0
        for replica in replicas where replica.inSync {
            var io: (any ReplicaIO)?
            do {
                let connected = try connect(replica)
                io = connected
                let status = try connected.claim(volumeID: volumeID, epoch: epoch)
                guard status.size >= sizeBytes else {
                    throw CairnError.failedPrecondition("the replica holds \(status.size) bytes, less than the volume's \(sizeBytes)")
                }
                claimed.append(Member(replica: replica, io: connected, claimedSize: status.size))
                highest = max(highest, status.highestGeneration)
            } catch where isFencing(error) {
                io?.close()
                claimed.forEach { $0.io.close() }
                logger.error("fenced at start: a replica has seen a newer epoch", metadata: [
                    "replica.node": "\(replica.nodeID)", "error": "\(error)"])
                throw CairnError.failedPrecondition(
                    "volume \(volumeID): replica on \(replica.nodeID) has seen an epoch newer than \(epoch) (\(error)); this attachment was superseded — publish the volume again")
            } catch {
                io?.close()
                failures.append(ClaimFailure(replica: replica, reason: "claim with epoch \(epoch) failed: \(error)"))
            }
        }
        return (claimed, failures, highest)
    }

    private func makeDirectory(_ path: String) throws {
        var current = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            current += "/" + component
            if mkdir(current, 0o700) != 0 && errno != EEXIST {
                throw CairnError.internal("cannot create the engine's mount directory \(current): \(String(cString: strerror(errno)))")
            }
        }
    }

    // MARK: I/O (called on FUSE worker threads)

    fileprivate func read(offset: UInt64, size: Int, into buffer: UnsafeMutableRawPointer) -> Int {
        guard let began = admitRead(size: size) else { return failed(EIO) }
        return readAdmitted(offset: offset, size: size, into: buffer, began: began)
    }

    /// A read's start: nil once fenced; else its QoS admission, and its start time.
    private func admitRead(size: Int) -> UInt64? {
        if fenced.load(ordering: .relaxed) { return nil }
        let began = metrics.start()
        metrics.throttled(nanoseconds: limiter.admit(bytes: size))
        return began
    }

    /// A read of whole blocks that the shim may do asynchronously (docs/engine.md,
    /// "Asynchronous reads"): when the first in-sync replica is one this process reads itself
    /// and the blocks lie in one file, the plan says where and `CFUSE_READ_PLANNED` is
    /// returned; `endRead` checks the data when it has arrived. Otherwise read here, as `read`.
    fileprivate func beginRead(offset: UInt64, size: Int, into buffer: UnsafeMutableRawPointer,
                               plan: UnsafeMutablePointer<cfuse_read_plan>) -> Int {
        guard let began = admitRead(size: size) else { return failed(EIO) }
        guard let member = sets.withShared({ $0.inSync.first }) else { return failed(EIO) }
        let planned: ReplicaStore.PlannedRead?
        do {
            // The shim sends at most CFUSE_ASYNC_READ_MAX_BLOCKS (== maxPlannedBlocks) blocks,
            // one checksum slot each.
            planned = try member.io.planRead(volumeID: volumeID, offset: offset, length: size, epoch: epoch,
                                             checksums: plan.pointee.crc)
        } catch {
            // The read proper says what is wrong (and records the replica if it must).
            planned = nil
        }
        guard let planned else { return readAdmitted(offset: offset, size: size, into: buffer, began: began) }
        guard planned.fd >= 0 else {
            // Nothing written there: zeros, no I/O (an encrypted volume's never-written blocks
            // read as zeros as well).
            buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
            return finishedRead(size: size, began: began)
        }
        plan.pointee.fd = planned.fd
        plan.pointee.file_offset = planned.fileOffset
        plan.pointee.zero_mask = planned.zeros
        plan.pointee.began = began
        plan.pointee.owner = Unmanaged.passRetained(member).toOpaque()
        return Int(CFUSE_READ_PLANNED)
    }

    /// A planned read has arrived (`result`: bytes read or -errno): every block checked against
    /// the checksum it had when the read was planned. A block that does not match was written
    /// or trimmed since (or is damaged): `CFUSE_READ_AGAIN`, and the shim has `readAgain` read
    /// the range the ordinary way on its redo thread. Runs on the shim's completion thread,
    /// which must never wait for the replica's lock: a replica closing a data file holds it
    /// exclusively until every planned read has ended, and this thread ends them.
    fileprivate func endRead(offset: UInt64, size: Int, into buffer: UnsafeMutableRawPointer, result: Int,
                             plan: UnsafeMutablePointer<cfuse_read_plan>) -> Int {
        let member = Unmanaged<Member>.fromOpaque(plan.pointee.owner!).takeRetainedValue()
        member.io.endPlannedRead()
        if plan.pointee.inline_read != 0 { readsInline.wrappingAdd(1, ordering: .relaxed) }
        let began = plan.pointee.began
        var good = result >= 0
        if good && result < size {
            // The file ends there (never written so far): the rest reads as zeros.
            (buffer + result).initializeMemory(as: UInt8.self, repeating: 0, count: size - result)
        }
        let zeros = plan.pointee.zero_mask
        let blocks = size / Self.blockSize
        var i = 0
        while good && i < blocks {
            let block = UnsafeMutableRawBufferPointer(start: buffer + i * Self.blockSize, count: Self.blockSize)
            if zeros & (1 << UInt64(i)) != 0 {
                block.initializeMemory(as: UInt8.self, repeating: 0)
            } else if CRC32C.checksum(UnsafeRawBufferPointer(block)) != plan.pointee.crc[i] {
                good = false
            }
            i += 1
        }
        if !good {
            readsRedone.wrappingAdd(1, ordering: .relaxed)
            metrics.readRedone()
            if result < 0 {
                logger.warning("an asynchronous read of the local replica failed; reading it again the ordinary way", metadata: [
                    "offset": "\(offset)", "length": "\(size)", "error": "\(String(cString: strerror(Int32(-result))))"])
            }
            return Int(CFUSE_READ_AGAIN)
        }
        if let r = decrypt(offset: offset, UnsafeMutableRawBufferPointer(start: buffer, count: size)), r != 0 {
            return failed(-r)
        }
        return finishedRead(size: size, began: began)
    }

    /// A planned read `endRead` sent back, read the ordinary way: under the replica's locks,
    /// from another replica (and this one repaired) if the damage is real. On the shim's redo
    /// thread.
    fileprivate func readAgain(offset: UInt64, size: Int, into buffer: UnsafeMutableRawPointer,
                               plan: UnsafeMutablePointer<cfuse_read_plan>) -> Int {
        let r = readPlain(offset: offset, into: UnsafeMutableRawBufferPointer(start: buffer, count: size))
        guard r == 0 else { return failed(-r) }
        return finishedRead(size: size, began: plan.pointee.began)
    }

    private func finishedRead(size: Int, began: UInt64) -> Int {
        reads.wrappingAdd(1, ordering: .relaxed)
        bytesRead.wrappingAdd(UInt64(size), ordering: .relaxed)
        metrics.read(bytes: size, since: began)
        return size
    }

    private func readAdmitted(offset: UInt64, size: Int, into buffer: UnsafeMutableRawPointer, began: UInt64) -> Int {
        let block = UInt64(Self.blockSize)
        let start = offset & ~(block - 1)
        let end = (offset + UInt64(size) + block - 1) & ~(block - 1)
        let skip = Int(offset - start)
        let result: Int32
        if skip == 0 && end - start == UInt64(size) {
            // Whole blocks (what the loop device asks for): straight into the reply buffer.
            result = readPlain(offset: start, into: UnsafeMutableRawBufferPointer(start: buffer, count: size))
        } else {
            var blocks = [UInt8](repeating: 0, count: Int(end - start))
            result = blocks.withUnsafeMutableBytes { readPlain(offset: start, into: $0) }
            if result == 0 {
                blocks.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress! + skip, byteCount: size) }
            }
        }
        guard result == 0 else { return failed(-result) }
        return finishedRead(size: size, began: began)
    }

    /// `readBlocks`, decrypted for an encrypted volume. 0 or -errno.
    private func readPlain(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Int32 {
        let result = readBlocks(offset: offset, into: buffer)
        guard result == 0 else { return result }
        return decrypt(offset: offset, buffer) ?? 0
    }

    /// Decrypts blocks read of an encrypted volume in place: nil for a plain volume, else 0 or
    /// -errno.
    private func decrypt(offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) -> Int32? {
        guard let cipher else { return nil }
        do {
            try cipher.decrypt(offset: offset, buffer)
            return 0
        } catch {
            logger.error("cannot decrypt a read; answered EIO", metadata: ["offset": "\(offset)", "error": "\(error)"])
            return -EIO
        }
    }

    /// `writeBlocks` of plaintext: encrypted first for an encrypted volume. 0 or -errno.
    private func writePlain(offset: UInt64, data: UnsafeRawBufferPointer) -> Int32 {
        guard let cipher else { return writeBlocks(offset: offset, data: data) }
        return withUnsafeTemporaryAllocation(byteCount: data.count, alignment: VolumeEngine.blockSize) { sealed in
            do {
                try cipher.encrypt(offset: offset, data, into: sealed)
            } catch {
                logger.error("cannot encrypt a write; answered EIO", metadata: ["offset": "\(offset)", "error": "\(error)"])
                return -EIO
            }
            return writeBlocks(offset: offset, data: UnsafeRawBufferPointer(sealed))
        }
    }

    /// Reads aligned blocks from the first in-sync replica that answers (the local one first);
    /// a replica that fails is recorded out of sync before the next is tried. 0 or -errno.
    private func readBlocks(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Int32 {
        var tried: [ObjectIdentifier] = []
        while true {
            if fenced.load(ordering: .relaxed) { return -EIO }
            guard let member = sets.withShared({ s in s.inSync.first { !tried.contains(ObjectIdentifier($0)) } }) else {
                return -EIO
            }
            do {
                try member.io.read(volumeID: volumeID, offset: offset, into: buffer, epoch: epoch)
                return 0
            } catch where damagedBlock(error) != nil && !isFencing(error) {
                // Silent corruption on this replica: answer from another and repair this copy.
                return readRepairing(damaged: member, error: error, offset: offset, into: buffer)
            } catch {
                if !settle([(member, error)], succeeded: 0, what: "read at offset \(offset)", allowIfNoneSucceeded: true) {
                    return -EIO
                }
                tried.append(ObjectIdentifier(member))
            }
        }
    }

    fileprivate func write(offset: UInt64, data: UnsafeRawBufferPointer) -> Int32 {
        let block = UInt64(Self.blockSize)
        let began = metrics.start()
        metrics.throttled(nanoseconds: limiter.admit(bytes: data.count))
        let start = offset & ~(block - 1)
        let end = (offset + UInt64(data.count) + block - 1) & ~(block - 1)
        // Overlapping writes one after the other, then the snapshot barrier's gate (a write
        // waiting for another is not yet in flight as the barrier counts it).
        var result: Int32 = overlaps.with(start: start, end: end) {
            enterGate()
            defer { leaveGate() }
            if offset % block == 0 && UInt64(data.count) % block == 0 {
                return writePlain(offset: offset, data: data)
            } else {
                return writePartial(offset: offset, data: data)
            }
        }
        // Write-through: the kernel may send no flush, so nothing is answered before it is durable.
        // On a FUSE worker the answer goes with the flush round that makes it durable, and the
        // worker goes back to the kernel meanwhile (`deferUntilDurable`).
        if result == 0 && writeThrough.allDurable.load(ordering: .relaxed) && needsDurabilityFlush {
            let bytes = data.count
            if deferUntilDurable({ [self] deferred, result in
                cfuse_answer_write(deferred, Int32(finishedWrite(result, bytes: bytes, began: began)))
            }) {
                return 0
            }
            result = makeAnswerDurable()
        }
        return Int32(finishedWrite(result, bytes: data.count, began: began))
    }

    /// A write's end: counted, and its answer (0 or -errno).
    private func finishedWrite(_ result: Int32, bytes: Int, began: UInt64) -> Int {
        if result != 0 { return failed(-result) }
        writes.wrappingAdd(1, ordering: .relaxed)
        bytesWritten.wrappingAdd(UInt64(bytes), ordering: .relaxed)
        metrics.write(bytes: bytes, since: began)
        return 0
    }

    /// Whole blocks: the next generation, to every in-sync replica. 0 or -errno.
    ///
    /// The calling thread does it all: it sends the write to the other replicas first
    /// (`beginWrite` — the data protocol's client returns once the frame is sent), writes the
    /// first (local) replica itself, then waits for the others' replies. No helper threads, so
    /// no thread hand-offs on the hot path.
    func writeBlocks(offset: UInt64, data: UnsafeRawBufferPointer) -> Int32 {
        if fenced.load(ordering: .relaxed) { return -EIO }
        let (members, inSyncCount, ticket) = enter()
        defer { leave(ticket) }
        guard inSyncCount > 0 else { return -EIO }
        guard meetsMinimum(inSyncCount, what: "write at offset \(offset)") else { return -EIO }
        let (generation, slot) = takeGeneration()
        defer { finishGeneration(slot: slot) }
        let volumeID = volumeID, epoch = epoch
        let failures: [(Member, any Error)]
        if wantsDurable(length: data.count) {
            durableWriteCount.wrappingAdd(1, ordering: .relaxed)
            metrics.durableWrite()
            // Each replica says whether it made the write durable; one that did not is flushed
            // by the next flush (its count moves on after its answer, before the application's).
            failures = fromThisThread(members, begin: { member in
                let wait = member.io.beginWrite(volumeID: volumeID, offset: offset, data: data, generation: generation,
                                                epoch: epoch, durable: true)
                return { if try !wait() { member.noteUnflushed() } }
            }, local: { member in
                if try !member.io.write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch,
                                        durable: true) {
                    member.noteUnflushed()
                }
            })
        } else {
            failures = fromThisThread(members, begin: {
                $0.io.beginWrite(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
            }, local: {
                try $0.io.write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
            })
            // After the answers, before the application's: a flush that reads the count from
            // now on is sent to these replicas.
            for member in members { member.noteUnflushed() }
        }
        if failures.isEmpty { return 0 }
        if settleWithCatchingUp(failures, members: members, inSyncCount: inSyncCount, what: "write at offset \(offset)") {
            return 0
        }
        unsettled.store(true, ordering: .releasing)
        return -EIO
    }

    /// Whether this write should be a durable write: the application writes one block range
    /// and then flushes, at queue depth 1 — a database's commit. Then asking every replica to
    /// make the write durable as it writes it (one sync each, the one the flush would have
    /// cost) lets the flush that follows answer at once, saving a round trip to every replica.
    /// Guessed from what the application did: this is the only write in flight, the first
    /// since the last flush, and each of the last two flushes came after exactly one write.
    /// (One is not enough: a filesystem's journal commit on the volume flushes, writes its
    /// commit block, and flushes again — one write between two flushes — after several
    /// writes of journal blocks; guessing from one would sync every transaction's first
    /// journal write for nothing.) A wrong guess costs a sync per replica, never correctness:
    /// a flush is still sent to any replica with a write it did not make durable.
    /// The caller is past the barrier's gate (`gatedInFlight` counts it).
    @inline(__always)
    func wantsDurable(length: Int) -> Bool {
        let since = writesSinceFlush.load(ordering: .relaxed)
        if since < 2 { writesSinceFlush.wrappingAdd(1, ordering: .relaxed) }
        if alternateDurableForTesting.load(ordering: .relaxed) {
            return alternation.wrappingAdd(1, ordering: .relaxed).oldValue & 1 == 0 && length <= Self.durableWriteLimit
        }
        // Write-through: every write must be durable before its answer. Alone, as it is written
        // is cheapest; with others in flight, a flush round shared with them (FlushRounds).
        if writeThrough.allDurable.load(ordering: .relaxed) {
            return Self.durableWritesEnabled && length <= Self.durableWriteLimit && gatedInFlight.load(ordering: .relaxed) == 1
        }
        let run: UInt64 = (1 << Self.commitRun) - 1
        return Self.durableWritesEnabled && since == 0 && length <= Self.durableWriteLimit
            && gatedInFlight.load(ordering: .relaxed) == 1
            && recentSingleWriteFlushes.load(ordering: .relaxed) & run == run
    }

    /// Runs one operation on every member from the calling thread: `begin` starts it on the
    /// others (their frames sent), `local` runs it on the first (the local replica) meanwhile,
    /// then the others' outcomes are awaited. Returns the failures.
    private func fromThisThread(_ members: [Member], begin: (Member) -> () throws -> Void,
                                local: (Member) throws -> Void) -> [(Member, any Error)] {
        withUnsafeTemporaryAllocation(of: (() throws -> Void).self, capacity: members.count) { pending in
            for i in 1..<max(members.count, 1) { pending.initializeElement(at: i, to: begin(members[i])) }
            var failures: [(Member, any Error)] = []
            do { try local(members[0]) } catch { failures.append((members[0], error)) }
            for i in 1..<max(members.count, 1) {
                do { try pending[i]() } catch { failures.append((members[i], error)) }
                pending.deinitializeElement(at: i)
            }
            return failures
        }
    }

    /// A write that does not cover whole blocks: read the blocks, patch, write them whole.
    /// The caller holds the blocks in `overlaps`, so no other write of them runs between the
    /// read and the write.
    func writePartial(offset: UInt64, data: UnsafeRawBufferPointer) -> Int32 {
        let block = UInt64(Self.blockSize)
        let start = offset & ~(block - 1)
        let end = (offset + UInt64(data.count) + block - 1) & ~(block - 1)
        var blocks = [UInt8](repeating: 0, count: Int(end - start))
        let read = blocks.withUnsafeMutableBytes { readPlain(offset: start, into: $0) }
        guard read == 0 else { return read }
        blocks.withUnsafeMutableBytes { raw in
            (raw.baseAddress! + Int(offset - start)).copyMemory(from: data.baseAddress!, byteCount: data.count)
        }
        return blocks.withUnsafeBytes { writePlain(offset: start, data: $0) }
    }

    func flush() -> Int32 {
        let began = metrics.start()
        enterGate()
        defer { leaveGate() }
        let volumeID = volumeID, epoch = epoch
        let interval = writesSinceFlush.load(ordering: .relaxed) == 0 ? 0 : writesSinceFlush.exchange(0, ordering: .relaxed)
        if interval > 0 {
            // Flushes race only with each other here; a lost update only delays a guess.
            let recent = recentSingleWriteFlushes.load(ordering: .relaxed)
            recentSingleWriteFlushes.store(recent << 1 | (interval == 1 ? 1 : 0), ordering: .relaxed)
        }
        // What this flush covers: every write answered before it (a write still in flight with
        // a lower number must not be counted as flushed by a replica that saw a higher one).
        let through = flushWatermark()
        let (result, sent) = flushInSyncMembers(volumeID: volumeID, epoch: epoch, through: through)
        if result != 0 { return Int32(failed(-result)) }
        if !sent {
            flushesWithoutSync.wrappingAdd(1, ordering: .relaxed)
            metrics.flushWithoutSync()
        }
        flushes.wrappingAdd(1, ordering: .relaxed)
        metrics.flush(since: began)
        return 0
    }

    /// Flushes every in-sync replica from the calling thread, as `writeBlocks` writes: the
    /// others' flushes are sent first (`beginFlush`), the first (local) replica's runs here,
    /// then the others' replies are awaited. No helper threads: a flush is on the path of every
    /// database commit, and a hand-off to a helper and back cost two wake-ups per replica.
    /// Failures settle as `fanOut`'s do. 0 or -errno.
    /// Returns 0 or -errno, and whether any replica was sent a flush.
    func flushInSyncMembers(volumeID: String, epoch: UInt64, through: UInt64) -> (Int32, Bool) {
        if fenced.load(ordering: .relaxed) { return (-EIO, false) }
        let (all, inSyncCount, ticket) = enter()
        defer { leave(ticket) }
        guard inSyncCount > 0 else { return (-EIO, false) }
        guard meetsMinimum(inSyncCount, what: "flush") else { return (-EIO, false) }
        // Only the replicas with a write or trim they did not make durable since their last
        // flush (the local one, when it is among them, still first).
        var members: [Member] = []
        var marks: [UInt64] = []
        members.reserveCapacity(inSyncCount)
        marks.reserveCapacity(inSyncCount)
        for member in all.prefix(inSyncCount) {
            if let mark = member.pendingMark() {
                members.append(member)
                marks.append(mark)
            }
        }
        if members.isEmpty { return (0, false) }
        let failures = fromThisThread(members, begin: {
            $0.io.beginFlush(volumeID: volumeID, epoch: epoch, through: through)
        }, local: {
            try $0.io.flush(volumeID: volumeID, epoch: epoch, through: through)
        })
        for (member, mark) in zip(members, marks) where !failures.contains(where: { $0.0 === member }) {
            member.flushedThrough.max(mark, ordering: .relaxed)
        }
        if failures.isEmpty { return (0, true) }
        // The replicas not flushed count as succeeded: everything they acknowledged is durable.
        if settleWithCatchingUp(failures, members: Array(all.prefix(inSyncCount)), inSyncCount: inSyncCount, what: "flush") {
            return (0, true)
        }
        return (-EIO, true)
    }

    /// Whole blocks inside the range are trimmed (one generation); the partial blocks at its
    /// edges are written with zeros, so the whole range reads as zeros.
    fileprivate func trim(offset: UInt64, length: UInt64) -> Int32 {
        let block = UInt64(Self.blockSize)
        let end = offset + length
        let result = overlaps.with(start: offset & ~(block - 1), end: (end + block - 1) & ~(block - 1)) {
            enterGate()
            defer { leaveGate() }
            return trimHeld(offset: offset, end: end)
        }
        // Write-through: a trim (or zeroing) is durable before its answer, as a write is.
        if result == 0 && writeThrough.allDurable.load(ordering: .relaxed) {
            let made = makeAnswerDurable()
            if made != 0 { return Int32(failed(-made)) }
        }
        return result
    }

    /// `trim` holding the blocks and the barrier's gate.
    private func trimHeld(offset: UInt64, end: UInt64) -> Int32 {
        let block = UInt64(Self.blockSize)
        let innerStart = (offset + block - 1) & ~(block - 1)
        let innerEnd = end & ~(block - 1)
        var result: Int32 = 0
        if innerStart < innerEnd {
            let volumeID = volumeID, epoch = epoch
            result = fanOut(what: "trim at offset \(innerStart)") { member, generation in
                try member.io.trim(volumeID: volumeID, offset: innerStart, length: innerEnd - innerStart,
                                   generation: generation, epoch: epoch)
            }
        }
        for (edgeStart, edgeEnd) in [(offset, min(end, innerStart)), (max(innerEnd, innerStart, offset), end)]
        where result == 0 && edgeStart < edgeEnd {
            let zeros = [UInt8](repeating: 0, count: Int(edgeEnd - edgeStart))
            result = zeros.withUnsafeBytes { writePartial(offset: edgeStart, data: $0) }
        }
        if result != 0 { return Int32(failed(-result)) }
        trims.wrappingAdd(1, ordering: .relaxed)
        return 0
    }

    /// Runs `operation` on every in-sync replica in parallel (the calling thread takes one, helper
    /// threads the others) and
    /// settles failures. `numbered` operations take the next generation. 0 or -errno.
    private func fanOut(what: @autoclosure () -> String, numbered: Bool = true,
                        _ operation: (Member, UInt64) throws -> Void) -> Int32 {
        if fenced.load(ordering: .relaxed) { return -EIO }
        // Numbered operations (trims) reach catching-up replicas too; flushes only the in-sync ones.
        let (all, inSyncCount, ticket) = enter()
        defer { leave(ticket) }
        let members = numbered ? all : Array(all.prefix(inSyncCount))
        guard inSyncCount > 0 else { return -EIO }
        guard meetsMinimum(inSyncCount, what: what()) else { return -EIO }
        let (generation, slot) = numbered ? takeGeneration() : (0, -1)
        defer { if numbered { finishGeneration(slot: slot) } }
        // A trim is never durable as it is made: the next flush goes to every replica it reached.
        defer { if numbered { for member in members { member.noteUnflushed() } } }
        if members.count == 1 {
            do {
                try operation(members[0], generation)
                return 0
            } catch {
                if settle([(members[0], error)], succeeded: 0, what: what()) { return 0 }
                if numbered { unsettled.store(true, ordering: .releasing) }
                return -EIO
            }
        }
        return withUnsafeTemporaryAllocation(of: (any Error)?.self, capacity: members.count) { outcome in
            outcome.initialize(repeating: nil)
            defer { _ = outcome.deinitialize() }
            FanOut.shared.run(members.count) { i in
                do { try operation(members[i], generation) } catch { outcome[i] = error }
            }
            var failures: [(Member, any Error)] = []
            for i in 0..<members.count {
                if let error = outcome[i] { failures.append((members[i], error)) }
            }
            if failures.isEmpty { return 0 }
            if settleWithCatchingUp(failures, members: members, inSyncCount: inSyncCount, what: what()) { return 0 }
            if numbered { unsettled.store(true, ordering: .releasing) }
            return -EIO
        }
    }

    /// Decides what failures mean, before anything is acknowledged. Returns true when the
    /// operation may be answered successfully (the failed replicas are now recorded out of
    /// sync and `succeeded` > 0, or `allowIfNoneSucceeded` for a read that will try the next).
    ///
    /// - A fencing error from any replica fences the engine: false, nothing recorded.
    /// - If no replica succeeded (a write nobody acknowledged), nothing is recorded: all
    ///   replicas still hold every acknowledged write, and recording them all out of sync would
    ///   leave the volume with none in sync.
    /// - Otherwise each failed replica is recorded out of sync (once, even under concurrent
    ///   failures), then removed from the set. If recording fails, false.
    /// The next generation for a write or trim, registered as in flight until `finishGeneration`
    /// (with the slot returned here).
    func takeGeneration() -> (generation: UInt64, slot: Int) {
        inflightGenerations.take(from: generation)
    }

    func finishGeneration(slot: Int) {
        inflightGenerations.finish(slot: slot)
    }

    /// The highest generation at or below which no write or trim is in flight.
    func flushWatermark() -> UInt64 {
        inflightGenerations.watermark(of: generation)
    }

    /// The in-sync members (local first), then the catching-up ones; the count of in-sync ones;
    /// and the ticket `leave` takes. Registers the caller as in flight under the sets' version.
    @inline(__always)
    func enter() -> ([Member], Int, Int) {
        sets.withShared { s in
            let parity = s.version & 1
            if parity == 0 { inflightEven.wrappingAdd(1, ordering: .relaxed) } else { inflightOdd.wrappingAdd(1, ordering: .relaxed) }
            if s.catchingUp.isEmpty { return (s.inSync, s.inSync.count, parity) }
            return (s.inSync + s.catchingUp, s.inSync.count, parity)
        }
    }

    @inline(__always)
    func leave(_ ticket: Int) {
        if ticket == 0 { inflightEven.wrappingSubtract(1, ordering: .releasing) } else { inflightOdd.wrappingSubtract(1, ordering: .releasing) }
    }

    /// Failures of catching-up members (index ≥ `inSyncCount`) stop their resync and do not
    /// count against the I/O (unless one is a fencing signal); the rest go through `settle`.
    private func settleWithCatchingUp(_ failures: [(Member, any Error)], members: [Member], inSyncCount: Int,
                                      what: String) -> Bool {
        let catching = Set(members[inSyncCount...].map(ObjectIdentifier.init))
        var inSyncFailures: [(Member, any Error)] = []
        for (member, error) in failures {
            if catching.contains(ObjectIdentifier(member)) && !isFencing(error) {
                member.catchUpFailure.withLock { $0 = $0 ?? "\(what) failed on it: \(error)" }
            } else {
                inSyncFailures.append((member, error))
            }
        }
        if inSyncFailures.isEmpty { return !fenced.load(ordering: .acquiring) }
        let succeeded = inSyncCount - inSyncFailures.filter { f in !catching.contains(ObjectIdentifier(f.0)) }.count
        guard settle(inSyncFailures, succeeded: succeeded, what: what) else { return false }
        // The failed replicas left the set: the write reached fewer than the volume asks for.
        return meetsMinimum(sets.withShared { $0.inSync.count }, what: what)
    }

    /// Sets the volume's `minInSync` (1...; values below 1 count as 1).
    public func setMinInSync(_ count: Int) {
        minimumInSync.store(max(1, count), ordering: .relaxed)
    }

    /// False (the I/O is answered EIO, counted, and logged at most every 10 s) when fewer than
    /// `minInSync` replicas are in sync.
    func meetsMinimum(_ inSyncCount: Int, what: @autoclosure () -> String) -> Bool {
        let minimum = minimumInSync.load(ordering: .relaxed)
        if inSyncCount >= minimum { return true }
        let refused = refusedBelowMinimum.wrappingAdd(1, ordering: .relaxed).newValue
        let now = monotonicSeconds()
        let log = refusalLogged.withLock { last in
            guard now - last >= 10 else { return false }
            last = now
            return true
        }
        if log {
            let inSync = sets.withShared { $0.inSync.map(\.nodeID) }
            logger.error("I/O refused: fewer replicas in sync than the volume's minInSync; it is served again once a replica is back in sync", metadata: [
                "operation": "\(what())", "min_in_sync": "\(minimum)", "replicas.in_sync": "\(inSync)",
                "refused.total": "\(refused)"])
        }
        return false
    }

    func settle(_ failures: [(Member, any Error)], succeeded: Int, what: String,
                        allowIfNoneSucceeded: Bool = false) -> Bool {
        if let (member, error) = failures.first(where: { isFencing($0.1) }) {
            fence(by: member.nodeID, error: error)
            return false
        }
        if succeeded == 0 && !allowIfNoneSucceeded { 
            logger.error("I/O failed on every in-sync replica; answered EIO, no replica recorded out of sync", metadata: [
                "operation": "\(what)", "errors": "\(failures.map { "\($0.0.nodeID): \($0.1)" })"])
            return false
        }
        for (member, error) in failures {
            if !recordOutOfSync(member, reason: "\(what) failed: \(error)") { return false }
        }
        return !fenced.load(ordering: .acquiring)
    }

    /// Records `member` out of sync in the store, then drops it from the in-sync set. The last
    /// in-sync replica is never recorded out of sync. True once it is recorded (by this call
    /// or an earlier one).
    func recordOutOfSync(_ member: Member, reason: String) -> Bool {
        member.recordedOut.withLock { recorded in
            if recorded { return true }
            let others = sets.withShared { s in s.inSync.contains { $0 !== member } }
            guard others else {
                logger.error("the last in-sync replica failed; answered EIO, it stays in sync", metadata: [
                    "replica.node": "\(member.nodeID)", "reason": "\(reason)"])
                return false
            }
            do {
                try markOutOfSync(member.nodeID, reason)
            } catch {
                if isFencing(error) {
                    fence(by: "the store", error: error)
                } else {
                    logger.error("cannot record a failed replica out of sync; answered EIO", metadata: [
                        "replica.node": "\(member.nodeID)", "reason": "\(reason)", "error": "\(error)"])
                }
                return false
            }
            recorded = true
            sets.withLock { s in
                s.inSync.removeAll { $0 === member }
                s.outOfSync[member.nodeID] = reason
            }
            logger.warning("replica recorded out of sync and removed from the in-sync set", metadata: [
                "replica.node": "\(member.nodeID)", "reason": "\(reason)"])
            return true
        }
    }

    func fence(by source: String, error: any Error) {
        if !fenced.exchange(true, ordering: .acquiringAndReleasing) {
            metrics.fencingEvents.increment()
            logger.error("engine fenced: a newer epoch exists for this volume; every I/O now fails with EIO (the volume was attached elsewhere — unstage it here)", metadata: [
                "by": "\(source)", "error": "\(error)"])
            recovery?.report(ClusterEvent(kind: .fenced, volumeID: volumeID, nodeID: localNodeID,
                                          message: "the engine of epoch \(epoch) was fenced by \(source): a newer attachment owns the volume"))
        }
    }

    private func failed(_ errno: Int32) -> Int {
        errors.wrappingAdd(1, ordering: .relaxed)
        return -Int(errno)
    }
}

// The C callbacks: the context is the engine, retained while mounted.

private func engine(_ context: UnsafeMutableRawPointer?) -> VolumeEngine {
    Unmanaged<VolumeEngine>.fromOpaque(context!).takeUnretainedValue()
}

private let engineRead: @convention(c) (UnsafeMutableRawPointer?, UInt64, Int, UnsafeMutableRawPointer?) -> Int = {
    context, offset, size, buffer in
    let e = engine(context)
    e.admit()
    defer { e.release() }
    return e.read(offset: offset, size: size, into: buffer!)
}

private let engineReadBegin: @convention(c) (UnsafeMutableRawPointer?, UInt64, Int, UnsafeMutableRawPointer?,
                                              UnsafeMutablePointer<cfuse_read_plan>?) -> Int = {
    context, offset, size, buffer, plan in
    let e = engine(context)
    e.admit()
    let n = e.beginRead(offset: offset, size: size, into: buffer!, plan: plan!)
    // A planned read stays admitted until it ends (a hand-over waits for it).
    if n != Int(CFUSE_READ_PLANNED) { e.release() }
    return n
}

private let engineReadEnd: @convention(c) (UnsafeMutableRawPointer?, UInt64, Int, UnsafeMutableRawPointer?, Int,
                                            UnsafeMutablePointer<cfuse_read_plan>?) -> Int = {
    context, offset, size, buffer, result, plan in
    let e = engine(context)
    let n = e.endRead(offset: offset, size: size, into: buffer!, result: result, plan: plan!)
    // A read done again stays admitted until then.
    if n != Int(CFUSE_READ_AGAIN) { e.release() }
    return n
}

private let engineReadAgain: @convention(c) (UnsafeMutableRawPointer?, UInt64, Int, UnsafeMutableRawPointer?,
                                              UnsafeMutablePointer<cfuse_read_plan>?) -> Int = {
    context, offset, size, buffer, plan in
    let e = engine(context)
    defer { e.release() }
    return e.readAgain(offset: offset, size: size, into: buffer!, plan: plan!)
}

private let engineBuffersReleased: @convention(c) (UnsafeMutableRawPointer?, UInt64) -> Void = { context, bytes in
    engine(context).buffersReleased(bytes: bytes)
}

private let engineWrite: @convention(c) (UnsafeMutableRawPointer?, UInt64, UnsafeRawPointer?, Int) -> Int32 = {
    context, offset, buffer, size in
    let e = engine(context)
    e.admit()
    defer { e.release() }
    return e.write(offset: offset, data: UnsafeRawBufferPointer(start: buffer, count: size))
}

private let engineFlush: @convention(c) (UnsafeMutableRawPointer?) -> Int32 = { context in
    let e = engine(context)
    e.admit()
    defer { e.release() }
    return e.flush()
}

private let engineTrim: @convention(c) (UnsafeMutableRawPointer?, UInt64, UInt64) -> Int32 = { context, offset, length in
    let e = engine(context)
    e.admit()
    defer { e.release() }
    return e.trim(offset: offset, length: length)
}

// MARK: Handing over to the next process

extension VolumeEngine {
    /// Every FUSE request passes here first. Once the engine is handed over (`handOver`), a new
    /// request is never served by this process: its worker parks until the process exits, the
    /// kernel keeps the request as read-but-unanswered, and the next engine of the volume gets
    /// it again (FUSE_NOTIFY_RESEND).
    func admit() {
        serving.wrappingAdd(1, ordering: .sequentiallyConsistent)
        guard handedOver.load(ordering: .sequentiallyConsistent) else { return }
        serving.wrappingSubtract(1, ordering: .sequentiallyConsistent)
        while true { sleep(3600) }
    }

    func release() {
        serving.wrappingSubtract(1, ordering: .sequentiallyConsistent)
    }

    /// The process is shutting down with the volume staged (SIGTERM: an upgrade, a supervisor):
    /// no new request is served from now on, and those being served finish (up to `timeout`),
    /// so nothing this process does afterwards — stopping its replica server, revoking its
    /// leases — fails an I/O or records a replica out of sync. The FUSE mount stays; the keeper
    /// holds the connection for the next process. Returns the requests still running at the
    /// timeout (0: all done).
    @discardableResult
    public func handOver(timeout: Duration = .seconds(5)) -> Int {
        handedOver.store(true, ordering: .sequentiallyConsistent)
        let deadline = ContinuousClock.now + timeout
        while serving.load(ordering: .sequentiallyConsistent) > 0 && ContinuousClock.now < deadline {
            usleep(2_000)
        }
        let left = serving.load(ordering: .sequentiallyConsistent)
        logger.info("handed the volume over to the next process: no new request is served here",
                    metadata: ["requests.unfinished": "\(left)"])
        return left
    }
}
