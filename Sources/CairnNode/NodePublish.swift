import CSIProto
import CairnCSI
import CairnCore
import Foundation
import Logging

// NodePublishVolume and NodeUnpublishVolume: the staged volume bound at each target path, in
// the host's or a process's mount namespace.

extension NodeService {
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

    private func isSamePublish(_ a: PublishRecord, _ b: PublishRecord) -> Bool {
        a.accessType == b.accessType && a.readonly == b.readonly && a.accessMode == b.accessMode
            && a.mountFlags == b.mountFlags && a.stagingPath == b.stagingPath
    }

    private func describe(_ publish: PublishRecord) -> String {
        var parts = ["\(publish.accessType) access", csiName(rawMode: publish.accessMode), "readonly=\(publish.readonly)"]
        if publish.accessType == .mount { parts.append("mount_flags [\(publish.mountFlags.joined(separator: ","))]") }
        return parts.joined(separator: ", ")
    }
}
