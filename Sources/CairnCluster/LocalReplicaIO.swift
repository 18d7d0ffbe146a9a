import CairnEngine
import CairnReplica

/// The engine's view of the replica this process's own replica server holds: calls go straight
/// to the server's open `ReplicaStore` — no frames, no loopback TCP, no thread hops. The store
/// checks every call's epoch exactly as it does for requests arriving over the network (it is
/// the same store object), so fencing is unchanged.
final class LocalReplicaIO: ReplicaIO {
    let volumeID: String
    /// Resolved once: looking it up per call took the server's registry lock on every I/O
    /// (contended under load). If the replica is deleted under the engine, the store is
    /// closed and every later call fails with `closed` (the engine records it out of sync).
    let opened: ReplicaStore

    init(server: ReplicaServer, volumeID: String) throws {
        self.volumeID = volumeID
        self.opened = try server.openStore(volumeID: volumeID)
    }

    private func store(_ volumeID: String) throws -> ReplicaStore {
        guard volumeID == self.volumeID else {
            throw ReplicaError.badRequest("this local replica handle serves volume \(self.volumeID), not \(volumeID)")
        }
        return opened
    }

    func claim(volumeID: String, epoch: UInt64) throws -> ReplicaStatus {
        let store = try store(volumeID)
        try store.claim(epoch: epoch)
        return store.status
    }

    func read(volumeID: String, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, epoch: UInt64) throws {
        try store(volumeID).read(offset: offset, into: buffer, epoch: epoch)
    }

    func planRead(volumeID: String, offset: UInt64, length: Int, epoch: UInt64,
                  checksums: UnsafeMutablePointer<UInt32>) throws -> ReplicaStore.PlannedRead? {
        try store(volumeID).planRead(offset: offset, length: length, epoch: epoch, checksums: checksums)
    }

    func endPlannedRead() { opened.endPlannedRead() }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws {
        try store(volumeID).write(offset: offset, bytes: data, generation: generation, epoch: epoch)
    }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
               durable: Bool) throws -> Bool {
        try store(volumeID).write(offset: offset, bytes: data, generation: generation, epoch: epoch, durable: durable)
    }

    func flush(volumeID: String, epoch: UInt64) throws {
        try store(volumeID).flush(epoch: epoch)
    }

    func flush(volumeID: String, epoch: UInt64, through: UInt64) throws {
        try store(volumeID).flush(epoch: epoch, through: through)
    }

    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws {
        let store = try store(volumeID)
        // The store bounds one call; a trim may cover the whole volume (as the server does).
        let chunk = UInt64(ReplicaStore.maxRequestLength)
        var done: UInt64 = 0
        while done < length {
            let n = min(chunk, length - done)
            try store.trim(offset: offset + done, length: Int(n), generation: generation == 0 ? nil : generation, epoch: epoch)
            done += n
        }
    }

    func generations(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try store(volumeID).generations(firstBlock: firstBlock, count: count, epoch: epoch)
    }

    func activity(volumeID: String, cleanThrough: UInt64, converged: Bool, epoch: UInt64) throws -> ReplicaActivity {
        try store(volumeID).activity(cleanThrough: cleanThrough, converged: converged, epoch: epoch)
    }

    func generationSummary(volumeID: String, firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try store(volumeID).generationSummary(firstRegion: firstRegion, count: count, epoch: epoch)
    }

    func writeIfNewer(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        try store(volumeID).write(offset: offset, bytes: data, generation: generation, epoch: epoch, condition: .ifNewer)
    }

    func repairWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        try store(volumeID).write(offset: offset, bytes: data, generation: generation, epoch: epoch, condition: .ifNotNewer)
    }

    func trimIfNewer(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws -> Int {
        let store = try store(volumeID)
        let chunk = UInt64(ReplicaStore.maxRequestLength)
        var done: UInt64 = 0, applied = 0
        while done < length {
            let n = min(chunk, length - done)
            applied += try store.trim(offset: offset + done, length: Int(n), generation: generation, epoch: epoch, ifNewer: true)
            done += n
        }
        return applied
    }

    func verify(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try store(volumeID).verify(firstBlock: firstBlock, count: count, epoch: epoch)
    }

    func snapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws {
        try store(volumeID).snapshot(id: snapshotID, epoch: epoch)
    }

    func grow(volumeID: String, sizeBytes: UInt64, epoch: UInt64) throws {
        try store(volumeID).grow(to: sizeBytes, epoch: epoch)
    }

    var wireBytes: (sent: UInt64, received: UInt64) { (0, 0) }

    /// The store belongs to the server; nothing to close here.
    func close() {}
}
