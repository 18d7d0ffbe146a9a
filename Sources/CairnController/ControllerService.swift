import CSIProto
import CairnCSI
import CairnCrypto
import CairnCore
import Foundation
import Logging

/// CSI Controller: volumes, attachments (with fencing epochs), capacity.
///
/// Every handler reads: validate → take the volume's lock (or ABORTED) → return early if
/// already done → act → persist. All state lives in the MetadataStore; this type holds none.
public final class ControllerService: Sendable {
    /// The topology key every Cairn node reports (NodeGetInfo) and every volume is bound by.
    public static let nodeTopologyKey = "topology.cairn.dev/node"
    static let epochContextKey = "cairn.dev/epoch"

    let store: any MetadataStore
    let backing: any VolumeBacking
    let capacity: CapacityPolicy
    /// The node whose disk holds the volumes created here (one-machine deployment).
    let localNodeID: String
    let localTopology: [String: String]
    let locks: VolumeLocks
    let logger: Logger
    /// Cluster mode (etcd store): volumes are replicated across the live nodes, placed here.
    /// nil on one machine: every volume is a local file on `localNodeID`.
    let cluster: ClusterConfig?
    /// One machine, `--role all`, where the node can enforce QoS limits on the loop devices
    /// (cgroup v2 io.max): ControllerModifyVolume applies them through it. nil: MODIFY_VOLUME is
    /// offered only in cluster mode (the engine enforces them there).
    let localLimits: (any LocalLimitEnforcement)?
    /// The backup targets of `--backup-targets`: CreateVolume from `backup:<target>/<id>`.
    let backups: (any BackupSource)?

    public init(store: any MetadataStore, backing: any VolumeBacking, capacity: CapacityPolicy,
                localNodeID: String, localTopology: [String: String], locks: VolumeLocks, logger: Logger,
                cluster: ClusterConfig? = nil, localLimits: (any LocalLimitEnforcement)? = nil,
                backups: (any BackupSource)? = nil) {
        self.backups = backups
        self.cluster = cluster
        self.localLimits = cluster == nil ? localLimits : nil
        self.store = store
        self.backing = backing
        self.capacity = capacity
        self.localNodeID = localNodeID
        self.localTopology = localTopology
        self.locks = locks
        self.logger = logger
    }

    // MARK: CreateVolume / DeleteVolume

