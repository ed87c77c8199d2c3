// RpcConnection: tables, outbound queue, inbound decode -> invoke. See connection.h and
// rpc/README.md for the protocol and the lifetimes.
#include "agate/rpc/connection.h"

#include <algorithm>
#include <cstring>

namespace agate::rpc {

namespace {

constexpr uint32_t NONE = 0xffff'ffffu;

// Envelope bytes around params or results content: the Message and Call/Return structs, the
// target with its path and a full cap table. Generous; frames commit only what they use.
constexpr size_t ENVELOPE_BYTES = 64 * 8 + MAX_CAPS_PER_MESSAGE * 16;
constexpr size_t CONTROL_BYTES = 64;        // Finish, Release
constexpr size_t EXCEPTION_BYTES = 64 * 8;  // a Return or Abort with an exception and its reason
constexpr size_t MAX_REASON_ON_WIRE = 120;  // reason text bytes written into an Exception

// Spill buffers come in size classes of 2^(k + MIN_CLASS_SHIFT) bytes.
constexpr size_t MIN_CLASS_SHIFT = 7;

size_t roundToWords(size_t bytes) { return (bytes + WORD_BYTES - 1) / WORD_BYTES * WORD_BYTES; }

uint32_t sizeClassFor(size_t bytes) {
  uint32_t k = 0;
  while ((size_t{1} << (k + MIN_CLASS_SHIFT)) < bytes) ++k;
  return k;
}

// The Errc a remote exception names; values this side does not know read as FAILED.
Errc errcFromWire(uint16_t value) {
  if (value == 0 || value > static_cast<uint16_t>(Errc::WRONG_TYPE)) return Errc::FAILED;
  return static_cast<Errc>(value);
}

wire::Exception::Type typeFor(Errc c) {
  switch (c) {
    case Errc::DISCONNECTED:
      return wire::Exception::Type::DISCONNECTED;
    case Errc::OUT_OF_MEMORY:
    case Errc::QUOTA_EXCEEDED:
    case Errc::WOULD_BLOCK:
      return wire::Exception::Type::OVERLOADED;
    case Errc::UNSUPPORTED:
      return wire::Exception::Type::UNIMPLEMENTED;
    default:
      return wire::Exception::Type::FAILED;
  }
}

// The cap-table index at pointer-field `path` of a payload's content (see PromisedAnswer).
// Reads a private copy made by this side, inside a try (the copy is trusted, the path is not).
Result<uint32_t> capIndexAtPath(capnp::AnyStruct::Reader payload, std::span<const uint16_t> path) {
  try {
    capnp::AnyStruct::Reader s = payload;
    uint16_t field = 0;  // Payload.content
    for (uint16_t step : path) {
      capnp::List<capnp::AnyPointer>::Reader pointers = s.getPointerSection();
      if (field >= pointers.size() || !pointers[field].isStruct())
        return Error(Errc::FAILED, "pipeline path does not lead through structs");
      s = pointers[field].getAs<capnp::AnyStruct>();
      field = step;
    }
    Result<uint32_t> index = readCapPointer(s, field);
    if (!index) return Error(Errc::FAILED, "pipeline path does not end at a capability");
    return index;
  } catch (const kj::Exception&) {
    return Error(Errc::FAILED, "pipeline path does not match the results");
  }
}

// Payload.content of a payload struct; a null pointer when the struct has no pointer section
// (an empty or older-schema payload: reads as empty content).
capnp::AnyPointer::Reader contentOf(capnp::AnyStruct::Reader payload) {
  capnp::List<capnp::AnyPointer>::Reader pointers = payload.getPointerSection();
  if (pointers.size() == 0) return capnp::AnyPointer::Reader();
  return pointers[0];
}

}  // namespace

namespace detail {

// A pooled buffer for a message built outside the ring (or a private copy of one). Allocated
// once per pool miss and reused; its memory is zero outside [0, dirtyBytes).
struct SpillBuffer {
  std::unique_ptr<capnp::word[]> words;
  uint32_t sizeClass = 0;
  std::optional<FrameBuilder> builder;
  size_t usedBytes = 0;   // the message's length once finished
  size_t dirtyBytes = 0;  // prefix to zero again before reuse
  SpillBuffer* next = nullptr;
  std::span<const std::byte> bytes() const {
    return {reinterpret_cast<const std::byte*>(words.get()), usedBytes};
  }
};

// Where a Response's message lives: the inbound frame (in place) or a private copy.
struct ResponseSlot {
  explicit ResponseSlot(const ReadLimits& limits) : reader(limits) {}
  std::optional<IncomingMessage> inPlace;
  SpillBuffer* copy = nullptr;
  FrameReader reader;  // decodes `copy`
  capnp::AnyStruct::Reader payload;
  capnp::List<wire::CapDescriptor>::Reader caps;
  ResponseSlot* nextFree = nullptr;
};

capnp::MessageBuilder& OutSlot::builder() {
  AGATE_REQUIRE(active(), "use of a message that was sent, abandoned or refused");
  if (ring_) return ring_->builder();
  return *spill_->builder;
}

OutSlot& OutSlot::operator=(OutSlot&& o) noexcept {
  AGATE_REQUIRE(!active(), "an open outbound message overwritten");
  if (o.ring_) ring_.emplace(std::move(*o.ring_));
  o.ring_.reset();
  spill_ = std::exchange(o.spill_, nullptr);
  return *this;
}

Result<uint32_t> CapTable::tryAdd(CapEntry entry) {
  if (count_ == MAX_CAPS_PER_MESSAGE)
    return Error(Errc::OUT_OF_MEMORY, "more capabilities than one message carries");
  entries_[count_] = std::move(entry);
  return count_++;
}

void CapTable::clear() noexcept {
  for (uint32_t i = 0; i < count_; ++i) entries_[i] = CapEntry{};
  count_ = 0;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Table entries

struct RpcConnection::Question {
  std::optional<Fulfiller<Response>> fulfiller;  // until the Return (or the connection's end)
  uint32_t refs = 0;  // the RemotePromise and every RemoteCap pipelined on it
  uint32_t nextFree = NONE;
  bool inUse = false;
  bool returned = false;    // Return received (or the connection ended)
  bool finishSent = false;  // Finish sent (or never to be sent: the connection ended)
};

struct RpcConnection::Answer {
  enum class State : uint8_t { FREE, QUEUED, RUNNING, RETURNED };
  explicit Answer(uint32_t answerId) : id(answerId) {}

  const uint32_t id;
  State state = State::FREE;
  bool finishReceived = false;
  bool inWorklist = false;
  CallContext context;
  std::optional<Promise<void>> driver;  // RUNNING: drive() over the object's dispatch
  uint32_t pinnedExport = NONE;         // the export being called, pinned while RUNNING
  std::array<uint32_t, MAX_CAPS_PER_MESSAGE> paramPins{};  // exports passed back in params
  uint32_t paramPinCount = 0;

  // QUEUED: a private copy of the Call and the answer it waits on, with the path.
  detail::SpillBuffer* queuedCall = nullptr;
  Answer* waitingOn = nullptr;
  Answer* nextInQueue = nullptr;
  // Calls pipelined on this answer that wait for it to return, in arrival order.
  Answer* queueHead = nullptr;
  Answer* queueTail = nullptr;

  // RETURNED: the outcome, for calls pipelined on it. A private copy of the Return when its
  // results carried capabilities, and what each cap-table entry named (pinned exports).
  Error error{};
  detail::SpillBuffer* results = nullptr;
  std::array<detail::CapEntry::Kind, MAX_CAPS_PER_MESSAGE> resultKinds{};
  std::array<uint32_t, MAX_CAPS_PER_MESSAGE> resultIds{};
  uint32_t resultCount = 0;
};

struct RpcConnection::Export {
  ServerObject* object = nullptr;
  std::unique_ptr<ServerObject> owned;
  uint32_t remoteRefs = 0;  // references the peer holds (cap-table entries minus Releases)
  uint32_t pins = 0;        // running calls on it, answers whose results name it
  uint32_t nextFree = NONE;
  bool inUse = false;
};

struct RpcConnection::Import {
  uint32_t remoteRefs = 0;  // times the peer sent this id since our last Release
  uint32_t localRefs = 0;   // RemoteCaps and Responses holding it
};

// Everything handleMessage needs, read once inside the decode boundary.
struct RpcConnection::Decoded {
  wire::Message::Which which{};
  uint32_t id = 0;     // call: question id; return: answer id; finish; release: export id
  uint32_t count = 0;  // release
  bool targetIsAnswer = false;
  uint32_t targetId = 0;
  std::array<uint16_t, MAX_PIPELINE_PATH> path{};
  uint32_t pathLength = 0;
  uint64_t interfaceId = 0;
  uint16_t methodId = 0;
  wire::Return::Which returnKind{};
  capnp::AnyStruct::Reader payload;
  capnp::List<wire::CapDescriptor>::Reader caps;
  std::array<detail::CapEntry::Kind, MAX_CAPS_PER_MESSAGE> capKinds{};
  std::array<uint32_t, MAX_CAPS_PER_MESSAGE> capIds{};
  uint32_t capCount = 0;
  wire::Exception::Reader exception;
};

MessageReceiverOptions rpcReceiverOptions(MessageReceiverOptions base) {
  base.limits.allowCapabilityPointers = true;
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
      replayReader_(rx.limits()),
      teardownTask_(*this),
      worklistTask_(*this) {
  AGATE_REQUIRE(rx.limits().allowCapabilityPointers,
                "an RPC connection's MessageReceiver must be built with rpcReceiverOptions()");
  AGATE_REQUIRE(options_.maxMessageBytes >= 1024, "maxMessageBytes %zu is below 1 KiB",
                options_.maxMessageBytes);
  questions_.emplace_back();  // question id 0 is never used: 0 means "no question"
  questions_[0].inUse = true;
  questionFree_ = NONE;
  exports_.emplace_back();  // export 0: the bootstrap object, never released
  exports_[0].object = options_.bootstrap;
  exports_[0].inUse = true;
  exportsLive_ = 1;
  exportFree_ = NONE;
  reader_.emplace(readLoop());
}

RpcConnection::~RpcConnection() {
  fail(Error(Errc::DISCONNECTED, "the connection was closed"));
  teardown();
  AGATE_REQUIRE(handles_ == 0,
                "%llu RemoteCap/Request/RemotePromise/Response handles outlive their connection",
                static_cast<unsigned long long>(handles_));
  // Spill buffers are owned by spillStore_; nothing else to free.
}

void RpcConnection::close(Error reason) { fail(reason); }

Promise<void> RpcConnection::onDisconnect() {
  if (!isOpen()) return readyPromise<void>(failure_);
  AGATE_REQUIRE(!disconnected_.has_value(), "onDisconnect() awaited twice");
  auto [promise, fulfiller] = newPromiseAndFulfiller<void>();
  disconnected_.emplace(std::move(fulfiller));
  return std::move(promise);
}

// Marks the connection dead and fails the callers' promises at once; destroying coroutines
// (reader, pump, running calls) waits for teardown(), posted to the loop, because fail() may be
// running inside one of them.
void RpcConnection::fail(Error reason) {
  if (!isOpen()) return;
  failure_ = reason;
  for (Question& q : questions_) {
    if (!q.inUse || q.returned) continue;
    q.returned = true;
    q.finishSent = true;  // nothing more is sent on a dead connection
    if (q.fulfiller) {
      q.fulfiller->fulfill(reason);
      q.fulfiller.reset();
    }
  }
  while (queueHead_ != nullptr) {
    detail::SpillBuffer* b = queueHead_;
    queueHead_ = b->next;
    giveSpill(b);
  }
  queueTail_ = nullptr;
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
  if (disconnected_) {
    disconnected_->fulfill(reason);
    disconnected_.reset();
  }
}

void RpcConnection::teardown() {
  if (!inReader_) reader_.reset();
  if (!inPump_) pump_.reset();
  if (detachPending_ && !ringOpen_ && !pumpRunning_) {
    tx_.sender().detach();
    detachPending_ = false;
  }
  worklist_.clear();
  for (std::unique_ptr<Answer>& a : answers_) {
    if (a && a->state != Answer::State::FREE) freeAnswer(*a);
  }
  // Destroy owned exports. An object's destructor may drop RemoteCaps (back into importUnref,
  // which sends nothing now), so move them out of the table first.
  std::vector<std::unique_ptr<ServerObject>> doomed;
  for (size_t i = 1; i < exports_.size(); ++i) {
    Export& e = exports_[i];
    if (!e.inUse) continue;
    if (e.owned) doomed.push_back(std::move(e.owned));
    e = Export{};
    e.nextFree = exportFree_;
    exportFree_ = static_cast<uint32_t>(i);
    --exportsLive_;
  }
  if (exports_[0].inUse) {
    exports_[0].inUse = false;  // a dead connection serves nobody
    --exportsLive_;
  }
  exportByObject_.clear();
  doomed.clear();
}

// ---------------------------------------------------------------------------------------------
// Outbound: ring frames, spill buffers, the queue and the pump

detail::SpillBuffer* RpcConnection::takeSpill(size_t bytes) {
  const uint32_t k = sizeClassFor(bytes);
  AGATE_REQUIRE(k < spillFree_.size(), "spill of %zu bytes", bytes);
  if (detail::SpillBuffer* b = spillFree_[k]) {
    spillFree_[k] = b->next;
    b->next = nullptr;
    return b;
  }
  auto b = std::make_unique<detail::SpillBuffer>();
  const size_t words = (size_t{1} << (k + MIN_CLASS_SHIFT)) / WORD_BYTES;
  b->words = std::make_unique<capnp::word[]>(words);  // value-initialised: zero
  b->sizeClass = k;
  spillStore_.push_back(std::move(b));
  return spillStore_.back().get();
}

void RpcConnection::giveSpill(detail::SpillBuffer* b) noexcept {
  b->builder.reset();
  std::memset(b->words.get(), 0, b->dirtyBytes);
  b->dirtyBytes = 0;
  b->usedBytes = 0;
  b->next = spillFree_[b->sizeClass];
  spillFree_[b->sizeClass] = b;
}

Result<detail::OutSlot> RpcConnection::startOut(size_t bytes) {
  if (!isOpen()) return failure_;
  bytes = std::min(roundToWords(bytes), roundToWords(options_.maxMessageBytes));
  detail::OutSlot slot;
  if (!ringOpen_ && !pumpRunning_ && queueHead_ == nullptr) {
    Result<OutgoingMessage> m = tx_.tryStartMessage(bytes);
    if (m) {
      slot.ring_.emplace(std::move(*m));
      ringOpen_ = true;
      return slot;
    }
    if (m.code() != Errc::WOULD_BLOCK) {
      if (m.code() != Errc::MESSAGE_TOO_LARGE) fail(m.error());
      return m.error();
    }
  }
  detail::SpillBuffer* b = takeSpill(bytes);
  b->builder.emplace(std::span<capnp::word>(b->words.get(), bytes / WORD_BYTES));
  slot.spill_ = b;
  ++stats_.spilledMessages;
  return slot;
}

// The ring reservation was just given up or sent: detach if the connection died meanwhile,
// else send what queued up behind it.
void RpcConnection::afterRingClosed() {
  if (detachPending_ && !ringOpen_ && !pumpRunning_) {
    tx_.sender().detach();
    detachPending_ = false;
    return;
  }
  flushQueue();
}

void RpcConnection::abandonOut(detail::OutSlot& slot) noexcept {
  if (slot.ring_) {
    slot.ring_->abandon();
    slot.ring_.reset();
    ringOpen_ = false;
    afterRingClosed();
    return;
  }
  if (detail::SpillBuffer* b = std::exchange(slot.spill_, nullptr)) {
    b->dirtyBytes = b->builder->overflowed() ? size_t{1} << (b->sizeClass + MIN_CLASS_SHIFT)
                                             : b->builder->usedBytes();
    giveSpill(b);
  }
}

Status RpcConnection::finishOut(detail::OutSlot& slot) {
  if (!isOpen()) {
    abandonOut(slot);
    return failure_;
  }
  detail::SpillBuffer* b = nullptr;
  if (slot.ring_) {
    if (queueHead_ == nullptr) {
      Status sent = slot.ring_->send();
      slot.ring_.reset();
      ringOpen_ = false;
      if (sent) ++stats_.messagesSent;
      return sent;
    }
    // Messages were queued while this frame was open; they were sent first, so this one goes
    // behind them: copy it out (frames are position-independent) and give the frame back.
    auto& frame = static_cast<FrameBuilder&>(slot.ring_->builder());
    Result<size_t> used = frame.tryFinish();
    if (!used) {
      abandonOut(slot);
      return used.error();
    }
    b = takeSpill(*used);
    std::memcpy(b->words.get(), frame.frame().data(), *used);
    b->usedBytes = b->dirtyBytes = *used;
    slot.ring_->abandon();
    slot.ring_.reset();
    ringOpen_ = false;
    ++stats_.spilledMessages;
  } else {
    b = std::exchange(slot.spill_, nullptr);
    Result<size_t> used = b->builder->tryFinish();
    if (!used) {
      b->dirtyBytes = size_t{1} << (b->sizeClass + MIN_CLASS_SHIFT);
      giveSpill(b);
      return used.error();
    }
    b->builder.reset();
    b->usedBytes = b->dirtyBytes = *used;
  }
  if (queueTail_ != nullptr) {
    queueTail_->next = b;
  } else {
    queueHead_ = b;
  }
  queueTail_ = b;
  afterRingClosed();
  return {};
}

void RpcConnection::flushQueue() {
  if (pumpRunning_ || ringOpen_ || !isOpen()) return;
  while (queueHead_ != nullptr) {
    detail::SpillBuffer* b = queueHead_;
    Result<std::span<std::byte>> frame = tx_.sender().tryReserve(b->usedBytes);
    if (frame.code() == Errc::WOULD_BLOCK) {
      pumpRunning_ = true;
      pump_.emplace(pumpWhileFull());
      return;
    }
    if (!frame) {
      fail(frame.error());
      return;
    }
    std::memcpy(frame->data(), b->words.get(), b->usedBytes);
    tx_.sender().commit(b->usedBytes);
    ++stats_.messagesSent;
    queueHead_ = b->next;
    if (queueHead_ == nullptr) queueTail_ = nullptr;
    giveSpill(b);
  }
}

// Sends the queue while the ring is full: awaits space for the head message (the reservation
// the await returns is given back and taken again synchronously, as flushQueue does).
Promise<void> RpcConnection::pumpWhileFull() {
  while (isOpen() && queueHead_ != nullptr) {
    detail::SpillBuffer* b = queueHead_;
    Result<std::span<std::byte>> frame = tx_.sender().tryReserve(b->usedBytes);
    if (frame.code() == Errc::WOULD_BLOCK) {
      Result<OutgoingMessage> space =
          co_await tx_.startMessageAsync(loop_, b->usedBytes, options_.wait);
      inPump_ = true;
      if (space) space->abandon();
      if (!space && isOpen()) fail(space.error());
      inPump_ = false;
      continue;
    }
    if (!frame) {
      inPump_ = true;
      fail(frame.error());
      inPump_ = false;
      break;
    }
    std::memcpy(frame->data(), b->words.get(), b->usedBytes);
    tx_.sender().commit(b->usedBytes);
    ++stats_.messagesSent;
    queueHead_ = b->next;
    if (queueHead_ == nullptr) queueTail_ = nullptr;
    giveSpill(b);
  }
  pumpRunning_ = false;
  if (detachPending_) {
    tx_.sender().detach();
    detachPending_ = false;
  }
  co_return {};
}

void RpcConnection::writeException(wire::Exception::Builder b, const Error& e) {
  b.setErrc(static_cast<uint16_t>(e.code));
  b.setType(typeFor(e.code));
  const char* text = e.detail != nullptr && e.detail[0] != '\0' ? e.detail : errcName(e.code);
  b.setReason(capnp::Text::Reader(text, strnlen(text, MAX_REASON_ON_WIRE)));
}

void RpcConnection::sendFinish(uint32_t questionId) {
  Result<detail::OutSlot> slot = startOut(CONTROL_BYTES);
  if (!slot) return;  // the connection is dead: nothing to finish
  slot->builder().initRoot<wire::Message>().initFinish().setQuestionId(questionId);
  if (finishOut(*slot)) ++stats_.finishesSent;
}

void RpcConnection::sendRelease(uint32_t importId, uint32_t count) {
  Result<detail::OutSlot> slot = startOut(CONTROL_BYTES);
  if (!slot) return;
  wire::Release::Builder r = slot->builder().initRoot<wire::Message>().initRelease();
  r.setId(importId);
  r.setReferenceCount(count);
  if (finishOut(*slot)) ++stats_.releasesSent;
}

void RpcConnection::sendAbort(const Error& reason) {
  Result<detail::OutSlot> slot = startOut(EXCEPTION_BYTES);
  if (!slot) return;
  writeException(slot->builder().initRoot<wire::Message>().initAbort(), reason);
  (void)finishOut(*slot);
}

// Writes an outbound cap table, exporting objects as needed (one more remote reference each).
// Each SENDER_HOSTED entry's id is filled in, so a failed send can be rolled back.
Status RpcConnection::writeCapTable(capnp::List<wire::CapDescriptor>::Builder out,
                                    detail::CapTable& caps) {
  for (uint32_t i = 0; i < caps.size(); ++i) {
    detail::CapEntry& e = caps.entries()[i];
    switch (e.kind) {
      case detail::CapEntry::Kind::NONE:
        out[i].setNone();
        break;
      case detail::CapEntry::Kind::RECEIVER_HOSTED:
        out[i].setReceiverHosted(e.id);
        break;
      case detail::CapEntry::Kind::SENDER_HOSTED: {
        Result<uint32_t> id = exportObject(e.object, std::move(e.owned));
        if (!id) return id.error();
        e.id = *id;
        ++exports_[e.id].remoteRefs;
        out[i].setSenderHosted(e.id);
        break;
      }
    }
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// Exports and imports

Result<uint32_t> RpcConnection::exportObject(ServerObject* object,
                                             std::unique_ptr<ServerObject> owned) {
  AGATE_REQUIRE(object != nullptr, "exporting a null object");
  if (!owned) {
    auto it = exportByObject_.find(object);
    if (it != exportByObject_.end()) return it->second;
  }
  uint32_t id = exportFree_;
  if (id != NONE) {
    exportFree_ = exports_[id].nextFree;
  } else {
    id = static_cast<uint32_t>(exports_.size());
    exports_.emplace_back();
  }
  Export& e = exports_[id];
  e = Export{};
  e.object = object;
  e.owned = std::move(owned);
  e.inUse = true;
  ++exportsLive_;
  exportByObject_.emplace(object, id);
  return id;
}

void RpcConnection::exportUnpin(uint32_t id) noexcept {
  if (id == NONE || id >= exports_.size() || !exports_[id].inUse) return;
  AGATE_ASSERT(exports_[id].pins > 0, "export %u unpinned more than pinned", id);
  --exports_[id].pins;
  maybeFreeExport(id);
}

void RpcConnection::maybeFreeExport(uint32_t id) noexcept {
  Export& e = exports_[id];
  if (id == 0 || !e.inUse || e.remoteRefs != 0 || e.pins != 0) return;
  std::unique_ptr<ServerObject> doomed = std::move(e.owned);
  exportByObject_.erase(e.object);
  e = Export{};
  e.nextFree = exportFree_;
  exportFree_ = id;
  --exportsLive_;
  doomed.reset();  // may re-enter (its RemoteCaps release imports); the table is consistent
}

void RpcConnection::importRef(uint32_t id) noexcept {
  if (id >= imports_.size()) imports_.resize(id + 1);
  if (imports_[id].localRefs++ == 0) ++importsLive_;
}

void RpcConnection::importUnref(uint32_t id) noexcept {
  Import& imp = imports_[id];
  AGATE_ASSERT(imp.localRefs > 0, "import %u released more than referenced", id);
  if (--imp.localRefs != 0) return;
  --importsLive_;
  const uint32_t count = std::exchange(imp.remoteRefs, 0);
  if (count != 0 && isOpen()) sendRelease(id, count);
}

Result<ReceivedCap> RpcConnection::receivedCap(capnp::List<wire::CapDescriptor>::Reader caps,
                                               uint32_t index) {
  // The list was validated when its message was decoded (ids in range, exports live).
  if (index >= caps.size()) return Error(Errc::INVALID_ARGUMENT, "cap index outside the table");
  wire::CapDescriptor::Reader d = caps[index];
  ReceivedCap cap;
  switch (d.which()) {
    case wire::CapDescriptor::SENDER_HOSTED:
      cap.remote.conn_ = this;
      cap.remote.kind_ = RemoteCap::Kind::IMPORT;
      cap.remote.id_ = d.getSenderHosted();
      cap.remote.addRef();
      return cap;
    case wire::CapDescriptor::RECEIVER_HOSTED: {
      const uint32_t id = d.getReceiverHosted();
      if (!isOpen() || id >= exports_.size() || !exports_[id].inUse)
        return Error(Errc::DISCONNECTED, "the connection ended");
      cap.local = exports_[id].object;
      return cap;
    }
    default:
      return Error(Errc::INVALID_ARGUMENT, "null capability");
  }
}

void RpcConnection::releaseResponse(detail::ResponseSlot* slot) noexcept {
  for (wire::CapDescriptor::Reader d : slot->caps) {
    if (d.which() == wire::CapDescriptor::SENDER_HOSTED) importUnref(d.getSenderHosted());
  }
  --handles_;
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
}

Result<uint32_t> RpcConnection::addCapFor(detail::CapTable& table, const RemoteCap& cap) {
  if (cap.kind_ == RemoteCap::Kind::NONE) return table.tryAdd(detail::CapEntry{});
  if (cap.conn_ != this)
    return Error(Errc::INVALID_ARGUMENT,
                 "a capability of another connection (three-party handoff is not supported)");
  if (cap.kind_ != RemoteCap::Kind::IMPORT)
    return Error(Errc::INVALID_ARGUMENT, "a pipelined or broken capability cannot be passed");
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::RECEIVER_HOSTED;
  e.id = cap.id_;
  return table.tryAdd(std::move(e));
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
  Request request(this, target, Error{});
  if (target.kind_ == RemoteCap::Kind::BROKEN) {
    request.error_ = target.broken_;
  } else if (!isOpen()) {
    request.error_ = failure_;
  } else {
    Result<detail::OutSlot> slot = startOut(sizeHint + ENVELOPE_BYTES);
    if (!slot) {
      request.error_ = slot.error();
    } else {
      request.slot_ = std::move(*slot);
      wire::Call::Builder call = request.slot_.builder().initRoot<wire::Message>().initCall();
      call.setInterfaceId(interfaceId);
      call.setMethodId(methodId);
      wire::MessageTarget::Builder t = call.initTarget();
      if (target.kind_ == RemoteCap::Kind::IMPORT) {
        t.setImportedCap(target.id_);
      } else {
        wire::PromisedAnswer::Builder pa = t.initPromisedAnswer();
        pa.setQuestionId(target.id_);
        capnp::List<uint16_t>::Builder path = pa.initTransform(target.pathLength_);
        for (uint32_t i = 0; i < target.pathLength_; ++i) path.set(i, target.path_[i]);
      }
      request.call_ = call;
      return request;
    }
  }
  // Refused: params go to a scrap message so the caller's building code still runs.
  request.scrap_ = std::make_unique<capnp::MallocMessageBuilder>(256);
  return request;
}

RemotePromise RpcConnection::sendRequest(Request& request) {
  if (request.error_.code == Errc::OK && !isOpen()) request.error_ = failure_;
  if (request.error_.code != Errc::OK) {
    abandonOut(request.slot_);
    return RemotePromise(nullptr, 0, readyPromise<Response>(request.error_), request.error_);
  }
  uint32_t qid = questionFree_;
  if (qid != NONE) {
    questionFree_ = questions_[qid].nextFree;
  } else {
    qid = static_cast<uint32_t>(questions_.size());
    questions_.emplace_back();
  }
  request.call_.setQuestionId(qid);
  Status written = {};
  if (request.caps_.size() > 0) {
    written =
        writeCapTable(request.call_.getParams().initCapTable(request.caps_.size()), request.caps_);
  }
  Status sent = written ? finishOut(request.slot_) : written;
  if (!sent) {
    if (request.slot_.active()) abandonOut(request.slot_);
    for (uint32_t i = 0; i < request.caps_.size(); ++i) {  // roll the exports back
      const detail::CapEntry& e = request.caps_.entries()[i];
      if (e.kind != detail::CapEntry::Kind::SENDER_HOSTED || e.id == 0 || e.id >= exports_.size() ||
          !exports_[e.id].inUse || exports_[e.id].remoteRefs == 0)
        continue;
      --exports_[e.id].remoteRefs;
      maybeFreeExport(e.id);
    }
    questions_[qid].nextFree = questionFree_;
    questionFree_ = qid;
    return RemotePromise(nullptr, 0, readyPromise<Response>(sent.error()), sent.error());
  }
  ++stats_.callsSent;
  Question& q = questions_[qid];
  q = Question{};
  q.inUse = true;
  q.refs = 1;
  ++questionsLive_;
  auto [promise, fulfiller] = newPromiseAndFulfiller<Response>();
  q.fulfiller.emplace(std::move(fulfiller));
  ++handles_;
  return RemotePromise(this, qid, std::move(promise), Error{});
}

void RpcConnection::questionRef(uint32_t id) noexcept { ++questions_[id].refs; }

void RpcConnection::questionUnref(uint32_t id) noexcept {
  Question& q = questions_[id];
  AGATE_ASSERT(q.inUse && q.refs > 0, "question %u released more than referenced", id);
  if (--q.refs != 0) return;
  if (!q.finishSent) {
    q.finishSent = true;
    sendFinish(id);
  }
  if (!q.returned) return;  // freed when the Return arrives
  q = Question{};
  q.nextFree = questionFree_;
  questionFree_ = id;
  --questionsLive_;
}

// ---------------------------------------------------------------------------------------------
// Inbound: read, decode, invoke

Promise<void> RpcConnection::readLoop() {
  while (isOpen()) {
    {
      Result<IncomingMessage> in = co_await rx_.receiveAsync(loop_, options_.wait);
      if (!isOpen()) co_return {};
      if (!in) {
        if (in.code() == Errc::PROTOCOL_ERROR) {
          sendAbort(in.error());  // a malformed frame or ring: tell the peer why
          fail(in.error());
        } else {
          fail(Error(Errc::DISCONNECTED, "the peer disconnected"));
        }
        co_return {};
      }
      ++stats_.messagesReceived;
      inReader_ = true;
      Status handled = handleMessage(*in);
      if (handled) runWorklist();
      inReader_ = false;
      if (!handled) {
        if (isOpen()) {
          sendAbort(handled.error());
          fail(handled.error());
        }
        co_return {};
      }
    }  // the frame is released here unless a Response took it
    if (heldSlot_ != nullptr) {
      // Let the caller read its Response in place first; copy it out only if it keeps it.
      co_await loop_.yield();
      if (heldSlot_ != nullptr) {
        relocate(std::exchange(heldSlot_, nullptr));
      }
    }
  }
  co_return {};
}

Status RpcConnection::decodeCapTable(capnp::List<wire::CapDescriptor>::Reader caps, Decoded& d) {
  if (caps.size() > MAX_CAPS_PER_MESSAGE)
    return Error(Errc::PROTOCOL_ERROR, "cap table longer than a message may carry");
  d.caps = caps;
  d.capCount = caps.size();
  for (uint32_t i = 0; i < d.capCount; ++i) {
    wire::CapDescriptor::Reader c = caps[i];
    switch (c.which()) {
      case wire::CapDescriptor::NONE:
        d.capKinds[i] = detail::CapEntry::Kind::NONE;
        break;
      case wire::CapDescriptor::SENDER_HOSTED:
        d.capKinds[i] = detail::CapEntry::Kind::SENDER_HOSTED;
        d.capIds[i] = c.getSenderHosted();
        if (d.capIds[i] >= options_.maxImports)
          return Error(Errc::PROTOCOL_ERROR, "export id beyond the import table's bound");
        break;
      case wire::CapDescriptor::RECEIVER_HOSTED:
        d.capKinds[i] = detail::CapEntry::Kind::RECEIVER_HOSTED;
        d.capIds[i] = c.getReceiverHosted();
        if (d.capIds[i] >= exports_.size() || !exports_[d.capIds[i]].inUse)
          return Error(Errc::PROTOCOL_ERROR, "cap table names an export that does not exist");
        break;
      default:
        return Error(Errc::PROTOCOL_ERROR, "unknown cap descriptor");
    }
  }
  return {};
}

// Reads every field handleMessage uses and checks it against the tables. No state changes.
Status RpcConnection::decode(wire::Message::Reader m, Decoded& d) {
  d.which = m.which();
  switch (d.which) {
    case wire::Message::CALL: {
      wire::Call::Reader call = m.getCall();
      d.id = call.getQuestionId();
      if (d.id >= options_.maxAnswers)
        return Error(Errc::PROTOCOL_ERROR, "question id beyond the answer table's bound");
      if (d.id < answers_.size() && answers_[d.id] && answers_[d.id]->state != Answer::State::FREE)
        return Error(Errc::PROTOCOL_ERROR, "question id reused before Finish and Return");
      d.interfaceId = call.getInterfaceId();
      d.methodId = call.getMethodId();
      wire::MessageTarget::Reader target = call.getTarget();
      switch (target.which()) {
        case wire::MessageTarget::IMPORTED_CAP:
          d.targetIsAnswer = false;
          d.targetId = target.getImportedCap();
          if (d.targetId >= exports_.size() || !exports_[d.targetId].inUse)
            return Error(Errc::PROTOCOL_ERROR, "call on an export id that does not exist");
          break;
        case wire::MessageTarget::PROMISED_ANSWER: {
          wire::PromisedAnswer::Reader pa = target.getPromisedAnswer();
          d.targetIsAnswer = true;
          d.targetId = pa.getQuestionId();
          if (d.targetId >= answers_.size() || !answers_[d.targetId] ||
              answers_[d.targetId]->state == Answer::State::FREE ||
              answers_[d.targetId]->finishReceived || d.targetId == d.id)
            return Error(Errc::PROTOCOL_ERROR, "call on a promised answer that does not exist");
          capnp::List<uint16_t>::Reader path = pa.getTransform();
          if (path.size() > MAX_PIPELINE_PATH)
            return Error(Errc::PROTOCOL_ERROR, "pipeline path longer than allowed");
          d.pathLength = path.size();
          for (uint32_t i = 0; i < d.pathLength; ++i) d.path[i] = path[i];
          break;
        }
        default:
          return Error(Errc::PROTOCOL_ERROR, "unknown call target");
      }
      wire::Payload::Reader params = call.getParams();
      d.payload = capnp::AnyStruct::Reader(params);
      return decodeCapTable(params.getCapTable(), d);
    }
    case wire::Message::RETURN: {
      wire::Return::Reader r = m.getReturn();
      d.id = r.getAnswerId();
      if (d.id == 0 || d.id >= questions_.size() || !questions_[d.id].inUse ||
          questions_[d.id].returned)
        return Error(Errc::PROTOCOL_ERROR, "return for a question that is not awaiting one");
      d.returnKind = r.which();
      switch (d.returnKind) {
        case wire::Return::RESULTS: {
          wire::Payload::Reader results = r.getResults();
          d.payload = capnp::AnyStruct::Reader(results);
          return decodeCapTable(results.getCapTable(), d);
        }
        case wire::Return::EXCEPTION:
          d.exception = r.getException();
          (void)d.exception.getReason();  // read inside the boundary: a malformed Text throws
          return {};
        case wire::Return::CANCELED:
          return {};
        default:
          return Error(Errc::PROTOCOL_ERROR, "unknown return kind");
      }
    }
    case wire::Message::FINISH:
      d.id = m.getFinish().getQuestionId();
      if (d.id >= answers_.size() || !answers_[d.id] ||
          answers_[d.id]->state == Answer::State::FREE || answers_[d.id]->finishReceived)
        return Error(Errc::PROTOCOL_ERROR, "finish for an answer that does not exist");
      return {};
    case wire::Message::RELEASE: {
      wire::Release::Reader r = m.getRelease();
      d.id = r.getId();
      d.count = r.getReferenceCount();
      if (d.id == 0 || d.id >= exports_.size() || !exports_[d.id].inUse)
        return Error(Errc::PROTOCOL_ERROR, "release of an export that does not exist");
      if (d.count == 0 || d.count > exports_[d.id].remoteRefs)
        return Error(Errc::PROTOCOL_ERROR, "release of more references than were given");
      return {};
    }
    case wire::Message::ABORT:
      d.exception = m.getAbort();
      (void)d.exception.getReason();
      return {};
    case wire::Message::RESOLVE:
    case wire::Message::DISEMBARGO:
      return Error(Errc::PROTOCOL_ERROR, "resolve/disembargo are not used by this version");
  }
  return Error(Errc::PROTOCOL_ERROR, "unknown message kind");
}

Status RpcConnection::handleMessage(IncomingMessage& message) {
  Decoded d;
  Status decoded = {};
  wire::Message::Reader root;
  Status read = message.tryRead<wire::Message>([&](wire::Message::Reader m) {
    root = m;
    decoded = decode(m, d);
  });
  if (!read) return read;
  if (!decoded) return decoded;
  switch (d.which) {
    case wire::Message::CALL:
      return handleCall(message, root, d);
    case wire::Message::RETURN:
      return handleReturn(message, root.getReturn(), d);
    case wire::Message::FINISH:
      return handleFinish(d.id);
    case wire::Message::RELEASE:
      return handleRelease(d.id, d.count);
    case wire::Message::ABORT: {
      // The peer closes: our calls fail DISCONNECTED, or PROTOCOL_ERROR when it says we sent
      // something malformed, with its reason.
      Error reason = remoteError(d.exception);
      if (reason.code != Errc::PROTOCOL_ERROR) reason.code = Errc::DISCONNECTED;
      fail(reason);
      return {};
    }
    default:
      return Error(Errc::PROTOCOL_ERROR, "unexpected message kind");
  }
}

const char* RpcConnection::copyRemoteReason(capnp::Text::Reader reason) {
  std::array<char, REMOTE_REASON_BYTES>& slot = reasons_[nextReason_];
  nextReason_ = (nextReason_ + 1) % REMOTE_REASON_SLOTS;
  const size_t n = std::min(reason.size(), REMOTE_REASON_BYTES - 1);
  std::memcpy(slot.data(), reason.begin(), n);
  slot[n] = '\0';
  return slot.data();
}

Error RpcConnection::remoteError(wire::Exception::Reader e) {
  return Error(errcFromWire(e.getErrc()), copyRemoteReason(e.getReason()));
}

Status RpcConnection::handleReturn(IncomingMessage& message, wire::Return::Reader r,
                                   const Decoded& d) {
  (void)r;
  ++stats_.returnsReceived;
  Question& q = questions_[d.id];
  q.returned = true;
  const bool wanted = q.fulfiller.has_value() && !q.fulfiller->isCancelled();
  switch (d.returnKind) {
    case wire::Return::RESULTS: {
      // Every senderHosted entry is one more reference the peer gave us; the Response holds one
      // local reference per entry until it is dropped.
      for (uint32_t i = 0; i < d.capCount; ++i) {
        if (d.capKinds[i] != detail::CapEntry::Kind::SENDER_HOSTED) continue;
        importRef(d.capIds[i]);
        ++imports_[d.capIds[i]].remoteRefs;
      }
      detail::ResponseSlot* slot = responseFree_;
      if (slot != nullptr) {
        responseFree_ = slot->nextFree;
      } else {
        responseStore_.push_back(std::make_unique<detail::ResponseSlot>(rx_.limits()));
        slot = responseStore_.back().get();
      }
      slot->payload = d.payload;
      slot->caps = d.caps;
      ++handles_;
      Response response(this, slot);
      if (wanted) {
        slot->inPlace.emplace(std::move(message));
        heldSlot_ = slot;
        q.fulfiller->fulfill(std::move(response));
      }
      // Not wanted: the Response is dropped at the end of this scope, releasing its caps.
      break;
    }
    case wire::Return::EXCEPTION:
      if (wanted) q.fulfiller->fulfill(remoteError(d.exception));
      break;
    default:
      if (wanted) q.fulfiller->fulfill(Error(Errc::CANCELLED, "the call was cancelled"));
      break;
  }
  q.fulfiller.reset();
  if (q.refs == 0) {  // Finish already sent: the question id is free again
    q = Question{};
    q.nextFree = questionFree_;
    questionFree_ = d.id;
    --questionsLive_;
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// Server side: answers

RpcConnection::Answer& RpcConnection::answerAt(uint32_t id) {
  if (id >= answers_.size()) answers_.resize(id + 1);
  if (!answers_[id]) answers_[id] = std::make_unique<Answer>(id);
  return *answers_[id];
}

Status RpcConnection::handleCall(IncomingMessage& message, wire::Message::Reader m,
                                 const Decoded& d) {
  ++stats_.callsReceived;
  Answer& a = answerAt(d.id);
  a.state = Answer::State::QUEUED;
  a.finishReceived = false;
  a.error = Error{};
  ++answersLive_;
  CallContext& ctx = a.context;
  ctx.conn_ = this;
  ctx.answerId_ = d.id;
  ctx.paramCapCount_ = d.capCount;
  for (uint32_t i = 0; i < d.capCount; ++i) {
    ReceivedCap& cap = ctx.paramCaps_[i];
    cap = ReceivedCap{};
    switch (d.capKinds[i]) {
      case detail::CapEntry::Kind::SENDER_HOSTED:
        cap.remote.conn_ = this;
        cap.remote.kind_ = RemoteCap::Kind::IMPORT;
        cap.remote.id_ = d.capIds[i];
        cap.remote.addRef();
        ++imports_[d.capIds[i]].remoteRefs;
        break;
      case detail::CapEntry::Kind::RECEIVER_HOSTED:
        cap.local = exports_[d.capIds[i]].object;
        ++exports_[d.capIds[i]].pins;  // the peer cannot release it under the running call
        a.paramPins[a.paramPinCount++] = d.capIds[i];
        break;
      case detail::CapEntry::Kind::NONE:
        break;
    }
  }
  wire::Call::Reader call = m.getCall();
  if (!d.targetIsAnswer) {
    deliver(a, d.targetId, call, d.payload);
    return {};
  }
  Answer& target = *answers_[d.targetId];
  // A returned answer whose queue is not settled yet (it returned inside a running call and the
  // worklist has not run): the new call goes behind the queued ones, keeping E-order.
  if (target.state == Answer::State::RETURNED && target.queueHead == nullptr) {
    Result<uint32_t> exportId = resolvePipeline(target, {d.path.data(), d.pathLength});
    if (!exportId) {
      failAnswer(a, exportId.error());
      return {};
    }
    deliver(a, *exportId, call, d.payload);
    return {};
  }
  // The promised answer has not returned: keep a private copy of the call, queued in order.
  std::span<const std::byte> bytes = message.view().bytes();
  detail::SpillBuffer* copy = takeSpill(bytes.size());
  std::memcpy(copy->words.get(), bytes.data(), bytes.size());
  copy->usedBytes = copy->dirtyBytes = bytes.size();
  a.queuedCall = copy;
  a.waitingOn = &target;
  a.nextInQueue = nullptr;
  if (target.queueTail != nullptr) {
    target.queueTail->nextInQueue = &a;
  } else {
    target.queueHead = &a;
  }
  target.queueTail = &a;
  ++stats_.pipelinedCallsQueued;
  return {};
}

// Calls `exportId`'s dispatch with the answer's context; the Return goes out when it completes.
void RpcConnection::deliver(Answer& a, uint32_t exportId, wire::Call::Reader call,
                            capnp::AnyStruct::Reader payload) {
  Export& e = exports_[exportId];
  if (e.object == nullptr) {
    failAnswer(a, Error(Errc::NOT_FOUND, "this side has no bootstrap object"));
    return;
  }
  ++e.pins;
  a.pinnedExport = exportId;
  a.state = Answer::State::RUNNING;
  CallContext& ctx = a.context;
  ctx.params_ = contentOf(payload);
  ctx.paramsPayload_ = payload;
  ctx.paramsValid_ = true;
  Promise<void> dispatch = e.object->dispatch(call.getInterfaceId(), call.getMethodId(), ctx);
  ctx.paramsValid_ = false;
  a.driver.emplace(drive(a.id, std::move(dispatch)));
}

Promise<void> RpcConnection::drive(uint32_t answerId, Promise<void> dispatch) {
  Status status = co_await dispatch;
  completeAnswer(answerId, status);
  co_return {};
}

void RpcConnection::completeAnswer(uint32_t answerId, Status status) {
  Answer& a = *answers_[answerId];
  AGATE_ASSERT(a.state == Answer::State::RUNNING, "answer %u completed twice", answerId);
  CallContext& ctx = a.context;
  if (!status) {
    if (ctx.results_.active()) abandonOut(ctx.results_);
    ctx.resultCaps_.clear();
    failAnswer(a, status.error());
    return;
  }
  if (!ctx.results_.active()) (void)initResults(ctx, 0);
  if (ctx.results_.active()) {
    const uint32_t n = ctx.resultCaps_.size();
    Status written = {};
    if (n > 0) {
      written = writeCapTable(ctx.return_.getResults().initCapTable(n), ctx.resultCaps_);
    }
    if (!written) {
      abandonOut(ctx.results_);
      ctx.resultCaps_.clear();
      failAnswer(a, written.error());
      return;
    }
    if (n > 0) {
      // Calls pipelined on this answer resolve their paths against a private copy of the
      // results (frames are position-independent, so a copy of the words reads the same).
      auto& frame = static_cast<FrameBuilder&>(ctx.results_.builder());
      Result<size_t> used = frame.tryFinish();
      if (used) {
        a.results = takeSpill(*used);
        std::memcpy(a.results->words.get(), frame.frame().data(), *used);
        a.results->usedBytes = a.results->dirtyBytes = *used;
      }
    }
    Status sent = finishOut(ctx.results_);
    if (sent) {
      ++stats_.returnsSent;
      // The exports the results name stay pinned while the answer lives (pipelined calls).
      for (uint32_t i = 0; a.results != nullptr && i < n; ++i) {
        const detail::CapEntry& e = ctx.resultCaps_.entries()[i];
        a.resultKinds[i] = e.kind;
        a.resultIds[i] = e.id;
        if (e.kind == detail::CapEntry::Kind::SENDER_HOSTED) ++exports_[e.id].pins;
      }
      if (a.results != nullptr) a.resultCount = n;
    } else {
      // Nothing went out: take back the references the cap table gave, and fail the call
      // (results too large for a frame), or stop (the connection died).
      if (a.results != nullptr) giveSpill(std::exchange(a.results, nullptr));
      for (uint32_t i = 0; i < n; ++i) {
        const detail::CapEntry& e = ctx.resultCaps_.entries()[i];
        if (e.kind != detail::CapEntry::Kind::SENDER_HOSTED || !exports_[e.id].inUse) continue;
        --exports_[e.id].remoteRefs;
        maybeFreeExport(e.id);
      }
      ctx.resultCaps_.clear();
      if (isOpen()) {
        failAnswer(a, sent.error());
        return;
      }
    }
  }
  ctx.resultCaps_.clear();
  a.state = Answer::State::RETURNED;
  exportUnpin(std::exchange(a.pinnedExport, NONE));
  settleQueue(a);
}

// Sends a Return with `error` for an answer that has not returned, and lets calls pipelined on
// it fail the same way.
void RpcConnection::failAnswer(Answer& a, const Error& error) {
  a.error = error;
  unlinkFromTarget(a);
  if (a.queuedCall != nullptr) giveSpill(std::exchange(a.queuedCall, nullptr));
  Result<detail::OutSlot> slot = startOut(EXCEPTION_BYTES);
  if (slot) {
    wire::Return::Builder ret = slot->builder().initRoot<wire::Message>().initReturn();
    ret.setAnswerId(a.id);
    if (error.code == Errc::CANCELLED) {
      ret.setCanceled();
    } else {
      writeException(ret.initException(), error);
    }
    if (finishOut(*slot)) ++stats_.returnsSent;
  }
  a.state = Answer::State::RETURNED;
  exportUnpin(std::exchange(a.pinnedExport, NONE));
  settleQueue(a);
}

void RpcConnection::settleQueue(Answer& a) {
  if (a.inWorklist) return;
  a.inWorklist = true;
  worklist_.push_back(a.id);
  if (!workRunning_ && !inReader_ && !worklistTask_.isQueued()) loop_.post(worklistTask_);
}

// Settles answers that returned: delivers (or fails) the calls queued on them, in order, then
// frees those the caller has finished. Iterative, so a long pipeline cannot grow the stack.
void RpcConnection::runWorklist() {
  if (workRunning_) return;
  workRunning_ = true;
  for (size_t i = 0; i < worklist_.size() && isOpen(); ++i) {
    Answer& a = *answers_[worklist_[i]];
    a.inWorklist = false;
    while (Answer* q = a.queueHead) {
      a.queueHead = q->nextInQueue;
      if (a.queueHead == nullptr) a.queueTail = nullptr;
      q->nextInQueue = nullptr;
      q->waitingOn = nullptr;
      deliverQueued(*q);
      if (!isOpen()) break;
    }
    finishAnswerIfDone(a);
  }
  worklist_.clear();
  workRunning_ = false;
}

void RpcConnection::deliverQueued(Answer& q) {
  AGATE_ASSERT(q.state == Answer::State::QUEUED && q.queuedCall != nullptr,
               "answer %u delivered from a queue twice", q.id);
  detail::SpillBuffer* copy = std::exchange(q.queuedCall, nullptr);
  Result<MessageView> view = replayReader_.tryDecode(copy->bytes());
  AGATE_ASSERT(view.ok(), "a private copy of a validated call no longer decodes");
  // The copy passed the same checks when it arrived; only the target is looked up again.
  wire::Call::Reader call = view->getRoot<wire::Message>().getCall();
  wire::PromisedAnswer::Reader pa = call.getTarget().getPromisedAnswer();
  std::array<uint16_t, MAX_PIPELINE_PATH> path{};
  capnp::List<uint16_t>::Reader transform = pa.getTransform();
  for (uint32_t i = 0; i < transform.size(); ++i) path[i] = transform[i];
  Answer& target = *answers_[pa.getQuestionId()];
  Result<uint32_t> exportId = resolvePipeline(target, {path.data(), transform.size()});
  if (!exportId) {
    giveSpill(copy);
    failAnswer(q, exportId.error());
    return;
  }
  // resolvePipeline used replayReader_; decode the call again for its params.
  view = replayReader_.tryDecode(copy->bytes());
  call = view->getRoot<wire::Message>().getCall();
  deliver(q, *exportId, call, capnp::AnyStruct::Reader(call.getParams()));
  giveSpill(copy);  // params were readable during dispatch's synchronous part only
}

Result<uint32_t> RpcConnection::resolvePipeline(Answer& target, std::span<const uint16_t> path) {
  if (target.error.code != Errc::OK) return target.error;
  if (target.results == nullptr)
    return Error(Errc::FAILED, "pipelined call: the results hold no capability");
  Result<MessageView> view = replayReader_.tryDecode(target.results->bytes());
  AGATE_ASSERT(view.ok(), "a private copy of our own results does not decode");
  wire::Payload::Reader results = view->getRoot<wire::Message>().getReturn().getResults();
  Result<uint32_t> index = capIndexAtPath(capnp::AnyStruct::Reader(results), path);
  if (!index) return index.error();
  if (*index >= target.resultCount)
    return Error(Errc::FAILED, "pipelined call: capability index outside the results' table");
  if (target.resultKinds[*index] != detail::CapEntry::Kind::SENDER_HOSTED)
    return Error(Errc::UNSUPPORTED, "pipelined call on a capability this side does not host");
  return target.resultIds[*index];
}

void RpcConnection::finishAnswerIfDone(Answer& a) {
  if (a.state == Answer::State::RETURNED && a.finishReceived && a.queueHead == nullptr &&
      !a.inWorklist)
    freeAnswer(a);
}

void RpcConnection::unlinkFromTarget(Answer& a) {
  if (a.waitingOn == nullptr) return;
  Answer& t = *a.waitingOn;
  Answer* prev = nullptr;
  for (Answer* it = t.queueHead; it != nullptr; prev = it, it = it->nextInQueue) {
    if (it != &a) continue;
    (prev != nullptr ? prev->nextInQueue : t.queueHead) = a.nextInQueue;
    if (t.queueTail == &a) t.queueTail = prev;
    break;
  }
  a.waitingOn = nullptr;
  a.nextInQueue = nullptr;
}

void RpcConnection::freeAnswer(Answer& a) {
  unlinkFromTarget(a);
  a.driver.reset();  // cancels a running dispatch
  CallContext& ctx = a.context;
  if (ctx.results_.active()) abandonOut(ctx.results_);
  ctx.resultCaps_.clear();
  for (uint32_t i = 0; i < ctx.paramCapCount_; ++i) ctx.paramCaps_[i] = ReceivedCap{};
  ctx.paramCapCount_ = 0;
  ctx.paramsValid_ = false;
  if (a.queuedCall != nullptr) giveSpill(std::exchange(a.queuedCall, nullptr));
  if (a.results != nullptr) giveSpill(std::exchange(a.results, nullptr));
  exportUnpin(std::exchange(a.pinnedExport, NONE));
  for (uint32_t i = 0; i < a.paramPinCount; ++i) exportUnpin(a.paramPins[i]);
  a.paramPinCount = 0;
  for (uint32_t i = 0; i < a.resultCount; ++i) {
    if (a.resultKinds[i] == detail::CapEntry::Kind::SENDER_HOSTED) exportUnpin(a.resultIds[i]);
  }
  a.resultCount = 0;
  a.queueHead = a.queueTail = nullptr;
  a.state = Answer::State::FREE;
  a.finishReceived = false;
  a.inWorklist = false;
  a.error = Error{};
  --answersLive_;
}

Status RpcConnection::handleFinish(uint32_t answerId) {
  ++stats_.finishesReceived;
  Answer& a = *answers_[answerId];
  a.finishReceived = true;
  // Calls pipelined on the answer still need its results: it keeps running for them.
  if (a.queueHead == nullptr && a.state != Answer::State::RETURNED) {
    if (a.state == Answer::State::RUNNING) {
      a.driver.reset();  // the server sees the cancellation: its coroutine is destroyed
      if (a.context.results_.active()) abandonOut(a.context.results_);
      a.context.resultCaps_.clear();
    }
    failAnswer(a, Error(Errc::CANCELLED, "the caller cancelled the call"));
  }
  finishAnswerIfDone(a);
  return {};
}

Status RpcConnection::handleRelease(uint32_t exportId, uint32_t count) {
  ++stats_.releasesReceived;
  exports_[exportId].remoteRefs -= count;
  maybeFreeExport(exportId);
  return {};
}

Result<capnp::AnyPointer::Builder> RpcConnection::initResults(CallContext& ctx, size_t sizeHint) {
  if (ctx.results_.active()) return ctx.content_;
  Result<detail::OutSlot> slot = startOut(sizeHint + ENVELOPE_BYTES);
  if (!slot) return slot.error();
  ctx.results_ = std::move(*slot);
  ctx.return_ = ctx.results_.builder().initRoot<wire::Message>().initReturn();
  ctx.return_.setAnswerId(ctx.answerId_);
  ctx.content_ = ctx.return_.initResults().getContent();
  return ctx.content_;
}

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
  --conn->handles_;
}

bool RemoteCap::sameAs(const RemoteCap& o) const noexcept {
  if (conn_ != o.conn_ || kind_ != o.kind_ || id_ != o.id_) return false;
  if (kind_ != Kind::PIPELINE) return true;
  return pathLength_ == o.pathLength_ &&
         std::equal(path_.begin(), path_.begin() + pathLength_, o.path_.begin());
}

Request RemoteCap::newCall(uint64_t interfaceId, uint16_t methodId, size_t sizeHint) const {
  if (conn_ == nullptr) {
    Request r(nullptr, *this,
              kind_ == Kind::BROKEN ? broken_ : Error(Errc::INVALID_ARGUMENT, "null capability"));
    r.scrap_ = std::make_unique<capnp::MallocMessageBuilder>(256);
    return r;
  }
  return conn_->newCall(*this, interfaceId, methodId, sizeHint);
}

Request::Request(RpcConnection* conn, const RemoteCap& target, Error error) noexcept
    : conn_(conn), error_(error) {
  (void)target;
  if (conn_ != nullptr) ++conn_->handles_;
}

Request::Request(Request&& o) noexcept
    : conn_(std::exchange(o.conn_, nullptr)),
      error_(o.error_),
      slot_(std::move(o.slot_)),
      call_(o.call_),
      caps_(std::move(o.caps_)),
      scrap_(std::move(o.scrap_)) {}

Request::~Request() {
  if (conn_ == nullptr) return;
  if (slot_.active()) conn_->abandonOut(slot_);
  --conn_->handles_;
}

capnp::AnyPointer::Builder Request::params() {
  if (scrap_) return scrap_->getRoot<capnp::AnyPointer>();
  AGATE_REQUIRE(slot_.active(), "params() of a request already sent");
  return call_.getParams().getContent();
}

Result<uint32_t> Request::addCap(const RemoteCap& cap) {
  if (conn_ == nullptr || scrap_) return error_;
  return conn_->addCapFor(caps_, cap);
}

Result<uint32_t> Request::addCap(ServerObject& object) {
  if (conn_ == nullptr || scrap_) return error_;
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = &object;
  return caps_.tryAdd(std::move(e));
}

Result<uint32_t> Request::addCap(std::unique_ptr<ServerObject> object) {
  if (conn_ == nullptr || scrap_) return error_;
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = object.get();
  e.owned = std::move(object);
  return caps_.tryAdd(std::move(e));
}

RemotePromise Request::send() {
  if (conn_ == nullptr) {
    return RemotePromise(nullptr, 0, readyPromise<Response>(error_), error_);
  }
  AGATE_REQUIRE(slot_.active() || error_.code != Errc::OK, "send() of a request already sent");
  RemotePromise p = conn_->sendRequest(*this);
  caps_.clear();
  return p;
}

RemotePromise::RemotePromise(RemotePromise&& o) noexcept
    : conn_(std::exchange(o.conn_, nullptr)),
      questionId_(o.questionId_),
      promise_(std::move(o.promise_)),
      error_(o.error_) {}

RemotePromise::~RemotePromise() {
  // Drop the promise first: a Response still inside it releases its frame before Finish.
  { Promise<Response> dropped = std::move(promise_); }
  if (RpcConnection* conn = std::exchange(conn_, nullptr)) {
    conn->questionUnref(questionId_);
    --conn->handles_;
  }
}

RemoteCap RemotePromise::pipeline(std::span<const uint16_t> path) const {
  AGATE_REQUIRE(path.size() <= MAX_PIPELINE_PATH, "pipeline path of %zu steps (at most %u)",
                path.size(), MAX_PIPELINE_PATH);
  RemoteCap cap;
  if (conn_ == nullptr) {
    cap.kind_ = RemoteCap::Kind::BROKEN;
    cap.broken_ = error_.code != Errc::OK ? error_ : Error(Errc::INVALID_ARGUMENT, "no call");
    return cap;
  }
  cap.conn_ = conn_;
  cap.kind_ = RemoteCap::Kind::PIPELINE;
  cap.id_ = questionId_;
  cap.pathLength_ = static_cast<uint8_t>(path.size());
  std::copy(path.begin(), path.end(), cap.path_.begin());
  cap.addRef();
  return cap;
}

Response::Response(Response&& o) noexcept
    : conn_(std::exchange(o.conn_, nullptr)), slot_(o.slot_) {}

Response::~Response() {
  if (RpcConnection* conn = std::exchange(conn_, nullptr)) conn->releaseResponse(slot_);
}

capnp::AnyPointer::Reader Response::results() const {
  AGATE_REQUIRE(conn_ != nullptr, "use of a moved-from Response");
  return contentOf(slot_->payload);
}

Result<ReceivedCap> Response::getCap(uint32_t capIndex) const {
  AGATE_REQUIRE(conn_ != nullptr, "use of a moved-from Response");
  return conn_->receivedCap(slot_->caps, capIndex);
}

Result<ReceivedCap> Response::capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const {
  Result<uint32_t> index = readCapPointer(s, pointerIndex);
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
  if (capIndex >= paramCapCount_ || paramCaps_[capIndex].isNull())
    return Error(Errc::INVALID_ARGUMENT, "no capability at that index of the params");
  return paramCaps_[capIndex];
}

Result<ReceivedCap> CallContext::capAt(capnp::AnyStruct::Reader s, uint16_t pointerIndex) const {
  Result<uint32_t> index = readCapPointer(s, pointerIndex);
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
  return resultCaps_.tryAdd(std::move(e));
}

Result<uint32_t> CallContext::addResultCap(std::unique_ptr<ServerObject> object) {
  AGATE_REQUIRE(results_.active(), "addResultCap() before initResults()");
  detail::CapEntry e;
  e.kind = detail::CapEntry::Kind::SENDER_HOSTED;
  e.object = object.get();
  e.owned = std::move(object);
  return resultCaps_.tryAdd(std::move(e));
}

Result<uint32_t> CallContext::addResultCap(const RemoteCap& cap) {
  AGATE_REQUIRE(results_.active(), "addResultCap() before initResults()");
  return conn_->addCapFor(resultCaps_, cap);
}

}  // namespace agate::rpc
