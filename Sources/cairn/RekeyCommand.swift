import ArgumentParser
import CairnCore
import CairnCrypto
import Foundation

/// `cairn volume rekey`: changes an encrypted volume's passphrase (docs/encryption.md). Only the
/// wrapping of the volume's data key changes; no data is rewritten, and a staged volume keeps
/// serving. The passphrases come from files (never the command line, which `ps` shows).
struct VolumeRekeyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rekey",
        abstract: "Change an encrypted volume's passphrase: its data key is sealed again under the new one (no data rewritten).",
        discussion: """
            Its snapshots are rekeyed with it; clones and restored volumes have their own record: rekey them too. \
            Then update the Secret the CO passes to NodeStageVolume (key `passphrase`) to the new passphrase.
            Example: cairn volume rekey vol-… --old-passphrase-file old.txt --new-passphrase-file new.txt --store etcd --etcd-endpoints https://10.0.0.1:2379
            """)

    @Argument(help: "The volume's id.")
    var volume: String
    @Option(help: "A file holding the current passphrase (a trailing newline is ignored).")
    var oldPassphraseFile: String
    @Option(help: "A file holding the new passphrase (a trailing newline is ignored).")
    var newPassphraseFile: String
    @OptionGroup var storeOptions: StoreOptions

    func run() async throws {
        try await readingStore {
            let old = try Self.passphrase(oldPassphraseFile)
            let new = try Self.passphrase(newPassphraseFile)
            let outcome = try await VolumeRekey.rekey(store: try storeOptions.open(), volumeID: volume,
                                                     oldPassphrase: old, newPassphrase: new)
            print("volume \(volume) rekeyed (and \(outcome.snapshots) of its snapshots); stage it with the new passphrase from now on")
        }
    }

    static func passphrase(_ path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CairnError.invalidArgument("cannot read the passphrase file \(path)")
        }
        var text = String(decoding: data, as: UTF8.self)
        if text.hasSuffix("\n") { text.removeLast() }
        return text
    }
}
