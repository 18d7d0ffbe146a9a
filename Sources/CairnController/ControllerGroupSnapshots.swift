import CSIProto
import CairnCore
import Foundation
import SwiftProtobuf

// CSI GroupController: crash-consistent snapshots of several volumes at one write barrier
// (docs/snapshots.md#group-snapshots). A group is a record naming its member snapshots; each
// member is an ordinary snapshot (listed, restorable) that is deleted with its group.

extension ControllerService {
    static let groupIDPrefix = "group-"

    public func groupControllerGetCapabilities(_ request: Csi_V1_GroupControllerGetCapabilitiesRequest) async throws -> Csi_V1_GroupControllerGetCapabilitiesResponse {
        var response = Csi_V1_GroupControllerGetCapabilitiesResponse()
        response.capabilities = [.with { $0.rpc.type = .createDeleteGetVolumeGroupSnapshot }]
        return response
    }

    public func createVolumeGroupSnapshot(_ request: Csi_V1_CreateVolumeGroupSnapshotRequest) async throws -> Csi_V1_CreateVolumeGroupSnapshotResponse {
        try Validate.volumeName(request.name)
        if request.sourceVolumeIds.isEmpty { throw CairnError.invalidArgument("source_volume_ids is required") }
        for (i, id) in request.sourceVolumeIds.enumerated() { try Validate.volumeID(id, field: "source_volume_ids[\(i)]") }
        if Set(request.sourceVolumeIds).count != request.sourceVolumeIds.count {
            throw CairnError.invalidArgument("source_volume_ids names a volume more than once")
        }
        try Self.checkSnapshotParameters(request.parameters)
        let sources = request.sourceVolumeIds
        return try await locks.withLock("group-name:\(request.name)", operation: "CreateVolumeGroupSnapshot") {
            if let existing = try await store.groupSnapshot(named: request.name) {
                guard Set(existing.sourceVolumeIDs) == Set(sources) else {
                    throw CairnError.alreadyExists(
                        "group snapshot \"\(request.name)\" already exists for volumes \(existing.sourceVolumeIDs.joined(separator: ", "))")
                }
                let ready = existing.readyToUse ? existing : try await finishGroup(existing)
                return try await groupResponse(ready)
            }
            for id in sources where try await store.volume(id: id) == nil {
                throw CairnError.notFound("source volume \(id) does not exist")
            }
            let groupID = Self.groupIDPrefix + UUID().uuidString.lowercased()
            var members: [SnapshotRecord] = []
            for (i, id) in sources.enumerated() {
                var snapshot = try await startSnapshot(name: "\(groupID)-\(i)", of: id, hidden: false)
                snapshot.groupID = groupID
                try await store.updateSnapshot(snapshot)
                members.append(snapshot)
            }
            let group = GroupSnapshotRecord(id: groupID, name: request.name, snapshotIDs: members.map(\.id), sourceVolumeIDs: sources)
            try await store.createGroupSnapshot(group)
            return try await groupResponse(try await finishGroup(group))
        }
    }

    /// Takes every member at one barrier, under all the source volumes' locks (taken in id
    /// order, so two groups over the same volumes cannot deadlock: the second gets ABORTED).
    func finishGroup(_ pending: GroupSnapshotRecord) async throws -> GroupSnapshotRecord {
        var snapshots: [SnapshotRecord] = []
        for id in pending.snapshotIDs {
            guard let snapshot = try await store.snapshot(id: id) else {
                throw CairnError.internal("group snapshot \(pending.id) names snapshot \(id), which has no record; DeleteVolumeGroupSnapshot it and take it again")
            }
            snapshots.append(snapshot)
        }
        let order = pending.sourceVolumeIDs.sorted()
        func locked(_ rest: ArraySlice<String>) async throws -> [[String]?] {
            guard let first = rest.first else {
                var members: [GroupSnapshotMember] = []
                for (i, snapshot) in snapshots.enumerated() {
                    guard let volume = try await store.volume(id: snapshot.sourceVolumeID) else {
                        throw CairnError.notFound("source volume \(snapshot.sourceVolumeID) was deleted before the group snapshot was taken")
                    }
                    // Its blocks are the volume's ciphertext: a restore needs the same wrapped key.
                    snapshots[i].encryption = volume.encryption
                    members.append(GroupSnapshotMember(snapshot: snapshot, volume: volume, use: try await use(of: volume)))
                }
                return try await backing.takeGroupSnapshot(members)
            }
            return try await locks.withLock(first, operation: "CreateVolumeGroupSnapshot") { try await locked(rest.dropFirst()) }
        }
        let started = ContinuousClock.now
        let holders = try await locked(order[...])
        for (i, var snapshot) in snapshots.enumerated() {
            snapshot.holders = holders[i]
            snapshot.readyToUse = true
            try await store.updateSnapshot(snapshot)
        }
        var group = pending
        group.readyToUse = true
        try await store.updateGroupSnapshot(group)
        logger.info("group snapshot taken", metadata: [
            "group.id": "\(group.id)", "group.name": "\(group.name)", "volumes": "\(group.sourceVolumeIDs.joined(separator: ","))",
            "duration": "\(ContinuousClock.now - started)",
        ])
        return group
    }

