import CSIProto
import CairnCSI
import CairnCore
import Foundation
import Logging

// NodeStageVolume and NodeUnstageVolume: the volume's backing as a loop device on this node and,
// for mount access, its filesystem at the staging path.

extension NodeService {
    // MARK: NodeStageVolume

    public func nodeStageVolume(_ request: Csi_V1_NodeStageVolumeRequest) async throws -> Csi_V1_NodeStageVolumeResponse {
        try Validate.volumeID(request.volumeID)
        let stagingPath = try Validate.path(request.stagingTargetPath, field: "staging_target_path", roots: pathRoots)
        guard request.hasVolumeCapability else { throw CairnError.invalidArgument("volume_capability is required") }
        let access = try AccessRules.parse(request.volumeCapability, field: "volume_capability")
        try MountFlags.check(access.mountFlags, field: "volume_capability.mount.mount_flags")
        let volumeID = request.volumeID
        let secrets = request.secrets
        try await locks.withLock(volumeID, operation: "NodeStageVolume") {
            try await stage(volumeID: volumeID, stagingPath: stagingPath, access: access, secrets: secrets)
        }
        return Csi_V1_NodeStageVolumeResponse()
    }

    /// Stages the volume (or finds it staged), then puts its QoS limits on the device: every
    /// NodeStage — and the restore after a restart or reboot, which comes through here — leaves
    /// the device limited as the volume's record says.
    func stage(volumeID: String, stagingPath: String, access: RequestedAccess, secrets: [String: String] = [:]) async throws {
        try await attachAndMount(volumeID: volumeID, stagingPath: stagingPath, access: access, secrets: secrets)
        try await enforceRecordedLimits(volumeID: volumeID)
    }

