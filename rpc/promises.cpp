// RpcConnection's promise capabilities: CapPromise and the PromiseNode exported as
// senderPromise, calls queued on a pending promise, and Resolve sent and received. Protocol and
// why no embargo is needed: schemas/rpc.capnp, "Promise capabilities".
#include "connection_internal.h"

namespace agate::rpc {

using namespace internal;

// ---------------------------------------------------------------------------------------------
// The promise object and its handle

Promise<void> detail::PromiseNode::dispatch(uint64_t interfaceId, uint16_t methodId,
                                            CallContext& context) {
  switch (state_) {
    case State::RESOLVED:
      return target_->dispatch(interfaceId, methodId, context);  // synchronously: keeps order
    case State::BROKEN:
      return readyPromise<void>(error_);
    case State::PENDING:
      break;
  }
  return readyPromise<void>(Error(Errc::FAILED, "a call reached a pending promise unqueued"));
}

CapPromise RpcConnection::newCapPromise() {
  CapPromise p;
  p.node_ = std::make_shared<detail::PromiseNode>(*this);
  ++handles_;
  return p;
}

CapPromise& CapPromise::operator=(CapPromise&& o) noexcept {
  if (this != &o) {
    if (node_) reject(Error(Errc::FAILED, "the capability promise was dropped unsettled"));
    node_ = std::move(o.node_);
  }
  return *this;
}

CapPromise::~CapPromise() {
  if (node_) reject(Error(Errc::FAILED, "the capability promise was dropped unsettled"));
}

void CapPromise::resolve(ServerObject& object) {
  AGATE_REQUIRE(node_ != nullptr, "resolve() of an empty CapPromise");
  node_->state_ = detail::PromiseNode::State::RESOLVED;
  node_->target_ = &object;
  settle();
}

void CapPromise::resolve(std::unique_ptr<ServerObject> object) {
  AGATE_REQUIRE(node_ != nullptr, "resolve() of an empty CapPromise");
  AGATE_REQUIRE(object != nullptr, "resolve() to a null object");
  node_->state_ = detail::PromiseNode::State::RESOLVED;
  node_->owner_ = std::shared_ptr<ServerObject>(std::move(object));
  node_->target_ = node_->owner_.get();
  settle();
}

void CapPromise::resolve(const RemoteCap& cap) {
  AGATE_REQUIRE(node_ != nullptr, "resolve() of an empty CapPromise");
  if (cap.kind_ == RemoteCap::Kind::BROKEN) return reject(cap.broken_);
  if (cap.kind_ == RemoteCap::Kind::NONE)
    return reject(Error(Errc::INVALID_ARGUMENT, "the promise resolved to a null capability"));
  node_->state_ = detail::PromiseNode::State::RESOLVED;
  node_->owner_ = std::shared_ptr<ServerObject>(makeForwarder(cap));
  node_->target_ = node_->owner_.get();
  if (cap.conn_ == node_->conn_ && cap.kind_ == RemoteCap::Kind::IMPORT) {
    node_->toReceiver_ = true;
    node_->importId_ = cap.id_;
  }
  settle();
}

void CapPromise::reject(Error error) {
  AGATE_REQUIRE(node_ != nullptr, "reject() of an empty CapPromise");
  if (error.code == Errc::OK) error = Error(Errc::FAILED, "the promise was rejected");
  node_->state_ = detail::PromiseNode::State::BROKEN;
  node_->error_ = error;
  settle();
}

void CapPromise::settle() {
  std::shared_ptr<detail::PromiseNode> node = std::move(node_);  // alive until settled
  RpcConnection& conn = *node->conn_;
  conn.settlePromise(*node);
  --conn.handles_;
}

// ---------------------------------------------------------------------------------------------
// Sender: cap-table entries, calls on a pending promise, and the Resolve

Result<uint32_t> RpcConnection::addPromiseFor(detail::CapTable& table, const CapPromise& promise) {
  if (promise.node_ == nullptr)
    return Error(Errc::INVALID_ARGUMENT, "an empty (settled or moved-from) CapPromise");
  if (promise.node_->conn_ != this)
    return Error(Errc::INVALID_ARGUMENT, "a CapPromise of another connection");
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_PROMISE;
  e.object = promise.node_.get();
  e.shared = promise.node_;
  return table.tryAdd(std::move(e));
}

bool RpcConnection::isPendingPromise(uint32_t exportId) const noexcept {
  const Export& e = exports_[exportId];
  if (!e.promise) return false;
  // Calls still queued keep later ones behind them (E-order) even once it has settled.
  return e.queueHead != nullptr || static_cast<const detail::PromiseNode*>(e.object)->pending();
}

// Queues a call (its private copy) on a promise export until the promise settles. The export
// stays pinned while the call waits.
void RpcConnection::queueOnExport(Answer& a, uint32_t exportId, detail::SpillBuffer* copy) {
  Export& e = exports_[exportId];
  ++e.pins;
  a.queuedCall = copy;
  a.waitingOnExport = exportId;
  a.nextInQueue = nullptr;
  if (e.queueTail != nullptr) {
    e.queueTail->nextInQueue = &a;
  } else {
    e.queueHead = &a;
  }
  e.queueTail = &a;
  ++stats_.promiseCallsQueued;
}

void RpcConnection::deliverOnExport(Answer& a, uint32_t exportId) {
  detail::SpillBuffer* copy = std::exchange(a.queuedCall, nullptr);
  // Its own reader: a delivery may run inside another call's dispatch (a promise settled there)
  // whose params replayReader_ may still be serving.
  FrameReader reader(rx_.limits());
  Result<MessageView> view = reader.tryDecode(copy->bytes());
  AGATE_ASSERT(view.ok(), "a private copy of a validated call no longer decodes");
  wire::Call::Reader call = view->getRoot<wire::Message>().getCall();
  deliver(a, exportId, call.getInterfaceId(), call.getMethodId(),
          capnp::AnyStruct::Reader(call.getParams()));
  giveSpill(copy);  // params were readable during dispatch's synchronous part only
}

// The promise settled: deliver (or fail) the calls queued on its export in arrival order, then
// tell the peer if it still holds references (schemas/rpc.capnp, "Promise capabilities").
void RpcConnection::settlePromise(detail::PromiseNode& node) {
  auto found = exportByObject_.find(&node);
  if (found == exportByObject_.end() || !isOpen()) return;  // never sent, or nobody to tell
  const uint32_t id = found->second;
  ++exports_[id].pins;  // the export outlives the deliveries (exports_ may grow meanwhile)
  while (Answer* q = exports_[id].queueHead) {
    exports_[id].queueHead = q->nextInQueue;
    if (exports_[id].queueHead == nullptr) exports_[id].queueTail = nullptr;
    q->nextInQueue = nullptr;
    q->waitingOnExport = NONE;
    exportUnpin(id);  // the queued call's pin; deliver() pins it again while it runs
    deliverOnExport(*q, id);
    if (!isOpen()) break;
  }
  if (isOpen() && exports_[id].inUse && exports_[id].remoteRefs > 0) sendResolve(id, node);
  exportUnpin(id);
}

void RpcConnection::sendResolve(uint32_t exportId, detail::PromiseNode& node) {
  Result<detail::OutSlot> slot = startOut(RESOLVE_BYTES);
  if (!slot) return;  // the connection died (its failure is recorded)
  wire::Resolve::Builder r = slot->builder().initRoot<wire::Message>().initResolve();
  r.setPromiseId(exportId);
  uint32_t resolution = NONE;  // an export given a reference in this message
  if (node.state_ == detail::PromiseNode::State::BROKEN) {
    writeException(r.initException(), node.error_);
  } else if (node.toReceiver_) {
    r.initCap().setReceiverHosted(node.importId_);
  } else {
    Result<uint32_t> id = exportObject(node.target_, nullptr, node.owner_);
    if (!id) {
      abandonOut(*slot);
      return;
    }
    resolution = *id;
    ++exports_[resolution].remoteRefs;
    r.initCap().setSenderHosted(resolution);
  }
  if (!finishOut(*slot)) {
    if (resolution != NONE) {
      --exports_[resolution].remoteRefs;
      maybeFreeExport(resolution);
    }
    return;
  }
  ++stats_.resolvesSent;
}

// ---------------------------------------------------------------------------------------------
// Receiver: promise imports and Resolve

void RpcConnection::noteImported(uint32_t importId, detail::CapEntry::Kind kind) noexcept {
  imports_[importId].promise = kind == detail::CapEntry::Kind::SENDER_PROMISE;
}

// Where calls on import `importId` go: its resolution (never itself resolved: a resolution is
// a plain import, see decodeResolve), or `broken` is set.
uint32_t RpcConnection::resolvedImport(uint32_t importId, Error& broken) const noexcept {
  const Import& imp = imports_[importId];
  if (imp.broken.code != Errc::OK) broken = imp.broken;
  return imp.resolvedTo != NONE ? imp.resolvedTo : importId;
}

Status RpcConnection::decodeResolve(wire::Resolve::Reader r, Decoded& d) {
  d.id = r.getPromiseId();
  if (d.id >= imports_.size() || !imports_[d.id].promise)
    return Error(Errc::PROTOCOL_ERROR, "resolve for an id that is not an unresolved promise");
  switch (r.which()) {
    case wire::Resolve::CAP: {
      wire::CapDescriptor::Reader c = r.getCap();
      switch (c.which()) {
        case wire::CapDescriptor::SENDER_HOSTED:
          d.resolveKind = detail::CapEntry::Kind::SENDER_HOSTED;
          d.resolveId = c.getSenderHosted();
          if (d.resolveId >= options_.maxImports)
            return Error(Errc::PROTOCOL_ERROR, "export id beyond the import table's bound");
          // Not a promise we hold (this one included): so a resolution is never a promise and
          // every chain is one step (no loops, no long walks).
          if (d.resolveId < imports_.size() && imports_[d.resolveId].localRefs > 0 &&
              imports_[d.resolveId].promise)
            return Error(Errc::PROTOCOL_ERROR, "promise resolved to a promise");
          return {};
        case wire::CapDescriptor::RECEIVER_HOSTED:
          d.resolveKind = detail::CapEntry::Kind::RECEIVER_HOSTED;
          d.resolveId = c.getReceiverHosted();
          if (d.resolveId >= exports_.size() || !exports_[d.resolveId].inUse)
            return Error(Errc::PROTOCOL_ERROR, "resolve to an export that does not exist");
          return {};
        default:
          return Error(Errc::PROTOCOL_ERROR,
                       "resolve to no capability, a promise or a third party's capability");
      }
    }
    case wire::Resolve::EXCEPTION:
      d.resolveBroken = true;
      d.exception = r.getException();
      (void)d.exception.getReason();  // read inside the boundary: a malformed Text throws
      return {};
    default:
      return Error(Errc::PROTOCOL_ERROR, "unknown resolve kind");
  }
}

Status RpcConnection::handleResolve(const Decoded& d) {
  ++stats_.resolvesReceived;
  imports_[d.id].promise = false;
  const bool held = imports_[d.id].localRefs > 0;
  if (d.resolveBroken) {
    if (held) imports_[d.id].broken = remoteError(d.exception);
    return {};
  }
  // A capability we host: our calls keep going through the promise and the sender forwards
  // them back, in order (no route changes, so no embargo).
  if (!isImported(d.resolveKind)) return {};
  importRef(d.resolveId);  // may grow imports_
  ++imports_[d.resolveId].remoteRefs;
  noteImported(d.resolveId, d.resolveKind);
  if (held) {
    imports_[d.id].resolvedTo = d.resolveId;
  } else {
    importUnref(d.resolveId);  // we released the promise meanwhile: give the resolution back
  }
  return {};
}

}  // namespace agate::rpc
