// Typed RPC: the support layer under the stubs that capnpc-agate generates from .capnp interfaces.
//
// Users rarely name these templates; they meet them through generated code (docs/typed_stubs.md):
//
//   calc::stubs::Calculator::Client calc(conn.bootstrap());
//   auto p = calc.evaluate([](auto params) { params.initExpression().setLiteral(2); });
//   calc::stubs::Calculator::Value::Client v = p.getValue();   // pipelined: usable at once
//   Result<TypedResponse<ReadResults>> r = co_await v.read();  // results read in place
//
// What each piece is:
//  * TypedRequest<P, PromiseT>: an engine Request whose params are a P, built in place in the
//    outbound frame; send() gives the method's typed promise.
//  * TypedPromise<R>: an engine RemotePromise whose results are an R. co_await gives
//    Result<TypedResponse<R>>; the generated subclass (FooPromise) adds one pipelined accessor
//    per capability field of the results.
//  * TypedResponse<R>: the engine Response, read as an R (in place; see Response for how long
//    readers stay valid).
//  * TypedContext<P, R>: what a generated server method gets: params as a P, results built as an
//    R. A cheap value (one pointer) so a server coroutine can take it by value; the CallContext
//    it points to lives for the whole call (engine contract).
//  * CapArg<I> / Received<I>: a capability of interface I going out (a client reference, or a
//    server object of ours) and coming in (a reference to the peer's object, or one of our own
//    objects passed back to us).
//
// The decode boundary. The engine's FrameReader validates a message structurally; what it cannot
// know is whether each pointer has the kind the schema expects (a list where the schema says
// struct), and a Cap'n Proto getter meeting such a mismatch throws. So typed params (before the
// server method runs) and typed results (before co_await returns them) are walked once against
// their schema here, inside the one try/catch, and a mismatch becomes PROTOCOL_ERROR. After that,
// typed getters on them do not throw. Capability and AnyPointer fields are not walked: the cap
// accessors check them when read (readCapPointer).
//
// Threading: like the engine handles they wrap, these belong to the connection's loop thread.
#pragma once

#include <capnp/any.h>
#include <capnp/dynamic.h>
#include <capnp/schema.h>
#include <kj/debug.h>
#include <kj/exception.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <variant>

#include "agate/rpc/cap_pointer.h"
#include "agate/rpc/connection.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"

