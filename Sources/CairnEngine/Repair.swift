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

// Read repair (docs/recovery.md): a read that finds corrupted blocks is answered from another
// in-sync replica and the bad blocks are rewritten.
extension VolumeEngine {
    // MARK: Repair and scrub

    /// A read found corrupted data on `damaged`: read the same blocks from another in-sync
    /// replica into `buffer` (answering the read), then rewrite the bad blocks on `damaged`.
    /// 0, or -EIO when no replica holds a good copy.
    func readRepairing(damaged: Member, error: any Error, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Int32 {
        let firstBlock = offset / UInt64(Self.blockSize)
        let count = buffer.count / Self.blockSize
        logger.error("corrupted data detected on read; reading it from another replica", metadata: [
            "replica.node": "\(damaged.nodeID)", "offset": "\(offset)", "error": "\(error)"])
        var tried: [ObjectIdentifier] = [ObjectIdentifier(damaged)]
        while true {
            guard let good = sets.withShared({ s in s.inSync.first { !tried.contains(ObjectIdentifier($0)) } }) else {
                unrepairable.wrappingAdd(UInt64(count), ordering: .relaxed)
                logger.critical("no in-sync replica holds a good copy of these blocks; the read fails with EIO", metadata: [
                    "offset": "\(offset)", "length": "\(buffer.count)", "damaged": "\(damaged.nodeID)"])
                return -EIO
            }
            tried.append(ObjectIdentifier(good))
            do {
                // Generations before data: a write racing with this read lands at a higher
                // generation, so repairing at the generation read first never undoes it.
                let generations = try good.io.generations(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
                try good.io.read(volumeID: volumeID, offset: offset, into: buffer, epoch: epoch)
                repair(damaged, firstBlock: firstBlock, generations: generations,
                       data: UnsafeRawBufferPointer(buffer), from: good, reason: "read")
                return 0
            } catch where damagedBlock(error) != nil && !isFencing(error) {
                logger.error("the other replica's copy is corrupted too", metadata: ["replica.node": "\(good.nodeID)"])
                continue
            } catch {
                if !settle([(good, error)], succeeded: 0, what: "read at offset \(offset)", allowIfNoneSucceeded: true) {
                    return -EIO
                }
            }
        }
    }

    /// Rewrites the blocks of `damaged` in the range that do not verify with the good data
    /// (`data`, `generations` from `good`). Returns the blocks repaired. A replica that cannot
    /// take the repair is recorded out of sync (its resync then replaces its copy).
    @discardableResult
    func repair(_ damaged: Member, firstBlock: UInt64, generations: [UInt64], data: UnsafeRawBufferPointer,
                from good: Member, reason: String) -> UInt64 {
        do {
            let bad = try damaged.io.verify(volumeID: volumeID, firstBlock: firstBlock, count: generations.count, epoch: epoch)
            var repairedHere: UInt64 = 0
            for block in bad {
                let i = Int(block - firstBlock)
                guard i >= 0, i < generations.count else { continue }
                let generation = BlockGenerations.generation(generations[i])
                let slice = UnsafeRawBufferPointer(rebasing: data[(i * Self.blockSize)..<((i + 1) * Self.blockSize)])
                if generation == 0 || generations[i] & BlockGenerations.trimmedBit != 0 {
                    // The good copy reads as zeros: the block was trimmed or never written.
                    _ = try damaged.io.repairWrite(volumeID: volumeID, offset: block * UInt64(Self.blockSize), data: slice,
                                                   generation: max(generation, 1), epoch: epoch)
                } else {
                    _ = try damaged.io.repairWrite(volumeID: volumeID, offset: block * UInt64(Self.blockSize), data: slice,
                                                   generation: generation, epoch: epoch)
                }
                repairedHere += 1
                // Written in place, not durable yet: the next flush goes to this replica.
                damaged.noteUnflushed()
                logger.warning("repaired a corrupted block from another replica", metadata: [
                    "replica.node": "\(damaged.nodeID)", "block": "\(block)", "generation": "\(generation)",
                    "source": "\(good.nodeID)", "found.by": "\(reason)"])
            }
            repaired.wrappingAdd(repairedHere, ordering: .relaxed)
            metrics.repairedBlocks.increment(by: Int64(repairedHere))
            if repairedHere > 0 {
                recovery?.report(ClusterEvent(
                    kind: .repaired, volumeID: volumeID, nodeID: damaged.nodeID,
                    message: "repaired \(repairedHere) corrupted block\(repairedHere == 1 ? "" : "s") of node \(damaged.nodeID)'s replica from node \(good.nodeID)'s (found by \(reason))"))
            }
            return repairedHere
        } catch {
            if isFencing(error) {
                fence(by: damaged.nodeID, error: error)
                return 0
            }
            logger.error("cannot repair the replica's corrupted blocks; recording it out of sync so that it is rebuilt", metadata: [
                "replica.node": "\(damaged.nodeID)", "error": "\(error)"])
            sets.withLock { s in
                for i in generations.indices { s.damaged[damaged.nodeID, default: []].insert(firstBlock + UInt64(i)) }
            }
            _ = recordOutOfSync(damaged, reason: "corrupted blocks could not be repaired: \(error)")
            return 0
        }
    }
}
