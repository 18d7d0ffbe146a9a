// C++17 implementation of CGRPCShim.h over grpc++ 1.51's callback generic service and generic
// stub. Every RPC is unary: read one message, hand it to Swift, write one response.
#include "CGRPCShim.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>

#include <atomic>
#include <chrono>
#include <cstring>
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
                                 cgrpc_handler_fn handler, cgrpc_cancel_fn on_cancel, void *ctx,
                                 char *err, size_t err_len) {
  auto server = std::make_unique<cgrpc_server>();
  server->handler_ = handler;
  server->on_cancel_ = on_cancel;
  server->ctx_ = ctx;
  grpc::ServerBuilder builder;
  std::vector<int> ports(endpoint_count, 0);
  for (size_t i = 0; i < endpoint_count; i++) {
    builder.AddListeningPort(grpc_address(endpoints[i]), grpc::InsecureServerCredentials(),
                             &ports[i]);
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

void cgrpc_call_finish(cgrpc_call *call, int status_code, const char *message,
                       const uint8_t *response, size_t response_len) {
  call->finish(status_code, message, response, response_len);
}

struct cgrpc_channel {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;
};

cgrpc_channel *cgrpc_channel_create(const char *target) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  auto channel = new cgrpc_channel;
  channel->channel = grpc::CreateCustomChannel(grpc_address(target), grpc::InsecureChannelCredentials(), args);
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
