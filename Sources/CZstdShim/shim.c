#include "CZstdShim.h"

#include <zstd.h>

size_t czstd_bound(size_t len) { return ZSTD_compressBound(len); }

size_t czstd_compress(const uint8_t *src, size_t len, uint8_t *dst, size_t capacity, int level) {
    size_t n = ZSTD_compress(dst, capacity, src, len, level);
    return ZSTD_isError(n) ? 0 : n;
}

size_t czstd_decompress(const uint8_t *src, size_t len, uint8_t *dst, size_t capacity) {
    size_t n = ZSTD_decompress(dst, capacity, src, len);
    return ZSTD_isError(n) ? (size_t)-1 : n;
}
