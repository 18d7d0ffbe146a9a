import CairnCore
import CairnProto
import CairnReplica
import CairnReplicaControl
import CairnRPC
import CairnSecurity
import CairnStore
import Foundation
import Logging
import XCTest

/// etcd over TLS with client certificates, and ReplicaControl over mutual TLS with its
/// authorization, against a real etcd and a real replica server. Certificates come from
/// throw-away CAs (`TestPKI`); everything is removed in tearDown, passed or not.
final class TLSTests: XCTestCase {
    var dir = ""
    var etcd: EtcdTestServer?
    var stores: [EtcdStore] = []
    var replicaServer: ReplicaServer?
    var grpcServers: [GRPCServer] = []
    let logger = Logger(label: "tls-test")

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "cairn-tls-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() async throws {
        for store in stores { await store.stop() }
        stores = []
        for server in grpcServers { await server.shutdown(grace: .seconds(1)) }
        grpcServers = []
        replicaServer?.stop()
        etcd?.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }

    // MARK: etcd

    func testAStoreOverTLSWithAClientCertificateWorks() async throws {
        let etcd = try await EtcdTestServer.start(tls: true)
        self.etcd = etcd
        XCTAssertTrue(etcd.clientURL.hasPrefix("https://"))
        let store = try etcd.store()
        stores.append(store)
        try await StoreContract.oneVolumeAtTheSamePathInTwoContainersIsTwoPublishes(store)
    }

    func testEtcdWithACertificateOfAnotherCAIsRefusedClearly() async throws {
        let etcd = try await EtcdTestServer.start(tls: true)
        self.etcd = etcd
        let other = try TestPKI.make(in: dir + "/other")
        let stranger = try other.controller("c1")
        let store = try etcd.store(tls: stranger)
        stores.append(store)
        do {
            _ = try await store.liveNodes()
            XCTFail("etcd's certificate is not of the other CA: the store must not reach it")
        } catch let error as CairnError {
            XCTAssertEqual(error.code, .unavailable, "\(error)")
            XCTAssertTrue(error.message.contains("over TLS") && error.message.contains(stranger.caFile), "\(error)")
        }
    }

    func testEtcdTLSOptionsAreCheckedBeforeAnyCallAndNeverShowTheKey() throws {
        let pki = try TestPKI.make(in: dir + "/ca")
        let good = try pki.controller("c1")
        let other = try pki.controller("c2")
        let key = try String(contentsOfFile: good.keyFile!, encoding: .utf8)
        let keyBody = key.split(separator: "\n").dropFirst().first.map(String.init) ?? key

        func refusal(_ endpoints: [String], _ tls: TLSCredentials?) -> String {
            do {
                _ = try EtcdStore(endpoints: endpoints, tls: tls, logger: logger)
                return ""
            } catch {
                XCTAssertFalse("\(error)".contains(keyBody), "an error shows the private key: \(error)")
                return "\(error)"
            }
        }
        XCTAssertTrue(refusal(["https://127.0.0.1:2379"], nil).contains("--etcd-ca"))
        XCTAssertTrue(refusal(["https://127.0.0.1:2379", "http://127.0.0.2:2379"], good).contains("mix http:// and https://"))
        XCTAssertTrue(refusal(["http://127.0.0.1:2379"], good).contains("https://"))
        XCTAssertTrue(refusal(["https://127.0.0.1:2379"], TLSCredentials(caFile: dir + "/missing.crt")).contains("cannot read \(dir)/missing.crt"))
        XCTAssertTrue(refusal(["https://127.0.0.1:2379"], TLSCredentials(caFile: good.keyFile!)).contains("holds no PEM certificate"))
        let mismatched = TLSCredentials(caFile: good.caFile, certFile: good.certFile, keyFile: other.keyFile)
        XCTAssertTrue(refusal(["https://127.0.0.1:2379"], mismatched).contains("does not belong to the certificate"))
        let keyAsCert = TLSCredentials(caFile: good.caFile, certFile: good.keyFile, keyFile: good.keyFile)
        XCTAssertTrue(refusal(["https://127.0.0.1:2379"], keyAsCert).contains("holds no PEM certificate"))
        XCTAssertEqual(refusal(["https://127.0.0.1:2379"], good), "", "good files, checked before any connection")
    }

    // MARK: ReplicaControl over mutual TLS

    /// n1's control service over mutual TLS in front of a real replica server; its address.
    private func serveControl(_ pki: TestPKI) throws -> ReplicaNode {
        let server = try ReplicaServer(dataDir: dir + "/n1", host: "127.0.0.1", port: 0, logger: logger)
        try server.start()
        replicaServer = server
        let identity = try pki.node("n1", ips: ["127.0.0.1"])
        let router = Router()
        ReplicaControlService(server: server).register(on: router, access: ReplicaControlAccess(trustDomain: pki.trustDomain, nodeID: "n1"))
        for _ in 0..<20 {
            let port = Int.random(in: 20000..<60000)
            let grpc = GRPCServer(router: router, logger: logger, tls: identity)
            do { try grpc.start(endpoints: ["tcp://127.0.0.1:\(port)"]) } catch { continue }
            grpcServers.append(grpc)
            return ReplicaNode(nodeID: "n1", dataAddress: "127.0.0.1:\(server.boundPort)", controlAddress: "127.0.0.1:\(port)")
        }
        throw CairnError.unavailable("no free port for the control service")
    }

    /// One ListSnapshots call straight over gRPC (no data-protocol fallback): its status.
    private func list(_ node: ReplicaNode, as identity: TLSCredentials?, expecting name: String = "n1") async throws -> StatusCode {
        let target = "tcp://" + node.controlAddress!
        let channel = try identity.map { try GRPCChannel(target: target, tls: $0, serverName: name) } ?? GRPCChannel(target: target)
        let request = Cairn_Agent_V1_ListReplicaSnapshotsRequest.with { $0.volumeID = "vol-absent"; $0.epoch = 1 }
        let reply = await channel.callRaw(ReplicaControlService.method("ListSnapshots"), try request.serializedBytes(), timeout: .seconds(10))
        return reply.code
    }

    func testReplicaControlAdmitsControllersAndTheNodeItselfOnly() async throws {
        let pki = try TestPKI.make(in: dir + "/ca")
        let node = try serveControl(pki)

        // Admitted: the call reaches the service (no such replica: NOT_FOUND).
        let controller = try pki.controller("controller")
        let controlled = try await list(node, as: controller)
        XCTAssertEqual(controlled, .notFound, "a controller of the cluster is admitted")
        let itself = try await list(node, as: try pki.node("n1"))
        XCTAssertEqual(itself, .notFound, "the node's own sweeper is admitted")
        let both = try pki.issue("n3", uris: ["spiffe://cairn/node/n3", "spiffe://cairn/controller/n3"], dns: ["n3"])
        let roleAll = try await list(node, as: both)
        XCTAssertEqual(roleAll, .notFound, "a `--role all` process (a node and a controller) is admitted as a controller")

        // The client's ReplicaControlClient over mTLS creates a replica through the service.
        let identity = try TLSIdentity(files: TLSFiles(ca: controller.caFile, certificate: controller.certFile!, key: controller.keyFile!),
                                       logger: logger)
        let client = ReplicaControlClient(timeout: .seconds(20), logger: logger,
                                          security: DataPlaneSecurity(mode: .auth, identity: identity))
        try await client.createReplica(ReplicaNode(nodeID: "n1", dataAddress: "127.0.0.1:1", controlAddress: node.controlAddress),
                                       volumeID: "vol-1", sizeBytes: 1 << 20)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/n1/replicas/vol-1"), "created through the control service")

        // Refused by the authorization: verified certificates that may not control n1.
        let otherNode = try await list(node, as: try pki.node("n2"))
        XCTAssertEqual(otherNode, .permissionDenied, "another node may not control n1's replicas")
        let noMember = try await list(node, as: try pki.issue("etcd-server", dns: ["etcd"], ips: ["127.0.0.1"]))
        XCTAssertEqual(noMember, .permissionDenied, "a certificate of the CA that names no member")
        let otherDomain = try await list(node, as: try pki.issue("foreign", uris: ["spiffe://elsewhere/controller/c"]))
        XCTAssertEqual(otherDomain, .permissionDenied, "a controller of another trust domain")

        // Refused by the handshake: no certificate, another CA, or not the node meant.
        let plaintext = try await list(node, as: nil)
        XCTAssertEqual(plaintext, .unavailable, "a plaintext client")
        let stranger = try TestPKI.make(in: dir + "/other").controller("controller")
        let strange = try await list(node, as: stranger)
        XCTAssertEqual(strange, .unavailable, "a controller certificate of another CA")
        let wrongNode = try await list(node, as: controller, expecting: "n2")
        XCTAssertEqual(wrongNode, .unavailable, "n1 answering where the caller meant n2")
    }
}