namespace agate::rpc::typed {

// ---------------------------------------------------------------------------------------------
// Schema check at the decode boundary

namespace detail {

// What the lists of capabilities of one message may hold in all (see checkAgainstSchema).
struct CapListBudget {
  uint32_t elements;  // elements of every List(Interface), null ones included
  uint32_t entries;   // their non-null elements: at most the message's cap table
};

void walkStruct(capnp::DynamicStruct::Reader s, CapListBudget& budget);

inline void walkList(capnp::DynamicList::Reader list, CapListBudget& budget) {
  capnp::Type element = list.getSchema().getElementType();
  switch (element.which()) {
    case capnp::schema::Type::STRUCT:
      for (capnp::DynamicValue::Reader e : list) walkStruct(e.as<capnp::DynamicStruct>(), budget);
      return;
    case capnp::schema::Type::LIST:
      for (capnp::DynamicValue::Reader e : list) walkList(e.as<capnp::DynamicList>(), budget);
      return;
    case capnp::schema::Type::TEXT:
    case capnp::schema::Type::DATA:
      for (capnp::DynamicValue::Reader e : list) (void)e;  // reading checks the kind
      return;
    case capnp::schema::Type::INTERFACE: {
      // Each element of an honest list names its own cap-table entry (setListCap), so the set
      // elements of all the message's lists are no more than its cap table; more only serve to
      // make element-by-element reads (each re-reading the list) cost a list's length squared,
      // as a forged list of one capability repeated would. And all the lists together are no
      // longer than the connection's bound, so reading every element one by one costs at most
      // twice that bound squared (the list's size read each time too), which the connection
      // makes sure fits its reader's budget (RpcConnection's constructor).
      KJ_REQUIRE(list.size() <= budget.elements,
                 "lists of capabilities longer in all than a message's cap table may be");
      budget.elements -= list.size();
      uint32_t set = 0;
      for (capnp::AnyPointer::Reader e :
           list.as<capnp::AnyList>().as<capnp::List<capnp::AnyPointer>>())
        set += e.isNull() ? 0 : 1;
      KJ_REQUIRE(set <= budget.entries,
                 "more capabilities in lists than the message's cap table holds");
      budget.entries -= set;
      return;
    }
    default:
      return;  // primitives live in the list body; AnyPointer is not walked
  }
}

inline void walkField(capnp::DynamicStruct::Reader s, capnp::StructSchema::Field field,
                      CapListBudget& budget) {
  switch (field.getType().which()) {
    case capnp::schema::Type::STRUCT:  // a struct field or a group
      // A null struct pointer reads as the type's default, which holds nothing to check, and
      // whose own struct fields (of a recursive type: Chain.next is a Chain) read as defaults
      // again without end: it is not walked. A group is no pointer; it is always walked.
      if (!field.getProto().isGroup() && !s.has(field)) return;
      walkStruct(s.get(field).as<capnp::DynamicStruct>(), budget);
      return;
    case capnp::schema::Type::LIST:
      walkList(s.get(field).as<capnp::DynamicList>(), budget);
      return;
    case capnp::schema::Type::TEXT:
    case capnp::schema::Type::DATA:
      (void)s.get(field);
      return;
    default:
      return;  // data section fields cannot be malformed; caps and AnyPointer are not walked
  }
}

inline void walkStruct(capnp::DynamicStruct::Reader s, CapListBudget& budget) {
  for (capnp::StructSchema::Field field : s.getSchema().getNonUnionFields())
    walkField(s, field, budget);
  KJ_IF_MAYBE (active, s.which()) {
    walkField(s, *active, budget);
  }
}

}  // namespace detail

// Walks `content` once as a T (a generated struct type) and reports PROTOCOL_ERROR when a pointer
// does not have the kind the schema gives it, or when its lists of capabilities hold more set
// elements than the message's cap table (`capCount` entries) or more elements in all than
// `maxCaps` (the connection's RpcOptions::maxCapsPerMessage): only a forged message has either.
// Precondition: the message was validated structurally (FrameReader), which bounds the nesting
// depth and the traversal.
template <class T>
Status checkAgainstSchema(capnp::AnyPointer::Reader content, uint32_t capCount, uint32_t maxCaps) {
  detail::CapListBudget budget{maxCaps, capCount};
  try {
    detail::walkStruct(content.getAs<capnp::DynamicStruct>(capnp::Schema::from<T>()), budget);
  } catch (const kj::Exception&) {
    return Error(Errc::PROTOCOL_ERROR, "content does not match the method's schema");
  }
  return {};
}

// The frame size asked for a T built in place: its fixed part plus room for what it points to.
// Bigger content needs an explicit sizeHint (MESSAGE_TOO_LARGE otherwise).
template <class T>
constexpr size_t defaultSizeHint() {
  return std::max<size_t>(
      256, (T::_capnpPrivate::dataWordSize + T::_capnpPrivate::pointerCount) * 8 + 192);
}

// ---------------------------------------------------------------------------------------------
// Capabilities in typed content

// A capability of interface I (a generated stub struct) going out in params or results: a
// reference to the peer's object, an object of ours the caller keeps owning, an object of ours
// the connection takes over, or a promise of one (CapPromise, settled later; untyped: resolve it
// with an I::Server or an I::Client's cap()).
template <class I>
class CapArg {
 public:
  CapArg(const typename I::Client& client) : value_(&client.cap()) {}  // NOLINT: implicit
  template <class S>
  requires std::derived_from<S, typename I::Server> CapArg(S& object)  // NOLINT: implicit
      : value_(static_cast<ServerObject*>(static_cast<typename I::Server*>(&object))) {}
  template <class S>
  requires std::derived_from<S, typename I::Server> CapArg(std::unique_ptr<S> object)  // NOLINT
      : value_(std::unique_ptr<ServerObject>(std::move(object))) {}
  CapArg(const CapPromise& promise) : value_(&promise) {}  // NOLINT: implicit

