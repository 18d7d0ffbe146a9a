import CairnCSI
import CairnCore
import Logging

/// How a hot-plugged volume was bound into a process.
public struct ProcessAttachment: Sendable, Equatable {
    /// How the volume is staged on this node, hence what was bound: its filesystem (mount) or
    /// its device node (block).
    public var accessType: AccessType
    /// Whether the bind is read-only (asked for, or forced by a reader-only stage).
    public var readOnly: Bool
}

/// What `detachFromProcess` found.
public struct ProcessDetachment: Sendable, Equatable {
    /// Something of the volume was unmounted at the path now.
    public var detached: Bool
    /// The process has exited: its mount namespace, and the bind in it, went with it.
    public var processGone: Bool
}

// Hot-plug (`cairn volume attach|detach`, served by the agent): binds a volume that is staged
// on this node into a *running* process's mount namespace — a container that was started
// without it — and removes it again. The same publish/unpublish code as NodePublishVolume and
// NodeUnpublishVolume does the work, in the process's namespace (`.process`, named by PID and
// start time), under the volume's lock, and records the target like any other publish, so
// NodeUnstageVolume refuses to pull a volume from under a container that still has it.
extension NodeService {
    /// Binds the staged volume `volumeID` at `path` (in the process's view) inside the mount
    /// namespace of process `pid`. Idempotent: a repeat finds the bind in place and succeeds.
    /// FAILED_PRECONDITION when the volume is not staged on this node; INVALID_ARGUMENT when
    /// the process does not exist or the path escapes its root.
    public func attachToProcess(volumeID: String, pid: Int32, path: String, readOnly: Bool) async throws -> ProcessAttachment {
        try Validate.volumeID(volumeID)
        try Self.checkPID(pid)
        let targetPath = try Validate.absolutePath(path, field: "path")
        return try await locks.withLock(volumeID, operation: "volume attach") {
            guard try await store.volume(id: volumeID) != nil else {
                throw CairnError.notFound("volume \(volumeID) does not exist")
            }
            guard let stage = try await store.stage(volumeID: volumeID, nodeID: nodeID) else {
                throw CairnError.failedPrecondition("volume \(volumeID) is not staged on this node; stage it first")
            }
            let mode = AccessMode(rawValue: stage.accessMode) ?? .unknown
            if readOnly, stage.accessType == .block, !AccessRules.isReaderOnly(mode),
               try await !store.attachments(volumeID: volumeID).contains(where: { $0.nodeID == nodeID && $0.readonly }) {
                // A read-only mount does not stop writes through a device node on it; only a
                // read-only loop device does, and that is chosen when the volume is staged.
                throw CairnError.failedPrecondition(
                    "volume \(volumeID) is staged for read-write block access: a read-only bind cannot stop writes to its device node. Attach it read-write, or stage it read-only (a reader-only access mode or a read-only ControllerPublishVolume) to attach it read-only")
            }
            let namespace = try await mounter.namespace(ofProcess: pid)
            let access = RequestedAccess(accessType: stage.accessType, fsType: stage.fsType,
                                         mountFlags: stage.mountFlags, mode: mode)
            try await publish(volumeID: volumeID, targetPath: targetPath, stagingPath: stage.stagingPath,
                              access: access, readonlyFlag: readOnly, namespace: namespace)
            let effective = readOnly || AccessRules.isReaderOnly(mode) || MountFlags.asksReadOnly(stage.mountFlags)
            logger.info("volume attached to a running process", metadata: [
                "volume.id": "\(volumeID)", "node.id": "\(nodeID)", "path": "\(targetPath)",
                "namespace": "\(namespace)", "readonly": "\(effective)",
            ])
            return ProcessAttachment(accessType: stage.accessType, readOnly: effective)
        }
    }

    /// Unmounts the volume at `path` in the mount namespace of process `pid` and removes the
    /// target it created. Idempotent: nothing mounted there → success with `detached: false`;
    /// a process that has exited took the bind with it → success with `processGone: true` (and
    /// its record is dropped).
    @discardableResult
    public func detachFromProcess(volumeID: String, pid: Int32, path: String) async throws -> ProcessDetachment {
        try Validate.volumeID(volumeID)
        try Self.checkPID(pid)
        let targetPath = try Validate.absolutePath(path, field: "path")
        return try await locks.withLock(volumeID, operation: "volume detach") {
            guard try await store.volume(id: volumeID) != nil else {
                throw CairnError.notFound("volume \(volumeID) does not exist")
            }
            let records = try await store.publishes(volumeID: volumeID).filter {
                guard $0.nodeID == nodeID, $0.targetPath == targetPath, case .process(let p, _) = $0.namespace else { return false }
                return p == pid
            }
            let namespace: MountNamespace
            do {
                namespace = try await mounter.namespace(ofProcess: pid)
            } catch is MountNamespaceGone {
                for record in records { try await store.removePublish(record) }
                logger.info("the process has exited; its mount namespace and the bind in it are gone", metadata: [
                    "volume.id": "\(volumeID)", "path": "\(targetPath)", "pid": "\(pid)",
                ])
                return ProcessDetachment(detached: false, processGone: true)
            }
            // A record for an earlier process that had the same PID is stale.
            for stale in records where stale.namespace != namespace {
                try await store.removePublish(stale)
            }
            let record = records.first { $0.namespace == namespace }
            let mounted = try await mounter.inspect(targetPath, in: namespace).isMountPoint
            if record == nil && !mounted {
                return ProcessDetachment(detached: false, processGone: false)
            }
            // unpublish refuses a mount that is not the volume's.
            try await unpublish(volumeID: volumeID, targetPath: targetPath, namespace: namespace, record: record)
            return ProcessDetachment(detached: mounted, processGone: false)
        }
    }

    private static func checkPID(_ pid: Int32) throws {
        guard pid > 0 else { throw CairnError.invalidArgument("pid must be a process id (a positive number), not \(pid)") }
    }
}
