// A one-file FUSE filesystem over libfuse3's low-level API, for Cairn's volume engine.
//
// The mounted directory holds exactly one regular file, `volume` (mode 0600, owned by root, of
// the volume's size). Every read, write, flush and trim on it is handed to the callbacks below,
// synchronously, on one of the session's worker threads (at most CFUSE_MAX_THREADS at a time):
// a callback may block until the replicas answer. This header is free of libfuse types.
#ifndef CFUSE_SHIM_H
#define CFUSE_SHIM_H

#include <spawn.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CFUSE_MAX_THREADS 32
#define CFUSE_MAX_WRITE (1u << 20)

/// Reads of at most this many blocks may go asynchronously (below).
#define CFUSE_ASYNC_READ_MAX_BLOCKS 64
/// `read_begin`'s answer when it filled the plan: the shim reads it through its io_uring.
#define CFUSE_READ_PLANNED (-1000000)
/// `read_end`'s answer when the read must be done again the ordinary way (`read_again`, on a
/// thread of its own: it may wait for locks the completion thread must never wait for).
#define CFUSE_READ_AGAIN (-1000001)

/// An asynchronous read of the volume file (docs/engine.md, "Asynchronous reads"): what
/// `read_begin` plans — one file range read into the request's buffer — and what `read_end` is
/// handed back. The shim owns it; the callbacks fill and read the fields.
typedef struct cfuse_read_plan {
    /// Filled by `read_begin`: the descriptor and byte offset the blocks are read from.
    int fd;
    uint64_t file_offset;
    /// The callbacks' own: what `read_end` needs to check and finish the read.
    uint64_t began;
    uint64_t zero_mask;
    void *owner;
    /// CFUSE_ASYNC_READ_MAX_BLOCKS slots the callbacks may fill (e.g. expected checksums).
    uint32_t *crc;
    /// Set by the shim before `read_end`: 1 when the FUSE worker read the blocks itself (the
    /// only read in flight: no batch to share), 0 when the ring did.
    int inline_read;
} cfuse_read_plan;

typedef struct cfuse_callbacks {
    /// Fill `buf` with `size` bytes at `offset` (the shim already clipped the range to the
    /// volume). Returns the number of bytes filled (== size) or -errno.
    ssize_t (*read)(void *context, uint64_t offset, size_t size, void *buf);
    /// Write `size` bytes at `offset` (within the volume). Returns 0 or -errno.
    int (*write)(void *context, uint64_t offset, const void *buf, size_t size);
    /// Make every acknowledged write durable (fsync, fdatasync, and flush on close). 0 or -errno.
    int (*flush)(void *context);
    /// Discard [offset, offset+length) (reads as zeros afterwards). 0 or -errno.
    int (*trim)(void *context, uint64_t offset, uint64_t length);
    /// Optional (NULL: every read goes through `read`). A read of whole 4 KiB blocks (at most
    /// CFUSE_ASYNC_READ_MAX_BLOCKS) into `buf` (4 KiB-aligned): either done here — the byte
    /// count or -errno, as `read` — or planned: `plan`'s fd and file_offset filled and
    /// CFUSE_READ_PLANNED returned. The shim then reads `size` bytes from there into `buf` on
    /// its io_uring, many reads in one submission, and the worker goes back to the kernel.
    ssize_t (*read_begin)(void *context, uint64_t offset, size_t size, void *buf, cfuse_read_plan *plan);
    /// A planned read's end, on the session's completion thread (or on the worker that read
    /// it, when it was the only read in flight): `result` is what the kernel read (bytes, or
    /// -errno). Returns the bytes to answer (== size), -errno, or
    /// CFUSE_READ_AGAIN. It must not block on anything a reader may hold.
    ssize_t (*read_end)(void *context, uint64_t offset, size_t size, void *buf, ssize_t result,
                        cfuse_read_plan *plan);
    /// A planned read `read_end` sent back (CFUSE_READ_AGAIN), done again into `buf`, on the
    /// session's redo thread. The bytes to answer (== size) or -errno.
    ssize_t (*read_again)(void *context, uint64_t offset, size_t size, void *buf, cfuse_read_plan *plan);
    /// Optional: `bytes` of the session's buffers went back to the kernel because the volume was
    /// idle (`cfuse_set_idle_trim`); on a worker or the session's loop thread.
    void (*buffers_released)(void *context, uint64_t bytes);
} cfuse_callbacks;

typedef struct cfuse_session cfuse_session;

/// Mounts the filesystem at `mountpoint` (an existing directory; a FUSE mount there that answers
/// ENOTCONN is detached first, but a killed process's mount may not: see `DeadFUSEMounts`) and starts the multi-threaded loop on its own thread.
/// `name` becomes the fsname `cairn:<name>`. On failure returns NULL and writes a message to
/// `error` (at most `error_size` bytes, NUL-terminated).
cfuse_session *cfuse_mount(const char *mountpoint, const char *name, uint64_t size,
                           const cfuse_callbacks *callbacks, void *context,
                           char *error, size_t error_size);

/// Whether the session reads asynchronously (1), or why not (0, with the reason in `reason`:
/// no `read_begin`, io_uring refused by the kernel, turned off).
int cfuse_async_reads(const cfuse_session *session, char *reason, size_t reason_size);

