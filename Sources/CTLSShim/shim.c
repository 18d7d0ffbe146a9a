// OpenSSL behind CTLSShim.h. See the header for what each call promises.
#include "CTLSShim.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <stdlib.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

struct ctls_ctx {
    SSL_CTX *ssl;
};

struct ctls_aead {
    EVP_CIPHER_CTX *cipher;
    uint8_t iv[12];
    uint64_t seq;
    int encrypt;
    int sealing;
};

// The reason for the last failure: `what`, then OpenSSL's queued errors (the queue is emptied).
static void fail(char *err, size_t err_len, const char *what) {
    if (!err || err_len == 0) { ERR_clear_error(); return; }
    size_t used = (size_t)snprintf(err, err_len, "%s", what);
    unsigned long code;
    const char *sep = ": ";
    while ((code = ERR_get_error()) != 0 && used + 1 < err_len) {
        char buf[256];
        ERR_error_string_n(code, buf, sizeof buf);
        // "error:0A000086:SSL routines::certificate verify failed" -> keep the reason part.
        const char *reason = strrchr(buf, ':');
        reason = reason ? reason + 1 : buf;
        used += (size_t)snprintf(err + used, err_len - used, "%s%s", sep, reason);
        sep = "; ";
    }
}

static void fail_errno(char *err, size_t err_len, const char *what, const char *path) {
    snprintf(err, err_len, "%s %s: %s", what, path, strerror(errno));
}

static EVP_PKEY *load_key(const char *path, char *err, size_t err_len) {
    FILE *f = fopen(path, "r");
    if (!f) { fail_errno(err, err_len, "cannot open the private key", path); return NULL; }
    EVP_PKEY *key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (!key) {
        char what[512];
        snprintf(what, sizeof what, "%s holds no PEM private key", path);
        fail(err, err_len, what);
    }
    return key;
}

static X509 *load_cert(const char *path, char *err, size_t err_len) {
    FILE *f = fopen(path, "r");
    if (!f) { fail_errno(err, err_len, "cannot open the certificate", path); return NULL; }
    X509 *cert = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (!cert) {
        char what[512];
        snprintf(what, sizeof what, "%s holds no PEM certificate", path);
        fail(err, err_len, what);
    }
    return cert;
}

static int write_pem(const char *path, int is_key, EVP_PKEY *key, X509 *cert, X509 *ca,
                     char *err, size_t err_len) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, is_key ? 0600 : 0644);
    if (fd < 0) { fail_errno(err, err_len, "cannot create", tmp); return -1; }
    FILE *f = fdopen(fd, "w");
    if (!f) { close(fd); fail_errno(err, err_len, "cannot open", tmp); return -1; }
    int ok = is_key ? PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL)
                    : (PEM_write_X509(f, cert) && (!ca || PEM_write_X509(f, ca)));
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) ok = 0;
    if (fclose(f) != 0) ok = 0;
    if (!ok) { unlink(tmp); fail(err, err_len, "cannot write PEM"); return -1; }
    if (rename(tmp, path) != 0) { fail_errno(err, err_len, "cannot rename into", path); unlink(tmp); return -1; }
    return 0;
}

static int add_ext(X509 *cert, X509 *issuer, int nid, const char *value) {
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, issuer, cert, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    if (!ext) return 0;
    int ok = X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    return ok;
}

// A certificate for `key` named `cn`, valid from 5 minutes ago for `days`, with a random
// 127-bit serial; signed later.
static X509 *new_cert(EVP_PKEY *key, const char *cn, int days) {
    X509 *cert = X509_new();
    if (!cert) return NULL;
    BIGNUM *serial = BN_new();
    int ok = X509_set_version(cert, 2) && serial && BN_rand(serial, 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) &&
             BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(cert)) &&
             X509_gmtime_adj(X509_getm_notBefore(cert), -300) &&
             X509_gmtime_adj(X509_getm_notAfter(cert), (long)days * 86400L) &&
             X509_set_pubkey(cert, key);
    BN_free(serial);
    X509_NAME *name = X509_get_subject_name(cert);
    ok = ok && X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8, (const unsigned char *)"cairn", -1, -1, 0) &&
         X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0);
    if (!ok) { X509_free(cert); return NULL; }
    return cert;
}

