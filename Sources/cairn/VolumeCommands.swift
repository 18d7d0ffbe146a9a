import ArgumentParser
import CairnAgent
import CairnCore
import Foundation
import Logging

/// `cairn volume …`: operator commands, sent to this machine's agent over its socket.
struct VolumeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "volume",
        abstract: "List, inspect and watch volumes (from the cluster store); hot-plug a volume staged on this machine into a running container, or remove it (talks to the local cairn agent).",
        subcommands: [VolumeList.self, VolumeInspect.self, VolumeWatch.self, VolumeAttach.self, VolumeDetach.self, VolumeRekeyCommand.self]
    )
}

/// Options shared by the volume commands.
struct HotPlugTarget: ParsableArguments {
    @Argument(help: "The volume's id (vol-…), as CreateVolume returned it.")
    var volume: String

    @Option(help: "A process of the container: the volume is bound into this process's mount namespace.")
    var pid: Int32

    @Option(help: "Where the volume appears, as the container sees its filesystem (e.g. /data).")
    var path: String

    @Option(help: "The cairn agent's unix socket.")
    var agentSocket: String = AgentProtocol.defaultSocket

    func client() throws -> AgentClient {
        // The CLI prints one line of its own; the client's logs stay quiet.
        try AgentClient(socket: agentSocket, logger: Logger(label: "cairn.cli") { _ in SwiftLogNoOpLogHandler() })
    }
}

struct VolumeAttach: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attach",
        abstract: "Bind a staged volume into a running container's mount namespace.",
        discussion: """
            The volume must be staged on this machine (NodeStageVolume). Repeating the command is harmless.
            Example: cairn volume attach vol-4f1c… --pid 4242 --path /data
            """)

    @OptionGroup var target: HotPlugTarget

    @Flag(help: "Bind the volume read-only.")
    var readOnly = false

    func run() async throws {
        do {
            let client = try target.client()
            let result = try await client.attachToProcess(volumeID: target.volume, pid: target.pid, path: target.path,
                                                          readOnly: readOnly)
            let kind = result.accessType == .block ? "block device" : "filesystem"
            print("attached volume \(target.volume) at \(target.path) in the mount namespace of process \(target.pid) (\(kind), \(result.readOnly ? "read-only" : "read-write"))")
        } catch {
            throw CLIFailure(error)
        }
    }
}

struct VolumeDetach: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detach",
        abstract: "Remove a hot-plugged volume from a running container's mount namespace.",
        discussion: """
            Unmounts the volume at PATH inside the process's mount namespace and removes the mount point it created.
            Repeating the command is harmless. Example: cairn volume detach vol-4f1c… --pid 4242 --path /data
            """)

    @OptionGroup var target: HotPlugTarget

    func run() async throws {
        do {
            let client = try target.client()
            let result = try await client.detachFromProcess(volumeID: target.volume, pid: target.pid, path: target.path)
            if result.processGone {
                print("process \(target.pid) has exited: its mount namespace, and volume \(target.volume) in it, are gone")
            } else if result.detached {
                print("detached volume \(target.volume) from \(target.path) in the mount namespace of process \(target.pid)")
            } else {
                print("volume \(target.volume) is not attached at \(target.path) in the mount namespace of process \(target.pid); nothing to do")
            }
        } catch {
            throw CLIFailure(error)
        }
    }
}

/// Prints the agent's message (not Swift's rendering of the error) and exits 1.
struct CLIFailure: Error, CustomStringConvertible {
    let description: String

    init(_ error: any Error) {
        description = RPCStatus.from(error).message
    }
}
