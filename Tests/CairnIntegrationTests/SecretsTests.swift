import CSIProto
import CairnCore
import Foundation
import SwiftProtobuf
import XCTest

/// CSI secrets (the `secrets` maps of CreateVolume, DeleteVolume, ControllerPublish/Unpublish,
/// ValidateVolumeCapabilities, NodeStage, NodePublish, CreateSnapshot, DeleteSnapshot,
/// ListSnapshots, ControllerExpand, NodeExpand, ControllerModify and the group snapshot calls)
/// never reach a log line, an error message or the metadata store — neither their values nor
/// their keys, on the happy path or when a request is refused.
final class SecretsTests: IntegrationTestCase {
    /// Distinctive secret keys and values, one map per request, all remembered for the search.
    struct SecretBook {
        private(set) var all: [(request: String, text: String)] = []

        static func hex(_ bytes: Int) -> String {
            (0..<bytes).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
        }

        /// A fresh secrets map for `request`: a distinctive key with a random 32-hex value, and
        /// a second entry whose value holds characters a log formatter may escape.
        mutating func next(_ request: String) -> [String: String] {
            let key = "cairn-secret-key-" + Self.hex(8)
            let value = Self.hex(16)
            let quoted = "pass \"" + Self.hex(16) + "\"\n"
            let quotedCore = String(quoted.dropFirst(6).prefix(32))
            all += [(request, key), (request, value), (request, quotedCore)]
            return [key: value, "password": quoted]
        }
    }

    /// What the plugin answered: every error message, for the search.
    final class Answers: @unchecked Sendable {
        var messages: [(method: String, message: String)] = []
    }

    func testSecretsAppearInNoLogLineErrorMessageOrStoreRecord() async throws {
        let plugin = try await startPlugin(extraArguments: ["--log-level", "trace"])
        var book = SecretBook()
        let answers = Answers()

        /// Calls `method`; records the error message. `mustSucceed`: a failure fails the test.
        func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
            _ method: String, _ request: Request, as: Response.Type, mustSucceed: Bool = false,
            file: StaticString = #filePath, line: UInt = #line
        ) async -> Response? {
            let reply = await plugin.channel.callRaw(method, try! request.serializedBytes(), timeout: .seconds(60))
            guard reply.code == .ok else {
                answers.messages.append((method, reply.message))
                if mustSucceed { XCTFail("\(method) failed: \(reply.code) \(reply.message)", file: file, line: line) }
                return nil
            }
            return try? Response(serializedBytes: reply.response)
        }
        let controller = "/csi.v1.Controller/"
        let node = "/csi.v1.Node/"
        let group = "/csi.v1.GroupController/"
        let access = Access.mount(fsType: "ext4")

        // The happy path: a volume's whole life, every request carrying secrets.
        var create = CSI.create(name: "secrets-" + SecretBook.hex(4), access: access, required: 64 * CSI.mib)
        create.secrets = book.next("CreateVolume")
        let created = await call(controller + "CreateVolume", create, as: Csi_V1_CreateVolumeResponse.self, mustSucceed: true)
        let id = try XCTUnwrap(created?.volume.volumeID)

        var validate = CSI.validate(id, access: access)
        validate.secrets = book.next("ValidateVolumeCapabilities")
        _ = await call(controller + "ValidateVolumeCapabilities", validate, as: Csi_V1_ValidateVolumeCapabilitiesResponse.self, mustSucceed: true)

        var publish = CSI.controllerPublish(id, node: plugin.nodeID, access: access)
        publish.secrets = book.next("ControllerPublishVolume")
        let published = await call(controller + "ControllerPublishVolume", publish, as: Csi_V1_ControllerPublishVolumeResponse.self, mustSucceed: true)
        let context = published?.publishContext ?? [:]

        let staging = plugin.stagingDir + "/secrets"
        let podDir = plugin.podsDir + "/secrets"
        try FileManager.default.createDirectory(atPath: staging, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: podDir, withIntermediateDirectories: true)
        var stage = CSI.stage(id, staging: staging, access: access, publishContext: context)
        stage.secrets = book.next("NodeStageVolume")
        _ = await call(node + "NodeStageVolume", stage, as: Csi_V1_NodeStageVolumeResponse.self, mustSucceed: true)
        var nodePublish = CSI.publish(id, staging: staging, target: podDir + "/target", access: access, publishContext: context)
        nodePublish.secrets = book.next("NodePublishVolume")
        _ = await call(node + "NodePublishVolume", nodePublish, as: Csi_V1_NodePublishVolumeResponse.self, mustSucceed: true)

