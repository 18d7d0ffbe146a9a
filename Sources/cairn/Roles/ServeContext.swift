import ArgumentParser
import CairnCSI
import CairnCluster
import CairnController
import CairnCore
import CairnEngine
import CairnLocal
import CairnNode
import CairnObservability
import CairnProcess
import CairnReplica
import CairnRoutes
import CairnRPC
import CairnSecurity
import CairnStore
import Foundation
import Logging
import ServiceLifecycle

/// What every role of `cairn serve` builds on, made once from the validated flags: the store,
/// the volumes' backing (with the FUSE keeper where this process runs engines), the machine's
/// own mounter, the replica server and the node's record. The role files (ControllerRole,
/// NodeRole, AgentRole, AllRole) assemble their services from it; `serve` runs them.
struct ServeContext {
    let options: Serve
    let logger: Logger
    /// Where CSI is served.
    let endpoint: String
    let nodeID: String
    let topology: [String: String]
    /// `--path-root`s without a trailing slash.
    let roots: [String]
    /// The agent socket this role serves or reaches; nil when it has none.
    let agentEndpoint: String?
    /// How this process's data-protocol traffic is authenticated (`.insecure` when it speaks none).
    let security: DataPlaneSecurity

    /// The etcd client in cluster mode (the store, leader election and node leases); nil on one machine.
    let etcd: EtcdStore?
    let store: any MetadataStore
    /// One machine's volume files (the agent confines loop devices to their directory).
    let localFiles: LocalFileBacking
    let backing: any VolumeBacking & NodeBacking
    /// Whether this process runs the volumes' engines (their FUSE connections are kept across a restart).
    let runsEngines: Bool
    /// `--role node --agent-socket none`: this process is the node's agent too (privileged, in
    /// the host's namespaces, running the engines).
    let inProcessAgent: Bool
    /// `--role node --agent-socket PATH`: the CSI node of a split node. The agent owns the
    /// replica server, the engines and (in cluster mode) the node's registration.
    let splitNode: Bool
    /// The machine's own mounter: in-process for the agent and all roles (and a node that is
    /// its own agent). The node role otherwise reaches it through the agent.
    let linux: LinuxMounter?
    /// The replica server: this node's share of every replicated volume's data.
    let replicaServer: ReplicaServer?
    /// The ReplicaControl service beside the replica server (`--control-address`), if served.
    let control: ReplicaControlServing?
    let nodeRecord: NodeRecord
    /// Replicas the controller could not delete while this node was away (a lifecycle
    /// service, with the process that serves this node's replicas).
    let sweeper: ReplicaSweeper?
    /// `--metrics-address`: where the observability listener serves; nil: none.
    let metricsAddress: MetricsAddress?

    var role: Role { options.role }

