import Foundation

/// Parser for /proc/<pid>/mountinfo (proc(5)):
///
///     36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
///     (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)
///
/// (7) is zero or more optional fields ended by the "-" separator (8). The kernel escapes
/// space, tab, newline and backslash in paths as three-digit octal (`\040`, `\011`, `\012`,
/// `\134`), so splitting on single spaces is exact.
public enum MountTable {
    /// Parses a whole mountinfo file. Lines that do not have the documented shape are skipped
    /// (a newer kernel may add fields after the separator; those are ignored, not fatal).
    public static func parse(_ text: String) -> [MountInfo] {
        text.split(separator: "\n", omittingEmptySubsequences: true).compactMap { parseLine(Substring($0)) }
    }

    /// Reads and parses a mountinfo file whole (`ProcFile`: a long table comes in pieces).
    public static func read(_ path: String = "/proc/self/mountinfo") throws -> [MountInfo] {
        parse(try ProcFile.text(path))
    }

    public static func parseLine(_ line: Substring) -> MountInfo? {
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count >= 10,
              let separator = fields[6...].firstIndex(of: "-"),
              fields.count >= separator + 3,
              let mountID = Int(fields[0]), let parentID = Int(fields[1]) else { return nil }
        let devParts = fields[2].split(separator: ":")
        guard devParts.count == 2, let major = UInt32(devParts[0]), let minor = UInt32(devParts[1]) else {
            return nil
        }
        let superOptions = fields.count > separator + 3 ? options(fields[separator + 3]) : []
        return MountInfo(
            mountID: mountID, parentID: parentID, major: major, minor: minor,
            root: unescape(fields[3]), mountPoint: unescape(fields[4]),
            mountOptions: options(fields[5]),
            optionalFields: fields[6..<separator].map(String.init),
            fsType: unescape(fields[separator + 1]), source: unescape(fields[separator + 2]),
            superOptions: superOptions)
    }

    static func options(_ field: Substring) -> [String] {
        field.split(separator: ",").map { unescape($0) }
    }

    /// Undoes the kernel's octal escapes (`\040` → space). A backslash not followed by three
    /// octal digits is kept as is.
    public static func unescape(_ field: Substring) -> String {
        guard field.contains("\\") else { return String(field) }
        let bytes = Array(field.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
               let a = octal(bytes[i + 1]), let b = octal(bytes[i + 2]), let c = octal(bytes[i + 3]),
               a <= 3 {
                out.append(a << 6 | b << 3 | c)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func octal(_ b: UInt8) -> UInt8? {
        b >= UInt8(ascii: "0") && b <= UInt8(ascii: "7") ? b - UInt8(ascii: "0") : nil
    }
}

/// One line of /proc/self/mountinfo (proc(5)), unescaped.
public struct MountInfo: Sendable, Equatable {
    public var mountID: Int
    public var parentID: Int
    public var major: UInt32
    public var minor: UInt32
    /// The directory of the source filesystem that is mounted here ("/" for a whole filesystem;
    /// for a bind mount of a device node, the node's path inside devtmpfs, e.g. "/loop3").
    public var root: String
    public var mountPoint: String
    /// Per-mount options (ro/rw, nosuid, nodev, noexec, relatime…).
    public var mountOptions: [String]
    /// Optional fields such as `shared:1` or `master:2`.
    public var optionalFields: [String]
    public var fsType: String
    /// The mount source, e.g. `/dev/loop3` (or "none", "tmpfs"…).
    public var source: String
    /// Per-superblock options.
    public var superOptions: [String]

    public init(mountID: Int, parentID: Int, major: UInt32, minor: UInt32, root: String,
                mountPoint: String, mountOptions: [String], optionalFields: [String],
                fsType: String, source: String, superOptions: [String]) {
        self.mountID = mountID
        self.parentID = parentID
        self.major = major
        self.minor = minor
        self.root = root
        self.mountPoint = mountPoint
        self.mountOptions = mountOptions
        self.optionalFields = optionalFields
        self.fsType = fsType
        self.source = source
        self.superOptions = superOptions
    }

    /// Read-only at the mount point (a bind mount made read-only) or at the superblock (e.g. ext4
    /// remounted itself read-only after I/O errors with errors=remount-ro).
    public var isReadOnly: Bool { mountOptions.contains("ro") || superOptions.contains("ro") }
}
