// OpenSSL behind CCryptoShim.h. See the header for what each call promises.
#include "CCryptoShim.h"

#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

// The reason for the last failure: `what`, then OpenSSL's first queued error (the queue is emptied).
static int fail(char *err, size_t err_len, const char *what) {
    unsigned long code = ERR_get_error();
    if (err && err_len > 0) {
        if (code != 0) {
            char buf[256];
            ERR_error_string_n(code, buf, sizeof buf);
            snprintf(err, err_len, "%s: %s", what, buf);
        } else {
            snprintf(err, err_len, "%s", what);
        }
    }
    ERR_clear_error();
    return -1;
}

static int all_zero(const uint8_t *p, size_t len) {
    uint64_t acc = 0;
    for (size_t i = 0; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
        if ((i & 511) == 504 && acc) return 0;
    }
    return acc == 0;
}

int ccrypto_xts(const uint8_t key[64], int encrypt, int zero_passthrough, uint64_t first_unit, size_t unit, size_t count,
                const uint8_t *in, uint8_t *out, char *err, size_t err_len) {
    if (unit < 16 || unit % 16 != 0 || unit > (size_t)0x7fffffff) return fail(err, err_len, "XTS data unit size out of range");
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return fail(err, err_len, "EVP_CIPHER_CTX_new");
    int rc = 0;
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_xts(), NULL, key, NULL, encrypt) != 1) {
        rc = fail(err, err_len, "AES-256-XTS key setup");
    }
    for (size_t i = 0; rc == 0 && i < count; i++) {
        if (zero_passthrough && all_zero(in + i * unit, unit)) {
            if (out != in) memset(out + i * unit, 0, unit);
            continue;
        }
        uint8_t tweak[16] = {0};
        uint64_t n = first_unit + i;
        for (int b = 0; b < 8; b++) tweak[b] = (uint8_t)(n >> (8 * b));
        int written = 0;
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, tweak, encrypt) != 1
            || EVP_CipherUpdate(ctx, out + i * unit, &written, in + i * unit, (int)unit) != 1
            || (size_t)written != unit) {
            rc = fail(err, err_len, encrypt ? "AES-256-XTS encryption" : "AES-256-XTS decryption");
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int ccrypto_pbkdf2_sha256(const uint8_t *password, size_t password_len, const uint8_t *salt, size_t salt_len,
                          uint32_t iterations, uint8_t *out, size_t out_len, char *err, size_t err_len) {
    if (PKCS5_PBKDF2_HMAC((const char *)password, (int)password_len, salt, (int)salt_len, (int)iterations,
                          EVP_sha256(), (int)out_len, out) != 1) {
        return fail(err, err_len, "PBKDF2-HMAC-SHA256");
    }
    return 0;
}

static int gcm(int encrypt, const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
               const uint8_t *in, size_t len, uint8_t tag[16], uint8_t *out, char *err, size_t err_len) {
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) return fail(err, err_len, "EVP_CIPHER_CTX_new");
    int rc = 0, n = 0;
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL, encrypt) != 1
        || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1
        || EVP_CipherInit_ex(ctx, NULL, NULL, key, nonce, encrypt) != 1
        || (aad_len > 0 && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1)
        || EVP_CipherUpdate(ctx, out, &n, in, (int)len) != 1) {
        rc = fail(err, err_len, "AES-256-GCM");
    } else if (encrypt) {
        if (EVP_CipherFinal_ex(ctx, out + n, &n) != 1 || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag) != 1) {
            rc = fail(err, err_len, "AES-256-GCM seal");
        }
    } else {
        if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, tag) != 1) {
            rc = fail(err, err_len, "AES-256-GCM tag");
        } else if (EVP_CipherFinal_ex(ctx, out + n, &n) != 1) {
            ERR_clear_error();
            OPENSSL_cleanse(out, len);
            rc = 1;
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int ccrypto_gcm_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                     const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[16], char *err, size_t err_len) {
    return gcm(1, key, nonce, aad, aad_len, in, len, tag, out, err, err_len);
}

int ccrypto_gcm_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *aad, size_t aad_len,
                     const uint8_t *in, size_t len, const uint8_t tag[16], uint8_t *out, char *err, size_t err_len) {
    return gcm(0, key, nonce, aad, aad_len, in, len, (uint8_t *)tag, out, err, err_len);
}

int ccrypto_random(uint8_t *out, size_t len, char *err, size_t err_len) {
    if (RAND_bytes(out, (int)len) != 1) return fail(err, err_len, "RAND_bytes");
    return 0;
}

void ccrypto_cleanse(void *p, size_t len) { OPENSSL_cleanse(p, len); }