    /// Opens the store and builds the backing, the mounter and the replica server (listening
    /// before the node registers, so the bound port is recorded).
    static func make(_ options: Serve, logger: Logger, endpoint: String, nodeID: String, topology: [String: String],
                     roots: [String], agentEndpoint: String?, metricsAddress: MetricsAddress?) async throws -> ServeContext {
        let role = options.role
        let dataDir = options.dataDir
        try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        let endpoints = options.etcdEndpoints.flatMap { $0.split(separator: ",").map(String.init) }
        let etcd: EtcdStore?
        let store: any MetadataStore
        switch options.store {
        case .sqlite:
            if !endpoints.isEmpty { throw ValidationError("--etcd-endpoints needs --store etcd") }
            if options.etcdTLS.ca != nil { throw ValidationError("--etcd-ca needs --store etcd") }
            if options.dataAddress != nil { throw ValidationError("--data-address needs --store etcd: on one machine volumes are local files") }
            etcd = nil
            store = try SQLiteStore(path: dataDir + "/cairn.db", logger: logger)
        case .etcd:
            guard !endpoints.isEmpty else { throw ValidationError("--store etcd needs --etcd-endpoints URL[,URL...]") }
            guard (1...5).contains(options.defaultReplicas) else { throw ValidationError("--default-replicas must be 1 to 5") }
            let client = try EtcdStore(endpoints: endpoints, tls: try options.etcdTLS.identity(), logger: logger)
            etcd = client
            store = client
        }
        if options.listScope == .node && (etcd == nil || !(role == .all || role == .controller)) {
            throw ValidationError("--list-scope node is for the controller and all roles with --store etcd (on one machine every volume is the node's already)")
        }
        if etcd != nil && role == .all {
            logger.warning("--role all with --store etcd serves a controller in this process at once, outside the leader lease (each of its changes is one etcd transaction); re-replication runs only while this process holds the lease. In a cluster without a CO that needs a controller per node, run one `--role controller` (standbys wait for the lease) and on every node `--role agent` plus `--role node --agent-socket PATH`")
        }
        // Every cluster process that speaks the data protocol (a split CSI node does not).
        let speaksDataProtocol = etcd != nil && !(role == .node && options.agentSocket != "none")
        let security: DataPlaneSecurity = speaksDataProtocol
            ? try options.dataSecurityOptions.resolve(dataDir: dataDir, logger: logger) : .insecure
        if let identity = security.identity {
            try Self.checkIdentity(identity, role: role, nodeID: nodeID, logger: logger)
        }
        let localFiles = try LocalFileBacking(dataDir: dataDir)
        // Engines run in the agent, all, and node-with-in-process-agent roles: their FUSE
        // connections are kept across a restart of this process (docs/design.md).
        // One machine (`--role all`, SQLite) runs engines for its encrypted volumes.
        let runsEngines = role == .all || (etcd != nil && (role == .agent || (role == .node && options.agentSocket == "none")))
        let keeper = runsEngines ? FUSEKeeperClient(socketPath: options.fuseKeeperSocket ?? dataDir + "/fuse-keeper.sock",
                                                    mode: options.fuseKeeper, logger: logger) : nil
        let restarts = runsEngines ? Serve.reportRestartSupport(keeper: keeper!, logger: logger) : nil
        // One machine: plain volumes on their files, encrypted ones through an engine over theirs.
        let backing: any VolumeBacking & NodeBacking = etcd == nil
            ? try LocalEngineBacking(files: localFiles, dataDir: dataDir, nodeID: nodeID, keeper: keeper, logger: logger)
            : try ReplicatedBacking(dataDir: dataDir, nodeID: nodeID, store: store,
                                    recovery: .init(rebuildBytesPerSecond: UInt64(options.rebuildRate * 1e6),
                                                    scrubBytesPerSecond: UInt64(options.scrubRate * 1e6),
                                                    retrySeconds: options.resyncRetry),
                                    keeper: keeper, security: security, logger: logger)
        if runsEngines, let hosting = backing as? any EngineHosting {
            do { try hosting.engineHost.lockEnginesDirectory() } catch let error as CairnError {
                throw ValidationError(error.message)
            }
        }
        let inProcessAgent = role == .node && options.agentSocket == "none"
        let splitNode = role == .node && !inProcessAgent
        let linux: LinuxMounter? = role == .agent || role == .all || inProcessAgent ? LinuxMounter(logger: logger) : nil

        var replicaServer: ReplicaServer?
        var dataAddressRecorded: String?
        if let dataAddress = options.dataAddress {
            guard etcd != nil, role != .controller else {
                throw ValidationError("--data-address is for the all, agent and node roles with --store etcd")
            }
            if splitNode {
                throw ValidationError("--data-address is served by the agent when the node role has an --agent-socket: pass it to `cairn serve --role agent` (or run the node with --agent-socket none)")
            }
            let address: ReplicaAddress
            do { address = try ReplicaAddress(dataAddress) } catch {
                throw ValidationError("--data-address \(dataAddress) is not HOST:PORT (\(error))")
            }
            let server = try ReplicaServer(dataDir: dataDir, host: address.host, port: address.port, logger: logger,
                                           security: security)
            if let identity = security.identity {
                let membership = PeerMembership(store: store, trustDomain: identity.trustDomain)
                server.authorizePeer = { membership.refusal(of: $0) }
            }
            // Listening before the node registers (the bound port is recorded); the
            // ReplicaServing service stops it on shutdown.
            try server.start()
            replicaServer = server
            (backing as? ReplicatedBacking)?.serveLocalReplicas(from: server)
            dataAddressRecorded = "\(address.host):\(server.boundPort)"
            logger.info("serving replicas", metadata: ["data.address": "\(dataAddressRecorded!)"])
        } else if etcd != nil && role != .controller && !splitNode {
            logger.warning("no --data-address: this node holds no replicas (it can still run volumes' engines)")
        }
        let nodeCapacity = try options.capacity.map(Serve.parseBytes) ?? Serve.filesystemBytes(dataDir)
        let control = try ReplicaControlServing(flag: options.controlAddress, replicaServer: replicaServer,
                                                identity: security.identity, nodeID: nodeID, logger: logger)
        var nodeRecord = NodeRecord(id: nodeID, topology: topology, maxVolumes: options.maxVolumes,
                                    dataAddress: dataAddressRecorded, capacityBytes: nodeCapacity,
                                    controlAddress: control?.address)
        nodeRecord.engineRestarts = restarts
        var sweeper: ReplicaSweeper?
        if etcd != nil, let dataAddressRecorded {
            sweeper = ReplicaSweeper(nodeID: nodeID, store: store, dataDir: dataDir,
                                     address: dataAddressRecorded, controlAddress: control?.address, security: security,
                                     logger: logger)
        }
        return ServeContext(options: options, logger: logger, endpoint: endpoint, nodeID: nodeID, topology: topology,
                            roots: roots, agentEndpoint: agentEndpoint, security: security, etcd: etcd, store: store, localFiles: localFiles,
                            backing: backing, runsEngines: runsEngines, inProcessAgent: inProcessAgent,
                            splitNode: splitNode, linux: linux, replicaServer: replicaServer, control: control, nodeRecord: nodeRecord,
                            sweeper: sweeper, metricsAddress: metricsAddress)
    }

