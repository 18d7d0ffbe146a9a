#if canImport(Glibc)
import Glibc
#endif
import CairnCore
import CairnEngine
import CairnReplica
import Synchronization

// fallocate(2) and its flags are behind _GNU_SOURCE in the Glibc module.
@_silgen_name("fallocate")
private func fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ length: off_t) -> Int32
private let punchHole: Int32 = 0x02, keepSize: Int32 = 0x01

/// A one-machine encrypted volume's only "replica": its file under `<data-dir>/volumes/`, which
/// holds the ciphertext the engine writes (docs/encryption.md, "One machine"). Plain reads and
/// writes at the volume's offsets; no generations, epochs or resync (there is no other copy to
/// compare with, and one engine per machine serves it).
final class FileReplicaIO: ReplicaIO {
    let path: String
    private let fd: Int32
    private let closed = Mutex(false)

    init(path: String) throws {
        self.path = path
        fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path)", errno: errno) }
    }

    func claim(volumeID: String, epoch: UInt64) throws -> ReplicaStatus {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("fstat \(path)", errno: errno) }
        return ReplicaStatus(volumeID: volumeID, size: UInt64(st.st_size), blockSize: 4096, epoch: epoch,
                             flushedGeneration: 0, highestGeneration: 0)
    }

    func read(volumeID: String, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, epoch: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                if n == 0 { (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done); return }
                throw SystemError("pread \(path)", errno: errno)
            }
            done += n
        }
    }

    func write(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws {
        var done = 0
        while done < data.count {
            let n = pwrite(fd, data.baseAddress! + done, data.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw SystemError("pwrite \(path)", errno: errno) }
            done += n
        }
    }

    func flush(volumeID: String, epoch: UInt64) throws {
        guard fdatasync(fd) == 0 else { throw SystemError("fdatasync \(path)", errno: errno) }
    }

    func trim(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws {
        guard fallocate(fd, punchHole | keepSize, off_t(offset), off_t(length)) == 0 else {
            throw SystemError("fallocate(PUNCH_HOLE) \(path)", errno: errno)
        }
    }

    func grow(volumeID: String, sizeBytes: UInt64, epoch: UInt64) throws {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError("fstat \(path)", errno: errno) }
        if UInt64(st.st_size) < sizeBytes, ftruncate(fd, off_t(sizeBytes)) != 0 {
            throw SystemError("ftruncate \(path) to \(sizeBytes) bytes", errno: errno)
        }
    }

    func close() {
        let first = closed.withLock { done in
            defer { done = true }
            return !done
        }
        if first { _ = Glibc.close(fd) }
    }

    deinit { close() }

    var wireBytes: (sent: UInt64, received: UInt64) { (0, 0) }

    // Recovery, convergence between copies and snapshots at the engine do not happen for a
    // single local file: the engine runs without a recovery thread, and the one-machine backing
    // snapshots by copying the file.
    private func unsupported(_ what: String) -> CairnError {
        CairnError.internal("\(what) is not done on a one-machine volume's file (\(path))")
    }

    func generations(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        throw unsupported("comparing block generations")
    }

    func generationSummary(volumeID: String, firstRegion: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        throw unsupported("comparing region digests")
    }

    func writeIfNewer(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        throw unsupported("a resync write")
    }

    func repairWrite(volumeID: String, offset: UInt64, data: UnsafeRawBufferPointer, generation: UInt64, epoch: UInt64) throws -> Int {
        throw unsupported("a repair write")
    }

    func trimIfNewer(volumeID: String, offset: UInt64, length: UInt64, generation: UInt64, epoch: UInt64) throws -> Int {
        throw unsupported("a resync trim")
    }

    func verify(volumeID: String, firstBlock: UInt64, count: Int, epoch: UInt64) throws -> [UInt64] {
        throw unsupported("a scrub")
    }

    func snapshot(volumeID: String, snapshotID: String, epoch: UInt64) throws {
        throw unsupported("a snapshot at the engine")
    }
}
