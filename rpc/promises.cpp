// RpcConnection's promise capabilities: CapPromise and the PromiseNode exported as
// senderPromise, calls queued on a pending promise (or sent on at once while it waits for a
// pipelined answer of another connection), and Resolve sent and received. Protocol:
// schemas/rpc.capnp, "Promise capabilities"; a resolution handed off: "Embargoes".
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
      return readyPromise<void>(error_.get());  // copied by the answer it fails, at once
    case State::PENDING:
      // Waiting for a call of another connection: sent on at once, pipelined (keeps order).
      if (forward_) return forward_->dispatch(interfaceId, methodId, context);
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
  // A promise passed back (ReceivedCap::local) may be this one, or another still pending:
  // calls would loop, or reach a node that cannot take them. A resolution is never a promise.
  if (detail::PromiseNode::pendingOne(object) != nullptr)
    return reject(Error(Errc::INVALID_ARGUMENT, "a promise resolved to a pending promise"));
  if (typeid(object) == typeid(detail::PromiseNode)) {
    // One of ours that settled: this one settles as it did. Named on the wire as a promise of
    // ours (its Resolve may not have gone yet, and a peer holds it as a promise, settled or
    // not), it would resolve this one to a promise, which the protocol refuses.
    auto& settled = static_cast<detail::PromiseNode&>(object);
    if (settled.state_ == detail::PromiseNode::State::BROKEN) return reject(settled.error_.get());
    node_->state_ = detail::PromiseNode::State::RESOLVED;
    node_->owner_ = settled.owner_;
    node_->target_ = settled.target_;
    settle();
    return;
  }
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
  RpcConnection& conn = *node_->conn_;
  RpcConnection* host = cap.conn_;
  // A capability of another connection that can be handed off to the peer: announced as
  // thirdPartyHosted once known (an import), or once the call it comes from returns (pipelined),
  // with an embargo (schemas/rpc.capnp, "Embargoes"), if the network introduces the peer then.
  const bool foreign = host != &conn && host->isOpen() && conn.canHandOff(*host);
  const bool plainImport = cap.kind_ == RemoteCap::Kind::IMPORT && host->isPlainImport(cap.id_);
  const bool pipelined =
      cap.kind_ == RemoteCap::Kind::PIPELINE && !host->questions_[cap.id_].returned;
  if (foreign && (plainImport || pipelined)) {
    if (pipelined) {
      node_->forward_ = makeForwarder(cap);
      node_->awaiting_ = cap;
      host->watchAnswer(node_);
      settle();  // still pending: queued calls go on through forward_, no Resolve yet
      return;
    }
    node_->handOff_ = cap;
  }
  node_->state_ = detail::PromiseNode::State::RESOLVED;
  node_->owner_ = std::shared_ptr<ServerObject>(makeForwarder(cap));
  node_->target_ = node_->owner_.get();
  if (host == &conn && cap.kind_ == RemoteCap::Kind::IMPORT) {
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
  conn.dropHandle();
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
  return addEntry(table, std::move(e));
}

// A capability pipelined on a question of another connection, passed to a peer it can be handed
// off to: a promise whose calls are sent on at once, settled when the question returns.
Result<uint32_t> RpcConnection::addPipelinedFor(detail::CapTable& table, const RemoteCap& cap) {
  auto node = std::make_shared<detail::PromiseNode>(*this);
  node->forward_ = makeForwarder(cap);
  node->awaiting_ = cap;
  cap.conn_->watchAnswer(node);
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_PROMISE;
  e.object = node.get();
  e.shared = std::move(node);
  return addEntry(table, std::move(e));
}

bool RpcConnection::isPlainImport(uint32_t importId) const noexcept {
  const Import& imp = imports_[importId];
  return !imp.promise && imp.resolvedTo == NONE && !imp.elsewhere && imp.broken.code == Errc::OK;
}

// ---------------------------------------------------------------------------------------------
// Promises waiting for one of this connection's questions (PromiseNode::awaiting_)

void RpcConnection::watchAnswer(const std::shared_ptr<detail::PromiseNode>& node) {
  watchers_.emplace_back(node->awaiting_.id_, node);
}

