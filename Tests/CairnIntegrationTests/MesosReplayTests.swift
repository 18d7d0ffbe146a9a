import CSIProto
import CairnCSI
import CairnCore
import Foundation
import XCTest

/// Apache Mesos's calls, replayed one by one against the real plugin launched the way Mesos
/// launches a managed plugin (`CSI_ENDPOINT` and `MESOS_AGENT_ID` in the environment, no
/// `--endpoint` or `--node-id`), with the field values Mesos sends. The sequences follow
/// apache/mesos `src/csi/v1_volume_manager.cpp` (the CSI v1 volume manager shared by the storage
/// local resource provider and the `volume/csi` isolator) and
/// `src/resource_provider/storage/provider.cpp` (the SLRP): startup (`prepareServices`), the
/// reconciliation loop (`reconcileResources`: ListVolumes once, GetCapacity once per profile),
/// CREATE_DISK (`applyCreateDisk`), publishing for a task (`_attachVolume` → `__publishVolume` →
/// `_publishVolume`), recovery after a reboot (`recover`: a new boot id turns PUBLISHED back into
/// NODE_READY, then stage and publish again) and DESTROY_DISK (`_deleteVolume`: empty the
/// target directory, then NodeUnpublish → NodeUnstage → ControllerUnpublish → DeleteVolume).
/// The profiles are read from deploy/mesos/disk-profiles.json, the file operators install.
final class MesosReplayTests: IntegrationTestCase {
    /// A Mesos agent id (`<master-assigned uuid>-S<n>`): Cairn's node id when Mesos launches it.
    static let agentID = "2ae1b8d1-4cd7-4a7e-9d21-0d2b5e0a8c3f-S3"

    // MARK: SLRP

    func testSLRPReplayExt4ProfileFromStartupToDestroyDiskAcrossAReboot() async throws {
        try await slrpReplay(profile: "cairn-r1-ext4", sizeMiB: 64)
    }

    func testSLRPReplayXFSProfileFromStartupToDestroyDiskAcrossAReboot() async throws {
        try await slrpReplay(profile: "cairn-r1-xfs", sizeMiB: 300)
    }

    func testSLRPReplayBlockProfileFromStartupToDestroyDiskAcrossAReboot() async throws {
        try await slrpReplay(profile: "cairn-r1-block", sizeMiB: 64)
    }

