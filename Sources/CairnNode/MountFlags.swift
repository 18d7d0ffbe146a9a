import CairnCSI
import CairnCore

/// Node-side rules for the `mount_flags` of a capability, on top of AccessRules' syntax checks.
enum MountFlags {
    /// Flags that would change what kind of mount(8) call is made (a bind instead of a device
    /// mount, a move, a remount of something else) or make mount(8) create directories: the CO
    /// must not be able to steer the operation itself, only tune it.
    static func check(_ flags: [String], field: String) throws {
        for flag in flags {
            let name = flag.split(separator: "=", maxSplits: 1).first.map(String.init) ?? flag
            let lower = name.lowercased()
            if forbidden.contains(lower) || lower.hasPrefix("make-") || lower.hasPrefix("x-mount.")
                || lower.contains(",") {
                throw CairnError.invalidArgument(
                    "\(field) must not contain \"\(Validate.printable(flag))\": it changes the mount operation itself, which the plugin decides; list plain options such as noatime or discard, one per entry")
            }
        }
    }

    static let forbidden: Set<String> = [
        "bind", "rbind", "move", "remount", "loop", "offset", "sizelimit", "owner", "group",
        "user", "users", "helper",
    ]

    /// Flags that apply to one mount point (mount_setattr/MS_REMOUNT|MS_BIND) and so can be
    /// carried to a bind mount; every other flag is a superblock option already applied when the
    /// volume was staged. `ro`/`rw` are excluded: read-only-ness is decided from the request.
    static let perMount: Set<String> = [
        "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime", "atime", "nodiratime",
        "diratime", "relatime", "norelatime", "strictatime", "nostrictatime", "nosymfollow", "symfollow",
    ]

    static func perMountOnly(_ flags: [String]) -> [String] {
        flags.filter { perMount.contains($0) }
    }

    static func asksReadOnly(_ flags: [String]) -> Bool { flags.contains("ro") }
}

/// CSI's names for access modes, for messages operators compare against their manifests.
func csiName(_ mode: AccessMode) -> String {
    switch mode {
    case .singleNodeWriter: "SINGLE_NODE_WRITER"
    case .singleNodeReaderOnly: "SINGLE_NODE_READER_ONLY"
    case .multiNodeReaderOnly: "MULTI_NODE_READER_ONLY"
    case .multiNodeSingleWriter: "MULTI_NODE_SINGLE_WRITER"
    case .multiNodeMultiWriter: "MULTI_NODE_MULTI_WRITER"
    case .singleNodeSingleWriter: "SINGLE_NODE_SINGLE_WRITER"
    case .singleNodeMultiWriter: "SINGLE_NODE_MULTI_WRITER"
    case .unknown: "UNKNOWN"
    case .UNRECOGNIZED(let value): "access mode \(value)"
    }
}

func csiName(rawMode: Int) -> String {
    csiName(AccessMode(rawValue: rawMode) ?? .unknown)
}