// Question d.id returned: what each node waiting on it resolves to. A plain import at the node's
// path may be handed off; any other capability keeps the route the calls took (the node's
// forwarder, pipelined on the answer); an error breaks the node. Runs before the Return's
// Response exists (the import is referenced before anything can release it); the nodes are
// settled by settleWatched() once the Return is handled.
void RpcConnection::takeWatchers(const Decoded& d) {
  std::erase_if(watchers_, [&](std::pair<uint32_t, std::weak_ptr<detail::PromiseNode>>& w) {
    if (w.first != d.id) return false;
    std::shared_ptr<detail::PromiseNode> node = w.second.lock();
    if (node == nullptr || !node->pending()) return true;
    Result<RemoteCap> resolution = RemoteCap();
    if (d.returnKind == wire::Return::RESULTS) {
      const RemoteCap& p = node->awaiting_;
      Result<uint32_t> index = capIndexAtPath(d.payload, {p.path_.data(), p.pathLength_});
      if (!index) {
        resolution = index.error();
      } else if (*index >= d.capCount) {
        resolution = Error(Errc::FAILED, "pipelined call: capability index outside the results");
      } else if (d.capKinds[*index] == detail::CapEntry::Kind::SENDER_HOSTED) {
        RemoteCap cap;  // senderHosted is never a promise we hold (decodeCapTable)
        cap.conn_ = this;
        cap.kind_ = RemoteCap::Kind::IMPORT;
        cap.id_ = d.capIds[*index];
        cap.addRef();
        resolution = std::move(cap);
      }
    } else if (d.returnKind == wire::Return::EXCEPTION) {
      resolution = d.refused.code != Errc::OK ? d.refused : remoteError(d.exception);
    } else {
      resolution = Error(Errc::CANCELLED, "the call the capability came from was cancelled");
    }
    settling_.emplace_back(std::move(node), std::move(resolution));
    return true;
  });
}

void RpcConnection::settleWatched() {
  std::vector<std::pair<std::shared_ptr<detail::PromiseNode>, Result<RemoteCap>>> ready;
  ready.swap(settling_);
  for (auto& [node, resolution] : ready) settleAwaited(*node, std::move(resolution));
}

// The connection died: nodes waiting on its questions break with its error.
void RpcConnection::failWatchers(const Error& error) {
  std::vector<std::shared_ptr<detail::PromiseNode>> nodes;
  for (auto& [id, weak] : watchers_) {
    if (std::shared_ptr<detail::PromiseNode> node = weak.lock()) nodes.push_back(std::move(node));
  }
  watchers_.clear();
  for (std::shared_ptr<detail::PromiseNode>& node : nodes) settleAwaited(*node, error);
}

// Settles a node that waited on a pipelined capability: to an import (handed off when it can
// be), to the capability it forwarded to (a null resolution: the route stays), or broken.
void RpcConnection::settleAwaited(detail::PromiseNode& node, Result<RemoteCap> resolution) {
  if (!node.pending()) return;
  // Dropped after settling: the calls already sent on through them are on their way.
  std::unique_ptr<ServerObject> forward = std::move(node.forward_);
  RemoteCap awaited = std::move(node.awaiting_);
  if (!resolution) {
    node.state_ = detail::PromiseNode::State::BROKEN;
    node.error_ = resolution.error();
  } else if (resolution->isNull()) {
    node.state_ = detail::PromiseNode::State::RESOLVED;
    node.owner_ = std::shared_ptr<ServerObject>(std::move(forward));
    node.target_ = node.owner_.get();
  } else {
    RpcConnection& conn = *node.conn_;
    node.state_ = detail::PromiseNode::State::RESOLVED;
    node.owner_ = std::shared_ptr<ServerObject>(makeForwarder(*resolution));
    node.target_ = node.owner_.get();
    if (conn.canHandOff(*resolution->conn_)) node.handOff_ = std::move(*resolution);
  }
  node.conn_->settlePromise(node);
}

