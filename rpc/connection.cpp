// RpcConnection: life cycle, exports and imports, questions. See connection.h and rpc/README.md.
#include "connection_internal.h"

namespace agate::rpc {

using namespace internal;

MessageReceiverOptions rpcReceiverOptions(MessageReceiverOptions base) {
  base.limits.allowCapabilityPointers = true;
  // The reader takes messages until the ring is empty (which publishes the releases) and flushes
  // before it waits on anything else (readLoop).
  base.deferReleases = true;
  // Call, Return, Finish and Release of the common shapes are read from the frame's words
  // (fast_decode.h), every read checked against the frame's end; only other messages are
  // validated (handleMessage). A common call kept to be delivered later is written afresh from
  // the fields read (copyCall).
  base.validateOnDemand = true;
  return base;
}

// ---------------------------------------------------------------------------------------------
// Construction and teardown

RpcConnection::RpcConnection(MessageSender& tx, MessageReceiver& rx, EventLoop& loop,
                             RpcOptions options)
    : tx_(tx),
      rx_(rx),
      loop_(loop),
      options_(options),
      answerPools_(std::make_unique<AnswerPools>()),
      replayReader_(rx.limits()),
      debtTask_(*this),
      teardownTask_(*this),
      worklistTask_(*this),
      finishTask_(*this),
      ringTask_(*this),
      heldTask_(*this) {
  AGATE_REQUIRE(rx.limits().allowCapabilityPointers,
                "an RPC connection's MessageReceiver must be built with rpcReceiverOptions()");
  AGATE_REQUIRE(options_.maxMessageBytes >= 1024, "maxMessageBytes %zu is below 1 KiB",
                options_.maxMessageBytes);
  AGATE_REQUIRE(options_.maxQuestions >= 1, "maxQuestions is 0");
  AGATE_REQUIRE(options_.maxHoldTime >= Duration::zero(), "maxHoldTime is negative");
  AGATE_REQUIRE(options_.replyBytesPerCall >= 16,
                "replyBytesPerCall %u is below a frame header and a word",
                options_.replyBytesPerCall);
  // Whatever is kept beyond its frame (a message waiting for ring space, a pipelined call queued
  // at its answer, a held Response) is copied into a spill buffer: the largest class bounds both
  // what this side builds and what it accepts.
  AGATE_REQUIRE(options_.maxMessageBytes <= MAX_SPILL_BYTES,
                "maxMessageBytes %zu is above the largest spill buffer (%zu)",
                options_.maxMessageBytes, MAX_SPILL_BYTES);
  AGATE_REQUIRE(options_.maxQueuedBytes >= options_.maxMessageBytes,
                "maxQueuedBytes %zu is below maxMessageBytes %zu: one message must fit the queue",
                options_.maxQueuedBytes, options_.maxMessageBytes);
  AGATE_REQUIRE(
      options_.maxCapsPerMessage >= 1 && options_.maxCapsPerMessage <= CAPS_PER_MESSAGE_LIMIT,
      "maxCapsPerMessage %u is outside 1..%u", options_.maxCapsPerMessage, CAPS_PER_MESSAGE_LIMIT);
  AGATE_REQUIRE(options_.releaseReferencesAt >= 2 && options_.releaseReferencesAt <= 1u << 31,
                "releaseReferencesAt %u is outside 2..2^31", options_.releaseReferencesAt);
  // Typed getters of a list of capabilities re-read the list for each element (and a loop reads
  // its size each time too): every element of lists as long in all as the bound, read one by
  // one, must fit the passes over a message its reader is given beyond the envelope's decode.
  static_assert(ReadLimits::READ_PASSES > 1);
  const uint64_t bound = options_.maxCapsPerMessage;
  const uint64_t needed =
      (2 * bound * bound + ReadLimits::READ_PASSES - 2) / (ReadLimits::READ_PASSES - 1);
  AGATE_REQUIRE(needed <= rx.limits().traversalLimitWords,
                "maxCapsPerMessage %u: reading lists of that many capabilities element by element "
                "costs %llu words, beyond the receiver's traversal budget (raise "
                "ReadLimits::traversalLimitWords to at least %llu)",
                options_.maxCapsPerMessage, static_cast<unsigned long long>(2 * bound * bound),
                static_cast<unsigned long long>(needed));
  AGATE_REQUIRE(rx.limits().maxFrameBytes <= MAX_SPILL_BYTES,
                "the receiver accepts frames of %zu bytes, above the largest spill buffer (%zu)",
                rx.limits().maxFrameBytes, MAX_SPILL_BYTES);
  // Nothing larger than the outbound ring's largest frame can ever be written: one built in a
  // spill buffer (where the ring has no say) would end the connection when the queue reached it.
  // So the bound on what this side builds is the smaller of the two.
  if (const uint64_t frame = tx.sender().maxPayload(); frame > 0)
    options_.maxMessageBytes = std::min<size_t>(options_.maxMessageBytes, frame);
  // The ring the peer's replies land on: its capacity, less the word the ring always keeps
  // free, is the reply space the calls in flight may reserve. A detached receiver (0) leaves
  // none: every call is refused, as it would fail.
  if (const uint64_t ring = rx.receiver().capacity(); ring > FRAME_HEADER_BYTES)
    replyBudget_ = ring - FRAME_HEADER_BYTES;
  questions_.emplace_back();  // question id 0 is never used: 0 means "no question"
  questions_[0].inUse = true;
  questionFree_ = NONE;
  exports_.emplace_back();  // export 0: the bootstrap object, never released
  AGATE_REQUIRE(options_.bootstrap == nullptr || options_.sharedBootstrap == nullptr,
                "RpcOptions::bootstrap and RpcOptions::sharedBootstrap both set");
  exports_[0].object =
      options_.sharedBootstrap ? options_.sharedBootstrap.get() : options_.bootstrap;
  exports_[0].shared = std::move(options_.sharedBootstrap);
  if (exports_[0].shared) sharedOut_.push_back(exports_[0].shared);  // watched, as shareExport's
  exports_[0].inUse = true;
  exportsLive_ = 1;
  exportFree_ = NONE;
  spareExportNodes_.reserve(MAX_SPARE_EXPORT_NODES);
  AGATE_REQUIRE((options_.network == nullptr) == (options_.peerVat == NO_VAT),
                "RpcOptions::network and RpcOptions::peerVat go together");
  if (options_.network != nullptr) {
    AGATE_REQUIRE(options_.peerVat != options_.network->vatId(), "a connection to its own vat");
    options_.network->handoffs().connections[options_.peerVat] = this;
  }
  reader_.emplace(readLoop());
}

RpcConnection::~RpcConnection() {
  AGATE_REQUIRE(dispatching_ == 0,
                "a connection destroyed from inside one of its own calls (shutdown() it there)");
  fail(Error(Errc::DISCONNECTED, "the connection was closed"));
  teardown();
  ringPeer();  // ringTask_ unlinks itself with the connection: ring what it still owed
  AGATE_REQUIRE(handles_ == 0,
                "%llu RemoteCap/Request/RemotePromise/Response handles outlive their connection",
                static_cast<unsigned long long>(handles_));
  // Spill buffers are owned by spillStore_; nothing else to free. What the budget paid for
  // goes back with them (what it never paid for was never taken).
  if (options_.budget != nullptr && charged_ != 0) options_.budget->give(charged_);
}

void RpcConnection::close(Error reason) { fail(reason); }

void RpcConnection::postUnreferenced() noexcept {
  if (!isOpen() && !unreferencedTask_->isQueued()) loop_.post(*unreferencedTask_);
}

void RpcConnection::shutdown(Error reason) {
  fail(reason);                       // posts the teardown
  if (dispatching_ == 0) teardown();  // else the running method and its object go after it
}

// ---------------------------------------------------------------------------------------------
// RpcOptions::budget: what this side allocates for the peer, charged to it

void RpcConnection::charge(size_t bytes) noexcept {
  StateBudget* budget = options_.budget;
  if (budget == nullptr || bytes == 0) return;
  if (debt_ == 0 && budget->take(bytes)) {
    charged_ += bytes;
    return;
  }
  if (refusingForQuota_) return;  // releasing a refused call's capabilities: kept unpaid
  // Owed: allocated already (a reply, a table entry), so asked for from a task of its own; the
  // reader reads nothing more until it is paid.
  debt_ += bytes;
  if (!payingDebt_ && isOpen() && !debtTask_.isQueued()) loop_.post(debtTask_);
}

bool RpcConnection::tryCharge(size_t bytes) noexcept {
  StateBudget* budget = options_.budget;
  if (budget == nullptr || bytes == 0) return true;
  if (debt_ != 0 || !budget->take(bytes)) return false;
  charged_ += bytes;
  return true;
}

void RpcConnection::settleDebt() noexcept {
  if (debt_ != 0 && options_.budget->take(debt_)) charged_ += std::exchange(debt_, 0);
}

void RpcConnection::startPayingDebt() {
  if (payingDebt_ || debt_ == 0 || !isOpen()) return;
  payingDebt_ = true;
  debtPayment_.emplace(payDebt());  // the last one has finished (payingDebt_ was clear)
}

Promise<void> RpcConnection::payDebt() {
  while (debt_ != 0 && isOpen()) {
    const size_t owed = debt_;
    Status grown = co_await options_.budget->grow(owed);
    if (!isOpen()) break;
    settleDebt();
    // Refused for more than is owed now (the reader paid some meanwhile): ask for what is.
    if (!grown && debt_ != 0 && debt_ >= owed) {
      endForQuota(grown.error());
      break;
    }
  }
  payingDebt_ = false;
  co_return {};
}

// What the reader has the budget cover before it reads a message of `frameBytes`: a copy of it
// (a call kept to deliver later; none for 0) and the table entries it may add.
size_t RpcConnection::readHeadroom(size_t frameBytes) const noexcept {
  // A new answer, and the answer, import and export slots a message adds.
  constexpr size_t ENTRIES_BYTES = sizeof(Answer) + 512;
  if (frameBytes == 0) return ENTRIES_BYTES;
  const size_t copy = size_t{1} << (sizeClassFor(frameBytes) + MIN_CLASS_SHIFT);
  return copy + sizeof(detail::SpillBuffer) + ENTRIES_BYTES;
}

// The reader asks the budget to grow before it reads a message of `frameBytes`: something is
// owed, or what is available is short of the message's headroom and the budget has not refused
// since (or something was given back since it did).
bool RpcConnection::budgetShort(size_t frameBytes) const noexcept {
  if (debt_ != 0) return true;
  const size_t available = options_.budget->available();
  if (available >= readHeadroom(frameBytes)) return false;
  // Refused since: asked again once something was given back, or after a while (the bank may
  // pay again: the peer freed state elsewhere), backing off while it keeps refusing.
  return spentAt_ == NOT_SPENT || available > spentAt_ ||
         std::chrono::steady_clock::now() >= spentUntil_;
}

void RpcConnection::budgetRefused() noexcept {
  spentAt_ = options_.budget->available();
  spentBackoff_ = std::clamp<Duration>(spentBackoff_ * 2, SPENT_BACKOFF_MIN, SPENT_BACKOFF_MAX);
  spentUntil_ = std::chrono::steady_clock::now() + spentBackoff_;
}

void RpcConnection::endForQuota(const Error& why) {
  Error e(Errc::QUOTA_EXCEEDED,
          "the peer's quota cannot pay for what this side holds for it (RpcOptions::budget)");
  if (why.code != Errc::QUOTA_EXCEEDED) e = why;
  sendAbort(e);  // the peer learns why
  fail(e);
}

Promise<void> RpcConnection::onDisconnect() {
  if (!isOpen()) return readyPromise<void>(failure_);
  AGATE_REQUIRE(!disconnected_.has_value(), "onDisconnect() awaited twice");
  auto [promise, fulfiller] = newPromiseAndFulfiller<void>();
  disconnected_.emplace(std::move(fulfiller));
  return std::move(promise);
}

// Ends question `q` here, with no Return to come and no Finish to send: its promise fails with
// `error`.
void RpcConnection::rejectQuestion(Question& q, const Error& error) {
  q.returned = true;
  q.finishSent = true;
  if (q.fulfiller) {
    q.fulfiller->fulfill(error);
    q.fulfiller.reset();
  }
}

// Marks the connection dead and fails the callers' promises at once; destroying coroutines
// (reader, pump, running calls) waits for teardown(), posted to the loop, because fail() may be
// running inside one of them.
void RpcConnection::fail(Error reason) {
  if (!isOpen()) return;
  failure_ = reason;
  for (Question& q : questions_) {
    if (!q.inUse || q.returned) continue;
    returnReplySpace(q);
    rejectQuestion(q, reason);  // nothing more is sent on a dead connection
  }
  failWatchers(reason);  // promises passed on that waited for our questions break
  // Queued Finishes will not go out: their questions are free now.
  for (uint32_t i = 0, n = std::exchange(queuedFinishCount_, 0); i < n; ++i) {
    freeQuestion(queuedFinishes_[i]);
  }
  dropAllHeld();  // their calls failed above
  // Vines of Accepts that will never return: their introducers may reclaim the provisions.
  // (Dropping one may re-enter another connection; not this one's question table.)
  for (size_t i = 0; i < questions_.size(); ++i) {
    if (questions_[i].vine) questions_[i].vine.reset();
  }
  leaveNetwork();
  while (queueHead_ != nullptr) {
    detail::SpillBuffer* b = queueHead_;
    queueHead_ = b->next;
    giveSpill(b);
  }
  queueTail_ = nullptr;
  queuedBytes_ = 0;
  if (pumpRunning_ && !inPump_) {
    pump_.reset();  // parked waiting for space: no reservation taken, so dropping is safe
    pumpRunning_ = false;
  }
  if (!ringOpen_ && !pumpRunning_) {
    tx_.sender().detach();
  } else {
    detachPending_ = true;
  }
  if (!teardownTask_.isQueued()) loop_.post(teardownTask_);
  // After the teardown, so that the owner finds the connection torn down.
  if (handles_ == 0 && unreferencedTask_ != nullptr) postUnreferenced();
  if (disconnected_) {
    disconnected_->fulfill(reason);
    disconnected_.reset();
  }
}

void RpcConnection::teardown() {
  if (!inReader_) {
    reader_.reset();  // first: it may be waiting on connecting_
    connecting_.reset();
  }
  if (!inPump_) pump_.reset();
  // Parked on the budget's growth, or finished (never running: it does not tear down).
  debtPayment_.reset();
  payingDebt_ = false;
  if (!inHoldTimer_) {
    holdTimer_.reset();
    holdTimerRunning_ = false;
  }
  if (detachPending_ && !ringOpen_ && !pumpRunning_) {
    tx_.sender().detach();
    detachPending_ = false;
  }
  worklist_.clear();
  for (std::unique_ptr<Answer>& a : answers_) {
    if (!a) continue;
    if (a->state != Answer::State::FREE) freeAnswer(*a);
    a->driver.reset();  // a finished one, kept by an answer freed at its Return
  }
  // Destroy owned exports. An object's destructor may drop RemoteCaps (back into importUnref,
  // which sends nothing now), so move them out of the table first.
  std::vector<std::unique_ptr<ServerObject>> doomed;
  std::vector<std::shared_ptr<ServerObject>> doomedShared;
  for (size_t i = 1; i < exports_.size(); ++i) {
    Export& e = exports_[i];
    if (!e.inUse) continue;
    if (e.owned) doomed.push_back(std::move(e.owned));
    if (e.shared) doomedShared.push_back(std::move(e.shared));
    e = Export{};
    e.nextFree = exportFree_;
    exportFree_ = static_cast<uint32_t>(i);
    --exportsLive_;
  }
  if (exports_[0].inUse) {
    exports_[0].inUse = false;  // a dead connection serves nobody
    --exportsLive_;
  }
  if (exports_[0].shared) doomedShared.push_back(std::move(exports_[0].shared));
  exports_[0].object = nullptr;
  exportByObject_.clear();
  doomed.clear();
  doomedShared.clear();
}

// ---------------------------------------------------------------------------------------------
// Exports and imports

Result<uint32_t> RpcConnection::exportObject(ServerObject* object,
                                             std::unique_ptr<ServerObject> owned,
                                             std::shared_ptr<ServerObject> shared) {
  AGATE_REQUIRE(object != nullptr, "exporting a null object");
  if (!owned) {
    auto it = exportByObject_.find(object);
    if (it != exportByObject_.end()) {
      // Each reference is checked before it is counted, so no message wraps the count.
      if (exports_[it->second].remoteRefs >= 2 * options_.releaseReferencesAt - 1)
        return Error(Errc::OUT_OF_MEMORY,
                     "the peer holds as many references to this object as are counted: it must "
                     "release some first (RpcOptions::releaseReferencesAt)");
      return it->second;
    }
  }
  uint32_t id = exportFree_;
  if (id != NONE) {
    exportFree_ = exports_[id].nextFree;
  } else {
    id = static_cast<uint32_t>(exports_.size());
    const size_t before = exports_.capacity();
    exports_.emplace_back();
    chargeGrowth(exports_, before);
  }
  Export& e = exports_[id];
  e = Export{};
  e.object = object;
  e.owned = std::move(owned);
  // The bootstrap object exported again (a method returning itself) keeps its joint ownership.
  if (!shared && object == exports_[0].object) shared = exports_[0].shared;
  e.shared = std::move(shared);
  e.inUse = true;
  ++exportsLive_;
  if (spareExportNodes_.empty()) {
    exportByObject_.emplace(object, id);
  } else {
    ExportIndex::node_type node = std::move(spareExportNodes_.back());
    spareExportNodes_.pop_back();
    node.key() = object;
    node.mapped() = id;
    exportByObject_.insert(std::move(node));
  }
  return id;
}

// Why calls on `cap`, pipelined on a question of ours whose Return was refused for its cap table,
// fail here (the peer would serve them from the results this side refused); null otherwise.
const Error* RpcConnection::refusedResults(const RemoteCap& cap) const noexcept {
  if (cap.kind_ != RemoteCap::Kind::PIPELINE) return nullptr;
  const Error& refused = questions_[cap.id_].refused;
  return refused.code != Errc::OK ? &refused : nullptr;
}

void RpcConnection::exportUnpin(uint32_t id) noexcept {
  if (id == NONE || id >= exports_.size() || !exports_[id].inUse) return;
  Export& e = exports_[id];
  AGATE_ASSERT(e.pins > 0, "export %u unpinned more than pinned", id);
  // Decided from the count just written: reading remoteRefs and pins back as one word would
  // wait for this narrower store to reach the cache (a stalled store forward on every unpin).
  if (--e.pins == 0 && e.remoteRefs == 0) maybeFreeExport(id);
}

void RpcConnection::maybeFreeExport(uint32_t id) noexcept {
  Export& e = exports_[id];
  if (id == 0 || !e.inUse || e.remoteRefs != 0 || e.pins != 0) return;
  std::unique_ptr<ServerObject> doomed = std::move(e.owned);
  std::shared_ptr<ServerObject> doomedShared = std::move(e.shared);
  if (ExportIndex::node_type node = exportByObject_.extract(e.object);
      node && spareExportNodes_.size() < MAX_SPARE_EXPORT_NODES) {
    spareExportNodes_.push_back(std::move(node));  // capacity reserved: no allocation
  }
  e = Export{};
  e.nextFree = exportFree_;
  exportFree_ = id;
  --exportsLive_;
  doomed.reset();  // may re-enter (its RemoteCaps release imports); the table is consistent
  doomedShared.reset();
}

void RpcConnection::importRef(uint32_t id) noexcept {
  if (id >= imports_.size()) {
    const size_t before = imports_.capacity();
    imports_.resize(id + 1);
    chargeGrowth(imports_, before);
  }
  if (imports_[id].localRefs++ != 0) return;
  ++importsLive_;
  // Taken afresh: what the message names it as decides (noteImported). A promise flag left from
  // before (a promise released, or one of a Return released by Finish, kept for a Resolve that
  // could cross) is stale now: any such Resolve came before this message.
  imports_[id].promise = false;
}

void RpcConnection::countImported(uint32_t id) noexcept {
  uint32_t& refs = imports_[id].remoteRefs;
  if (++refs < options_.releaseReferencesAt) return;
  // All but the one the local reference stands on go back now; the rest at the last unref.
  if (isOpen()) sendRelease(id, refs - 1);
  refs = 1;
}

void RpcConnection::importUnref(uint32_t id) noexcept {
  Import& imp = imports_[id];
  AGATE_ASSERT(imp.localRefs > 0, "import %u released more than referenced", id);
  if (--imp.localRefs != 0) return;
  --importsLive_;
  const uint32_t count = std::exchange(imp.remoteRefs, 0);
  const uint32_t resolvedTo = std::exchange(imp.resolvedTo, NONE);
  std::unique_ptr<RemoteCap> elsewhere = std::move(imp.elsewhere);  // dropped last
  imp.broken = Error{};
  if (count != 0 && isOpen()) sendRelease(id, count);
  if (resolvedTo != NONE) importUnref(resolvedTo);  // a plain import: no further recursion
}

Result<ReceivedCap> RpcConnection::receivedCap(capnp::List<wire::CapDescriptor>::Reader caps,
                                               uint32_t index,
                                               std::span<const RemoteCap> handedOff) {
  // The list was validated when its message was decoded (ids in range, exports live).
  if (index >= caps.size()) return Error(Errc::INVALID_ARGUMENT, "cap index outside the table");
  wire::CapDescriptor::Reader d = caps[index];
  ReceivedCap cap;
  switch (d.which()) {
    case wire::CapDescriptor::SENDER_HOSTED:
    case wire::CapDescriptor::SENDER_PROMISE:
      cap.remote.conn_ = this;
      cap.remote.kind_ = RemoteCap::Kind::IMPORT;
      cap.remote.id_ = d.which() == wire::CapDescriptor::SENDER_HOSTED ? d.getSenderHosted()
                                                                       : d.getSenderPromise();
      cap.remote.addRef();
      return cap;
    case wire::CapDescriptor::RECEIVER_HOSTED: {
      const uint32_t id = d.getReceiverHosted();
      if (!isOpen() || id >= exports_.size() || !exports_[id].inUse)
        return Error(Errc::DISCONNECTED, "the connection ended");
      cap.local = exports_[id].object;
      return cap;
    }
    case wire::CapDescriptor::THIRD_PARTY_HOSTED:
      if (index < handedOff.size())
        cap.remote = handedOff[index];  // on the host's connection, or broken
      return cap;
    default:
      return Error(Errc::INVALID_ARGUMENT, "null capability");
  }
}

void RpcConnection::releaseResponse(detail::ResponseSlot* slot) noexcept {
  for (wire::CapDescriptor::Reader d : slot->caps) {
    if (d.which() == wire::CapDescriptor::SENDER_HOSTED) importUnref(d.getSenderHosted());
    if (d.which() == wire::CapDescriptor::SENDER_PROMISE) importUnref(d.getSenderPromise());
    // Pinned at the Return. A dead connection's exports are gone (teardown frees them pinned or
    // not): nothing to unpin.
    if (d.which() == wire::CapDescriptor::RECEIVER_HOSTED && isOpen())
      exportUnpin(d.getReceiverHosted());
  }
  for (RemoteCap& cap : slot->handedOff) {
    cap = RemoteCap();  // may be on another connection: Finish goes there
  }
  slot->handedOff.clear();  // keeps its capacity: the slot is pooled
  dropHandle();
  slot->inPlace.reset();
  if (slot->copy != nullptr) giveSpill(std::exchange(slot->copy, nullptr));
  if (heldSlot_ == slot) heldSlot_ = nullptr;
  slot->nextFree = responseFree_;
  responseFree_ = slot;
}

// Moves a live Response's message out of the inbound frame into a private copy, so the reader
// can take the next message.
void RpcConnection::relocate(detail::ResponseSlot* slot) {
  std::span<const std::byte> bytes = slot->inPlace->view().bytes();
  slot->copy = takeSpill(bytes.size());
  std::memcpy(slot->copy->words.get(), bytes.data(), bytes.size());
  slot->copy->usedBytes = slot->copy->dirtyBytes = bytes.size();
  Result<MessageView> view = slot->reader.tryDecode(slot->copy->bytes());
  AGATE_ASSERT(view.ok(), "a copy of a validated Return no longer decodes");
  wire::Payload::Reader results = view->getRoot<wire::Message>().getReturn().getResults();
  slot->payload = capnp::AnyStruct::Reader(results);
  slot->caps = results.getCapTable();
  slot->inPlace.reset();  // releases the frame
  ++stats_.responsesCopied;
}

Result<uint32_t> RpcConnection::addCapFor(detail::CapTable& table, const RemoteCap& cap,
                                          bool inParams) {
  if (cap.kind_ == RemoteCap::Kind::NONE) return addEntry(table, detail::CapEntry{});
  if (cap.conn_ != nullptr && cap.conn_ != this) return addForeignCap(table, cap);
  if (const Error* refused = refusedResults(cap)) return *refused;  // it names nothing here
  if (cap.kind_ == RemoteCap::Kind::PIPELINE && inParams) {
    // Passed back to the peer that will answer it: receiverAnswer (schemas/rpc.capnp).
    detail::CapEntry e;
    e.kind = detail::CapEntry::Kind::RECEIVER_ANSWER;
    e.held = cap;
    return addEntry(table, std::move(e));
  }
  if (cap.kind_ == RemoteCap::Kind::PIPELINE)
    return Error(Errc::INVALID_ARGUMENT,
                 "a capability pipelined on a call to this peer can be passed back only in a "
                 "call's params");
  if (cap.kind_ != RemoteCap::Kind::IMPORT)
    return Error(Errc::INVALID_ARGUMENT, "a broken capability cannot be passed");
  // Passed back to its host: receiverHosted. The entry holds a reference to the import until
  // the message is sent (or abandoned), so the caller may drop its own at once: any Release
  // goes out behind the message that names the export.
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::RECEIVER_HOSTED;
  e.id = cap.id_;
  e.held = cap;
  return addEntry(table, std::move(e));
}

// ---------------------------------------------------------------------------------------------
// Client side: questions

RemoteCap RpcConnection::bootstrap() {
  RemoteCap cap;
  cap.conn_ = this;
  if (!isOpen()) {
    cap.kind_ = RemoteCap::Kind::BROKEN;
    cap.broken_ = failure_;
  } else {
    cap.kind_ = RemoteCap::Kind::IMPORT;
    cap.id_ = 0;
  }
  cap.addRef();
  return cap;
}

Request RpcConnection::newCall(const RemoteCap& target, uint64_t interfaceId, uint16_t methodId,
                               size_t sizeHint) {
  // A promise resolved to a third party's capability: calls go to its host (even once this
  // connection is dead).
  if (target.kind_ == RemoteCap::Kind::IMPORT && imports_[target.id_].elsewhere)
    return imports_[target.id_].elsewhere->newCall(interfaceId, methodId, sizeHint);
  return newCallHere(target, interfaceId, methodId, sizeHint);
}

Request RpcConnection::newCallHere(const RemoteCap& target, uint64_t interfaceId, uint16_t methodId,
                                   size_t sizeHint) {
  Request request(this, Error{});
  // An import that was a promise goes where it resolved (or fails as it broke).
  Error broken{};
  const uint32_t importId =
      target.kind_ == RemoteCap::Kind::IMPORT ? resolvedImport(target.id_, broken) : target.id_;
  if (target.kind_ == RemoteCap::Kind::BROKEN) {
    request.error_ = target.broken_;
  } else if (const Error* refused = refusedResults(target)) {
    request.error_ = *refused;
  } else if (broken.code != Errc::OK) {
    request.error_ = broken;
  } else if (!isOpen()) {
    request.error_ = failure_;
  } else {
    // Built when first needed (buildCall), or written as words by send().
    request.unbuilt_ = true;
    request.toAnswer_ = target.kind_ != RemoteCap::Kind::IMPORT;
    request.targetId_ = request.toAnswer_ ? target.id_ : importId;
    request.pathLength_ = request.toAnswer_ ? target.pathLength_ : 0;
    request.path_ = target.path_;
    request.interfaceId_ = interfaceId;
    request.methodId_ = methodId;
    request.sizeHint_ = sizeHint;
    // The request holds its target until the Call is out (or the request is dropped): the
    // caller may drop its last reference first, and the Release or Finish that follows must
    // not overtake the Call.
    if (request.toAnswer_) {
      questionRef(request.targetId_);
    } else {
      importRef(request.targetId_);
    }
    request.holdsTarget_ = true;
    return request;
  }
  // Refused: params go to a scrap message so the caller's building code still runs.
  request.scrap_ = std::make_unique<capnp::MallocMessageBuilder>(256);
  return request;
}

// Starts the Call of an unbuilt request in a frame (or, refused, params go to a scrap message).
void RpcConnection::buildCall(Request& request) {
  request.unbuilt_ = false;
  // Capabilities added before the params (a forwarded call's) get their room now.
  const size_t moreCaps =
      request.caps_.size() > ENVELOPE_CAPS ? request.caps_.size() - ENVELOPE_CAPS : 0;
  Result<detail::OutSlot> slot =
      startOut(request.sizeHint_ + ENVELOPE_BYTES + moreCaps * CAP_ENTRY_BYTES, OutKind::CALL);
  if (!slot) {
    request.error_ = slot.error();
    request.scrap_ = std::make_unique<capnp::MallocMessageBuilder>(256);
    return;
  }
  request.slot_ = std::move(*slot);
  wire::Call::Builder call = request.slot_.builder().initRoot<wire::Message>().initCall();
  call.setInterfaceId(request.interfaceId_);
  call.setMethodId(request.methodId_);
  wire::MessageTarget::Builder t = call.initTarget();
  if (!request.toAnswer_) {
    t.setImportedCap(request.targetId_);
  } else {
    wire::PromisedAnswer::Builder pa = t.initPromisedAnswer();
    pa.setQuestionId(request.targetId_);
    capnp::List<uint16_t>::Builder path = pa.initTransform(request.pathLength_);
    for (uint32_t i = 0; i < request.pathLength_; ++i) path.set(i, request.path_[i]);
  }
  request.call_ = call;
}

RemotePromise RpcConnection::sendRequest(Request& request) {
  // The cap table is cleared however this returns, once the promise is made (each path returns
  // a prvalue, built in the caller's place).
  struct ClearCaps {
    detail::CapTable& caps;
    ~ClearCaps() { caps.clear(); }
  } clearCaps{request.caps_};
  if (request.error_.code == Errc::OK && !isOpen()) request.error_ = failure_;
  // Made before a question it names failed here unsent (or had its results refused).
  if (request.error_.code == Errc::OK)
    request.error_ = refusedName(request.toAnswer_, request.targetId_, &request.caps_);
  if (request.error_.code == Errc::OK && request.unbuilt_ && request.caps_.size() > 0)
    buildCall(request);  // the cap table goes in a built message
  if (request.error_.code != Errc::OK) {
    request.unbuilt_ = false;
    abandonOut(request.slot_);
    releaseTarget(request);
    return RemotePromise(nullptr, 0, readyPromise<Response>(request.error_), request.error_);
  }
  // Each call is charged its reply's frame header too: what the Return takes of the ring.
  const uint64_t reserve =
      roundToWords(request.replyReserve_ != 0 ? request.replyReserve_ : options_.replyBytesPerCall);
  // Finishes queued behind the current task free their questions once sent: at the bound, they
  // go first (ahead of this Call, which then finds the peer's answers freed).
  if (questionsLive_ >= options_.maxQuestions && queuedFinishCount_ > 0) flushFinishes();
  // Held when its reply space is not free, or behind calls already held (E-order).
  const bool hold = options_.whenReplySpaceIsFull == RpcOptions::WhenReplySpaceIsFull::HOLD &&
                    (holding() || replyReserved_ + reserve > replyBudget_);
  Status room = roomForQuestion(reserve, hold);
  // Held with its capabilities: its cap table is written as it goes (writeHeldCaps), so
  // nothing is exported, introduced or handed off before the Call is out. Refused now if it
  // could not be written then.
  if (room && hold && request.caps_.size() > 0) room = passable(request.caps_);
  if (!room) {
    request.unbuilt_ = false;  // refused for good: send() again gives this error
    request.error_ = room.error();
    abandonOut(request.slot_);
    releaseTarget(request);
    return RemotePromise(nullptr, 0, readyPromise<Response>(room.error()), room.error());
  }
  const uint32_t qid = takeQuestionId();
  Status sent = {};
  detail::SpillBuffer* heldCall = nullptr;  // the Call's bytes, when held
  if (request.unbuilt_) {
    request.unbuilt_ = false;
    std::array<uint64_t, MAX_EMPTY_CALL_WORDS> words;
    const size_t n = emptyCallWords(words, qid, request.interfaceId_, request.methodId_,
                                    request.noPipelining_, request.toAnswer_, request.targetId_,
                                    std::span(request.path_.data(), request.pathLength_));
    if (!hold) {
      sent = sendWords(std::span(words.data(), n), OutKind::CALL);
    } else {
      sent = admitToHold(n * sizeof(uint64_t));
      if (sent) heldCall = spillWords(std::span(words.data(), n));
    }
  } else {
    request.call_.setQuestionId(qid);
    if (request.noPipelining_) request.call_.setNoPromisePipelining(true);
    // Started if they were not (capabilities and no content): capTableBytes, which sizes what is
    // added for the cap table, does not count them.
    if (request.caps_.size() > 0) (void)request.call_.getParams();
    Status written = {};
    if (!hold && request.caps_.size() > ENVELOPE_CAPS) {
      written = roomForCapTable(request.slot_, request.caps_, OutKind::CALL);
      if (written) request.call_ = request.slot_.builder().getRoot<wire::Message>().getCall();
    }
    if (written && !hold && request.caps_.size() > 0) {
      settleForeignCaps(request.caps_);  // a Provide's failure may end this connection
      written = isOpen()
                    ? writeCapTable(request.call_.getParams().initCapTable(request.caps_.size()),
                                    request.caps_)
                    : Status(failure_);
    }
    if (!written || !hold) {
      sent = written ? finishOut(request.slot_) : written;
    } else {
      Result<detail::SpillBuffer*> b = finishToHold(request.slot_);
      if (!b) {
        sent = b.error();
      } else if (!isOpen()) {
        giveSpill(*b);
        sent = failure_;
      } else if ((*b)->usedBytes + capTableBytes(request.caps_) >
                 roundToWords(options_.maxMessageBytes)) {
        giveSpill(*b);  // with the cap table written as it goes, too large to send
        sent = Error(Errc::MESSAGE_TOO_LARGE, "message larger than RpcOptions::maxMessageBytes");
      } else if (sent = admitToHold(heldSize((*b)->usedBytes, request.caps_)); !sent) {
        giveSpill(*b);
      } else {
        heldCall = *b;
      }
    }
  }
  if (!sent) {
    request.error_ = sent.error();  // refused for good: send() again gives this error
    if (request.slot_.active()) abandonOut(request.slot_);
    rollBackExports(request.caps_);
    giveQuestionId(qid);
    releaseTarget(request);
    return RemotePromise(nullptr, 0, readyPromise<Response>(sent.error()), sent.error());
  }
  openQuestion(qid);
  if (request.toAnswer_) questions_[request.targetId_].pipelinedOn = true;
  Question& q = questions_[qid];
  q.refs = 1;
  q.noPipelining = request.noPipelining_;
  auto [promise, fulfiller] = newPromiseAndFulfiller<Response>();
  q.fulfiller.emplace(std::move(fulfiller));
  ++handles_;
  const uint64_t generation = q.generation;
  if (heldCall != nullptr) {
    // Reserves its reply space when it goes (sendHeld); holds its target and its cap table
    // until then.
    holdCall(heldCall, qid, static_cast<uint32_t>(reserve), request);
  } else {
    ++stats_.callsSent;
    q.replyReserved = static_cast<uint32_t>(reserve);  // at most the budget: below 2^31
    replyReserved_ += reserve;
    // Last: the Call is out, and the question is set up should what this sends fail the
    // connection (its promise is then already broken).
    releaseTarget(request);
  }
  return RemotePromise(this, qid, generation, request.noPipelining_, std::move(promise));
}

// ---------------------------------------------------------------------------------------------
// Client side: calls held for reply space (RpcOptions::whenReplySpaceIsFull)

// Holds a Disembargo behind held calls. What it names stays referenced until it goes: the
// import (its target), and the Provide's question (so neither a Release nor the Provide's
// Finish overtakes it).
void RpcConnection::holdDisembargo(detail::SpillBuffer* buffer, uint32_t exportId,
                                   uint32_t provideQuestion) {
  HeldMessage& m = held_.emplace_back();
  m.bytes = buffer->usedBytes;
  heldBytes_ += m.bytes;
  m.buffer = buffer;
  importRef(exportId);
  m.holdsTarget = true;
  m.targetId = exportId;
  if (provideQuestion != NONE) {
    questionRef(provideQuestion);
    m.provideQuestion = provideQuestion;
  }
}

// What a held message kept referenced until it went (or was dropped): its target, a
// Disembargo's Provide question. Releasing them may send (a Release, a Finish).
void RpcConnection::releaseHeld(HeldMessage& m) noexcept {
  m.caps.reset();  // what it did not export goes (its references to imports, its objects)
  if (std::exchange(m.holdsTarget, false)) unrefTarget(m.toAnswer, m.targetId);
  if (const uint32_t q = std::exchange(m.provideQuestion, NONE); q != NONE) questionUnref(q);
}

// Holds a call's finished message, taking over the reference to its target its request holds
// until the Call is out.
void RpcConnection::holdCall(detail::SpillBuffer* buffer, uint32_t questionId,
                             uint32_t replyReserve, Request& request) {
  HeldMessage& m = held_.emplace_back();
  m.bytes = heldSize(buffer->usedBytes, request.caps_);
  heldBytes_ += m.bytes;
  m.buffer = buffer;
  m.questionId = questionId;
  m.replyReserve = replyReserve;
  m.holdsTarget = std::exchange(request.holdsTarget_, false);
  m.toAnswer = request.toAnswer_;
  m.targetId = request.targetId_;
  if (request.caps_.size() > 0) m.caps.emplace(std::move(request.caps_));
  questions_[questionId].held = true;
  questions_[questionId].heldAt = std::prev(held_.end());
  ++heldCalls_;
  ++stats_.callsHeld;
  if (options_.maxHoldTime != Duration::zero()) {
    m.heldSince = std::chrono::steady_clock::now();
    armHoldTimer();
  }
}

void RpcConnection::armHoldTimer() {
  if (holdTimerRunning_ || !isOpen()) return;
  holdTimerRunning_ = true;
  holdTimer_.emplace(expireHeld());  // the last one has finished (holdTimerRunning_ was clear)
}

// Sleeps until the oldest held call's time is up, and fails it unsent (TIMED_OUT) if it is
// still held then; ends when no call is held. Held calls go in order, so the first call in
// held_ is the oldest (a Disembargo ahead of it goes as soon as it is at the front).
Promise<void> RpcConnection::expireHeld() {
  while (isOpen() && heldCalls_ != 0) {
    auto first = held_.begin();
    while (first->questionId == 0) ++first;  // a call is held: heldCalls_
    const TimePoint due = first->heldSince + options_.maxHoldTime;
    if (std::chrono::steady_clock::now() < due) {
      (void)co_await loop_.sleepUntil(due);
      continue;
    }
    std::list<HeldMessage> one;
    one.splice(one.begin(), held_, first);
    HeldMessage& m = one.front();
    heldBytes_ -= m.bytes;
    questions_[m.questionId].held = false;
    --heldCalls_;
    ++stats_.callsTimedOutHeld;
    inHoldTimer_ = true;
    failUnsent(m, Error(Errc::TIMED_OUT,
                        "the call was held for reply space longer than RpcOptions::maxHoldTime"));
    inHoldTimer_ = false;
    // Held calls naming its answer fail as they reach the front.
    if (!held_.empty() && !heldTask_.isQueued()) loop_.post(heldTask_);
  }
  holdTimerRunning_ = false;
  co_return {};
}

// Sends held messages in order while the call at the front finds its reply space: from
// heldTask_, posted as Returns free space (or a held call is dropped).
void RpcConnection::sendHeld() {
  while (isOpen() && !held_.empty()) {
    HeldMessage& front = held_.front();
    // A call naming a question that failed here unsent goes no further (nor waits for space).
    const Error doomed = front.questionId != 0 ? refusedName(front.toAnswer, front.targetId,
                                                             front.caps ? &*front.caps : nullptr)
                                               : Error{};
    const bool fails = doomed.code != Errc::OK;
    if (!fails && front.questionId != 0 && replyReserved_ + front.replyReserve > replyBudget_)
      return;
    if (!fails && front.caps && !front.settled) {
      // Handoffs decided while it is still held: a Provide's failure can run code on this
      // connection (a promise settling), which must find it held, ahead of anything it sends.
      // That code may also drop the call, or end the connection: the table is settled out of
      // the message, and put back only if the call is still held.
      front.settled = true;
      const uint32_t id = front.questionId;
      const uint64_t generation = questions_[id].generation;
      detail::CapTable caps(std::move(*front.caps));
      settleForeignCaps(caps);
      Question& q = questions_[id];
      if (isOpen() && q.held && q.generation == generation) q.heldAt->caps.emplace(std::move(caps));
      continue;  // the front may have changed meanwhile, or the connection ended
    }
    std::list<HeldMessage> one;  // taken out first: releasing its references may hold more
    one.splice(one.begin(), held_, held_.begin());
    HeldMessage& m = one.front();
    heldBytes_ -= m.bytes;
    const uint32_t qid = m.questionId;
    if (qid != 0) {
      questions_[qid].held = false;
      --heldCalls_;
    }
    if (fails) {
      failUnsent(m, doomed);
      continue;
    }
    const bool withCaps = m.caps.has_value();
    if (withCaps) {
      // Referenced until the Call is out: a promise let go while its cap table is written
      // (what writing runs may break one) sends its Finish after the Call.
      questionRef(qid);
      if (Status written = writeHeldCaps(m); !written) {
        failUnsent(m, written.error());
        questionUnref(qid);
        continue;
      }
    }
    if (qid != 0) {
      Question& q = questions_[qid];
      q.replyReserved = m.replyReserve;
      replyReserved_ += m.replyReserve;
      ++stats_.callsSent;
    } else {
      ++stats_.disembargoesSent;
    }
    enqueue(std::exchange(m.buffer, nullptr));  // at once, unless the ring is full or open
    releaseHeld(m);  // it is out: a Release or a Finish this causes follows it
    if (withCaps) questionUnref(qid);
  }
}

// A call targeted at, or passing a capability pipelined on, a question whose answer this side
// will never have from the peer (it failed here unsent), or whose results this side refused:
// that question's error; else none. The peer never saw the first kind: naming it would be a
// protocol error.
Error RpcConnection::refusedName(bool toAnswer, uint32_t targetId,
                                 const detail::CapTable* caps) const noexcept {
  if (toAnswer && questions_[targetId].refused.code != Errc::OK)
    return questions_[targetId].refused;
  for (uint32_t i = 0; caps != nullptr && i < caps->size(); ++i) {
    const detail::CapEntry& e = (*caps)[i];
    if (e.kind != detail::CapEntry::Kind::RECEIVER_ANSWER) continue;
    if (const Error* refused = refusedResults(e.held)) return *refused;
  }
  return {};
}

// A held call's cap table, written as it goes: objects exported now (handoffs were decided just
// before, while it was still held). The
// message is resumed in a buffer with room for the table (frames are position-independent). On
// failure (an object the peer already holds as many references to as are counted) nothing is
// exported and the message is unchanged.
Status RpcConnection::writeHeldCaps(HeldMessage& m) {
  detail::CapTable& caps = *m.caps;  // settled (sendHeld)
  if (!isOpen()) return failure_;
  const size_t bytes = roundToWords(m.buffer->usedBytes + capTableBytes(caps));
  detail::SpillBuffer* b = resumeInSpill(m.buffer->words.get(), m.buffer->usedBytes, bytes);
  // The params exist (sendRequest started them), so the table is all that is added.
  wire::Payload::Builder params = b->builder->getRoot<wire::Message>().getCall().getParams();
  Status written = writeCapTable(params.initCapTable(caps.size()), caps);
  Result<size_t> finished = written ? b->builder->tryFinish() : Result<size_t>(written.error());
  if (finished && *finished > roundToWords(options_.maxMessageBytes))
    finished = Error(Errc::MESSAGE_TOO_LARGE, "message larger than RpcOptions::maxMessageBytes");
  if (!finished) {
    rollBackExports(caps);
    b->dirtyBytes = bytes;
    giveSpill(b);
    return finished.error();
  }
  b->builder.reset();
  b->usedBytes = b->dirtyBytes = *finished;
  giveSpill(std::exchange(m.buffer, b));
  return {};
}

// A held call that goes no further, taken out of held_: it fails here, unsent (on a connection
// still open; a dead one failed it already). Calls naming its answer fail in turn as they reach
// the front of held_ (sendHeld), and so do calls made later on capabilities pipelined on it;
// promises passed on that wait for its answer break with the error.
void RpcConnection::failUnsent(HeldMessage& m, const Error& error) {
  giveSpill(std::exchange(m.buffer, nullptr));
  if (isOpen() && m.questionId != 0) {
    Question& q = questions_[m.questionId];
    rejectQuestion(q, error);  // nothing to finish: the peer never saw it
    q.refused = error;         // what names it fails with this error from now on
    ++stats_.callsFailedUnsent;
    std::erase_if(watchers_, [&](std::pair<uint32_t, std::weak_ptr<detail::PromiseNode>>& w) {
      if (w.first != m.questionId) return false;
      std::shared_ptr<detail::PromiseNode> node = w.second.lock();
      if (node != nullptr && node->pending()) settling_.emplace_back(std::move(node), error);
      return true;
    });
  }
  releaseHeld(m);
  if (!settling_.empty()) settleWatched();
}

// A held call whose promise and pipelined references are all gone: it never goes; its question
// is freed and what it held is released. Those behind it may go now.
// Held calls pipelined on one another drop one by one, in a loop (not recursively: a chain may
// be maxQuestions long).
void RpcConnection::dropHeldCall(uint32_t questionId) noexcept {
  heldToDrop_.push_back(questionId);  // capacity kept: a drop allocates only the first time
  if (droppingHeld_) return;
  droppingHeld_ = true;
  while (!heldToDrop_.empty()) {
    const uint32_t id = heldToDrop_.back();
    heldToDrop_.pop_back();
    if (!questions_[id].held) {
      // Dropped with the rest as the connection ended (dropAllHeld, while this drop was
      // releasing another): its call failed, so it is freed as any question of a dead
      // connection whose last reference goes.
      const Question& q = questions_[id];
      if (q.inUse && q.refs == 0 && q.returned && q.finishSent) freeQuestion(id);
      continue;
    }
    std::list<HeldMessage> one;
    one.splice(one.begin(), held_, questions_[id].heldAt);
    HeldMessage& m = one.front();
    heldBytes_ -= m.bytes;
    giveSpill(std::exchange(m.buffer, nullptr));
    --heldCalls_;
    questions_[id].held = false;
    questions_[id].finishSent = true;  // nothing to finish: the peer never saw it
    freeQuestion(id);
    ++stats_.callsCancelledHeld;
    if (!held_.empty() && !heldTask_.isQueued()) loop_.post(heldTask_);
    releaseHeld(m);  // a call pipelined on another held one may drop that one (queued above)
  }
  droppingHeld_ = false;
}

// What a held call counts toward maxQueuedBytes: its message and, carrying capabilities, the
// most its cap table adds as it goes.
size_t RpcConnection::heldSize(size_t messageBytes, const detail::CapTable& caps) noexcept {
  return messageBytes + (caps.size() > 0 ? capTableBytes(caps) : 0);
}

Status RpcConnection::admitToHold(size_t bytes) const {
  if (queuedBytes_ + heldBytes_ + bytes <= options_.maxQueuedBytes) return {};
  return Error(Errc::OUT_OF_MEMORY,
               "RpcOptions::maxQueuedBytes of calls wait for reply space or for the peer to "
               "read: await some before sending more");
}

// The connection ended: nothing held will go. Their questions were failed already.
void RpcConnection::dropAllHeld() noexcept {
  std::list<HeldMessage> held = std::move(held_);
  held_.clear();
  heldBytes_ = 0;
  heldCalls_ = 0;
  for (HeldMessage& m : held) {  // first: releasing may drop a question that was held
    giveSpill(std::exchange(m.buffer, nullptr));
    if (m.questionId != 0) questions_[m.questionId].held = false;
  }
  for (HeldMessage& m : held) releaseHeld(m);
}

void RpcConnection::releaseTarget(Request& request) noexcept {
  if (std::exchange(request.holdsTarget_, false)) unrefTarget(request.toAnswer_, request.targetId_);
}

// Drops the reference a request (or a held message) holds on its target: its question or import.
void RpcConnection::unrefTarget(bool toAnswer, uint32_t id) noexcept {
  if (toAnswer) {
    questionUnref(id);
  } else {
    importUnref(id);
  }
}

void RpcConnection::questionRef(uint32_t id) noexcept { ++questions_[id].refs; }

void RpcConnection::questionUnref(uint32_t id) noexcept {
  Question& q = questions_[id];
  AGATE_ASSERT(q.inUse && q.refs > 0, "question %u released more than referenced", id);
  if (--q.refs != 0) return;
  if (q.held) {
    dropHeldCall(id);  // never sent: nothing to cancel at the peer
    return;
  }
  if (q.finishSent) {
    if (q.returned) freeQuestion(id);  // the connection ended: nothing to send
    return;
  }
  q.finishSent = true;
  if (q.returned) {
    queueFinish(id);  // freed once the Finish is out
    return;
  }
  // Cancels the call, at once. Nothing here can read its results any more: their references are
  // the callee's to drop (Finish.releaseResultCaps), which spares a Release per capability.
  q.resultsReleased = sendFinish(id, /*releaseResultCaps=*/true);
  // Freed when the Return arrives; now if the connection ended as the Finish went (no Return
  // will come).
  if (q.returned) freeQuestion(id);
}

// Whether a call reserving `replyBytes` may be sent now (RpcOptions::maxQuestions and
// replyBytesPerCall): OUT_OF_MEMORY, saying which bound, when not.
// `held`: the call would be held (RpcOptions::whenReplySpaceIsFull), so the space in use now
// does not matter.
Status RpcConnection::roomForQuestion(uint64_t replyBytes, bool held) const {
  if (questionsLive_ >= options_.maxQuestions)
    return Error(Errc::OUT_OF_MEMORY,
                 "RpcOptions::maxQuestions calls are in flight or held on this connection: "
                 "await some before sending more");
  if (replyBytes > replyBudget_)
    return Error(Errc::OUT_OF_MEMORY,
                 "the call reserves more reply space than the ring its Return arrives on holds");
  if (!held && replyReserved_ + replyBytes > replyBudget_)
    return Error(Errc::OUT_OF_MEMORY,
                 "the calls in flight reserve all the reply space of this connection (its "
                 "inbound ring): await some before sending more");
  return {};
}

void RpcConnection::returnReplySpace(Question& q) noexcept {
  replyReserved_ -= q.replyReserved;
  q.replyReserved = 0;
}

// Back to the state openQuestion expects (field by field: cheaper than assigning a fresh one).
void RpcConnection::freeQuestion(uint32_t id) noexcept {
  Question& q = questions_[id];
  returnReplySpace(q);  // a question freed without its Return (the connection ended)
  q.fulfiller.reset();
  q.vine.reset();
  q.refs = 0;
  q.inUse = q.returned = q.finishSent = q.noPipelining = q.resultsReleased = q.held = false;
  ++q.generation;
  q.nextFree = questionFree_;
  questionFree_ = id;
  --questionsLive_;
}

// A Finish after the Return only lets the peer free its answer, so it need not go first: it is
// sent from finishTask_, which runs after the current task, so whatever that task sends next
// (typically the caller's next Call) reaches the peer ahead of it and is served without waiting
// behind it. Finishes of one task go out together, in the order they were queued.
void RpcConnection::queueFinish(uint32_t id) {
  if (!isOpen()) {
    freeQuestion(id);
    return;
  }
  if (queuedFinishCount_ == MAX_QUEUED_FINISHES) flushFinishes();
  queuedFinishes_[queuedFinishCount_++] = id;
  if (!finishTask_.isQueued()) loop_.post(finishTask_);
}

void RpcConnection::flushFinishes() {
  // Taken out first: sending may fail the connection, which frees queued questions itself.
  std::array<uint32_t, MAX_QUEUED_FINISHES> ids;
  const uint32_t n = std::exchange(queuedFinishCount_, 0);
  std::copy_n(queuedFinishes_.begin(), n, ids.begin());
  for (uint32_t i = 0; i < n; ++i) {
    sendFinish(ids[i], /*releaseResultCaps=*/false);  // nothing is sent on a dead connection
    freeQuestion(ids[i]);
  }
}

}  // namespace agate::rpc
