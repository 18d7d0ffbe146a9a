// A one-file FUSE filesystem over libfuse3's low-level API, for Cairn's volume engine.
//
// The mounted directory holds exactly one regular file, `volume` (mode 0600, owned by root, of
// the volume's size). Every read, write, flush and trim on it is handed to the callbacks below,
// synchronously, on one of the session's worker threads (at most CFUSE_MAX_THREADS at a time):
// a callback may block until the replicas answer. This header is free of libfuse types.
#ifndef CFUSE_SHIM_H
#define CFUSE_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CFUSE_MAX_THREADS 16
#define CFUSE_MAX_WRITE (1u << 20)

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
} cfuse_callbacks;

typedef struct cfuse_session cfuse_session;

/// Mounts the filesystem at `mountpoint` (an existing directory; a FUSE mount there that answers
/// ENOTCONN is detached first, but a killed process's mount may not: see `DeadFUSEMounts`) and starts the multi-threaded loop on its own thread.
/// `name` becomes the fsname `cairn:<name>`. On failure returns NULL and writes a message to
/// `error` (at most `error_size` bytes, NUL-terminated).
cfuse_session *cfuse_mount(const char *mountpoint, const char *name, uint64_t size,
                           const cfuse_callbacks *callbacks, void *context,
                           char *error, size_t error_size);

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

#ifdef __cplusplus
}
#endif
#endif
