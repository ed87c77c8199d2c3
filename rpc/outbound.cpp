// RpcConnection's outbound side: messages built in ring frames or pooled spill buffers, the
// in-order queue and the pump that drains it while the ring is full.
#include "connection_internal.h"

namespace agate::rpc {

using namespace internal;

namespace detail {

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

// The largest table of either kind fits the largest spill buffer.
static_assert(size_t{CAPS_PER_MESSAGE_LIMIT} * sizeof(CapEntry) <= MAX_SPILL_BYTES);
static_assert(size_t{CAPS_PER_MESSAGE_LIMIT} * sizeof(ReceivedCap) <= MAX_SPILL_BYTES);

TableBlock takeTableBlock(RpcConnection& pool, size_t bytes) {
  AGATE_REQUIRE(bytes <= MAX_SPILL_BYTES, "a table of %zu bytes", bytes);
  SpillBuffer* b = pool.takeSpill(bytes);
  return {b, b->words.get(), size_t{1} << (b->sizeClass + MIN_CLASS_SHIFT)};
}

void giveTableBlock(RpcConnection& pool, SpillBuffer* buffer, size_t dirtyBytes) noexcept {
  buffer->dirtyBytes = dirtyBytes;  // zeroed again for whoever takes it next
  pool.giveSpill(buffer);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Outbound: ring frames, spill buffers, the queue and the pump

detail::SpillBuffer* RpcConnection::takeSpill(size_t bytes, bool refusable) {
  const uint32_t k = sizeClassFor(bytes);
  AGATE_REQUIRE(k < spillFree_.size(), "spill of %zu bytes", bytes);
  if (detail::SpillBuffer* b = spillFree_[k]) {
    spillFree_[k] = b->next;
    b->next = nullptr;
    return b;
  }
  const size_t cost = (size_t{1} << (k + MIN_CLASS_SHIFT)) + sizeof(detail::SpillBuffer);
  if (refusable) {
    if (!tryCharge(cost)) return nullptr;
  } else {
    charge(cost);
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

Status RpcConnection::admitToQueue(OutKind kind, size_t bytes) {
  if (kind == OutKind::CONTROL || queuedBytes_ + bytes <= options_.maxQueuedBytes) return {};
  if (kind == OutKind::CALL)
    return Error(Errc::OUT_OF_MEMORY,
                 "the peer is not reading: RpcOptions::maxQueuedBytes of messages wait for it");
  Error e(Errc::OUT_OF_MEMORY,
          "the peer does not read what it asks for: RpcOptions::maxQueuedBytes of replies wait");
  fail(e);
  return e;
}

Result<detail::OutSlot> RpcConnection::startOut(size_t bytes, OutKind kind) {
  if (!isOpen()) return failure_;
  bytes = std::min(roundToWords(bytes), roundToWords(options_.maxMessageBytes));
  detail::OutSlot slot;
  if (kind != OutKind::PRIVATE_REPLY && !ringOpen_ && !pumpRunning_ && queueHead_ == nullptr) {
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
  // A private reply is not in the queue while it is built; it is admitted when it is sent
  // (completeAnswer), by the bytes it then holds.
  if (kind != OutKind::PRIVATE_REPLY) AGATE_TRY(admitToQueue(kind, bytes));
  detail::SpillBuffer* b = takeSpill(bytes);
  b->builder.emplace(std::span<capnp::word>(b->words.get(), bytes / WORD_BYTES));
  slot.spill_ = b;
  if (kind != OutKind::PRIVATE_REPLY) ++stats_.spilledMessages;
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

// Appends a finished message to the in-order queue, behind what is already waiting there.
void RpcConnection::enqueue(detail::SpillBuffer* b) {
  queuedBytes_ += b->usedBytes;
  if (queueTail_ != nullptr) {
    queueTail_->next = b;
  } else {
    queueHead_ = b;
  }
  queueTail_ = b;
  afterRingClosed();
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
  if (slot.ring_ && queueHead_ == nullptr) {
    Status sent = slot.ring_->sendWithoutRing();
    slot.ring_.reset();
    ringOpen_ = false;
    if (sent) {
      ++stats_.messagesSent;
      published();
    }
    return sent;
  }
  Result<detail::SpillBuffer*> b = finishToSpill(slot);
  if (!b) return b.error();
  enqueue(*b);
  return {};
}

// finishToSpill for a message to be held (RpcOptions::whenReplySpaceIsFull): what queued up
// behind its ring frame, if it had one, goes now. The connection may have failed meanwhile.
Result<detail::SpillBuffer*> RpcConnection::finishToHold(detail::OutSlot& slot) {
  const bool fromRing = slot.ring_.has_value();
  Result<detail::SpillBuffer*> b = finishToSpill(slot);
  if (fromRing) afterRingClosed();
  return b;
}

// Finishes the message of `slot` into a spill buffer, not yet queued: one built in the ring is
// copied out (frames are position-independent) and its frame given back (the caller then sends
// what queued up behind the frame: afterRingClosed). Used when it must go behind messages
// queued (or held) while it was built.
Result<detail::SpillBuffer*> RpcConnection::finishToSpill(detail::OutSlot& slot) {
  detail::SpillBuffer* b = nullptr;
  if (slot.ring_) {
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
  return b;
}

void RpcConnection::flushQueue() {
  if (pumpRunning_ || ringOpen_ || !isOpen()) return;
  while (queueHead_ != nullptr) {
    detail::SpillBuffer* b = queueHead_;
    Result<std::span<std::byte>> frame = tx_.sender().tryReserve(b->usedBytes);
    if (frame.code() == Errc::WOULD_BLOCK) {
      ringPeer();  // a full ring is always announced: the peer must drain it for us to go on
      pumpRunning_ = true;
      pump_.emplace(pumpWhileFull());
      return;
    }
    if (!frame) {
      fail(frame.error());
      return;
    }
    std::memcpy(frame->data(), b->words.get(), b->usedBytes);
    commitOut(b->usedBytes);
    ++stats_.messagesSent;
    queueHead_ = b->next;
    if (queueHead_ == nullptr) queueTail_ = nullptr;
    queuedBytes_ -= b->usedBytes;
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
      ringPeer();
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
    commitOut(b->usedBytes);
    ++stats_.messagesSent;
    queueHead_ = b->next;
    if (queueHead_ == nullptr) queueTail_ = nullptr;
    queuedBytes_ -= b->usedBytes;
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
  // At most MAX_REASON_ON_WIRE bytes; a Text::Reader must end in a NUL, so a longer reason is
  // cut in a copy (a reader over the first bytes of the original would not be terminated).
  std::array<char, MAX_REASON_ON_WIRE + 1> cut;
  const size_t n = strnlen(text, MAX_REASON_ON_WIRE);
  std::memcpy(cut.data(), text, n);
  cut[n] = '\0';
  b.setReason(capnp::Text::Reader(cut.data(), n));
}

// Sends a message given as its words (a Finish or a Release, laid out by controlWords), with no
// MessageBuilder: straight into the ring when nothing is open or queued, else behind the queue,
// as finishOut would.
Status RpcConnection::sendWords(std::span<const uint64_t> words, OutKind kind) {
  if (!isOpen()) return failure_;
  const size_t bytes = words.size_bytes();
  if (bytes > roundToWords(options_.maxMessageBytes))
    return Error(Errc::MESSAGE_TOO_LARGE, "message larger than RpcOptions::maxMessageBytes");
  if (!ringOpen_ && !pumpRunning_ && queueHead_ == nullptr) {
    Result<std::span<std::byte>> frame = tx_.sender().tryReserve(bytes);
    if (frame) {
      std::memcpy(frame->data(), words.data(), bytes);
      commitOut(bytes);
      ++stats_.messagesSent;
      return {};
    }
    if (frame.code() != Errc::WOULD_BLOCK) {
      if (frame.code() != Errc::MESSAGE_TOO_LARGE) fail(frame.error());
      return frame.error();
    }
  }
  AGATE_TRY(admitToQueue(kind, bytes));
  enqueue(spillWords(words));
  return {};
}

detail::SpillBuffer* RpcConnection::spillWords(std::span<const uint64_t> words) {
  detail::SpillBuffer* b = takeSpill(words.size_bytes());
  std::memcpy(static_cast<void*>(b->words.get()), words.data(), words.size_bytes());
  b->usedBytes = b->dirtyBytes = words.size_bytes();
  ++stats_.spilledMessages;
  return b;
}

void RpcConnection::commitOut(size_t bytes) {
  tx_.sender().commitWithoutRing(bytes);
  published();
}

void RpcConnection::published() {
  if (!tx_.sender().ringIsPending()) return;  // a PRIVATE ring has no doorbell to owe
  if (!loop_.inTurn()) {
    ringPeer();  // sent from outside the loop: no turn will follow to ring for it
    return;
  }
  if (!ringTask_.isQueued()) loop_.postBeforeWait(ringTask_);
}

void RpcConnection::ringPeer() {
  if (tx_.sender().ringPending()) ++stats_.doorbellRings;
}

bool RpcConnection::sendFinish(uint32_t questionId, bool releaseResultCaps) {
  const std::array<uint64_t, CONTROL_WORDS> words = controlWords(
      wire::Message::FINISH, questionId | uint64_t{releaseResultCaps} << RELEASE_RESULT_CAPS_BIT);
  if (!sendWords(words, OutKind::CONTROL)) return false;  // on a dead connection nothing is sent
  ++stats_.finishesSent;
  if (releaseResultCaps) ++stats_.finishesReleasingResults;
  return true;
}

void RpcConnection::sendRelease(uint32_t importId, uint32_t count) {
  const std::array<uint64_t, CONTROL_WORDS> words =
      controlWords(wire::Message::RELEASE, importId | uint64_t{count} << 32);
  if (sendWords(words, OutKind::CONTROL)) ++stats_.releasesSent;
}

void RpcConnection::sendAbort(const Error& reason) {
  Result<detail::OutSlot> slot = startOut(EXCEPTION_BYTES, OutKind::CONTROL);
  if (!slot) return;
  writeException(slot->builder().initRoot<wire::Message>().initAbort(), reason);
  (void)finishOut(*slot);
}

Result<uint32_t> RpcConnection::addEntry(detail::CapTable& table, detail::CapEntry entry) {
  if (tableFull(table))
    return Error(Errc::OUT_OF_MEMORY,
                 "more capabilities than one message carries (RpcOptions::maxCapsPerMessage)");
  table.reserve(*this, table.size() + 1, options_.maxCapsPerMessage);
  table.emplaceBack(std::move(entry));
  return table.size() - 1;
}

// A spill buffer of `bytes` (a multiple of 8) holding a copy of the `used` bytes of a message
// and a builder resumed after them. Frames are position-independent: the words written so far
// are the message, and the resumed builder carries on where the first one stopped.
detail::SpillBuffer* RpcConnection::resumeInSpill(const capnp::word* words, size_t used,
                                                  size_t bytes) {
  detail::SpillBuffer* b = takeSpill(bytes);
  std::memcpy(static_cast<void*>(b->words.get()), words, used);
  b->builder.emplace(std::span<capnp::word>(b->words.get(), bytes / WORD_BYTES), used / WORD_BYTES);
  return b;
}

Status RpcConnection::roomForCapTable(detail::OutSlot& slot, const detail::CapTable& caps,
                                      OutKind kind) {
  FrameBuilder& from =
      slot.ring_ ? static_cast<FrameBuilder&>(slot.ring_->builder()) : *slot.spill_->builder;
  if (from.overflowed()) return {};  // the content alone outgrew it: refused when finished
  const size_t used = from.usedBytes();
  const size_t bytes = roundToWords(used + capTableBytes(caps));
  if (bytes <= from.frame().size_bytes()) return {};
  if (bytes > roundToWords(options_.maxMessageBytes))
    return Error(Errc::MESSAGE_TOO_LARGE,
                 "message with its cap table larger than RpcOptions::maxMessageBytes");
  // Moved out of its frame, it goes through the queue: it must fit a ring frame too.
  if (bytes > tx_.sender().maxPayload())
    return Error(Errc::MESSAGE_TOO_LARGE,
                 "message with its cap table larger than a frame of the outbound ring");
  if (kind == OutKind::CALL) AGATE_TRY(admitToQueue(kind, bytes));
  detail::SpillBuffer* b = resumeInSpill(from.frame().data(), used, bytes);
  abandonOut(slot);
  slot.spill_ = b;
  if (kind != OutKind::PRIVATE_REPLY) ++stats_.spilledMessages;
  return {};
}

// Takes back the remote references writeCapTable added for a message that was not sent (the
// entries it reached have their export id filled in).
void RpcConnection::rollBackExports(detail::CapTable& caps) noexcept {
  for (uint32_t i = 0; i < caps.size(); ++i) {
    const detail::CapEntry& e = caps[i];
    if (!isExported(e.kind) || e.id == 0 || e.id >= exports_.size() || !exports_[e.id].inUse ||
        exports_[e.id].remoteRefs == 0)
      continue;
    --exports_[e.id].remoteRefs;
    maybeFreeExport(e.id);
  }
}

// Whether writeCapTable could write `caps` later (a call held with its capabilities): a pending
// promise of another connection cannot be passed on, now or once the call goes.
Status RpcConnection::passable(const detail::CapTable& caps) const {
  for (uint32_t i = 0; i < caps.size(); ++i) {
    const detail::CapEntry& e = caps[i];
    if (e.kind != detail::CapEntry::Kind::SENDER_HOSTED || e.object == nullptr) continue;
    const detail::PromiseNode* node = detail::PromiseNode::pendingOne(*e.object);
    if (node != nullptr && node->conn_ != this)
      return Error(Errc::INVALID_ARGUMENT,
                   "a pending promise of another connection cannot be passed on");
  }
  return {};
}

// Writes an outbound cap table, exporting objects as needed (one more remote reference each).
// Each SENDER_HOSTED entry's id is filled in, so a failed send can be rolled back.
Status RpcConnection::writeCapTable(capnp::List<wire::CapDescriptor>::Builder out,
                                    detail::CapTable& caps) {
  for (uint32_t i = 0; i < caps.size(); ++i) {
    detail::CapEntry& e = caps[i];
    // A promise of ours passed back to us and passed on as an object (ReceivedCap::local) is
    // still a promise while pending: its calls must queue at its export, not reach the node.
    detail::PromiseNode* pendingNode =
        e.kind == detail::CapEntry::Kind::SENDER_HOSTED && e.object != nullptr
            ? detail::PromiseNode::pendingOne(*e.object)
            : nullptr;
    if (pendingNode != nullptr) {
      if (pendingNode->conn_ != this)
        return Error(Errc::INVALID_ARGUMENT,
                     "a pending promise of another connection cannot be passed on");
      e.kind = detail::CapEntry::Kind::SENDER_PROMISE;
    }
    switch (e.kind) {
      case detail::CapEntry::Kind::NONE:
        out[i].setNone();
        break;
      case detail::CapEntry::Kind::RECEIVER_HOSTED:
        out[i].setReceiverHosted(e.id);
        break;
      case detail::CapEntry::Kind::RECEIVER_ANSWER: {
        wire::PromisedAnswer::Builder pa = out[i].initReceiverAnswer();
        pa.setQuestionId(e.held.id_);
        capnp::List<uint16_t>::Builder t = pa.initTransform(e.held.pathLength_);
        for (uint32_t s = 0; s < e.held.pathLength_; ++s) t.set(s, e.held.path_[s]);
        break;
      }
      case detail::CapEntry::Kind::SENDER_HOSTED: {
        Result<uint32_t> id = exportObject(e.object, std::move(e.owned), std::move(e.shared));
        if (!id) return id.error();
        e.id = *id;
        ++exports_[e.id].remoteRefs;
        // A promise of ours passed back and settled since, its Resolve still to go.
        if (exports_[e.id].resolvePending) {
          out[i].setSenderPromise(e.id);
        } else {
          out[i].setSenderHosted(e.id);
        }
        break;
      }
      case detail::CapEntry::Kind::SENDER_PROMISE: {
        // A settled promise goes as a plain export: its object forwards to the resolution.
        auto* node = static_cast<detail::PromiseNode*>(e.object);
        Result<uint32_t> id = exportObject(e.object, nullptr, std::move(e.shared));
        if (!id) return id.error();
        e.id = *id;
        ++exports_[e.id].remoteRefs;
        if (node->pending() || exports_[e.id].resolvePending) {
          exports_[e.id].promise = true;
          exports_[e.id].resolvePending = true;
          out[i].setSenderPromise(e.id);
        } else {
          out[i].setSenderHosted(e.id);
        }
        break;
      }
      case detail::CapEntry::Kind::FOREIGN:
        AGATE_ASSERT(false, "cap table entry %u written before settleForeignCaps", i);
        break;
      case detail::CapEntry::Kind::THIRD_PARTY: {
        // The vine is exported like any object of ours; the receiver holds one reference.
        Result<uint32_t> id = exportObject(e.object, std::move(e.owned));
        if (!id) return id.error();
        e.id = *id;
        ++exports_[e.id].remoteRefs;
        wire::ThirdPartyCapDescriptor::Builder t = out[i].initThirdPartyHosted();
        t.setVatId(e.vat);
        t.setProvisionId(e.provisionId);
        t.setVineId(e.id);
        break;
      }
    }
  }
  return {};
}

}  // namespace agate::rpc
