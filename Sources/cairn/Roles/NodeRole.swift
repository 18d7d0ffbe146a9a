import CairnAgent
import CairnCore
import CairnNode
import CairnRoutes
import CairnRPC

/// `--role node`: Identity + Node on the CSI endpoint. With `--agent-socket PATH` (a split
/// node) every privileged step is an RPC to the agent; with `--agent-socket none` this process
/// is its own agent (mounter, engines, replica server, registration).
enum NodeRole {
    static func run(_ context: ServeContext) async throws {
        context.warnAboutMissingTools()
        let router = Router()
        context.reportNoOneMachineQoS(reason: "the node runs apart from the controller (--role node)")
        _ = try await context.csiNode(on: router)
        let csi = context.csiServer(router, leadership: nil)
        try await context.serve([csi], leadership: nil)
    }
}

extension ServeContext {
    /// The CSI Node service on `router`: through the agent for a split node, else on this
    /// machine (restoring the staged volumes first where this process runs their engines).
    func csiNode(on router: Router, throttle: (any IOThrottle)? = nil) async throws -> NodeService {
        let mounter: any Mounter
        let nodeBacking: any NodeBacking
        if splitNode, let agentEndpoint {
            let client = try AgentClient(socket: agentEndpoint, logger: logger)
            do {
                let hello = try await client.hello()
                logger.info("reached the cairn agent", metadata: [
                    "agent.endpoint": "\(agentEndpoint)", "agent.version": "\(hello.agentVersion)",
                    "agent.node_id": "\(hello.nodeID)",
                ])
                if hello.nodeID != nodeID {
                    logger.warning("the cairn agent serves another node id; both roles must be started with the same --node-id",
                                   metadata: ["agent.node_id": "\(hello.nodeID)"])
                }
            } catch {
                // Not fatal: pods start in any order. Every Node call says what is wrong until it is up.
                logger.warning("cannot reach the cairn agent yet; Node calls fail with UNAVAILABLE until it answers",
                               metadata: ["error": "\(error)"])
            }
            mounter = AgentMounter(client: client)
            // The engines run in the agent: this process holds none, so it may die
            // and restart at any moment without touching a volume's I/O.
            nodeBacking = AgentBacking(client: client)
        } else {
            mounter = linux!
            nodeBacking = backing
        }
        if !(splitNode && etcd != nil) {
            try await store.registerNode(nodeRecord)
        }
        let service = NodeService(nodeID: nodeID, topology: topology, maxVolumesPerNode: options.maxVolumes, store: store,
                                  backing: nodeBacking, mounter: mounter, pathRoots: roots, locks: VolumeLocks(),
                                  logger: logger, defaultTargetPID: options.targetNamespacePID, throttle: throttle)
        if role == .all || inProcessAgent {
            // This process is the agent too: bring the machine back to the records first —
            // resuming the engines whose FUSE connections the keeper kept.
            await Serve.recoverEngines(backing, linux: linux) { await service.restore() }
        }
        await service.reconcile()
        Routes.node(service, on: router)
        return service
    }
}
