import CairnCore
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Target-path work in the caller's own mount namespace: what NodePublish creates and
/// NodeUnpublish removes. Shared by LinuxMounter (host namespace) and the tests' fake.
public enum HostPaths {
    public static func inspect(_ path: String, mountTable: [MountInfo]) -> PathState {
        let resolved = Validate.realPath(path) ?? resolvedAncestor(path)
        var st = stat()
        let kind: PathKind
        if lstat(path, &st) != 0 {
            kind = .missing
        } else {
            switch st.st_mode & S_IFMT {
            case S_IFDIR: kind = .directory
            case S_IFREG: kind = st.st_size == 0 ? .emptyFile : .file
            case S_IFBLK: kind = .blockDevice
            default: kind = .other
            }
        }
        return PathState(kind: kind, resolved: resolved, isMountPoint: mountTable.contains { $0.mountPoint == resolved })
    }

    /// The deepest existing ancestor resolved, with the missing rest appended.
    static func resolvedAncestor(_ path: String) -> String {
        var head = path
        var tail: [String] = []
        while head != "/" && !head.isEmpty {
            if let real = Validate.realPath(head) {
                return ([real == "/" ? "" : real] + tail.reversed()).joined(separator: "/")
            }
            tail.append((head as NSString).lastPathComponent)
            head = (head as NSString).deletingLastPathComponent
        }
        return path
    }

    public static func makeTarget(_ path: String, for access: AccessType) throws -> Bool {
        var st = stat()
        if lstat(path, &st) == 0 {
            switch (access, st.st_mode & S_IFMT) {
            case (.mount, S_IFDIR), (.block, S_IFREG), (.block, S_IFBLK):
                return false
            case (.mount, _):
                throw CairnError.failedPrecondition(
                    "target_path \(path) exists and is not a directory; mount access needs a directory there: remove it or use another target")
            case (.block, _):
                throw CairnError.failedPrecondition(
                    "target_path \(path) exists and is not a regular file; block access binds the device onto a file: remove it or use another target")
            }
        }
        let parent = (path as NSString).deletingLastPathComponent
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: parent, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw CairnError.failedPrecondition(
                "the parent directory \(parent) of target_path does not exist; the CO must create it before NodePublishVolume")
        }
        switch access {
        case .mount:
            if mkdir(path, 0o750) != 0 {
                let e = errno
                if e == EEXIST { return false }
                throw CairnError.internal("could not create the target directory \(path): \(String(cString: strerror(e)))")
            }
        case .block:
            let fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o640)
            if fd < 0 {
                let e = errno
                if e == EEXIST { return false }
                throw CairnError.internal("could not create the target file \(path): \(String(cString: strerror(e)))")
            }
            close(fd)
        }
        return true
    }

    /// Removes an unmounted target: an empty directory or an empty file (what makeTarget
    /// creates). Anything holding data is left alone: the target is not the volume, and
    /// deleting what the plugin did not create is never safe.
    public static func removeTarget(_ path: String) throws -> Bool {
        var st = stat()
        guard lstat(path, &st) == 0 else { return false }
        switch st.st_mode & S_IFMT {
        case S_IFDIR:
            if rmdir(path) != 0 {
                let e = errno
                if e == ENOENT { return false }
                throw CairnError.failedPrecondition(
                    "could not remove the target directory \(path) after unmounting: \(String(cString: strerror(e))); it holds files the plugin did not put there, remove them by hand")
            }
        case S_IFREG where st.st_size == 0:
            if unlink(path) != 0 && errno != ENOENT {
                let e = errno
                throw CairnError.internal("could not remove the target file \(path): \(String(cString: strerror(e)))")
            }
        default:
            throw CairnError.failedPrecondition(
                "target_path \(path) is neither an empty directory nor an empty file after unmounting; remove it by hand")
        }
        return true
    }

    /// Names a running process's mount namespace from /proc/PID/stat (field 22, starttime).
    public static func namespace(ofProcess pid: Int32, proc: String = "/proc") throws -> MountNamespace {
        guard pid > 0 else { throw MountNamespaceGone(pid: pid, reason: "is not a valid process id") }
        guard let stat = ProcFile.textIfReadable("\(proc)/\(pid)/stat"),
              let close = stat.lastIndex(of: ")") else {
            throw MountNamespaceGone(pid: pid, reason: "does not exist (has the container exited?)")
        }
        // Fields after the command name: state is field 3, starttime field 22.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 19, let start = UInt64(fields[19]) else {
            throw CairnError.internal("cannot parse \(proc)/\(pid)/stat")
        }
        if fields[0] == "Z" || fields[0] == "X" {
            throw MountNamespaceGone(pid: pid, reason: "has exited")
        }
        return .process(pid: pid, startTime: start)
    }
}
