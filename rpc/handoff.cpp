// RpcConnection's three-party handoff: the introducer's Provide and vine, the recipient's
// Accept, the provider's provisions and the Accepts that wait for their Provide; and Forwarder,
// the export that stands for a capability of another connection. Protocol and its order and
// failure rules: schemas/rpc.capnp, "Three-party handoff".
#include <algorithm>

#include "connection_internal.h"

namespace agate::rpc {

using namespace internal;

VatNetwork::VatNetwork() : handoffs_(std::make_unique<detail::HandoffTable>()) {}
VatNetwork::~VatNetwork() = default;
size_t VatNetwork::provisionCount() const noexcept { return handoffs_->provisions.size(); }
size_t VatNetwork::waitingAcceptCount() const noexcept { return handoffs_->waiting.size(); }

namespace {

// Takes the Accepts `pick` selects out of the vat's waiting list, in the order they came.
template <class Pick>
std::vector<detail::HandoffTable::Waiting> takeWaiting(detail::HandoffTable& table, Pick pick) {
  std::vector<detail::HandoffTable::Waiting> taken;
  std::erase_if(table.waiting, [&](const detail::HandoffTable::Waiting& w) {
    if (!pick(w)) return false;
    taken.push_back(w);
    return true;
  });
  return taken;
}

bool holdsCapability(capnp::AnyPointer::Reader p);

bool structHoldsCapability(capnp::AnyStruct::Reader s) {
  for (capnp::AnyPointer::Reader p : s.getPointerSection()) {
    if (holdsCapability(p)) return true;
  }
  return false;
}

// Whether content holds a capability pointer anywhere. Runs on content a FrameReader validated,
// inside the caller's try: Cap'n Proto's nesting and traversal limits bound the walk.
bool holdsCapability(capnp::AnyPointer::Reader p) {
  switch (p.getPointerType()) {
    case capnp::PointerType::NULL_:
      return false;
    case capnp::PointerType::CAPABILITY:
      return true;
    case capnp::PointerType::STRUCT:
      return structHoldsCapability(p.getAs<capnp::AnyStruct>());
    case capnp::PointerType::LIST: {
      capnp::AnyList::Reader list = p.getAs<capnp::AnyList>();
      if (list.getElementSize() == capnp::ElementSize::INLINE_COMPOSITE) {
        for (capnp::AnyStruct::Reader s : list.as<capnp::List<capnp::AnyStruct>>()) {
          if (structHoldsCapability(s)) return true;
        }
      } else if (list.getElementSize() == capnp::ElementSize::POINTER) {
        for (capnp::AnyPointer::Reader e : list.as<capnp::List<capnp::AnyPointer>>()) {
          if (holdsCapability(e)) return true;
        }
      }
      return false;
    }
  }
  return true;  // unknown kinds are not copied
}

Status copyStructWithCaps(capnp::AnyStruct::Reader s, capnp::AnyPointer::Builder out);
Status copyListWithCaps(capnp::AnyList::Reader list, capnp::AnyPointer::Builder out);

// Copies `p` (not a capability) into `out`, capability pointers inside it included.
Status copyPointer(capnp::AnyPointer::Reader p, capnp::AnyPointer::Builder out) {
  switch (p.getPointerType()) {
    case capnp::PointerType::NULL_:
      return {};
    case capnp::PointerType::STRUCT:
      return copyStructWithCaps(p.getAs<capnp::AnyStruct>(), out);
    case capnp::PointerType::LIST:
      if (!holdsCapability(p)) {
        out.set(p);
        return {};
      }
      return copyListWithCaps(p.getAs<capnp::AnyList>(), out);
    case capnp::PointerType::CAPABILITY:
      break;  // the caller copies the index
  }
  return Error(Errc::UNSUPPORTED, "forwarding an unknown pointer kind");
}

// Copies pointer field `i` of `from` into the same field of `to`, capability pointers included.
Status copyField(capnp::AnyStruct::Reader from, capnp::AnyStruct::Builder to, uint16_t i) {
  capnp::AnyPointer::Reader p = from.getPointerSection()[i];
  if (p.getPointerType() != capnp::PointerType::CAPABILITY)
    return copyPointer(p, to.getPointerSection()[i]);
  Result<uint32_t> index = readCapPointer(from, i);
  if (!index) return index.error();
  writeCapPointer(to, i, *index);
  return {};
}

// A list that holds a capability somewhere: a list of structs (each copied field by field) or of
// pointers (capabilities, or structs and lists that hold them). Other element kinds hold no
// pointer, so never get here.
Status copyListWithCaps(capnp::AnyList::Reader list, capnp::AnyPointer::Builder out) {
  if (list.getElementSize() == capnp::ElementSize::POINTER) {
    capnp::List<capnp::AnyPointer>::Reader elements = list.as<capnp::List<capnp::AnyPointer>>();
    capnp::AnyList::Builder copy = out.initAsAnyList(capnp::ElementSize::POINTER, elements.size());
    capnp::List<capnp::AnyPointer>::Builder copied = copy.as<capnp::List<capnp::AnyPointer>>();
    for (uint32_t e = 0; e < elements.size(); ++e) {
      if (elements[e].getPointerType() != capnp::PointerType::CAPABILITY) {
        AGATE_TRY(copyPointer(elements[e], copied[e]));
        continue;
      }
      Result<uint32_t> index = readCapPointer(list, e);
      if (!index) return index.error();
      writeCapPointer(copy, e, *index);
    }
    return {};
  }
  if (list.getElementSize() != capnp::ElementSize::INLINE_COMPOSITE)
    return Error(Errc::UNSUPPORTED, "forwarding an unknown list kind");
  capnp::List<capnp::AnyStruct>::Reader elements = list.as<capnp::List<capnp::AnyStruct>>();
  const uint16_t dataWords =
      elements.size() == 0
          ? 0
          : static_cast<uint16_t>(elements[0].getDataSection().size() / WORD_BYTES);
  const uint16_t pointers =
      elements.size() == 0 ? 0 : static_cast<uint16_t>(elements[0].getPointerSection().size());
  capnp::List<capnp::AnyStruct>::Builder copy =
      out.initAsListOfAnyStruct(dataWords, pointers, elements.size());
  for (uint32_t e = 0; e < elements.size(); ++e) {
    kj::ArrayPtr<const kj::byte> data = elements[e].getDataSection();
    std::memcpy(copy[e].getDataSection().begin(), data.begin(), data.size());
    for (uint16_t f = 0; f < pointers; ++f) AGATE_TRY(copyField(elements[e], copy[e], f));
  }
  return {};
}

Status copyStructWithCaps(capnp::AnyStruct::Reader s, capnp::AnyPointer::Builder out) {
  kj::ArrayPtr<const kj::byte> data = s.getDataSection();
  const uint16_t pointers = static_cast<uint16_t>(s.getPointerSection().size());
  capnp::AnyStruct::Builder copy = out.initAsAnyStruct(
      static_cast<uint16_t>((data.size() + WORD_BYTES - 1) / WORD_BYTES), pointers);
  std::memcpy(copy.getDataSection().begin(), data.begin(), data.size());
  for (uint16_t i = 0; i < pointers; ++i) AGATE_TRY(copyField(s, copy, i));
  return {};
}

// Copies params or results content into `out` with their capability pointers (indices kept: the
// cap table is translated entry by entry in the same order). Runs on content a FrameReader
// validated; Cap'n Proto's reading limits bound the walk and throw past them.
Status copyContent(capnp::AnyPointer::Reader in, capnp::AnyPointer::Builder out) {
  try {
    if (!holdsCapability(in)) {
      out.set(in);
      return {};
    }
    if (in.getPointerType() == capnp::PointerType::CAPABILITY)
      return Error(Errc::UNSUPPORTED, "forwarding content whose root is a capability");
    return copyPointer(in, out);
  } catch (const kj::Exception&) {
    return Error(Errc::PROTOCOL_ERROR, "forwarded content does not decode");
  }
}

size_t contentBytes(capnp::AnyPointer::Reader content) {
  try {
    return content.targetSize().wordCount * WORD_BYTES;
  } catch (const kj::Exception&) {
    return 0;  // copyContent reports it
  }
}

}  // namespace

// Stands for a capability of another connection (`target`) in this vat's export table: every
// call delivered to it is sent on to the target, and its results come back as this call's
// results. Content is copied with its capabilities: each cap-table entry is passed on as the
// forwarding connection would pass it (a capability of the target's connection goes back as
// receiverHosted, one of a third connection is handed off or proxied in turn, an object this
// vat hosts is exported with shared ownership), so indices in the content stay valid. A call
// is sent on synchronously, from dispatch, so calls keep their arrival order (E-order).
//
// Two uses: a proxy, when a capability of another connection is passed to a peer that cannot
// take a handoff (or one still pipelined there), or when a promise resolves to one; and a
// handoff's vine, when it also holds the Provide's question (`provision`): dropping the vine
// (the recipient released it, or its connection died) sends Finish for the Provide, which
// reclaims an unaccepted provision. Calls pipelined on an answer whose results hand the target
// off also arrive here (their reference keeps its route through this vat).
//
// Ownership: owned by the export table of the connection it is exported on. Its RemoteCaps are
// on the host's connection (see VatNetwork on closing connections before destroying them).
class internal::Forwarder final : public ServerObject {
 public:
  Forwarder(RemoteCap target, RemoteCap provision)
      : target_(std::move(target)), provision_(std::move(provision)) {}

