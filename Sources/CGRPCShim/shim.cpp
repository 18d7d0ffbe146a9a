// C++17 implementation of CGRPCShim.h over grpc++ 1.51's callback generic service and generic
// stub. Every RPC is unary: read one message, hand it to Swift, write one response.
// TLS: grpc's Ssl(Server)Credentials over PEM the shim reads itself; OpenSSL (which grpc links
// already) only checks the files first, so a bad file is a clear error, not a failed handshake.
#include "CGRPCShim.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr int kMaxMessageBytes = 16 * 1024 * 1024;

// "tcp://host:port" is Cairn's spelling; grpc wants "host:port". unix: forms pass through.
std::string grpc_address(const std::string &endpoint) {
  const std::string tcp = "tcp://";
  if (endpoint.compare(0, tcp.size(), tcp) == 0) return endpoint.substr(tcp.size());
  return endpoint;
}

std::vector<uint8_t> flatten(const grpc::ByteBuffer &buffer) {
  std::vector<grpc::Slice> slices;
  std::vector<uint8_t> out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto &s : slices) out.insert(out.end(), s.begin(), s.end());
  return out;
}

grpc::ByteBuffer wrap(const uint8_t *bytes, size_t len) {
  grpc::Slice slice(bytes, len);
  return grpc::ByteBuffer(&slice, 1);
}

void set_error(char *err, size_t err_len, const std::string &message) {
  if (err && err_len) snprintf(err, err_len, "%s", message.c_str());
}

// A PEM file's bytes. The key's copy is wiped by ~tls_material: it must not linger in freed
// memory longer than needed (grpc keeps its own copy).
bool read_file(const char *path, std::string *out, std::string *error) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    *error = std::string("cannot read ") + path + ": " + strerror(errno);
    return false;
  }
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, f)) > 0) out->append(buffer, n);
  bool failed = ferror(f) != 0;
  int saved = errno;
  fclose(f);
  OPENSSL_cleanse(buffer, sizeof buffer);
  if (failed) {
    *error = std::string("cannot read ") + path + ": " + strerror(saved);
    return false;
  }
  return true;
}

// Refuses to prompt for a passphrase on a terminal: an encrypted key is an error.
int no_passphrase(char *, int, int, void *) { return 0; }

// The three files of a TLS identity, read and checked with OpenSSL so that a bad file is a clear
// error at start instead of a failed handshake later. Messages name files, never their contents.
struct tls_material {
  std::string ca, chain, key;
  ~tls_material() {
    if (!key.empty()) OPENSSL_cleanse(&key[0], key.size());
  }

  bool load(const cgrpc_tls_files *files, std::string *error) {
    if (!files->ca_path || !*files->ca_path) {
      *error = "no CA bundle given: the peer's certificate cannot be verified without one";
      return false;
    }
    if (!read_file(files->ca_path, &ca, error)) return false;
    int cas = count_certificates(ca);
    if (cas == 0) {
      *error = std::string(files->ca_path) + " holds no PEM certificate (expected the CA bundle, ca.crt)";
      return false;
    }
    bool has_cert = files->cert_path && *files->cert_path, has_key = files->key_path && *files->key_path;
    if (has_cert != has_key) {
      *error = has_cert ? std::string("a certificate (") + files->cert_path + ") needs its private key"
                        : std::string("a private key (") + files->key_path + ") needs its certificate";
      return false;
    }
    if (!has_cert) return true;
    if (!read_file(files->cert_path, &chain, error) || !read_file(files->key_path, &key, error)) return false;
    BIO *cert_bio = BIO_new_mem_buf(chain.data(), static_cast<int>(chain.size()));
    X509 *leaf = PEM_read_bio_X509(cert_bio, nullptr, no_passphrase, nullptr);
    BIO_free(cert_bio);
    if (!leaf) {
      ERR_clear_error();
      *error = std::string(files->cert_path) + " holds no PEM certificate (expected the leaf certificate, then intermediates)";
      return false;
    }
    BIO *key_bio = BIO_new_mem_buf(key.data(), static_cast<int>(key.size()));
    EVP_PKEY *pkey = PEM_read_bio_PrivateKey(key_bio, nullptr, no_passphrase, nullptr);
    BIO_free(key_bio);
    bool ok = true;
    if (!pkey) {
      *error = std::string(files->key_path) + " holds no usable PEM private key (an encrypted key is not supported)";
      ok = false;
    } else if (X509_check_private_key(leaf, pkey) != 1) {
      *error = std::string("the private key in ") + files->key_path + " does not belong to the certificate in " +
               files->cert_path + " (rotated one file without the other?)";
      ok = false;
    } else if (X509_cmp_current_time(X509_get0_notAfter(leaf)) < 0) {
      *error = std::string("the certificate in ") + files->cert_path + " has expired; issue a new one";
      ok = false;
    }
    ERR_clear_error();
    EVP_PKEY_free(pkey);
    X509_free(leaf);
    return ok;
  }

