import ArgumentParser
import CairnAgent
import CairnCore
import CairnNode
import CairnRPC

/// `--role agent`: the privileged per-machine daemon. Serves the agent protocol on its unix
/// socket (mode 0600) and, in a cluster, owns the node's registration, the replica server and
/// the engines.
enum AgentRole {
    static func run(_ context: ServeContext) async throws {
        if context.etcd != nil {
            // In a cluster the agent registers the node: its lease is the liveness of the
            // replica server and the engines, and only it knows the data address. The split
            // node role registers nothing, so killing it neither expires nor rewrites the record.
            try await context.store.registerNode(context.nodeRecord)
        }
        context.warnAboutMissingTools()
        var servers: [ServedEndpoint] = []
        if let agent = try await context.agentServer(sharing: nil) { servers.append(agent) }
        try await context.serve(servers, leadership: nil)
    }
}

extension ServeContext {
    /// The agent socket's server: the privileged Mounter (and hot-plug) for the node role and
    /// the CLI. Nil where this role has no mounter or no agent socket, or (`--role all` with the
    /// default path) when another process serves that socket already. `node`: the CSI node
    /// service of this process, shared so that hot-plug and CSI use the same volume locks.
    func agentServer(sharing node: NodeService?) async throws -> ServedEndpoint? {
        guard let linux, let agentEndpoint else { return nil }
        var agentLogger = logger
        agentLogger[metadataKey: "agent.endpoint"] = "\(agentEndpoint)"
        let hotPlug: NodeService
        if let node {
            hotPlug = node  // role all: one NodeService, so hot-plug and CSI share volume locks
        } else {
            hotPlug = NodeService(nodeID: nodeID, topology: topology, maxVolumesPerNode: options.maxVolumes, store: store,
                                  backing: backing, mounter: linux, pathRoots: roots, locks: VolumeLocks(),
                                  logger: agentLogger)
            // An agent (re)start: re-attach and re-mount what the records say is staged —
            // starting replicated volumes' engines through the same stage code, resuming the
            // FUSE connections the keeper kept — before the node role can reach us, so
            // nothing races with it.
            await Serve.recoverEngines(backing, linux: linux) { await hotPlug.restore() }
        }
        let service = AgentService(mounter: linux,
                                   confinement: AgentConfinement(pathRoots: roots, volumesDirectory: localFiles.directory,
                                                                 enginesDirectory: options.dataDir + "/engines"),
                                   hotPlug: hotPlug, backing: backing, store: store, nodeID: nodeID, logger: agentLogger)
        let router = Router()
        service.register(on: router)
        let path = Endpoint.unixPath(agentEndpoint)!
        if Serve.socketIsServed(path) {
            let message = "another process already serves the cairn agent socket \(path)"
            if role == .all && options.agentSocket == nil {
                logger.warning("\(message); not serving it (hot-plug goes to that agent). Pass --agent-socket PATH or --agent-socket none")
                return nil
            } else {
                throw ValidationError("\(message): stop it, or choose another --agent-socket")
            }
        }
        // `--role all` serves the default socket as a convenience (hot-plug): when it
        // cannot (not root, no /run/cairn), CSI is still served.
        return ServedEndpoint(name: "agent", endpoint: agentEndpoint, socketMode: 0o600,
                              server: GRPCServer(router: router, logger: agentLogger),
                              optional: role == .all && options.agentSocket == nil)
    }
}
