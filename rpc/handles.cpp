// The handles users hold: RemoteCap, Request, RemotePromise, Response and CallContext.
#include "connection_internal.h"

namespace agate::rpc {

using namespace internal;

// ---------------------------------------------------------------------------------------------
// Handles

RemoteCap::RemoteCap(const RemoteCap& o)
    : conn_(o.conn_),
      kind_(o.kind_),
      pathLength_(o.pathLength_),
      id_(o.id_),
      path_(o.path_),
      broken_(o.broken_) {
  addRef();
}

RemoteCap::RemoteCap(RemoteCap&& o) noexcept
    : conn_(std::exchange(o.conn_, nullptr)),
      kind_(std::exchange(o.kind_, Kind::NONE)),
      pathLength_(o.pathLength_),
      id_(o.id_),
      path_(o.path_),
      broken_(o.broken_) {}

RemoteCap& RemoteCap::operator=(RemoteCap o) noexcept {
  reset();
  conn_ = std::exchange(o.conn_, nullptr);
  kind_ = std::exchange(o.kind_, Kind::NONE);
  pathLength_ = o.pathLength_;
  id_ = o.id_;
  path_ = o.path_;
  broken_ = o.broken_;
  return *this;
}

void RemoteCap::addRef() const noexcept {
  if (conn_ == nullptr) return;
  ++conn_->handles_;
  if (kind_ == Kind::IMPORT) conn_->importRef(id_);
  if (kind_ == Kind::PIPELINE) conn_->questionRef(id_);
}

void RemoteCap::reset() noexcept {
  RpcConnection* conn = std::exchange(conn_, nullptr);
  if (conn == nullptr) return;
  if (kind_ == Kind::IMPORT) conn->importUnref(id_);
  if (kind_ == Kind::PIPELINE) conn->questionUnref(id_);
  kind_ = Kind::NONE;
  conn->dropHandle();
}

bool RemoteCap::sameAs(const RemoteCap& o) const noexcept {
  if (conn_ != o.conn_ || kind_ != o.kind_ || id_ != o.id_) return false;
  if (kind_ != Kind::PIPELINE) return true;
  return pathLength_ == o.pathLength_ &&
         std::equal(path_.begin(), path_.begin() + pathLength_, o.path_.begin());
}

Request RemoteCap::newCall(uint64_t interfaceId, uint16_t methodId, size_t sizeHint) const {
  if (conn_ == nullptr) {
    Request r(nullptr,
              kind_ == Kind::BROKEN ? broken_ : Error(Errc::INVALID_ARGUMENT, "null capability"));
    r.scrap_ = std::make_unique<capnp::MallocMessageBuilder>(256);
    return r;
  }
  return conn_->newCall(*this, interfaceId, methodId, sizeHint);
}

Request::Request(RpcConnection* conn, Error error) noexcept : conn_(conn), error_(error) {
  if (conn_ != nullptr) ++conn_->handles_;
}

Request::Request(Request&& o) noexcept
    : conn_(std::exchange(o.conn_, nullptr)),
      error_(o.error_),
      unbuilt_(std::exchange(o.unbuilt_, false)),
      holdsTarget_(std::exchange(o.holdsTarget_, false)),
      noPipelining_(o.noPipelining_),
      toAnswer_(o.toAnswer_),
      pathLength_(o.pathLength_),
      methodId_(o.methodId_),
      targetId_(o.targetId_),
      replyReserve_(o.replyReserve_),
      interfaceId_(o.interfaceId_),
      sizeHint_(o.sizeHint_),
      path_(o.path_),
      slot_(std::move(o.slot_)),
      call_(o.call_),
      caps_(std::move(o.caps_)),
      scrap_(std::move(o.scrap_)) {}

Request::~Request() {
  if (conn_ == nullptr) return;
  if (slot_.active()) conn_->abandonOut(slot_);
  conn_->releaseTarget(*this);  // unsent: its target may go now
  conn_->dropHandle();
}

capnp::AnyPointer::Builder Request::params() {
  if (unbuilt_) conn_->buildCall(*this);
  if (scrap_) return scrap_->getRoot<capnp::AnyPointer>();
  AGATE_REQUIRE(slot_.active(), "params() of a request already sent");
  return call_.getParams().getContent();
}

Result<uint32_t> Request::addCap(const RemoteCap& cap) {
  if (conn_ == nullptr || scrap_) return error_;
  return conn_->addCapFor(caps_, cap, /*inParams=*/true);
}

Result<uint32_t> Request::addCap(ServerObject& object) {
  if (conn_ == nullptr || scrap_) return error_;
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = &object;
  return conn_->addEntry(caps_, std::move(e));
}

Result<uint32_t> Request::addCap(std::unique_ptr<ServerObject> object) {
  if (conn_ == nullptr || scrap_) return error_;
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = object.get();
  e.owned = std::move(object);
  return conn_->addEntry(caps_, std::move(e));
}

Result<uint32_t> Request::addCap(const CapPromise& promise) {
  if (conn_ == nullptr || scrap_) return error_;
  return conn_->addPromiseFor(caps_, promise);
}

RemotePromise Request::send() {
  if (conn_ == nullptr) {
    return RemotePromise(nullptr, 0, readyPromise<Response>(error_), error_);
  }
  AGATE_REQUIRE(unbuilt_ || slot_.active() || error_.code != Errc::OK,
                "send() of a request already sent");
  return conn_->sendRequest(*this);  // clears the cap table as it returns
}

void RemotePromise::release() noexcept {
  // Drop the promise first: a Response still inside it releases its frame before Finish.
  { Promise<Response> dropped = std::move(promise_); }
  RpcConnection* conn = std::exchange(conn_, nullptr);
  // A question freed at its Return (noFinishNeeded) is no longer this promise's reference.
  if (conn->questions_[questionId_].generation == generation_) conn->questionUnref(questionId_);
  conn->dropHandle();
}

RemoteCap RemotePromise::pipeline(std::span<const uint16_t> path) const {
  AGATE_REQUIRE(path.size() <= MAX_PIPELINE_PATH, "pipeline path of %zu steps (at most %u)",
                path.size(), MAX_PIPELINE_PATH);
  if (conn_ == nullptr)
    return RemoteCap::broken(error_.code != Errc::OK ? error_
                                                     : Error(Errc::INVALID_ARGUMENT, "no call"));
  if (noPipelining_)  // the callee was promised nothing would target its answer
    return RemoteCap::broken(
        Error(Errc::INVALID_ARGUMENT, "pipeline() on a call sent without promise pipelining"));
  RemoteCap cap;
  cap.conn_ = conn_;
  cap.kind_ = RemoteCap::Kind::PIPELINE;
  cap.id_ = questionId_;
  cap.pathLength_ = static_cast<uint8_t>(path.size());
  std::copy(path.begin(), path.end(), cap.path_.begin());
  cap.addRef();
  return cap;
}

RemoteCap RemoteCap::pipelineStep(uint16_t pointerIndex) const {
  switch (kind_) {
    case Kind::NONE:
      return RemoteCap();
    case Kind::BROKEN:
      return broken(broken_);
    case Kind::IMPORT:
      return broken(Error(Errc::INVALID_ARGUMENT,
                          "pipelineStep() on a capability, not on a path into a call's results"));
    case Kind::PIPELINE:
      break;
  }
  if (pathLength_ == MAX_PIPELINE_PATH)
    return broken(Error(Errc::INVALID_ARGUMENT,
                        "a pipelined path longer than MAX_PIPELINE_PATH (8) pointer steps"));
  RemoteCap cap = *this;  // a counted reference to the same question
  cap.path_[cap.pathLength_++] = pointerIndex;
  return cap;
}

void Response::release() noexcept { std::exchange(conn_, nullptr)->releaseResponse(slot_); }

capnp::AnyPointer::Reader Response::results() const {
  AGATE_REQUIRE(conn_ != nullptr, "use of a moved-from Response");
  return contentOf(slot_->payload);
}

Result<ReceivedCap> Response::getCap(uint32_t capIndex) const {
  AGATE_REQUIRE(conn_ != nullptr, "use of a moved-from Response");
  return conn_->receivedCap(slot_->caps, capIndex, slot_->handedOff);
}

uint32_t Response::capCount() const {
  AGATE_REQUIRE(conn_ != nullptr, "use of a moved-from Response");
  return slot_->caps.size();
}

Result<ReceivedCap> Response::capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const {
  Result<uint32_t> index = readCapPointer(s, pointerIndex);
  if (!index) return index.error();
  return getCap(*index);
}

Result<ReceivedCap> Response::capAt(capnp::AnyList::Reader list, uint32_t element) const {
  Result<uint32_t> index = readCapPointer(list, element);
  if (!index) return index.error();
  return getCap(*index);
}

capnp::AnyPointer::Reader CallContext::params() const {
  AGATE_REQUIRE(paramsValid_,
                "params() after dispatch's synchronous part (copy what you need before "
                "suspending)");
  return params_;
}

Result<ReceivedCap> CallContext::getCap(uint32_t capIndex) const {
  if (capIndex >= paramCaps_.size() || paramCaps_[capIndex].isNull())
    return Error(Errc::INVALID_ARGUMENT, "no capability at that index of the params");
  return paramCaps_[capIndex];
}

Result<ReceivedCap> CallContext::capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const {
  Result<uint32_t> index = readCapPointer(s, pointerIndex);
  if (!index) return index.error();
  return getCap(*index);
}

Result<ReceivedCap> CallContext::capAt(capnp::AnyList::Reader list, uint32_t element) const {
  Result<uint32_t> index = readCapPointer(list, element);
  if (!index) return index.error();
  return getCap(*index);
}

Result<capnp::AnyPointer::Builder> CallContext::initResults(size_t sizeHint) {
  AGATE_REQUIRE(conn_ != nullptr, "initResults() outside a call");
  return conn_->initResults(*this, sizeHint);
}

Result<uint32_t> CallContext::addResultCap(ServerObject& object) {
  AGATE_REQUIRE(results_.active(), "addResultCap() before initResults()");
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = &object;
  return conn_->addEntry(resultCaps_, std::move(e));
}

Result<uint32_t> CallContext::addResultCap(std::unique_ptr<ServerObject> object) {
  AGATE_REQUIRE(results_.active(), "addResultCap() before initResults()");
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = object.get();
  e.owned = std::move(object);
  return conn_->addEntry(resultCaps_, std::move(e));
}

Result<uint32_t> CallContext::addResultCap(const RemoteCap& cap) {
  AGATE_REQUIRE(results_.active(), "addResultCap() before initResults()");
  return conn_->addCapFor(resultCaps_, cap);
}

Result<uint32_t> CallContext::addResultCap(const CapPromise& promise) {
  AGATE_REQUIRE(results_.active(), "addResultCap() before initResults()");
  return conn_->addPromiseFor(resultCaps_, promise);
}

}  // namespace agate::rpc
