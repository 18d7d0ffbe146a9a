import ArgumentParser
import CairnCLI
import CairnCore
import Foundation

// The read-only operator commands: what the cluster store says about volumes, nodes, replicas
// and snapshots, as aligned tables or one JSON document (docs/cli.md).

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case table, json
}

struct OutputOptions: ParsableArguments {
    @Option(name: [.customShort("o"), .long], help: "table (aligned columns, human units) or json (one document, raw numbers, stable field names).")
    var output: OutputFormat = .table

    /// Prints `value` as JSON, or the table text.
    func emit<T: Encodable>(_ value: T, table: () -> String) throws {
        switch output {
        case .json: print(try JSONOutput.encode(value))
        case .table: print(table(), terminator: "")
        }
    }
}

/// Runs a command's body, turning store and lookup errors into their message (exit 1).
func readingStore(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as ValidationError {
        throw error
    } catch {
        throw CLIFailure(error)
    }
}

struct VolumeList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "Every volume: size, condition, replicas in sync, where it is attached.")
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var outputOptions: OutputOptions

    func run() async throws {
        try await readingStore {
            let cluster = try await ClusterView.read(from: try storeOptions.open())
            let rows = cluster.volumes.map { VolumeSummary($0, attachments: cluster.attachments[$0.id] ?? []) }
            try outputOptions.emit(["volumes": rows]) {
                var table = Table([.init("VOLUME"), .init("NAME"), .init("SIZE", .right), .init("CONDITION"), .init("IN SYNC", .right),
                                   .init("ATTACHED"), .init("EPOCH", .right), .init("AGE", .right)])
                for v in rows {
                    table.append([v.id, v.name, Units.bytes(v.sizeBytes), v.condition.state.rawValue,
                                  "\(v.condition.replicasInSync)/\(v.condition.replicas)",
                                  v.attachedTo.isEmpty ? "-" : v.attachedTo.joined(separator: ","), "\(v.epoch)", Units.age(of: v.createdAt)])
                }
                return rows.isEmpty ? "no volumes\n" : table.render()
            }
        }
    }
}

struct VolumeInspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "A volume's record: size, epoch, condition, every replica with its state and resync progress, attachments, snapshots.")

    @Argument(help: "The volume's id.")
    var volume: String
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var outputOptions: OutputOptions

    func run() async throws {
        try await readingStore {
            let store = try storeOptions.open()
            guard let v = try await store.volume(id: volume) else {
                throw CairnError.notFound("volume \(volume) does not exist; `cairn volume list` shows the volumes")
            }
            let detail = VolumeDetail(v, attachments: try await store.attachments(volumeID: v.id),
                                      snapshots: try await store.listSnapshots(afterID: nil, limit: 0))
            try outputOptions.emit(detail) { Self.render(detail) }
        }
    }

    static func render(_ d: VolumeDetail, now: Date = Date()) -> String {
        var fields: [(String, String)] = [
            ("volume", d.id), ("name", d.name),
            ("size", "\(Units.bytes(d.sizeBytes)) (\(d.sizeBytes) bytes)"),
            ("filesystem", d.fsType.isEmpty ? "none (raw block)" : d.fsType),
            ("access", d.accessModes.joined(separator: ", ")),
            ("epoch", "\(d.epoch)"),
            ("created", "\(d.createdAt.formatted(.iso8601)) (\(Units.age(of: d.createdAt, now: now)) ago)"),
            ("condition", d.condition.message),
        ]
        if let source = d.contentSource { fields.append(("from", source)) }
        if let encryption = d.encryption { fields.append(("encryption", encryption)) }
        let parameters = d.parameters.merging(d.mutableParameters) { $1 }
        if !parameters.isEmpty { fields.append(("parameters", parameters.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))) }
        var text = Table.fields(fields)

        if let replicas = d.replicas {
            var table = Table([.init("NODE"), .init("ADDRESS"), .init("STATE"), .init("PROGRESS", .right), .init("DONE", .right),
                               .init("RATE", .right), .init("ETA", .right), .init("REASON")])
            for r in replicas { table.append(replicaCells(r, now: now)) }
            text += "\nreplicas (\(d.condition.replicasInSync) of \(replicas.count) in sync):\n" + table.render()
        } else {
            text += "\nreplicas: none — a local file on this machine (one-machine store)\n"
        }
        if d.attachments.isEmpty {
            text += "\nattachments: none\n"
        } else {
            var table = Table([.init("NODE"), .init("EPOCH", .right), .init("ACCESS"), .init("READ-ONLY"), .init("AGE", .right)])
            for a in d.attachments {
                table.append([a.nodeID, "\(a.epoch)", a.accessMode, a.readOnly ? "yes" : "no", Units.age(of: a.createdAt, now: now)])
            }
            text += "\nattachments:\n" + table.render()
        }
        if d.snapshots.isEmpty {
            text += "\nsnapshots: none\n"
        } else {
            text += "\nsnapshots:\n" + SnapshotList.table(d.snapshots, now: now)
        }
        return text
    }

    /// NODE ADDRESS STATE PROGRESS DONE RATE ETA REASON, shared with `cairn replica list`.
    static func replicaCells(_ r: ReplicaView, now: Date) -> [String] {
        let state = r.inSync ? "in sync" : r.resync?.phase ?? "out of sync"
        let since = r.outOfSyncSince.map { " " + Units.age(of: $0, now: now) } ?? ""
        guard let p = r.resync, !r.inSync else {
            return [r.nodeID, r.address, r.inSync ? state : "out of sync" + since, "-", "-", "-", "-", r.reason ?? ""]
        }
        return [r.nodeID, r.address, state + since, Units.percent(p.percent), "\(Units.bytes(p.bytesDone))/\(Units.bytes(p.bytesTotal))",
                p.bytesPerSecond > 0 ? Units.rate(Double(p.bytesPerSecond)) : "-", p.etaSeconds.map(Units.duration) ?? "-", r.reason ?? ""]
    }
}

