import CairnRPC

/// `--role all`: one process for one machine — Identity + Controller + Node on the CSI
/// endpoint, and the agent socket for `cairn volume attach|detach`, sharing one NodeService.
enum AllRole {
    static func run(_ context: ServeContext) async throws {
        context.warnAboutMissingTools()
        let router = Router()
        let node = try await context.csiNode(on: router, throttle: context.oneMachineThrottle())
        // The node is this process: ControllerModifyVolume applies limits to its devices directly.
        let (leadership, status) = try context.csiController(on: router, localLimits: node.throttle != nil ? node : nil)
        var servers = [context.csiServer(router, leadership: leadership)]
        if let agent = try await context.agentServer(sharing: node) { servers.append(agent) }
        try await context.serve(servers, leadership: leadership, background: [context.qosReconciler(node.throttle)].compactMap { $0 },
                                httpRoutes: [status])
    }
}