    func groupResponse(_ group: GroupSnapshotRecord) async throws -> Csi_V1_CreateVolumeGroupSnapshotResponse {
        var response = Csi_V1_CreateVolumeGroupSnapshotResponse()
        response.groupSnapshot = try await csiGroup(group)
        return response
    }

    func csiGroup(_ group: GroupSnapshotRecord) async throws -> Csi_V1_VolumeGroupSnapshot {
        var g = Csi_V1_VolumeGroupSnapshot()
        g.groupSnapshotID = group.id
        g.creationTime = Google_Protobuf_Timestamp(date: group.createdAt)
        g.readyToUse = group.readyToUse
        for id in group.snapshotIDs {
            if let snapshot = try await store.snapshot(id: id) { g.snapshots.append(Self.csiSnapshot(snapshot)) }
        }
        return g
    }

    public func deleteVolumeGroupSnapshot(_ request: Csi_V1_DeleteVolumeGroupSnapshotRequest) async throws -> Csi_V1_DeleteVolumeGroupSnapshotResponse {
        if request.groupSnapshotID.isEmpty { throw CairnError.invalidArgument("group_snapshot_id is required") }
        // An id Cairn could not have issued names nothing: deleting it is done.
        guard (try? Validate.volumeID(request.groupSnapshotID, field: "group_snapshot_id")) != nil else {
            return Csi_V1_DeleteVolumeGroupSnapshotResponse()
        }
        return try await locks.withLock(request.groupSnapshotID, operation: "DeleteVolumeGroupSnapshot") {
            guard let group = try await store.groupSnapshot(id: request.groupSnapshotID) else {
                return Csi_V1_DeleteVolumeGroupSnapshotResponse()
            }
            try Self.checkMembers(request.snapshotIds, of: group)
            for id in group.snapshotIDs {
                if let snapshot = try await store.snapshot(id: id) { try await removeSnapshot(snapshot) }
            }
            try await store.deleteGroupSnapshot(id: group.id)
            logger.info("group snapshot deleted", metadata: ["group.id": "\(group.id)", "group.name": "\(group.name)"])
            return Csi_V1_DeleteVolumeGroupSnapshotResponse()
        }
    }

    public func getVolumeGroupSnapshot(_ request: Csi_V1_GetVolumeGroupSnapshotRequest) async throws -> Csi_V1_GetVolumeGroupSnapshotResponse {
        if request.groupSnapshotID.isEmpty { throw CairnError.invalidArgument("group_snapshot_id is required") }
        let notFound = CairnError.notFound("group snapshot \(Validate.printable(request.groupSnapshotID)) does not exist")
        guard (try? Validate.volumeID(request.groupSnapshotID, field: "group_snapshot_id")) != nil,
              let group = try await store.groupSnapshot(id: request.groupSnapshotID) else { throw notFound }
        try Self.checkMembers(request.snapshotIds, of: group)
        var response = Csi_V1_GetVolumeGroupSnapshotResponse()
        response.groupSnapshot = try await csiGroup(group)
        return response
    }

    /// The spec's "snapshot list mismatch": when the caller names the members, they must be
    /// the group's.
    static func checkMembers(_ ids: [String], of group: GroupSnapshotRecord) throws {
        guard !ids.isEmpty, Set(ids) != Set(group.snapshotIDs) else { return }
        throw CairnError.invalidArgument(
            "snapshot_ids (\(ids.joined(separator: ", "))) are not the members of group snapshot \(group.id) (\(group.snapshotIDs.joined(separator: ", ")))")
    }
}
