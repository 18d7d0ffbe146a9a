// CZstdShim: Cairn's door into Debian's libzstd, for the blocks of a backup.
//
// Why a shim: two calls with plain C types (the one-shot ZSTD_compress / ZSTD_decompress) keep
// zstd's large header and its macros out of Swift.
#ifndef CZSTD_SHIM_H
#define CZSTD_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The largest compressed size of `len` bytes (ZSTD_compressBound).
size_t czstd_bound(size_t len);

// Compresses at `level` into dst (capacity czstd_bound). The compressed length, or 0 on failure.
size_t czstd_compress(const uint8_t *src, size_t len, uint8_t *dst, size_t capacity, int level);

// Decompresses one frame into dst; the decompressed length, or (size_t)-1 when the frame is
// damaged or does not fit.
size_t czstd_decompress(const uint8_t *src, size_t len, uint8_t *dst, size_t capacity);

#ifdef __cplusplus
}
#endif

#endif
