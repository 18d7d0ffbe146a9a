import ArgumentParser
import CairnAgent
import CairnCluster
import CairnController
import CairnCore
import CairnEngine
import CairnNode
import CairnObservability
import CairnReplica
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
        subcommands: [Serve.self, VolumeCommand.self, NodeCommand.self, ReplicaCommand.self, SnapshotCommand.self, BackupCommand.self, DoctorCommand.self,
                      FUSEKeeperCommand.self, CACommand.self, CertCommand.self]
    )
}

enum Role: String, ExpressibleByArgument, CaseIterable {
    case all, controller, node, agent
}

extension FUSEKeeperMode: ExpressibleByArgument {}

enum StoreKind: String, ExpressibleByArgument, CaseIterable {
    case sqlite, etcd
}

enum ListScope: String, ExpressibleByArgument, CaseIterable {
    case cluster, node
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve CSI on an endpoint, or the agent on its socket.",
        discussion: """
            Examples:
              cairn serve --role all --endpoint unix:///run/cairn/csi.sock --data-dir /var/lib/cairn --node-id $(hostname)
              cairn serve --role agent --agent-socket /run/cairn/agent.sock --data-dir /var/lib/cairn --node-id $(hostname)
              cairn serve --role node --agent-socket /run/cairn/agent.sock --endpoint unix:///csi/csi.sock --data-dir /var/lib/cairn
            """)

    @Option(help: "Which services to run: all (Identity+Controller+Node and the agent, one machine), controller, node (CSI Node; the agent does the privileged work), or agent (the privileged per-machine daemon, in the host's namespaces).")
    var role: Role = .all

    @Option(help: "The agent's unix socket (path or unix:///path). agent: where to serve it (mode 0600); node: where to reach the agent; all: where to serve it for `cairn volume attach|detach`, or `none`. Default: \(AgentProtocol.defaultSocket).")
    var agentSocket: String?

    @Option(name: .customLong("target-namespace-pid"), help: "Publish targets into the mount namespace of this process (e.g. the kubelet's or Mesos agent's container) when a request names none (node and all roles). Default: the agent's (host) namespace.")
    var targetNamespacePID: Int32?

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

    @Option(help: "Where cluster state lives: sqlite (embedded, one machine: every volume is a local file) or etcd (a cluster: volumes are replicated across the nodes).")
    var store: StoreKind = .sqlite

    @Option(name: .customLong("etcd-endpoints"), help: "etcd client URLs, comma-separated or repeated (with --store etcd), e.g. http://10.0.0.1:2379.")
    var etcdEndpoints: [String] = []

    @OptionGroup var etcdTLS: EtcdTLSOptions

    @Option(name: .customLong("data-address"), help: "HOST:PORT where this node's replica server listens for the data protocol (--store etcd; all, agent and node roles). Other nodes' engines reach this node's replicas there.")
    var dataAddress: String?

    @Option(name: .customLong("control-address"), help: "HOST:PORT of this node's ReplicaControl gRPC service (replica create, delete, snapshots, clone, grow), served beside the replica server; default: the --data-address host and its port + 1; `none`: not served (the controller then uses the data protocol's ops).")
    var controlAddress: String?

    @Option(name: .customLong("default-replicas"), help: "Replicas of a volume whose CreateVolume does not name `replicas` (--store etcd).")
    var defaultReplicas: Int = 3

    @Option(name: .customLong("rebuild-rate"), help: "Resync and rebuild bandwidth of this node in MB/s (10^6 bytes), shared by all its volumes; 0 = unlimited (--store etcd).")
    var rebuildRate: Double = 200

    @Option(name: .customLong("list-scope"), help: "What ListVolumes and GetCapacity answer for (--store etcd; controller and all roles): cluster (every volume, the cluster's capacity) or node (only the volumes created through this process, placed with a replica on this node first, and the capacity of one more such volume): for one controller per node, as Mesos's per-agent storage resource provider runs it.")
    var listScope: ListScope = .cluster

    @Option(name: .customLong("replica-timeout"), help: "Seconds a replica's node may stay away (out of sync, not live) before the controller re-creates that replica on another node (--store etcd, controller). `cairn node remove` triggers it at once.")
    var replicaTimeout: Double = 600

    @Option(name: .customLong("leader-lease-ttl"), help: "Seconds the controller's leader lease outlives its holder's last renewal (--store etcd; controller and all roles): a standby takes over within about this long after the leader dies; a leader that cannot renew it for this long stops acting and campaigns again.")
    var leaderLeaseTTL: Int = 10

    @Option(name: .customLong("resync-retry"), help: "Seconds before an engine tries again to resync an out-of-sync replica it could not reach (doubling after each failure, up to 8×) (--store etcd).")
    var resyncRetry: Double = 5

    @Option(name: .customLong("scrub-rate"), help: "MB/s at which the engine of a staged volume verifies every replica's checksums in the background, repairing bad blocks from another replica; an eighth of it while the volume serves I/O; 0 = no scrub (--store etcd).")
    var scrubRate: Double = 8

    @Option(name: .customLong("metrics-address"), help: "HOST:PORT where this process serves its metrics (GET /metrics, Prometheus text format) and GET /healthz — and, on the controller and all roles, the status page; every role; port 0 picks a free one (logged). Default: none (no listener, no metrics recorded). docs/metrics.md lists the metrics.")
    var metricsAddress: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Option(help: "Seconds to let in-flight calls finish on SIGTERM.")
    var shutdownGrace: Int = 10

    @Option(name: .customLong("fuse-keeper"), help: "Where the volumes' FUSE connections are kept while the process running their engines restarts (--store etcd; all, agent and node roles): spawn (start `cairn fuse-keeper` in its own session when none answers), external (one runs beside this process, e.g. its own DaemonSet or systemd unit; never start one), off (a restart fails the I/O in flight).")
    var fuseKeeper: FUSEKeeperMode = .spawn

    @Option(name: .customLong("fuse-keeper-socket"), help: "The FUSE keeper's unix socket. Default: <data-dir>/fuse-keeper.sock.")
    var fuseKeeperSocket: String?

    @Option(name: .customLong("qos-cgroup"), help: "One machine (--role all): the cgroup under which the workloads run, where a volume's iopsLimit/bandwidthLimit become kernel throttle rules for its loop device — cgroup v2 io.max when the unified hierarchy has the io controller, else the cgroup v1 blkio.throttle.* files (written in that cgroup and every cgroup below it: v1 limits are per cgroup). An absolute path under the v2 mount or the v1 blkio mount picks that hierarchy (the v1 root, /sys/fs/cgroup/blkio itself, means every cgroup of the machine); a relative one is resolved in the hierarchy that has the io controller; `auto` looks for kubepods.slice, kubepods, mesos there; `none` turns it off. ControllerModifyVolume is offered on one machine only when this works (the log at start-up says which mechanism, or why not). Default: $CAIRN_QOS_CGROUP, else auto.")
    var qosCgroup: String?

    @OptionGroup var dataSecurityOptions: DataSecurityOptions

    @Option(name: .customLong("backup-targets"), help: "A backup targets file (docs/backups.md): CreateVolume from the snapshot id backup:<target>/<backup-id> restores that backup (one machine). Default: none.")
    var backupTargets: String?

    /// Validates the flags, then hands over to the role's builder (Roles/: what each role runs,
    /// in which order it starts).
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

        guard leaderLeaseTTL >= 1 else { throw ValidationError("--leader-lease-ttl must be at least 1 second") }
        guard replicaTimeout >= 0 else { throw ValidationError("--replica-timeout must be 0 or more seconds") }
        guard resyncRetry > 0 else { throw ValidationError("--resync-retry must be more than 0 seconds") }
        guard rebuildRate >= 0, scrubRate >= 0 else { throw ValidationError("--rebuild-rate and --scrub-rate must be 0 (off/unlimited) or more MB/s") }
        if let pid = targetNamespacePID, pid <= 0 { throw ValidationError("--target-namespace-pid \(pid) is not a process id") }
        if targetNamespacePID != nil && !(role == .node || role == .all) {
            throw ValidationError("--target-namespace-pid is for the node and all roles")
        }
        let agentEndpoint = try agentEndpoint()
        let metrics = try metricsAddress.map(Serve.parseMetricsAddress)
        // Before any role builds an instrument: those made earlier record into swift-metrics' no-op.
        if metrics != nil { _ = ProcessMetrics.registry }

        let context = try await ServeContext.make(self, logger: logger, endpoint: endpoint, nodeID: nodeID, topology: topology,
                                                  roots: roots, agentEndpoint: agentEndpoint, metricsAddress: metrics)
        switch role {
        case .controller: try await ControllerRole.run(context)
        case .node: try await NodeRole.run(context)
        case .agent: try await AgentRole.run(context)
        case .all: try await AllRole.run(context)
        }
    }

    /// Says at start-up what a restart of this process costs the staged volumes' I/O.
    /// Says at start-up what a restart of this process costs the staged volumes' I/O; returns
    /// the same as one line for the node record (`cairn node list`).
    @discardableResult
    static func reportRestartSupport(keeper: FUSEKeeperClient, logger: Logger) -> String {
        let release = FUSEResume.kernelRelease()
        if keeper.mode == .off {
            logger.warning("--fuse-keeper off: a restart or upgrade of this process fails the I/O in flight on every staged volume and their loop devices must be staged again")
            return "fail the I/O in flight (--fuse-keeper off; kernel \(release))"
        } else if !FUSEResume.kernelSupportsResend(release: release) {
            logger.warning("this kernel cannot resend FUSE requests in flight (FUSE_NOTIFY_RESEND needs Linux 6.9): after a restart of this process the kept connections are aborted instead of resumed, and staged volumes are staged anew (I/O errors for their users). Upgrade the kernel for restarts without I/O errors",
                           metadata: ["kernel": "\(release)"])
            return "fail the I/O in flight (kernel \(release) cannot resend FUSE requests: needs 6.9)"
        } else {
            logger.info("restarts of this process keep the staged volumes' I/O: the FUSE keeper holds their connections and the kernel resends requests in flight",
                        metadata: ["kernel": "\(release)", "keeper.mode": "\(keeper.mode.rawValue)", "keeper.socket": "\(keeper.socketPath)"])
            return "keep the I/O (FUSE keeper \(keeper.mode.rawValue), kernel \(release) resends requests in flight)"
        }
    }

    /// Before the engine-running process serves: takes back the FUSE connections the keeper kept
    /// for a killed predecessor's engines, cleans up the mounts nobody kept (nothing may serve on
    /// top of them), runs `restore` (NodeStage again for each staged volume: its engine resumes
    /// a kept connection), then lets go of kept connections no staged volume claimed.
    static func recoverEngines(_ backing: any VolumeBacking, linux: LinuxMounter?, restore: () async -> Void) async {
        guard let hosting = backing as? any EngineHosting, let linux else { return await restore() }
        await hosting.engineHost.recoverEngines(inUse: { file in
            (try? await linux.loopDevices(backing: file))?.isEmpty == false
        }, restore: restore)
    }

    /// The agent socket's endpoint this role serves or reaches; nil when it has none.
    func agentEndpoint() throws -> String? {
        switch role {
        case .controller:
            if agentSocket != nil { throw ValidationError("--agent-socket is for the agent, node and all roles") }
            return nil
        case .all where agentSocket == "none", .node where agentSocket == "none":
            return nil
        case .all, .agent, .node:
            let endpoint: String
            do {
                endpoint = try AgentProtocol.endpoint(forSocket: agentSocket ?? AgentProtocol.defaultSocket)
            } catch let error as CairnError {
                throw ValidationError(error.message)
            }
            guard let path = Endpoint.unixPath(endpoint), path.hasPrefix("/") else {
                throw ValidationError("--agent-socket \(agentSocket ?? "") must be a unix socket path: the agent is reachable by root on this machine only")
            }
            return endpoint
        }
    }

    /// Whether a server answers on the unix socket at `path` (a live agent, not a stale file).
    static func socketIsServed(_ path: String) -> Bool {
        guard let fd = UnixSocket.connect(path, type: Int32(SOCK_STREAM.rawValue)) else { return false }
        close(fd)
        return true
    }

    /// `--metrics-address` (also `cairn replica serve`'s) as a listener address, or a ValidationError.
    static func parseMetricsAddress(_ text: String) throws -> MetricsAddress {
        do { return try MetricsAddress(parsing: text) } catch let error as CairnError {
            throw ValidationError(error.message)
        }
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

/// One gRPC server and where it listens.
struct ServedEndpoint: Sendable {
    let name: String
    let endpoint: String
    let socketMode: mode_t
    let server: GRPCServer
    /// A server whose failure to start is logged and does not stop the process.
    let optional: Bool
}

/// The process's gRPC servers (CSI, agent) as one lifecycle service: started one after the
/// other (socket modes are applied through the process-wide umask), served until
/// SIGTERM/SIGINT, then drained together.
struct RPCServers: Service {
    let servers: [ServedEndpoint]
    let grace: Duration
    let logger: Logger

    func run() async throws {
        try await logged("rpc-servers", logger) { try await serve() }
    }

    private func serve() async throws {
        var started: [ServedEndpoint] = []
        do {
            for served in servers {
                do {
                    try served.server.start(endpoints: [served.endpoint], socketMode: served.socketMode)
                } catch where served.optional {
                    logger.warning("not serving \(served.name) on \(served.endpoint); pass --agent-socket PATH (or none)",
                                   metadata: ["error": "\(error)"])
                    continue
                }
                started.append(served)
            }
        } catch {
            for served in started { await served.server.shutdown(grace: .zero) }
            throw error
        }
        try? await gracefulShutdown()
        logger.info("shutting down: draining in-flight calls", metadata: ["grace_s": "\(grace.components.seconds)"])
        await withTaskGroup(of: Void.self) { group in
            for served in started {
                group.addTask { await served.server.shutdown(grace: grace) }
            }
        }
    }
}

/// `cairn fuse-keeper`: holds the FUSE connections of one data directory's engines while the
/// process running them restarts (docs/design.md "Engines survive their process").
struct FUSEKeeperCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fuse-keeper",
        abstract: "Hold staged volumes' FUSE connections across restarts of the process running their engines.",
        discussion: "Started by `cairn serve` (--fuse-keeper spawn) or as its own unit (--fuse-keeper external). It never touches I/O; it only keeps /dev/fuse descriptors open. Stopping it while no engine runs fails the kept volumes' I/O.")

    @Option(help: "The unix socket to serve (the engine process's --fuse-keeper-socket).")
    var socket: String

    @Option(name: .customLong("pid-file"), help: "Write this process's pid here.")
    var pidFile: String?

    @Flag(name: .customLong("exit-when-idle"), help: "Exit once it holds no connection and no engine process is connected (how `cairn serve --fuse-keeper spawn` starts it); by default it stays, as a unit or DaemonSet of its own should.")
    var exitWhenIdle = false

    @Option(help: "Log level.")
    var logLevel: String = "info"

    func run() throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { LogfmtHandler(label: $0, level: level) }
        var logger = Logger(label: "cairn.fuse-keeper")
        logger.logLevel = level
        try FUSEKeeperServer.run(socketPath: socket, pidFile: pidFile, exitWhenIdle: exitWhenIdle, logger: logger)
    }
}
