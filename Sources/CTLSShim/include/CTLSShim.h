// CTLSShim: Cairn's only door into OpenSSL (Debian's libssl3, TLS 1.3).
//
// What it does, and nothing more: makes a cluster CA and the certificates it issues (ECDSA
// P-256, SPIFFE URIs in the subjectAltName), runs a mutual TLS 1.3 handshake over a connected
// blocking socket and exports keys from it (RFC 8446 7.5), seals and opens records with
// AES-256-GCM (or, authenticating only, ChaCha20-Poly1305) under those keys, and signs/verifies short messages with a certificate's key.
// Every primitive is OpenSSL's; the record layer is TLS 1.3's construction (per-direction key,
// nonce = IV xor sequence number) so one thread may send while another receives.
#ifndef CTLS_SHIM_H
#define CTLS_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ctls_ctx ctls_ctx;
typedef struct ctls_aead ctls_aead;
// A piece of a record's data (records are sealed from pieces without copying them together).
typedef struct {
    const uint8_t *base;
    size_t len;
} ctls_part;

// Writes a new self-signed CA: key_path (mode 0600) and cert_path. `uri` (may be NULL) goes into
// the CA's subjectAltName. 0 on success; -1 with a reason in err.
int ctls_ca_create(const char *common_name, const char *uri, int days, const char *key_path,
                   const char *cert_path, char *err, size_t err_len);

// Issues a leaf certificate signed by the CA in ca_key_path/ca_cert_path with a new P-256 key.
// `san` is an OpenSSL subjectAltName value ("URI:spiffe://x/node/n1,DNS:n1,IP:10.0.0.1").
// Writes key_path (0600) and cert_path (the leaf then the CA certificate).
int ctls_cert_issue(const char *ca_key_path, const char *ca_cert_path, const char *common_name,
                    const char *san, int days, const char *key_path, const char *cert_path,
                    char *err, size_t err_len);

// Facts about the first certificate of a PEM file: its URI subjectAltNames joined by '\n'
// (uris), its subject (one line), and its notBefore/notAfter as Unix seconds.
int ctls_cert_file_info(const char *cert_path, char *uris, size_t uris_len, char *subject,
                        size_t subject_len, int64_t *not_before, int64_t *not_after, char *err,
                        size_t err_len);

// A TLS 1.3 context that presents cert_path/key_path and trusts only the CAs in ca_path; it
// requires and verifies the peer's certificate in both directions. NULL with a reason in err.
ctls_ctx *ctls_ctx_new(const char *ca_path, const char *cert_path, const char *key_path,
                       char *err, size_t err_len);
void ctls_ctx_free(ctls_ctx *ctx);

// Runs the handshake on the connected blocking socket `fd` (the caller sets its timeouts),
// then exchanges one byte each way inside TLS: this side's `mode`, answered with the peer's
// (peer_mode). On success writes the peer certificate's URI SANs ('\n'-joined) and keys_len
// bytes exported with `label`, and returns 0; the socket then carries no TLS state (no ticket,
// no close_notify is ever sent). -1 with a reason in err on any failure.
int ctls_handshake(ctls_ctx *ctx, int fd, int is_server, uint8_t mode, uint8_t *peer_mode,
                   char *peer_uris, size_t peer_uris_len, const char *label, uint8_t *keys,
                   size_t keys_len, char *err, size_t err_len);

// One direction of a connection, with a 32-byte key and 12-byte IV; record n uses nonce IV xor n.
// `encrypt` 1: AES-256-GCM, the data encrypted; 0: ChaCha20-Poly1305 with the data as associated
// data (it travels in the clear and only goes into the tag: a Poly1305 MAC per record).
ctls_aead *ctls_aead_new(const uint8_t *key, const uint8_t *iv, int encrypt, int sealing);
void ctls_aead_free(ctls_aead *a);
// Seals the next record: `aad` (the record header) and the data in `parts`; with encrypt,
// `out` (the parts' total length) receives the ciphertext; writes the 16-byte tag. 0, or -1.
int ctls_aead_seal(ctls_aead *a, const uint8_t *aad, size_t aad_len, const ctls_part *parts,
                   size_t part_count, uint8_t *out, uint8_t *tag);
// Opens the next record: with encrypt, decrypts into `out` (may be `data`). 0 when the tag
// matches; -1 otherwise (the connection must then be dropped).
int ctls_aead_open(ctls_aead *a, const uint8_t *aad, size_t aad_len, const uint8_t *data,
                   size_t len, uint8_t *out, const uint8_t *tag);

// Signs msg with the context's private key (ECDSA/SHA-256 or the key type's default);
// sig_len in: capacity, out: length.
int ctls_ctx_sign(ctls_ctx *ctx, const uint8_t *msg, size_t msg_len, uint8_t *sig,
                  size_t *sig_len, char *err, size_t err_len);
// The context's own leaf certificate, DER; der_len in: capacity, out: length (needed length
// with -1 when too small).
int ctls_ctx_cert_der(ctls_ctx *ctx, uint8_t *der, size_t *der_len);
// Verifies that cert_der chains to the context's CAs (and is valid now) and that sig signs msg
// under its key; writes the certificate's URI SANs. 0, or -1 with a reason.
int ctls_ctx_verify_signed(ctls_ctx *ctx, const uint8_t *cert_der, size_t cert_len,
                           const uint8_t *msg, size_t msg_len, const uint8_t *sig,
                           size_t sig_len, char *uris, size_t uris_len, char *err,
                           size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
