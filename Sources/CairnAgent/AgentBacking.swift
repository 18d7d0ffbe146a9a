import CairnCore
import CairnProto
import Foundation

/// The split node role's `NodeBacking`: the agent on this machine runs the volumes' engines
/// (and owns the replica server and the FUSE mounts), so every step is one call to it. The
/// node role holds nothing a volume's I/O depends on: it can be killed and restarted at any
/// moment, and the CO's repeated NodeStage finds the agent's engine and loop device in place.
///
/// The agent reads the volume's record from its own store connection; only the id (and the
/// attachment's epoch) cross the socket. Errors come back as the agent sent them (AgentWire).
public struct AgentBacking: NodeBacking {
    let client: AgentClient

    public init(client: AgentClient) {
        self.client = client
    }

    public func file(volumeID: String) async throws -> String {
        try await client.call(AgentProtocol.Method.volumeFile, Cairn_Agent_V1_VolumeFileRequest.with {
            $0.volumeID = volumeID
        }, as: Cairn_Agent_V1_VolumeFileResponse.self).file
    }

    public func activate(_ volume: VolumeRecord, epoch: FencingEpoch, grant: ClaimGrant?, key: VolumeDataKey?) async throws -> String {
        // Starting an engine claims every in-sync replica over the network.
        try await client.call(AgentProtocol.Method.activateVolume, Cairn_Agent_V1_ActivateVolumeRequest.with {
            $0.volumeID = volume.id
            $0.epoch = Int64(bitPattern: epoch.rawValue)
            if let key { $0.dataKey = Data(key.bytes) }
        }, as: Cairn_Agent_V1_ActivateVolumeResponse.self, timeout: AgentClient.slowTimeout).file
    }

    public func deactivate(volumeID: String) async throws {
        // Stopping an engine flushes every replica.
        _ = try await client.call(AgentProtocol.Method.deactivateVolume, Cairn_Agent_V1_DeactivateVolumeRequest.with {
            $0.volumeID = volumeID
        }, as: Cairn_Agent_V1_DeactivateVolumeResponse.self, timeout: AgentClient.slowTimeout)
    }

    public func condition(_ volume: VolumeRecord) async throws -> BackingCondition {
        try await client.call(AgentProtocol.Method.volumeCondition, Cairn_Agent_V1_VolumeConditionRequest.with {
            $0.volumeID = volume.id
        }, as: Cairn_Agent_V1_VolumeConditionResponse.self).decoded
    }

    public func expandOnNode(_ volume: VolumeRecord) async throws {
        _ = try await client.call(AgentProtocol.Method.expandVolumeOnNode, Cairn_Agent_V1_ExpandVolumeOnNodeRequest.with {
            $0.volumeID = volume.id
        }, as: Cairn_Agent_V1_ExpandVolumeOnNodeResponse.self, timeout: AgentClient.slowTimeout)
    }
}