  // Adds the capability to `sink`'s cap table (a TypedRequest, or a TypedContext's results).
  template <class Sink>
  Result<uint32_t> addTo(Sink& sink) && {
    if (auto* remote = std::get_if<const RemoteCap*>(&value_)) return sink.addCap(**remote);
    if (auto* object = std::get_if<ServerObject*>(&value_)) return sink.addCap(**object);
    if (auto* promise = std::get_if<const CapPromise*>(&value_)) return sink.addCap(**promise);
    return sink.addCap(std::move(std::get<std::unique_ptr<ServerObject>>(value_)));
  }

 private:
  std::variant<const RemoteCap*, ServerObject*, std::unique_ptr<ServerObject>, const CapPromise*>
      value_;
};

// A capability of interface I received in params or results. Exactly one side is set: `local`
// when the peer passed back an object this side exports (calls on it are plain virtual calls),
// `remote` when the peer hosts it.
template <class I>
struct Received {
  typename I::Server* local = nullptr;  // not owned; lives while its export does
  typename I::Client remote;
};

// Where a union member's discriminant lives (generated for capability fields inside unions).
struct UnionTag {
  uint32_t offset = 0;  // in 16-bit units from the start of the data section
  uint16_t value = 0;
};

// Writes `cap` into capability field `pointerIndex` of `s` (replacing what was there), adding it
// to `sink`'s cap table; a union member also gets its discriminant set. OUT_OF_MEMORY past the
// connection's bound on a message's capabilities (RpcOptions::maxCapsPerMessage),
// INVALID_ARGUMENT for a reference the engine cannot pass (see Request::addCap); `s` and the cap
// table are unchanged then.
template <class I, class Sink>
Status setCap(Sink& sink, capnp::AnyStruct::Builder s, uint16_t pointerIndex, CapArg<I> cap,
              std::optional<UnionTag> tag = std::nullopt) {
  Result<uint32_t> index = std::move(cap).addTo(sink);
  if (!index) return index.error();
  capnp::AnyPointer::Builder slot = s.getPointerSection()[pointerIndex];
  if (!slot.isNull()) slot.clear();
  writeCapPointer(s, pointerIndex, *index);
  if (tag) {
    kj::ArrayPtr<capnp::byte> data = s.getDataSection();
    AGATE_REQUIRE(size_t{tag->offset} * 2 + 2 <= data.size(), "union tag outside the struct");
    data[tag->offset * 2] = static_cast<capnp::byte>(tag->value & 0xff);
    data[tag->offset * 2 + 1] = static_cast<capnp::byte>(tag->value >> 8);
  }
  return {};
}

namespace detail {

// A received capability as the interface's types: the object passed back, or the peer's.
template <class I>
Result<Received<I>> asReceived(Result<ReceivedCap> cap) {
  if (!cap) return cap.error();
  Received<I> out;
  if (cap->local != nullptr) {
    out.local = dynamic_cast<typename I::Server*>(cap->local);
    if (out.local == nullptr)
      return Error(Errc::WRONG_TYPE, "the object passed back does not implement the interface");
    return out;
  }
  out.remote = typename I::Client(std::move(cap->remote));
  return out;
}

// Whether the union member `tag` names is the active one of `s`.
inline bool unionMemberActive(capnp::AnyStruct::Reader s, UnionTag tag) {
  kj::ArrayPtr<const capnp::byte> data = s.getDataSection();
  const size_t at = size_t{tag.offset} * 2;
  const uint16_t active =
      at + 2 <= data.size() ? static_cast<uint16_t>(data[at] | (data[at + 1] << 8)) : 0;
  return active == tag.value;
}

}  // namespace detail

// Reads capability field `pointerIndex` of `s` through `source`'s cap table (a TypedResponse, or
// a TypedContext's params). INVALID_ARGUMENT for a null field, an index outside the table, or a
// union member that is not the active one; WRONG_TYPE when the field holds no capability or the
// peer passed back an object of ours that does not implement I.
template <class I, class Source>
Result<Received<I>> getCap(const Source& source, capnp::AnyStruct::Reader s, uint16_t pointerIndex,
                           std::optional<UnionTag> tag = std::nullopt) {
  if (tag && !detail::unionMemberActive(s, *tag))
    return Error(Errc::INVALID_ARGUMENT, "another member of the union is set");
  return detail::asReceived<I>(source.capAt(s, pointerIndex));
}

// A list of capabilities: field `pointerIndex` of `s`, of type List(I). The sender sizes it with
// the struct's generated init (`s.initFoos(n)`), then writes each element with setListCap, which
// adds the capability to `sink`'s cap table. INVALID_ARGUMENT for an element past the list's end
// (or a list not sized yet), an element already set, a union member that is not the active one
// or a reference the engine cannot pass; OUT_OF_MEMORY past the connection's bound on a message's
// capabilities (RpcOptions::maxCapsPerMessage). The list and the cap table are unchanged on an
// error.
template <class I, class Sink>
Status setListCap(Sink& sink, capnp::AnyStruct::Builder s, uint16_t pointerIndex, uint32_t element,
                  CapArg<I> cap, std::optional<UnionTag> tag = std::nullopt) {
  if (tag && !detail::unionMemberActive(s.asReader(), *tag))
    return Error(Errc::INVALID_ARGUMENT, "another member of the union is set");
  capnp::AnyPointer::Builder field = s.getPointerSection()[pointerIndex];
  if (field.isNull() || !field.isList())
    return Error(Errc::INVALID_ARGUMENT, "the list of capabilities is not sized (init it first)");
  capnp::AnyList::Builder list = field.getAs<capnp::AnyList>();
  if (list.getElementSize() != capnp::ElementSize::POINTER)
    return Error(Errc::WRONG_TYPE, "not a list of capabilities");
  if (element >= list.size()) return Error(Errc::INVALID_ARGUMENT, "no such list element");
  if (!list.as<capnp::List<capnp::AnyPointer>>()[element].isNull())
    return Error(Errc::INVALID_ARGUMENT, "list element already set");
  Result<uint32_t> index = std::move(cap).addTo(sink);
  if (!index) return index.error();
  writeCapPointer(list, element, *index);
  return {};
}

// Reads element `element` of the list of capabilities in field `pointerIndex` of `s`, through
// `source`'s cap table. As getCap, and INVALID_ARGUMENT past the list's end.
template <class I, class Source>
Result<Received<I>> getListCap(const Source& source, capnp::AnyStruct::Reader s,
                               uint16_t pointerIndex, uint32_t element,
                               std::optional<UnionTag> tag = std::nullopt) {
  if (tag && !detail::unionMemberActive(s, *tag))
    return Error(Errc::INVALID_ARGUMENT, "another member of the union is set");
  if (pointerIndex >= s.getPointerSection().size())
    return Error(Errc::INVALID_ARGUMENT, "struct has no such pointer field");
  capnp::AnyPointer::Reader field = s.getPointerSection()[pointerIndex];
  if (field.isNull()) return Error(Errc::INVALID_ARGUMENT, "no such list element");
  if (!field.isList()) return Error(Errc::WRONG_TYPE, "field holds no list");
  return detail::asReceived<I>(source.capAt(field.getAs<capnp::AnyList>(), element));
}

// ---------------------------------------------------------------------------------------------
// Client side

// The results of a call, read as an R in place. Move-only.
template <class R>
class TypedResponse {
 public:
  explicit TypedResponse(Response response) noexcept : response_(std::move(response)) {}

