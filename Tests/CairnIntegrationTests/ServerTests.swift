import CSIProto
import CairnCore
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The process and its endpoint: socket permissions, concurrency on one volume, shutdown.
final class ServerTests: IntegrationTestCase {
    func testTheSocketIsNotAccessibleToOthers() async throws {
        let plugin = try await startPlugin()
        var st = stat()
        XCTAssertEqual(lstat(plugin.socketPath, &st), 0, "lstat \(plugin.socketPath): \(String(cString: strerror(errno)))")
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFSOCK, "\(plugin.socketPath) must be a socket")
        let mode = st.st_mode & 0o7777
        XCTAssertEqual(mode & ~0o660, 0, "the socket's mode is \(String(mode, radix: 8)); it must be 0660 or stricter")
    }

    func testConcurrentCreateVolumeWithOneNameMakesExactlyOneVolume() async throws {
        let plugin = try await startPlugin()
        let csi = CSIClient(plugin: plugin)
        let request = CSI.create(name: "concurrent", access: .mount(fsType: "ext4"), required: 64 * CSI.mib)

        let outcomes = await withTaskGroup(of: (StatusCode, String).self) { group in
            for _ in 0..<8 {
                group.addTask {
                    do {
                        return (.ok, try await csi.createVolume(request).volume.volumeID)
                    } catch let error as CairnError {
                        return (error.code, error.message)
                    } catch {
                        return (.unknown, "\(error)")
                    }
                }
            }
            var all: [(StatusCode, String)] = []
            for await outcome in group { all.append(outcome) }
            return all
        }

        let ids = Set(outcomes.filter { $0.0 == .ok }.map(\.1))
        let unexpected = outcomes.filter { $0.0 != .ok && $0.0 != .aborted }
        XCTAssert(unexpected.isEmpty, "concurrent CreateVolume: only OK or ABORTED are allowed; got \(unexpected.map { "\($0.0): \($0.1)" })")
        XCTAssertEqual(ids.count, 1, "every OK must carry the same volume id; got \(ids.sorted())")

        let listed = try await csi.listVolumes()
        XCTAssertEqual(listed.entries.count, 1, "exactly one volume must exist; ListVolumes: \(listed.entries.map(\.volume.volumeID))")
        let files = try FileManager.default.contentsOfDirectory(atPath: plugin.volumesDir).filter { $0.hasSuffix(".img") }
        XCTAssertEqual(files.count, 1, "exactly one backing file must exist; found \(files)")

        // And a retry after the storm returns that volume.
        let retry = try await must("CreateVolume retried after the concurrent calls") { try await csi.createVolume(request) }
        if let id = ids.first { XCTAssertEqual(retry.volume.volumeID, id) }
    }

    func testSIGTERMWhileIdleExitsZeroWithinTheGracePeriod() async throws {
        let plugin = try await startPlugin()
        _ = try await CSIClient(plugin: plugin).probe()
        let stopped = await plugin.stop()
        let exit = try XCTUnwrap(stopped, "the plugin was not running")
        XCTAssertFalse(exit.killed, "cairn ignored SIGTERM for \(PluginProcess.stopGrace) and had to be killed")
        XCTAssertFalse(exit.bySignal, "cairn died of signal \(exit.status) instead of exiting on SIGTERM")
        XCTAssertEqual(exit.status, 0, "cairn must exit 0 after a graceful stop; \(exit)")
        XCTAssertLessThan(exit.seconds, 10, "an idle cairn must stop well within its 10 s shutdown grace; \(exit)")
        // A second start on the same directory works (a stale socket must not block it).
        try await plugin.start()
        _ = try await CSIClient(plugin: plugin).probe()
    }
}