int ctls_ca_create(const char *common_name, const char *uri, int days, const char *key_path,
                   const char *cert_path, char *err, size_t err_len) {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    if (!key) { fail(err, err_len, "cannot generate a P-256 key"); return -1; }
    X509 *cert = new_cert(key, common_name, days);
    int ok = cert && X509_set_issuer_name(cert, X509_get_subject_name(cert)) &&
             add_ext(cert, cert, NID_basic_constraints, "critical,CA:TRUE") &&
             add_ext(cert, cert, NID_key_usage, "critical,keyCertSign,cRLSign,digitalSignature") &&
             add_ext(cert, cert, NID_subject_key_identifier, "hash");
    if (ok && uri) {
        char san[1100];
        snprintf(san, sizeof san, "URI:%s", uri);
        ok = add_ext(cert, cert, NID_subject_alt_name, san);
    }
    ok = ok && X509_sign(cert, key, EVP_sha256()) > 0;
    int rc = -1;
    if (!ok) fail(err, err_len, "cannot build the CA certificate");
    else if (write_pem(key_path, 1, key, NULL, NULL, err, err_len) == 0 &&
             write_pem(cert_path, 0, NULL, cert, NULL, err, err_len) == 0) rc = 0;
    X509_free(cert);
    EVP_PKEY_free(key);
    return rc;
}

int ctls_cert_issue(const char *ca_key_path, const char *ca_cert_path, const char *common_name,
                    const char *san, int days, const char *key_path, const char *cert_path,
                    char *err, size_t err_len) {
    EVP_PKEY *ca_key = load_key(ca_key_path, err, err_len);
    if (!ca_key) return -1;
    X509 *ca = load_cert(ca_cert_path, err, err_len);
    if (!ca) { EVP_PKEY_free(ca_key); return -1; }
    int rc = -1;
    EVP_PKEY *key = NULL;
    X509 *cert = NULL;
    if (X509_check_private_key(ca, ca_key) != 1) {
        fail(err, err_len, "the CA key does not match the CA certificate");
        goto out;
    }
    key = EVP_EC_gen("P-256");
    if (!key) { fail(err, err_len, "cannot generate a P-256 key"); goto out; }
    cert = new_cert(key, common_name, days);
    int ok = cert && X509_set_issuer_name(cert, X509_get_subject_name(ca)) &&
             add_ext(cert, ca, NID_basic_constraints, "critical,CA:FALSE") &&
             add_ext(cert, ca, NID_key_usage, "critical,digitalSignature") &&
             add_ext(cert, ca, NID_ext_key_usage, "serverAuth,clientAuth") &&
             add_ext(cert, ca, NID_subject_key_identifier, "hash") &&
             add_ext(cert, ca, NID_authority_key_identifier, "keyid:always") &&
             (!san || !*san || add_ext(cert, ca, NID_subject_alt_name, san)) &&
             X509_sign(cert, ca_key, EVP_sha256()) > 0;
    if (!ok) { fail(err, err_len, "cannot build the certificate (check the --ip and --dns values)"); goto out; }
    if (write_pem(key_path, 1, key, NULL, NULL, err, err_len) == 0 &&
        write_pem(cert_path, 0, NULL, cert, ca, err, err_len) == 0) rc = 0;
out:
    X509_free(cert);
    EVP_PKEY_free(key);
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    return rc;
}

// The URI subjectAltNames of `cert`, '\n'-joined into out.
static void uris_of(X509 *cert, char *out, size_t out_len) {
    if (!out || out_len == 0) return;
    out[0] = 0;
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    if (!names) return;
    size_t used = 0;
    for (int i = 0; i < sk_GENERAL_NAME_num(names); i++) {
        GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);
        if (name->type != GEN_URI) continue;
        const unsigned char *data = ASN1_STRING_get0_data(name->d.uniformResourceIdentifier);
        int len = ASN1_STRING_length(name->d.uniformResourceIdentifier);
        if (used + (size_t)len + 2 > out_len) break;
        if (used > 0) out[used++] = '\n';
        memcpy(out + used, data, (size_t)len);
        used += (size_t)len;
        out[used] = 0;
    }
    GENERAL_NAMES_free(names);
}

static int64_t unix_time(const ASN1_TIME *t) {
    struct tm tm;
    if (ASN1_TIME_to_tm(t, &tm) != 1) return 0;
    return (int64_t)timegm(&tm);
}

int ctls_cert_file_info(const char *cert_path, char *uris, size_t uris_len, char *subject,
                        size_t subject_len, int64_t *not_before, int64_t *not_after, char *err,
                        size_t err_len) {
    X509 *cert = load_cert(cert_path, err, err_len);
    if (!cert) return -1;
    uris_of(cert, uris, uris_len);
    if (subject && subject_len) X509_NAME_oneline(X509_get_subject_name(cert), subject, (int)subject_len);
    if (not_before) *not_before = unix_time(X509_get0_notBefore(cert));
    if (not_after) *not_after = unix_time(X509_get0_notAfter(cert));
    X509_free(cert);
    return 0;
}

