import CSIProto
import CairnCore

public typealias AccessMode = Csi_V1_VolumeCapability.AccessMode.Mode

/// What one CSI VolumeCapability asks for, after validation.
public struct RequestedAccess: Sendable, Equatable {
    public var accessType: AccessType
    /// "" for block access, else the filesystem ("" in the request means the volume's default).
    public var fsType: String
    public var mountFlags: [String]
    public var mode: AccessMode

    public init(accessType: AccessType, fsType: String, mountFlags: [String], mode: AccessMode) {
        self.accessType = accessType
        self.fsType = fsType
        self.mountFlags = mountFlags
        self.mode = mode
    }
}

/// Cairn's access-mode rules (docs/design.md, "Access modes"), following the spec's tables:
/// - SINGLE_NODE_MULTI_WRITER: one node; any number of read-write targets on it.
/// - SINGLE_NODE_WRITER / SINGLE_NODE_SINGLE_WRITER: one node; one target on it.
/// - SINGLE_NODE_READER_ONLY: one node; one target, read-only.
/// - MULTI_NODE_READER_ONLY: many nodes, every attachment and target read-only. Safe because
///   nothing writes; the filesystem is mounted with `ro` (and `norecovery` for xfs).
/// - MULTI_NODE_SINGLE_WRITER / MULTI_NODE_MULTI_WRITER: refused. Ext4 and xfs are not cluster
///   filesystems; two writers would corrupt the volume (design invariant 2: one writer).
public enum AccessRules {
    public static let supportedFilesystems = ["ext4", "xfs"]
    public static let defaultFilesystem = "ext4"

    public static func isSupported(_ mode: AccessMode) -> Bool {
        switch mode {
        case .singleNodeWriter, .singleNodeReaderOnly, .multiNodeReaderOnly,
             .singleNodeSingleWriter, .singleNodeMultiWriter: true
        default: false
        }
    }

    public static func isSingleNode(_ mode: AccessMode) -> Bool {
        switch mode {
        case .singleNodeWriter, .singleNodeReaderOnly, .singleNodeSingleWriter, .singleNodeMultiWriter: true
        default: false
        }
    }

    /// The spec's second-NodePublish table: may the volume be published at several target
    /// paths on one node?
    public static func allowsSeveralTargets(_ mode: AccessMode) -> Bool {
        switch mode {
        case .singleNodeMultiWriter, .multiNodeReaderOnly, .multiNodeSingleWriter, .multiNodeMultiWriter: true
        default: false
        }
    }

    public static func isReaderOnly(_ mode: AccessMode) -> Bool {
        mode == .singleNodeReaderOnly || mode == .multiNodeReaderOnly
    }

    /// Why `capability` cannot be honoured, or nil when it can.
    public static func unsupportedReason(_ capability: Csi_V1_VolumeCapability) -> String? {
        do {
            _ = try parse(capability, field: "volume_capability")
            return nil
        } catch let e as CairnError {
            return e.message
        } catch {
            return "\(error)"
        }
    }

    /// Validates one capability; INVALID_ARGUMENT names the field and the reason.
    public static func parse(_ capability: Csi_V1_VolumeCapability, field: String) throws -> RequestedAccess {
        guard capability.hasAccessMode, capability.accessMode.mode != .unknown else {
            throw CairnError.invalidArgument("\(field).access_mode is required")
        }
        let mode = capability.accessMode.mode
        guard isSupported(mode) else {
            throw CairnError.invalidArgument(
                "\(field).access_mode \(mode) is not supported: Cairn volumes have one writer; use SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, SINGLE_NODE_READER_ONLY or MULTI_NODE_READER_ONLY")
        }
        switch capability.accessType {
        case .block:
            return RequestedAccess(accessType: .block, fsType: "", mountFlags: [], mode: mode)
        case .mount(let mount):
            if !mount.fsType.isEmpty && !supportedFilesystems.contains(mount.fsType) {
                throw CairnError.invalidArgument(
                    "\(field).mount.fs_type \"\(Validate.printable(mount.fsType))\" is not supported; use one of \(supportedFilesystems.joined(separator: ", "))")
            }
            for flag in mount.mountFlags {
                if flag.isEmpty || flag.utf8.count > 256
                    || flag.unicodeScalars.contains(where: { $0.value <= 0x20 || $0.value == 0x7F }) {
                    throw CairnError.invalidArgument("\(field).mount.mount_flags has an invalid flag \"\(Validate.printable(flag))\"")
                }
            }
            if !mount.volumeMountGroup.isEmpty {
                throw CairnError.invalidArgument("\(field).mount.volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not advertised)")
            }
            return RequestedAccess(accessType: .mount, fsType: mount.fsType, mountFlags: mount.mountFlags, mode: mode)
        case nil:
            throw CairnError.invalidArgument("\(field) must set an access type (block or mount)")
        }
    }

    public static func parseAll(_ capabilities: [Csi_V1_VolumeCapability], field: String) throws -> [RequestedAccess] {
        if capabilities.isEmpty { throw CairnError.invalidArgument("\(field) is required") }
        return try capabilities.enumerated().map { try parse($1, field: "\(field)[\($0)]") }
    }
}