  // Checked against R's schema when the call completed, so getters on it do not throw.
  typename R::Reader results() const { return response_.results().getAs<R>(); }
  Result<ReceivedCap> capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const {
    return response_.capAt(s, pointerIndex);
  }
  Result<ReceivedCap> capAt(capnp::AnyList::Reader list, uint32_t element) const {
    return response_.capAt(list, element);
  }
  const Response& untyped() const noexcept { return response_; }

 private:
  Response response_;
};

// A call in flight whose results are an R. Move-only; dropping it (and every capability
// pipelined on it) cancels the call, as for RemotePromise.
template <class R>
class [[nodiscard]] TypedPromise {
 public:
  explicit TypedPromise(RemotePromise promise) noexcept : promise_(std::move(promise)) {}
  // A call that failed before it was sent (its params could not be built).
  explicit TypedPromise(Error error) noexcept : error_(error) {}

  bool isReady() const noexcept { return !promise_ || promise_->isReady(); }
  // The capability at pointer path `path` of the results (generated accessors name the path).
  // On a call that was never sent it is a null reference, whose calls fail at once.
  RemoteCap pipeline(std::initializer_list<uint16_t> path) const {
    return promise_ ? promise_->pipeline(path) : RemoteCap();
  }
  // The engine handle (null for a call that was never sent).
  RemotePromise* untyped() noexcept { return promise_ ? &*promise_ : nullptr; }