  // load() reporting into a C caller's error buffer.
  bool load(const cgrpc_tls_files *files, char *err, size_t err_len) {
    std::string error;
    if (load(files, &error)) return true;
    set_error(err, err_len, error);
    return false;
  }

  static int count_certificates(const std::string &pem) {
    BIO *bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    int count = 0;
    while (X509 *cert = PEM_read_bio_X509(bio, nullptr, no_passphrase, nullptr)) {
      X509_free(cert);
      count++;
    }
    BIO_free(bio);
    ERR_clear_error();
    return count;
  }
};

}  // namespace

struct cgrpc_server;

// One unary call. Lives until OnDone; Swift holds it between the handler and finish.
struct cgrpc_call final : public grpc::ServerGenericBidiReactor {
  cgrpc_call(cgrpc_server *server, grpc::GenericCallbackServerContext *ctx, uint64_t id);
  void OnReadDone(bool ok) override;
  void OnCancel() override;
  void OnWriteDone(bool) override {}
  void OnDone() override { delete this; }
  void finish(int code, const char *message, const uint8_t *response, size_t len);

  cgrpc_server *server_;
  grpc::GenericCallbackServerContext *ctx_;
  uint64_t id_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::atomic<bool> dispatched_{false};
  std::atomic<bool> finished_{false};
};

struct cgrpc_server final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor *CreateReactor(grpc::GenericCallbackServerContext *ctx) override {
    return new cgrpc_call(this, ctx, next_id_.fetch_add(1) + 1);
  }
  cgrpc_handler_fn handler_ = nullptr;
  cgrpc_cancel_fn on_cancel_ = nullptr;
  void *ctx_ = nullptr;
  std::atomic<uint64_t> next_id_{0};
  std::unique_ptr<grpc::Server> server_;
};

cgrpc_call::cgrpc_call(cgrpc_server *server, grpc::GenericCallbackServerContext *ctx, uint64_t id)
    : server_(server), ctx_(ctx), id_(id) {
  StartRead(&request_);
}

void cgrpc_call::OnReadDone(bool ok) {
  if (!ok) {
    // The client half-closed without a message, or went away.
    finished_ = true;
    Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message received"));
    return;
  }
  std::vector<uint8_t> bytes = flatten(request_);
  int64_t deadline_ms = -1;
  auto deadline = ctx_->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::system_clock::now())
                    .count();
    deadline_ms = left < 0 ? 0 : left;
  }
  dispatched_ = true;
  const std::string &method = ctx_->method();
  server_->handler_(server_->ctx_, this, id_, method.data(), method.size(), bytes.data(),
                    bytes.size(), deadline_ms);
}

void cgrpc_call::OnCancel() {
  if (dispatched_ && !finished_ && server_->on_cancel_) server_->on_cancel_(server_->ctx_, id_);
}

void cgrpc_call::finish(int code, const char *message, const uint8_t *response, size_t len) {
  bool expected = false;
  if (!finished_.compare_exchange_strong(expected, true)) return;
  if (code == 0) {
    response_ = wrap(response, len);
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  } else {
    Finish(grpc::Status(static_cast<grpc::StatusCode>(code), message ? message : ""));
  }
}