  Promise<void> dispatch(uint64_t interfaceId, uint16_t methodId, CallContext& ctx) override {
    capnp::AnyPointer::Reader params = ctx.params();
    Request request = target_.newCall(interfaceId, methodId, contentBytes(params) + WORD_BYTES);
    Status caps = RpcConnection::forwardParamCaps(ctx, request);
    if (!caps) return readyPromise<void>(caps.error());
    Status copied = copyContent(params, request.params());
    if (!copied) return readyPromise<void>(copied.error());
    // Only relay() awaits the forwarded call: nothing is ever pipelined on it (calls pipelined
    // on this call's results queue at our own answer), so it goes without pipelining, and
    // ends at its Return unless the results carry a capability.
    return relay(request.noPipelining().send(), ctx);
  }

  // A handoff's vine that still holds the Provide's question: the recipient's Disembargo
  // {accept} for it is passed on to the host (forwardDisembargo), once.
  bool holdsProvision() const noexcept { return !provision_.isNull(); }
  RemoteCap takeProvision() noexcept { return std::move(provision_); }
  const RemoteCap& target() const noexcept { return target_; }

 private:
  static Promise<void> relay(RemotePromise sent, CallContext& ctx) {
    Result<Response> response = co_await sent;
    AGATE_CO_TRY(response);
    capnp::AnyPointer::Reader results = response->results();
    Result<capnp::AnyPointer::Builder> out = ctx.initResults(contentBytes(results) + WORD_BYTES);
    AGATE_CO_TRY(out);
    AGATE_CO_TRY(RpcConnection::forwardResultCaps(*response, ctx));
    AGATE_CO_TRY(copyContent(results, *out));
    co_return {};
  }

