// CRC-32C for the replica format and the data protocol. Compiled with optimisation whatever the
// build configuration (Package.swift), so debug builds and tests checksum at hardware speed too.
#include "ccrc32c.h"

#include <pthread.h>
#include <string.h>

#define POLY 0x82F63B78u /* reflected 0x1EDC6F41 */

static uint32_t table[8][256];
static int table_ready;

static void make_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t software(uint32_t c, const unsigned char *p, size_t n) {
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE)) make_table();
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = table[7][lo & 0xFF] ^ table[6][(lo >> 8) & 0xFF] ^ table[5][(lo >> 16) & 0xFF] ^ table[4][lo >> 24] ^
            table[3][hi & 0xFF] ^ table[2][(hi >> 8) & 0xFF] ^ table[1][(hi >> 16) & 0xFF] ^ table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__)
/* The crc32 instruction takes 3 cycles but the CPU can start one every cycle, so one chain of
 * them runs at a third of the possible speed. A long buffer is checksummed as three streams of
 * STREAM bytes at once (independent chains), then combined: the CRC register is linear, so
 * crc(c, A|B|C) = shift(crc(c, A), |B|+|C|) ^ shift(crc(0, B), |C|) ^ crc(0, C), where
 * shift(x, n) is x run through n zero bytes — four lookups in a table made once per n. A 4 KiB
 * block (every block map entry's checksum) is one such round plus 16 bytes. */
#define STREAM 1360 /* bytes per stream: a multiple of 8; 3 * STREAM <= 4096 */

static uint32_t shift_one[4][256]; /* through STREAM zero bytes */
static uint32_t shift_two[4][256]; /* through 2 * STREAM zero bytes */
static pthread_once_t shift_once = PTHREAD_ONCE_INIT;

__attribute__((target("sse4.2"))) static uint32_t through_zeros(uint32_t c, size_t n) {
    uint64_t c64 = c;
    for (size_t i = 0; i < n; i += 8) c64 = __builtin_ia32_crc32di(c64, 0);
    return (uint32_t)c64;
}

static void make_shift(uint32_t t[4][256], size_t n) {
    for (int k = 0; k < 4; k++)
        for (uint32_t v = 0; v < 256; v++) t[k][v] = through_zeros(v << (8 * k), n);
}

static void make_shifts(void) {
    make_shift(shift_one, STREAM);
    make_shift(shift_two, 2 * STREAM);
}

static inline uint32_t shifted(uint32_t t[4][256], uint32_t c) {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t hardware(uint32_t c, const unsigned char *p, size_t n) {
    if (n >= 3 * STREAM) {
        pthread_once(&shift_once, make_shifts);
        do {
            uint64_t a = c, b = 0, d = 0;
            for (size_t i = 0; i < STREAM; i += 8) {
                uint64_t va, vb, vd;
                memcpy(&va, p + i, 8);
                memcpy(&vb, p + STREAM + i, 8);
                memcpy(&vd, p + 2 * STREAM + i, 8);
                a = __builtin_ia32_crc32di(a, va);
                b = __builtin_ia32_crc32di(b, vb);
                d = __builtin_ia32_crc32di(d, vd);
            }
            c = shifted(shift_two, (uint32_t)a) ^ shifted(shift_one, (uint32_t)b) ^ (uint32_t)d;
            p += 3 * STREAM;
            n -= 3 * STREAM;
        } while (n >= 3 * STREAM);
    }
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = __builtin_ia32_crc32di(c64, v);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}

static int has_hardware(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}
#else
static uint32_t hardware(uint32_t c, const unsigned char *p, size_t n) { return software(c, p, n); }
static int has_hardware(void) { return 0; }
#endif

static int mode = -1; /* -1 unknown, 0 software, 1 hardware */

int cairn_crc32c_hardware(void) {
    int m = __atomic_load_n(&mode, __ATOMIC_RELAXED);
    if (m < 0) {
        m = has_hardware() ? 1 : 0;
        __atomic_store_n(&mode, m, __ATOMIC_RELAXED);
    }
    return m;
}

uint32_t cairn_crc32c(uint32_t crc, const void *data, size_t length) {
    uint32_t c = ~crc;
    c = cairn_crc32c_hardware() ? hardware(c, data, length) : software(c, data, length);
    return ~c;
}

uint32_t cairn_crc32c_software(uint32_t crc, const void *data, size_t length) {
    return ~software(~crc, data, length);
}
