import CSIProto
import CairnCSI
import CairnCore
import Foundation
import Logging

// NodeGetVolumeStats: usage of the staged volume and its condition.

extension NodeService {
    // MARK: NodeGetVolumeStats

    public func nodeGetVolumeStats(_ request: Csi_V1_NodeGetVolumeStatsRequest) async throws -> Csi_V1_NodeGetVolumeStatsResponse {
        // No volume lock: stats change nothing, and a kubelet polling them must not see ABORTED
        // (or make a concurrent stage see it) while the volume is being staged.
        try Validate.volumeID(request.volumeID)
        guard !request.volumePath.isEmpty else { throw CairnError.invalidArgument("volume_path is required") }
        let volumeID = request.volumeID
        let volume = try await requireVolume(volumeID)
        let notHere = CairnError.notFound(
            "volume \(volumeID) is neither staged nor published at \"\(Validate.printable(request.volumePath))\" on node \(nodeID)")
        // A path we would refuse to stage or publish at cannot hold the volume: NOT_FOUND (the
        // spec's "does not exist on specified volume_path"), not INVALID_ARGUMENT.
        guard let lexical = try? Validate.absolutePath(request.volumePath, field: "volume_path") else { throw notHere }
        let stage = try await store.stage(volumeID: volumeID, nodeID: nodeID)
        let publish = try await store.publishes(volumeID: volumeID).first { $0.nodeID == nodeID && $0.targetPath == lexical }
        let namespace = publish?.namespace ?? .host
        let path: String
        if namespace == .host {
            guard let checked = try? Validate.path(request.volumePath, field: "volume_path", roots: pathRoots) else { throw notHere }
            path = checked
        } else {
            path = lexical
        }
        let isStaging = stage?.stagingPath == path
        let file = try await backing.file(volumeID: volumeID)
        let devices = try await mounter.loopDevices(backing: file)
        var real = path
        var mounted: MountInfo?
        do {
            real = try await mounter.resolve(path, in: namespace)
            mounted = try await mounter.mountInfo(at: real, in: namespace)
        } catch is MountNamespaceGone {
            mounted = nil
        }
        let mountIsOurs = mounted.map { usesVolume($0, devices: devices) } ?? false
        guard publish != nil || isStaging || mountIsOurs else { throw notHere }

        let accessType: AccessType = publish?.accessType ?? stage?.accessType
            ?? (mounted.map { $0.source.hasPrefix("/dev/loop") } == true ? .mount : .block)
        var problems: [String] = []
        let condition = try await backing.condition(volume)
        if let problem = condition.problem {
            problems.append(problem)
        }
        var response = Csi_V1_NodeGetVolumeStatsResponse()
        switch accessType {
        case .mount:
            if let mounted, mountIsOurs {
                let stats = try await mounter.filesystemStats(path: real, in: namespace)
                response.usage = [
                    usage(.bytes, total: stats.totalBytes, available: stats.availableBytes, used: stats.usedBytes),
                    usage(.inodes, total: stats.totalInodes, available: stats.freeInodes, used: stats.usedInodes),
                ]
                let expectReadOnly = publish.map(effectiveReadOnly)
                    ?? stage.map { AccessRules.isReaderOnly(AccessMode(rawValue: $0.accessMode) ?? .unknown) } ?? false
                if mounted.isReadOnly && !expectReadOnly {
                    problems.append(
                        "the filesystem at \(path) is read-only although it was made read-write: the kernel probably remounted it after I/O errors (see dmesg); unstage the volume and stage it again to run fsck")
                }
            } else if let mounted {
                problems.append("\(path) has \(mounted.source) mounted instead of the volume; unmount it and publish again")
            } else {
                problems.append("nothing is mounted at \(path): the volume's filesystem is gone (node restarted, or unmounted outside the plugin); stage and publish it again")
            }
        case .block:
            let device = devices.first { $0 == stage?.devicePath } ?? devices.first
            if let device {
                response.usage = [usage(.bytes, total: try await mounter.blockDeviceSize(device: device), available: 0, used: 0)]
                if publish != nil && !mountIsOurs {
                    problems.append("the device is no longer bound at \(path); publish the volume again")
                }
            } else {
                problems.append("the volume's loop device is gone (node restarted, or detached outside the plugin); stage the volume again")
            }
        }
        response.volumeCondition = .with {
            $0.abnormal = !problems.isEmpty
            $0.message = problems.isEmpty
                ? (volume.replicas == nil ? "volume is attached and mounted; its backing file is intact"
                    : "volume is attached and mounted; " + condition.healthy)
                : problems.joined(separator: "; ")
        }
        return response
    }

    private func usage(_ unit: Csi_V1_VolumeUsage.Unit, total: Int64, available: Int64, used: Int64) -> Csi_V1_VolumeUsage {
        .with {
            $0.unit = unit
            $0.total = max(0, total)
            $0.available = max(0, available)
            $0.used = max(0, used)
        }
    }

    private func effectiveReadOnly(_ publish: PublishRecord) -> Bool {
        publish.readonly || AccessRules.isReaderOnly(AccessMode(rawValue: publish.accessMode) ?? .unknown)
            || MountFlags.asksReadOnly(publish.mountFlags)
    }
}
