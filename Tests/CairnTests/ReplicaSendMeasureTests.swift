import CairnCore
@testable import CairnReplica
import CairnSecurity
import Foundation
import Synchronization
import XCTest

/// A micro-measure of the replica connection under load, run by hand (issue 16, docs/engine.md
/// "Where the cycles go"): 32 threads write 4 KiB blocks at once (queue depth 32) through one
/// client connection to one replica server over TCP on this machine, with `--data-security
/// auth`. Skipped unless `CAIRN_MEASURE_SENDS` gives the seconds to run; count the send system
/// calls from outside, e.g.
///
///     CAIRN_MEASURE_SENDS=3 nice perf stat -e syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendto \
///         swift test --skip-build --filter ReplicaSendMeasureTests
///
/// It prints writes/s and frames sent (requests + replies) so syscalls per frame follow.
final class ReplicaSendMeasureTests: XCTestCase {
    func testConcurrentSmallWritesOverAuthenticatedTCP() throws {
        guard let text = ProcessInfo.processInfo.environment["CAIRN_MEASURE_SENDS"], let seconds = Double(text) else {
            throw XCTSkip("a measurement: set CAIRN_MEASURE_SENDS=<seconds> to run it")
        }
        let root = "/tmp/cairn-send-measure-" + UUID().uuidString
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        try CertificateAuthority.create(directory: root + "/ca", trustDomain: "cairn", days: 2)
        for (name, kinds) in [("n1", [SpiffeID.Kind.node]), ("n2", [.node]), ("ctl", [.controller])] {
            try CertificateAuthority.issue(caDirectory: root + "/ca", trustDomain: "cairn", name: name, kinds: kinds,
                                           ips: [], dns: [], days: 1, out: root + "/" + name)
        }
        let logs = CapturedLogs()
        func security(_ name: String) throws -> DataPlaneSecurity {
            DataPlaneSecurity(mode: .auth, identity: try TLSIdentity(files: TLSFiles(directory: root + "/" + name), logger: logs.logger))
        }
        let server = try ReplicaServer(dataDir: root + "/data", host: "127.0.0.1", port: 0, logger: logs.logger,
                                       security: try security("n1"))
        try server.start()
        defer { server.stop() }
        let client = try ReplicaClient.connect(host: "127.0.0.1", port: server.boundPort, security: try security("n2"),
                                               expectedNode: "n1")
        defer { client.close() }
        let volume = "vol-measure"
        let blocks = 16384
        try client.create(volumeID: volume, sizeBytes: UInt64(blocks * FrameLimits.blockSize))
        let grant = try TLSIdentity(files: TLSFiles(directory: root + "/ctl"), logger: logs.logger)
            .grant(volumeID: volume, nodeID: "n2", epoch: FencingEpoch(2))
        _ = try client.claim(volumeID: volume, epoch: 2, grant: grant)

        let threads = 32
        let generation = Atomic<UInt64>(1)
        let writes = Atomic<Int>(0)
        let failures = Atomic<Int>(0)
        let deadline = Date().addingTimeInterval(seconds)
        let start = Date()
        onThreads(threads) { t in
            var data = [UInt8](repeating: UInt8(truncatingIfNeeded: t), count: FrameLimits.blockSize)
            var block = t
            while Date() < deadline {
                // Each thread has its own blocks (t, t+32, …): never two writes of one block at once.
                block = (block + threads) % blocks
                data[0] = UInt8(truncatingIfNeeded: block)
                let g = generation.wrappingAdd(1, ordering: .relaxed).newValue
                do {
                    try data.withUnsafeBytes {
                        try client.write(volumeID: volume, offset: UInt64(block * FrameLimits.blockSize), data: $0,
                                         generation: g, epoch: 2)
                    }
                    writes.wrappingAdd(1, ordering: .relaxed)
                } catch {
                    failures.wrappingAdd(1, ordering: .relaxed)
                    return
                }
            }
        }
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertEqual(failures.load(ordering: .relaxed), 0)
        let n = writes.load(ordering: .relaxed)
        XCTAssertGreaterThan(n, 0)
        print("send-measure: \(n) writes in \(String(format: "%.2f", elapsed)) s = \(Int(Double(n) / elapsed)) writes/s; "
              + "frames sent (requests + replies) ≈ \(2 * n); client bytes sent \(client.bytesSent); "
              + "client: \(client.sendQueue.framesWritten) requests in \(client.sendQueue.writeCalls) writes")
    }
}
