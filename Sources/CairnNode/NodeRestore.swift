import CSIProto
import CairnCSI
import CairnCore
import Logging

extension NodeService {
    /// Brings the machine back to what this node's records say, after the agent (re)starts —
    /// a crash, an upgrade or a reboot that took every loop device and mount with it:
    /// staged volumes are re-attached, checked and mounted again at their staging paths, and
    /// host-namespace targets are bound again. The same idempotent code as NodeStage and
    /// NodePublish does the work, under the same volume locks, so a CO call arriving meanwhile
    /// gets ABORTED rather than racing. Nothing is restored for a volume no longer attached to
    /// this node by the controller (it may have been fenced and moved), nor into a container
    /// namespace (its process is gone after a restart; the record is dropped).
    public func restore() async {
        let stages: [StageRecord]
        do {
            stages = try await store.stages(nodeID: nodeID)
        } catch {
            logger.error("cannot read this node's stage records; nothing restored", metadata: ["error": "\(error)"])
            return
        }
        var restored = 0, skipped = 0, failed = 0
        for stage in stages {
            let meta = metadata(stage.volumeID, path: stage.stagingPath)
            do {
                guard try await store.volume(id: stage.volumeID) != nil else {
                    logger.warning("a stage record names a volume that no longer exists; dropping it", metadata: meta)
                    try await store.removeStage(volumeID: stage.volumeID, nodeID: nodeID)
                    skipped += 1
                    continue
                }
                guard try await store.attachments(volumeID: stage.volumeID).contains(where: { $0.nodeID == nodeID }) else {
                    logger.warning("volume is staged here but no longer published to this node (moved or fenced); not restoring it",
                                   metadata: meta)
                    skipped += 1
                    continue
                }
                guard try await mounter.inspect(stage.stagingPath, in: .host).kind == .directory else {
                    logger.warning("the staging directory is gone; the volume is restored by the CO's next NodeStageVolume",
                                   metadata: meta)
                    skipped += 1
                    continue
                }
                let mode = AccessMode(rawValue: stage.accessMode) ?? .singleNodeWriter
                let access = RequestedAccess(accessType: stage.accessType, fsType: stage.fsType,
                                             mountFlags: stage.mountFlags, mode: mode)
                try await locks.withLock(stage.volumeID, operation: "restore") {
                    try await self.stage(volumeID: stage.volumeID, stagingPath: stage.stagingPath, access: access)
                    for target in try await store.publishes(volumeID: stage.volumeID) where target.nodeID == nodeID {
                        try await restorePublish(target, stage: stage)
                    }
                }
                restored += 1
            } catch {
                failed += 1
                logger.error("could not restore a staged volume; the CO's next NodeStageVolume will retry",
                             metadata: meta.merging(["error": "\(error)"]) { a, _ in a })
            }
        }
        logger.info("node state restored from records", metadata: [
            "node.id": "\(nodeID)", "restored": "\(restored)", "skipped": "\(skipped)", "failed": "\(failed)",
        ])
    }

    private func restorePublish(_ target: PublishRecord, stage: StageRecord) async throws {
        let meta = metadata(target.volumeID, path: target.targetPath)
        guard target.namespace == .host else {
            // A container's namespace does not survive its process; after an agent restart the
            // process may live on, so keep the record only while it does.
            if case .process(let pid, _) = target.namespace,
               (try? await mounter.namespace(ofProcess: pid)) != target.namespace {
                logger.info("the container a volume was hot-plugged into is gone; dropping its record", metadata: meta)
                try await store.removePublish(target)
            }
            return
        }
        let access = RequestedAccess(accessType: target.accessType, fsType: stage.fsType,
                                     mountFlags: target.mountFlags,
                                     mode: AccessMode(rawValue: target.accessMode) ?? .singleNodeWriter)
        do {
            try await publish(volumeID: target.volumeID, targetPath: target.targetPath, stagingPath: stage.stagingPath,
                              access: access, readonlyFlag: target.readonly, namespace: .host)
        } catch {
            logger.warning("could not bind a published target again; the CO's next NodePublishVolume will retry",
                           metadata: meta.merging(["error": "\(error)"]) { a, _ in a })
        }
    }
}
