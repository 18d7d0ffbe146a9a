import CSIProto
import CairnCSI
import CairnCore
import CairnProcess
import CairnRPC
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Base class: starts real plugins for a test and always tears them down (stop, unmount, detach
/// loop devices, remove the directory), printing cairn.log's tail when the test failed.
class IntegrationTestCase: XCTestCase {
    private var plugins: [PluginProcess] = []

    /// Starts a plugin for this test. Skips the test when not root (mount and losetup need it).
    /// `beforeStart` prepares the plugin's directories (e.g. mounts a filesystem at its data
    /// directory); whatever it mounts or attaches under `root` is removed by the tear-down.
    func startPlugin(capacity: String = "20Gi", extraArguments: [String] = [], nodeID: String = "it-node",
                     launch: PluginProcess.Launch = .flags, launchPrefix: [String] = [],
                     beforeStart: ((PluginProcess) throws -> Void)? = nil) async throws -> PluginProcess {
        if getuid() != 0 {
            throw XCTSkip("integration tests mount filesystems and attach loop devices: run them as root")
        }
        let plugin = try PluginProcess(capacity: capacity, nodeID: nodeID, extraArguments: extraArguments, launch: launch,
                                       launchPrefix: launchPrefix)
        plugins.append(plugin)  // before start(): tearDown cleans up even if the start fails
        try beforeStart?(plugin)
        try await plugin.start()
        return plugin
    }

    override func tearDown() async throws {
        // hasSucceeded is false until the run stops, which is after tearDown: count failures instead.
        let failed = (testRun?.totalFailureCount ?? 0) > 0
        let toClean = plugins
        plugins = []
        for plugin in toClean.reversed() {
            let problems = await plugin.tearDown(testFailed: failed)
            for problem in problems { XCTFail("cleanup of \(plugin.root): \(problem)") }
        }
        try await super.tearDown()
    }

    // MARK: Expectations

    /// Runs `call` and checks it fails with `expected` (or succeeds when `expected` is `.ok`).
    /// Returns the status received. The failure message says what was sent and what came back.
    @discardableResult
    func expectStatus(_ expected: StatusCode, _ what: @autoclosure () -> String,
                      file: StaticString = #filePath, line: UInt = #line,
                      _ call: () async throws -> Void) async -> (code: StatusCode, message: String) {
        await expectStatus(anyOf: [expected], what(), file: file, line: line, call)
    }

    @discardableResult
    func expectStatus(anyOf expected: [StatusCode], _ what: @autoclosure () -> String,
                      file: StaticString = #filePath, line: UInt = #line,
                      _ call: () async throws -> Void) async -> (code: StatusCode, message: String) {
        let got: (code: StatusCode, message: String)
        do {
            try await call()
            got = (.ok, "")
        } catch let error as CairnError {
            got = (error.code, error.message)
        } catch {
            XCTFail("\(what()): expected \(expected.map(\.description).joined(separator: " or ")), got a client-side error \(error)",
                    file: file, line: line)
            return (.unknown, "\(error)")
        }
        if !expected.contains(got.code) {
            XCTFail("\(what()): expected \(expected.map(\.description).joined(separator: " or ")), got \(got.code): \"\(got.message)\"",
                    file: file, line: line)
        }
        return got
    }

    /// Succeeds or fails the test with the status, naming the call.
    func must<T>(_ what: @autoclosure () -> String, file: StaticString = #filePath, line: UInt = #line,
                 _ call: () async throws -> T) async throws -> T {
        do {
            return try await call()
        } catch let error as CairnError {
            XCTFail("\(what()): expected OK, got \(error.code): \"\(error.message)\"", file: file, line: line)
            throw error
        }
    }

    func assertNoLeftovers(_ plugin: PluginProcess, _ when: String, file: StaticString = #filePath, line: UInt = #line) {
        let left = plugin.leftovers()
        XCTAssert(left.isEmpty, "\(when): the plugin left behind:\n  " + left.joined(separator: "\n  "), file: file, line: line)
    }
}

// MARK: - A typed client

/// The CSI calls the tests make, on the plugin's current channel (a new one after a restart).
struct CSIClient: Sendable {
    /// The channel each call goes out on: the plugin's current one, or a fixed endpoint's.
    let channel: @Sendable () -> GRPCChannel

    init(plugin: PluginProcess) {
        channel = { plugin.channel }
    }

    /// A client of one endpoint (e.g. a test bed node's socket).
    init(endpoint: String) {
        let fixed = GRPCChannel(target: endpoint)
        channel = { fixed }
    }

    func probe() async throws -> Csi_V1_ProbeResponse {
        try await channel().call("/csi.v1.Identity/Probe", Csi_V1_ProbeRequest(), as: Csi_V1_ProbeResponse.self)
    }
    func getPluginInfo() async throws -> Csi_V1_GetPluginInfoResponse {
        try await channel().call("/csi.v1.Identity/GetPluginInfo", Csi_V1_GetPluginInfoRequest(), as: Csi_V1_GetPluginInfoResponse.self)
    }
    func getPluginCapabilities() async throws -> Csi_V1_GetPluginCapabilitiesResponse {
        try await channel().call("/csi.v1.Identity/GetPluginCapabilities", Csi_V1_GetPluginCapabilitiesRequest(),
                                 as: Csi_V1_GetPluginCapabilitiesResponse.self)
    }
    func controllerGetCapabilities() async throws -> Csi_V1_ControllerGetCapabilitiesResponse {
        try await channel().call("/csi.v1.Controller/ControllerGetCapabilities", Csi_V1_ControllerGetCapabilitiesRequest(),
                                 as: Csi_V1_ControllerGetCapabilitiesResponse.self)
    }
    func nodeGetCapabilities() async throws -> Csi_V1_NodeGetCapabilitiesResponse {
        try await channel().call("/csi.v1.Node/NodeGetCapabilities", Csi_V1_NodeGetCapabilitiesRequest(),
                                 as: Csi_V1_NodeGetCapabilitiesResponse.self)
    }
    func nodeGetInfo() async throws -> Csi_V1_NodeGetInfoResponse {
        try await channel().call("/csi.v1.Node/NodeGetInfo", Csi_V1_NodeGetInfoRequest(), as: Csi_V1_NodeGetInfoResponse.self)
    }
    func getCapacity(_ r: Csi_V1_GetCapacityRequest) async throws -> Csi_V1_GetCapacityResponse {
        try await channel().call("/csi.v1.Controller/GetCapacity", r, as: Csi_V1_GetCapacityResponse.self)
    }
    func createVolume(_ r: Csi_V1_CreateVolumeRequest) async throws -> Csi_V1_CreateVolumeResponse {
        try await channel().call("/csi.v1.Controller/CreateVolume", r, as: Csi_V1_CreateVolumeResponse.self)
    }
    func deleteVolume(_ r: Csi_V1_DeleteVolumeRequest) async throws -> Csi_V1_DeleteVolumeResponse {
        try await channel().call("/csi.v1.Controller/DeleteVolume", r, as: Csi_V1_DeleteVolumeResponse.self)
    }
    func controllerPublish(_ r: Csi_V1_ControllerPublishVolumeRequest) async throws -> Csi_V1_ControllerPublishVolumeResponse {
        try await channel().call("/csi.v1.Controller/ControllerPublishVolume", r, as: Csi_V1_ControllerPublishVolumeResponse.self)
    }
    func controllerUnpublish(_ r: Csi_V1_ControllerUnpublishVolumeRequest) async throws -> Csi_V1_ControllerUnpublishVolumeResponse {
        try await channel().call("/csi.v1.Controller/ControllerUnpublishVolume", r, as: Csi_V1_ControllerUnpublishVolumeResponse.self)
    }
    func validateVolumeCapabilities(_ r: Csi_V1_ValidateVolumeCapabilitiesRequest) async throws -> Csi_V1_ValidateVolumeCapabilitiesResponse {
        try await channel().call("/csi.v1.Controller/ValidateVolumeCapabilities", r, as: Csi_V1_ValidateVolumeCapabilitiesResponse.self)
    }
    func listVolumes(_ r: Csi_V1_ListVolumesRequest = Csi_V1_ListVolumesRequest()) async throws -> Csi_V1_ListVolumesResponse {
        try await channel().call("/csi.v1.Controller/ListVolumes", r, as: Csi_V1_ListVolumesResponse.self)
    }
    func controllerGetVolume(_ r: Csi_V1_ControllerGetVolumeRequest) async throws -> Csi_V1_ControllerGetVolumeResponse {
        try await channel().call("/csi.v1.Controller/ControllerGetVolume", r, as: Csi_V1_ControllerGetVolumeResponse.self)
    }
    func nodeStage(_ r: Csi_V1_NodeStageVolumeRequest) async throws -> Csi_V1_NodeStageVolumeResponse {
        try await channel().call("/csi.v1.Node/NodeStageVolume", r, as: Csi_V1_NodeStageVolumeResponse.self)
    }
    func nodeUnstage(_ r: Csi_V1_NodeUnstageVolumeRequest) async throws -> Csi_V1_NodeUnstageVolumeResponse {
        try await channel().call("/csi.v1.Node/NodeUnstageVolume", r, as: Csi_V1_NodeUnstageVolumeResponse.self)
    }
    func nodePublish(_ r: Csi_V1_NodePublishVolumeRequest) async throws -> Csi_V1_NodePublishVolumeResponse {
        try await channel().call("/csi.v1.Node/NodePublishVolume", r, as: Csi_V1_NodePublishVolumeResponse.self)
    }
    func nodeUnpublish(_ r: Csi_V1_NodeUnpublishVolumeRequest) async throws -> Csi_V1_NodeUnpublishVolumeResponse {
        try await channel().call("/csi.v1.Node/NodeUnpublishVolume", r, as: Csi_V1_NodeUnpublishVolumeResponse.self)
    }
    func nodeGetVolumeStats(_ r: Csi_V1_NodeGetVolumeStatsRequest) async throws -> Csi_V1_NodeGetVolumeStatsResponse {
        try await channel().call("/csi.v1.Node/NodeGetVolumeStats", r, as: Csi_V1_NodeGetVolumeStatsResponse.self)
    }
    func createSnapshot(_ r: Csi_V1_CreateSnapshotRequest) async throws -> Csi_V1_CreateSnapshotResponse {
        try await channel().call("/csi.v1.Controller/CreateSnapshot", r, as: Csi_V1_CreateSnapshotResponse.self)
    }
    func deleteSnapshot(_ id: String) async throws {
        _ = try await channel().call("/csi.v1.Controller/DeleteSnapshot", Csi_V1_DeleteSnapshotRequest.with { $0.snapshotID = id },
                                     as: Csi_V1_DeleteSnapshotResponse.self)
    }
    func getSnapshot(_ id: String) async throws -> Csi_V1_GetSnapshotResponse {
        try await channel().call("/csi.v1.Controller/GetSnapshot", Csi_V1_GetSnapshotRequest.with { $0.snapshotID = id },
                                 as: Csi_V1_GetSnapshotResponse.self)
    }
    func listSnapshots(_ r: Csi_V1_ListSnapshotsRequest = Csi_V1_ListSnapshotsRequest()) async throws -> Csi_V1_ListSnapshotsResponse {
        try await channel().call("/csi.v1.Controller/ListSnapshots", r, as: Csi_V1_ListSnapshotsResponse.self)
    }
    func controllerExpand(_ id: String, bytes: Int64) async throws -> Csi_V1_ControllerExpandVolumeResponse {
        try await channel().call("/csi.v1.Controller/ControllerExpandVolume",
                                 Csi_V1_ControllerExpandVolumeRequest.with { $0.volumeID = id; $0.capacityRange.requiredBytes = bytes },
                                 as: Csi_V1_ControllerExpandVolumeResponse.self)
    }
    func nodeExpand(_ id: String, path: String, bytes: Int64) async throws -> Csi_V1_NodeExpandVolumeResponse {
        try await channel().call("/csi.v1.Node/NodeExpandVolume",
                                 Csi_V1_NodeExpandVolumeRequest.with { $0.volumeID = id; $0.volumePath = path; $0.capacityRange.requiredBytes = bytes },
                                 as: Csi_V1_NodeExpandVolumeResponse.self)
    }
    func controllerModify(_ id: String, _ parameters: [String: String]) async throws {
        _ = try await channel().call("/csi.v1.Controller/ControllerModifyVolume",
                                     Csi_V1_ControllerModifyVolumeRequest.with { $0.volumeID = id; $0.mutableParameters = parameters },
                                     as: Csi_V1_ControllerModifyVolumeResponse.self)
    }
    func createGroupSnapshot(name: String, volumes: [String]) async throws -> Csi_V1_CreateVolumeGroupSnapshotResponse {
        try await channel().call("/csi.v1.GroupController/CreateVolumeGroupSnapshot",
                                 Csi_V1_CreateVolumeGroupSnapshotRequest.with { $0.name = name; $0.sourceVolumeIds = volumes },
                                 as: Csi_V1_CreateVolumeGroupSnapshotResponse.self)
    }
    func deleteGroupSnapshot(_ id: String) async throws {
        _ = try await channel().call("/csi.v1.GroupController/DeleteVolumeGroupSnapshot",
                                     Csi_V1_DeleteVolumeGroupSnapshotRequest.with { $0.groupSnapshotID = id },
                                     as: Csi_V1_DeleteVolumeGroupSnapshotResponse.self)
    }
    func raw(_ method: String, _ bytes: [UInt8]) async -> (code: StatusCode, message: String, response: [UInt8]) {
        await channel().callRaw(method, bytes, timeout: .seconds(30))
    }
}

// MARK: - Requests

enum Access: Sendable, CustomStringConvertible {
    case mount(fsType: String)
    case block

    var description: String {
        switch self {
        case .mount(let fs): "mount(\(fs.isEmpty ? "default" : fs))"
        case .block: "block"
        }
    }

    /// For volume names and paths.
    var slug: String {
        switch self {
        case .mount(let fs): fs.isEmpty ? "mount" : fs
        case .block: "block"
        }
    }
}

enum CSI {
    static let mib: Int64 = 1 << 20

    static func capability(_ access: Access, mode: Csi_V1_VolumeCapability.AccessMode.Mode = .singleNodeWriter) -> Csi_V1_VolumeCapability {
        var capability = Csi_V1_VolumeCapability()
        switch access {
        case .mount(let fs):
            var mount = Csi_V1_VolumeCapability.MountVolume()
            mount.fsType = fs
            capability.mount = mount
        case .block:
            capability.block = Csi_V1_VolumeCapability.BlockVolume()
        }
        var accessMode = Csi_V1_VolumeCapability.AccessMode()
        accessMode.mode = mode
        capability.accessMode = accessMode
        return capability
    }

    static func create(name: String, access: Access, required: Int64, limit: Int64 = 0,
                       parameters: [String: String] = [:]) -> Csi_V1_CreateVolumeRequest {
        var r = Csi_V1_CreateVolumeRequest()
        r.name = name
        r.volumeCapabilities = [capability(access)]
        var range = Csi_V1_CapacityRange()
        range.requiredBytes = required
        range.limitBytes = limit
        r.capacityRange = range
        r.parameters = parameters
        return r
    }

    /// CreateVolume with a content source: a snapshot id, or a volume id with `fromVolume`.
    static func create(name: String, access: Access, required: Int64, from source: String, fromVolume: Bool = false,
                       parameters: [String: String] = [:]) -> Csi_V1_CreateVolumeRequest {
        var r = create(name: name, access: access, required: required, parameters: parameters)
        if fromVolume {
            r.volumeContentSource.volume.volumeID = source
        } else {
            r.volumeContentSource.snapshot.snapshotID = source
        }
        return r
    }

    static func snapshot(_ volumeID: String, name: String) -> Csi_V1_CreateSnapshotRequest {
        .with { $0.sourceVolumeID = volumeID; $0.name = name }
    }

    static func delete(_ id: String) -> Csi_V1_DeleteVolumeRequest {
        var r = Csi_V1_DeleteVolumeRequest()
        r.volumeID = id
        return r
    }

    static func controllerPublish(_ id: String, node: String, access: Access?, readonly: Bool = false,
                                  context: [String: String] = [:]) -> Csi_V1_ControllerPublishVolumeRequest {
        var r = Csi_V1_ControllerPublishVolumeRequest()
        r.volumeID = id
        r.nodeID = node
        if let access { r.volumeCapability = capability(access) }
        r.readonly = readonly
        r.volumeContext = context
        return r
    }

    static func controllerUnpublish(_ id: String, node: String) -> Csi_V1_ControllerUnpublishVolumeRequest {
        var r = Csi_V1_ControllerUnpublishVolumeRequest()
        r.volumeID = id
        r.nodeID = node
        return r
    }

    static func validate(_ id: String, access: Access?) -> Csi_V1_ValidateVolumeCapabilitiesRequest {
        var r = Csi_V1_ValidateVolumeCapabilitiesRequest()
        r.volumeID = id
        if let access { r.volumeCapabilities = [capability(access)] }
        return r
    }

    static func getVolume(_ id: String) -> Csi_V1_ControllerGetVolumeRequest {
        var r = Csi_V1_ControllerGetVolumeRequest()
        r.volumeID = id
        return r
    }

    static func stage(_ id: String, staging: String, access: Access?, publishContext: [String: String] = [:],
                      volumeContext: [String: String] = [:]) -> Csi_V1_NodeStageVolumeRequest {
        var r = Csi_V1_NodeStageVolumeRequest()
        r.volumeID = id
        r.stagingTargetPath = staging
        if let access { r.volumeCapability = capability(access) }
        r.publishContext = publishContext
        r.volumeContext = volumeContext
        return r
    }

    static func unstage(_ id: String, staging: String) -> Csi_V1_NodeUnstageVolumeRequest {
        var r = Csi_V1_NodeUnstageVolumeRequest()
        r.volumeID = id
        r.stagingTargetPath = staging
        return r
    }

    static func publish(_ id: String, staging: String, target: String, access: Access?, readonly: Bool = false,
                        publishContext: [String: String] = [:], volumeContext: [String: String] = [:]) -> Csi_V1_NodePublishVolumeRequest {
        var r = Csi_V1_NodePublishVolumeRequest()
        r.volumeID = id
        r.stagingTargetPath = staging
        r.targetPath = target
        if let access { r.volumeCapability = capability(access) }
        r.readonly = readonly
        r.publishContext = publishContext
        r.volumeContext = volumeContext
        return r
    }

    static func unpublish(_ id: String, target: String) -> Csi_V1_NodeUnpublishVolumeRequest {
        var r = Csi_V1_NodeUnpublishVolumeRequest()
        r.volumeID = id
        r.targetPath = target
        return r
    }

    static func stats(_ id: String, path: String) -> Csi_V1_NodeGetVolumeStatsRequest {
        var r = Csi_V1_NodeGetVolumeStatsRequest()
        r.volumeID = id
        r.volumePath = path
        return r
    }

    /// A compact rendering of a request for failure messages.
    static func show(_ message: Any) -> String {
        let text = String(describing: message)
            .split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: " ")
        return text.count > 400 ? String(text.prefix(400)) + "…" : text
    }
}

