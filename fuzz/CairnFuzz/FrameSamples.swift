import CairnReplica

/// One request and one response of every data-protocol op, with non-trivial field values: the
/// frame codec's tests and the `frames` fuzz target's seed corpus.
public enum FrameSamples {
    public static let block = [UInt8]((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) })

    /// One request and one response of every op, with non-trivial field values.
    public static var everyOp: [Frame] {
        let requests: [FrameMessage] = [
            DataOp.Hello.request(HelloRequest(protocolVersion: 1, authToken: [0xDE, 0xAD, 0xBE, 0xEF])),
            DataOp.Claim.request(ClaimRequest(volume: "pvc-0f1e2d3c")),
            DataOp.Read.request(ReadRequest(volume: "pvc-0f1e2d3c", offset: 8192, length: 8192)),
            DataOp.Write.request(WriteRequest(volume: "pvc-0f1e2d3c", generation: 42, offset: 4096, data: block + block)),
            DataOp.Flush.request(FlushRequest(volume: "pvc-0f1e2d3c")),
            DataOp.Flush.request(FlushRequest(volume: "pvc-0f1e2d3c", through: 1 << 44 | 9)),
            DataOp.Trim.request(TrimRequest(volume: "völ-ü", generation: 43, offset: 1 << 30, length: 1 << 40)),
            DataOp.Status.request(StatusRequest(volume: String(repeating: "v", count: 128))),
            DataOp.Create.request(CreateRequest(volume: "pvc-0f1e2d3c", size: 16 << 20)),
            DataOp.Delete.request(DeleteRequest(volume: "pvc-0f1e2d3c")),
            DataOp.Generations.request(GenerationsRequest(volume: "pvc-0f1e2d3c", firstBlock: 1 << 20, count: 65_536)),
            DataOp.Write.request(WriteRequest(volume: "pvc-0f1e2d3c", generation: 40, offset: 0, data: block, ifNewer: true)),
            DataOp.Write.request(WriteRequest(volume: "pvc-0f1e2d3c", generation: 39, offset: 0, data: block, repair: true)),
            DataOp.Trim.request(TrimRequest(volume: "pvc-0f1e2d3c", generation: 44, offset: 4096, length: 8192, ifNewer: true)),
            DataOp.Summary.request(GenerationsRequest(volume: "pvc-0f1e2d3c", firstBlock: 3, count: 4096)),
            DataOp.Verify.request(GenerationsRequest(volume: "pvc-0f1e2d3c", firstBlock: 256, count: 16_384)),
            DataOp.Snapshot.request(SnapshotRequest(volume: "pvc-0f1e2d3c", snapshotID: "snap-1")),
            DataOp.Snapshot.request(SnapshotRequest(volume: "pvc-0f1e2d3c", snapshotID: String(repeating: "s", count: 128), barrier: true)),
            DataOp.DeleteSnapshot.request(SnapshotRequest(volume: "pvc-0f1e2d3c", snapshotID: "snap-1")),
            DataOp.ListSnapshots.request(ListSnapshotsRequest(volume: "pvc-0f1e2d3c")),
            DataOp.Clone.request(CloneRequest(volume: "pvc-new", source: "pvc-0f1e2d3c", snapshotID: "snap-1", size: 32 << 20)),
            DataOp.Grow.request(GrowRequest(volume: "pvc-0f1e2d3c", size: 1 << 40)),
            DataOp.HoldWrites.request(HoldWritesRequest(volume: "pvc-0f1e2d3c", timeoutMilliseconds: 30_000)),
            DataOp.ReleaseWrites.request(ReleaseWritesRequest(volume: "pvc-0f1e2d3c")),
            DataOp.Activity.request(ActivityRequest(volume: "pvc-0f1e2d3c", cleanThrough: 41, converged: true)),
            DataOp.SnapshotRead.request(SnapshotReadRequest(volume: "pvc-0f1e2d3c", snapshotID: "snap-1", offset: 1 << 32, length: 8 << 20)),
            DataOp.SnapshotGenerations.request(SnapshotGenerationsRequest(volume: "völ-ü", snapshotID: String(repeating: "s", count: 128),
                                                                          firstBlock: 1 << 20, count: 65_536)),
        ]
        let responses: [FrameMessage] = [
            DataOp.Hello.response(HelloResponse(status: .ok, protocolVersion: 1, authToken: [1, 2, 3])),
            DataOp.Claim.response(ClaimResponse(status: .staleEpoch, replicaEpoch: 9)),
            DataOp.Read.response(ReadResponse(status: .ok, data: block)),
            DataOp.Write.response(WriteResponse(status: .checksumMismatch)),
            DataOp.Flush.response(FlushResponse(status: .ok, flushedGeneration: 41)),
            DataOp.Trim.response(TrimResponse(status: .outOfRange, message: "range 0+8192 is beyond the end")),
            DataOp.Status.response(StatusResponse(status: .ok, size: 1 << 34, replicaEpoch: 7, flushedGeneration: .max, highestGeneration: 12)),
            DataOp.Create.response(PlainResponse(status: .badRequest, message: "exists with size 4096 — délète it first")),
            DataOp.Delete.response(PlainResponse(status: .ok)),
            DataOp.Generations.response(GenerationsResponse(status: .ok, generations: [0, 7, 9 | BlockGenerations.trimmedBit, .max >> 1])),
            DataOp.Generations.response(GenerationsResponse(status: .badRequest, message: "generations count 0 is outside 1...65536")),
            DataOp.Write.response(WriteResponse(status: .ok, appliedBlocks: 3)),
            DataOp.Write.response(WriteResponse(status: .staleEpoch, message: "stale epoch 1")),
            DataOp.Trim.response(TrimResponse(status: .ok, appliedBlocks: 2)),
            DataOp.Summary.response(GenerationsResponse(status: .ok, generations: [0, 0xDEAD_BEEF, 1])),
            DataOp.Verify.response(GenerationsResponse(status: .ok, generations: [])),
            DataOp.Verify.response(GenerationsResponse(status: .ok, generations: [257, 300])),
            DataOp.Snapshot.response(SnapshotResponse(status: .ok, size: 16 << 20, generation: 99)),
            DataOp.Snapshot.response(SnapshotResponse(status: .ok, nodes: ["n1", "nöde-2"], barrier: true)),
            DataOp.Snapshot.response(SnapshotResponse(status: .notFound, barrier: true, message: "no engine runs volume v on this node")),
            DataOp.DeleteSnapshot.response(PlainResponse(status: .ok)),
            DataOp.ListSnapshots.response(ListSnapshotsResponse(status: .ok, snapshots: [
                SnapshotEntry(id: "a", size: 4096, generation: 1), SnapshotEntry(id: "b", size: 1 << 30, generation: .max >> 1)])),
            DataOp.ListSnapshots.response(ListSnapshotsResponse(status: .staleEpoch, message: "stale epoch 1")),
            DataOp.Clone.response(PlainResponse(status: .notFound, message: "no snapshot s")),
            DataOp.Grow.response(PlainResponse(status: .badRequest, message: "cannot shrink")),
            DataOp.HoldWrites.response(PlainResponse(status: .notFound, message: "no engine runs volume v on this node")),
            DataOp.ReleaseWrites.response(PlainResponse(status: .ok)),
            DataOp.Activity.response(ActivityResponse(status: .ok, activity: ReplicaActivity(all: false, regions: [3, 9, 1 << 40]))),
            DataOp.SnapshotRead.response(ReadResponse(status: .ok, data: block)),
            DataOp.SnapshotRead.response(ReadResponse(status: .notFound, message: "volume v has no snapshot s on this node")),
            DataOp.SnapshotGenerations.response(GenerationsResponse(status: .ok, generations: [0, 5, 6 | BlockGenerations.trimmedBit])),
        ]
        var frames: [Frame] = []
        for (i, r) in requests.enumerated() {
            frames.append(Frame(requestID: UInt64(i + 1), epoch: 7, body: .request(r)))
        }
        for (i, r) in responses.enumerated() {
            frames.append(Frame(requestID: UInt64(i + 1) << 40, epoch: .max, body: .response(r)))
        }
        return frames
    }
}