  RemoteCap target_;
  RemoteCap provision_;  // a handoff's vine: the Provide's question on the host's connection
};

std::unique_ptr<ServerObject> internal::makeForwarder(RemoteCap target) {
  return std::make_unique<Forwarder>(std::move(target), RemoteCap());
}

// The capabilities of a call being forwarded, added to the request that sends it on in the same
// order (so the content's indices stay valid).
Status RpcConnection::forwardParamCaps(const CallContext& from, Request& to) {
  if (to.conn_ == nullptr || to.scrap_) return {};  // refused: send() reports why
  for (uint32_t i = 0; i < from.paramCaps_.size(); ++i) {
    Result<uint32_t> index = to.conn_->addReceivedFor(to.caps_, *from.conn_, from.paramCaps_[i]);
    if (!index) return index.error();
  }
  return {};
}

Status RpcConnection::forwardResultCaps(const Response& from, CallContext& to) {
  for (uint32_t i = 0; i < from.capCount(); ++i) {
    Result<ReceivedCap> cap = from.getCap(i);  // a null entry stays null
    Result<uint32_t> index =
        to.conn_->addReceivedFor(to.resultCaps_, *from.conn_, cap ? *cap : ReceivedCap{});
    if (!index) return index.error();
  }
  return {};
}

// A received capability passed on in `table`: a capability of a connection as addCapFor passes
// it; an object this vat hosts (exported on `origin`) is exported again with its ownership
// shared, so neither connection's release can destroy it under the other.
Result<uint32_t> RpcConnection::addReceivedFor(detail::CapTable& table, RpcConnection& origin,
                                               const ReceivedCap& cap) {
  if (cap.local == nullptr) return addCapFor(table, cap.remote);
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = cap.local;
  auto exported = origin.exportByObject_.find(cap.local);
  if (exported != origin.exportByObject_.end()) {
    e.shared = origin.shareExport(exported->second);
  } else if (cap.local == origin.exports_[0].object) {
    e.shared = origin.shareExport(0);  // the bootstrap object (not indexed by object)
  }
  return addEntry(table, std::move(e));
}

// ---------------------------------------------------------------------------------------------
// Introducer: a capability of another connection written into a cap table

Result<uint32_t> RpcConnection::addForeignCap(detail::CapTable& table, const RemoteCap& cap) {
  RpcConnection& host = *cap.conn_;
  if (tableFull(table))  // checked first: a refused entry would have made a proxy for nothing
    return Error(Errc::OUT_OF_MEMORY,
                 "more capabilities than one message carries (RpcOptions::maxCapsPerMessage)");
  if (cap.kind_ != RemoteCap::Kind::IMPORT && cap.kind_ != RemoteCap::Kind::PIPELINE)
    return Error(Errc::INVALID_ARGUMENT, "a broken capability cannot be passed");
  if (!host.isOpen()) return host.failure_;
  detail::CapEntry e;
  // A handoff needs one network on both connections, a recipient that is not the host, and the
  // import itself. A promised answer is not an object A can provide yet: it goes as a promise
  // that is handed off once the answer returns (schemas/rpc.capnp, "Embargoes"; the network is
  // asked to introduce the recipient then).
  if (canHandOff(host) && cap.kind_ == RemoteCap::Kind::PIPELINE &&
      !host.questions_[cap.id_].returned)
    return addPipelinedFor(table, cap);
  if (cap.kind_ == RemoteCap::Kind::IMPORT && canHandOff(host)) {
    // Handed off or proxied as the message is sent (settleForeignCaps), not now: the Provide
    // must follow every call this vat makes on the capability before it passes it on.
    e.kind = detail::CapEntry::Kind::FOREIGN;
    e.held = cap;
    return addEntry(table, std::move(e));
  }
  auto proxy = std::make_unique<Forwarder>(cap, RemoteCap());
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = proxy.get();
  e.owned = std::move(proxy);
  return addEntry(table, std::move(e));
}

// As a message carrying them is sent: each FOREIGN entry is handed off (a Provide to its host,
// and a vine exported here) or, where it cannot be, proxied through this vat. E-order: the
// Provide goes behind every call this vat made on the capability so far, so the recipient's
// calls, which wait at the host for the Provide, come after them.
// In a Return (`inReturn`), the peer's own object passed back while this side holds calls for
// reply space goes as a proxy too: as receiverHosted the peer would call its own object at once,
// ahead of the calls held here (those made on it before the Return); through the proxy its calls
// come back here and go out behind them. (A call's params never need it: a call is held behind
// held ones, and goes before those held after it.)
void RpcConnection::settleForeignCaps(detail::CapTable& table, bool inReturn) {
  for (uint32_t i = 0; i < table.size(); ++i) {
    detail::CapEntry& e = table[i];
    if (inReturn && e.kind == detail::CapEntry::Kind::RECEIVER_HOSTED && holding()) {
      auto proxy = std::make_unique<Forwarder>(std::move(e.held), RemoteCap());
      e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
      e.id = 0;
      e.object = proxy.get();
      e.owned = std::move(proxy);
      continue;
    }
    if (e.kind != detail::CapEntry::Kind::FOREIGN) continue;
    RemoteCap cap = std::move(e.held);
    RpcConnection& host = *cap.conn_;
    // Only a plain import: a promise import (pending, or resolved to something else) is
    // proxied, so the recipient's calls reach the host's promise export, which queues them until
    // it settles, and follow its resolution from there. Not while the host holds calls for
    // reply space: the Provide would overtake them, and the recipient's calls could reach the
    // object before calls made on it earlier; proxied, they follow them through this vat. Nor
    // when the Provide cannot go (sendProvide: maxQuestions questions open to the host, whose
    // answer table it would overflow).
    if (isOpen() && host.isOpen() && host.isPlainImport(cap.id_) && !host.holding() &&
        host.questionsLive_ < host.options_.maxQuestions &&
        options_.network->introduce(host.options_.peerVat, options_.peerVat)) {
      const uint64_t provisionId = options_.network->handoffs().nextProvisionId();
      Result<RemoteCap> provision = host.sendProvide(cap.id_, options_.peerVat, provisionId);
      if (provision) {
        auto vine = std::make_unique<Forwarder>(std::move(cap), std::move(*provision));
        e.kind = detail::CapEntry::Kind::THIRD_PARTY;
        e.vat = host.options_.peerVat;
        e.provisionId = provisionId;
        e.object = vine.get();
        e.owned = std::move(vine);
        continue;
      }
    }
    auto proxy = std::make_unique<Forwarder>(std::move(cap), RemoteCap());
    e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
    e.object = proxy.get();
    e.owned = std::move(proxy);
  }
}

// Whether a capability of `host` can be handed off to this connection's peer (one network, and
// the peer is not the host). The network's introduce() is asked separately.
bool RpcConnection::canHandOff(const RpcConnection& host) const noexcept {
  return options_.network != nullptr && host.options_.network == options_.network &&
         host.options_.peerVat != options_.peerVat;
}

uint32_t RpcConnection::takeQuestionId() {
  uint32_t qid = questionFree_;
  if (qid != NONE) {
    questionFree_ = questions_[qid].nextFree;
  } else {
    qid = static_cast<uint32_t>(questions_.size());
    questions_.emplace_back();
  }
  return qid;
}

void RpcConnection::giveQuestionId(uint32_t id) noexcept {
  questions_[id].nextFree = questionFree_;
  questionFree_ = id;
}

void RpcConnection::openQuestion(uint32_t id) {
  Question& q = questions_[id];
  // A free entry: new, or reset by freeQuestion (its fulfiller and vine are gone).
  AGATE_ASSERT(!q.inUse && !q.fulfiller && !q.vine, "question %u opened while in use", id);
  q.refs = 0;
  q.returned = q.finishSent = q.noPipelining = q.held = q.pipelinedOn = false;
  q.refused = Error{};
  q.inUse = true;
  ++questionsLive_;
}

// Sends Provide for our import `importId` (the host's export). The returned reference holds the
// Provide's question: dropping it sends Finish.
Result<RemoteCap> RpcConnection::sendProvide(uint32_t importId, VatId recipient,
                                             uint64_t provisionId) {
  // Past maxQuestions the Provide's question would pass the host's answer table, which aborts
  // the connection: the caller proxies instead.
  if (questionsLive_ >= options_.maxQuestions)
    return Error(Errc::OUT_OF_MEMORY, "RpcOptions::maxQuestions questions are open to the host");
  Result<detail::OutSlot> slot = startOut(HANDOFF_BYTES, OutKind::CALL);
  if (!slot) return slot.error();
  const uint32_t qid = takeQuestionId();
  wire::Provide::Builder p = slot->builder().initRoot<wire::Message>().initProvide();
  p.setQuestionId(qid);
  p.initTarget().setImportedCap(importId);
  p.setRecipient(recipient);
  p.setProvisionId(provisionId);
  Status sent = finishOut(*slot);
  if (!sent) {
    giveQuestionId(qid);
    return sent.error();
  }
  ++stats_.providesSent;
  openQuestion(qid);
  RemoteCap ref;
  ref.conn_ = this;
  ref.kind_ = RemoteCap::Kind::PIPELINE;
  ref.id_ = qid;
  ref.addRef();
  return ref;
}

// ---------------------------------------------------------------------------------------------
// Recipient: thirdPartyHosted entries

// The host connection of every thirdPartyHosted entry, or why there is none. WOULD_BLOCK when a
// connection is still being made: the reader awaits connecting_ and handles the message again.
Status RpcConnection::resolveHosts(Decoded& d) {
  for (uint32_t i = 0; i < d.capCount; ++i) {
    if (d.capKinds[i] != detail::CapEntry::Kind::THIRD_PARTY) continue;
    d.capHosts[i] = nullptr;
    if (options_.network == nullptr) {
      d.capHostErrors[i] =
          Error(Errc::UNSUPPORTED, "this vat takes no third-party capabilities (no VatNetwork)");
      continue;
    }
    const VatId vat = d.capVats[i];
    Result<RpcConnection*> host = Error(Errc::NOT_FOUND, "no connection to the host vat");
    auto made = std::find_if(connected_.begin(), connected_.end(),
                             [&](const auto& c) { return c.first == vat; });
    if (made != connected_.end()) {
      host = made->second;
    } else {
      Promise<RpcConnection*> connecting = options_.network->connect(vat);
      if (!connecting.isReady()) {
        connecting_.emplace(std::move(connecting));
        connectingVat_ = vat;
        return Error(Errc::WOULD_BLOCK, "connecting to a handed-off capability's host");
      }
      host = connecting.takeResult();
    }
    if (!host) {
      d.capHostErrors[i] = host.error();
    } else if (*host == nullptr || (*host)->options_.network != options_.network ||
               (*host)->options_.peerVat != vat) {
      d.capHostErrors[i] = Error(Errc::NOT_FOUND, "the network gave no connection to that vat");
    } else if (!(*host)->isOpen()) {
      d.capHostErrors[i] = (*host)->failure_;
    } else {
      d.capHosts[i] = *host;
    }
  }
  return {};
}

// Takes the vine (one reference, held until the Accept returns) and sends Accept to the host.
// The returned reference is pipelined on the Accept (or broken, with why).
RemoteCap RpcConnection::acceptThirdParty(const Decoded& d, uint32_t index, bool embargo) {
  RemoteCap vine;
  vine.conn_ = this;
  vine.kind_ = RemoteCap::Kind::IMPORT;
  vine.id_ = d.capIds[index];
  vine.addRef();
  countImported(d.capIds[index]);
  RpcConnection* host = d.capHosts[index];
  if (host == nullptr || !host->isOpen()) {
    RemoteCap broken;
    broken.kind_ = RemoteCap::Kind::BROKEN;
    broken.broken_ = host != nullptr ? host->failure_ : d.capHostErrors[index];
    return broken;  // the vine goes now: the introducer reclaims the provision
  }
  // With maxQuestions questions open to the host, the Accept's question would pass the host's
  // answer table, which aborts the connection: the vine stays the reference (the introducer
  // forwards its calls, in order, and reclaims the provision once it is released).
  if (host->questionsLive_ >= host->options_.maxQuestions) {
    ++host->stats_.acceptsDeclined;
    return vine;
  }
  return host->sendAccept(options_.peerVat, d.capProvisions[index], std::move(vine), embargo);
}

RemoteCap RpcConnection::sendAccept(VatId introducer, uint64_t provisionId, RemoteCap vine,
                                    bool embargo) {
  RemoteCap cap;
  Result<detail::OutSlot> slot = startOut(HANDOFF_BYTES, OutKind::CALL);
  if (!slot) {
    cap.kind_ = RemoteCap::Kind::BROKEN;
    cap.broken_ = slot.error();
    return cap;
  }
  const uint32_t qid = takeQuestionId();
  wire::Accept::Builder a = slot->builder().initRoot<wire::Message>().initAccept();
  a.setQuestionId(qid);
  a.setIntroducer(introducer);
  a.setProvisionId(provisionId);
  a.setEmbargo(embargo);
  Status sent = finishOut(*slot);
  if (!sent) {
    giveQuestionId(qid);
    cap.kind_ = RemoteCap::Kind::BROKEN;
    cap.broken_ = sent.error();
    return cap;
  }
  ++stats_.acceptsSent;
  openQuestion(qid);
  questions_[qid].vine.emplace(std::move(vine));
  cap.conn_ = this;
  cap.kind_ = RemoteCap::Kind::PIPELINE;
  cap.id_ = qid;
  cap.pathLength_ = 1;
  cap.path_[0] = 0;  // AcceptResults.cap
  cap.addRef();
  return cap;
}

// ---------------------------------------------------------------------------------------------
// Provider: provisions and Accepts

Status RpcConnection::handleProvide(const Decoded& d) {
  ++stats_.providesReceived;
  detail::HandoffTable& table = options_.network->handoffs();
  table.highestProvision[options_.peerVat] = d.provisionId;
  Answer& a = answerAt(d.id);
  a.state = Answer::State::QUEUED;
  a.finishReceived = false;
  a.error.clear();
  ++answersLive_;
  a.context.conn_ = this;
  a.context.answerId_ = d.id;
  a.context.paramCaps_.clear();  // empty: freed with the answer
  a.isProvide = true;            // a Disembargo {provide} may name it until the introducer's Finish
  if (d.targetIsAnswer) {
    failAnswer(a, Error(Errc::UNSUPPORTED, "provide of a promised answer"));
  } else {
    ++exports_[d.targetId].pins;  // until accepted or reclaimed
    a.pinnedExport = d.targetId;
    a.providedExport = d.targetId;
    a.providing = true;
    a.provision = {options_.peerVat, d.provisionId};
    table.provisions[a.provision] = {this, d.id, d.vat};
  }
  // Accepts that arrived first: the one for this provision goes on; those for lower ids never
  // will (this introducer's Provides arrive in increasing order).
  const auto ready = takeWaiting(table, [&](const detail::HandoffTable::Waiting& w) {
    return !w.embargoed && !w.queued && w.key.introducer == options_.peerVat &&
           w.key.provisionId <= d.provisionId;
  });
  for (const detail::HandoffTable::Waiting& w : ready) {
    Answer& accept = unparked(*w.conn, w.answerId);
    if (w.key.provisionId == d.provisionId) {
      w.conn->acceptOrWait(accept);
    } else {
      w.conn->failAnswer(accept, Error(Errc::NOT_FOUND, "no such provision (never provided)"));
    }
  }
  return {};
}

Status RpcConnection::handleAccept(const Decoded& d) {
  ++stats_.acceptsReceived;
  Answer& a = answerAt(d.id);
  a.state = Answer::State::QUEUED;
  a.finishReceived = false;
  a.error.clear();
  ++answersLive_;
  a.context.conn_ = this;
  a.context.answerId_ = d.id;
  a.context.paramCaps_.clear();  // empty: freed with the answer
  a.provision = {d.vat, d.provisionId};
  a.embargo = d.embargo;
  acceptOrWait(a);
  return {};
}

namespace {

// Accepts of `conn`'s peer waiting here: in all, and for provisions of `introducer`. Those that
// matched a provision and wait behind the introducer's queued calls are not counted: the
// provisions bound them (one Accept each), and they will go on.
struct WaitingCount {
  size_t all = 0;
  size_t ofIntroducer = 0;
};
WaitingCount waitingOf(const detail::HandoffTable& table, const RpcConnection* conn,
                       VatId introducer) {
  WaitingCount n;
  for (const detail::HandoffTable::Waiting& w : table.waiting) {
    if (w.conn != conn || w.queued) continue;
    ++n.all;
    if (w.key.introducer == introducer) ++n.ofIntroducer;
  }
  return n;
}

}  // namespace

// Parks Accept `a` in the vat's table until its Provide (or, `embargoed`, its Disembargo)
// arrives, within this peer's bound for the introducer; past it, fails the Accept. True if it
// waits.
bool RpcConnection::waitOnProvision(Answer& a, detail::HandoffTable& table, bool embargoed,
                                    bool queued) {
  const WaitingCount n = waitingOf(table, this, a.provision.introducer);
  if (n.ofIntroducer >= VatNetwork::MAX_WAITING_ACCEPTS_PER_PEER) {
    failAnswer(a, Error(Errc::OUT_OF_MEMORY,
                        "too many of this peer's accepts are waiting for this introducer's "
                        "provides"));
    return false;
  }
  if (n.all >= VatNetwork::MAX_WAITING_ACCEPTS_PER_RECIPIENT) {
    failAnswer(a, Error(Errc::OUT_OF_MEMORY,
                        "too many of this peer's accepts are waiting for their provides"));
    return false;
  }
  a.waitingForProvide = true;
  table.waiting.push_back({a.provision, this, a.id, embargoed, queued});
  return true;
}

// Matches an Accept against the vat's provisions: takes the provision, waits for it, or fails
// the Accept (leaving any provision as it was).
void RpcConnection::acceptOrWait(Answer& a) {
  detail::HandoffTable& table = options_.network->handoffs();
  auto found = table.provisions.find(a.provision);
  if (found == table.provisions.end()) {
    if (!table.connections.contains(a.provision.introducer)) {
      failAnswer(a, Error(Errc::DISCONNECTED,
                          "the introducer is not connected to this vat (its provisions are gone)"));
      return;
    }
    auto highest = table.highestProvision.find(a.provision.introducer);
    if (highest != table.highestProvision.end() && a.provision.provisionId <= highest->second) {
      failAnswer(a, Error(Errc::NOT_FOUND,
                          "no such provision (never provided, already accepted, or reclaimed)"));
      return;
    }
    if (waitOnProvision(a, table, false)) ++stats_.acceptsWaited;
    return;
  }
  const detail::HandoffTable::Provision p = found->second;
  if (p.recipient != options_.peerVat) {
    failAnswer(a, Error(Errc::PERMISSION_DENIED, "the provision is for another vat"));
    return;
  }
  if (a.embargo && !p.disembargoed) {
    // Calls the introducer forwards on the promise may still be on its ring: wait for its
    // Disembargo (schemas/rpc.capnp, "Embargoes"). One embargoed Accept per provision.
    const bool taken = std::any_of(table.waiting.begin(), table.waiting.end(),
                                   [&](const detail::HandoffTable::Waiting& w) {
                                     return w.embargoed && w.key == a.provision;
                                   });
    if (taken) {
      failAnswer(a, Error(Errc::NOT_FOUND, "no such provision (another Accept is taking it)"));
      return;
    }
    if (waitOnProvision(a, table, true)) ++stats_.acceptsEmbargoed;
    return;
  }
  // Calls the introducer made on the object before it handed it off may still wait in the
  // export's queue there (for answers their params name): the recipient's calls go behind them,
  // so the Accept completes once they went on (releaseQueuedAccepts).
  RpcConnection& provider = *p.provider;
  Export& provided = provider.exports_[provider.answers_[p.answerId]->pinnedExport];
  if (provided.queueHead != nullptr) {
    // One Accept waits per provision (the others could never take it).
    const bool taken = std::any_of(
        table.waiting.begin(), table.waiting.end(),
        [&](const detail::HandoffTable::Waiting& w) { return w.queued && w.key == a.provision; });
    if (taken) {
      failAnswer(a, Error(Errc::NOT_FOUND, "no such provision (another Accept is taking it)"));
      return;
    }
    if (waitOnProvision(a, table, false, true)) {
      provided.acceptAfterQueue = true;
      ++stats_.acceptsBehindQueue;
    }
    return;
  }
  takeProvision(a, provider, p.answerId);
}

// Export `exportId`'s queue drained (or the calls in it went): the Accepts that matched its
// provisions while calls waited there go on now, in the order they came.
void RpcConnection::releaseQueuedAccepts(uint32_t exportId) {
  detail::HandoffTable& table = options_.network->handoffs();
  const auto ready = takeWaiting(table, [&](const detail::HandoffTable::Waiting& w) {
    if (!w.queued) return false;
    auto p = table.provisions.find(w.key);
    return p != table.provisions.end() && p->second.provider == this &&
           answers_[p->second.answerId]->pinnedExport == exportId;
  });
  for (const detail::HandoffTable::Waiting& w : ready) {
    w.conn->acceptOrWait(
        unparked(*w.conn, w.answerId));  // takes it, or waits again behind calls queued meanwhile
  }
}

// Takes provision `provideAnswer` of `provider` (the introducer's connection) for Accept `a`:
// the Accept returns the object, then the Provide returns.
void RpcConnection::takeProvision(Answer& a, RpcConnection& provider, uint32_t provideAnswer) {
  const uint32_t exportId = provider.answers_[provideAnswer]->pinnedExport;
  ServerObject* object = provider.exports_[exportId].object;
  std::shared_ptr<ServerObject> owner = provider.shareExport(exportId);
  provider.completeProvide(provideAnswer);  // frees the provision; may free the provider's export
  completeAccept(a, object, std::move(owner));
}

std::shared_ptr<ServerObject> RpcConnection::shareExport(uint32_t exportId) {
  Export& e = exports_[exportId];
  if (e.owned) {
    // An object this connection owned, shared from now on: watched until it goes
    // (sharedObjectsAlive), once (`owned` is empty from here on). The list is pruned as it
    // doubles, so it stays within twice the objects alive. Objects that came shared from another
    // connection are that one's to watch.
    e.shared = std::shared_ptr<ServerObject>(std::move(e.owned));
    if (sharedOut_.size() >= sharedOutPruneAt_) {
      (void)sharedObjectsAlive();  // prunes
      sharedOutPruneAt_ = std::max<size_t>(SHARED_OUT_PRUNE_FLOOR, 2 * sharedOut_.size());
    }
    sharedOut_.push_back(e.shared);
  }
  return e.shared;  // null for an object the user owns
}

bool RpcConnection::sharedObjectsAlive() noexcept {
  std::erase_if(sharedOut_, [](const std::weak_ptr<ServerObject>& w) { return w.expired(); });
  return !sharedOut_.empty();
}

void RpcConnection::completeProvide(uint32_t answerId) {
  Answer& a = *answers_[answerId];
  dropProvision(a);
  a.state = Answer::State::RUNNING;
  completeAnswer(answerId, {});  // empty results; unpins the provided export
}

void RpcConnection::completeAccept(Answer& a, ServerObject* object,
                                   std::shared_ptr<ServerObject> owner) {
  a.state = Answer::State::RUNNING;
  Result<capnp::AnyPointer::Builder> content = initResults(a.context, 2 * WORD_BYTES);
  if (!content) {
    failAnswer(a, content.error());
    return;
  }
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = object;
  e.shared = std::move(owner);
  Result<uint32_t> index = addEntry(a.context.resultCaps_, std::move(e));
  AGATE_ASSERT(index.ok(), "a fresh results cap table is full");
  writeCapPointer(content->initAs<wire::AcceptResults>(), 0, *index);
  completeAnswer(a.id, {});
}

void RpcConnection::dropProvision(Answer& a) noexcept {
  if (!a.providing) return;
  a.providing = false;
  detail::HandoffTable& table = options_.network->handoffs();
  table.provisions.erase(a.provision);
  // An Accept that matched it (embargoed, or behind queued calls) will not get it now.
  const auto orphans = takeWaiting(table, [&](const detail::HandoffTable::Waiting& w) {
    return (w.embargoed || w.queued) && w.key == a.provision;
  });
  for (const detail::HandoffTable::Waiting& w : orphans) {
    w.conn->failAnswer(
        unparked(*w.conn, w.answerId),
        Error(Errc::NOT_FOUND, "the provision was reclaimed before the Accept could take it"));
  }
}

// The Accept a waiting entry (taken out of the list) stood for, no longer waiting.
RpcConnection::Answer& RpcConnection::unparked(RpcConnection& conn, uint32_t answerId) noexcept {
  Answer& accept = *conn.answers_[answerId];
  accept.waitingForProvide = false;
  return accept;
}

void RpcConnection::stopWaiting(Answer& a) noexcept {
  if (!a.waitingForProvide) return;
  a.waitingForProvide = false;
  std::erase_if(options_.network->handoffs().waiting, [&](const detail::HandoffTable::Waiting& w) {
    return w.conn == this && w.answerId == a.id;
  });
}

// The connection died: it is no longer an introducer this vat knows, its provisions are gone
// (a later Accept for them gets DISCONNECTED), and Accepts waiting for its Provides fail.
void RpcConnection::leaveNetwork() {
  if (options_.network == nullptr) return;
  detail::HandoffTable& table = options_.network->handoffs();
  auto self = table.connections.find(options_.peerVat);
  if (self != table.connections.end() && self->second == this) table.connections.erase(self);
  for (std::unique_ptr<Answer>& a : answers_) {
    if (a) stopWaiting(*a);  // ours, as a recipient: teardown frees the answers
  }
  const auto orphans = takeWaiting(table, [&](const detail::HandoffTable::Waiting& w) {
    return w.key.introducer == options_.peerVat;
  });
  for (const detail::HandoffTable::Waiting& w : orphans) {
    w.conn->failAnswer(
        unparked(*w.conn, w.answerId),
        Error(Errc::DISCONNECTED, "the introducer disconnected before providing the capability"));
  }
  for (std::unique_ptr<Answer>& a : answers_) {
    if (a) dropProvision(*a);
  }
}

// ---------------------------------------------------------------------------------------------
// Embargoes (schemas/rpc.capnp, "Embargoes")

Status RpcConnection::decodeDisembargo(wire::Disembargo::Reader m, Decoded& d) {
  wire::MessageTarget::Reader target = m.getTarget();
  if (target.which() != wire::MessageTarget::IMPORTED_CAP)
    return Error(Errc::PROTOCOL_ERROR, "disembargo of a promised answer");
  d.targetId = target.getImportedCap();
  wire::Disembargo::Context::Reader context = m.getContext();
  switch (context.which()) {
    case wire::Disembargo::Context::ACCEPT: {
      // The recipient's, for a promise of ours it saw resolve to a third vat's capability, or
      // for the vine of a handoff in a Return to a question it pipelined calls on.
      if (d.targetId >= exports_.size() || !exports_[d.targetId].inUse)
        return Error(Errc::PROTOCOL_ERROR, "disembargo of an id we do not export");
      const Export& e = exports_[d.targetId];
      bool pending = false;
      if (e.promise) {
        pending = !static_cast<const detail::PromiseNode*>(e.object)->provide_.isNull();
      } else if (const auto* vine = dynamic_cast<const Forwarder*>(e.object)) {
        pending = vine->holdsProvision();
      } else {
        return Error(Errc::PROTOCOL_ERROR,
                     "disembargo of an id that is neither a promise of ours nor a vine");
      }
      if (!pending || e.disembargoAfterQueue)
        return Error(Errc::PROTOCOL_ERROR, "disembargo with no embargo pending");
      d.disembargoProvide = false;
      return {};
    }
    case wire::Disembargo::Context::PROVIDE: {
      if (options_.network == nullptr)
        return Error(Errc::PROTOCOL_ERROR, "disembargo on a connection without a vat network");
      d.id = context.getProvide();
      if (d.id >= answers_.size() || !answers_[d.id] ||
          answers_[d.id]->state == Answer::State::FREE || answers_[d.id]->finishReceived ||
          !answers_[d.id]->isProvide || answers_[d.id]->disembargoed)
        return Error(Errc::PROTOCOL_ERROR, "disembargo of no live provide (or a second one)");
      // A refused Provide (of a promised answer) provides no export: nothing to disembargo.
      if (answers_[d.id]->providedExport == NONE || answers_[d.id]->providedExport != d.targetId)
        return Error(Errc::PROTOCOL_ERROR, "disembargo target is not the provided export");
      d.disembargoProvide = true;
      return {};
    }
    default:
      return Error(Errc::PROTOCOL_ERROR, "loopback disembargo is not used by this version");
  }
}

Status RpcConnection::handleDisembargo(const Decoded& d) {
  ++stats_.disembargoesReceived;
  if (!d.disembargoProvide) {
    // Introducer: the provider's Disembargo goes behind every call the recipient made on the
    // promise before: those delivered went out to the provider on arrival; those still waiting
    // in the promise's queue (for answers their params name) go out first (drainExport).
    if (exports_[d.targetId].queueHead != nullptr) {
      exports_[d.targetId].disembargoAfterQueue = true;
      return {};
    }
    forwardDisembargo(d.targetId);
    return {};
  }
  // Provider: the introducer forwarded everything; an embargoed Accept may complete.
  Answer& provide = *answers_[d.id];
  provide.disembargoed = true;
  if (!provide.providing) return {};  // taken by an Accept without embargo, or refused
  detail::HandoffTable& table = options_.network->handoffs();
  table.provisions[provide.provision].disembargoed = true;
  auto parked = std::find_if(table.waiting.begin(), table.waiting.end(),
                             [&](const detail::HandoffTable::Waiting& w) {
                               return w.embargoed && w.key == provide.provision;
                             });
  if (parked == table.waiting.end()) return {};  // the Accept comes later and goes through
  const detail::HandoffTable::Waiting w = *parked;
  table.waiting.erase(parked);
  // Calls the introducer forwarded may still wait in the export's queue: behind them.
  w.conn->acceptOrWait(unparked(*w.conn, w.answerId));
  return {};
}

// Introducer: Resolve {exportId, thirdPartyHosted} for a promise resolved to a plain import of
// another connection (node.handOff_), after the Provide to its host; the node keeps the
// Provide's question for the Disembargo. False when the network cannot introduce the peer to the
// host or the Provide cannot go out (the promise is then resolved to a proxy as usual).
bool RpcConnection::sendHandOffResolve(uint32_t exportId, detail::PromiseNode& node) {
  RpcConnection& host = *node.handOff_.conn_;
  if (!host.isOpen() || host.questionsLive_ >= host.options_.maxQuestions ||
      !options_.network->introduce(host.options_.peerVat, options_.peerVat))
    return false;
  const uint64_t provisionId = options_.network->handoffs().nextProvisionId();
  Result<RemoteCap> provision = host.sendProvide(node.handOff_.id_, options_.peerVat, provisionId);
  if (!provision) return false;
  Result<detail::OutSlot> slot = startOut(RESOLVE_BYTES);
  if (!slot) return true;  // this connection died; dropping the question reclaims the provision
  node.provide_ = *provision;
  auto vine = std::make_unique<Forwarder>(node.handOff_, std::move(*provision));
  ServerObject* object = vine.get();
  Result<uint32_t> vineId = exportObject(object, std::move(vine));
  AGATE_ASSERT(vineId.ok(), "exporting a new object failed");
  ++exports_[*vineId].remoteRefs;
  wire::Resolve::Builder r = slot->builder().initRoot<wire::Message>().initResolve();
  r.setPromiseId(exportId);
  wire::ThirdPartyCapDescriptor::Builder t = r.initCap().initThirdPartyHosted();
  t.setVatId(host.options_.peerVat);
  t.setProvisionId(provisionId);
  t.setVineId(*vineId);
  if (!finishOut(*slot)) {
    node.provide_ = RemoteCap();
    --exports_[*vineId].remoteRefs;
    maybeFreeExport(*vineId);  // drops the vine: its Finish reclaims the provision
    return true;
  }
  ++stats_.resolvesSent;
  return true;
}

// The recipient's Disembargo {accept} for promise export `exportId` reached the introducer and
// every call made on the promise before it went on to the provider: the provider's Disembargo
// {provide} follows them.
void RpcConnection::forwardDisembargo(uint32_t exportId) {
  const Export& e = exports_[exportId];
  RemoteCap provide;
  const RemoteCap* object = nullptr;  // the host's export, as this vat imports it
  if (e.promise) {
    auto* node = static_cast<detail::PromiseNode*>(e.object);
    provide = std::move(node->provide_);
    object = &node->handOff_;
  } else {
    auto* vine = static_cast<Forwarder*>(e.object);  // checked at decode
    provide = vine->takeProvision();
    object = &vine->target();
  }
  if (provide.isNull()) return;
  RpcConnection& host = *provide.conn_;
  if (host.isOpen() && object->conn_ == &host) host.sendDisembargo(object->id_, provide.id_);
}  // dropping `provide` queues the Provide's Finish behind the Disembargo

// Disembargo {importedCap(exportId), accept} (provideQuestion NONE), or {.., provide}.
void RpcConnection::sendDisembargo(uint32_t exportId, uint32_t provideQuestion) {
  Result<detail::OutSlot> slot = startOut(DISEMBARGO_BYTES);
  if (!slot) return;  // the connection died (its failure is recorded)
  wire::Disembargo::Builder m = slot->builder().initRoot<wire::Message>().initDisembargo();
  m.initTarget().setImportedCap(exportId);
  if (provideQuestion == NONE) {
    m.initContext().setAccept();
  } else {
    m.initContext().setProvide(provideQuestion);
  }
  if (!holding()) {
    if (finishOut(*slot)) ++stats_.disembargoesSent;
    return;
  }
  // Behind the calls it must follow, which are held (RpcOptions::whenReplySpaceIsFull).
  Result<detail::SpillBuffer*> b = finishToHold(*slot);
  if (!b) return;
  if (!isOpen()) {  // failed by what went out ahead of it
    giveSpill(*b);
    return;
  }
  holdDisembargo(*b, exportId, provideQuestion);
  ++stats_.disembargoesHeld;  // counted as sent when it goes (sendHeld)
}

}  // namespace agate::rpc