struct NodeList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "The nodes: live, away or removed, data address, capacity, replicas held.")
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var outputOptions: OutputOptions

    func run() async throws {
        try await readingStore {
            let nodes = try await ClusterView.read(from: try storeOptions.open()).nodes
            try outputOptions.emit(["nodes": nodes]) {
                var table = Table([.init("NODE"), .init("STATE"), .init("DATA ADDRESS"), .init("CAPACITY", .right),
                                   .init("PROVISIONED", .right), .init("REPLICAS", .right), .init("IN SYNC", .right)])
                for n in nodes {
                    table.append([n.id, n.state.rawValue, n.dataAddress ?? "-", n.capacityBytes.map(Units.bytes) ?? "-",
                                  Units.bytes(n.provisionedBytes), "\(n.replicas)", "\(n.replicasInSync)"])
                }
                return nodes.isEmpty ? "no nodes have registered\n" : table.render()
            }
        }
    }
}

struct NodeInspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "A node: live, away or removed, addresses, capacity and what it holds, attached volumes, what an engine restart costs.")

    @Argument(help: "The node's id.")
    var node: String
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var outputOptions: OutputOptions

    func run() async throws {
        try await readingStore {
            try Validate.nodeID(node, field: "node")
            guard let detail = try await ClusterView.read(from: try storeOptions.open()).node(node) else {
                throw CairnError.notFound("node \(node) is not registered, removed, or holding a replica; `cairn node list` shows the nodes")
            }
            try outputOptions.emit(detail) { Self.render(detail) }
        }
    }

    static func render(_ d: NodeDetail, now: Date = Date()) -> String {
        let n = d.node
        let state: String = switch n.state {
        case .live: "live"
        case .away: "away: not registered now (down, restarting or cut off from etcd); its replicas are out of sync until it returns"
        case .removed: "removed (`cairn node remove`): it may not register again; its replicas are re-created elsewhere"
        }
        var fields: [(String, String)] = [
            ("node", n.id), ("state", state),
            ("data address", n.dataAddress ?? "-"), ("control address", n.controlAddress ?? "-"),
            ("capacity", n.capacityBytes.map { "\(Units.bytes($0)), \(Units.bytes(n.provisionedBytes)) provisioned (\(Units.percent($0 > 0 ? Double(n.provisionedBytes) * 100 / Double($0) : 0)))" }
                ?? "not reported; \(Units.bytes(n.provisionedBytes)) provisioned"),
            ("replicas", "\(n.replicas) (\(n.replicasInSync) in sync)"),
            ("engine restarts", n.engineRestarts ?? (n.state == .live ? "runs no engines" : "unknown (not registered)")),
        ]
        if let at = d.registeredAt { fields.append(("registered", "\(at.formatted(.iso8601)) (\(Units.age(of: at, now: now)) ago)")) }
        if !d.topology.isEmpty { fields.append(("topology", d.topology.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))) }
        if let max = d.maxVolumes, max > 0 { fields.append(("max volumes", "\(max)")) }
        fields.append(("attached", d.attachedVolumes.isEmpty ? "none" : d.attachedVolumes.joined(separator: ", ")))
        var text = Table.fields(fields)
        if !d.replicas.isEmpty {
            text += "\nreplicas:\n" + ReplicaList.table(d.replicas, now: now)
        }
        return text
    }
}