    private func attachAndMount(volumeID: String, stagingPath: String, access: RequestedAccess,
                                secrets: [String: String]) async throws {
        let volume = try await requireVolume(volumeID)
        var meta = metadata(volumeID, path: stagingPath)

        guard let attachment = try await store.attachments(volumeID: volumeID).first(where: { $0.nodeID == nodeID }) else {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is not attached to node \(nodeID); call ControllerPublishVolume for this node first")
        }
        try checkCapability(access, against: volume)
        let readOnly = AccessRules.isReaderOnly(access.mode) || attachment.readonly || MountFlags.asksReadOnly(access.mountFlags)
        let fsType: String
        switch access.accessType {
        case .block:
            fsType = ""
        case .mount:
            fsType = !access.fsType.isEmpty ? access.fsType
                : !volume.fsType.isEmpty ? volume.fsType : AccessRules.defaultFilesystem
            guard AccessRules.supportedFilesystems.contains(fsType) else {
                throw CairnError.failedPrecondition(
                    "volume \(volumeID) records filesystem \"\(fsType)\", which this node cannot mount; supported: \(AccessRules.supportedFilesystems.joined(separator: ", "))")
            }
        }
        var record = StageRecord(volumeID: volumeID, nodeID: nodeID, stagingPath: stagingPath,
                                 accessType: access.accessType, devicePath: "", fsType: fsType,
                                 mountFlags: access.mountFlags, accessMode: access.mode.rawValue)
        record.readOnly = readOnly

        // Already staged? First what the records say…
        let file = try await backing.file(volumeID: volumeID)
        let existing = try await store.stage(volumeID: volumeID, nodeID: nodeID)
        // An encrypted volume: a wrong passphrase fails here, before anything is attached,
        // probed or formatted.
        let key = try await dataKey(for: volume, secrets: secrets, stagedHere: existing != nil)
        if existing != nil {
            // Staged here before: whatever the mounts and loop devices look like, the volume is
            // staged only if its engine serves it. After a restart of the engine's process this
            // resumes the connection the FUSE keeper kept (nothing in flight is lost); when
            // nothing was kept it mounts anew, and the loop device left on the dead connection
            // is found below as an orphan and replaced. A failure here is the answer: a volume
            // no engine serves is never reported staged.
            do {
                _ = try await backing.activate(volume, attachment: attachment, key: key)
            } catch let error as CairnError {
                throw CairnError(error.code, "volume \(volumeID) is staged on this node but its engine cannot serve it: \(error.message)")
            }
        }
        let devices = try await mounter.loopDevices(backing: file)
        var table = try await mounter.mountTable()
        if let existing, let orphan = try await orphanedStageDevice(existing, devices: devices) {
            // Staged on a loop device whose engine file is gone: nothing can serve through it
            // again. Undo it and stage afresh rather than call a dead volume staged.
            try await discardOrphanedStage(existing, device: orphan, meta: meta)
            table = try await mounter.mountTable()
        }
        if let existing {
            if existing.stagingPath != stagingPath {
                if try await isStageLive(existing, devices: devices, table: table) {
                    throw CairnError.failedPrecondition(
                        "volume \(volumeID) is already staged at \(existing.stagingPath) on this node (CSI allows one staging path per volume per node); call NodeUnstageVolume there first")
                }
                logger.info("replacing a stale stage record whose mount and device are gone",
                            metadata: metadata(volumeID, path: existing.stagingPath))
            } else if !isSameStage(existing, record) {
                throw CairnError.alreadyExists(
                    "volume \(volumeID) is already staged at \(stagingPath) with \(describe(existing)); this request asks for \(describe(record)). Repeat the original capability, or call NodeUnstageVolume first")
            }
        }

        // …then what the kernel says.
        let stagingReal = try await mounter.resolve(stagingPath)
        let elsewhere = table.filter { usesVolume($0, devices: devices) && $0.mountPoint != stagingReal }
        switch access.accessType {
        case .mount:
            if let mounted = table.last(where: { $0.mountPoint == stagingReal }) {
                guard devices.contains(mounted.source) else {
                    throw CairnError.failedPrecondition(
                        "\(stagingPath) already has \(mounted.source) (\(mounted.fsType)) mounted, which is not volume \(volumeID); unmount it or stage at another path")
                }
                if mounted.fsType != fsType {
                    throw CairnError.alreadyExists(
                        "volume \(volumeID) is already mounted at \(stagingPath) as \(mounted.fsType), not \(fsType); call NodeUnstageVolume first")
                }
                if existing != record.with(device: mounted.source, createdAt: existing?.createdAt) {
                    record.devicePath = mounted.source
                    if let existing { record.createdAt = existing.createdAt }
                    try await store.putStage(record)
                    logger.info("adopted an existing staging mount", metadata: meta.with("device", mounted.source))
                } else {
                    logger.debug("already staged", metadata: meta.with("device", mounted.source))
                }
                return
            }
            if let user = elsewhere.first {
                throw CairnError.failedPrecondition(
                    "volume \(volumeID)'s device \(user.source) is still mounted at \(user.mountPoint), outside the staging path; unmount it there (or NodeUnpublish/NodeUnstage the old paths) before staging at \(stagingPath)")
            }
            let staging = try await mounter.inspect(stagingPath, in: .host)
            guard staging.kind == .directory else {
                throw CairnError.failedPrecondition(
                    "staging_target_path \(stagingPath) \(staging.kind == .missing ? "does not exist" : "is not a directory"); the CO must create the staging directory before NodeStageVolume")
            }
        case .block:
            if let existing, existing.stagingPath == stagingPath, devices.contains(existing.devicePath) {
                logger.debug("already staged", metadata: meta.with("device", existing.devicePath))
                return
            }
            if let device = devices.first {
                // A loop device survives a plugin restart; reuse it rather than stacking a second one.
                record.devicePath = device
                if let existing, existing.stagingPath == stagingPath { record.createdAt = existing.createdAt }
                try await store.putStage(record)
                logger.info("staged for block access on the existing loop device", metadata: meta.with("device", device))
                return
            }
        }

        // Act. A replicated volume's engine starts here: it claims the in-sync replicas with the
        // attachment's epoch, which fences every older holder, before any byte is written.
        let activatedNow = devices.isEmpty
        if activatedNow {
            _ = try await backing.activate(volume, attachment: attachment, key: key)
        }
        if let problem = try await backing.condition(volume).stageBlocker {
            if activatedNow { try? await backing.deactivate(volumeID: volumeID) }
            throw CairnError.failedPrecondition("volume \(volumeID) cannot be staged: \(problem)")
        }
        if devices.count > 1 {
            logger.warning("several loop devices are backed by the volume's file; using the first",
                           metadata: meta.with("device", devices.joined(separator: ",")))
        }
        let device: String
        let attachedNow: Bool
        if let first = devices.first {
            device = first
            attachedNow = false
        } else {
            device = try await mounter.attachLoop(file: file, readOnly: readOnly && access.accessType == .block)
            attachedNow = true
            logger.info("attached the volume's backing file as a loop device", metadata: meta.with("device", device))
        }
        meta["device"] = "\(device)"
        do {
            if access.accessType == .mount {
                try await prepareFilesystem(volumeID: volumeID, device: device, fsType: fsType, readOnly: readOnly, meta: meta)
                var options = access.mountFlags.filter { $0 != "ro" && $0 != "rw" }
                if readOnly {
                    options.append("ro")
                    // Several nodes read the volume at once: none may replay the xfs log.
                    if fsType == "xfs" && access.mode == .multiNodeReaderOnly { options.append("norecovery") }
                }
                // A volume restored from a snapshot or cloned holds its source's filesystem,
                // UUID included, and xfs refuses a second mount of one UUID on a machine.
                if fsType == "xfs" && volume.contentSource != nil && !options.contains("nouuid") { options.append("nouuid") }
                try await mounter.mount(device: device, at: stagingReal, fsType: fsType, options: options)
                logger.info("mounted the volume at its staging path", metadata: meta.with("fs.type", fsType))
            }
        } catch {
            if attachedNow {
                do {
                    try await mounter.detachLoop(device: device)
                    if activatedNow { try await backing.deactivate(volumeID: volumeID) }
                } catch {
                    logger.error("could not detach the loop device after a failed stage; detach it by hand",
                                 metadata: meta.with("error", "\(error)"))
                }
            }
            throw error
        }
        record.devicePath = device
        try await store.putStage(record)
        logger.info("staged", metadata: meta)
    }

