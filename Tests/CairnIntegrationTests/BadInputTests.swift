import CSIProto
import CairnCore
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Design invariant 5: bad input gets a precise gRPC status and changes nothing — not the
/// store (ListVolumes), not the volume files, not the mounts and loop devices, and nothing is
/// created at a path the plugin was not allowed to touch.
final class BadInputTests: IntegrationTestCase {
    static let garbage: [UInt8] = [0xFF, 0xFF, 0xFF, 0x0F, 0x01]
    /// A length-delimited field 1 that claims 16 bytes and has one.
    static let truncated: [UInt8] = [0x0A, 0x10, 0x41]

    // MARK: Missing fields

    func testRequestsMissingARequiredFieldAreInvalidArgumentAndChangeNothing() async throws {
        let env = try await Env.make(self)
        let v = try await env.publishedVolume("missing-fields")
        let cap = Access.mount(fsType: "ext4")
        let ctx = v.publishContext
        let staging = try env.freshStagingDir("missing")
        let target = env.plugin.podsDir + "/missing/target"
        try FileManager.default.createDirectory(atPath: env.plugin.podsDir + "/missing", withIntermediateDirectories: true)
        let node = env.plugin.nodeID
        let id = v.id

        let noName = CSI.create(name: "", access: cap, required: 64 * CSI.mib)
        let noCaps = { var r = CSI.create(name: "no-caps", access: cap, required: 64 * CSI.mib); r.volumeCapabilities = []; return r }()
        let cases: [(String, @Sendable (CSIClient) async throws -> Void)] = [
            ("CreateVolume without name", { _ = try await $0.createVolume(noName) }),
            ("CreateVolume without volume_capabilities", { _ = try await $0.createVolume(noCaps) }),
            ("DeleteVolume without volume_id", { _ = try await $0.deleteVolume(CSI.delete("")) }),
            ("ControllerPublishVolume without volume_id", { _ = try await $0.controllerPublish(CSI.controllerPublish("", node: node, access: cap)) }),
            ("ControllerPublishVolume without node_id", { _ = try await $0.controllerPublish(CSI.controllerPublish(id, node: "", access: cap)) }),
            ("ControllerPublishVolume without volume_capability", { _ = try await $0.controllerPublish(CSI.controllerPublish(id, node: node, access: nil)) }),
            ("ControllerUnpublishVolume without volume_id", { _ = try await $0.controllerUnpublish(CSI.controllerUnpublish("", node: node)) }),
            ("ValidateVolumeCapabilities without volume_id", { _ = try await $0.validateVolumeCapabilities(CSI.validate("", access: cap)) }),
            ("ValidateVolumeCapabilities without volume_capabilities", { _ = try await $0.validateVolumeCapabilities(CSI.validate(id, access: nil)) }),
            ("ControllerGetVolume without volume_id", { _ = try await $0.controllerGetVolume(CSI.getVolume("")) }),
            ("NodeStageVolume without volume_id", { _ = try await $0.nodeStage(CSI.stage("", staging: staging, access: cap, publishContext: ctx)) }),
            ("NodeStageVolume without staging_target_path", { _ = try await $0.nodeStage(CSI.stage(id, staging: "", access: cap, publishContext: ctx)) }),
            ("NodeStageVolume without volume_capability", { _ = try await $0.nodeStage(CSI.stage(id, staging: staging, access: nil, publishContext: ctx)) }),
            ("NodeUnstageVolume without volume_id", { _ = try await $0.nodeUnstage(CSI.unstage("", staging: staging)) }),
            ("NodeUnstageVolume without staging_target_path", { _ = try await $0.nodeUnstage(CSI.unstage(id, staging: "")) }),
            ("NodePublishVolume without volume_id", { _ = try await $0.nodePublish(CSI.publish("", staging: staging, target: target, access: cap, publishContext: ctx)) }),
            ("NodePublishVolume without target_path", { _ = try await $0.nodePublish(CSI.publish(id, staging: staging, target: "", access: cap, publishContext: ctx)) }),
            ("NodePublishVolume without volume_capability", { _ = try await $0.nodePublish(CSI.publish(id, staging: staging, target: target, access: nil, publishContext: ctx)) }),
            ("NodeUnpublishVolume without volume_id", { _ = try await $0.nodeUnpublish(CSI.unpublish("", target: target)) }),
            ("NodeUnpublishVolume without target_path", { _ = try await $0.nodeUnpublish(CSI.unpublish(id, target: "")) }),
            ("NodeGetVolumeStats without volume_id", { _ = try await $0.nodeGetVolumeStats(CSI.stats("", path: staging)) }),
            ("NodeGetVolumeStats without volume_path", { _ = try await $0.nodeGetVolumeStats(CSI.stats(id, path: "")) }),
        ]
        for (what, call) in cases {
            try await refused(.invalidArgument, what, env, mustNotExist: [target]) { try await call(env.csi) }
        }
        // The spec's NodePublishVolume error table names this case: "Staging target path not
        // set" (STAGE_UNSTAGE_VOLUME advertised) is FAILED_PRECONDITION.
        try await refused(.failedPrecondition, "NodePublishVolume without staging_target_path", env, mustNotExist: [target]) {
            _ = try await env.csi.nodePublish(CSI.publish(id, staging: "", target: target, access: cap, publishContext: ctx))
        }
    }

