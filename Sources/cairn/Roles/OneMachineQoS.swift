import CairnCore
import CairnNode
import Foundation

// One machine's QoS (docs/engine.md, "QoS on one machine"): a volume's limits are rules for its
// loop device in the workloads' cgroup — cgroup v2 io.max, or cgroup v1 blkio throttle files in
// that cgroup and every one below it. Only `--role all` enforces them — the controller that
// records new limits must reach the devices, and there it is the same process — and only where
// start-up finds the io controller (v2 io or v1 blkio with throttling) and that cgroup.

extension ServeContext {
    /// `--qos-cgroup`, else $CAIRN_QOS_CGROUP (nil: auto).
    var qosCgroupSetting: String? {
        options.qosCgroup ?? ProcessInfo.processInfo.environment["CAIRN_QOS_CGROUP"]
    }

    /// `--role all` on one machine: the throttle when limits can be enforced here, else nil —
    /// with one log line that says which mechanism, or why ControllerModifyVolume is not offered.
    func oneMachineThrottle() -> (any CgroupThrottle)? {
        guard etcd == nil else {
            if let setting = qosCgroupSetting, setting != "auto", setting != "none" {
                logger.warning("--qos-cgroup is ignored with --store etcd: the replicated volumes' engine enforces their QoS limits",
                               metadata: ["qos.cgroup": "\(setting)"])
            }
            return nil
        }
        let mounts = (try? MountTable.read()) ?? []
        switch QoSCgroup.locate(qosCgroupSetting, mounts: mounts) {
        case .available(let throttle):
            let how = throttle.needsReconciling
                ? " in the cgroup and every cgroup below it (v1 limits are per cgroup; cgroups created later get them within \(Int(Self.qosReconcileInterval.components.seconds)) s)"
                : " (hierarchical: every process below the cgroup, together)"
            logger.info("QoS limits of volumes are enforced with \(throttle.mechanism) on their loop devices\(how); ControllerModifyVolume is offered",
                        metadata: ["qos.cgroup": "\(throttle.cgroup)", "qos.mechanism": "\(throttle.mechanism)"])
            return throttle
        case .unavailable(let reason):
            if qosCgroupSetting == "none" {
                logger.info("ControllerModifyVolume is not offered: \(reason)")
            } else {
                logger.warning("ControllerModifyVolume is not offered: \(reason)")
            }
            return nil
        }
    }

    /// How often cgroup v1 limits are copied into cgroups created below the QoS cgroup.
    static let qosReconcileInterval = Duration.seconds(2)

    /// cgroup v1: the loop that gives cgroups created after a limit was set their copy of it
    /// (v1 throttling is per cgroup); nil for a throttle that needs none.
    func qosReconciler(_ throttle: (any IOThrottle)?) -> BackgroundLoop? {
        guard let throttle, throttle.needsReconciling else { return nil }
        let logger = logger
        return BackgroundLoop(name: "qos-cgroup-reconciler", logger: logger) {
            var lastError = ""
            while !Task.isCancelled {
                do {
                    let written = try throttle.reconcile()
                    if written > 0 { logger.debug("copied QoS limits into new cgroups", metadata: ["rules": "\(written)", "cgroup": "\(throttle.location)"]) }
                    lastError = ""
                } catch {
                    // Said once per distinct failure, not every 2 s.
                    if "\(error)" != lastError {
                        logger.warning("cannot copy QoS limits into new cgroups; retrying", metadata: ["error": "\(error)", "cgroup": "\(throttle.location)"])
                        lastError = "\(error)"
                    }
                }
                try? await Task.sleep(for: Self.qosReconcileInterval)
            }
        }
    }

    /// The controller and node roles on one machine: why limits are not enforced.
    func reportNoOneMachineQoS(reason: String) {
        guard etcd == nil else { return }
        logger.info("ControllerModifyVolume is not offered: \(reason); one machine enforces QoS limits only in --role all")
    }
}