// Queues a call (its private copy) on an export (mustQueueOnExport says when), in arrival
// order, until drainExport delivers it. The export stays pinned while the call waits.
void RpcConnection::queueOnExport(Answer& a, uint32_t exportId, detail::SpillBuffer* copy) {
  Export& e = exports_[exportId];
  ++e.pins;
  keepQueuedCall(a, copy);
  a.waitingOnExport = exportId;
  a.nextInQueue = nullptr;
  if (e.queueTail == nullptr) {
    e.queueHead = e.queueTail = &a;
  } else if (e.queueTail->arrival < a.arrival) {
    e.queueTail->nextInQueue = &a;  // the usual case: the newest call
    e.queueTail = &a;
  } else {
    // A call that came out of an answer's queue, older than some waiting here: in arrival order.
    Answer** link = &e.queueHead;
    while ((*link)->arrival < a.arrival) link = &(*link)->nextInQueue;
    a.nextInQueue = *link;
    *link = &a;
  }
  if (e.promise) {
    ++stats_.promiseCallsQueued;
  } else if (a.paramWaits == 0) {
    ++stats_.callsQueuedBehind;
  }
}

void RpcConnection::deliverOnExport(Answer& a, uint32_t exportId) {
  detail::SpillBuffer* copy = takeQueuedCall(a);
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
  drainExport(id);      // up to a call still waiting for the answers its params name
  if (isOpen() && exports_[id].inUse && exports_[id].remoteRefs > 0 && !node.pending()) {
    if (exports_[id].queueHead != nullptr) {
      exports_[id].resolveAfterQueue = true;  // sent by drainExport once they are delivered
    } else {
      sendResolve(id, node);
    }
  } else if (exports_[id].inUse && !node.pending()) {
    exports_[id].resolvePending = false;  // the peer holds none: no import of it to settle
  }
  exportUnpin(id);
}