    // MARK: Unknown volumes and nodes

    func testUnknownVolumeIDsAreNotFoundWhereTheSpecSaysSoAndOKForRemovals() async throws {
        let env = try await Env.make(self)
        let staging = try env.freshStagingDir("unknown")
        try FileManager.default.createDirectory(atPath: env.plugin.podsDir + "/unknown", withIntermediateDirectories: true)
        let target = env.plugin.podsDir + "/unknown/target"
        let node = env.plugin.nodeID
        let cap = Access.mount(fsType: "ext4")
        let context = ["cairn.dev/epoch": "1"]
        for id in ["vol-00000000-0000-4000-8000-000000000000", "fake-vol-id-3f2a9c1b-7"] {
            try await refused(.notFound, "ControllerPublishVolume(\(id))", env) {
                _ = try await env.csi.controllerPublish(CSI.controllerPublish(id, node: node, access: cap))
            }
            try await refused(.notFound, "ValidateVolumeCapabilities(\(id))", env) {
                _ = try await env.csi.validateVolumeCapabilities(CSI.validate(id, access: cap))
            }
            try await refused(.notFound, "ControllerGetVolume(\(id))", env) {
                _ = try await env.csi.controllerGetVolume(CSI.getVolume(id))
            }
            try await refused(.notFound, "NodeStageVolume(\(id), \(staging))", env) {
                _ = try await env.csi.nodeStage(CSI.stage(id, staging: staging, access: cap, publishContext: context))
            }
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: staging), [],
                           "a refused NodeStage must leave the staging directory empty")
            try await refused(.notFound, "NodePublishVolume(\(id), \(target))", env, mustNotExist: [target]) {
                _ = try await env.csi.nodePublish(CSI.publish(id, staging: staging, target: target, access: cap, publishContext: context))
            }
            try await refused(.notFound, "NodeGetVolumeStats(\(id), \(staging))", env) {
                _ = try await env.csi.nodeGetVolumeStats(CSI.stats(id, path: staging))
            }
            try await refused(.ok, "DeleteVolume(\(id)) (already gone is success)", env) {
                _ = try await env.csi.deleteVolume(CSI.delete(id))
            }
            try await refused(.ok, "ControllerUnpublishVolume(\(id), \(node)) (not published is success)", env) {
                _ = try await env.csi.controllerUnpublish(CSI.controllerUnpublish(id, node: node))
            }
            try await refused(.ok, "ControllerUnpublishVolume(\(id), no node) (not published is success)", env) {
                _ = try await env.csi.controllerUnpublish(CSI.controllerUnpublish(id, node: ""))
            }
            try await refused(anyOf: [.ok, .notFound], "NodeUnstageVolume(\(id), \(staging))", env) {
                _ = try await env.csi.nodeUnstage(CSI.unstage(id, staging: staging))
            }
            XCTAssert(FileManager.default.fileExists(atPath: staging), "NodeUnstage must not remove the CO's staging directory")
            try await refused(anyOf: [.ok, .notFound], "NodeUnpublishVolume(\(id), \(target))", env) {
                _ = try await env.csi.nodeUnpublish(CSI.unpublish(id, target: target))
            }
        }
    }

    func testControllerPublishToAnUnregisteredNodeIsNotFound() async throws {
        let env = try await Env.make(self)
        let v = try await env.createdVolume("unknown-node")
        try await refused(.notFound, "ControllerPublishVolume(\(v.id), node fake-node-id-1c0e77aa-f)", env) {
            _ = try await env.csi.controllerPublish(CSI.controllerPublish(v.id, node: "fake-node-id-1c0e77aa-f", access: .mount(fsType: "ext4")))
        }
        let got = try await env.csi.controllerGetVolume(CSI.getVolume(v.id))
        XCTAssertEqual(got.status.publishedNodeIds, [], "a refused ControllerPublish must not record an attachment")
    }

    func testNodeStageOfAVolumeNotPublishedToThisNodeIsFailedPreconditionAndAttachesNothing() async throws {
        let env = try await Env.make(self)
        let v = try await env.createdVolume("not-published")
        let staging = try env.freshStagingDir("not-published")
        try await refused(.failedPrecondition, "NodeStageVolume(\(v.id)) without a ControllerPublishVolume to this node", env) {
            _ = try await env.csi.nodeStage(CSI.stage(v.id, staging: staging, access: .mount(fsType: "ext4"),
                                                      publishContext: ["cairn.dev/epoch": "1"]))
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: staging), [], "the staging directory must stay empty")
    }

    // MARK: Paths

    func testStagingAndTargetPathsOutsideTheRootsAreInvalidArgumentAndNothingAppearsThere() async throws {
        let env = try await Env.make(self)
        let root = env.plugin.root
        let tag = UUID().uuidString.prefix(8).lowercased()
        // Volume `staged` is staged legitimately (for the NodePublish cases); `fresh` is
        // published but not staged (for the NodeStage cases): the path is the only thing wrong.
        let staged = try await env.stagedVolume("paths-staged")
        let fresh = try await env.publishedVolume("paths-fresh")
        try FileManager.default.createDirectory(atPath: env.plugin.podsDir + "/paths", withIntermediateDirectories: true)
        let goodTarget = env.plugin.podsDir + "/paths/target"

        let outside = ["/etc/cairn-evil-\(tag)", "/tmp/cairn-it-other-\(tag)"]
        let dotdot = [
            "\(root)/staging/../../cairn-it-dotdot-\(tag)",  // = /tmp/cairn-it-dotdot-…
            "\(root)/staging/../staging/inside-after-dotdot-\(tag)",  // inside, but spelled with ..
        ]
        let resolvedDotdot = ["/tmp/cairn-it-dotdot-\(tag)", "\(root)/staging/inside-after-dotdot-\(tag)"]
        let relative = ["staging/relative-\(tag)"]
        for path in outside + resolvedDotdot where !path.hasPrefix(root) {
            XCTAssertFalse(FileManager.default.fileExists(atPath: path), "\(path) must not exist before the test")
            env.plugin.registerForeignPath(path)
        }
        let mustNotExist = outside + resolvedDotdot + [FileManager.default.currentDirectoryPath + "/" + relative[0]]
        let cap = Access.mount(fsType: "ext4")

        for bad in outside + dotdot + relative {
            try await refused(.invalidArgument, "NodeStageVolume(\(fresh.id), staging \(bad))", env, mustNotExist: mustNotExist) {
                _ = try await env.csi.nodeStage(CSI.stage(fresh.id, staging: bad, access: cap, publishContext: fresh.publishContext))
            }
            try await refused(.invalidArgument, "NodePublishVolume(\(staged.id), target \(bad))", env, mustNotExist: mustNotExist) {
                _ = try await env.csi.nodePublish(CSI.publish(staged.id, staging: staged.staging, target: bad, access: cap,
                                                              publishContext: staged.publishContext))
            }
            try await refused(.invalidArgument, "NodePublishVolume(\(staged.id), staging \(bad))", env,
                              mustNotExist: mustNotExist + [goodTarget]) {
                _ = try await env.csi.nodePublish(CSI.publish(staged.id, staging: bad, target: goodTarget, access: cap,
                                                              publishContext: staged.publishContext))
            }
            try await refused(.invalidArgument, "NodeUnstageVolume(\(staged.id), staging \(bad))", env, mustNotExist: mustNotExist) {
                _ = try await env.csi.nodeUnstage(CSI.unstage(staged.id, staging: bad))
            }
            try await refused(.invalidArgument, "NodeUnpublishVolume(\(staged.id), target \(bad))", env, mustNotExist: mustNotExist) {
                _ = try await env.csi.nodeUnpublish(CSI.unpublish(staged.id, target: bad))
            }
        }
    }

    func testASymlinkInsideTheRootThatLeadsOutsideIsInvalidArgument() async throws {
        let env = try await Env.make(self)
        let staged = try await env.stagedVolume("link-staged")
        let fresh = try await env.publishedVolume("link-fresh")
        var template = Array("/tmp/cairn-it-outside.XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        let outsideDir = try XCTUnwrap(made.map { String(cString: $0) }, "mkdtemp failed")
        env.plugin.registerForeignPath(outsideDir)
        let stagingLink = env.plugin.stagingDir + "/escape"
        let podLink = env.plugin.podsDir + "/escape"
        try FileManager.default.createSymbolicLink(atPath: stagingLink, withDestinationPath: outsideDir)
        try FileManager.default.createSymbolicLink(atPath: podLink, withDestinationPath: outsideDir)
        let cap = Access.mount(fsType: "ext4")

        try await refused(.invalidArgument, "NodeStageVolume(\(fresh.id), staging \(stagingLink) -> \(outsideDir))", env) {
            _ = try await env.csi.nodeStage(CSI.stage(fresh.id, staging: stagingLink, access: cap, publishContext: fresh.publishContext))
        }
        try await refused(.invalidArgument, "NodeStageVolume(\(fresh.id), staging \(stagingLink)/deeper)", env) {
            _ = try await env.csi.nodeStage(CSI.stage(fresh.id, staging: stagingLink + "/deeper", access: cap, publishContext: fresh.publishContext))
        }
        try await refused(.invalidArgument, "NodePublishVolume(\(staged.id), target \(podLink)/target)", env) {
            _ = try await env.csi.nodePublish(CSI.publish(staged.id, staging: staged.staging, target: podLink + "/target",
                                                          access: cap, publishContext: staged.publishContext))
        }
        try await refused(.invalidArgument, "NodePublishVolume(\(staged.id), target \(podLink))", env) {
            _ = try await env.csi.nodePublish(CSI.publish(staged.id, staging: staged.staging, target: podLink,
                                                          access: cap, publishContext: staged.publishContext))
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: outsideDir), [],
                       "nothing may appear in \(outsideDir), which is only reachable through a symlink")
        XCTAssert(PluginProcess.mounts(under: [outsideDir]).isEmpty, "nothing may be mounted in \(outsideDir)")
    }

    // MARK: Ids and names

    func testVolumeIDsThatCouldNameAPathAreInvalidArgument() async throws {
        let env = try await Env.make(self)
        let staging = try env.freshStagingDir("ids")
        try FileManager.default.createDirectory(atPath: env.plugin.podsDir + "/ids", withIntermediateDirectories: true)
        let target = env.plugin.podsDir + "/ids/target"
        let node = env.plugin.nodeID
        let cap = Access.mount(fsType: "ext4")
        let context = ["cairn.dev/epoch": "1"]
        for id in ["../../etc", "a/b", "..", "/etc/passwd", "vol-x/../../../etc", String(repeating: "a", count: 10 << 10)] {
            let shown = id.count > 40 ? "<\(id.utf8.count)-byte id>" : id
            let calls: [(String, @Sendable (CSIClient) async throws -> Void)] = [
                ("DeleteVolume", { _ = try await $0.deleteVolume(CSI.delete(id)) }),
                ("ControllerPublishVolume", { _ = try await $0.controllerPublish(CSI.controllerPublish(id, node: node, access: cap)) }),
                ("ControllerUnpublishVolume", { _ = try await $0.controllerUnpublish(CSI.controllerUnpublish(id, node: node)) }),
                ("ValidateVolumeCapabilities", { _ = try await $0.validateVolumeCapabilities(CSI.validate(id, access: cap)) }),
                ("ControllerGetVolume", { _ = try await $0.controllerGetVolume(CSI.getVolume(id)) }),
                ("NodeStageVolume", { _ = try await $0.nodeStage(CSI.stage(id, staging: staging, access: cap, publishContext: context)) }),
                ("NodeUnstageVolume", { _ = try await $0.nodeUnstage(CSI.unstage(id, staging: staging)) }),
                ("NodePublishVolume", { _ = try await $0.nodePublish(CSI.publish(id, staging: staging, target: target, access: cap, publishContext: context)) }),
                ("NodeUnpublishVolume", { _ = try await $0.nodeUnpublish(CSI.unpublish(id, target: target)) }),
                ("NodeGetVolumeStats", { _ = try await $0.nodeGetVolumeStats(CSI.stats(id, path: staging)) }),
            ]
            for (method, call) in calls {
                try await refused(.invalidArgument, "\(method) with volume_id \"\(shown)\"", env, mustNotExist: [target]) {
                    try await call(env.csi)
                }
            }
        }
    }

    func testOversizedNameAndNodeIDAreInvalidArgument() async throws {
        let env = try await Env.make(self)
        let huge = String(repeating: "n", count: 10 << 10)
        try await refused(.invalidArgument, "CreateVolume with a 10 KiB name", env) {
            _ = try await env.csi.createVolume(CSI.create(name: huge, access: .mount(fsType: "ext4"), required: 64 * CSI.mib))
        }
        let v = try await env.createdVolume("huge-node")
        try await refused(.invalidArgument, "ControllerPublishVolume(\(v.id)) with a 10 KiB node_id", env) {
            _ = try await env.csi.controllerPublish(CSI.controllerPublish(v.id, node: huge, access: .mount(fsType: "ext4")))
        }
    }

    // MARK: Wire-level garbage

    func testBytesThatAreNotAProtobufMessageAreInvalidArgument() async throws {
        let env = try await Env.make(self)
        for method in ["/csi.v1.Controller/CreateVolume", "/csi.v1.Node/NodeStageVolume", "/csi.v1.Node/NodePublishVolume"] {
            for (label, bytes) in [("garbage", Self.garbage), ("truncated", Self.truncated)] {
                let before = try await env.state()
                let reply = await env.csi.raw(method, bytes)
                XCTAssertEqual(reply.code, .invalidArgument,
                               "\(method) with \(label) bytes \(bytes): expected INVALID_ARGUMENT, got \(reply.code): \"\(reply.message)\"")
                let after = try await env.state()
                XCTAssertEqual(before, after, "\(method) with \(label) bytes changed the plugin's state")
            }
        }
        let probe = try await env.csi.probe()
        XCTAssertEqual(probe.ready.value, true, "the plugin must still answer after garbage")
    }

    func testUnknownMethodsAreUnimplemented() async throws {
        let env = try await Env.make(self)
        for method in ["/csi.v1.Controller/Nope", "/csi.v1.Nope/Probe", "/csi.v1.SnapshotMetadata/GetMetadataAllocated"] {
            let reply = await env.csi.raw(method, [])
            XCTAssertEqual(reply.code, .unimplemented, "\(method): expected UNIMPLEMENTED, got \(reply.code): \"\(reply.message)\"")
        }
    }

    // MARK: CreateVolume

    func testCreateVolumeWithAnUnknownParameterIsInvalidArgument() async throws {
        let env = try await Env.make(self)
        for parameters in [["replica": "1"], ["fsTyp": "ext4"], ["fsType": "btrfs"], ["replicas": "one"]] {
            try await refused(.invalidArgument, "CreateVolume with parameters \(parameters)", env) {
                _ = try await env.csi.createVolume(CSI.create(name: "params", access: .mount(fsType: ""), required: 64 * CSI.mib,
                                                              parameters: parameters))
            }
        }
    }

    func testSameNameWithAnIncompatibleCapacityIsAlreadyExists() async throws {
        let env = try await Env.make(self)
        let first = CSI.create(name: "same-name", access: .mount(fsType: "ext4"), required: 64 * CSI.mib, limit: 64 * CSI.mib)
        let created = try await must("CreateVolume \(CSI.show(first))") { try await env.csi.createVolume(first) }
        XCTAssertEqual(created.volume.capacityBytes, 64 * CSI.mib)
        let again = try await must("CreateVolume repeated") { try await env.csi.createVolume(first) }
        XCTAssertEqual(again.volume.volumeID, created.volume.volumeID, "the same CreateVolume twice must return the same volume")
        let bigger = CSI.create(name: "same-name", access: .mount(fsType: "ext4"), required: 128 * CSI.mib, limit: 128 * CSI.mib)
        try await refused(.alreadyExists, "CreateVolume \(CSI.show(bigger)) after 64 MiB", env) {
            _ = try await env.csi.createVolume(bigger)
        }
    }

    func testCapacityLimitBelowTheSmallestVolumeIsOutOfRange() async throws {
        let env = try await Env.make(self)
        try await refused(.outOfRange, "CreateVolume ext4 with limit_bytes 1 MiB", env) {
            _ = try await env.csi.createVolume(CSI.create(name: "tiny", access: .mount(fsType: "ext4"), required: 0, limit: CSI.mib))
        }
        try await refused(.outOfRange, "CreateVolume xfs with limit_bytes 200 MiB (xfs needs 300 MiB)", env) {
            _ = try await env.csi.createVolume(CSI.create(name: "tiny-xfs", access: .mount(fsType: "xfs"), required: 0, limit: 200 * CSI.mib))
        }
    }

    func testCreatingMoreThanThePoolHoldsIsResourceExhausted() async throws {
        let env = try await Env.make(self, capacity: "1Gi")
        let first = CSI.create(name: "pool-1", access: .block, required: 600 * CSI.mib)
        _ = try await must("CreateVolume 600 MiB in a 1 GiB pool") { try await env.csi.createVolume(first) }
        try await refused(.resourceExhausted, "CreateVolume another 600 MiB in a 1 GiB pool", env) {
            _ = try await env.csi.createVolume(CSI.create(name: "pool-2", access: .block, required: 600 * CSI.mib))
        }
    }

    // MARK: Helpers

    /// Checks `call` gets `expected`, and that the plugin's visible state is the same before
    /// and after; `mustNotExist` are paths the call must not create.
    func refused(_ expected: StatusCode, _ what: String, _ env: Env, mustNotExist: [String] = [],
                 file: StaticString = #filePath, line: UInt = #line, _ call: () async throws -> Void) async throws {
        try await refused(anyOf: [expected], what, env, mustNotExist: mustNotExist, file: file, line: line, call)
    }

    func refused(anyOf expected: [StatusCode], _ what: String, _ env: Env, mustNotExist: [String] = [],
                 file: StaticString = #filePath, line: UInt = #line, _ call: () async throws -> Void) async throws {
        let before = try await env.state()
        await expectStatus(anyOf: expected, what, file: file, line: line, call)
        let after = try await env.state()
        if before != after {
            XCTFail("\(what) changed the plugin's state:\n--- before\n\(before)\n--- after\n\(after)", file: file, line: line)
        }
        for path in mustNotExist where FileManager.default.fileExists(atPath: path) {
            XCTFail("\(what) created \(path)", file: file, line: line)
            _ = await PluginProcess.unmountAll(under: [path])
            _ = try? FileManager.default.removeItem(atPath: path)
        }
    }

    /// A test's plugin and the volumes it prepared.
    struct Env {
        let plugin: PluginProcess
        let csi: CSIClient
        let test: IntegrationTestCase

        static func make(_ test: IntegrationTestCase, capacity: String = "20Gi") async throws -> Env {
            let plugin = try await test.startPlugin(capacity: capacity)
            return Env(plugin: plugin, csi: CSIClient(plugin: plugin), test: test)
        }

        struct Volume {
            var id: String
            var publishContext: [String: String] = [:]
            var staging: String = ""
        }

        func createdVolume(_ name: String) async throws -> Volume {
            let v = try await csi.createVolume(CSI.create(name: name, access: .mount(fsType: "ext4"), required: 64 * CSI.mib))
            return Volume(id: v.volume.volumeID)
        }

        func publishedVolume(_ name: String) async throws -> Volume {
            var v = try await createdVolume(name)
            let published = try await csi.controllerPublish(CSI.controllerPublish(v.id, node: plugin.nodeID, access: .mount(fsType: "ext4")))
            v.publishContext = published.publishContext
            return v
        }

        func stagedVolume(_ name: String) async throws -> Volume {
            var v = try await publishedVolume(name)
            v.staging = try freshStagingDir(name)
            _ = try await csi.nodeStage(CSI.stage(v.id, staging: v.staging, access: .mount(fsType: "ext4"),
                                                  publishContext: v.publishContext))
            return v
        }

        func freshStagingDir(_ name: String) throws -> String {
            let path = plugin.stagingDir + "/" + name
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            return path
        }

        /// What a bad request must not change.
        func state() async throws -> PluginState {
            let listed = try await csi.listVolumes()
            let volumes = listed.entries.map {
                "\($0.volume.volumeID) \($0.volume.capacityBytes) published=\($0.status.publishedNodeIds.sorted())"
            }.sorted()
            let names = (try? FileManager.default.contentsOfDirectory(atPath: plugin.volumesDir)) ?? []
            let files = names.sorted().map { name -> String in
                var st = stat()
                _ = stat(plugin.volumesDir + "/" + name, &st)
                return "\(name) \(st.st_size)"
            }
            let mounts = plugin.mounts().map { "\($0.source) \($0.fsType) \($0.mountPoint) \($0.options)" }
            let loops = plugin.loopDevices().map { "\($0.device) \($0.backingFile)" }
            return PluginState(volumes: volumes, files: files, mounts: mounts, loops: loops)
        }
    }

    struct PluginState: Equatable, CustomStringConvertible {
        var volumes: [String]
        var files: [String]
        var mounts: [String]
        var loops: [String]

        var description: String {
            "volumes: \(volumes)\nfiles: \(files)\nmounts: \(mounts)\nloops: \(loops)"
        }
    }
}