    /// Refuses to start with a certificate that is not this process's: a node's must name this
    /// node id, a controller's a controller; warns when it expires within 30 days.
    static func checkIdentity(_ identity: TLSIdentity, role: Role, nodeID: String, logger: Logger) throws {
        let context = identity.current
        let me = context.identity
        let td = identity.trustDomain
        if role != .controller, me.node(in: td) != nodeID {
            throw ValidationError("the certificate \(identity.files.certificate) names \(me), not this node (spiffe://\(td)/node/\(nodeID)); issue this node's with `cairn cert issue \(nodeID) --ca-dir CA_DIR --out DIR`")
        }
        if role == .controller || role == .all, !me.isController(in: td) {
            throw ValidationError("the certificate \(identity.files.certificate) names \(me), not a controller; issue one with `cairn cert issue NAME --role \(role == .all ? "node,controller" : "controller") --ca-dir CA_DIR --out DIR`")
        }
        let left = context.info.notAfter.timeIntervalSinceNow
        guard left > 0 else {
            throw ValidationError("the certificate \(identity.files.certificate) expired at \(context.info.notAfter); issue a new one with `cairn cert issue`")
        }
        if left < 30 * 86400 {
            logger.warning("this process's certificate expires soon; issue a new one into the same directory (it is picked up without a restart)",
                           metadata: ["tls.certificate": "\(identity.files.certificate)", "tls.not_after": "\(context.info.notAfter)"])
        }
        logger.info("replica traffic is authenticated", metadata: [
            "data.security": "\(identity.files.certificate)", "tls.identity": "\(me)", "tls.not_after": "\(context.info.notAfter)",
        ])
    }

