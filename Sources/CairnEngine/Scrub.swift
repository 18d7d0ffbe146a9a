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

// The background scrub (docs/recovery.md): every in-sync replica's checksums verified at
// `--scrub-rate`, bad blocks repaired from another replica.
extension VolumeEngine {
    /// Verifies blocks `firstBlock ..< firstBlock+count` on every in-sync replica and repairs
    /// what is bad from another one. Returns the blocks repaired.
    func scrub(firstBlock: UInt64, count: Int) -> UInt64 {
        let members = sets.withShared { $0.inSync }
        var total: UInt64 = 0
        for member in members {
            let bad: [UInt64]
            do {
                bad = try member.io.verify(volumeID: volumeID, firstBlock: firstBlock, count: count, epoch: epoch)
            } catch {
                if isFencing(error) { fence(by: member.nodeID, error: error); return total }
                logger.notice("scrub could not verify a replica", metadata: ["replica.node": "\(member.nodeID)", "error": "\(error)"])
                continue
            }
            guard !bad.isEmpty else { continue }
            logger.error("scrub found corrupted blocks", metadata: ["replica.node": "\(member.nodeID)", "blocks": "\(bad)"])
            for block in bad {
                total += repairBlock(member, block: block, others: members.filter { $0 !== member })
            }
        }
        return total
    }

    private func repairBlock(_ damaged: Member, block: UInt64, others: [Member]) -> UInt64 {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.blockSize, alignment: Self.blockSize)
        defer { buffer.deallocate() }
        for good in others {
            do {
                let generations = try good.io.generations(volumeID: volumeID, firstBlock: block, count: 1, epoch: epoch)
                try good.io.read(volumeID: volumeID, offset: block * UInt64(Self.blockSize), into: buffer, epoch: epoch)
                return repair(damaged, firstBlock: block, generations: generations, data: UnsafeRawBufferPointer(buffer),
                              from: good, reason: "scrub")
            } catch {
                continue
            }
        }
        unrepairable.wrappingAdd(1, ordering: .relaxed)
        logger.critical("no in-sync replica holds a good copy of a corrupted block", metadata: [
            "replica.node": "\(damaged.nodeID)", "block": "\(block)"])
        return 0
    }
}
