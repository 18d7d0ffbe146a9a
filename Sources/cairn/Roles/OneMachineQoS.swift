import CairnCore
import CairnNode
import Foundation

// One machine's QoS (docs/engine.md, "QoS on one machine"): a volume's limits are io.max lines
// of its loop device in the workloads' cgroup. Only `--role all` enforces them — the controller
// that records new limits must reach the devices, and there it is the same process — and only
// where start-up finds cgroup v2 with the io controller and that cgroup.

extension ServeContext {
    /// `--qos-cgroup`, else $CAIRN_QOS_CGROUP (nil: auto).
    var qosCgroupSetting: String? {
        options.qosCgroup ?? ProcessInfo.processInfo.environment["CAIRN_QOS_CGROUP"]
    }

    /// `--role all` on one machine: the io.max throttle when limits can be enforced here, else
    /// nil — with one log line that says why ControllerModifyVolume is not offered.
    func oneMachineThrottle() -> CgroupIOMax? {
        guard etcd == nil else {
            if let setting = qosCgroupSetting, setting != "auto", setting != "none" {
                logger.warning("--qos-cgroup is ignored with --store etcd: the replicated volumes' engine enforces their QoS limits",
                               metadata: ["qos.cgroup": "\(setting)"])
            }
            return nil
        }
        let mounts = (try? MountTable.read()) ?? []
        switch CgroupIOMax.locate(qosCgroupSetting, mounts: mounts) {
        case .available(let throttle):
            logger.info("QoS limits of volumes are enforced with cgroup v2 io.max on their loop devices; ControllerModifyVolume is offered",
                        metadata: ["qos.cgroup": "\(throttle.cgroup)"])
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

    /// The controller and node roles on one machine: why limits are not enforced.
    func reportNoOneMachineQoS(reason: String) {
        guard etcd == nil else { return }
        logger.info("ControllerModifyVolume is not offered: \(reason); one machine enforces QoS limits only in --role all")
    }
}