    public func createVolume(_ request: Csi_V1_CreateVolumeRequest) async throws -> Csi_V1_CreateVolumeResponse {
        try Validate.volumeName(request.name)
        let access = try AccessRules.parseAll(request.volumeCapabilities, field: "volume_capabilities")
        let parameters = try VolumeParameters(request.parameters)
        var source = try Self.contentSource(request)
        if let restoreFrom = parameters.restoreFrom {
            guard source == nil else {
                throw CairnError.invalidArgument("parameter restoreFrom and volume_content_source both name a source; give one")
            }
            source = .snapshot(id: restoreFrom)
        }
        var fsType = try Self.filesystem(parameters: parameters, access: access)
        var size = try capacity.size(required: request.capacityRange.requiredBytes,
                                     limit: request.capacityRange.limitBytes, fsType: fsType)
        let limits = try QoSLimits(request.mutableParameters)
        if !enforcesLimits, !limits.stored.isEmpty {
            throw CairnError.invalidArgument(
                "mutable_parameters (\(limits.stored.keys.sorted().joined(separator: ", "))) cannot be enforced here: \(Self.noEnforcement)")
        }
        if cluster == nil, parameters.replicas > 1 {
            throw CairnError.resourceExhausted(
                "replicas=\(parameters.replicas) needs \(parameters.replicas) nodes, but this deployment stores volumes on one node (\(localNodeID)); use replicas=1")
        }
        if cluster == nil, parameters.minInSync > 1 {
            throw CairnError.invalidArgument(
                "minInSync=\(parameters.minInSync) needs replicated volumes (cluster mode, --store etcd); a one-machine volume has one copy, so use minInSync=1 or leave it out")
        }
        if let cluster, parameters.minInSync > (parameters.explicitReplicas ?? cluster.defaultReplicas) {
            let count = parameters.explicitReplicas ?? cluster.defaultReplicas
            throw CairnError.invalidArgument(
                "minInSync=\(parameters.minInSync) is more than the volume's \(count) replicas: no write could ever be acknowledged; use minInSync ≤ replicas")
        }
        if cluster == nil, request.hasAccessibilityRequirements {
            let requisite = request.accessibilityRequirements.requisite
            if !requisite.isEmpty && !requisite.contains(where: { matchesLocalTopology($0.segments) }) {
                throw CairnError.resourceExhausted(
                    "no node satisfies accessibility_requirements.requisite; this plugin's node is \(localTopology)")
            }
        }

        return try await locks.withLock("name:\(request.name)", operation: "CreateVolume") {
            if let existing = try await store.volume(named: request.name) {
                try Self.checkCompatible(existing, size: size, request: request, parameters: parameters, fsType: fsType)
                if existing.contentSource != source {
                    throw CairnError.alreadyExists(
                        "volume \"\(existing.name)\" already exists with content source \(existing.contentSource.map { "\($0)" } ?? "none"), not \(source.map { "\($0)" } ?? "none")")
                }
                if existing.contentPending == true, let source {
                    // The CreateVolume that made the record was cut off before the content was in.
                    logger.notice("finishing a volume whose creation from its source was interrupted",
                                  metadata: ["volume.id": "\(existing.id)", "volume.source": "\(source)"])
                    try await fill(existing, from: source, secrets: request.secrets)
                    return Self.createResponse(try await store.volume(id: existing.id) ?? existing)
                }
                logger.debug("volume already exists", metadata: ["volume.id": "\(existing.id)", "volume.name": "\(existing.name)"])
                return Self.createResponse(existing)
            }
            var encryption: VolumeEncryption?
            if let source {
                try await checkSource(source, size: &size, limit: request.capacityRange.limitBytes, fsType: &fsType,
                                      secrets: request.secrets)
                encryption = try await sourceEncryption(source, encrypted: parameters.encrypted, secrets: request.secrets)
            }
            var volume = VolumeRecord(
                id: "vol-" + UUID().uuidString.lowercased(), name: request.name, capacityBytes: size,
                parameters: parameters.stored, fsType: fsType, accessModes: access.map { $0.mode.rawValue },
                accessibleTopology: localTopology, contentSource: source,
                mutableParameters: limits.stored.isEmpty ? nil : limits.stored)
            // A clone or restore holds its source's ciphertext: it takes the source's wrapped key.
            volume.encryption = encryption
            if parameters.encrypted, source == nil, let passphrase = request.secrets[EncryptionNames.passphraseSecret] {
                // The provisioner's secret carries the passphrase: the key is made now, so the
                // first NodeStage must bring the same passphrase (docs/encryption.md).
                volume.encryption = try await offCooperativePool { try VolumeKeys.create(passphrase: passphrase).0 }
            }
            if let cluster, let source, !source.isBackup {
                // A clone shares its source's layers: its replicas go where the source's are.
                volume.accessibleTopology = [:]
                volume.replicas = try await cloneReplicas(source: source, count: parameters.explicitReplicas ?? cluster.defaultReplicas)
                volume.createdByNode = scopedToNode ? localNodeID : nil
            } else if let cluster {
                // Any node can run the volume's engine: the volume is not bound to one node.
                volume.accessibleTopology = [:]
                let count = parameters.explicitReplicas ?? cluster.defaultReplicas
                // The CO's preferred topology (e.g. the node Kubernetes scheduled the pod on) gets a replica first.
                let preferred = scopePreferredNodes + request.accessibilityRequirements.preferred.compactMap { $0.segments[Self.nodeTopologyKey] }
                let chosen = try Placement.choose(count: count, size: size,
                                                  candidates: try await placementCandidates(), preferred: preferred)
                volume.replicas = chosen.map { ReplicaRecord(nodeID: $0.nodeID, address: $0.address ?? "", inSync: true) }
                volume.createdByNode = scopedToNode ? localNodeID : nil
                logger.info("placed the volume's replicas", metadata: [
                    "volume.id": "\(volume.id)", "replicas": "\(chosen.map(\.nodeID).joined(separator: ","))",
                ])
            } else {
                let provisioned = try await store.provisionedBytes()
                guard capacity.fits(size, provisioned: provisioned) else {
                    throw CairnError.resourceExhausted(
                        "not enough capacity for \(size) bytes: \(capacity.poolBytes - provisioned) of \(capacity.poolBytes) bytes are free on node \(localNodeID)")
                }
            }
            do {
                if let source {
                    // The record first, marked pending: a repeat after a crash finishes the
                    // fill, and DeleteVolume of a half-made clone finds it (and its hidden base).
                    volume.contentPending = true
                    try await store.createVolume(volume)
                    try await fill(volume, from: source, secrets: request.secrets)
                    volume.contentPending = nil
                } else {
                    try await backing.create(volume)
                    try await store.createVolume(volume)
                }
            } catch {
                if case .snapshot(let id)? = source, (try? BackupReference.parse(id)) != nil,
                   (error as? CairnError)?.code == .unavailable {
                    // A restore from a backup cut off by a transient fault (the object store
                    // unreachable): the record stays pending with what was written, and the CO's
                    // retry of CreateVolume resumes it where it stopped (docs/backups.md).
                    logger.warning("restoring a backup into a new volume stopped; a retry of CreateVolume resumes it",
                                   metadata: ["volume.id": "\(volume.id)", "volume.source": "\(id)", "error": "\(error)"])
                    throw error
                }
                if source != nil {
                    try? await removeCloneBase(of: volume)
                    try? await store.deleteVolume(id: volume.id)
                }
                do {
                    try await backing.delete(volume)
                } catch let cleanup {
                    logger.warning("could not remove the storage of a volume whose creation failed",
                                   metadata: ["volume.id": "\(volume.id)", "error": "\(cleanup)"])
                }
                throw error
            }
            logger.info("volume created", metadata: [
                "volume.id": "\(volume.id)", "volume.name": "\(volume.name)", "volume.bytes": "\(size)",
                "volume.fs": "\(fsType)",
            ])
            return Self.createResponse(volume)
        }
    }

