import CairnCore
import Logging

// One machine: a volume's QoS limits (`iopsLimit`, `bandwidthLimit`) on its loop device, through
// `IOThrottle` (cgroup v2 io.max, or the cgroup v1 blkio throttle files, at the workloads' cgroup;
// docs/engine.md, "QoS on one machine").
// Applied at every NodeStage (and restore), again when ControllerModifyVolume records new
// limits, and removed before NodeUnstage detaches the device.

extension NodeService: LocalLimitEnforcement {
    /// ControllerModifyVolume's way in (the controller runs in this process): under the
    /// volume's node lock, so it does not race a NodeStage or NodeUnstage of the volume.
    public func applyRecordedLimits(volumeID: String) async throws -> Bool {
        try Validate.volumeID(volumeID)
        return try await locks.withLock(volumeID, operation: "ControllerModifyVolume") {
            try await enforceRecordedLimits(volumeID: volumeID)
        }
    }

    /// Puts the limits recorded on the volume (read now: the newest) on the device it is staged
    /// on here. Returns false when it is not staged here or nothing enforces limits. The caller
    /// holds the volume's lock.
    @discardableResult
    func enforceRecordedLimits(volumeID: String) async throws -> Bool {
        guard let throttle else { return false }
        guard let stage = try await store.stage(volumeID: volumeID, nodeID: nodeID), !stage.devicePath.isEmpty else {
            return false
        }
        let volume = try await requireVolume(volumeID)
        let meta = metadata(volumeID, path: stage.stagingPath).with("device", stage.devicePath)
        let line: IOMaxLine
        do {
            line = try throttle.apply(QoSLimits(volume: volume), device: stage.devicePath)
        } catch {
            throw CairnError.internal(
                "cannot limit volume \(volumeID)'s device \(stage.devicePath) in \(throttle.location): \(error); check that the cgroup still exists and has the io (v2) or blkio (v1) controller, then retry")
        }
        let logged = meta.with("limits", "\(line)").with("cgroup", throttle.location)
        if line.isUnlimited {
            logger.debug("the volume's device has no QoS limits", metadata: logged)
        } else {
            logger.info("applied the volume's QoS limits to its device", metadata: logged)
        }
        return true
    }

    /// Lifts every limit of a device before it is detached: the next volume attached on the
    /// same loop device must not inherit them.
    func removeLimits(device: String, meta: Logger.Metadata) throws {
        guard let throttle else { return }
        do {
            try throttle.remove(device: device)
        } catch {
            throw CairnError.internal(
                "cannot remove the QoS limits of \(device) from \(throttle.location) before detaching it: \(error); retry NodeUnstageVolume")
        }
        logger.debug("removed the device's QoS limits", metadata: meta.with("device", device).with("cgroup", throttle.location))
    }
}
