import CairnCore
import CairnEngine
import CairnReplica

extension ReplicaClientError: ReplicaFencingSignal {
    /// A replica that has seen a newer epoch refuses with `staleEpoch`: the engine was fenced.
    public var isStaleEpoch: Bool {
        if case .remote(.staleEpoch, _) = self { return true }
        return false
    }
}

extension ReplicaClientError: ReplicaDamageSignal {
    /// A replica that finds a block's data not matching its checksum answers a read with
    /// `checksumMismatch` and the block's number (a field of the response, protocol version 2).
    public var damagedBlock: UInt64? {
        if case .damagedBlock(let block, _) = self { return block }
        return nil
    }
}

/// The engine's view of one replica over the data protocol.
final class ClientReplicaIO: ReplicaIO {
    let client: ReplicaClient

    /// The controller's grant of the engine's epoch to this node, carried by every claim.
    let grant: ClaimGrant?

    init(_ client: ReplicaClient, grant: ClaimGrant? = nil) {
        self.client = client
        self.grant = grant
    }

    func claim(volumeID: String, epoch: UInt64) throws -> ReplicaStatus {
        try client.claim(volumeID: volumeID, epoch: epoch, grant: grant)
    }

    func read(volumeID: String, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, epoch: UInt64) throws {
        let bytes = try client.read(volumeID: volumeID, offset: offset, length: buffer.count, epoch: epoch)
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
    }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws {
        try client.write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
    }

    func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                    epoch: UInt64) -> () throws -> Void {
        client.beginWrite(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
    }

    func beginWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64,
                    epoch: UInt64, durable: Bool) -> () throws -> Bool {
        client.beginWrite(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch,
                          durable: durable)
    }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64,
               durable: Bool) throws -> Bool {
        try client.write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch,
                         durable: durable)
    }

    func flush(volumeID: String, epoch: UInt64) throws {
        try client.flush(volumeID: volumeID, epoch: epoch)
    }

    func flush(volumeID: String, epoch: UInt64, through: UInt64) throws {
        try client.flush(volumeID: volumeID, epoch: epoch, through: through)
    }

    func beginFlush(volumeID: String, epoch: UInt64, through: UInt64) -> () throws -> Void {
        client.beginFlush(volumeID: volumeID, epoch: epoch, through: through)
    }

    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws {
        try client.trim(volumeID: volumeID, offset: offset, length: length, generation: generation, epoch: epoch)
    }

    func generations(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try client.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
    }

    func activity(volumeID: String, cleanThrough: UInt64, converged: Bool, epoch: UInt64) throws -> ReplicaActivity {
        try client.activity(volumeID: volumeID, cleanThrough: cleanThrough, converged: converged, epoch: epoch)
    }

    func generationSummary(volumeID: String, firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try client.generationSummary(volumeID: volumeID, firstRegion: firstRegion, count: count, epoch: epoch)
    }

    func writeIfNewer(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        try client.write(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch, ifNewer: true)
    }

    func repairWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        try client.repairWrite(volumeID: volumeID, offset: offset, data: data, generation: generation, epoch: epoch)
    }

    func trimIfNewer(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws -> Int {
        try client.trim(volumeID: volumeID, offset: offset, length: length, generation: generation, epoch: epoch, ifNewer: true)
    }

    func verify(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        try client.verify(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
    }

    func snapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws {
        try client.snapshot(volumeID: volumeID, snapshotID: snapshotID, epoch: epoch)
    }

    func grow(volumeID: String, sizeBytes: UInt64, epoch: UInt64) throws {
        try client.grow(volumeID: volumeID, sizeBytes: sizeBytes, epoch: epoch)
    }

    var wireBytes: (sent: UInt64, received: UInt64) { (client.bytesSent, client.bytesReceived) }

    func close() {
        client.close()
    }
}