    static func filesystem(parameters: VolumeParameters, access: [RequestedAccess]) throws -> String {
        let requested = Set(access.map(\.fsType).filter { !$0.isEmpty })
        if requested.count > 1 {
            throw CairnError.invalidArgument("volume_capabilities ask for different filesystems (\(requested.sorted().joined(separator: ", ")))")
        }
        if let p = parameters.fsType, let c = requested.first, p != c {
            throw CairnError.invalidArgument("parameter fsType=\(p) contradicts volume_capabilities fs_type \(c)")
        }
        if let fs = parameters.fsType ?? requested.first { return fs }
        return access.contains(where: { $0.accessType == .mount }) ? AccessRules.defaultFilesystem : ""
    }

    static func checkCompatible(_ existing: VolumeRecord, size: Int64, request: Csi_V1_CreateVolumeRequest,
                                parameters: VolumeParameters, fsType: String) throws {
        let required = request.capacityRange.requiredBytes
        let limit = request.capacityRange.limitBytes
        if existing.capacityBytes < required || (limit > 0 && existing.capacityBytes > limit) {
            throw CairnError.alreadyExists(
                "volume \"\(existing.name)\" already exists with \(existing.capacityBytes) bytes, outside the requested range [\(required), \(limit == 0 ? "unlimited" : String(limit))]")
        }
        if existing.parameters != parameters.stored {
            throw CairnError.alreadyExists("volume \"\(existing.name)\" already exists with different parameters \(existing.parameters)")
        }
        if !fsType.isEmpty && !existing.fsType.isEmpty && existing.fsType != fsType {
            throw CairnError.alreadyExists("volume \"\(existing.name)\" already exists with filesystem \(existing.fsType), not \(fsType)")
        }
    }