ctls_ctx *ctls_ctx_new(const char *ca_path, const char *cert_path, const char *key_path,
                       char *err, size_t err_len) {
    SSL_CTX *ssl = SSL_CTX_new(TLS_method());
    if (!ssl) { fail(err, err_len, "cannot create a TLS context"); return NULL; }
    char what[4200];
    if (!SSL_CTX_set_min_proto_version(ssl, TLS1_3_VERSION) ||
        !SSL_CTX_set_max_proto_version(ssl, TLS1_3_VERSION)) {
        fail(err, err_len, "this OpenSSL cannot do TLS 1.3");
        goto bad;
    }
    if (SSL_CTX_use_certificate_chain_file(ssl, cert_path) != 1) {
        snprintf(what, sizeof what, "cannot load the certificate %s", cert_path);
        fail(err, err_len, what);
        goto bad;
    }
    if (SSL_CTX_use_PrivateKey_file(ssl, key_path, SSL_FILETYPE_PEM) != 1) {
        snprintf(what, sizeof what, "cannot load the private key %s", key_path);
        fail(err, err_len, what);
        goto bad;
    }
    if (SSL_CTX_check_private_key(ssl) != 1) {
        snprintf(what, sizeof what, "the private key %s does not match the certificate %s", key_path, cert_path);
        fail(err, err_len, what);
        goto bad;
    }
    if (SSL_CTX_load_verify_locations(ssl, ca_path, NULL) != 1) {
        snprintf(what, sizeof what, "cannot load the trusted CA certificates %s", ca_path);
        fail(err, err_len, what);
        goto bad;
    }
    SSL_CTX_set_verify(ssl, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_num_tickets(ssl, 0);
    SSL_CTX_set_options(ssl, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ssl, SSL_SESS_CACHE_OFF);
    ctls_ctx *ctx = malloc(sizeof *ctx);
    if (!ctx) { snprintf(err, err_len, "out of memory"); goto bad; }
    ctx->ssl = ssl;
    return ctx;
bad:
    SSL_CTX_free(ssl);
    return NULL;
}

void ctls_ctx_free(ctls_ctx *ctx) {
    if (!ctx) return;
    SSL_CTX_free(ctx->ssl);
    free(ctx);
}

// Why an SSL call failed, with the peer-certificate verdict when that is the reason.
static void ssl_fail(SSL *ssl, int rc, char *err, size_t err_len, const char *what) {
    int code = SSL_get_error(ssl, rc);
    long verify = SSL_get_verify_result(ssl);
    char buf[512];
    if (verify != X509_V_OK) {
        snprintf(buf, sizeof buf, "%s: the peer's certificate was refused (%s)", what,
                 X509_verify_cert_error_string(verify));
        fail(err, err_len, buf);
        return;
    }
    if (code == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) snprintf(buf, sizeof buf, "%s: timed out", what);
        else if (errno == 0 || rc == 0) snprintf(buf, sizeof buf, "%s: the peer closed the connection", what);
        else snprintf(buf, sizeof buf, "%s: %s", what, strerror(errno));
        snprintf(err, err_len, "%s", buf);
        return;
    }
    if (code == SSL_ERROR_ZERO_RETURN) {
        snprintf(err, err_len, "%s: the peer closed the connection", what);
        ERR_clear_error();
        return;
    }
    fail(err, err_len, what);
}

