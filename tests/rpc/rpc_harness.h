// Test objects and a connected pair of RpcConnections over LOCAL channels on one loop, shared by
// the RPC tests, the allocation test, the fuzz target and the cross-process tests.
#pragma once

#include <chrono>
#include <functional>
#include <iterator>
#include <memory>
#include <type_traits>
#include <vector>

#include "agate/rpc/connection.h"
#include "agate/runtime/channel.h"
#include "rpc_test.capnp.h"

namespace agate::rpc::test {

using namespace std::chrono_literals;

enum Method : uint16_t {
  ECHO = 0,        // Value -> Value: params.value + the node's value
  NEXT = 1,        // -> CapAndValue: a new Node(value + 1), owned by the connection
  FAIL = 2,        // fails with FAILED "boom"
  HANG = 3,        // never returns; counts its cancellation
  RECORD = 4,      // Value -> (): appends params.value to the log
  IDENTIFY = 5,    // CapParam -> Value: 1 if the cap is one of ours (log.identified), 2 if remote
  NEXT_LATER = 6,  // as NEXT after a trip through the loop (so pipelined calls queue)
  FAIL_LATER = 7,  // as FAIL after a trip through the loop
  CALL_BACK = 8,   // CapParam -> Value: calls ECHO(5) on the given (caller-hosted) cap, +100
  SELF = 9,        // -> CapAndValue: this node, borrowed (a chain creates no objects)
  CALL_BACK_ALL = 10,  // a struct whose pointer 0 is a list of capabilities, or of structs whose
                       // pointer 0 is one, and so on -> Value: ECHO(5) on every capability found,
                       // depth first, in order; the sum of the replies
  SELVES = 11,         // Value n -> a struct whose pointer 0 lists this node n times (n cap-table
                       // entries naming one export; n at most 1000)
};

struct Log {
  std::vector<uint64_t> order;
  std::vector<ServerObject*> identified;
  int cancelled = 0;
  int created = 0;
  int destroyed = 0;
  int hanging = 0;
  std::function<void()> onLater;  // NEXT_LATER runs it, when set, just before it returns
};

class Node final : public ServerObject {
 public:
  Node(uint64_t value, Log& log) : value_(value), log_(log) { ++log_.created; }
  ~Node() override { ++log_.destroyed; }
  uint64_t value() const { return value_; }

  Promise<void> dispatch(uint64_t interfaceId, uint16_t methodId, CallContext& ctx) override {
    if (interfaceId != NODE_INTERFACE_ID) return readyPromise<void>(Errc::UNSUPPORTED);
    switch (methodId) {
      case ECHO:
        return echo(ctx);
      case NEXT:
        return readyPromise<void>(next(ctx));
      case FAIL:
        return readyPromise<void>(Error(Errc::FAILED, "boom"));
      case HANG:
        return hang();
      case RECORD:
        return record(ctx);
      case IDENTIFY:
        return identify(ctx);
      case NEXT_LATER:
        return nextLater(ctx);
      case FAIL_LATER:
        return failLater();
      case CALL_BACK:
        return callBack(ctx);
      case SELF:
        return readyPromise<void>(self(ctx));
      case CALL_BACK_ALL:
        return callBackAll(ctx);
      case SELVES:
        return readyPromise<void>(selves(ctx));
      default:
        return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    }
  }