    /// Warns about each system tool the machine's mounter needs and cannot find.
    func warnAboutMissingTools() {
        guard linux != nil else { return }
        for tool in Command.missing(LinuxMounter.tools) {
            logger.warning("a tool the node needs is not installed; calls that need it will fail until it is (apt-get install util-linux e2fsprogs xfsprogs)",
                           metadata: ["tool": "\(tool)"])
        }
    }

    /// Identity on the CSI router, and the CSI server. The spec: plugin capabilities describe
    /// the plugin "as a whole", the same from every instance whichever RPCs it serves — so the
    /// node role advertises the controller service too (csi-sanity's node tests rely on it to
    /// ControllerPublish). A standby controller is not ready: a CO's sidecars wait on it
    /// (ProbeForever).
    func csiServer(_ router: Router, leadership: ControllerLeadership?) -> ServedEndpoint {
        let gate = leadership?.gatesCSI == true ? leadership : nil
        Routes.identity(IdentityService(controllerService: true, groupControllerService: true,
                                        ready: { gate?.isLeading ?? true }), on: router)
        return ServedEndpoint(name: "csi", endpoint: endpoint, socketMode: 0o660,
                              server: GRPCServer(router: router, logger: logger), optional: false)
    }

    /// Runs `servers` and the background services in one ServiceGroup until SIGTERM/SIGINT.
    /// `httpRoutes`: what the role adds to the `--metrics-address` listener (the status page).
    func serve(_ roleServers: [ServedEndpoint], leadership: ControllerLeadership?, background: [any Service] = [],
               httpRoutes: [RouteInstaller] = []) async throws {
        // The ReplicaControl service goes with the replica server, whichever role serves it.
        let servers = roleServers + (control.map { [$0.served] } ?? [])
        logger.info("cairn starting", metadata: [
            "role": "\(role)", "endpoints": "\(servers.map { "\($0.name)=\($0.endpoint)" }.joined(separator: ","))",
            "data_dir": "\(options.dataDir)", "version": "\(CairnVersion.version)",
            "path_roots": "\(roots.joined(separator: ","))",
        ].merging(role == .node ? ["agent.endpoint": "\(agentEndpoint ?? "")"] : [:]) { a, _ in a })
        KernelFeatures.probe().log(to: logger, servesVolumes: role == .node || role == .all || role == .agent,
                                   runsEngines: runsEngines)
        // Started in this order, shut down in the reverse one (Services.swift): calls first,
        // then leader and background work, the replica server, and the store's leases last.
        var services: [any Service] = []
        // First up, last down: metrics are readable for the whole start-up and shutdown.
        if let metricsAddress {
            services.append(ObservabilityServer(address: metricsAddress, logger: logger, registry: ProcessMetrics.registry,
                                                routes: httpRoutes))
        }
        if let etcd { services.append(UntilShutdown.storeLeases(etcd, logger: logger)) }
        // (Started after the replica server, so stopped before it: engines use this node's
        // replicas in process.)
        if let replicaServer { services.append(UntilShutdown.replicaServer(replicaServer, logger: logger)) }
        if runsEngines { services.append(UntilShutdown.enginesKept((backing as? any EngineHosting)?.engineHost, logger: logger)) }
        if let sweeper { services.append(BackgroundLoop.sweeper(sweeper, logger: logger)) }
        if let leadership { services.append(BackgroundLoop.leadership(leadership, logger: logger)) }
        // The cluster's state as gauges, from the store: every controller exports them.
        if metricsAddress != nil && (role == .controller || role == .all) {
            services.append(ClusterGauges(store: store, logger: logger))
        }
        if let trim = BackgroundLoop.idleHeapTrim(logger: logger) { services.append(trim) }
        services += background
        services.append(RPCServers(servers: servers, grace: .seconds(options.shutdownGrace), logger: logger))
        let group = ServiceGroup(configuration: .init(
            services: services.map { .init(service: $0) },
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await group.run()
    }
}
