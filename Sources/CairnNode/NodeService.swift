import CSIProto
import CairnCore
import Foundation
import Logging

/// CSI Node service: makes a volume attached to this node usable at the paths the CO asks for.
///
/// Stage attaches the volume's backing file as a loop device (direct I/O) and, for mount access,
/// puts a filesystem on it (only when it has none) and mounts it at the staging path. Publish
/// bind-mounts the staging directory (or the loop device node, for block access) at each target.
///
/// Every RPC reads the same way: validate → take the volume's lock (a concurrent call on the same
/// volume gets ABORTED) → return early when the work is already done, judged from the machine's
/// real state (mountinfo, loop devices), not only from the records → act → persist the record.
/// Records are the plugin's memory between calls; the kernel is the truth. After a reboot the
/// records survive but the loop devices and mounts do not, and a repeated NodeStageVolume
/// rebuilds them.
///
/// Owns: loop devices of volume backings, mounts at staging and target paths inside `pathRoots`,
/// StageRecord and PublishRecord rows of this node. Never touches attachments or volumes.
public final class NodeService: Sendable {
    /// The topology segment every node reports; volumes are accessible from one node today.
    public static let topologyKey = "topology.cairn.dev/node"

    let nodeID: String
    let topology: [String: String]
    let maxVolumesPerNode: Int64
    let store: any MetadataStore
    let backing: any NodeBacking
    let mounter: any Mounter
    let pathRoots: [String]
    let locks: VolumeLocks
    let logger: Logger
    /// The process whose mount namespace targets are published into when a request names
    /// none (`--target-namespace-pid`); nil: the host's (the agent's) namespace.
    let defaultTargetPID: Int32?

    /// The volume_context / publish_context key that names the process (a container) whose
    /// mount namespace a target path belongs to.
    public static let namespacePIDKey = "cairn.dev/mount-namespace-pid"

    public init(nodeID: String, topology: [String: String], maxVolumesPerNode: Int64,
                store: any MetadataStore, backing: any NodeBacking, mounter: any Mounter,
                pathRoots: [String], locks: VolumeLocks, logger: Logger, defaultTargetPID: Int32? = nil) {
        self.defaultTargetPID = defaultTargetPID
        self.nodeID = nodeID
        self.topology = topology
        self.maxVolumesPerNode = maxVolumesPerNode
        self.store = store
        self.backing = backing
        self.mounter = mounter
        self.pathRoots = pathRoots
        self.locks = locks
        self.logger = logger
    }

    // MARK: NodeStageVolume

    public func nodeStageVolume(_ request: Csi_V1_NodeStageVolumeRequest) async throws -> Csi_V1_NodeStageVolumeResponse {
        try Validate.volumeID(request.volumeID)
        let stagingPath = try Validate.path(request.stagingTargetPath, field: "staging_target_path", roots: pathRoots)
        guard request.hasVolumeCapability else { throw CairnError.invalidArgument("volume_capability is required") }
        let access = try AccessRules.parse(request.volumeCapability, field: "volume_capability")
        try MountFlags.check(access.mountFlags, field: "volume_capability.mount.mount_flags")
        let volumeID = request.volumeID
        try await locks.withLock(volumeID, operation: "NodeStageVolume") {
            try await stage(volumeID: volumeID, stagingPath: stagingPath, access: access)
        }
        return Csi_V1_NodeStageVolumeResponse()
    }