    /// Formats an empty device, checks a device that already holds the requested filesystem and
    /// refuses anything else: a volume that holds data is never reformatted.
    private func prepareFilesystem(volumeID: String, device: String, fsType: String, readOnly: Bool,
                                   meta: Logger.Metadata) async throws {
        switch try await mounter.probe(device: device) {
        case .empty:
            try await mounter.makeFilesystem(device: device, fsType: fsType)
            logger.info("created a filesystem on the volume", metadata: meta.with("fs.type", fsType))
        case .filesystem(let found) where found == fsType:
            // A read-only stage must not write to the device, so no repair; the kernel refuses
            // to mount a filesystem it cannot read.
            if !readOnly { try await mounter.checkFilesystem(device: device, fsType: fsType) }
        case let content:
            throw CairnError.failedPrecondition(
                "volume \(volumeID)'s device \(device) holds \(content), not the requested \(fsType) filesystem; Cairn never reformats a volume that holds data: stage it with the filesystem it has, or create a new volume")
        }
    }

    /// "Exceeds capabilities": what the volume itself cannot honour, whatever its state.
    private func checkCapability(_ access: RequestedAccess, against volume: VolumeRecord) throws {
        if access.accessType == .mount, !access.fsType.isEmpty, !volume.fsType.isEmpty, access.fsType != volume.fsType {
            throw CairnError.failedPrecondition(
                "volume \(volume.id) was created with a \(volume.fsType) filesystem; it cannot be used as \(access.fsType)")
        }
        let modes = volume.accessModes.compactMap { AccessMode(rawValue: $0) }
        if !modes.isEmpty, !AccessRules.isReaderOnly(access.mode), modes.allSatisfy(AccessRules.isReaderOnly) {
            throw CairnError.failedPrecondition(
                "volume \(volume.id) was created for read-only access (\(modes.map(csiName).joined(separator: ", "))); it cannot be used with \(csiName(access.mode))")
        }
    }

    // MARK: NodeUnstageVolume

    public func nodeUnstageVolume(_ request: Csi_V1_NodeUnstageVolumeRequest) async throws -> Csi_V1_NodeUnstageVolumeResponse {
        try Validate.volumeID(request.volumeID)
        let stagingPath = try Validate.path(request.stagingTargetPath, field: "staging_target_path", roots: pathRoots)
        let volumeID = request.volumeID
        try await locks.withLock(volumeID, operation: "NodeUnstageVolume") {
            try await unstage(volumeID: volumeID, stagingPath: stagingPath)
        }
        return Csi_V1_NodeUnstageVolumeResponse()
    }