 private:
  Promise<void> echo(CallContext& ctx) {
    uint64_t v = 0;
    AGATE_CO_TRY(ctx.tryReadParams<Value>([&](Value::Reader p) { v = p.getValue(); }));
    Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
    AGATE_CO_TRY(out);
    out->setValue(v + value_);
    co_return {};
  }
  Status next(CallContext& ctx) {
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(std::make_unique<Node>(value_ + 1, log_));
    AGATE_TRY(index);
    writeCapPointer(*out, 0, *index);
    out->setValue(value_ + 1);
    return {};
  }
  Status selves(CallContext& ctx) {
    uint64_t n = 0;
    AGATE_TRY(ctx.tryReadParams<Value>([&](Value::Reader p) { n = p.getValue(); }));
    if (n > 1000) return Error(Errc::INVALID_ARGUMENT, "at most 1000");
    Result<capnp::AnyPointer::Builder> out = ctx.initResults(64 + 8 * n);
    AGATE_TRY(out);
    capnp::AnyList::Builder list = out->initAsAnyStruct(0, 1).getPointerSection()[0].initAsAnyList(
        capnp::ElementSize::POINTER, static_cast<uint32_t>(n));
    for (uint32_t i = 0; i < n; ++i) {
      Result<uint32_t> index = ctx.addResultCap(*this);
      AGATE_TRY(index);
      writeCapPointer(list, i, *index);
    }
    return {};
  }
  Status self(CallContext& ctx) {
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(*this);
    AGATE_TRY(index);
    writeCapPointer(*out, 0, *index);
    out->setValue(value_);
    return {};
  }
  Promise<void> nextLater(CallContext& ctx) {
    co_await EventLoop::current()->yield();
    if (log_.onLater) log_.onLater();
    co_return next(ctx);
  }
  Promise<void> failLater() {
    co_await EventLoop::current()->yield();
    co_return Error(Errc::FAILED, "boom later");
  }
  Promise<void> hang() {
    struct Guard {
      Log& log;
      ~Guard() {
        --log.hanging;
        ++log.cancelled;
      }
    };
    ++log_.hanging;
    Guard guard{log_};
    (void)co_await EventLoop::current()->sleep(std::chrono::hours(1));
    co_return {};
  }
  Promise<void> record(CallContext& ctx) {
    uint64_t v = 0;
    AGATE_CO_TRY(ctx.tryReadParams<Value>([&](Value::Reader p) { v = p.getValue(); }));
    log_.order.push_back(v);
    co_return {};
  }
  // Reads the capability in CapParam.cap; params from a peer are untrusted, so the typed read
  // runs inside tryReadParams (a list where the struct should be fails the call, not the process).
  static Result<ReceivedCap> capParam(CallContext& ctx) {
    Result<ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
    Status read = ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); });
    if (!read) return read.error();
    return cap;
  }
  Promise<void> identify(CallContext& ctx) {
    Result<ReceivedCap> cap = capParam(ctx);
    AGATE_CO_TRY(cap);
    if (cap->local != nullptr) log_.identified.push_back(cap->local);
    Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
    AGATE_CO_TRY(out);
    out->setValue(cap->local != nullptr ? 1 : 2);
    co_return {};
  }
  Promise<void> callBack(CallContext& ctx) {
    Result<ReceivedCap> cap = capParam(ctx);
    AGATE_CO_TRY(cap);
    RemoteCap target = cap->remote;  // params are gone after the first suspension
    uint64_t got = 0;
    {
      Request req = target.newCall(NODE_INTERFACE_ID, ECHO, 16);
      req.initParams<Value>().setValue(5);
      Result<Response> r = co_await req.send();
      AGATE_CO_TRY(r);
      got = r->results().getAs<Value>().getValue();
    }
    Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
    AGATE_CO_TRY(out);
    out->setValue(got + 100);
    co_return {};
  }

  // The capabilities CALL_BACK_ALL finds under pointer 0 of `s`.
  static Status collectCaps(CallContext& ctx, capnp::AnyStruct::Reader s,
                            std::vector<RemoteCap>& out) {
    if (s.getPointerSection().size() == 0) return Error(Errc::INVALID_ARGUMENT, "no pointer");
    capnp::AnyPointer::Reader p = s.getPointerSection()[0];
    if (p.getPointerType() != capnp::PointerType::LIST)
      return Error(Errc::INVALID_ARGUMENT, "pointer 0 is not a list");
    capnp::AnyList::Reader list = p.getAs<capnp::AnyList>();
    if (list.getElementSize() == capnp::ElementSize::INLINE_COMPOSITE) {
      for (capnp::AnyStruct::Reader e : list.as<capnp::List<capnp::AnyStruct>>())
        AGATE_TRY(collectCaps(ctx, e, out));
      return {};
    }
    for (uint32_t i = 0; i < list.size(); ++i) {
      Result<ReceivedCap> cap = ctx.capAt(list, i);
      AGATE_TRY(cap);
      out.push_back(cap->remote);
    }
    return {};
  }
  Promise<void> callBackAll(CallContext& ctx) {
    std::vector<RemoteCap> caps;
    try {
      AGATE_CO_TRY(collectCaps(ctx, ctx.params().getAs<capnp::AnyStruct>(), caps));
    } catch (const kj::Exception&) {
      co_return Error(Errc::PROTOCOL_ERROR, "params do not decode");
    }
    uint64_t sum = 0;
    for (RemoteCap& target : caps) {
      Request req = target.newCall(NODE_INTERFACE_ID, ECHO, 16);
      req.initParams<Value>().setValue(5);
      Result<Response> r = co_await req.send();
      AGATE_CO_TRY(r);
      sum += r->results().getAs<Value>().getValue();
    }
    Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
    AGATE_CO_TRY(out);
    out->setValue(sum);
    co_return {};
  }

  uint64_t value_;
  Log& log_;
};

