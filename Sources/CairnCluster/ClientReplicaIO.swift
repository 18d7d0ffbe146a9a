import CairnEngine
import CairnReplica

extension ReplicaClientError: ReplicaFencingSignal {
    /// A replica that has seen a newer epoch refuses with `staleEpoch`: the engine was fenced.
    public var isStaleEpoch: Bool {
        if case .remote(.staleEpoch, _) = self { return true }
        return false
    }
}

/// The engine's view of one replica over the data protocol.
final class ClientReplicaIO: ReplicaIO {
    let client: ReplicaClient

    init(_ client: ReplicaClient) {
        self.client = client
    }

    func claim(volumeID: String, epoch: UInt64) throws -> ReplicaStatus {
        try client.claim(volumeID: volumeID, epoch: epoch)
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

    func flush(volumeID: String, epoch: UInt64) throws {
        try client.flush(volumeID: volumeID, epoch: epoch)
    }

    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws {
        try client.trim(volumeID: volumeID, offset: offset, length: length, generation: generation, epoch: epoch)
    }

    func close() {
        client.close()
    }
}