extern "C" {

cgrpc_server *cgrpc_server_start(const char *const *endpoints, size_t endpoint_count,
                                 const cgrpc_tls_files *tls, cgrpc_handler_fn handler,
                                 cgrpc_cancel_fn on_cancel, void *ctx, char *err, size_t err_len) {
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (tls) {
    tls_material material;
    if (!material.load(tls, err, err_len)) return nullptr;
    if (material.key.empty()) {
      set_error(err, err_len, "a TLS server needs its certificate and private key");
      return nullptr;
    }
    grpc::SslServerCredentialsOptions options(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    options.pem_root_certs = material.ca;
    options.pem_key_cert_pairs.push_back({material.key, material.chain});
    credentials = grpc::SslServerCredentials(options);
    OPENSSL_cleanse(&options.pem_key_cert_pairs[0].private_key[0], options.pem_key_cert_pairs[0].private_key.size());
  }
  auto server = std::make_unique<cgrpc_server>();
  server->handler_ = handler;
  server->on_cancel_ = on_cancel;
  server->ctx_ = ctx;
  grpc::ServerBuilder builder;
  std::vector<int> ports(endpoint_count, 0);
  for (size_t i = 0; i < endpoint_count; i++) {
    builder.AddListeningPort(grpc_address(endpoints[i]), credentials, &ports[i]);
  }
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
  builder.RegisterCallbackGenericService(server.get());
  server->server_ = builder.BuildAndStart();
  if (!server->server_) {
    if (err && err_len) snprintf(err, err_len, "grpc could not start a server on the given endpoints");
    return nullptr;
  }
  for (size_t i = 0; i < endpoint_count; i++) {
    // grpc reports 0 for a TCP port it could not bind; unix sockets report 1 on success.
    if (ports[i] == 0) {
      if (err && err_len) snprintf(err, err_len, "could not listen on %s (in use, or no permission?)", endpoints[i]);
      server->server_->Shutdown(std::chrono::system_clock::now());
      server->server_->Wait();
      return nullptr;
    }
  }
  return server.release();
}

void cgrpc_server_shutdown_and_destroy(cgrpc_server *server, int64_t grace_ms) {
  if (!server) return;
  auto deadline = std::chrono::system_clock::now() + std::chrono::milliseconds(grace_ms < 0 ? 0 : grace_ms);
  server->server_->Shutdown(deadline);
  server->server_->Wait();
  delete server;
}

size_t cgrpc_call_peer(const cgrpc_call *call, char *buffer, size_t buffer_len) {
  std::string peer = call->ctx_->peer();
  if (buffer && buffer_len) snprintf(buffer, buffer_len, "%s", peer.c_str());
  return peer.size();
}

size_t cgrpc_call_peer_uris(const cgrpc_call *call, char *buffer, size_t buffer_len) {
  auto auth = call->ctx_->auth_context();
  std::string uris;
  if (auth && auth->IsPeerAuthenticated()) {
    // Every URI SAN (grpc's peer_spiffe_id holds one only when the certificate has exactly one;
    // a `--role all` certificate names a node and a controller).
    for (const auto &value : auth->FindPropertyValues(GRPC_PEER_URI_PROPERTY_NAME)) {
      if (!uris.empty()) uris += '\n';
      uris.append(value.data(), value.size());
    }
  }
  if (buffer && buffer_len) snprintf(buffer, buffer_len, "%s", uris.c_str());
  return uris.size();
}

int cgrpc_tls_check(const cgrpc_tls_files *files, char *err, size_t err_len) {
  tls_material material;
  return material.load(files, err, err_len) ? 0 : -1;
}

void cgrpc_call_finish(cgrpc_call *call, int status_code, const char *message,
                       const uint8_t *response, size_t response_len) {
  call->finish(status_code, message, response, response_len);
}

struct cgrpc_channel {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;
};

cgrpc_channel *cgrpc_channel_create(const char *target) {
  return cgrpc_channel_create_tls(target, nullptr, nullptr, nullptr, 0);
}

cgrpc_channel *cgrpc_channel_create_tls(const char *target, const cgrpc_tls_files *tls,
                                        const char *server_name, char *err, size_t err_len) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (tls) {
    tls_material material;
    if (!material.load(tls, err, err_len)) return nullptr;
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = material.ca;
    options.pem_cert_chain = material.chain;
    options.pem_private_key = material.key;
    credentials = grpc::SslCredentials(options);
    if (!options.pem_private_key.empty())
      OPENSSL_cleanse(&options.pem_private_key[0], options.pem_private_key.size());
    if (server_name && *server_name) args.SetSslTargetNameOverride(server_name);
  }
  auto channel = new cgrpc_channel;
  channel->channel = grpc::CreateCustomChannel(grpc_address(target), credentials, args);
  channel->stub = std::make_unique<grpc::GenericStub>(channel->channel);
  return channel;
}

void cgrpc_channel_destroy(cgrpc_channel *channel) { delete channel; }

namespace {
struct client_call {
  grpc::ClientContext context;
  grpc::ByteBuffer request;
  grpc::ByteBuffer response;
};
}  // namespace

void cgrpc_unary_call(cgrpc_channel *channel, const char *method, const uint8_t *request,
                      size_t request_len, int64_t timeout_ms, cgrpc_unary_done_fn done,
                      void *ctx) {
  auto call = new client_call;
  call->request = wrap(request, request_len);
  if (timeout_ms > 0)
    call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  channel->stub->UnaryCall(&call->context, method, grpc::StubOptions(), &call->request,
                           &call->response, [call, done, ctx](grpc::Status status) {
                             std::vector<uint8_t> bytes;
                             if (status.ok()) bytes = flatten(call->response);
                             const std::string message = status.error_message();
                             // Free the call before resuming Swift: once `done` runs, the caller
                             // may drop its channel, and the call's context must not hold the
                             // channel's last reference here, on grpc's own callback thread
                             // (destroying it there tears down the queue this thread polls).
                             delete call;
                             done(ctx, static_cast<int>(status.error_code()), message.data(),
                                  message.size(), bytes.data(), bytes.size());
                           });
}

}  // extern "C"
