#ifndef CDIRECTIO_H
#define CDIRECTIO_H

#include <stddef.h>
#include <stdint.h>

/// Writes two buffers to two places at once with Linux native AIO (io_submit: both requests
/// are in the device's queue together, so a journaled write costs one device round trip, not
/// two) and waits for both. `a` is `a_len1` bytes at `a1` followed by `a_len2` at `a2` (may be
/// 0), written to `fd_a` at `off_a`; `b` is `b_len` bytes at `b_buf` to `fd_b` at `off_b`.
/// Buffers, lengths and offsets must suit O_DIRECT. Falls back to two pwritev calls where AIO
/// is not available (the context is per thread, made on first use). Returns 0, or -errno of
/// the first that failed; a short completion is finished with plain writes.
int cdio_write_pair(int fd_a, const void *a1, size_t a_len1, const void *a2, size_t a_len2, int64_t off_a,
                    int fd_b, const void *b_buf, size_t b_len, int64_t off_b);

/// One write of `cdio_write_many`: `len1` bytes at `base1` followed by `len2` at `base2` (may
/// be 0), to `fd` at `offset`. `result` is set to 0 or -errno.
struct cdio_write {
    int fd;
    const void *base1;
    size_t len1;
    const void *base2;
    size_t len2;
    int64_t offset;
    int result;
};

/// Submits every write of `writes` to the kernel at once (native AIO: one io_submit per up to
/// 128 writes, so the device gets them together and is notified once) and waits for all of them.
/// Each write gets its own result; a short completion is finished with plain writes, and where
/// AIO is not available every write is a plain one. Buffers, lengths and offsets must suit
/// O_DIRECT.
void cdio_write_many(struct cdio_write *writes, int count);

#endif

/// Marks the calling thread (and the threads it starts afterwards) as an I/O flusher
/// (prctl PR_SET_IO_FLUSHER: its memory allocations never wait for writeback, which could be
/// writeback to a volume this very process serves). Returns 0, or -errno (EPERM without
/// CAP_SYS_RESOURCE; EINVAL before Linux 5.6).
int cdio_mark_io_flusher(void);