// Two RpcConnections joined by two LOCAL channels, both on the calling thread's loop.
class LocalPair {
 public:
  LocalPair(EventLoop& loop, ServerObject* serverBootstrap, ServerObject* clientBootstrap = nullptr,
            RpcOptions options = {}, uint64_t capacity = 64 * 1024,
            MessageReceiverOptions receiverOptions = {})
      : LocalPair(loop, withBootstrap(options, serverBootstrap),
                  withBootstrap(options, clientBootstrap), capacity, receiverOptions) {}
  // Each end with its own options, bootstrap included (two bounds on cap tables, say).
  LocalPair(EventLoop& loop, const RpcOptions& serverOptions, const RpcOptions& clientOptions,
            uint64_t capacity = 64 * 1024, MessageReceiverOptions receiverOptions = {}) {
    ChannelOptions co;
    co.scope = ChannelScope::LOCAL;
    co.capacityBytes = capacity;
    c2s_ = std::move(Channel::create(co).value());
    s2c_ = std::move(Channel::create(co).value());
    clientTx_ = std::make_unique<MessageSender>(c2s_->attachSender().value());
    serverRx_ = std::make_unique<MessageReceiver>(*c2s_, c2s_->attachReceiver().value(),
                                                  rpcReceiverOptions(receiverOptions));
    serverTx_ = std::make_unique<MessageSender>(s2c_->attachSender().value());
    clientRx_ = std::make_unique<MessageReceiver>(*s2c_, s2c_->attachReceiver().value(),
                                                  rpcReceiverOptions(receiverOptions));
    server_ = std::make_unique<RpcConnection>(*serverTx_, *serverRx_, loop, serverOptions);
    client_ = std::make_unique<RpcConnection>(*clientTx_, *clientRx_, loop, clientOptions);
  }
  ~LocalPair() {
    client_.reset();
    server_.reset();
  }
  RpcConnection& client() { return *client_; }
  RpcConnection& server() { return *server_; }
  MessageReceiver& clientReceiver() { return *clientRx_; }
  MessageReceiver& serverReceiver() { return *serverRx_; }
  void destroyServer() { server_.reset(); }
  void destroyClient() { client_.reset(); }

 private:
  static RpcOptions withBootstrap(RpcOptions options, ServerObject* bootstrap) {
    options.bootstrap = bootstrap;
    return options;
  }

  std::unique_ptr<Channel> c2s_, s2c_;
  std::unique_ptr<MessageSender> clientTx_, serverTx_;
  std::unique_ptr<MessageReceiver> clientRx_, serverRx_;
  std::unique_ptr<RpcConnection> server_, client_;
};

// Turns the loop until `done()` or `limit` passes; false on timeout.
template <class F>
bool runUntil(EventLoop& loop, F done, std::chrono::milliseconds limit = 5000ms) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    (void)loop.run(loop.sleep(100us));
  }
  return true;
}

// Sets pointer `field` of `s` to a list of capabilities to `caps`, each added to `req`'s cap table
// in order: references (RemoteCap), or this side's objects (pointers or unique_ptrs to them, which
// stay owned by the caller). The first addCap error, with the list partly written.
template <class Caps>
Status writeCapList(Request& req, capnp::AnyStruct::Builder s, uint16_t field, const Caps& caps) {
  capnp::AnyList::Builder list = s.getPointerSection()[field].initAsAnyList(
      capnp::ElementSize::POINTER, static_cast<uint32_t>(std::size(caps)));
  uint32_t i = 0;
  for (const auto& cap : caps) {
    Result<uint32_t> index = Error(Errc::FAILED, "unset");
    if constexpr (std::is_same_v<std::decay_t<decltype(cap)>, RemoteCap>) {
      index = req.addCap(cap);
    } else {
      index = req.addCap(*cap);
    }
    AGATE_TRY(index);
    writeCapPointer(list, i++, *index);
  }
  return {};
}

}  // namespace agate::rpc::test