    static func createResponse(_ volume: VolumeRecord) -> Csi_V1_CreateVolumeResponse {
        var response = Csi_V1_CreateVolumeResponse()
        response.volume = csiVolume(volume)
        return response
    }

    static func csiVolume(_ volume: VolumeRecord) -> Csi_V1_Volume {
        var v = Csi_V1_Volume()
        v.volumeID = volume.id
        v.capacityBytes = volume.capacityBytes
        var context = volume.parameters
        if !volume.fsType.isEmpty { context["fsType"] = volume.fsType }
        v.volumeContext = context
        switch volume.contentSource {
        case .snapshot(let id): v.contentSource = .with { $0.snapshot = .with { $0.snapshotID = id } }
        case .volume(let id): v.contentSource = .with { $0.volume = .with { $0.volumeID = id } }
        case nil: break
        }
        if !volume.accessibleTopology.isEmpty {
            v.accessibleTopology = [Csi_V1_Topology.with { $0.segments = volume.accessibleTopology }]
        }
        return v
    }

    public func deleteVolume(_ request: Csi_V1_DeleteVolumeRequest) async throws -> Csi_V1_DeleteVolumeResponse {
        try Validate.volumeID(request.volumeID)
        return try await locks.withLock(request.volumeID, operation: "DeleteVolume") {
            guard let volume = try await store.volume(id: request.volumeID) else {
                return Csi_V1_DeleteVolumeResponse()
            }
            let attachments = try await store.attachments(volumeID: volume.id)
            if let first = attachments.first {
                throw CairnError.failedPrecondition(
                    "volume \(volume.id) is still published to node \(first.nodeID); ControllerUnpublishVolume it first")
            }
            if cluster == nil, let staged = try await store.stage(volumeID: volume.id, nodeID: localNodeID) {
                throw CairnError.failedPrecondition(
                    "volume \(volume.id) is still staged at \(staged.stagingPath) on node \(staged.nodeID); NodeUnstageVolume it first")
            }
            if cluster != nil {
                // A replica's snapshots are layers of that replica: they cannot outlive it.
                let snapshots = try await visibleSnapshots(of: volume.id)
                if !snapshots.isEmpty {
                    throw CairnError.failedPrecondition(
                        "volume \(volume.id) has \(snapshots.count) snapshot(s) (\(snapshots.prefix(5).map(\.id).joined(separator: ", "))), which live in its replicas; DeleteSnapshot them first (volumes cloned from them keep their data)")
                }
            }
            try await removeCloneBase(of: volume)
            if let replicas = volume.replicas, !replicas.isEmpty {
                // The record goes first, and in the same transaction a pending deletion of every
                // replica: a node that is away (or a controller that dies now) cannot leave one
                // behind for good. Each replica deleted now takes its pending deletion with it; the
                // others' nodes delete them when they run again (ReplicaSweeper).
                let pending = replicas.map { ReplicaDeletion(nodeID: $0.nodeID, volumeID: volume.id, reason: "volume \(volume.id) deleted") }
                try await store.deleteVolume(id: volume.id, recordingReplicaDeletions: pending)
                try await backing.delete(volume)
            } else {
                try await backing.delete(volume)
                try await store.deleteVolume(id: volume.id)
            }
            logger.info("volume deleted", metadata: ["volume.id": "\(volume.id)", "volume.name": "\(volume.name)"])
            return Csi_V1_DeleteVolumeResponse()
        }
    }

    // MARK: ControllerPublish / Unpublish