    func slrpReplay(profile profileName: String, sizeMiB: Int64) async throws {
        let plugin = try await startPlugin(nodeID: Self.agentID, launch: .mesosManagedPlugin)
        let slrp = MesosVolumeManager(csi: CSIClient(plugin: plugin), workDir: plugin.root + "/mesos")
        let profiles = try MesosProfile.load()
        guard let profile = profiles.first(where: { $0.name == profileName }) else {
            return XCTFail("deploy/mesos/disk-profiles.json has no profile \(profileName)")
        }

        // Startup: the SLRP probes, then prepareServices.
        try await slrp.prepareServices(controller: true, node: true, test: self)
        XCTAssertEqual(slrp.nodeID, Self.agentID, "NodeGetInfo must answer the agent id Mesos put in MESOS_AGENT_ID")

        // The reconciliation loop, a few rounds: the answers do not change while nothing happens.
        let first = try await slrp.reconcile(profiles: profiles, test: self)
        for round in 2...3 {
            let again = try await slrp.reconcile(profiles: profiles, test: self)
            XCTAssertEqual(again, first, "reconciliation round \(round) must see what round 1 saw (nothing changed)")
        }
        XCTAssertEqual(first.volumes, [], "a fresh plugin lists no volumes")
        for p in profiles {
            let capacity = first.capacity[p.name] ?? -1
            XCTAssertEqual(capacity % CSI.mib, 0, "GetCapacity(\(p.name)) must be whole MiB (Mesos offers MB): \(capacity)")
            if p.replicas > 1 {
                XCTAssertEqual(capacity, 0, "one machine cannot hold \(p.replicas) replicas: GetCapacity(\(p.name)) must be 0 so Mesos offers no pool")
            } else {
                XCTAssertGreaterThan(capacity, sizeMiB * CSI.mib, "GetCapacity(\(p.name)) must offer the pool")
            }
        }

        // CREATE_DISK: the operation's UUID is the name, the size whole MiB as required and limit.
        let operationUUID = UUID().uuidString.lowercased()
        let create = slrp.createVolumeRequest(name: operationUUID, bytes: sizeMiB * CSI.mib, profile: profile)
        let created = try await must("CreateVolume \(CSI.show(create))") { try await slrp.csi.createVolume(create) }.volume
        XCTAssertEqual(created.capacityBytes, sizeMiB * CSI.mib, "CreateVolume with required = limit must give exactly that size")
        // Mesos retries CreateVolume on UNAVAILABLE / DEADLINE_EXCEEDED: the retry must find the same volume.
        let retried = try await must("CreateVolume retried") { try await slrp.csi.createVolume(create) }.volume
        XCTAssertEqual(retried, created, "a retried CreateVolume must answer the volume the first call made, unchanged")

        let afterCreate = try await slrp.reconcile(profiles: profiles, test: self)
        XCTAssertEqual(afterCreate.volumes, [.init(id: created.volumeID, capacity: created.capacityBytes, context: created.volumeContext)],
                       "ListVolumes must report the new volume with CreateVolume's capacity and volume_context (Mesos compares them with its checkpoint)")
        XCTAssertEqual(afterCreate.capacity[profile.name], (first.capacity[profile.name] ?? 0) - sizeMiB * CSI.mib,
                       "GetCapacity(\(profile.name)) must shrink by the new volume's size")

        // A task uses the disk: ControllerPublish → NodeStage → NodePublish.
        let volumeID = created.volumeID
        try await slrp.publish(volumeID, state: .created(capability: profile.capability, context: created.volumeContext), test: self)
        XCTAssert(FileManager.default.fileExists(atPath: slrp.targetPath(volumeID)), "Mesos fails the publish when the target path does not exist")
        let payload = try MesosTaskData.write(profile: profile, target: slrp.targetPath(volumeID))

        // Agent reboot: no graceful stop, every mount and loop device gone, the records stay.
        await plugin.crash()
        var lost = await PluginProcess.unmountAll(under: [slrp.mountRootDir])
        lost += await PluginProcess.detachLoops(backedUnder: plugin.volumesDir)
        XCTAssert(lost.isEmpty, "simulating the reboot failed: \(lost)")
        assertNoLeftovers(plugin, "after simulating the reboot")
        try await plugin.start()
        try await slrp.prepareServices(controller: true, node: true, test: self)
        // recover(): a new boot id turns the PUBLISHED volume into NODE_READY (still controller-published),
        // then publishVolume stages and publishes it again; no ControllerPublish.
        try await slrp.publish(volumeID, state: .nodeReady(capability: profile.capability, context: created.volumeContext), test: self)
        XCTAssertEqual(try MesosTaskData.read(profile: profile, target: slrp.targetPath(volumeID), count: payload.count), payload,
                       "the task's data must be back after the reboot, re-stage and re-publish")
        let afterReboot = try await slrp.reconcile(profiles: profiles, test: self)
        XCTAssertEqual(afterReboot, afterCreate, "reconciliation after the reboot must see what it saw before")

        // DESTROY_DISK.
        try await slrp.destroyDisk(volumeID, test: self)
        let afterDestroy = try await slrp.reconcile(profiles: profiles, test: self)
        XCTAssertEqual(afterDestroy, first, "after DESTROY_DISK the plugin must report what it reported before CREATE_DISK")
        assertNoLeftovers(plugin, "after DESTROY_DISK")
    }

    // MARK: Retries and final errors