int ctls_handshake(ctls_ctx *ctx, int fd, int is_server, uint8_t mode, uint8_t *peer_mode,
                   char *peer_uris, size_t peer_uris_len, const char *label, uint8_t *keys,
                   size_t keys_len, char *err, size_t err_len) {
    ERR_clear_error();
    SSL *ssl = SSL_new(ctx->ssl);
    if (!ssl) { fail(err, err_len, "cannot create a TLS session"); return -1; }
    int rc = -1;
    if (SSL_set_fd(ssl, fd) != 1) { fail(err, err_len, "cannot attach the socket"); goto out; }
    errno = 0;
    int r = is_server ? SSL_accept(ssl) : SSL_connect(ssl);
    if (r != 1) { ssl_fail(ssl, r, err, err_len, "TLS handshake failed"); goto out; }
    // TLS 1.3 reports a refused client certificate only after the client's handshake is done:
    // the mode bytes make both sides see the verdict before any data flows.
    uint8_t theirs = 0;
    if (is_server) {
        errno = 0;
        r = SSL_read(ssl, &theirs, 1);
        if (r != 1) { ssl_fail(ssl, r, err, err_len, "TLS handshake failed"); goto out; }
        r = SSL_write(ssl, &mode, 1);
        if (r != 1) { ssl_fail(ssl, r, err, err_len, "TLS handshake failed"); goto out; }
    } else {
        r = SSL_write(ssl, &mode, 1);
        if (r != 1) { ssl_fail(ssl, r, err, err_len, "TLS handshake failed"); goto out; }
        errno = 0;
        r = SSL_read(ssl, &theirs, 1);
        if (r != 1) { ssl_fail(ssl, r, err, err_len, "TLS handshake failed"); goto out; }
    }
    if (SSL_pending(ssl) > 0) { snprintf(err, err_len, "the peer sent data before the handshake finished"); goto out; }
    *peer_mode = theirs;
    X509 *peer = SSL_get1_peer_certificate(ssl);
    if (!peer) { snprintf(err, err_len, "the peer presented no certificate"); goto out; }
    uris_of(peer, peer_uris, peer_uris_len);
    X509_free(peer);
    if (SSL_export_keying_material(ssl, keys, keys_len, label, strlen(label), NULL, 0, 0) != 1) {
        fail(err, err_len, "cannot export keys from the TLS session");
        goto out;
    }
    rc = 0;
out:
    // SSL_set_fd's BIO does not own the socket; no close_notify is sent (SSL_shutdown is not
    // called), so the socket carries only what the caller sends next.
    SSL_free(ssl);
    return rc;
}

ctls_aead *ctls_aead_new(const uint8_t *key, const uint8_t *iv, int encrypt, int sealing) {
    ctls_aead *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    a->cipher = EVP_CIPHER_CTX_new();
    if (!a->cipher) { free(a); return NULL; }
    // Encrypting: AES-256-GCM (AES-NI and carry-less multiply, stitched). Authenticating only:
    // ChaCha20-Poly1305 with the data as associated data, i.e. a Poly1305 MAC under a one-time
    // key per record, faster than GHASH over the same bytes (measured: 12.9 vs 8.7 GB/s).
    const EVP_CIPHER *aead = encrypt ? EVP_aes_256_gcm() : EVP_chacha20_poly1305();
    int ok = sealing ? EVP_EncryptInit_ex(a->cipher, aead, NULL, key, NULL)
                     : EVP_DecryptInit_ex(a->cipher, aead, NULL, key, NULL);
    if (!ok) { EVP_CIPHER_CTX_free(a->cipher); free(a); return NULL; }
    memcpy(a->iv, iv, 12);
    a->encrypt = encrypt;
    a->sealing = sealing;
    return a;
}

void ctls_aead_free(ctls_aead *a) {
    if (!a) return;
    EVP_CIPHER_CTX_free(a->cipher);
    free(a);
}

static void next_nonce(ctls_aead *a, uint8_t nonce[12]) {
    memcpy(nonce, a->iv, 12);
    uint64_t seq = a->seq++;
    for (int i = 0; i < 8; i++) nonce[11 - i] ^= (uint8_t)(seq >> (8 * i));
}

// Feeds `data` as AAD in pieces an int can count.
static int add_aad(EVP_CIPHER_CTX *c, int sealing, const uint8_t *data, size_t len) {
    int outl;
    while (len > 0) {
        int chunk = len > (1u << 30) ? (1 << 30) : (int)len;
        int ok = sealing ? EVP_EncryptUpdate(c, NULL, &outl, data, chunk) : EVP_DecryptUpdate(c, NULL, &outl, data, chunk);
        if (!ok) return 0;
        data += chunk;
        len -= (size_t)chunk;
    }
    return 1;
}

int ctls_aead_seal(ctls_aead *a, const uint8_t *aad, size_t aad_len, const ctls_part *parts,
                   size_t part_count, uint8_t *out, uint8_t *tag) {
    if (!a->sealing || a->seq == UINT64_MAX) return -1;
    uint8_t nonce[12];
    next_nonce(a, nonce);
    if (!EVP_EncryptInit_ex(a->cipher, NULL, NULL, NULL, nonce)) return -1;
    if (!add_aad(a->cipher, 1, aad, aad_len)) return -1;
    size_t written = 0;
    for (size_t i = 0; i < part_count; i++) {
        if (parts[i].len == 0) continue;
        if (!a->encrypt) {
            if (!add_aad(a->cipher, 1, parts[i].base, parts[i].len)) return -1;
            continue;
        }
        if (parts[i].len > (1u << 30)) return -1;
        int outl = 0;
        if (!EVP_EncryptUpdate(a->cipher, out + written, &outl, parts[i].base, (int)parts[i].len)) return -1;
        written += (size_t)outl;
    }
    int fin = 0;
    uint8_t scratch[16];
    if (!EVP_EncryptFinal_ex(a->cipher, a->encrypt ? out + written : scratch, &fin)) return -1;
    if (!EVP_CIPHER_CTX_ctrl(a->cipher, EVP_CTRL_AEAD_GET_TAG, 16, tag)) return -1;
    return 0;
}

