import CairnCore

// The kernel-facing half of the Node service: loop devices, filesystems and mounts.
//
// `Mounter` is the seam between CSI semantics (NodeService) and the machine. It has one Linux
// implementation (LinuxMounter) and, in the tests, an in-memory fake. When the node role runs
// in a container and the agent does the privileged work, the agent's client is another Mounter.
//
// What this module may not touch: the metadata store and volume backings (NodeService owns the
// records; the Mounter is told which file or device to work on and never chooses one itself).

/// What a device holds, according to `blkid -p`.
public enum DeviceContent: Sendable, Equatable, CustomStringConvertible {
    /// No signature at all: safe to format.
    case empty
    /// A filesystem (`TYPE` with `USAGE=filesystem`).
    case filesystem(String)
    /// Anything else that must never be formatted over: a partition table, RAID member, LUKS…
    case other(String)

    public var description: String {
        switch self {
        case .empty: "no filesystem"
        case .filesystem(let type): "a \(type) filesystem"
        case .other(let what): what
        }
    }
}

/// Capacity of a mounted filesystem (statvfs(3)).
public struct FilesystemStats: Sendable, Equatable {
    public var totalBytes: Int64
    public var availableBytes: Int64
    public var usedBytes: Int64
    public var totalInodes: Int64
    public var freeInodes: Int64
    public var usedInodes: Int64

    public init(totalBytes: Int64, availableBytes: Int64, usedBytes: Int64,
                totalInodes: Int64, freeInodes: Int64, usedInodes: Int64) {
        self.totalBytes = totalBytes
        self.availableBytes = availableBytes
        self.usedBytes = usedBytes
        self.totalInodes = totalInodes
        self.freeInodes = freeInodes
        self.usedInodes = usedInodes
    }
}

/// What is at a path (not following a final symlink).
public enum PathKind: String, Sendable, Equatable {
    case missing, directory, emptyFile = "emptyfile", file, blockDevice = "blockdevice", other
}

/// A path as the kernel sees it in one mount namespace.
public struct PathState: Sendable, Equatable {
    public var kind: PathKind
    /// The path with symlinks in its existing ancestors resolved: the form mountinfo uses.
    public var resolved: String
    /// Whether something is mounted exactly at the path.
    public var isMountPoint: Bool

    public init(kind: PathKind, resolved: String, isMountPoint: Bool) {
        self.kind = kind
        self.resolved = resolved
        self.isMountPoint = isMountPoint
    }
}

/// The process that named a mount namespace has exited (or its PID now belongs to another
/// process). A publish into it is refused; an unpublish finds nothing left to undo.
public struct MountNamespaceGone: StatusConvertible, CustomStringConvertible {
    public var pid: Int32
    public var reason: String

    public init(pid: Int32, reason: String) {
        self.pid = pid
        self.reason = reason
    }

    public var description: String { "process \(pid) \(reason)" }
    public var status: (code: StatusCode, message: String) {
        (.invalidArgument, "the mount namespace of process \(pid) cannot be used: \(reason); name a running process")
    }
}

/// The privileged operations the Node service needs: everything that touches the kernel or the
/// filesystem goes through here, so that the Node service can run in a container while the
/// agent does this work in the host's namespaces. Device and staging operations act in the
/// agent's (host) mount namespace; target-side operations take the namespace the target
/// lives in. Every method throws `CairnError` (or `MountNamespaceGone`) whose message names the
/// device or path and says what the operator can do about it.
public protocol Mounter: Sendable {
    /// Attaches `file` as a new loop device with direct I/O and returns its path (`/dev/loopN`).
    func attachLoop(file: String, readOnly: Bool) async throws -> String
    /// The loop devices currently backed by `file` (empty when none; never throws for a missing file).
    func loopDevices(backing file: String) async throws -> [String]
    /// Detaches a loop device. No error when it is already detached.
    func detachLoop(device: String) async throws
    /// What the device holds (`blkid -p`).
    func probe(device: String) async throws -> DeviceContent
    /// Creates a filesystem on an empty device. Callers must have probed it `.empty` first.
    func makeFilesystem(device: String, fsType: String) async throws
    /// Checks (and where safe, repairs) the filesystem before it is mounted; throws when it is
    /// damaged beyond automatic repair, so that a broken filesystem is never mounted.
    func checkFilesystem(device: String, fsType: String) async throws
    /// Mounts `device` at `target` (an existing directory in the host namespace).
    func mount(device: String, at target: String, fsType: String, options: [String]) async throws
    /// Size of a block device in bytes.
    func blockDeviceSize(device: String) async throws -> Int64
    /// After the volume's backing grew: makes the loop device see the new size, then grows the
    /// filesystem mounted at `mountPath` online (ext4: resize2fs, xfs: xfs_growfs); with an
    /// empty `fsType` (block access) only the device. Returns the device's new size.
    func expand(device: String, fsType: String, mountPath: String) async throws -> Int64

    /// Names the mount namespace of a running process; throws MountNamespaceGone when it is not.
    func namespace(ofProcess pid: Int32) async throws -> MountNamespace
    /// What is at `path` in `namespace`.
    func inspect(_ path: String, in namespace: MountNamespace) async throws -> PathState
    /// Creates a publish target — a directory (mount access) or an empty file (block access) —
    /// whose parent must exist. Returns whether it was created now (false: it already existed
    /// with the right kind). Refuses an existing path of the wrong kind.
    func makeTarget(_ path: String, for access: AccessType, in namespace: MountNamespace) async throws -> Bool
    /// Removes an unmounted target: an empty directory or an empty file (what makeTarget creates);
    /// refuses anything holding data. Returns whether something was removed.
    func removeTarget(_ path: String, in namespace: MountNamespace) async throws -> Bool
    /// Bind-mounts `source` (a directory or a device node in the host namespace) at `target` in
    /// `namespace`; `readOnly` makes the new mount point read-only; `options` are per-mount flags.
    func bindMount(source: String, at target: String, in namespace: MountNamespace, readOnly: Bool,
                   options: [String]) async throws
    /// Unmounts the topmost mount at `target` in `namespace`.
    func unmount(_ target: String, in namespace: MountNamespace) async throws
    /// Every mount visible in `namespace`, in mountinfo order (parents first), with mount points
    /// as seen from that namespace's root.
    func mountTable(in namespace: MountNamespace) async throws -> [MountInfo]
    /// Capacity and inode counts of the filesystem mounted at `path` in `namespace`.
    func filesystemStats(path: String, in namespace: MountNamespace) async throws -> FilesystemStats
}

extension Mounter {
    /// The topmost mount at exactly `path` (the one a process sees), or nil when nothing is
    /// mounted there. `path` must be resolved (PathState.resolved), as mountinfo paths are.
    public func mountInfo(at path: String, in namespace: MountNamespace = .host) async throws -> MountInfo? {
        try await mountTable(in: namespace).last { $0.mountPoint == path }
    }

    public func mountTable() async throws -> [MountInfo] { try await mountTable(in: .host) }

    /// The resolved form of a host path (for matching against the host's mount table).
    public func resolve(_ path: String, in namespace: MountNamespace = .host) async throws -> String {
        try await inspect(path, in: namespace).resolved
    }
}