    /// Mesos retries only CreateVolume and DeleteVolume, and only on UNAVAILABLE and
    /// DEADLINE_EXCEEDED (`VolumeManagerProcess::__call`); everything else fails the operation
    /// for good and the message is what the operator sees. So: retries are idempotent, and no
    /// error a retry could not fix may come back as UNAVAILABLE or DEADLINE_EXCEEDED.
    func testSLRPRetriedCallsAreIdempotentAndOtherErrorsAreFinalAndSayWhatToDo() async throws {
        let plugin = try await startPlugin(nodeID: Self.agentID, launch: .mesosManagedPlugin)
        let slrp = MesosVolumeManager(csi: CSIClient(plugin: plugin), workDir: plugin.root + "/mesos")
        let profiles = try MesosProfile.load()
        try await slrp.prepareServices(controller: true, node: true, test: self)
        let ext4 = try XCTUnwrap(profiles.first { $0.name == "cairn-r1-ext4" })
        let r3 = try XCTUnwrap(profiles.first { $0.name == "cairn-r3-ext4" })

        let name = UUID().uuidString.lowercased()
        let create = slrp.createVolumeRequest(name: name, bytes: 64 * CSI.mib, profile: ext4)
        let volume = try await must("CreateVolume") { try await slrp.csi.createVolume(create) }.volume
        for attempt in 2...4 {
            let again = try await must("CreateVolume attempt \(attempt)") { try await slrp.csi.createVolume(create) }.volume
            XCTAssertEqual(again.volumeID, volume.volumeID, "CreateVolume attempt \(attempt) must return the same volume")
        }

        func final(_ expected: StatusCode, _ what: String, mentions hint: String, _ call: () async throws -> Void) async {
            let got = await expectStatus(expected, what, call)
            XCTAssertFalse([.unavailable, .deadlineExceeded].contains(got.code),
                           "\(what): \(got.code) would make Mesos retry a call that cannot succeed")
            XCTAssert(got.message.contains(hint), "\(what): the message must tell the operator what to do (mention \"\(hint)\"): \"\(got.message)\"")
        }
        // The same UUID with another size: a different request, never the same volume.
        await final(.alreadyExists, "CreateVolume of an existing name with another size", mentions: "already exists") {
            _ = try await slrp.csi.createVolume(slrp.createVolumeRequest(name: name, bytes: 128 * CSI.mib, profile: ext4))
        }
        await final(.resourceExhausted, "CreateVolume with the replicas=3 profile on one machine", mentions: "replicas=1") {
            _ = try await slrp.csi.createVolume(slrp.createVolumeRequest(name: UUID().uuidString.lowercased(), bytes: 64 * CSI.mib, profile: r3))
        }
        // A RAW disk of 16.5 MB: Mesos asks for 17301504 bytes as both required and limit.
        await final(.outOfRange, "CreateVolume of a size that is not whole MiB", mentions: "whole MiB") {
            _ = try await slrp.csi.createVolume(slrp.createVolumeRequest(name: UUID().uuidString.lowercased(), bytes: 16 * CSI.mib + CSI.mib / 2, profile: ext4))
        }
        try await slrp.publish(volume.volumeID, state: .created(capability: ext4.capability, context: volume.volumeContext), test: self)
        await final(.failedPrecondition, "DeleteVolume of a published volume", mentions: "ControllerUnpublishVolume") {
            _ = try await slrp.csi.deleteVolume(CSI.delete(volume.volumeID))
        }
        await final(.notFound, "ControllerPublishVolume to a node id no agent registered", mentions: "not registered") {
            var request = Csi_V1_ControllerPublishVolumeRequest()
            request.volumeID = volume.volumeID
            request.nodeID = "0c9a6e1f-0000-4000-8000-000000000000-S9"
            request.volumeCapability = ext4.capability
            request.volumeContext = volume.volumeContext
            _ = try await slrp.csi.controllerPublish(request)
        }

        try await slrp.destroyDisk(volume.volumeID, test: self)
        for attempt in 2...3 {
            _ = try await must("DeleteVolume attempt \(attempt) of a deleted volume") {
                try await slrp.csi.deleteVolume(CSI.delete(volume.volumeID))
            }
        }
        assertNoLeftovers(plugin, "after the retries")
    }

    // MARK: volume/csi isolator