    public func controllerPublishVolume(_ request: Csi_V1_ControllerPublishVolumeRequest) async throws -> Csi_V1_ControllerPublishVolumeResponse {
        try Validate.volumeID(request.volumeID)
        try Validate.nodeID(request.nodeID)
        guard request.hasVolumeCapability else { throw CairnError.invalidArgument("volume_capability is required") }
        let access = try AccessRules.parse(request.volumeCapability, field: "volume_capability")

        return try await locks.withLock(request.volumeID, operation: "ControllerPublishVolume") {
            guard let volume = try await store.volume(id: request.volumeID) else {
                throw CairnError.notFound("volume \(request.volumeID) does not exist")
            }
            if volume.contentPending == true {
                throw CairnError.failedPrecondition(
                    "volume \(volume.id) is still being filled from \(volume.contentSource.map { "\($0)" } ?? "its source") (its CreateVolume was interrupted); repeat that CreateVolume to finish it")
            }
            guard let node = try await store.node(id: request.nodeID) else {
                throw CairnError.notFound("node \(request.nodeID) is not registered with this controller")
            }
            if !access.fsType.isEmpty && !volume.fsType.isEmpty && access.fsType != volume.fsType {
                throw CairnError.invalidArgument(
                    "volume_capability asks for \(access.fsType) but volume \(volume.id) is formatted \(volume.fsType)")
            }
            let existing = try await store.attachments(volumeID: volume.id)
            if let mine = existing.first(where: { $0.nodeID == request.nodeID }) {
                guard mine.readonly == request.readonly else {
                    throw CairnError.alreadyExists(
                        "volume \(volume.id) is already published to node \(request.nodeID) with readonly=\(mine.readonly)")
                }
                return Self.publishResponse(mine)
            }
            let exclusive = AccessRules.isSingleNode(access.mode)
                || existing.contains { AccessRules.isSingleNode(AccessMode(rawValue: $0.accessMode) ?? .unknown) }
            let attachment = try await store.attach(volumeID: volume.id, nodeID: request.nodeID, readonly: request.readonly,
                                                    accessMode: access.mode.rawValue, exclusive: exclusive,
                                                    nodeLimit: node.maxVolumes, signer: cluster?.claimSigner)
            logger.info("volume published to node", metadata: [
                "volume.id": "\(volume.id)", "node.id": "\(request.nodeID)", "volume.epoch": "\(attachment.epoch)",
                "readonly": "\(request.readonly)",
            ])
            let fenced = volume.epoch.rawValue > 0 ? "; writers of epoch \(volume.epoch) and older are fenced" : ""
            store.recordEvent(ClusterEvent(kind: .attached, volumeID: volume.id, nodeID: request.nodeID,
                                           message: "attached to node \(request.nodeID)\(request.readonly ? " read-only" : "") at epoch \(attachment.epoch)\(fenced)"),
                              logger: logger)
            return Self.publishResponse(attachment)
        }
    }

    static func publishResponse(_ attachment: AttachmentRecord) -> Csi_V1_ControllerPublishVolumeResponse {
        var response = Csi_V1_ControllerPublishVolumeResponse()
        response.publishContext = [epochContextKey: String(attachment.epoch.rawValue)]
        return response
    }

    public func controllerUnpublishVolume(_ request: Csi_V1_ControllerUnpublishVolumeRequest) async throws -> Csi_V1_ControllerUnpublishVolumeResponse {
        try Validate.volumeID(request.volumeID)
        if !request.nodeID.isEmpty { try Validate.nodeID(request.nodeID) }
        return try await locks.withLock(request.volumeID, operation: "ControllerUnpublishVolume") {
            // Unknown volume or node: it is certainly not published there, which is success.
            let attachments = try await store.attachments(volumeID: request.volumeID)
            for attachment in attachments where request.nodeID.isEmpty || attachment.nodeID == request.nodeID {
                try await store.detach(volumeID: attachment.volumeID, nodeID: attachment.nodeID)
                logger.info("volume unpublished from node", metadata: [
                    "volume.id": "\(attachment.volumeID)", "node.id": "\(attachment.nodeID)",
                ])
            }
            return Csi_V1_ControllerUnpublishVolumeResponse()
        }
    }

    // MARK: Queries

