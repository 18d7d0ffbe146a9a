// CGRPCShim: the only door from Swift into Debian's libgrpc++ (C++).
//
// Why it exists: Swift cannot call C++ templates or virtual classes portably, and the data path
// must not depend on gRPC. This header is plain C with opaque handles; everything C++ stays in
// shim.cpp. Bytes are passed raw: protobuf encoding happens in Swift (swift-protobuf).
#ifndef CGRPC_SHIM_H
#define CGRPC_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cgrpc_server cgrpc_server;
typedef struct cgrpc_call cgrpc_call;
typedef struct cgrpc_channel cgrpc_channel;

// A TLS identity as three PEM files (the names cert-manager writes: ca.crt, tls.crt, tls.key).
// The shim reads the files itself, so that a private key never passes through Swift and can
// never end up in a log line or an error; errors name the files, never their contents.
// `ca_path` is required (the peer is always verified); `cert_path` and `key_path` go together
// and may both be NULL for a client that presents no certificate.
typedef struct cgrpc_tls_files {
  const char *ca_path;
  const char *cert_path;
  const char *key_path;
} cgrpc_tls_files;

// Reads and checks TLS files with OpenSSL, the way the server and channel functions below do:
// the CA file holds at least one certificate, the certificate file a leaf (then intermediates),
// the key file an unencrypted private key matching the leaf, which has not expired. Returns 0,
// or -1 with the reason in `err`. Exists so that Swift can refuse bad files at start with a
// clear message instead of a failed handshake later.
int cgrpc_tls_check(const cgrpc_tls_files *files, char *err, size_t err_len);

// Called on a gRPC thread once a unary request has been read. `call_id` is unique for the life
// of the server. The callee must return quickly and later call cgrpc_call_finish(call, ...)
// exactly once (from any thread). `deadline_ms` is the milliseconds left until the client's
// deadline, or -1 when it set none. `method` is not NUL-terminated.
typedef void (*cgrpc_handler_fn)(void *ctx, cgrpc_call *call, uint64_t call_id,
                                 const char *method, size_t method_len,
                                 const uint8_t *request, size_t request_len,
                                 int64_t deadline_ms);

// Called on a gRPC thread when a call dispatched to the handler is cancelled (client cancel,
// deadline exceeded, or server shutdown). The call is still valid; it must still be finished.
typedef void (*cgrpc_cancel_fn)(void *ctx, uint64_t call_id);

// Starts a server listening on every endpoint ("unix:///path", "unix:path", "tcp://host:port"
// or "host:port"), routing every method to `handler`. With `tls` (NULL: plaintext) every
// endpoint serves TLS with that certificate and key and requires a client certificate that
// verifies against its CA bundle (mutual TLS); the files are read once, here. Returns NULL and
// writes a reason into `err` (NUL-terminated, truncated to err_len) when a TLS file is unusable
// or any endpoint cannot be bound.
cgrpc_server *cgrpc_server_start(const char *const *endpoints, size_t endpoint_count,
                                 const cgrpc_tls_files *tls, cgrpc_handler_fn handler,
                                 cgrpc_cancel_fn on_cancel, void *ctx, char *err, size_t err_len);

// The caller of a call not yet finished, for the handler's authorization and logs: its address
// as grpc spells it ("ipv4:10.0.0.2:41234") and, over mutual TLS, its verified certificate's
// URI SANs, newline-separated ("" over plaintext). Writes at most buffer_len bytes
// (NUL-terminated) and returns the full length.
size_t cgrpc_call_peer(const cgrpc_call *call, char *buffer, size_t buffer_len);
size_t cgrpc_call_peer_uris(const cgrpc_call *call, char *buffer, size_t buffer_len);

// Graceful shutdown bounded by `grace_ms`: stops accepting, lets in-flight calls finish, then
// cancels what is left and waits for every call to be finished. Then frees the server.
void cgrpc_server_shutdown_and_destroy(cgrpc_server *server, int64_t grace_ms);

// Completes a call: status 0 (OK) sends `response`; any other status sends `message` (may be
// NULL) and ignores the response. The call handle is invalid afterwards.
void cgrpc_call_finish(cgrpc_call *call, int status_code, const char *message,
                       const uint8_t *response, size_t response_len);

// Completion of a client call, on a gRPC thread. Buffers are valid only during the callback.
typedef void (*cgrpc_unary_done_fn)(void *ctx, int status_code, const char *message,
                                    size_t message_len, const uint8_t *response,
                                    size_t response_len);

// An insecure channel to `target` (same endpoint forms as the server).
cgrpc_channel *cgrpc_channel_create(const char *target);

// A TLS channel to `target`: the server's certificate must verify against `tls->ca_path` and
// name `server_name` (NULL: the target's host) — for ReplicaControl the node id its DNS SAN
// carries; the client presents `tls->cert_path` when given. The files are read now: a channel
// created after a rotation uses the new files. NULL with a reason in `err` when a file is unusable.
cgrpc_channel *cgrpc_channel_create_tls(const char *target, const cgrpc_tls_files *tls,
                                        const char *server_name, char *err, size_t err_len);
void cgrpc_channel_destroy(cgrpc_channel *channel);

// Starts a unary call of full method name `method` ("/pkg.Service/Method") with raw request
// bytes; `done` is called exactly once. timeout_ms <= 0 means no deadline.
void cgrpc_unary_call(cgrpc_channel *channel, const char *method, const uint8_t *request,
                      size_t request_len, int64_t timeout_ms, cgrpc_unary_done_fn done,
                      void *ctx);

#ifdef __cplusplus
}
#endif

#endif