    /// The `volume/csi` isolator (Mesos 1.11+) drives the Node service alone for a
    /// pre-provisioned volume: the volume state it builds is NODE_READY with an empty publish
    /// context, so NodeStage is its first call. Cairn needs the volume attached to the node
    /// first (ControllerPublishVolume, the operator's step, e.g. with csc); without that the
    /// stage fails for good and says so.
    func testCSIIsolatorNodeOnlySequencePublishesAPreProvisionedVolumeAndCleansUp() async throws {
        try await isolatorReplay(encrypted: false)
    }

    /// The same with an encrypted volume whose passphrase comes in the CSI volume's
    /// `node_stage_secrets` (docs/mesos.md, "Encrypted volumes").
    func testCSIIsolatorStagesAnEncryptedVolumeWithItsNodeStageSecrets() async throws {
        try await isolatorReplay(encrypted: true)
    }

    func isolatorReplay(encrypted: Bool) async throws {
        let plugin = try await startPlugin(nodeID: Self.agentID, launch: .mesosManagedPlugin)
        let csi = CSIClient(plugin: plugin)
        let profile = try XCTUnwrap(try MesosProfile.load().first { $0.name == "cairn-r1-ext4" })

        // The operator pre-provisions the volume and attaches it to the agent's node.
        let volume = try await must("operator: CreateVolume") {
            try await csi.createVolume(CSI.create(name: "mysql-data", access: .mount(fsType: "ext4"), required: 64 * CSI.mib,
                                                  parameters: encrypted ? ["replicas": "1", "encrypted": "true"] : ["replicas": "1"]))
        }.volume
        let isolator = MesosVolumeManager(csi: csi, workDir: plugin.root + "/mesos")
        if encrypted { isolator.nodeStageSecrets = ["passphrase": "mesos secret store value"] }

        // Without the attachment the isolator's NodeStage is refused, finally and with the fix named.
        try await isolator.prepareServices(controller: false, node: true, test: self)
        try FileManager.default.createDirectory(atPath: isolator.stagingPath(volume.volumeID), withIntermediateDirectories: true)
        let refused = await expectStatus(.failedPrecondition, "isolator NodeStage before the operator's ControllerPublish") {
            _ = try await csi.nodeStage(isolator.stageRequest(volume.volumeID, capability: profile.capability,
                                                              publishContext: [:], context: volume.volumeContext))
        }
        XCTAssert(refused.message.contains("ControllerPublishVolume"), "the refusal must say to ControllerPublishVolume first: \(refused.message)")
        assertNoLeftovers(plugin, "after the refused NodeStage")

        _ = try await must("operator: ControllerPublishVolume to the agent") {
            try await csi.controllerPublish(CSI.controllerPublish(volume.volumeID, node: Self.agentID, access: .mount(fsType: "ext4"),
                                                                  context: volume.volumeContext))
        }

        // A task with the CSI volume starts: prepareServices (Node service only), then publishVolume.
        try await isolator.prepareServices(controller: false, node: true, test: self)
        try await isolator.publish(volume.volumeID, state: .nodeReady(capability: profile.capability, context: volume.volumeContext,
                                                                      preProvisioned: true), test: self)
        let payload = try MesosTaskData.write(profile: profile, target: isolator.targetPath(volume.volumeID))
        XCTAssertEqual(try MesosTaskData.read(profile: profile, target: isolator.targetPath(volume.volumeID), count: payload.count), payload)

        // The task ends: unpublishVolume → NodeUnpublish → NodeUnstage; then Mesos forgets the volume.
        try await isolator.unpublish(volume.volumeID, test: self)
        try isolator.removeVolumeDirectories(volume.volumeID)
        assertNoLeftovers(plugin, "after the isolator unpublished the volume")

        // A second task on the same agent publishes it again, with the data still there.
        try await isolator.publish(volume.volumeID, state: .nodeReady(capability: profile.capability, context: volume.volumeContext,
                                                                      preProvisioned: true), test: self)
        XCTAssertEqual(try MesosTaskData.read(profile: profile, target: isolator.targetPath(volume.volumeID), count: payload.count), payload,
                       "the next task must find the data the first one wrote")
        try await isolator.unpublish(volume.volumeID, test: self)
        try isolator.removeVolumeDirectories(volume.volumeID)

        _ = try await must("operator: ControllerUnpublishVolume") {
            try await csi.controllerUnpublish(CSI.controllerUnpublish(volume.volumeID, node: Self.agentID))
        }
        _ = try await must("operator: DeleteVolume") { try await csi.deleteVolume(CSI.delete(volume.volumeID)) }
        assertNoLeftovers(plugin, "after the isolator sequence")
    }
}