  class Awaiter {
   public:
    bool await_ready() const noexcept { return !inner_ || inner_->await_ready(); }
    void await_suspend(std::coroutine_handle<> waiter) noexcept { inner_->await_suspend(waiter); }
    Result<TypedResponse<R>> await_resume() {
      if (!inner_) return error_;
      Result<Response> r = inner_->await_resume();
      if (!r) return r.error();
      Status shape =
          checkAgainstSchema<R>(r->results(), r->capCount(), r->connection()->maxCapsPerMessage());
      if (!shape) return shape.error();
      return TypedResponse<R>(std::move(*r));
    }

   private:
    friend class TypedPromise;
    using Inner = decltype(std::declval<RemotePromise&>().operator co_await());
    std::optional<Inner> inner_;
    Error error_;
  };
  Awaiter operator co_await() & noexcept { return makeAwaiter(); }
  Awaiter operator co_await() && noexcept { return makeAwaiter(); }

 private:
  Awaiter makeAwaiter() noexcept {
    Awaiter a;
    if (promise_)
      a.inner_.emplace(promise_->operator co_await());
    else
      a.error_ = error_;
    return a;
  }
  std::optional<RemotePromise> promise_;
  Error error_;
};

// A call whose params are a P, being built in place. Move-only; dropping it unsent abandons it.
template <class P, class PromiseT>
class [[nodiscard]] TypedRequest {
 public:
  explicit TypedRequest(Request request) : request_(std::move(request)) {
    (void)request_.initParams<P>();
  }

  // The params, built in place in the outbound frame. Build and send without suspending (the
  // frame is the ring's; see Request).
  typename P::Builder params() { return request_.params().getAs<P>(); }
  // The cap table the generated setters fill (setFoo(request, params, cap)).
  Result<uint32_t> addCap(const RemoteCap& cap) { return request_.addCap(cap); }
  Result<uint32_t> addCap(ServerObject& object) { return request_.addCap(object); }
  Result<uint32_t> addCap(std::unique_ptr<ServerObject> object) {
    return request_.addCap(std::move(object));
  }
  Result<uint32_t> addCap(const CapPromise& promise) { return request_.addCap(promise); }
  Request& untyped() noexcept { return request_; }
  // Reply space for this call rather than RpcOptions::replyBytesPerCall (Request::reserveReply):
  // for results known to be large.
  TypedRequest& reserveReply(uint32_t bytes) & noexcept {
    request_.reserveReply(bytes);
    return *this;
  }
  TypedRequest&& reserveReply(uint32_t bytes) && noexcept {  // auto r = x.fooRequest().reserve...
    request_.reserveReply(bytes);
    return std::move(*this);
  }

