import Foundation

/// Where a volume's bytes live. Today: one sparse file per volume on this machine
/// (`LocalFileBacking`). The replicated engine (issue 4) replaces this with a FUSE-exposed file
/// whose writes fan out to replicas; the controller and node services do not change.
public protocol VolumeBacking: Sendable {
    /// Creates the storage for `volume` (idempotent: an existing backing of the right size is kept).
    func create(_ volume: VolumeRecord) throws
    /// Removes the storage. No error when it is already gone.
    func delete(volumeID: String) throws
    /// The file a node attaches as a loop device.
    func file(volumeID: String) throws -> String
    /// Health as CSI's VolumeCondition wants it: nil when healthy, else what is wrong.
    func problem(volumeID: String, expectedBytes: Int64) -> String?
}

/// One sparse file per volume under `<data-dir>/volumes/`. Volume ids are validated before
/// they get here (`Validate.volumeID`), so the join below cannot leave the directory.
public struct LocalFileBacking: VolumeBacking {
    public let directory: String

    public init(dataDir: String) throws {
        directory = dataDir + "/volumes"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
    }

    public func file(volumeID: String) throws -> String {
        try Validate.volumeID(volumeID)
        return "\(directory)/\(volumeID).img"
    }

    public func create(_ volume: VolumeRecord) throws {
        let path = try file(volumeID: volume.id)
        let fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("fstat \(path)", errno: errno) }
        if st.st_size < volume.capacityBytes {
            // Sparse: blocks are allocated on first write (thin provisioning).
            guard ftruncate(fd, off_t(volume.capacityBytes)) == 0 else {
                throw SystemError("ftruncate \(path) to \(volume.capacityBytes) bytes", errno: errno)
            }
        }
        guard fsync(fd) == 0 else { throw SystemError("fsync \(path)", errno: errno) }
    }

    public func delete(volumeID: String) throws {
        let path = try file(volumeID: volumeID)
        if unlink(path) != 0 && errno != ENOENT { throw SystemError("unlink \(path)", errno: errno) }
    }

    public func problem(volumeID: String, expectedBytes: Int64) -> String? {
        guard let path = try? file(volumeID: volumeID) else { return "invalid volume id" }
        var st = stat()
        if stat(path, &st) != 0 {
            return "the volume's backing file \(path) is missing (\(String(cString: strerror(errno))))"
        }
        if st.st_size < expectedBytes {
            return "the volume's backing file is \(st.st_size) bytes, expected \(expectedBytes)"
        }
        return nil
    }
}