// MARK: - Mesos's side, modelled

/// A profile of deploy/mesos/disk-profiles.json, turned into what the URI disk profile adaptor
/// hands the SLRP: a CSI volume capability and the CreateVolume parameters.
struct MesosProfile: Sendable {
    var name: String
    var capability: Csi_V1_VolumeCapability
    var parameters: [String: String]
    var replicas: Int { Int(parameters["replicas"] ?? "1") ?? 1 }
    var isBlock: Bool {
        if case .block = capability.accessType { return true }
        return false
    }

    static var file: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("deploy/mesos/disk-profiles.json").path
    }

    static func load() throws -> [MesosProfile] {
        guard let data = FileManager.default.contents(atPath: file),
              let root = try JSONSerialization.jsonObject(with: data) as? [String: Any],
              let matrix = root["profile_matrix"] as? [String: [String: Any]] else {
            throw FixtureError("\(file) is missing or has no profile_matrix object")
        }
        return try matrix.keys.sorted().map { name in
            let entry = matrix[name]!
            guard let selector = entry["csi_plugin_type_selector"] as? [String: String], selector["plugin_type"] == MesosVolumeManager.pluginType else {
                throw FixtureError("profile \(name) must select plugin_type \(MesosVolumeManager.pluginType)")
            }
            guard let caps = entry["volume_capabilities"] as? [String: Any],
                  let access = (caps["access_mode"] as? [String: String])?["mode"] else {
                throw FixtureError("profile \(name) has no volume_capabilities.access_mode.mode")
            }
            var capability = Csi_V1_VolumeCapability()
            if let mount = caps["mount"] as? [String: Any] {
                var m = Csi_V1_VolumeCapability.MountVolume()
                m.fsType = mount["fs_type"] as? String ?? ""
                m.mountFlags = mount["mount_flags"] as? [String] ?? []
                capability.mount = m
            } else if caps["block"] != nil {
                capability.block = Csi_V1_VolumeCapability.BlockVolume()
            } else {
                throw FixtureError("profile \(name) has neither mount nor block")
            }
            let modes: [String: Csi_V1_VolumeCapability.AccessMode.Mode] = [
                "SINGLE_NODE_WRITER": .singleNodeWriter, "SINGLE_NODE_READER_ONLY": .singleNodeReaderOnly,
                "MULTI_NODE_READER_ONLY": .multiNodeReaderOnly,
            ]
            guard let mode = modes[access] else { throw FixtureError("profile \(name): access mode \(access) is not one Cairn supports") }
            capability.accessMode = .with { $0.mode = mode }
            return MesosProfile(name: name, capability: capability, parameters: entry["create_parameters"] as? [String: String] ?? [:])
        }
    }
}

/// Mesos's CSI v1 volume manager (`src/csi/v1_volume_manager.cpp`), its calls and their fields,
/// with the mount directories of an agent whose work dir is `workDir`.
final class MesosVolumeManager: @unchecked Sendable {
    /// The plugin type and name in deploy/mesos (resource-providers/*.json, csi-plugins/cairn.json).
    static let pluginType = "dev.cairn.csi"
    static let pluginName = "cairn"

    let csi: CSIClient
    /// `csi::paths::getMountRootDir(<work_dir>/csi, type, name)`.
    let mountRootDir: String
    private(set) var nodeID = ""
    /// The CSI volume's `static_provisioning.node_stage_secrets`, resolved by the agent's secret
    /// resolver: the isolator passes them with every NodeStageVolume (an encrypted volume's
    /// `passphrase`, docs/mesos.md).
    var nodeStageSecrets: [String: String] = [:]

    init(csi: CSIClient, workDir: String) {
        self.csi = csi
        mountRootDir = "\(workDir)/csi/\(Self.pluginType)/\(Self.pluginName)/mounts"
    }

