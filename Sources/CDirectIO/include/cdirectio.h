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

#endif