    public func validateVolumeCapabilities(_ request: Csi_V1_ValidateVolumeCapabilitiesRequest) async throws -> Csi_V1_ValidateVolumeCapabilitiesResponse {
        try Validate.volumeID(request.volumeID)
        if request.volumeCapabilities.isEmpty { throw CairnError.invalidArgument("volume_capabilities is required") }
        guard let volume = try await store.volume(id: request.volumeID) else {
            throw CairnError.notFound("volume \(request.volumeID) does not exist")
        }
        var response = Csi_V1_ValidateVolumeCapabilitiesResponse()
        for (i, capability) in request.volumeCapabilities.enumerated() {
            if let reason = AccessRules.unsupportedReason(capability) {
                response.message = "volume_capabilities[\(i)]: \(reason)"
                return response
            }
            if case .mount(let mount) = capability.accessType, !mount.fsType.isEmpty,
               !volume.fsType.isEmpty, mount.fsType != volume.fsType {
                response.message = "volume_capabilities[\(i)]: volume \(volume.id) has filesystem \(volume.fsType), not \(mount.fsType)"
                return response
            }
        }
        if !request.parameters.isEmpty {
            let parameters: VolumeParameters
            do { parameters = try VolumeParameters(request.parameters) } catch let e as CairnError {
                response.message = e.message
                return response
            }
            if parameters.stored != volume.parameters {
                response.message = "parameters \(parameters.stored) differ from the volume's \(volume.parameters)"
                return response
            }
        }
        var confirmed = Csi_V1_ValidateVolumeCapabilitiesResponse.Confirmed()
        confirmed.volumeContext = request.volumeContext
        confirmed.volumeCapabilities = request.volumeCapabilities
        confirmed.parameters = request.parameters
        response.confirmed = confirmed
        return response
    }

    /// Pagination tokens are the id of the last volume (or snapshot) returned; listing resumes
    /// strictly after it, so a token stays valid when that entry is deleted and new entries are
    /// not skipped.
    static func isToken(_ token: String, prefix: String = "vol-") -> Bool {
        token.hasPrefix(prefix) && UUID(uuidString: String(token.dropFirst(prefix.count))) != nil
    }

    public func listVolumes(_ request: Csi_V1_ListVolumesRequest) async throws -> Csi_V1_ListVolumesResponse {
        if request.maxEntries < 0 { throw CairnError.invalidArgument("max_entries must not be negative") }
        if !request.startingToken.isEmpty && !Self.isToken(request.startingToken) {
            throw CairnError.aborted("starting_token \"\(Validate.printable(request.startingToken))\" was not issued by this plugin; list again from the start")
        }
        let limit = Int(request.maxEntries)
        let page = try await scoped(store.listVolumes(afterID: request.startingToken.isEmpty ? nil : request.startingToken,
                                                      limit: scopedToNode || limit <= 0 ? 0 : limit + 1))
        var response = Csi_V1_ListVolumesResponse()
        let shown = limit > 0 ? Array(page.prefix(limit)) : page
        for volume in shown {
            var entry = Csi_V1_ListVolumesResponse.Entry()
            entry.volume = Self.csiVolume(volume)
            entry.status.publishedNodeIds = try await store.attachments(volumeID: volume.id).map(\.nodeID)
            entry.status.volumeCondition = condition(volume)
            response.entries.append(entry)
        }
        if limit > 0 && page.count > limit, let last = shown.last { response.nextToken = last.id }
        return response
    }

    public func controllerGetVolume(_ request: Csi_V1_ControllerGetVolumeRequest) async throws -> Csi_V1_ControllerGetVolumeResponse {
        try Validate.volumeID(request.volumeID)
        guard let volume = try await store.volume(id: request.volumeID) else {
            throw CairnError.notFound("volume \(request.volumeID) does not exist")
        }
        var response = Csi_V1_ControllerGetVolumeResponse()
        response.volume = Self.csiVolume(volume)
        response.status.publishedNodeIds = try await store.attachments(volumeID: volume.id).map(\.nodeID)
        response.status.volumeCondition = condition(volume)
        return response
    }

