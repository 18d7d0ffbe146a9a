import ArgumentParser
import CairnCore
import CairnRPC
import CairnStore
import Foundation
import Logging

/// Where the operator commands find cluster state: the same options as `cairn serve`.
struct StoreOptions: ParsableArguments {
    @Option(help: "Where cluster state lives: sqlite (this machine's --data-dir) or etcd.")
    var store: StoreKind = .sqlite

    @Option(name: .customLong("etcd-endpoints"), help: "etcd client URLs, comma-separated or repeated (with --store etcd).")
    var etcdEndpoints: [String] = []

    @OptionGroup var etcdTLS: EtcdTLSOptions

    @Option(help: "The data directory of `cairn serve` (for --store sqlite).")
    var dataDir: String = "/var/lib/cairn"

    func open() throws -> any MetadataStore {
        let quiet = Logger(label: "cairn.cli") { _ in SwiftLogNoOpLogHandler() }
        switch store {
        case .sqlite:
            return try SQLiteStore(path: dataDir + "/cairn.db", logger: quiet)
        case .etcd:
            let endpoints = etcdEndpoints.flatMap { $0.split(separator: ",").map(String.init) }
            guard !endpoints.isEmpty else { throw ValidationError("--store etcd needs --etcd-endpoints URL[,URL...]") }
            return try EtcdStore(endpoints: endpoints, tls: try etcdTLS.identity(), logger: quiet)
        }
    }
}

/// How a process reaches etcd over TLS (https:// endpoints): `cairn serve` and every command
/// that opens the store. Paths only; the files are read when a channel is made.
struct EtcdTLSOptions: ParsableArguments {
    @Option(name: .customLong("etcd-ca"), help: "PEM CA bundle that etcd's certificate must verify against (required with https:// etcd endpoints).")
    var ca: String?

    @Option(name: .customLong("etcd-cert"), help: "PEM client certificate (then intermediates) to present to etcd (with --etcd-key; for etcd's --client-cert-auth).")
    var cert: String?

    @Option(name: .customLong("etcd-key"), help: "PEM private key of --etcd-cert.")
    var key: String?

    /// Nil without --etcd-ca; the certificate and key only together.
    func identity() throws -> TLSCredentials? {
        guard let ca else {
            if cert != nil || key != nil {
                throw ValidationError("--etcd-cert and --etcd-key need --etcd-ca: the CA bundle that etcd's certificate verifies against")
            }
            return nil
        }
        guard (cert == nil) == (key == nil) else {
            throw ValidationError(cert == nil ? "--etcd-key needs --etcd-cert" : "--etcd-cert needs --etcd-key")
        }
        return TLSCredentials(caFile: ca, certFile: cert, keyFile: key)
    }
}

struct NodeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "List and inspect the cluster's nodes, or remove one for good (its replicas are re-created elsewhere).",
        subcommands: [NodeList.self, NodeInspect.self, NodeRemove.self])
}

struct NodeRemove: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove",
        abstract: "Remove a node for good: the controller re-creates each of its replicas on another node and the attached engines copy them.",
        discussion: """
            The node may not register again under the same id. Use this for a machine that is gone \
            (dead disk, decommissioned); a node that is merely restarting comes back by itself.
            Example: cairn node remove n3 --store etcd --etcd-endpoints http://10.0.0.1:2379
            """)

    @Argument(help: "The node's id.")
    var node: String
    @OptionGroup var storeOptions: StoreOptions

    func run() async throws {
        do {
            try Validate.nodeID(node, field: "node")
            let store = try storeOptions.open()
            try await store.removeNode(id: node)
            let affected = try await store.listVolumes(afterID: nil, limit: 0).filter { v in
                (v.replicas ?? []).contains { $0.nodeID == node }
            }
            print("node \(node) removed; it may not register again under this id")
            if affected.isEmpty {
                print("it held no replica")
            } else {
                print("volumes with a replica on \(node), to be re-created on other nodes by the controller: "
                      + affected.map(\.id).joined(separator: ", "))
                print("watch them with: cairn volume inspect VOLUME")
            }
        } catch {
            throw CLIFailure(error)
        }
    }
}