    private func unstage(volumeID: String, stagingPath: String) async throws {
        _ = try await requireVolume(volumeID)
        let meta = metadata(volumeID, path: stagingPath)
        let existing = try await store.stage(volumeID: volumeID, nodeID: nodeID)
        if let existing, existing.stagingPath != stagingPath {
            // Not staged at this path: nothing to undo here (the other staging path is left alone).
            logger.info("not staged at this path; nothing to do", metadata: meta.with("staged.path", existing.stagingPath))
            return
        }

        let table = try await mounter.mountTable()
        var stillPublished: [PublishRecord] = []
        for publish in try await store.publishes(volumeID: volumeID) where publish.nodeID == nodeID {
            if try await isLive(publish) { stillPublished.append(publish) }
        }
        if !stillPublished.isEmpty {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is still published at \(stillPublished.map(\.targetPath).joined(separator: ", ")); call NodeUnpublishVolume for every target first")
        }
        let file = try await backing.file(volumeID: volumeID)
        var devices = try await mounter.loopDevices(backing: file)
        if let orphan = try await orphanedStageDevice(existing, devices: devices) {
            logger.warning("the staged loop device's engine file is gone (its FUSE mount was detached); unmounting and detaching it",
                           metadata: meta.with("device", orphan))
            devices.append(orphan)
        }
        let stagingReal = try await mounter.resolve(stagingPath)
        let users = table.filter { usesVolume($0, devices: devices) && $0.mountPoint != stagingReal }
        if !users.isEmpty {
            throw CairnError.failedPrecondition(
                "volume \(volumeID)'s device is still mounted at \(users.map(\.mountPoint).joined(separator: ", ")), which Cairn did not publish; unmount those paths first")
        }

        // Unmount what is ours at the staging path (loop: the same device may be stacked there).
        for _ in 0..<8 {
            guard let mounted = try await mounter.mountInfo(at: stagingReal) else { break }
            guard usesVolume(mounted, devices: devices) else {
                if existing == nil {
                    logger.info("the staging path holds another mount and the volume is not staged there; nothing to do",
                                metadata: meta.with("device", mounted.source))
                    return
                }
                throw CairnError.failedPrecondition(
                    "\(stagingPath) has \(mounted.source) (\(mounted.fsType)) mounted on top of volume \(volumeID); Cairn will not unmount what it did not mount: unmount it by hand and retry")
            }
            try await mounter.unmount(stagingReal, in: .host)
            logger.info("unmounted the staging path", metadata: meta.with("device", mounted.source))
        }
        if let still = try await mounter.mountInfo(at: stagingReal), usesVolume(still, devices: devices) {
            throw CairnError.internal("\(stagingPath) is still mounted after repeated unmounts; inspect /proc/self/mountinfo")
        }
        for device in devices {
            try removeLimits(device: device, meta: meta)
            try await mounter.detachLoop(device: device)
            logger.info("detached the loop device", metadata: meta.with("device", device))
        }
        // A replicated volume's engine stops once no loop device uses it (flushing every replica).
        try await backing.deactivate(volumeID: volumeID)
        if existing != nil {
            try await store.removeStage(volumeID: volumeID, nodeID: nodeID)
        }
        logger.info("unstaged", metadata: meta)
    }

    /// The stage record's loop device when it is still bound but no longer to the volume's
    /// engine file: an engine's FUSE mount detached lazily under it (a node process that shut
    /// down while the volume was staged, or a dead engine's mount removed) leaves it naming
    /// `/volume`. It is still this volume's — the record says so — but nothing can serve
    /// through it again, so unstage unmounts and detaches it and stage replaces it.
    private func orphanedStageDevice(_ existing: StageRecord?, devices: [String]) async throws -> String? {
        guard let device = existing?.devicePath, !device.isEmpty, !devices.contains(device) else { return nil }
        return try await mounter.loopDevices(backing: "/volume").contains(device) ? device : nil
    }

    /// Unmounts the staging path where `device` is mounted there and detaches `device`.
    private func discardOrphanedStage(_ stage: StageRecord, device: String, meta: Logger.Metadata) async throws {
        logger.warning("the volume is recorded as staged on a loop device whose engine file is gone (its FUSE mount was detached); staging it afresh",
                       metadata: meta.with("device", device))
        if stage.accessType == .mount {
            let real = try await mounter.resolve(stage.stagingPath)
            for _ in 0..<8 {
                guard let mounted = try await mounter.mountInfo(at: real), mounted.source == device else { break }
                try await mounter.unmount(real, in: .host)
                logger.info("unmounted the dead staging mount", metadata: meta.with("device", device))
            }
        }
        try removeLimits(device: device, meta: meta)
        try await mounter.detachLoop(device: device)
        logger.info("detached the dead loop device", metadata: meta.with("device", device))
    }

    private func isSameStage(_ a: StageRecord, _ b: StageRecord) -> Bool {
        a.accessType == b.accessType && a.fsType == b.fsType && a.mountFlags == b.mountFlags && a.accessMode == b.accessMode
    }

    private func describe(_ stage: StageRecord) -> String {
        var parts = ["\(stage.accessType) access", csiName(rawMode: stage.accessMode)]
        if stage.accessType == .mount {
            parts.append("fs_type \(stage.fsType)")
            parts.append("mount_flags [\(stage.mountFlags.joined(separator: ","))]")
        }
        return parts.joined(separator: ", ")
    }
}

extension StageRecord {
    fileprivate func with(device: String, createdAt: Date?) -> StageRecord {
        var copy = self
        copy.devicePath = device
        if let createdAt { copy.createdAt = createdAt }
        return copy
    }
}