  PromiseT send() { return PromiseT(request_.send()); }

 private:
  Request request_;
};

// Builds and sends a call: `build` gets the params builder, or (params, request) when it also
// adds capabilities; it may return a Status, and an error abandons the call.
template <class Req, class Build>
auto sendBuilt(Req request, Build& build) -> decltype(request.send()) {
  using Params = decltype(request.params());
  using PromiseT = decltype(request.send());
  auto run = [&]() -> decltype(auto) {
    if constexpr (std::is_invocable_v<Build&, Params>) {
      return build(request.params());
    } else {
      return build(request.params(), request);
    }
  };
  using Ret = decltype(run());
  if constexpr (std::is_void_v<Ret>) {
    run();
  } else {
    static_assert(std::is_convertible_v<Ret, Status>, "a call's build function returns a Status");
    Status built = run();
    if (!built) return PromiseT(built.error());
  }
  return request.send();
}

// ---------------------------------------------------------------------------------------------
// Server side

// What a generated server method gets. A value: take it by value in a coroutine.
template <class P, class R>
class TypedContext {
 public:
  explicit TypedContext(CallContext& context) noexcept : context_(&context) {}

  // The params, in place; checked against P's schema before the method was called. Valid during
  // the method's synchronous part only (until it first suspends): copy what is needed later.
  typename P::Reader params() const { return context_->params().getAs<P>(); }
  Result<ReceivedCap> capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const {
    return context_->capAt(s, pointerIndex);
  }
  Result<ReceivedCap> capAt(capnp::AnyList::Reader list, uint32_t element) const {
    return context_->capAt(list, element);
  }

  // Starts the results in place (see CallContext::initResults). Calling it again returns the same
  // builder.
  Result<typename R::Builder> initResults(size_t sizeHint = defaultSizeHint<R>()) {
    return context_->initResultsAs<R>(sizeHint);
  }
  // The results' cap table the generated setters fill. Precondition: initResults() succeeded.
  Result<uint32_t> addCap(const RemoteCap& cap) { return context_->addResultCap(cap); }
  Result<uint32_t> addCap(ServerObject& object) { return context_->addResultCap(object); }
  Result<uint32_t> addCap(std::unique_ptr<ServerObject> object) {
    return context_->addResultCap(std::move(object));
  }
  Result<uint32_t> addCap(const CapPromise& promise) { return context_->addResultCap(promise); }
  // A promise capability on the caller's connection, to return (setFoo(ctx, results, promise))
  // before the object exists; settle it later (see CapPromise).
  CapPromise newCapPromise() const { return context_->connection().newCapPromise(); }
  CallContext& untyped() const noexcept { return *context_; }

 private:
  CallContext* context_;  // not owned; the engine keeps it for the whole call
};

// Checks the params against P, then runs the server method `method` on a TypedContext.
template <class P, class R, class S, class M>
Promise<void> invoke(S& server, M method, CallContext& context) {
  Status shape = checkAgainstSchema<P>(context.params(), context.capCount(),
                                       context.connection().maxCapsPerMessage());
  if (!shape) return readyPromise<void>(shape.error());
  return (server.*method)(TypedContext<P, R>(context));
}

// The answer to a call of a method (or interface) the object does not implement.
inline Promise<void> unimplemented(const char* what) {
  return readyPromise<void>(Error(Errc::UNSUPPORTED, what));
}

}  // namespace agate::rpc::typed
