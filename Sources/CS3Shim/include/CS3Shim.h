// CS3Shim: Cairn's door into libcurl (Debian's libcurl4-openssl-dev) for S3-compatible object
// storage.
//
// Why a shim and why libcurl: the backup code needs HTTP requests signed with AWS Signature
// Version 4. Debian's libs3 (2.0) signs only the retired V2 scheme, which current servers refuse;
// libcurl signs V4 itself (CURLOPT_AWS_SIGV4) and is maintained and on every machine. Swift sees
// one blocking call per request with plain C types; the S3 operations (put, get, list, multipart)
// are built on it in CairnBackup.S3Client. No signing code of Cairn's own.
#ifndef CS3_SHIM_H
#define CS3_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// A response: status, body (malloc'd; free with cs3_response_free) and the bytes that went over
// the wire each way (request and response bodies as libcurl counted them).
typedef struct {
    long status;
    uint8_t *body;
    size_t body_len;
    int64_t bytes_sent;
    int64_t bytes_received;
    char etag[256];
} cs3_response;

// Sets libcurl up once per process (curl_global_init). Call before any request; safe to repeat.
void cs3_global_init(void);

// Performs one request: `method` (GET, PUT, POST, DELETE, HEAD) on `url` (already percent-encoded,
// query in canonical order), signed SigV4 for `region` and service s3 with the key pair, the
// payload's SHA-256 sent as x-amz-content-sha256 (S3 requires it). `headers` are extra
// "Name: value" lines. 0 on a completed exchange (any HTTP status) with `out` filled; -1 on a
// transport failure with the reason in `err`.
int cs3_perform(const char *method, const char *url, const char *region, const char *access_key,
                const char *secret_key, const char *const *headers, size_t header_count,
                const uint8_t *body, size_t body_len, long timeout_seconds, cs3_response *out,
                char *err, size_t err_len);

// Frees a response's body.
void cs3_response_free(cs3_response *response);

// SHA-256 of `len` bytes into `digest` (32 bytes): content addresses and payload hashes
// (OpenSSL's, which libcurl already links).
void cs3_sha256(const uint8_t *data, size_t len, uint8_t digest[32]);

#ifdef __cplusplus
}
#endif

#endif
