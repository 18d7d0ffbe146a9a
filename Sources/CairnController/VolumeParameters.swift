import CairnCSI
import CairnCore

/// CreateVolume / GetCapacity parameters (StorageClass parameters, Mesos profile parameters).
/// Every key is validated: a typo must fail loudly, not be silently ignored.
struct VolumeParameters: Equatable {
    static let known = ["fsType", "replicas", "minInSync", EncryptionNames.parameter, "restoreFrom", VolumeRecord.writeThroughParameter]
    /// Keys the Kubernetes external-provisioner may pass through; accepted and not stored.
    static let ignoredPrefixes = ["csi.storage.k8s.io/"]

    var fsType: String?
    var replicas: Int = 1
    /// Writes are refused while fewer replicas than this are in sync (Kafka's
    /// `min.insync.replicas`); 1 (the default) acknowledges a write on any one in-sync replica.
    var minInSync: Int = 1
    /// `encrypted: "true"`: every block is encrypted by the engine before it leaves the node
    /// (docs/encryption.md).
    var encrypted = false
    /// `replicas` when the request named it (cluster mode defaults to 3, one machine to 1).
    var explicitReplicas: Int? { stored["replicas"] == nil ? nil : replicas }
    /// The parameters Cairn stores (normalised, without ignored keys).
    var stored: [String: String] = [:]
    /// `restoreFrom: backup:<target>/<id>`: the volume is restored from that backup, as if the
    /// request named it as its content source (Mesos disk profiles have no content source).
    var restoreFrom: String?

    init(_ raw: [String: String]) throws {
        for (key, value) in raw.sorted(by: { $0.key < $1.key }) {
            if Self.ignoredPrefixes.contains(where: { key.hasPrefix($0) }) { continue }
            switch key {
            case "fsType":
                guard AccessRules.supportedFilesystems.contains(value) else {
                    throw CairnError.invalidArgument(
                        "parameter fsType=\"\(Validate.printable(value))\" is not supported; use one of \(AccessRules.supportedFilesystems.joined(separator: ", "))")
                }
                fsType = value
            case "replicas":
                guard let n = Int(value), (1...5).contains(n) else {
                    throw CairnError.invalidArgument("parameter replicas=\"\(Validate.printable(value))\" must be a whole number from 1 to 5")
                }
                replicas = n
            case "minInSync":
                guard let n = Int(value), (1...5).contains(n) else {
                    throw CairnError.invalidArgument("parameter minInSync=\"\(Validate.printable(value))\" must be a whole number from 1 to 5 (and at most replicas)")
                }
                minInSync = n
            case EncryptionNames.parameter:
                guard value == "true" || value == "false" else {
                    throw CairnError.invalidArgument("parameter \(key)=\"\(Validate.printable(value))\" must be \"true\" or \"false\"")
                }
                encrypted = value == "true"
            case VolumeRecord.writeThroughParameter:
                guard value == "true" || value == "false" else {
                    throw CairnError.invalidArgument("parameter \(key)=\"\(Validate.printable(value))\" must be \"true\" (the default: every write durable when answered, commits fastest) or \"false\" (writes durable at the application's flushes: more throughput for writers that rarely flush)")
                }
            case "restoreFrom":
                let id = value.hasPrefix(BackupReference.scheme) ? value : BackupReference.scheme + value
                guard try BackupReference.parse(id) != nil else { throw CairnError.invalidArgument("parameter restoreFrom must name a backup") }
                restoreFrom = id
            default:
                throw CairnError.invalidArgument(
                    "unknown parameter \"\(Validate.printable(key))\"; Cairn accepts \(Self.known.joined(separator: ", ")) (and ignores csi.storage.k8s.io/* keys)")
            }
            stored[key] = value
        }
    }
}