    func stagingPath(_ volumeID: String) -> String { "\(mountRootDir)/\(volumeID)/staging" }
    func targetPath(_ volumeID: String) -> String { "\(mountRootDir)/\(volumeID)/target" }

    /// The volume state Mesos checkpoints, as far as it decides the calls.
    enum State {
        /// CREATED: after CreateVolume; publishing starts with ControllerPublish.
        case created(capability: Csi_V1_VolumeCapability, context: [String: String])
        /// NODE_READY: controller-published (or pre-provisioned); publishing starts with NodeStage.
        case nodeReady(capability: Csi_V1_VolumeCapability, context: [String: String], preProvisioned: Bool = false)
    }

    /// ServiceManager's probe, then `prepareServices`: GetPluginCapabilities, GetPluginInfo once
    /// per service, ControllerGetCapabilities, NodeGetCapabilities, NodeGetInfo (only with a
    /// controller that publishes).
    func prepareServices(controller: Bool, node: Bool, test: IntegrationTestCase) async throws {
        let started = ContinuousClock.now
        let probe = try await test.must("Probe") { try await csi.probe() }
        XCTAssert(!probe.hasReady || probe.ready.value, "Probe must answer ready at once (Mesos does not wait for readiness)")
        let plugin = try await test.must("GetPluginCapabilities") { try await csi.getPluginCapabilities() }
        if controller {
            XCTAssert(plugin.capabilities.contains { $0.service.type == .controllerService },
                      "the SLRP fails without the CONTROLLER_SERVICE plugin capability")
        }
        let infos = try await withThrowingTaskGroup(of: Csi_V1_GetPluginInfoResponse.self) { group in
            for _ in 0..<((controller ? 1 : 0) + (node ? 1 : 0)) { group.addTask { try await self.csi.getPluginInfo() } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        XCTAssert(infos.allSatisfy { $0.name == "csi.cairn.dev" && $0.vendorVersion == infos.first?.vendorVersion },
                  "every service must report the same plugin name and version (Mesos warns otherwise): \(infos.map { "\($0.name) \($0.vendorVersion)" })")
        var publishes = false
        if controller {
            let caps = try await test.must("ControllerGetCapabilities") { try await csi.controllerGetCapabilities() }
            let types = Set(caps.capabilities.map(\.rpc.type))
            for needed: Csi_V1_ControllerServiceCapability.RPC.TypeEnum in [.createDeleteVolume, .publishUnpublishVolume, .listVolumes, .getCapacity] {
                XCTAssert(types.contains(needed), "the SLRP needs the controller capability \(needed)")
            }
            publishes = types.contains(.publishUnpublishVolume)
        }
        if node {
            let caps = try await test.must("NodeGetCapabilities") { try await csi.nodeGetCapabilities() }
            XCTAssert(caps.capabilities.contains { $0.rpc.type == .stageUnstageVolume },
                      "Cairn stages volumes; Mesos then calls NodeStageVolume before NodePublishVolume")
            if publishes {
                nodeID = try await test.must("NodeGetInfo") { try await csi.nodeGetInfo() }.nodeID
            }
        }
        let elapsed = ContinuousClock.now - started
        XCTAssertLessThan(elapsed, .seconds(5), "startup calls took \(elapsed)")
    }

    struct Listed: Equatable, CustomStringConvertible {
        var id: String
        var capacity: Int64
        var context: [String: String]
        var description: String { "\(id) \(capacity) \(context)" }
    }

    struct Reconciled: Equatable {
        var volumes: [Listed]
        var capacity: [String: Int64]
    }

    /// `reconcileResources`: ListVolumes (one call, no paging) and GetCapacity once per profile.
    func reconcile(profiles: [MesosProfile], test: IntegrationTestCase) async throws -> Reconciled {
        let started = ContinuousClock.now
        let listed = try await test.must("ListVolumes") { try await csi.listVolumes(Csi_V1_ListVolumesRequest()) }
        XCTAssertEqual(listed.nextToken, "", "Mesos lists without max_entries and ignores next_token: everything must come in one answer")
        var capacity: [String: Int64] = [:]
        for profile in profiles {
            var request = Csi_V1_GetCapacityRequest()
            request.volumeCapabilities = [profile.capability]
            request.parameters = profile.parameters
            capacity[profile.name] = try await test.must("GetCapacity(\(profile.name))") { try await csi.getCapacity(request) }.availableCapacity
        }
        let elapsed = ContinuousClock.now - started
        XCTAssertLessThan(elapsed, .seconds(2), "one reconciliation (ListVolumes + \(profiles.count) × GetCapacity) took \(elapsed)")
        let volumes = listed.entries.map { Listed(id: $0.volume.volumeID, capacity: $0.volume.capacityBytes, context: $0.volume.volumeContext) }
        return Reconciled(volumes: volumes.sorted { $0.id < $1.id }, capacity: capacity)
    }

    /// `createVolume`: the name, required = limit = the RAW disk's MB × 2^20, the profile's
    /// capability (one) and parameters.
    func createVolumeRequest(name: String, bytes: Int64, profile: MesosProfile) -> Csi_V1_CreateVolumeRequest {
        var request = Csi_V1_CreateVolumeRequest()
        request.name = name
        request.capacityRange = .with {
            $0.requiredBytes = bytes
            $0.limitBytes = bytes
        }
        request.volumeCapabilities = [profile.capability]
        request.parameters = profile.parameters
        return request
    }

    func stageRequest(_ volumeID: String, capability: Csi_V1_VolumeCapability, publishContext: [String: String],
                      context: [String: String]) -> Csi_V1_NodeStageVolumeRequest {
        var request = Csi_V1_NodeStageVolumeRequest()
        request.volumeID = volumeID
        request.publishContext = publishContext
        request.stagingTargetPath = stagingPath(volumeID)
        request.volumeCapability = capability
        request.volumeContext = context
        request.secrets = nodeStageSecrets
        return request
    }

    /// `publishVolume` from the given state: [ControllerPublish →] mkdir staging, NodeStage →
    /// mkdir the target's parent, NodePublish → check the target path exists.
    func publish(_ volumeID: String, state: State, test: IntegrationTestCase) async throws {
        var publishContext: [String: String] = [:]
        let capability: Csi_V1_VolumeCapability
        let context: [String: String]
        switch state {
        case .created(let cap, let ctx):
            capability = cap
            context = ctx
            var request = Csi_V1_ControllerPublishVolumeRequest()
            request.volumeID = volumeID
            request.nodeID = nodeID
            request.volumeCapability = cap
            request.readonly = false
            request.volumeContext = ctx
            publishContext = try await test.must("ControllerPublishVolume \(CSI.show(request))") {
                try await csi.controllerPublish(request)
            }.publishContext
            checkpointedPublishContext[volumeID] = publishContext
        case .nodeReady(let cap, let ctx, let preProvisioned):
            capability = cap
            context = ctx
            publishContext = preProvisioned ? [:] : checkpointedPublishContext[volumeID] ?? [:]
        }
        try FileManager.default.createDirectory(atPath: stagingPath(volumeID), withIntermediateDirectories: true)
        let stage = stageRequest(volumeID, capability: capability, publishContext: publishContext, context: context)
        _ = try await test.must("NodeStageVolume \(CSI.show(stage))") { try await csi.nodeStage(stage) }

        // target_path_exists is not set in deploy/mesos: Mesos makes the parent, the plugin the target.
        try FileManager.default.createDirectory(atPath: (targetPath(volumeID) as NSString).deletingLastPathComponent,
                                                withIntermediateDirectories: true)
        var publish = Csi_V1_NodePublishVolumeRequest()
        publish.volumeID = volumeID
        publish.publishContext = publishContext
        publish.targetPath = targetPath(volumeID)
        publish.volumeCapability = capability
        publish.readonly = false
        publish.volumeContext = context
        publish.stagingTargetPath = stagingPath(volumeID)
        _ = try await test.must("NodePublishVolume \(CSI.show(publish))") { try await csi.nodePublish(publish) }
        XCTAssert(FileManager.default.fileExists(atPath: targetPath(volumeID)),
                  "Mesos fails with \"Target path '\(targetPath(volumeID))' not created\" when NodePublish leaves no target")
    }

    /// The publish context Mesos checkpointed from ControllerPublish (used again after a reboot).
    private var checkpointedPublishContext: [String: [String: String]] = [:]

    /// `_unpublishVolume`: NodeUnpublish (then the target must be gone) → NodeUnstage.
    func unpublish(_ volumeID: String, test: IntegrationTestCase) async throws {
        var unpublish = Csi_V1_NodeUnpublishVolumeRequest()
        unpublish.volumeID = volumeID
        unpublish.targetPath = targetPath(volumeID)
        _ = try await test.must("NodeUnpublishVolume") { try await csi.nodeUnpublish(unpublish) }
        XCTAssertFalse(FileManager.default.fileExists(atPath: targetPath(volumeID)),
                       "Mesos fails with \"Target path '\(targetPath(volumeID))' not removed\" when NodeUnpublish leaves the target")
        var unstage = Csi_V1_NodeUnstageVolumeRequest()
        unstage.volumeID = volumeID
        unstage.stagingTargetPath = stagingPath(volumeID)
        _ = try await test.must("NodeUnstageVolume") { try await csi.nodeUnstage(unstage) }
        XCTAssert(PluginProcess.mounts(under: [stagingPath(volumeID)]).isEmpty, "NodeUnstage must unmount \(stagingPath(volumeID))")
    }

    /// `_deleteVolume` of a published volume: Mesos empties the target directory itself
    /// (`os::rmdir(target, recursive, removeRoot = false)`, the volume still mounted), then
    /// NodeUnpublish → NodeUnstage → ControllerUnpublish → DeleteVolume (retried), and removes
    /// its own directories (`removeVolume` → `garbageCollectMountPath`).
    func destroyDisk(_ volumeID: String, test: IntegrationTestCase) async throws {
        let target = targetPath(volumeID)
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: target, isDirectory: &isDirectory), isDirectory.boolValue {
            for entry in try FileManager.default.contentsOfDirectory(atPath: target) {
                try FileManager.default.removeItem(atPath: target + "/" + entry)
            }
        }
        try await unpublish(volumeID, test: test)
        _ = try await test.must("ControllerUnpublishVolume") {
            try await csi.controllerUnpublish(CSI.controllerUnpublish(volumeID, node: nodeID))
        }
        _ = try await test.must("DeleteVolume") { try await csi.deleteVolume(CSI.delete(volumeID)) }
        _ = try await test.must("DeleteVolume retried") { try await csi.deleteVolume(CSI.delete(volumeID)) }
        try removeVolumeDirectories(volumeID)
    }

    /// `garbageCollectMountPath`: Mesos removes <mounts>/<volume id> once the volume is gone.
    func removeVolumeDirectories(_ volumeID: String) throws {
        let path = "\(mountRootDir)/\(volumeID)"
        XCTAssert(PluginProcess.mounts(under: [path]).isEmpty, "nothing may still be mounted under \(path) when Mesos removes it")
        if FileManager.default.fileExists(atPath: path) { try FileManager.default.removeItem(atPath: path) }
    }
}

/// What a task (MySQL, say) writes on the disk: a file on a MOUNT disk, bytes at an offset on a BLOCK disk.
enum MesosTaskData {
    static let bytes = 256 * 1024
    static let blockOffset: Int64 = 1 << 20

    static func write(profile: MesosProfile, target: String) throws -> [UInt8] {
        let payload = VolumeIO.randomBytes(bytes)
        if profile.isBlock {
            try VolumeIO.writeDevice(target, at: blockOffset, payload)
        } else {
            try VolumeIO.writeFile(target + "/ibdata1", payload)
        }
        return payload
    }

    static func read(profile: MesosProfile, target: String, count: Int) throws -> [UInt8] {
        profile.isBlock ? try VolumeIO.readDevice(target, at: blockOffset, count: count) : try VolumeIO.readFile(target + "/ibdata1")
    }
}
