import ArgumentParser
import CairnController
import CairnCore
import CairnNode
import CairnRPC
import CairnStore
import Foundation
import Logging
import ServiceLifecycle

@main
struct Cairn: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cairn",
        abstract: "Cairn: replicated block volumes for stateful services, over CSI.",
        version: CairnVersion.version,
        subcommands: [Serve.self]
    )
}

enum Role: String, ExpressibleByArgument, CaseIterable {
    case all, controller, node
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve CSI on an endpoint.",
        discussion: "Example: cairn serve --role all --endpoint unix:///run/cairn/csi.sock --data-dir /var/lib/cairn --node-id $(hostname)")

    @Option(help: "Which services to run: all (Identity+Controller+Node, one machine), controller, or node.")
    var role: Role = .all

    @Option(help: "Where to serve CSI: unix:///path or tcp://host:port. Default: $CSI_ENDPOINT, else unix:///run/cairn/csi.sock.")
    var endpoint: String?

    @Option(help: "Directory for the metadata store and volume data.")
    var dataDir: String = "/var/lib/cairn"

    @Option(help: "This node's id (letters, digits, '.', '_', '-'). Default: $MESOS_AGENT_ID, else the host name.")
    var nodeID: String?

    @Option(name: .customLong("path-root"), help: "A directory under which staging and target paths may lie (repeatable).")
    var pathRoots: [String] = ["/var/lib/kubelet", "/var/lib/mesos", "/var/lib/cairn/mounts"]

    @Option(name: .customLong("topology"), help: "A topology label key=value for this node (repeatable), e.g. topology.cairn.dev/zone=a.")
    var topologyLabels: [String] = []

    @Option(help: "Most volumes this node may have published (NodeGetInfo max_volumes_per_node); 0 = no limit.")
    var maxVolumes: Int64 = 0

    @Option(help: "Bytes the pool may provision (suffixes Ki, Mi, Gi, Ti). Default: the size of the data directory's filesystem.")
    var capacity: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Option(help: "Seconds to let in-flight calls finish on SIGTERM.")
    var shutdownGrace: Int = 10

    func run() async throws {
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw ValidationError("--log-level \(logLevel) is not one of trace, debug, info, notice, warning, error, critical")
        }
        LoggingSystem.bootstrap { LogfmtHandler(label: $0, level: level) }
        var logger = Logger(label: "cairn")
        logger.logLevel = level

        let env = ProcessInfo.processInfo.environment
        let endpoint = self.endpoint ?? env["CSI_ENDPOINT"] ?? "unix:///run/cairn/csi.sock"
        try Endpoint.validate(endpoint)
        let nodeID = self.nodeID ?? env["MESOS_AGENT_ID"] ?? ProcessInfo.processInfo.hostName
        try Validate.nodeID(nodeID, field: "--node-id")
        logger[metadataKey: "node.id"] = "\(nodeID)"

        var topology = [ControllerService.nodeTopologyKey: nodeID]
        for label in topologyLabels {
            let parts = label.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty else { throw ValidationError("--topology \(label) is not key=value") }
            topology[parts[0]] = parts[1]
        }
        let roots = pathRoots.map { $0.hasSuffix("/") && $0.count > 1 ? String($0.dropLast()) : $0 }
        for root in roots where !root.hasPrefix("/") { throw ValidationError("--path-root \(root) must be absolute") }

        try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        let store = try SQLiteStore(path: dataDir + "/cairn.db", logger: logger)
        let backing = try LocalFileBacking(dataDir: dataDir)
        let router = Router()
        Routes.identity(IdentityService(controllerService: role != .node), on: router)

        if role == .all || role == .node {
            for tool in ["losetup", "mount", "umount", "blkid", "mkfs.ext4", "fsck.ext4", "mkfs.xfs"] {
                _ = try? Command.runBlocking(["which", tool]).status
            }
            try await store.registerNode(NodeRecord(id: nodeID, topology: topology, maxVolumes: maxVolumes))
            let node = NodeService(nodeID: nodeID, topology: topology, maxVolumesPerNode: maxVolumes, store: store,
                                   backing: backing, mounter: LinuxMounter(logger: logger), pathRoots: roots,
                                   locks: VolumeLocks(), logger: logger)
            await node.reconcile()
            Routes.node(node, on: router)
        }
        if role == .all || role == .controller {
            let pool = try capacity.map(Self.parseBytes) ?? Self.filesystemBytes(dataDir)
            let controller = ControllerService(store: store, backing: backing, capacity: CapacityPolicy(poolBytes: pool),
                                               localNodeID: nodeID, localTopology: topology, locks: VolumeLocks(),
                                               logger: logger)
            Routes.controller(controller, on: router)
        }

        let server = CSIServer(server: GRPCServer(router: router, logger: logger), endpoint: endpoint,
                               grace: .seconds(shutdownGrace), logger: logger)
        logger.info("cairn starting", metadata: [
            "role": "\(role)", "endpoint": "\(endpoint)", "data_dir": "\(dataDir)", "version": "\(CairnVersion.version)",
            "path_roots": "\(roots.joined(separator: ","))",
        ])
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: server)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await group.run()
    }

    static func parseBytes(_ text: String) throws -> Int64 {
        let units: [(String, Int64)] = [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40)]
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            if let n = Int64(text.dropLast(2)), n > 0 { return n * factor }
        }
        if let n = Int64(text), n > 0 { return n }
        throw ValidationError("--capacity \(text) is not a size like 500Gi or 1073741824")
    }

    static func filesystemBytes(_ path: String) throws -> Int64 {
        var st = statvfs()
        guard statvfs(path, &st) == 0 else { throw SystemError("statvfs \(path)", errno: errno) }
        return Int64(st.f_blocks) * Int64(st.f_frsize)
    }
}

/// The CSI gRPC server as a lifecycle service: serves until SIGTERM/SIGINT, then drains.
struct CSIServer: Service {
    let server: GRPCServer
    let endpoint: String
    let grace: Duration
    let logger: Logger

    func run() async throws {
        try server.start(endpoints: [endpoint])
        try? await gracefulShutdown()
        logger.info("shutting down: draining in-flight calls", metadata: ["grace_s": "\(grace.components.seconds)"])
        await server.shutdown(grace: grace)
    }
}
