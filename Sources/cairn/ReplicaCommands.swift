import ArgumentParser
import CairnCore
import CairnObservability
import CairnReplica
import Foundation
import Logging
import ServiceLifecycle

/// `cairn replica …`: look at one replica through its node's data protocol (read only); and,
/// hidden, serve a data directory's replicas on their own (crash tests).
struct ReplicaCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replica",
        abstract: "List the replicas of the volumes (from the cluster store); inspect one replica over the data protocol (read-only).",
        subcommands: [ReplicaList.self, ReplicaDigestCommand.self, ReplicaServeCommand.self, ReplicaLatencyCommand.self]
    )
}

/// `cairn replica serve` (hidden): the node's replica server — the same `ReplicaServer` and
/// `ReplicaStore`, stopped by the same lifecycle service — on a data directory, without a
/// store, registration, engines or CSI. It exists so a test can SIGKILL a process holding
/// replicas at any moment (ReplicaCrashTests) without standing up a cluster.
struct ReplicaServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the replicas in <data-dir>/replicas over the data protocol, standalone (for tests).",
        shouldDisplay: false)

    @Option(help: "The directory whose replicas/ to serve.")
    var dataDir: String

    @Option(help: "HOST:PORT to listen on; port 0 lets the kernel choose (see --port-file).")
    var listen: String = "127.0.0.1:0"

    @Option(name: .customLong("port-file"), help: "Once listening, write the bound port here (written to a temporary file and renamed).")
    var portFile: String?

    @OptionGroup var security: DataSecurityOptions

    @Option(name: .customLong("metrics-address"), help: "HOST:PORT where to serve GET /metrics (the replica server's request metrics) and /healthz; default none.")
    var metricsAddress: String?

    @Option(help: "Log level.")
    var logLevel: String = "info"

    func run() async throws {
        let metrics = try metricsAddress.map(Serve.parseMetricsAddress)
        if metrics != nil { _ = ProcessMetrics.registry }  // before the server makes its instruments
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { LogfmtHandler(label: $0, level: level) }
        var logger = Logger(label: "cairn.replica-server")
        logger.logLevel = level
        // ReplicaAddress refuses port 0 (a peer's address always names one): parse with a
        // stand-in port and listen on 0.
        let anyPort = listen.hasSuffix(":0")
        let address: ReplicaAddress
        do { address = try ReplicaAddress(anyPort ? String(listen.dropLast()) + "1" : listen) } catch {
            throw ValidationError("--listen \(listen) is not HOST:PORT (\(error))")
        }
        let server = try ReplicaServer(dataDir: dataDir, host: address.host, port: anyPort ? 0 : address.port,
                                       logger: logger, security: try security.resolve(dataDir: dataDir, logger: logger))
        try server.start()
        if let portFile {
            let temporary = portFile + ".tmp"
            try Data("\(server.boundPort)\n".utf8).write(to: URL(fileURLWithPath: temporary))
            guard rename(temporary, portFile) == 0 else {
                server.stop()
                throw CLIFailure(SystemError("rename \(temporary) to \(portFile)", errno: errno))
            }
        }
        logger.info("serving replicas", metadata: ["data.address": "\(address.host):\(server.boundPort)"])
        var services: [any Service] = metrics.map { [ObservabilityServer(address: $0, logger: logger, registry: ProcessMetrics.registry)] } ?? []
        services.append(UntilShutdown.replicaServer(server, logger: logger))
        let group = ServiceGroup(configuration: .init(
            services: services.map { .init(service: $0) },
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await group.run()
    }
}

struct ReplicaDigestCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "digest",
        abstract: "Read a replica whole (verifying every block's checksum) and print a digest of its contents.",
        discussion: """
            Two replicas of a volume that are in sync print the same digest. The read uses the epoch \
            the replica has already seen, so it fences nobody and changes nothing.
            Example: cairn replica digest vol-4f1c… --address 10.0.0.12:7410
            """)

    @Argument(help: "The volume's id.")
    var volume: String

    @Option(help: "HOST:PORT of the node's replica server (its --data-address).")
    var address: String

    @OptionGroup var security: DataSecurityOptions

    func run() async throws {
        do {
            let parsed = try ReplicaAddress(address)
            let client = try ReplicaClient.connect(host: parsed.host, port: parsed.port,
                                                   security: try security.resolve(dataDir: nil, logger: Logger(label: "cairn")))
            defer { client.close() }
            let status = try client.status(volumeID: volume, epoch: .max)
            var digest = VolumeDigest()
            let chunk = 4 << 20
            var offset: UInt64 = 0
            while offset < status.size {
                let length = Int(min(UInt64(chunk), status.size - offset))
                let bytes = try client.read(volumeID: volume, offset: offset, length: length, epoch: status.epoch)
                bytes.withUnsafeBytes { digest.add($0) }
                offset += UInt64(length)
            }
            print("volume \(volume) replica at \(address): \(digest) epoch \(status.epoch) generation \(status.highestGeneration)")
        } catch {
            throw CLIFailure(error)
        }
    }
}