    func stage(volumeID: String, stagingPath: String, access: RequestedAccess) async throws {
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
        if existing != nil {
            // Staged here before: whatever the mounts and loop devices look like, the volume is
            // staged only if its engine serves it. After a restart of the engine's process this
            // resumes the connection the FUSE keeper kept (nothing in flight is lost); when
            // nothing was kept it mounts anew, and the loop device left on the dead connection
            // is found below as an orphan and replaced. A failure here is the answer: a volume
            // no engine serves is never reported staged.
            do {
                _ = try await backing.activate(volume, epoch: attachment.epoch)
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
            _ = try await backing.activate(volume, epoch: attachment.epoch)
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

    // MARK: NodePublishVolume

    public func nodePublishVolume(_ request: Csi_V1_NodePublishVolumeRequest) async throws -> Csi_V1_NodePublishVolumeResponse {
        try Validate.volumeID(request.volumeID)
        let targetPID = try Self.namespacePID(request.publishContext[Self.namespacePIDKey]
            ?? request.volumeContext[Self.namespacePIDKey]) ?? defaultTargetPID
        // A target in a container's namespace is a path in the container's view (its root
        // confines it; the helper refuses escapes); a host target must lie under the path roots.
        let targetPath = targetPID == nil
            ? try Validate.path(request.targetPath, field: "target_path", roots: pathRoots)
            : try Validate.absolutePath(request.targetPath, field: "target_path")
        guard request.hasVolumeCapability else { throw CairnError.invalidArgument("volume_capability is required") }
        let access = try AccessRules.parse(request.volumeCapability, field: "volume_capability")
        try MountFlags.check(access.mountFlags, field: "volume_capability.mount.mount_flags")
        // The spec's error table: STAGE_UNSTAGE_VOLUME is advertised but no staging path → FAILED_PRECONDITION.
        guard !request.stagingTargetPath.isEmpty else {
            throw CairnError.failedPrecondition(
                "staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME); call NodeStageVolume first and pass its staging_target_path")
        }
        let stagingPath = try Validate.path(request.stagingTargetPath, field: "staging_target_path", roots: pathRoots)
        if targetPID == nil,
           Validate.isInside(targetPath, root: stagingPath) || Validate.isInside(stagingPath, root: targetPath) {
            throw CairnError.invalidArgument(
                "target_path \(targetPath) and staging_target_path \(stagingPath) must not contain one another")
        }
        let volumeID = request.volumeID
        try await locks.withLock(volumeID, operation: "NodePublishVolume") {
            var namespace = MountNamespace.host
            if let targetPID { namespace = try await mounter.namespace(ofProcess: targetPID) }
            try await publish(volumeID: volumeID, targetPath: targetPath, stagingPath: stagingPath,
                              access: access, readonlyFlag: request.readonly, namespace: namespace)
        }
        return Csi_V1_NodePublishVolumeResponse()
    }

    /// Publishes the staged volume at `targetPath` in `namespace`. Also the hot-plug path
    /// (`cairn volume attach`): a target in a running container's namespace.
    public func publish(volumeID: String, targetPath: String, stagingPath: String,
                        access: RequestedAccess, readonlyFlag: Bool, namespace: MountNamespace) async throws {
        _ = try await requireVolume(volumeID)
        var meta = metadata(volumeID, path: targetPath)
        if namespace != .host { meta["namespace"] = "\(namespace)" }
        guard let stage = try await store.stage(volumeID: volumeID, nodeID: nodeID), stage.stagingPath == stagingPath else {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is not staged at \(stagingPath) on node \(nodeID); call NodeStageVolume first")
        }
        guard stage.accessType == access.accessType else {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is staged for \(stage.accessType) access and cannot be published for \(access.accessType) access; unstage it and stage it again with a \(access.accessType) capability")
        }
        if access.accessType == .mount, !access.fsType.isEmpty, access.fsType != stage.fsType {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is staged with a \(stage.fsType) filesystem; it cannot be published as \(access.fsType)")
        }

        let file = try await backing.file(volumeID: volumeID)
        let devices = try await mounter.loopDevices(backing: file)
        let table = try await mounter.mountTable()
        let stagingReal = try await mounter.resolve(stagingPath)
        let source: String
        switch stage.accessType {
        case .mount:
            guard let staged = table.last(where: { $0.mountPoint == stagingReal }), devices.contains(staged.source) else {
                throw CairnError.failedPrecondition(
                    "volume \(volumeID) is recorded as staged at \(stagingPath) but its filesystem is no longer mounted there (did the node restart?); call NodeStageVolume again")
            }
            source = stagingReal
        case .block:
            guard devices.contains(stage.devicePath) else {
                throw CairnError.failedPrecondition(
                    "volume \(volumeID) is recorded as staged on \(stage.devicePath) but that loop device no longer serves the volume (did the node restart?); call NodeStageVolume again")
            }
            source = stage.devicePath
        }
        meta["device"] = "\(devices.first ?? stage.devicePath)"

        let readOnly = readonlyFlag || AccessRules.isReaderOnly(access.mode) || MountFlags.asksReadOnly(access.mountFlags)
        let stagedReadOnly = AccessRules.isReaderOnly(AccessMode(rawValue: stage.accessMode) ?? .unknown)
            || (stage.accessType == .mount && table.last(where: { $0.mountPoint == stagingReal })?.isReadOnly == true)
        if stage.accessType == .block && readOnly && stage.readOnly != true {
            // A read-only bind of a device node does not stop writes through it; only a
            // read-only loop device does, and that is decided when the volume is staged.
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is staged read-write for block access, and a read-only bind cannot stop writes to a device node; publish it read-write, or stage it read-only (readonly ControllerPublishVolume or a reader-only access mode)")
        }
        if stagedReadOnly && !readOnly {
            throw CairnError.failedPrecondition(
                "volume \(volumeID) is staged read-only on this node (\(csiName(rawMode: stage.accessMode)) or a read-only ControllerPublishVolume); it cannot be published read-write: set readonly, or unstage and stage it with a writable access mode")
        }
        var record = PublishRecord(volumeID: volumeID, nodeID: nodeID, targetPath: targetPath, stagingPath: stagingPath,
                                   accessType: access.accessType, readonly: readonlyFlag,
                                   accessMode: access.mode.rawValue, mountFlags: access.mountFlags,
                                   targetNamespace: namespace)
        let publishes = try await store.publishes(volumeID: volumeID).filter { $0.nodeID == nodeID }
        let existing = publishes.first { $0.targetPath == targetPath && $0.namespace == namespace }
        let targetReal = try await mounter.resolve(targetPath, in: namespace)
        let targetTable = namespace == .host ? table : try await mounter.mountTable(in: namespace)

        // Already published at this target?
        if let mounted = targetTable.last(where: { $0.mountPoint == targetReal }) {
            guard usesVolume(mounted, devices: devices) else {
                throw CairnError.failedPrecondition(
                    "\(targetPath) already has \(mounted.source) (\(mounted.fsType)) mounted, which is not volume \(volumeID); unmount it or publish at another path")
            }
            if let existing {
                guard isSamePublish(existing, record) else {
                    throw CairnError.alreadyExists(
                        "volume \(volumeID) is already published at \(targetPath) with \(describe(existing)); this request asks for \(describe(record)). Repeat the original request, or call NodeUnpublishVolume first")
                }
                logger.debug("already published", metadata: meta)
                return
            }
            guard mounted.isReadOnly == readOnly else {
                throw CairnError.alreadyExists(
                    "volume \(volumeID) is already mounted at \(targetPath) \(mounted.isReadOnly ? "read-only" : "read-write"); this request asks for \(readOnly ? "read-only" : "read-write"). Call NodeUnpublishVolume first")
            }
            try await store.putPublish(record)
            logger.info("adopted an existing publish mount", metadata: meta)
            return
        }
        if let existing {
            guard isSamePublish(existing, record) else {
                throw CairnError.alreadyExists(
                    "volume \(volumeID) is already published at \(targetPath) with \(describe(existing)); this request asks for \(describe(record)). Repeat the original request, or call NodeUnpublishVolume first")
            }
            record.createdAt = existing.createdAt
            logger.info("recorded publish has no mount any more; publishing again", metadata: meta)
        }

        // The spec's second-publish table: only SINGLE_NODE_MULTI_WRITER and MULTI_NODE_* volumes
        // may be published at several targets on one node; for every other mode a different
        // target is FAILED_PRECONDITION (Kubernetes maps ReadWriteOnce to SINGLE_NODE_MULTI_WRITER
        // because Cairn advertises it).
        var others: [PublishRecord] = []
        for other in publishes where !(other.targetPath == targetPath && other.namespace == namespace) {
            if try await isLive(other) { others.append(other) }
        }
        if let other = others.first {
            let modes = [access.mode] + others.map { AccessMode(rawValue: $0.accessMode) ?? .unknown }
            if let strict = modes.first(where: { !AccessRules.allowsSeveralTargets($0) }) {
                throw CairnError.failedPrecondition(
                    "volume \(volumeID) is already published at \(other.targetPath) on this node and access mode \(strict) allows one target per node; call NodeUnpublishVolume there first, or use SINGLE_NODE_MULTI_WRITER")
            }
        }

        // Act.
        let created = try await mounter.makeTarget(targetPath, for: access.accessType, in: namespace)
        do {
            // targetReal was resolved before the target existed; creating its last component
            // does not change the resolution, so it is the path to bind at.
            try await mounter.bindMount(source: source, at: targetReal,
                                        in: namespace, readOnly: readOnly,
                                        options: MountFlags.perMountOnly(access.mountFlags))
        } catch {
            if created { _ = try? await mounter.removeTarget(targetPath, in: namespace) }
            throw error
        }
        logger.info("bind-mounted the volume at the target", metadata: meta.with("readonly", "\(readOnly)"))
        try await store.putPublish(record)
        logger.info("published", metadata: meta)
    }

    // MARK: NodeUnpublishVolume

    public func nodeUnpublishVolume(_ request: Csi_V1_NodeUnpublishVolumeRequest) async throws -> Csi_V1_NodeUnpublishVolumeResponse {
        try Validate.volumeID(request.volumeID)
        let lexical = try Validate.absolutePath(request.targetPath, field: "target_path")
        let volumeID = request.volumeID
        try await locks.withLock(volumeID, operation: "NodeUnpublishVolume") {
            _ = try await requireVolume(volumeID)
            // The record says which namespace the target is in; without one, the default.
            let record = try await store.publishes(volumeID: volumeID)
                .first { $0.nodeID == nodeID && $0.targetPath == lexical }
            let namespace: MountNamespace
            if let record {
                namespace = record.namespace
            } else if let pid = defaultTargetPID {
                do { namespace = try await mounter.namespace(ofProcess: pid) } catch is MountNamespaceGone {
                    return  // The namespace is gone, and with it anything that was mounted there.
                }
            } else {
                namespace = .host
            }
            let targetPath = namespace == .host
                ? try Validate.path(request.targetPath, field: "target_path", roots: pathRoots) : lexical
            do {
                try await unpublish(volumeID: volumeID, targetPath: targetPath, namespace: namespace, record: record)
            } catch let gone as MountNamespaceGone {
                // The container exited: its mount namespace (and the bind in it) went with it.
                logger.info("the target's mount namespace is gone; nothing left to unmount",
                            metadata: metadata(volumeID, path: targetPath).with("namespace", "\(gone)"))
                if let record { try await store.removePublish(record) }
            }
        }
        return Csi_V1_NodeUnpublishVolumeResponse()
    }

    /// Unmounts and removes one target. Also the hot-unplug path (`cairn volume detach`).
    public func unpublish(volumeID: String, targetPath: String, namespace: MountNamespace,
                          record: PublishRecord?) async throws {
        var meta = metadata(volumeID, path: targetPath)
        if namespace != .host { meta["namespace"] = "\(namespace)" }
        let file = try await backing.file(volumeID: volumeID)
        let devices = try await mounter.loopDevices(backing: file)
        let targetReal = try await mounter.resolve(targetPath, in: namespace)

        for _ in 0..<8 {
            guard let mounted = try await mounter.mountInfo(at: targetReal, in: namespace) else { break }
            // Ours: the volume's device (or its staging mount) — or a target we recorded whose
            // loop device has since gone away (then the kernel shows a source we cannot match).
            guard usesVolume(mounted, devices: devices) || record != nil else {
                throw CairnError.failedPrecondition(
                    "\(targetPath) has \(mounted.source) (\(mounted.fsType)) mounted, which is not volume \(volumeID); Cairn will not unmount what it did not mount")
            }
            try await mounter.unmount(targetReal, in: namespace)
            logger.info("unmounted the target", metadata: meta.with("device", mounted.source))
        }
        if try await mounter.mountInfo(at: targetReal, in: namespace) != nil {
            throw CairnError.internal("\(targetPath) is still mounted after repeated unmounts; inspect its mountinfo")
        }
        // The SP created the target (CSI: "the SP MUST delete the file or directory it created").
        if try await mounter.removeTarget(targetPath, in: namespace) {
            logger.info("removed the target path", metadata: meta)
        }
        if let record {
            try await store.removePublish(record)
        }
        logger.info("unpublished", metadata: meta)
    }

    // MARK: NodeGetVolumeStats

    public func nodeGetVolumeStats(_ request: Csi_V1_NodeGetVolumeStatsRequest) async throws -> Csi_V1_NodeGetVolumeStatsResponse {
        // No volume lock: stats change nothing, and a kubelet polling them must not see ABORTED
        // (or make a concurrent stage see it) while the volume is being staged.
        try Validate.volumeID(request.volumeID)
        guard !request.volumePath.isEmpty else { throw CairnError.invalidArgument("volume_path is required") }
        let volumeID = request.volumeID
        let volume = try await requireVolume(volumeID)
        let notHere = CairnError.notFound(
            "volume \(volumeID) is neither staged nor published at \"\(Validate.printable(request.volumePath))\" on node \(nodeID)")
        // A path we would refuse to stage or publish at cannot hold the volume: NOT_FOUND (the
        // spec's "does not exist on specified volume_path"), not INVALID_ARGUMENT.
        guard let lexical = try? Validate.absolutePath(request.volumePath, field: "volume_path") else { throw notHere }
        let stage = try await store.stage(volumeID: volumeID, nodeID: nodeID)
        let publish = try await store.publishes(volumeID: volumeID).first { $0.nodeID == nodeID && $0.targetPath == lexical }
        let namespace = publish?.namespace ?? .host
        let path: String
        if namespace == .host {
            guard let checked = try? Validate.path(request.volumePath, field: "volume_path", roots: pathRoots) else { throw notHere }
            path = checked
        } else {
            path = lexical
        }
        let isStaging = stage?.stagingPath == path
        let file = try await backing.file(volumeID: volumeID)
        let devices = try await mounter.loopDevices(backing: file)
        var real = path
        var mounted: MountInfo?
        do {
            real = try await mounter.resolve(path, in: namespace)
            mounted = try await mounter.mountInfo(at: real, in: namespace)
        } catch is MountNamespaceGone {
            mounted = nil
        }
        let mountIsOurs = mounted.map { usesVolume($0, devices: devices) } ?? false
        guard publish != nil || isStaging || mountIsOurs else { throw notHere }

        let accessType: AccessType = publish?.accessType ?? stage?.accessType
            ?? (mounted.map { $0.source.hasPrefix("/dev/loop") } == true ? .mount : .block)
        var problems: [String] = []
        let condition = try await backing.condition(volume)
        if let problem = condition.problem {
            problems.append(problem)
        }
        var response = Csi_V1_NodeGetVolumeStatsResponse()
        switch accessType {
        case .mount:
            if let mounted, mountIsOurs {
                let stats = try await mounter.filesystemStats(path: real, in: namespace)
                response.usage = [
                    usage(.bytes, total: stats.totalBytes, available: stats.availableBytes, used: stats.usedBytes),
                    usage(.inodes, total: stats.totalInodes, available: stats.freeInodes, used: stats.usedInodes),
                ]
                let expectReadOnly = publish.map(effectiveReadOnly)
                    ?? stage.map { AccessRules.isReaderOnly(AccessMode(rawValue: $0.accessMode) ?? .unknown) } ?? false
                if mounted.isReadOnly && !expectReadOnly {
                    problems.append(
                        "the filesystem at \(path) is read-only although it was made read-write: the kernel probably remounted it after I/O errors (see dmesg); unstage the volume and stage it again to run fsck")
                }
            } else if let mounted {
                problems.append("\(path) has \(mounted.source) mounted instead of the volume; unmount it and publish again")
            } else {
                problems.append("nothing is mounted at \(path): the volume's filesystem is gone (node restarted, or unmounted outside the plugin); stage and publish it again")
            }
        case .block:
            let device = devices.first { $0 == stage?.devicePath } ?? devices.first
            if let device {
                response.usage = [usage(.bytes, total: try await mounter.blockDeviceSize(device: device), available: 0, used: 0)]
                if publish != nil && !mountIsOurs {
                    problems.append("the device is no longer bound at \(path); publish the volume again")
                }
            } else {
                problems.append("the volume's loop device is gone (node restarted, or detached outside the plugin); stage the volume again")
            }
        }
        response.volumeCondition = .with {
            $0.abnormal = !problems.isEmpty
            $0.message = problems.isEmpty
                ? (volume.replicas == nil ? "volume is attached and mounted; its backing file is intact"
                    : "volume is attached and mounted; " + condition.healthy)
                : problems.joined(separator: "; ")
        }
        return response
    }

    private func usage(_ unit: Csi_V1_VolumeUsage.Unit, total: Int64, available: Int64, used: Int64) -> Csi_V1_VolumeUsage {
        .with {
            $0.unit = unit
            $0.total = max(0, total)
            $0.available = max(0, available)
            $0.used = max(0, used)
        }
    }

    // MARK: NodeExpandVolume

    /// After ControllerExpandVolume grew the volume's storage: makes this node's device see the
    /// new size (replicated: the engine's file grows first) and grows the mounted filesystem
    /// online. Idempotent: a repeat finds nothing left to grow.
    public func nodeExpandVolume(_ request: Csi_V1_NodeExpandVolumeRequest) async throws -> Csi_V1_NodeExpandVolumeResponse {
        try Validate.volumeID(request.volumeID)
        guard !request.volumePath.isEmpty else { throw CairnError.invalidArgument("volume_path is required") }
        if request.capacityRange.requiredBytes < 0 || request.capacityRange.limitBytes < 0 {
            throw CairnError.invalidArgument("capacity_range bytes must not be negative")
        }
        let volumeID = request.volumeID
        let volume = try await requireVolume(volumeID)
        return try await locks.withLock(volumeID, operation: "NodeExpandVolume") {
            guard let stage = try await store.stage(volumeID: volumeID, nodeID: nodeID) else {
                throw CairnError.failedPrecondition(
                    "volume \(volumeID) is not staged on node \(nodeID); NodeStageVolume it before NodeExpandVolume")
            }
            let path = try Validate.absolutePath(request.volumePath, field: "volume_path")
            let targets = try await store.publishes(volumeID: volumeID).filter { $0.nodeID == nodeID }.map(\.targetPath)
            guard path == stage.stagingPath || targets.contains(path) else {
                throw CairnError.notFound(
                    "volume \(volumeID) is neither staged nor published at \"\(Validate.printable(request.volumePath))\" on node \(nodeID)")
            }
            try await backing.expandOnNode(volume)
            let fsType = stage.accessType == .block ? "" : stage.fsType
            let bytes = try await mounter.expand(device: stage.devicePath, fsType: fsType, mountPath: stage.stagingPath)
            let required = request.capacityRange.requiredBytes
            if required > bytes {
                throw CairnError.outOfRange(
                    "volume \(volumeID)'s device has \(bytes) bytes, less than the \(required) required: call ControllerExpandVolume first (the volume's record says \(volume.capacityBytes) bytes)")
            }
            logger.info("volume expanded on the node", metadata: [
                "volume.id": "\(volumeID)", "device": "\(stage.devicePath)", "volume.bytes": "\(bytes)",
                "fs.type": "\(fsType.isEmpty ? "block" : fsType)",
            ])
            var response = Csi_V1_NodeExpandVolumeResponse()
            response.capacityBytes = bytes
            return response
        }
    }

    // MARK: NodeGetCapabilities, NodeGetInfo

    public func nodeGetCapabilities(_ request: Csi_V1_NodeGetCapabilitiesRequest) async throws -> Csi_V1_NodeGetCapabilitiesResponse {
        let types: [Csi_V1_NodeServiceCapability.RPC.TypeEnum] = [
            .stageUnstageVolume, .getVolumeStats, .volumeCondition, .singleNodeMultiWriter, .expandVolume,
        ]
        var response = Csi_V1_NodeGetCapabilitiesResponse()
        response.capabilities = types.map { type in .with { $0.rpc = .with { $0.type = type } } }
        return response
    }

    public func nodeGetInfo(_ request: Csi_V1_NodeGetInfoRequest) async throws -> Csi_V1_NodeGetInfoResponse {
        var response = Csi_V1_NodeGetInfoResponse()
        response.nodeID = nodeID
        response.maxVolumesPerNode = max(0, maxVolumesPerNode)
        var segments = topology
        segments[Self.topologyKey] = nodeID
        response.accessibleTopology = .with { $0.segments = segments }
        return response
    }

    // MARK: Start-up

    /// Compares this node's records with the machine after a (re)start and logs what no longer
    /// holds. Nothing is repaired here: the CO repeats NodeStageVolume/NodePublishVolume (Mesos
    /// after a reboot, Kubernetes continuously) and those calls rebuild what is missing.
    public func reconcile() async {
        do {
            let table = try await mounter.mountTable()
            let stages = try await store.stages(nodeID: nodeID)
            for stage in stages {
                let meta = metadata(stage.volumeID, path: stage.stagingPath).with("device", stage.devicePath)
                let devices = try await mounter.loopDevices(backing: try await backing.file(volumeID: stage.volumeID))
                if devices.isEmpty {
                    logger.warning("the loop device of a staged volume vanished (reboot?); the next NodeStageVolume re-attaches it",
                                   metadata: meta)
                } else if stage.accessType == .mount,
                          !(try await isStageLive(stage, devices: devices, table: table)) {
                    logger.warning("a staged volume is no longer mounted at its staging path; the next NodeStageVolume mounts it again",
                                   metadata: meta)
                } else {
                    logger.info("staged volume intact", metadata: meta)
                }
                for publish in try await store.publishes(volumeID: stage.volumeID) where publish.nodeID == nodeID {
                    if !((try? await isLive(publish)) ?? false) {
                        logger.warning("a published target is no longer mounted; the next NodePublishVolume mounts it again",
                                       metadata: metadata(stage.volumeID, path: publish.targetPath))
                    }
                }
            }
            logger.info("node records reconciled with the machine", metadata: ["node.id": "\(nodeID)", "stages": "\(stages.count)"])
        } catch {
            logger.error("could not reconcile node records with the machine", metadata: ["node.id": "\(nodeID)", "error": "\(error)"])
        }
    }

    // MARK: Helpers

    private func requireVolume(_ volumeID: String) async throws -> VolumeRecord {
        guard let volume = try await store.volume(id: volumeID) else {
            throw CairnError.notFound("volume \(volumeID) does not exist")
        }
        return volume
    }

    /// Parses the namespace PID named in a request's context.
    static func namespacePID(_ text: String?) throws -> Int32? {
        guard let text, !text.isEmpty else { return nil }
        guard let pid = Int32(text), pid > 0 else {
            throw CairnError.invalidArgument("\(namespacePIDKey)=\"\(Validate.printable(text))\" is not a process id")
        }
        return pid
    }

    /// Whether `mount` is the volume: its loop device mounted (a filesystem or a bind of the
    /// staging directory shows the device as source), or the device node itself bind-mounted
    /// (block access: devtmpfs with the node's name as root).
    private func usesVolume(_ mount: MountInfo, devices: [String]) -> Bool {
        if devices.contains(mount.source) { return true }
        if mount.fsType == "devtmpfs" || mount.fsType == "tmpfs" {
            return devices.contains { "/dev" + mount.root == $0 }
        }
        return false
    }

    /// Whether a recorded publish is still mounted, in its own namespace (false when that
    /// namespace is gone).
    private func isLive(_ publish: PublishRecord) async throws -> Bool {
        do {
            let real = try await mounter.resolve(publish.targetPath, in: publish.namespace)
            return try await mounter.mountInfo(at: real, in: publish.namespace) != nil
        } catch is MountNamespaceGone {
            return false
        }
    }

    private func isStageLive(_ stage: StageRecord, devices: [String], table: [MountInfo]) async throws -> Bool {
        switch stage.accessType {
        case .block: return devices.contains(stage.devicePath)
        case .mount:
            let real = try await mounter.resolve(stage.stagingPath)
            return table.contains { $0.mountPoint == real && usesVolume($0, devices: devices) }
        }
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
        try await mounter.detachLoop(device: device)
        logger.info("detached the dead loop device", metadata: meta.with("device", device))
    }

    private func isSameStage(_ a: StageRecord, _ b: StageRecord) -> Bool {
        a.accessType == b.accessType && a.fsType == b.fsType && a.mountFlags == b.mountFlags && a.accessMode == b.accessMode
    }

    private func isSamePublish(_ a: PublishRecord, _ b: PublishRecord) -> Bool {
        a.accessType == b.accessType && a.readonly == b.readonly && a.accessMode == b.accessMode
            && a.mountFlags == b.mountFlags && a.stagingPath == b.stagingPath
    }

    private func effectiveReadOnly(_ publish: PublishRecord) -> Bool {
        publish.readonly || AccessRules.isReaderOnly(AccessMode(rawValue: publish.accessMode) ?? .unknown)
            || MountFlags.asksReadOnly(publish.mountFlags)
    }

    private func describe(_ stage: StageRecord) -> String {
        var parts = ["\(stage.accessType) access", csiName(rawMode: stage.accessMode)]
        if stage.accessType == .mount {
            parts.append("fs_type \(stage.fsType)")
            parts.append("mount_flags [\(stage.mountFlags.joined(separator: ","))]")
        }
        return parts.joined(separator: ", ")
    }

    private func describe(_ publish: PublishRecord) -> String {
        var parts = ["\(publish.accessType) access", csiName(rawMode: publish.accessMode), "readonly=\(publish.readonly)"]
        if publish.accessType == .mount { parts.append("mount_flags [\(publish.mountFlags.joined(separator: ","))]") }
        return parts.joined(separator: ", ")
    }

    func metadata(_ volumeID: String, path: String) -> Logger.Metadata {
        ["volume.id": "\(volumeID)", "node.id": "\(nodeID)", "path": "\(path)"]
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

extension Logger.Metadata {
    fileprivate func with(_ key: String, _ value: String) -> Logger.Metadata {
        var copy = self
        copy[key] = "\(value)"
        return copy
    }
}
