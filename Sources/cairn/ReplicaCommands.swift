import ArgumentParser
import CairnCore
import CairnReplica
import Foundation
import Logging

/// `cairn replica …`: look at one replica through its node's data protocol (read only).
struct ReplicaCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "replica",
        abstract: "Inspect one replica of a volume over the data protocol (read-only).",
        subcommands: [ReplicaDigestCommand.self, ReplicaLatencyCommand.self]
    )
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