struct ReplicaList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "Every replica of every volume (or of one volume, or on one node): in sync or not, resync progress.")
    @Option(help: "Only this volume's replicas.")
    var volume: String?
    @Option(help: "Only the replicas on this node.")
    var node: String?
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var outputOptions: OutputOptions

    func run() async throws {
        try await readingStore {
            let replicas = try await ClusterView.read(from: try storeOptions.open()).replicas.filter {
                (volume == nil || $0.volumeID == volume) && (node == nil || $0.nodeID == node)
            }
            try outputOptions.emit(["replicas": replicas]) {
                replicas.isEmpty ? "no replicas" + (volume.map { " of volume \($0)" } ?? "") + (node.map { " on node \($0)" } ?? "") + "\n"
                                 : Self.table(replicas, now: Date())
            }
        }
    }

    static func table(_ replicas: [ReplicaView], now: Date) -> String {
        var table = Table([.init("VOLUME"), .init("NODE"), .init("ADDRESS"), .init("STATE"), .init("PROGRESS", .right), .init("DONE", .right),
                           .init("RATE", .right), .init("ETA", .right), .init("REASON")])
        for r in replicas { table.append([r.volumeID] + VolumeInspect.replicaCells(r, now: now)) }
        return table.render()
    }
}

struct SnapshotCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "List snapshots (CreateSnapshot makes them; the CO deletes them).",
        subcommands: [SnapshotList.self])
}

struct SnapshotList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "Every snapshot (or one volume's): source volume, size, ready, the replicas holding it.")
    @Option(help: "Only the snapshots of this volume.")
    var volume: String?
    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var outputOptions: OutputOptions

    func run() async throws {
        try await readingStore {
            let snapshots = try await storeOptions.open().listSnapshots(afterID: nil, limit: 0)
                .filter { !$0.isHidden && (volume == nil || $0.sourceVolumeID == volume) }.map(SnapshotView.init)
            try outputOptions.emit(["snapshots": snapshots]) {
                snapshots.isEmpty ? "no snapshots" + (volume.map { " of volume \($0)" } ?? "") + "\n" : Self.table(snapshots, now: Date())
            }
        }
    }

    static func table(_ snapshots: [SnapshotView], now: Date) -> String {
        var table = Table([.init("SNAPSHOT"), .init("NAME"), .init("VOLUME"), .init("SIZE", .right), .init("READY"),
                           .init("HOLDERS"), .init("GROUP"), .init("AGE", .right)])
        for s in snapshots {
            table.append([s.id, s.name, s.sourceVolumeID, Units.bytes(s.sizeBytes), s.readyToUse ? "yes" : "no",
                          s.holders.map { $0.joined(separator: ",") } ?? "local", s.groupID ?? "-", Units.age(of: s.createdAt, now: now)])
        }
        return table.render()
    }
}
