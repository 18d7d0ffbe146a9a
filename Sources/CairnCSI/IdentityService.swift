import CSIProto
import CairnCore

/// CSI Identity. Probe is ready as soon as the server is serving (every dependency — store,
/// tools — is checked at start-up, before the socket is opened), unless `ready` says otherwise:
/// a standby controller is not ready until it holds the leader lease.
public struct IdentityService: Sendable {
    public let controllerService: Bool
    public let groupControllerService: Bool
    let ready: @Sendable () -> Bool

    public init(controllerService: Bool, groupControllerService: Bool = false, ready: @escaping @Sendable () -> Bool = { true }) {
        self.controllerService = controllerService
        self.groupControllerService = groupControllerService
        self.ready = ready
    }

    public func getPluginInfo(_ request: Csi_V1_GetPluginInfoRequest) async throws -> Csi_V1_GetPluginInfoResponse {
        var response = Csi_V1_GetPluginInfoResponse()
        response.name = CairnVersion.pluginName
        response.vendorVersion = CairnVersion.version
        return response
    }

    public func getPluginCapabilities(_ request: Csi_V1_GetPluginCapabilitiesRequest) async throws -> Csi_V1_GetPluginCapabilitiesResponse {
        var response = Csi_V1_GetPluginCapabilitiesResponse()
        var capabilities: [Csi_V1_PluginCapability.Service.TypeEnum] = [.volumeAccessibilityConstraints]
        if controllerService { capabilities.insert(.controllerService, at: 0) }
        response.capabilities = capabilities.map { type in
            var capability = Csi_V1_PluginCapability()
            capability.service.type = type
            return capability
        }
        if controllerService && groupControllerService {
            response.capabilities.append(.with { $0.service.type = .groupControllerService })
        }
        // Volumes grow while staged and in use: ControllerExpandVolume, then NodeExpandVolume
        // refreshes the device and grows the mounted filesystem.
        response.capabilities.append(.with { $0.volumeExpansion.type = .online })
        return response
    }

    public func probe(_ request: Csi_V1_ProbeRequest) async throws -> Csi_V1_ProbeResponse {
        var response = Csi_V1_ProbeResponse()
        response.ready = .with { $0.value = ready() }
        return response
    }
}