/// Whether a FUSE worker reads a planned read itself when it is the only read in flight (1, the
/// default: no hand-off to the ring's thread at queue depth 1) or always hands it to the ring (0).
void cfuse_set_inline_reads(cfuse_session *session, int on);

/// Gives the session's buffers back to the kernel once no request has arrived for
/// `milliseconds` (0: never, the default): each FUSE worker's request and read buffers (up to
/// 3 MiB each, resident as far as the largest requests touched them) and the read ring's kept
/// buffers (256 KiB each). A worker drops its own buffers between two requests, woken by a
/// signal (`cfuse_idle_trim_signal`) only while it waits for a request; nothing is dropped while
/// it is in use. Again after the next request, never twice for one idle spell.
void cfuse_set_idle_trim(cfuse_session *session, unsigned milliseconds);

/// The signal that wakes idle workers to drop their buffers (a real-time signal with a handler
/// that does nothing, unblocked only while a worker waits for a request), or 0 when none could
/// be set up (its handler was taken): then only the ring's buffers are dropped, and `reason`
/// says why.
int cfuse_idle_trim_signal(char *reason, size_t reason_size);

/// The session's idle trims so far, the bytes they gave back, and the bytes of its buffers
/// resident now (workers' request and read buffers and the ring's kept buffers, by mincore).
void cfuse_buffer_stats(cfuse_session *session, uint64_t *trims, uint64_t *released, uint64_t *resident);

/// A write answered later (`cfuse_defer_write`).
typedef struct cfuse_deferred_write cfuse_deferred_write;

/// Called from inside the `write` callback, on its thread: the write is answered later, by
/// `cfuse_answer_write` (any thread), instead of when the callback returns — the worker goes
/// back to the kernel for the next request meanwhile. Returns NULL outside a `write` callback
/// (the callback then returns its result as usual). The callback must have finished with `buf`
/// (the worker reuses it) and must answer every deferred write before the session's stop can
/// end: the stop waits for them.
cfuse_deferred_write *cfuse_defer_write(void);

/// Answers a deferred write: `result` 0 (the whole write done) or -errno. Frees `write`.
void cfuse_answer_write(cfuse_deferred_write *write, int result);

/// Unmounts (lazily, so a loop device still holding the file does not block it), aborts the
/// kernel connection if the loop does not end by itself (a mount someone detached lazily while a
/// loop device still uses it), joins the loop thread and frees the session. After it returns no
/// callback runs any more. Returns 1 if the connection had to be aborted, 0 otherwise.
int cfuse_unmount(cfuse_session *session);

/// Sets the volume file's size (online growth; never smaller) and invalidates the kernel's
/// cached attributes of the file, so the next stat — and `losetup -c` on a loop device over it —
/// sees the new size at once instead of after the attribute timeout. Returns 0 or -errno.
int cfuse_set_size(cfuse_session *session, uint64_t size);

/// Aborts the kernel's FUSE connection `connection` (the minor of the mount's st_dev, as in
/// /proc/self/mountinfo's `0:N`) through fusectl, mounting /sys/fs/fuse/connections for the
/// write if needed: every pending and later request fails with ENOTCONN. 0 is ignored.
void cfuse_abort_connection(unsigned connection);

/// The kernel's FUSE connection id of the mount (the minor of its st_dev), 0 if unknown.
unsigned cfuse_connection_id(const cfuse_session *session);

/// The FUSE protocol minor the kernel offered at INIT (>= 40: it can resend requests in flight).
unsigned cfuse_protocol_minor(const cfuse_session *session);

/// The session's /dev/fuse descriptor (owned by the session; duplicate it to keep it).
int cfuse_device_fd(const cfuse_session *session);

/// Serves a FUSE connection whose daemon died, from `device_fd` (a /dev/fuse descriptor kept
/// open meanwhile, so the kernel kept the mount at `mountpoint` and every request in flight).
/// The session duplicates the descriptor. `proto_minor` is the protocol minor the connection
/// was negotiated at (cfuse_protocol_minor of the first session). The loop starts at once;
/// call cfuse_resend afterwards to have the kernel hand out again what the dead daemon had
/// read but not answered. NULL and `error` on failure (e.g. a kernel older than 7.40).
cfuse_session *cfuse_resume(int device_fd, const char *mountpoint, const char *name, uint64_t size,
                            unsigned proto_minor, const cfuse_callbacks *callbacks, void *context,
                            char *error, size_t error_size);

/// FUSE_NOTIFY_RESEND on the session's connection. 0 or -errno (-EINVAL: the kernel does not
/// know the notification, i.e. older than 6.9).
int cfuse_resend(cfuse_session *session);

/// sendmsg of `length` bytes with `fd` (if >= 0) as SCM_RIGHTS. Bytes sent or -errno.
ssize_t cfuse_send_with_fd(int socket_fd, const void *data, size_t length, int fd);

/// recvmsg into `data`; `*fd` is the descriptor received (close-on-exec) or -1. Bytes or -errno.
ssize_t cfuse_receive_with_fd(int socket_fd, void *data, size_t capacity, int *fd);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34): the child gets no descriptor >= first.
int cfuse_spawn_close_from(posix_spawn_file_actions_t *actions, int first);

#ifdef __cplusplus
}
#endif
#endif
