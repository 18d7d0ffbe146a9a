#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CairnCore
import CairnReplica
import Dispatch
import Foundation
import Logging
import Synchronization

// Delta resync, its plan: which blocks differ between the source and the target, and at which
// generation each run is copied (docs/recovery.md, step 3).
extension VolumeEngine {
    /// One run of blocks to copy: consecutive, same generation to carry, all data or all trims.
    struct CopyRun: Equatable {
        var firstBlock: UInt64
        var count: Int
        var generation: UInt64
        var trimmed: Bool
    }

    /// Compares the generations of `count` blocks from `firstBlock` and lists what to copy.
    ///
    /// A block is copied when the two differ: at the source's generation when the source's is
    /// newer; at `reserved` when the target's is newer but not above `reserved` (the target's
    /// own write that was never acknowledged: replaced by the source's version). A target block
    /// above `reserved` came from a write after the resync began and is left alone.
    func diff(source: Member, target: any ReplicaIO, firstBlock: UInt64, count: Int, reserved: UInt64) throws -> [CopyRun] {
        let a = try source.io.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
        let b = try target.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
        return Self.plan(source: a, target: b, firstBlock: firstBlock, reserved: reserved)
    }

    static func plan(source a: [UInt64], target b: [UInt64], firstBlock: UInt64, reserved: UInt64) -> [CopyRun] {
        var runs: [CopyRun] = []
        for i in 0..<min(a.count, b.count) where a[i] != b[i] {
            let sourceGeneration = BlockGenerations.generation(a[i])
            let targetGeneration = BlockGenerations.generation(b[i])
            let carry: UInt64
            if sourceGeneration > targetGeneration {
                carry = sourceGeneration
            } else if targetGeneration < reserved {
                carry = reserved
            } else {
                continue
            }
            // Never-written source blocks are copied as trims: they read as zeros.
            let trimmed = a[i] & BlockGenerations.trimmedBit != 0 || sourceGeneration == 0
            let block = firstBlock + UInt64(i)
            if var last = runs.last, last.firstBlock + UInt64(last.count) == block, last.generation == carry,
               last.trimmed == trimmed, last.count < copyRunBlocks {
                last.count += 1
                runs[runs.count - 1] = last
            } else {
                runs.append(CopyRun(firstBlock: block, count: 1, generation: carry, trimmed: trimmed))
            }
        }
        return runs
    }
}