int ctls_aead_open(ctls_aead *a, const uint8_t *aad, size_t aad_len, const uint8_t *data,
                   size_t len, uint8_t *out, const uint8_t *tag) {
    if (a->sealing || a->seq == UINT64_MAX || len > (1u << 30)) return -1;
    uint8_t nonce[12];
    next_nonce(a, nonce);
    int outl = 0;
    if (!EVP_DecryptInit_ex(a->cipher, NULL, NULL, NULL, nonce)) return -1;
    if (!add_aad(a->cipher, 0, aad, aad_len)) return -1;
    if (a->encrypt) {
        if (len > 0 && !EVP_DecryptUpdate(a->cipher, out, &outl, data, (int)len)) return -1;
    } else if (!add_aad(a->cipher, 0, data, len)) return -1;
    if (!EVP_CIPHER_CTX_ctrl(a->cipher, EVP_CTRL_AEAD_SET_TAG, 16, (void *)tag)) return -1;
    int fin = 0;
    uint8_t scratch[16];
    if (EVP_DecryptFinal_ex(a->cipher, out ? out + outl : scratch, &fin) <= 0) return -1;
    return 0;
}

int ctls_ctx_sign(ctls_ctx *ctx, const uint8_t *msg, size_t msg_len, uint8_t *sig,
                  size_t *sig_len, char *err, size_t err_len) {
    EVP_PKEY *key = SSL_CTX_get0_privatekey(ctx->ssl);
    if (!key) { snprintf(err, err_len, "no private key"); return -1; }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int ok = md && EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, key) == 1 &&
             EVP_DigestSign(md, sig, sig_len, msg, msg_len) == 1;
    EVP_MD_CTX_free(md);
    if (!ok) { fail(err, err_len, "cannot sign"); return -1; }
    return 0;
}

int ctls_ctx_cert_der(ctls_ctx *ctx, uint8_t *der, size_t *der_len) {
    X509 *cert = SSL_CTX_get0_certificate(ctx->ssl);
    if (!cert) return -1;
    int n = i2d_X509(cert, NULL);
    if (n <= 0) return -1;
    if ((size_t)n > *der_len) { *der_len = (size_t)n; return -1; }
    unsigned char *p = der;
    *der_len = (size_t)i2d_X509(cert, &p);
    return 0;
}

int ctls_ctx_verify_signed(ctls_ctx *ctx, const uint8_t *cert_der, size_t cert_len,
                           const uint8_t *msg, size_t msg_len, const uint8_t *sig,
                           size_t sig_len, char *uris, size_t uris_len, char *err,
                           size_t err_len) {
    ERR_clear_error();
    const unsigned char *p = cert_der;
    X509 *cert = d2i_X509(NULL, &p, (long)cert_len);
    if (!cert || p != cert_der + cert_len) {
        X509_free(cert);
        fail(err, err_len, "the signer's certificate does not parse");
        return -1;
    }
    int rc = -1;
    X509_STORE_CTX *verify = X509_STORE_CTX_new();
    if (!verify || X509_STORE_CTX_init(verify, SSL_CTX_get_cert_store(ctx->ssl), cert, NULL) != 1) {
        fail(err, err_len, "cannot verify the signer's certificate");
        goto out;
    }
    if (X509_verify_cert(verify) != 1) {
        char what[256];
        snprintf(what, sizeof what, "the signer's certificate was refused (%s)",
                 X509_verify_cert_error_string(X509_STORE_CTX_get_error(verify)));
        fail(err, err_len, what);
        goto out;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int ok = md && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, X509_get0_pubkey(cert)) == 1 &&
             EVP_DigestVerify(md, sig, sig_len, msg, msg_len) == 1;
    EVP_MD_CTX_free(md);
    if (!ok) { fail(err, err_len, "the signature does not verify"); goto out; }
    uris_of(cert, uris, uris_len);
    rc = 0;
out:
    X509_STORE_CTX_free(verify);
    X509_free(cert);
    return rc;
}
