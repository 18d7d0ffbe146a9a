import CairnBackup
import CairnCluster
import CairnController
import CairnCore
import CairnRoutes
import CairnRPC
import CairnStatus

/// `--role controller`: Identity + Controller (+ GroupController) on the CSI endpoint; with
/// etcd, Controller calls and re-replication only while this process holds the leader lease.
enum ControllerRole {
    static func run(_ context: ServeContext) async throws {
        context.warnAboutMissingTools()
        let router = Router()
        context.reportNoOneMachineQoS(reason: "the controller runs apart from the node that stages volumes (--role controller)")
        let (leadership, status) = try context.csiController(on: router)
        let csi = context.csiServer(router, leadership: leadership)
        try await context.serve([csi], leadership: leadership, httpRoutes: [status])
    }
}

extension ServeContext {
    /// The CSI Controller and GroupController services on `router`; in cluster mode also the
    /// leadership that runs re-replication (and, for `--role controller`, gates the calls). And
    /// the status page (docs/status-page.md) for the `--metrics-address` listener.
    func csiController(on router: Router, localLimits: (any LocalLimitEnforcement)? = nil) throws
        -> (leadership: ControllerLeadership?, status: StatusRoutes.Installer) {
        let pool = try options.capacity.map(Serve.parseBytes) ?? Serve.filesystemBytes(options.dataDir)
        let controller = ControllerService(store: store, backing: backing, capacity: CapacityPolicy(poolBytes: pool),
                                           localNodeID: nodeID, localTopology: topology, locks: VolumeLocks(),
                                           logger: logger,
                                           cluster: etcd == nil ? nil : ClusterConfig(defaultReplicas: options.defaultReplicas,
                                                                                      scopedToNode: options.listScope == .node,
                                                                                      claimSigner: security.identity),
                                           localLimits: localLimits,
                                           backups: try options.backupTargets.map { [localFiles, backing, logger] path -> any BackupSource in
                                               let targets = try BackupTargets.load(path)
                                               if let replicated = backing as? ReplicatedBacking {
                                                   return ClusterBackupSource(targets: targets, backing: replicated, logger: logger)
                                               }
                                               return LocalBackupSource(targets: targets, volumeFile: { try localFiles.file(volumeID: $0) },
                                                                        logger: logger)
                                           })
        Routes.controller(controller, on: router)
        Routes.groupController(controller, on: router)
        let reader = ClusterStatusReader(store: store, localNodeID: etcd == nil ? nodeID : nil,
                                         describe: { controller.condition($0).message })
        let status = StatusRoutes.installer(reader, logger: logger)
        guard let etcd else { return (nil, status) }
        // Re-replication acts on every volume: one process at a time, the lease holder.
        // A --role controller serves Controller calls only while it holds the lease too
        // (standbys answer UNAVAILABLE, Probe not ready); --role all serves them at once
        // (each change is one etcd transaction) and only re-replicates as leader.
        let repairer = ReplicaRepairer(controller: controller, timeout: .milliseconds(Int64(options.replicaTimeout * 1000)),
                                       logger: logger)
        let lease = ControllerLeadership(election: etcd, leaderID: nodeID, ttl: options.leaderLeaseTTL,
                                         gatesCSI: role == .controller, logger: logger) {
            await repairer.run()
        }
        if lease.gatesCSI {
            router.precede(methodsWithPrefixes: ["/csi.v1.Controller/", "/csi.v1.GroupController/"],
                           except: ["/csi.v1.Controller/ControllerGetCapabilities",
                                    "/csi.v1.GroupController/GroupControllerGetCapabilities"]) {
                try lease.requireLeading()
            }
        }
        return (lease, status)
    }
}