    /// The CSI volume condition (ListVolumes, ControllerGetVolume; the status page shows its message).
    public func condition(_ volume: VolumeRecord) -> Csi_V1_VolumeCondition {
        var condition = Csi_V1_VolumeCondition()
        if let problem = backing.problem(volume) {
            condition.abnormal = true
            condition.message = problem
        } else if volume.replicas == nil {
            condition.message = "healthy: 1 of 1 replicas in sync on node \(localNodeID)"
        } else {
            condition.message = backing.healthy(volume)
        }
        return condition
    }

    public func getCapacity(_ request: Csi_V1_GetCapacityRequest) async throws -> Csi_V1_GetCapacityResponse {
        let parameters = try VolumeParameters(request.parameters)
        var response = Csi_V1_GetCapacityResponse()
        let floor = CapacityPolicy.minimum(fsType: parameters.fsType)
        response.minimumVolumeSize = .with { $0.value = floor }
        let capabilitiesOK = request.volumeCapabilities.allSatisfy { AccessRules.unsupportedReason($0) == nil }
        if let cluster {
            guard capabilitiesOK else {
                response.maximumVolumeSize = .with { $0.value = 0 }
                return response
            }
            // The largest volume that could be placed now: the count-th largest free space.
            let count = parameters.explicitReplicas ?? cluster.defaultReplicas
            let candidates = try await placementCandidates()
            let free = candidates.map(\.freeBytes).sorted(by: >)
            let usable = scopedToNode ? scopedCapacity(count: count, candidates: candidates)
                : free.count >= count ? max(0, free[count - 1]) / CapacityPolicy.mib * CapacityPolicy.mib : 0
            response.availableCapacity = usable
            response.maximumVolumeSize = .with { $0.value = usable }
            return response
        }
        let topologyOK = !request.hasAccessibleTopology || matchesLocalTopology(request.accessibleTopology.segments)
        guard capabilitiesOK, topologyOK, parameters.replicas == 1 else {
            response.maximumVolumeSize = .with { $0.value = 0 }
            return response
        }
        let free = max(0, capacity.poolBytes - (try await store.provisionedBytes()))
        let usable = free / CapacityPolicy.mib * CapacityPolicy.mib
        response.availableCapacity = usable
        response.maximumVolumeSize = .with { $0.value = usable }
        return response
    }

    /// Whether QoS limits (mutable parameters) are enforced: by the engine in a cluster, by the
    /// node's io.max on one machine where start-up found it possible.
    var enforcesLimits: Bool { cluster != nil || localLimits != nil }

    static let noEnforcement = "one-machine volumes are limited with cgroup v2 io.max, which needs --role all and a cgroup v2 io controller with the workloads' cgroup (--qos-cgroup; the log at start-up says what is missing), or use the replicated data path (--store etcd)"

    func matchesLocalTopology(_ segments: [String: String]) -> Bool {
        segments.allSatisfy { localTopology[$0.key] == $0.value }
    }

    public func controllerGetCapabilities(_ request: Csi_V1_ControllerGetCapabilitiesRequest) async throws -> Csi_V1_ControllerGetCapabilitiesResponse {
        let types: [Csi_V1_ControllerServiceCapability.RPC.TypeEnum] = [
            .createDeleteVolume, .publishUnpublishVolume, .listVolumes, .getCapacity, .publishReadonly,
            .listVolumesPublishedNodes, .getVolume, .volumeCondition, .singleNodeMultiWriter,
            .createDeleteSnapshot, .listSnapshots, .getSnapshot, .cloneVolume, .expandVolume,
        ] + (enforcesLimits ? [.modifyVolume] : [])
        var response = Csi_V1_ControllerGetCapabilitiesResponse()
        response.capabilities = types.map { type in
            var capability = Csi_V1_ControllerServiceCapability()
            capability.rpc.type = type
            return capability
        }
        return response
    }
}