void RpcConnection::sendResolve(uint32_t exportId, detail::PromiseNode& node) {
  exports_[exportId].resolvePending = false;  // from this message on it is named as it is now
  if (!node.handOff_.isNull() && sendHandOffResolve(exportId, node)) return;
  Result<detail::OutSlot> slot = startOut(RESOLVE_BYTES);
  if (!slot) return;  // the connection died (its failure is recorded)
  wire::Resolve::Builder r = slot->builder().initRoot<wire::Message>().initResolve();
  r.setPromiseId(exportId);
  uint32_t resolution = NONE;  // an export given a reference in this message
  if (node.state_ == detail::PromiseNode::State::BROKEN) {
    writeException(r.initException(), node.error_.get());
  } else if (node.toReceiver_) {
    r.initCap().setReceiverHosted(node.importId_);
  } else {
    Result<uint32_t> id = exportObject(node.target_, nullptr, node.owner_);
    if (id) {
      resolution = *id;
      ++exports_[resolution].remoteRefs;
      r.initCap().setSenderHosted(resolution);
    } else {
      // The peer holds as many references to the resolution as are counted (it never
      // releases): it gets the reason rather than a promise that never settles.
      writeException(r.initException(), id.error());
    }
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

// A promise of the peer's that this side takes no reference to (its Return's references were
// released by Finish): a Resolve for it is still well-formed, and handled as for a promise
// released (nothing held: the resolution's reference goes back). An id this side holds keeps
// what it is (the same id in another message names the same export).
void RpcConnection::notePromise(uint32_t importId) {
  if (importId >= imports_.size()) {
    const size_t before = imports_.capacity();
    imports_.resize(importId + 1);
    chargeGrowth(imports_, before);
  }
  if (imports_[importId].localRefs == 0) imports_[importId].promise = true;
}

// Where calls on import `importId` go: its resolution (never itself resolved: a resolution is
// a plain import, see decodeResolve), or `broken` is set.
uint32_t RpcConnection::resolvedImport(uint32_t importId, Error& broken) const noexcept {
  const Import& imp = imports_[importId];
  if (imp.broken.code != Errc::OK) broken = imp.broken;
  return imp.resolvedTo != NONE ? imp.resolvedTo : importId;
}

// Whether import `id` is held and is a promise, pending or already resolved (to an import, a
// third party's capability or an error). A resolution may name neither: every chain stays one
// step, so no walk along a chain (calls, importUnref's recursion) can be made long by a peer.
bool RpcConnection::heldPromiseOrResolved(uint32_t id) const noexcept {
  if (id >= imports_.size() || imports_[id].localRefs == 0) return false;
  const Import& imp = imports_[id];
  return imp.promise || imp.resolvedTo != NONE || imp.elsewhere != nullptr ||
         imp.broken.code != Errc::OK;
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
          if (heldPromiseOrResolved(d.resolveId))
            return Error(Errc::PROTOCOL_ERROR, "promise resolved to a promise");
          return {};
        case wire::CapDescriptor::RECEIVER_HOSTED:
          d.resolveKind = detail::CapEntry::Kind::RECEIVER_HOSTED;
          d.resolveId = c.getReceiverHosted();
          if (d.resolveId >= exports_.size() || !exports_[d.resolveId].inUse)
            return Error(Errc::PROTOCOL_ERROR, "resolve to an export that does not exist");
          return {};
        case wire::CapDescriptor::THIRD_PARTY_HOSTED: {
          // Handed off (see "Embargoes"): checked as a cap-table entry; resolveHosts finds the
          // host's connection.
          wire::ThirdPartyCapDescriptor::Reader t = c.getThirdPartyHosted();
          d.resolveKind = detail::CapEntry::Kind::THIRD_PARTY;
          scratchFor(d, 1);
          d.capCount = 1;
          d.capKinds[0] = detail::CapEntry::Kind::THIRD_PARTY;
          d.capIds[0] = t.getVineId();
          d.capVats[0] = t.getVatId();
          d.capProvisions[0] = t.getProvisionId();
          d.thirdPartyCount = 1;
          if (d.capIds[0] >= options_.maxImports)
            return Error(Errc::PROTOCOL_ERROR, "vine id beyond the import table's bound");
          if (heldPromiseOrResolved(d.capIds[0]))
            return Error(Errc::PROTOCOL_ERROR,
                         "promise resolved to a third party through a promise");
          if (d.capVats[0] == NO_VAT || d.capVats[0] == options_.peerVat ||
              (options_.network != nullptr && d.capVats[0] == options_.network->vatId()))
            return Error(Errc::PROTOCOL_ERROR,
                         "third-party capability hosted by no vat, the sender or the receiver");
          return {};
        }
        default:
          return Error(Errc::PROTOCOL_ERROR, "resolve to no capability or a promise");
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
    if (held) imports_[d.id].setBroken(remoteError(d.exception));
    return {};
  }
  if (d.resolveKind == detail::CapEntry::Kind::THIRD_PARTY) {
    if (!held) {  // released meanwhile: give the vine back, the introducer reclaims
      importRef(d.capIds[0]);
      countImported(d.capIds[0]);
      noteImported(d.capIds[0], detail::CapEntry::Kind::SENDER_HOSTED);
      importUnref(d.capIds[0]);
      return {};
    }
    // New calls go to the host, pipelined on an embargoed Accept; the Disembargo goes behind
    // every call made on the promise so far (schemas/rpc.capnp, "Embargoes").
    RemoteCap cap = acceptThirdParty(d, 0, /*embargo=*/true);
    noteImported(d.capIds[0], detail::CapEntry::Kind::SENDER_HOSTED);  // the vine: a plain import
    if (cap.kind_ == RemoteCap::Kind::BROKEN) {
      // Copied: the text may be another connection's.
      imports_[d.id].setBroken(cap.broken_);
    } else {
      imports_[d.id].elsewhere = std::make_unique<RemoteCap>(std::move(cap));
    }
    sendDisembargo(d.id, NONE);
    return {};
  }
  // A capability we host: our calls keep going through the promise and the sender forwards
  // them back, in order (no route changes, so no embargo).
  if (!isImported(d.resolveKind)) return {};
  importRef(d.resolveId);  // may grow imports_
  countImported(d.resolveId);
  noteImported(d.resolveId, d.resolveKind);
  if (held) {
    imports_[d.id].resolvedTo = d.resolveId;
  } else {
    importUnref(d.resolveId);  // we released the promise meanwhile: give the resolution back
  }
  return {};
}

}  // namespace agate::rpc