        let expand = Csi_V1_ControllerExpandVolumeRequest.with {
            $0.volumeID = id; $0.capacityRange.requiredBytes = 96 * CSI.mib; $0.volumeCapability = CSI.capability(access)
            $0.secrets = book.next("ControllerExpandVolume")
        }
        _ = await call(controller + "ControllerExpandVolume", expand, as: Csi_V1_ControllerExpandVolumeResponse.self, mustSucceed: true)
        let nodeExpand = Csi_V1_NodeExpandVolumeRequest.with {
            $0.volumeID = id; $0.volumePath = podDir + "/target"; $0.capacityRange.requiredBytes = 96 * CSI.mib
            $0.volumeCapability = CSI.capability(access); $0.stagingTargetPath = staging
            $0.secrets = book.next("NodeExpandVolume")
        }
        // May be refused where the process lacks CAP_SYS_RESOURCE (online ext4 resize): either way it ran.
        _ = await call(node + "NodeExpandVolume", nodeExpand, as: Csi_V1_NodeExpandVolumeResponse.self)
        // One machine has no engine for QoS limits: refused, with the secrets in the request.
        let modify = Csi_V1_ControllerModifyVolumeRequest.with {
            $0.volumeID = id; $0.mutableParameters = ["iops": "100"]; $0.secrets = book.next("ControllerModifyVolume")
        }
        _ = await call(controller + "ControllerModifyVolume", modify, as: Csi_V1_ControllerModifyVolumeResponse.self)

        var snapshot = CSI.snapshot(id, name: "secrets-snap-" + SecretBook.hex(4))
        snapshot.secrets = book.next("CreateSnapshot")
        let snap = await call(controller + "CreateSnapshot", snapshot, as: Csi_V1_CreateSnapshotResponse.self, mustSucceed: true)
        let list = Csi_V1_ListSnapshotsRequest.with { $0.sourceVolumeID = id; $0.secrets = book.next("ListSnapshots") }
        _ = await call(controller + "ListSnapshots", list, as: Csi_V1_ListSnapshotsResponse.self, mustSucceed: true)
        let getSnapshot = Csi_V1_GetSnapshotRequest.with { $0.snapshotID = snap?.snapshot.snapshotID ?? ""; $0.secrets = book.next("GetSnapshot") }
        _ = await call(controller + "GetSnapshot", getSnapshot, as: Csi_V1_GetSnapshotResponse.self)
        let deleteSnapshot = Csi_V1_DeleteSnapshotRequest.with {
            $0.snapshotID = snap?.snapshot.snapshotID ?? ""; $0.secrets = book.next("DeleteSnapshot")
        }
        _ = await call(controller + "DeleteSnapshot", deleteSnapshot, as: Csi_V1_DeleteSnapshotResponse.self, mustSucceed: true)

        let createGroup = Csi_V1_CreateVolumeGroupSnapshotRequest.with {
            $0.name = "secrets-group-" + SecretBook.hex(4); $0.sourceVolumeIds = [id]; $0.secrets = book.next("CreateVolumeGroupSnapshot")
        }
        let madeGroup = await call(group + "CreateVolumeGroupSnapshot", createGroup, as: Csi_V1_CreateVolumeGroupSnapshotResponse.self,
                                   mustSucceed: true)
        let groupID = madeGroup?.groupSnapshot.groupSnapshotID ?? ""
        let memberIDs = madeGroup?.groupSnapshot.snapshots.map(\.snapshotID) ?? []
        let getGroup = Csi_V1_GetVolumeGroupSnapshotRequest.with {
            $0.groupSnapshotID = groupID; $0.snapshotIds = memberIDs; $0.secrets = book.next("GetVolumeGroupSnapshot")
        }
        _ = await call(group + "GetVolumeGroupSnapshot", getGroup, as: Csi_V1_GetVolumeGroupSnapshotResponse.self, mustSucceed: true)
        let deleteGroup = Csi_V1_DeleteVolumeGroupSnapshotRequest.with {
            $0.groupSnapshotID = groupID; $0.snapshotIds = memberIDs; $0.secrets = book.next("DeleteVolumeGroupSnapshot")
        }
        _ = await call(group + "DeleteVolumeGroupSnapshot", deleteGroup, as: Csi_V1_DeleteVolumeGroupSnapshotResponse.self, mustSucceed: true)

