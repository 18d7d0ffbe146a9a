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
        abstract: "List the cluster's nodes, or remove one for good (its replicas are re-created elsewhere).",
        subcommands: [NodeList.self, NodeRemove.self])
}

struct NodeList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "The nodes: live or not, removed, data address, replicas held.")
    @OptionGroup var storeOptions: StoreOptions

    func run() async throws {
        do {
            let store = try storeOptions.open()
            let live = try await store.liveNodes()
            let removed = try await store.removedNodes()
            var held: [String: (inSync: Int, outOfSync: Int)] = [:]
            for volume in try await store.listVolumes(afterID: nil, limit: 0) {
                for r in volume.replicas ?? [] {
                    if r.inSync { held[r.nodeID, default: (0, 0)].inSync += 1 } else { held[r.nodeID, default: (0, 0)].outOfSync += 1 }
                }
            }
            let ids = Set(live.map(\.id)).union(removed).union(held.keys).sorted()
            for id in ids {
                let node = live.first { $0.id == id }
                let state = removed.contains(id) ? "removed" : node != nil ? "live" : "away"
                let h = held[id] ?? (0, 0)
                print("node \(id) \(state) data \(node?.dataAddress ?? "-") replicas \(h.inSync) in sync, \(h.outOfSync) out of sync"
                      + (node?.engineRestarts.map { "; restarts \($0)" } ?? ""))
            }
        } catch let error as ValidationError {
            throw error
        } catch {
            throw CLIFailure(error)
        }
    }
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

struct VolumeInspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "A volume's record: size, epoch, attachments, and every replica with its state and resync progress.")

    @Argument(help: "The volume's id.")
    var volume: String
    @OptionGroup var storeOptions: StoreOptions

    func run() async throws {
        do {
            let store = try storeOptions.open()
            guard let v = try await store.volume(id: volume) else {
                throw CairnError.notFound("volume \(volume) does not exist")
            }
            print("volume \(v.id) name \(v.name)")
            print("size \(v.capacityBytes) bytes (\(ResyncProgress.bytes(v.capacityBytes))), epoch \(v.epoch), created \(v.createdAt.formatted(.iso8601))")
            for a in try await store.attachments(volumeID: v.id) {
                print("attached to \(a.nodeID) at epoch \(a.epoch)\(a.readonly ? " read-only" : "")")
            }
            guard let replicas = v.replicas else {
                print("local file on this machine (one-machine store: no replicas)")
                return
            }
            for r in replicas {
                var line = "replica \(r.nodeID) \(r.address) " + (r.inSync ? "in sync" : "out of sync")
                if let since = r.outOfSyncSince { line += " since \(since.formatted(.iso8601))" }
                if let reason = r.reason { line += ": \(reason)" }
                if let resync = r.resync { line += "; resync \(resync.summary), updated \(resync.updatedAt.formatted(.iso8601))" }
                print(line)
            }
        } catch {
            throw CLIFailure(error)
        }
    }
}
