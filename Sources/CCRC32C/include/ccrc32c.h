#ifndef CCRC32C_H
#define CCRC32C_H

#include <stddef.h>
#include <stdint.h>

/* CRC-32C (Castagnoli) of `length` bytes, continuing from `crc` (0 to start; pass the previous
 * result to chain). Uses the CPU's crc32 instruction (SSE4.2 on x86_64, the CRC extension on
 * arm64) when present, a table otherwise: the same result either way. */
uint32_t cairn_crc32c(uint32_t crc, const void *data, size_t length);

/* The table implementation alone (what machines without the instruction run; for tests). */
uint32_t cairn_crc32c_software(uint32_t crc, const void *data, size_t length);

/* 1 when the hardware instruction is used. */
int cairn_crc32c_hardware(void);

#endif