        _ = await call(node + "NodeUnpublishVolume", CSI.unpublish(id, target: podDir + "/target"), as: Csi_V1_NodeUnpublishVolumeResponse.self,
                       mustSucceed: true)
        _ = await call(node + "NodeUnstageVolume", CSI.unstage(id, staging: staging), as: Csi_V1_NodeUnstageVolumeResponse.self, mustSucceed: true)
        var unpublish = CSI.controllerUnpublish(id, node: plugin.nodeID)
        unpublish.secrets = book.next("ControllerUnpublishVolume")
        _ = await call(controller + "ControllerUnpublishVolume", unpublish, as: Csi_V1_ControllerUnpublishVolumeResponse.self, mustSucceed: true)
        var delete = CSI.delete(id)
        delete.secrets = book.next("DeleteVolume")
        _ = await call(controller + "DeleteVolume", delete, as: Csi_V1_DeleteVolumeResponse.self, mustSucceed: true)

        // Refusals: every secrets-carrying request with a bad argument, so the error paths run.
        let before = answers.messages.count
        let bad = "bad/../id"
        var badCreate = CSI.create(name: "secrets-bad", access: .mount(fsType: "btrfs"), required: 64 * CSI.mib)
        badCreate.secrets = book.next("CreateVolume (bad fs_type)")
        _ = await call(controller + "CreateVolume", badCreate, as: Csi_V1_CreateVolumeResponse.self)
        var badParameters = CSI.create(name: "secrets-bad", access: access, required: 64 * CSI.mib, parameters: ["fstype": "ext4"])
        badParameters.secrets = book.next("CreateVolume (unknown parameter)")
        _ = await call(controller + "CreateVolume", badParameters, as: Csi_V1_CreateVolumeResponse.self)
        var badDelete = CSI.delete(bad)
        badDelete.secrets = book.next("DeleteVolume (bad id)")
        _ = await call(controller + "DeleteVolume", badDelete, as: Csi_V1_DeleteVolumeResponse.self)
        var badPublish = CSI.controllerPublish(bad, node: plugin.nodeID, access: access)
        badPublish.secrets = book.next("ControllerPublishVolume (bad id)")
        _ = await call(controller + "ControllerPublishVolume", badPublish, as: Csi_V1_ControllerPublishVolumeResponse.self)
        var missingPublish = CSI.controllerPublish("vol-does-not-exist", node: plugin.nodeID, access: access)
        missingPublish.secrets = book.next("ControllerPublishVolume (no such volume)")
        _ = await call(controller + "ControllerPublishVolume", missingPublish, as: Csi_V1_ControllerPublishVolumeResponse.self)
        var badUnpublish = CSI.controllerUnpublish(bad, node: plugin.nodeID)
        badUnpublish.secrets = book.next("ControllerUnpublishVolume (bad id)")
        _ = await call(controller + "ControllerUnpublishVolume", badUnpublish, as: Csi_V1_ControllerUnpublishVolumeResponse.self)
        var badValidate = CSI.validate(bad, access: nil)
        badValidate.secrets = book.next("ValidateVolumeCapabilities (bad id)")
        _ = await call(controller + "ValidateVolumeCapabilities", badValidate, as: Csi_V1_ValidateVolumeCapabilitiesResponse.self)
        var badStage = CSI.stage(bad, staging: "relative/path", access: nil)
        badStage.secrets = book.next("NodeStageVolume (bad id)")
        _ = await call(node + "NodeStageVolume", badStage, as: Csi_V1_NodeStageVolumeResponse.self)
        var missingStage = CSI.stage("vol-does-not-exist", staging: staging, access: access)
        missingStage.secrets = book.next("NodeStageVolume (no such volume)")
        _ = await call(node + "NodeStageVolume", missingStage, as: Csi_V1_NodeStageVolumeResponse.self)
        var badNodePublish = CSI.publish(bad, staging: staging, target: "/etc/outside", access: access)
        badNodePublish.secrets = book.next("NodePublishVolume (bad id)")
        _ = await call(node + "NodePublishVolume", badNodePublish, as: Csi_V1_NodePublishVolumeResponse.self)
        var outsidePublish = CSI.publish("vol-does-not-exist", staging: staging, target: "/etc/outside", access: access)
        outsidePublish.secrets = book.next("NodePublishVolume (target outside the roots)")
        _ = await call(node + "NodePublishVolume", outsidePublish, as: Csi_V1_NodePublishVolumeResponse.self)
        let badExpand = Csi_V1_ControllerExpandVolumeRequest.with {
            $0.volumeID = "vol-does-not-exist"; $0.capacityRange.requiredBytes = -1; $0.secrets = book.next("ControllerExpandVolume (bad size)")
        }
        _ = await call(controller + "ControllerExpandVolume", badExpand, as: Csi_V1_ControllerExpandVolumeResponse.self)
        let badNodeExpand = Csi_V1_NodeExpandVolumeRequest.with {
            $0.volumeID = bad; $0.volumePath = ""; $0.secrets = book.next("NodeExpandVolume (bad id)")
        }
        _ = await call(node + "NodeExpandVolume", badNodeExpand, as: Csi_V1_NodeExpandVolumeResponse.self)
        var badSnapshot = CSI.snapshot(bad, name: "")
        badSnapshot.secrets = book.next("CreateSnapshot (bad source)")
        _ = await call(controller + "CreateSnapshot", badSnapshot, as: Csi_V1_CreateSnapshotResponse.self)
        var missingSnapshot = CSI.snapshot("vol-does-not-exist", name: "secrets-snap-missing")
        missingSnapshot.secrets = book.next("CreateSnapshot (no such volume)")
        _ = await call(controller + "CreateSnapshot", missingSnapshot, as: Csi_V1_CreateSnapshotResponse.self)
        let badDeleteSnapshot = Csi_V1_DeleteSnapshotRequest.with { $0.snapshotID = ""; $0.secrets = book.next("DeleteSnapshot (no id)") }
        _ = await call(controller + "DeleteSnapshot", badDeleteSnapshot, as: Csi_V1_DeleteSnapshotResponse.self)
        let badList = Csi_V1_ListSnapshotsRequest.with { $0.startingToken = "not-a-token"; $0.secrets = book.next("ListSnapshots (bad token)") }
        _ = await call(controller + "ListSnapshots", badList, as: Csi_V1_ListSnapshotsResponse.self)
        let badModify = Csi_V1_ControllerModifyVolumeRequest.with {
            $0.volumeID = bad; $0.mutableParameters = ["nonsense": "1"]; $0.secrets = book.next("ControllerModifyVolume (bad id)")
        }
        _ = await call(controller + "ControllerModifyVolume", badModify, as: Csi_V1_ControllerModifyVolumeResponse.self)
        let badGroup = Csi_V1_CreateVolumeGroupSnapshotRequest.with {
            $0.name = "secrets-group-bad"; $0.sourceVolumeIds = [bad]; $0.secrets = book.next("CreateVolumeGroupSnapshot (bad id)")
        }
        _ = await call(group + "CreateVolumeGroupSnapshot", badGroup, as: Csi_V1_CreateVolumeGroupSnapshotResponse.self)
        let badDeleteGroup = Csi_V1_DeleteVolumeGroupSnapshotRequest.with {
            $0.groupSnapshotID = "group-does-not-exist"; $0.snapshotIds = ["x"]; $0.secrets = book.next("DeleteVolumeGroupSnapshot (no such group)")
        }
        _ = await call(group + "DeleteVolumeGroupSnapshot", badDeleteGroup, as: Csi_V1_DeleteVolumeGroupSnapshotResponse.self)
        // A request that does not decode: a CreateVolume with secrets, cut short inside them.
        var cut = CSI.create(name: "secrets-cut", access: access, required: 64 * CSI.mib)
        cut.secrets = book.next("CreateVolume (truncated message)")
        let cutBytes: [UInt8] = try cut.serializedBytes()
        let undecodable = await plugin.channel.callRaw(controller + "CreateVolume", Array(cutBytes.dropLast(3)), timeout: .seconds(30))
        answers.messages.append((controller + "CreateVolume (truncated)", undecodable.message))
        XCTAssertEqual(undecodable.code, .invalidArgument, "a truncated CreateVolume: \(undecodable.message)")
        XCTAssertGreaterThanOrEqual(answers.messages.count - before, 20, "every bad request must be refused")

        // The search: every log line, every error message, every byte of the store.
        let log = try String(contentsOfFile: plugin.logPath, encoding: .utf8)
        XCTAssert(log.contains("level=debug"), "the plugin must have logged at debug level and below for this test to mean anything")
        let storeFiles = try FileManager.default.contentsOfDirectory(atPath: plugin.dataDir).filter { $0.hasPrefix("cairn.db") }
        XCTAssert(storeFiles.contains("cairn.db"), "no store in \(plugin.dataDir): \(storeFiles)")
        let store = try storeFiles.map { try Data(contentsOf: URL(fileURLWithPath: plugin.dataDir + "/" + $0)) }
        for (request, secret) in book.all {
            for line in log.split(separator: "\n") where line.contains(secret) {
                XCTFail("the secret of \(request) is in the plugin's log: \(line)")
            }
            for (method, message) in answers.messages where message.contains(secret) {
                XCTFail("the secret of \(request) is in the error \(method) returned: \(message)")
            }
            for (file, bytes) in zip(storeFiles, store) where bytes.range(of: Data(secret.utf8)) != nil {
                XCTFail("the secret of \(request) is in the store's \(file)")
            }
        }
    }
}
