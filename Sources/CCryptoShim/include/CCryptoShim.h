// OpenSSL's ciphers for volume encryption at rest (docs/encryption.md), behind a plain C header.
// Nothing here is a primitive of its own: AES-256-XTS, AES-256-GCM, PBKDF2-HMAC-SHA256 and the
// random generator are OpenSSL's (libcrypto 3). The only importer is CairnCrypto.
#ifndef CCRYPTOSHIM_H
#define CCRYPTOSHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Encrypts (encrypt = 1) or decrypts (encrypt = 0) `count` consecutive units of `unit` bytes
// from `in` to `out` (they may be the same buffer) with AES-256-XTS under the 64-byte `key`.
// Unit i's tweak is (first_unit + i) as a 16-byte little-endian number (dm-crypt's plain64).
// With `zero_passthrough`, an input unit of all zeros is output as zeros (not transformed).
// 0 on success, -1 on failure (then `err` says why).
int ccrypto_xts(const uint8_t key[64], int encrypt, int zero_passthrough, uint64_t first_unit, size_t unit, size_t count,
                const uint8_t *in, uint8_t *out, char *err, size_t err_len);

// PBKDF2-HMAC-SHA256 of `password` with `salt` and `iterations` into `out_len` bytes.
int ccrypto_pbkdf2_sha256(const uint8_t *password, size_t password_len, const uint8_t *salt, size_t salt_len,
                          uint32_t iterations, uint8_t *out, size_t out_len, char *err, size_t err_len);

// AES-256-GCM seal of `len` bytes with a 12-byte nonce and additional data: `out` gets the
// ciphertext (`len` bytes) and `tag` the 16-byte tag.
int ccrypto_gcm_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                     const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[16], char *err, size_t err_len);

// AES-256-GCM open: 0 and the plaintext in `out`; 1 when the tag does not verify (wrong key or
// altered input: `out` is zeroed); -1 on another failure.
int ccrypto_gcm_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                     const uint8_t *in, size_t len, const uint8_t tag[16], uint8_t *out, char *err, size_t err_len);

// `len` bytes from OpenSSL's CSPRNG.
int ccrypto_random(uint8_t *out, size_t len, char *err, size_t err_len);

// Zeroes `len` bytes in a way the compiler keeps (OPENSSL_cleanse).
void ccrypto_cleanse(void *p, size_t len);

#ifdef __cplusplus
}
#endif

#endif
