import ArgumentParser
import CairnCLI
import CairnCore
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// `cairn volume watch`: a volume's replicas as a live view, a progress bar per replica that is
/// (or was, during the watch) out of sync, until every replica is in sync.
struct VolumeWatch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "watch",
        abstract: "Follow a volume's resync or rebuild: a progress bar per out-of-sync replica with its rate and ETA, until every replica is in sync.",
        discussion: """
            On a terminal the view is redrawn in place; otherwise (a pipe, a file) it prints one line per \
            out-of-sync replica per sample. The rate is measured between the progress the engine records \
            (every 2 s). Exits 0 once every replica is in sync, unless --keep-watching.
            Example: cairn volume watch vol-4f1c… --store etcd --etcd-endpoints http://10.0.0.1:2379
            """)

    @Argument(help: "The volume's id.")
    var volume: String
    @Option(help: "Seconds between samples.")
    var interval: Double = 1
    @Flag(name: .customLong("keep-watching"), help: "Keep watching after every replica is in sync (until interrupted).")
    var keepWatching = false
    @OptionGroup var storeOptions: StoreOptions
    @Option(name: [.customShort("o"), .long], help: "table (the live view) or json (one JSON object per sample, one per line).")
    var output: OutputFormat = .table

    func validate() throws {
        guard interval >= 0.1, interval <= 3600 else { throw ValidationError("--interval must be between 0.1 and 3600 seconds") }
    }

    func run() async throws {
        try await readingStore {
            let store = try storeOptions.open()
            let terminal = output == .table && isatty(STDOUT_FILENO) == 1
            var watcher = VolumeWatcher()
            var drawn = false
            var failures = 0
            var sampled = false
            while true {
                let found: VolumeRecord?
                do {
                    found = try await store.volume(id: volume)
                    failures = 0
                } catch {
                    // The store may be briefly away (an etcd leader change, a network blip): a
                    // live view says so and keeps trying, for 30 samples in a row at most. A first
                    // read that fails is a wrong flag more likely than a blip: it ends the watch.
                    failures += 1
                    guard sampled, failures < 30 else { throw error }
                    FileHandle.standardError.write(Data("cannot read volume \(volume) from the store (try \(failures) of 30, again in \(String(format: "%g", interval)) s): \(RPCStatus.from(error).message)\n".utf8))
                    try await Task.sleep(for: .seconds(interval))
                    continue
                }
                guard let record = found else {
                    throw CairnError.notFound("volume \(volume) does not exist (or was deleted while watched); `cairn volume list` shows the volumes")
                }
                let sample = watcher.sample(record)
                sampled = true
                switch output {
                case .json:
                    print(try JSONOutput.encode(sample, pretty: false))
                case .table where terminal:
                    // Home, each line cleared to its end, then everything below: no flicker.
                    let lines = WatchRendering.screen(sample, interval: interval)
                    print((drawn ? "\u{1B}[H" : "\u{1B}[H\u{1B}[2J") + lines.map { $0 + "\u{1B}[K" }.joined(separator: "\n") + "\n\u{1B}[J",
                          terminator: "")
                    drawn = true
                case .table:
                    for line in WatchRendering.plainLines(sample) { print(line) }
                }
                fflush(nil)
                if sample.allInSync && !keepWatching {
                    if output == .table { print("every replica of \(volume) is in sync") }
                    return
                }
                try await Task.sleep(for: .seconds(interval))
            }
        }
    }
}