// MARK: - Reading and writing volumes the way an application would

enum VolumeIO {
    static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    /// Creates (or replaces) a file with `bytes`, fsyncs it and its directory.
    static func writeFile(_ path: String, _ bytes: [UInt8]) throws {
        let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FixtureError("open \(path) for writing: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        try writeAll(fd, bytes, at: nil, path: path)
        guard fsync(fd) == 0 else { throw FixtureError("fsync \(path): \(String(cString: strerror(errno)))") }
        let dir = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 { _ = fsync(dir); close(dir) }
    }

    static func readFile(_ path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FixtureError("cannot read \(path) (exists: \(FileManager.default.fileExists(atPath: path)))")
        }
        return [UInt8](data)
    }

    /// pwrite + fsync on a block device (no O_DIRECT: the point is what an ordinary writer sees).
    static func writeDevice(_ path: String, at offset: Int64, _ bytes: [UInt8]) throws {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("open \(path) read-write: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        try writeAll(fd, bytes, at: offset, path: path)
        guard fsync(fd) == 0 else { throw FixtureError("fsync \(path): \(String(cString: strerror(errno)))") }
    }

    static func readDevice(_ path: String, at offset: Int64, count: Int) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FixtureError("open \(path) read-only: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw FixtureError("pread \(path) at \(offset + Int64(done)): \(n == 0 ? "end of device" : String(cString: strerror(errno)))") }
            done += n
        }
        return buffer
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], at offset: Int64?, path: String) throws {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { buffer -> Int in
                let base = buffer.baseAddress! + done
                if let offset { return pwrite(fd, base, bytes.count - done, off_t(offset) + off_t(done)) }
                return write(fd, base, bytes.count - done)
            }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw FixtureError("write \(path): \(String(cString: strerror(errno)))") }
            done += n
        }
    }

    /// The filesystem UUID on a device (`blkid -p`), or nil when it has none.
    static func filesystemUUID(_ device: String) async throws -> String? {
        let result = try await Command.run(["blkid", "-p", "-o", "value", "-s", "UUID", device])
        let uuid = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        return result.status == 0 && !uuid.isEmpty ? uuid : nil
    }
}
