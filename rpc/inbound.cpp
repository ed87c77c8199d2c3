// RpcConnection's inbound side: the reader, decode (every check, no state change), then invoke;
// Returns and the remote error text.
#include <kj/exception.h>

#include "connection_internal.h"
#include "fast_decode.h"

namespace agate::rpc {

using namespace internal;

// ---------------------------------------------------------------------------------------------
// Inbound: read, decode, invoke

Promise<void> RpcConnection::readLoop() {
  uint32_t turnBudget = options_.messagesPerTurn;
  uint32_t sinceRing = 0;
  while (isOpen()) {
    // A reader that never finds its ring empty (and has no budget) still announces what it
    // sends every RING_EVERY_MESSAGES: the before-wait ring task only runs once it lets go.
    if (++sinceRing == RING_EVERY_MESSAGES) {
      sinceRing = 0;
      ringPeer();
    }
    if (options_.messagesPerTurn != 0 && turnBudget-- == 0) {
      turnBudget = options_.messagesPerTurn - 1;
      rx_.receiver().flushReleases();  // the peer sees the space taken so far while we wait
      ringPeer();                      // and what this turn sent, before other readers' turns
      // Wait for the loop's next turn (a zero timer), not just the back of the run queue: the
      // loop polls for I/O between turns, so readers whose doorbells rang meanwhile (parked
      // peers) are queued ahead of this one.
      (void)co_await loop_.sleep(Duration::zero());
      if (!isOpen()) co_return {};
    }
    {
      // A message already in the ring is taken synchronously: only an empty ring costs the
      // awaiting (spin, then park) coroutine and its frames.
      Result<IncomingMessage> in = rx_.tryReceive();
      if (in.code() == Errc::WOULD_BLOCK) {
        ringPeer();  // the end of this reader's turn: the peer hears of what it sent now
        // The spin runs in this frame, as receiveAsync's would: waiting through it costs two
        // coroutine frames and their resumptions, on the round trip's path, for every message
        // that finds the ring empty. Only a wait that parks goes through it.
        for (uint32_t i = 0; in.code() == Errc::WOULD_BLOCK && i < options_.wait.spinIterations;
             ++i) {
          if (busyPollStep(loop_, i)) {
            co_await loop_.yield();
            if (!isOpen()) co_return {};
          }
          in = rx_.tryReceive();
        }
        if (in.code() == Errc::WOULD_BLOCK) {
          in = co_await rx_.receiveAsync(
              loop_, AsyncWaitPolicy{.spinIterations = 0, .parkSlice = options_.wait.parkSlice});
          if (!isOpen()) co_return {};
        }
      }
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
      // RpcOptions::budget: room for what this message may add, and what is owed, before it is
      // read (the frame stays in place meanwhile). Again after each wait: more may be owed by
      // then (a reply built meanwhile).
      while (options_.budget != nullptr && budgetShort(in->bytes().size())) {
        ++stats_.budgetWaits;
        rx_.receiver().flushReleases();
        Status grown = co_await options_.budget->grow(debt_ + readHeadroom(in->bytes().size()));
        bool spent = !grown;
        if (spent && isOpen()) {
          // No room for a copy of it: room for what is owed and the entries it adds is enough
          // to read it (a call it would keep waiting then fails alone: copyToQueue).
          grown = co_await options_.budget->grow(debt_ + readHeadroom(0));
        }
        if (!grown && isOpen() && debt_ != 0) grown = co_await options_.budget->grow(debt_);
        if (!isOpen()) co_return {};
        settleDebt();
        if (!grown && debt_ != 0) {
          endForQuota(grown.error());
          co_return {};
        }
        // Refused: read on with what is left, and ask again later (budgetShort). What the
        // message adds is taken if it fits; a call it would keep, or a call needing a new entry,
        // fails alone (QUOTA_EXCEEDED); anything else is owed.
        if (spent) {
          budgetRefused();
          break;
        }
        spentAt_ = NOT_SPENT;
        spentBackoff_ = Duration::zero();
      }
      Status handled = {};
      for (;;) {
        inReader_ = true;
        try {
          // Answers settled outside a reader (returned from their methods' own tasks) deliver
          // the calls queued on them before this message is read: it may be a call the peer
          // made on what one of them returned, after their Return (E-order).
          if (worklistTask_.isQueued()) runWorklist();
          handled = isOpen() ? handleMessage(*in) : Status(failure_);
          if (handled) runWorklist();
        } catch (const kj::Exception&) {
          // Every input is checked before it is acted on, so this is a bug of this side: the
          // connection ends with a clear error rather than a reader gone silent.
          workRunning_ = false;
          handled = Error(Errc::FAILED, "Cap'n Proto threw while a message was handled");
        }
        inReader_ = false;
        if (handled.code() != Errc::WOULD_BLOCK || !connecting_) break;
        // A handoff names a vat this one has no connection to yet: read nothing more until it
        // is made (the frame stays in place), then handle the same message again.
        rx_.receiver().flushReleases();
        Result<RpcConnection*> made = co_await *connecting_;
        connecting_.reset();
        if (!isOpen()) co_return {};
        // A failure is kept for the message's second handling. A connection is not: the
        // pointer may have gone stale while this reader waited to resume (its owner may free a
        // connection that closed meanwhile: a Session frees a closed one nothing refers to), so
        // the second handling asks the network again, which answers at once for a connection
        // it has open.
        if (!made) connected_.emplace_back(connectingVat_, made);
      }
      connected_.clear();
      if (!handled) {
        if (isOpen()) {
          sendAbort(handled.error());
          fail(handled.error());
        }
        co_return {};
      }
    }  // the frame is released here unless a Response took it
    if (heldSlot_ != nullptr || std::exchange(resumedCaller_, false)) {
      // Let the caller read its Response in place first; copy it out only if it keeps it. Even
      // when the Response holds no frame, the caller goes first: it usually sends its next call
      // at once, and reading on would find the ring empty and hand its frames back (a write to
      // a line the peer reads) before that call is out.
      co_await loop_.yield();
      if (heldSlot_ != nullptr) {
        relocate(std::exchange(heldSlot_, nullptr));
      }
    }
  }
  co_return {};
}

Status RpcConnection::decodeCapTable(capnp::List<wire::CapDescriptor>::Reader caps, Decoded& d) {
  if (caps.size() > CAPS_PER_MESSAGE_LIMIT)
    return Error(Errc::PROTOCOL_ERROR, "cap table longer than the protocol allows");
  if (caps.size() > options_.maxCapsPerMessage) return refuseCapTable(caps, d);
  scratchFor(d, caps.size());
  d.caps = caps;
  d.capCount = caps.size();
  DecodedCap c;
  for (uint32_t i = 0; i < d.capCount; ++i) {
    AGATE_TRY(decodeCap(caps[i], d.which, c));
    d.capKinds[i] = c.kind;
    d.capIds[i] = c.id;
    if (c.kind == detail::CapEntry::Kind::THIRD_PARTY) {
      d.capVats[i] = c.vat;
      d.capProvisions[i] = c.provision;
      ++d.thirdPartyCount;
    }
  }
  if (d.capCount > 1) AGATE_TRY(checkOneKindPerId(d));
  return {};
}

// decodeCap checks each entry against what this side holds; within one table, an id is also
// either a promise or not in every entry that names it (senderPromise, against senderHosted or
// a vine), as it must be across messages: else the entries would flip the import's kind.
Status RpcConnection::checkOneKindPerId(const Decoded& d) {
  // Every entry naming an export of the sender (isExported: an object, a promise or a vine).
  auto promise = [](detail::CapEntry::Kind k) {
    return k == detail::CapEntry::Kind::SENDER_PROMISE;
  };
  const Error mixed(Errc::PROTOCOL_ERROR, "one id named both as a promise and not in a table");
  constexpr uint32_t PAIRWISE_UP_TO = 64;  // past it, sort (the bound allows 16384 entries)
  if (d.capCount <= PAIRWISE_UP_TO) {
    for (uint32_t i = 0; i < d.capCount; ++i) {
      if (!isExported(d.capKinds[i])) continue;
      for (uint32_t j = i + 1; j < d.capCount; ++j) {
        if (isExported(d.capKinds[j]) && d.capIds[j] == d.capIds[i] &&
            promise(d.capKinds[j]) != promise(d.capKinds[i]))
          return mixed;
      }
    }
    return {};
  }
  kindScratch_.clear();  // kept: sized by the largest table seen, within the bound
  for (uint32_t i = 0; i < d.capCount; ++i) {
    if (isExported(d.capKinds[i])) kindScratch_.push_back({d.capIds[i], promise(d.capKinds[i])});
  }
  std::sort(kindScratch_.begin(), kindScratch_.end());
  for (size_t i = 1; i < kindScratch_.size(); ++i) {
    if (kindScratch_[i].first == kindScratch_[i - 1].first &&
        kindScratch_[i].second != kindScratch_[i - 1].second)
      return mixed;
  }
  return {};
}

Status RpcConnection::decodeCap(wire::CapDescriptor::Reader c, wire::Message::Which which,
                                DecodedCap& out) const {
  switch (c.which()) {
    case wire::CapDescriptor::NONE:
      out.kind = detail::CapEntry::Kind::NONE;
      return {};
    case wire::CapDescriptor::SENDER_HOSTED:
      out.kind = detail::CapEntry::Kind::SENDER_HOSTED;
      out.id = c.getSenderHosted();
      if (out.id >= options_.maxImports)
        return Error(Errc::PROTOCOL_ERROR, "export id beyond the import table's bound");
      // The sender resolves a promise (Resolve) before it sends it as a plain capability.
      if (out.id < imports_.size() && imports_[out.id].localRefs > 0 && imports_[out.id].promise)
        return Error(Errc::PROTOCOL_ERROR, "a pending promise sent again as a capability");
      return {};
    case wire::CapDescriptor::SENDER_PROMISE:
      out.kind = detail::CapEntry::Kind::SENDER_PROMISE;
      out.id = c.getSenderPromise();
      if (out.id >= options_.maxImports)
        return Error(Errc::PROTOCOL_ERROR, "export id beyond the import table's bound");
      // An export is a promise from its first reference until its Resolve: one we hold as a
      // plain (or resolved) import cannot turn into a promise.
      if (out.id < imports_.size() && imports_[out.id].localRefs > 0 && !imports_[out.id].promise)
        return Error(Errc::PROTOCOL_ERROR, "a capability we hold sent again as a promise");
      return {};
    case wire::CapDescriptor::RECEIVER_HOSTED:
      out.kind = detail::CapEntry::Kind::RECEIVER_HOSTED;
      out.id = c.getReceiverHosted();
      if (out.id >= exports_.size() || !exports_[out.id].inUse)
        return Error(Errc::PROTOCOL_ERROR, "cap table names an export that does not exist");
      return {};
    case wire::CapDescriptor::THIRD_PARTY_HOSTED: {
      wire::ThirdPartyCapDescriptor::Reader t = c.getThirdPartyHosted();
      out.kind = detail::CapEntry::Kind::THIRD_PARTY;
      out.id = t.getVineId();
      out.vat = t.getVatId();
      out.provision = t.getProvisionId();
      if (out.id >= options_.maxImports)
        return Error(Errc::PROTOCOL_ERROR, "vine id beyond the import table's bound");
      if (out.vat == NO_VAT || out.vat == options_.peerVat ||
          (options_.network != nullptr && out.vat == options_.network->vatId()))
        return Error(Errc::PROTOCOL_ERROR,
                     "third-party capability hosted by no vat, the sender or the receiver");
      return {};
    }
    case wire::CapDescriptor::RECEIVER_ANSWER: {
      if (which != wire::Message::CALL)
        return Error(Errc::PROTOCOL_ERROR, "receiverAnswer outside a call's params");
      wire::PromisedAnswer::Reader pa = c.getReceiverAnswer();
      const uint32_t q = pa.getQuestionId();
      if (q >= answers_.size() || !answers_[q] || answers_[q]->state == Answer::State::FREE ||
          answers_[q]->finishReceived)
        return Error(Errc::PROTOCOL_ERROR, "receiverAnswer names an answer that does not exist");
      if (answers_[q]->noPipelining)
        return Error(Errc::PROTOCOL_ERROR,
                     "receiverAnswer names an answer sent without promise pipelining");
      if (pa.getTransform().size() > MAX_PIPELINE_PATH)
        return Error(Errc::PROTOCOL_ERROR, "receiverAnswer path longer than allowed");
      out.kind = detail::CapEntry::Kind::RECEIVER_ANSWER;
      out.id = q;
      return {};
    }
    default:
      return Error(Errc::PROTOCOL_ERROR, "unknown cap descriptor");
  }
}

// A peer whose bound is larger than ours sent more capabilities than we take in one message. The
// entries are checked as usual (a hostile one still ends the connection); the message is refused,
// not the connection, and nothing is kept per entry.
Status RpcConnection::refuseCapTable(capnp::List<wire::CapDescriptor>::Reader caps, Decoded& d) {
  DecodedCap c;
  for (uint32_t i = 0; i < caps.size(); ++i) AGATE_TRY(decodeCap(caps[i], d.which, c));
  d.caps = caps;
  d.capCount = 0;
  d.refused = Error(Errc::MESSAGE_TOO_LARGE,
                    "the message carries more capabilities than the receiver takes in one "
                    "(its RpcOptions::maxCapsPerMessage)");
  return {};
}

// The references a refused table gave are taken as a received message's are (a vine as a
// refused handoff's), then dropped: each id's last drop sends one Release with all it counted,
// and an import we already hold just keeps them. So the sender's objects go, one Release per
// distinct id, and no table grows past what an accepted message could make it.
void RpcConnection::dropRefusedCaps(const Decoded& d) {
  // The ids were checked by refuseCapTable (each below maxImports). NONE: not a reference.
  using Kind = detail::CapEntry::Kind;
  uint32_t id = 0;
  auto imported = [&](wire::CapDescriptor::Reader entry) {
    switch (entry.which()) {
      case wire::CapDescriptor::SENDER_HOSTED:
        id = entry.getSenderHosted();
        return Kind::SENDER_HOSTED;
      case wire::CapDescriptor::SENDER_PROMISE:
        id = entry.getSenderPromise();
        return Kind::SENDER_PROMISE;
      case wire::CapDescriptor::THIRD_PARTY_HOSTED:
        id = entry.getThirdPartyHosted().getVineId();
        return Kind::THIRD_PARTY;
      default:
        return Kind::NONE;
    }
  };
  for (wire::CapDescriptor::Reader entry : d.caps) {
    const Kind kind = imported(entry);
    if (kind == Kind::NONE) continue;
    importRef(id);
    countImported(id);
    if (kind != Kind::THIRD_PARTY) noteImported(id, kind);
  }
  for (wire::CapDescriptor::Reader entry : d.caps) {
    if (imported(entry) != Kind::NONE) importUnref(id);
  }
}

// A Return to a question whose Finish went first with releaseResultCaps (handleReturn).
bool RpcConnection::resultsReleased(const Decoded& d) const noexcept {
  return d.which == wire::Message::RETURN && questions_[d.id].resultsReleased;
}

// The senderPromise entries of a table none of whose references are taken: a Resolve for each
// may still come, and is taken as for a promise released (handleResolve).
void RpcConnection::notePromisesOf(capnp::List<wire::CapDescriptor>::Reader caps) {
  for (wire::CapDescriptor::Reader entry : caps) {
    if (entry.which() == wire::CapDescriptor::SENDER_PROMISE) notePromise(entry.getSenderPromise());
  }
}

void RpcConnection::scratchFor(Decoded& d, uint32_t n) {
  detail::CapScratch& s = capScratch_;
  if (s.kinds.size() < n) {  // grows to the largest table seen, at most the bound
    s.kinds.resize(n);
    s.ids.resize(n);
    s.vats.resize(n);
    s.provisions.resize(n);
    s.hosts.resize(n);
    s.hostErrors.resize(n);
  }
  d.capKinds = s.kinds.data();
  d.capIds = s.ids.data();
  d.capVats = s.vats.data();
  d.capProvisions = s.provisions.data();
  d.capHosts = s.hosts.data();
  d.capHostErrors = s.hostErrors.data();
}

// The table checks of the common messages, shared by decode() and decodeCommon().
Status RpcConnection::checkNewQuestion(uint32_t id) const {
  if (id >= options_.maxAnswers)
    return Error(Errc::PROTOCOL_ERROR, "question id beyond the answer table's bound");
  if (id < answers_.size() && answers_[id] && answers_[id]->state != Answer::State::FREE)
    return Error(Errc::PROTOCOL_ERROR, "question id reused before Finish and Return");
  return {};
}

Status RpcConnection::checkCallTarget(const Decoded& d) const {
  if (!d.targetIsAnswer) {
    if (d.targetId >= exports_.size() || !exports_[d.targetId].inUse)
      return Error(Errc::PROTOCOL_ERROR, "call on an export id that does not exist");
    return {};
  }
  if (d.targetId >= answers_.size() || !answers_[d.targetId] ||
      answers_[d.targetId]->state == Answer::State::FREE || answers_[d.targetId]->finishReceived ||
      d.targetId == d.id)
    return Error(Errc::PROTOCOL_ERROR, "call on a promised answer that does not exist");
  if (answers_[d.targetId]->noPipelining)
    return Error(Errc::PROTOCOL_ERROR,
                 "call pipelined on an answer sent without promise pipelining");
  return {};
}

Status RpcConnection::checkReturnId(uint32_t id) const {
  if (id == 0 || id >= questions_.size() || !questions_[id].inUse || questions_[id].returned)
    return Error(Errc::PROTOCOL_ERROR, "return for a question that is not awaiting one");
  if (questions_[id].held)
    return Error(Errc::PROTOCOL_ERROR, "return for a call this side has not sent yet");
  return {};
}

// Return.noFinishNeeded only for a call sent with noPromisePipelining and results with no
// capability (capCount: the results' cap table; 0 for an exception or canceled).
Status RpcConnection::checkNoFinishNeeded(const Decoded& d) const {
  if (!d.noFinishNeeded) return {};
  if (!questions_[d.id].noPipelining)
    return Error(Errc::PROTOCOL_ERROR,
                 "return without Finish for a call sent with promise pipelining");
  if (d.capCount > 0 || d.caps.size() > 0)
    return Error(Errc::PROTOCOL_ERROR, "return without Finish carrying capabilities");
  return {};
}

Status RpcConnection::checkFinish(uint32_t id, bool releaseResultCaps) {
  if (id >= answers_.size() || !answers_[id] || answers_[id]->finishReceived)
    return Error(Errc::PROTOCOL_ERROR, "finish for an answer that does not exist");
  const Answer& a = *answers_[id];
  // A freed answer takes only the one Finish that may cross its noFinishNeeded Return.
  if (a.state == Answer::State::FREE && !a.finishMayCross)
    return Error(Errc::PROTOCOL_ERROR, "finish for an answer that does not exist");
  if (!releaseResultCaps || a.state != Answer::State::RETURNED) return {};
  // The Return is out: its references are dropped as this Finish is handled, so each export it
  // named must still have as many as the table named it (references are counted per export,
  // not per message: this is the check the counts allow). Small tables pairwise, larger ones
  // sorted (a table is at most maxCapsPerMessage long, up to 16384).
  const Error released(Errc::PROTOCOL_ERROR,
                       "finish releases result references the caller already released");
  const std::vector<Answer::ResultCap>& caps = a.resultCaps;
  constexpr size_t PAIRWISE_UP_TO = 64;
  if (caps.size() <= PAIRWISE_UP_TO) {
    for (size_t i = 0; i < caps.size(); ++i) {
      if (!isExported(caps[i].kind)) continue;
      uint32_t needed = 1;  // entry i, and those before it naming the same export
      for (size_t j = 0; j < i; ++j) needed += isExported(caps[j].kind) && caps[j].id == caps[i].id;
      if (exports_[caps[i].id].remoteRefs < needed) return released;
    }
    return {};
  }
  kindScratch_.clear();  // kept: sized by the largest table seen, within the bound
  for (const Answer::ResultCap& r : caps) {
    if (isExported(r.kind)) kindScratch_.push_back({r.id, false});
  }
  std::sort(kindScratch_.begin(), kindScratch_.end());
  for (size_t i = 0; i < kindScratch_.size();) {
    size_t end = i + 1;
    while (end < kindScratch_.size() && kindScratch_[end].first == kindScratch_[i].first) ++end;
    if (exports_[kindScratch_[i].first].remoteRefs < end - i) return released;
    i = end;
  }
  return {};
}

Status RpcConnection::checkRelease(uint32_t id, uint32_t count) const {
  if (id == 0 || id >= exports_.size() || !exports_[id].inUse)
    return Error(Errc::PROTOCOL_ERROR, "release of an export that does not exist");
  if (count == 0 || count > exports_[id].remoteRefs)
    return Error(Errc::PROTOCOL_ERROR, "release of more references than were given");
  return {};
}

// A Call, Return, Finish or Release of a common shape (fast_decode.h), read from the frame's
// words with no Cap'n Proto reader: the same fields as decode() and the same checks, in the same
// order; params or results are empty (default readers, no capability). False when the frame has
// another shape: decode() reads it. `verdict`: the checks' outcome.
bool RpcConnection::decodeCommon(std::span<const std::byte> frame, Decoded& d, Status& verdict) {
  CommonFrame f;
  if (!parseCommonFrame(frame, f)) return false;
  d.which = f.which;
  d.id = f.id;
  switch (f.which) {
    case wire::Message::CALL:
      verdict = checkNewQuestion(d.id);
      if (!verdict) return true;
      d.interfaceId = f.interfaceId;
      d.methodId = f.methodId;
      d.noPipelining = f.noPipelining;
      d.targetIsAnswer = f.targetIsAnswer;
      d.targetId = f.targetId;
      d.pathLength = f.pathLength;
      std::copy_n(f.path.begin(), f.pathLength, d.path.begin());
      verdict = checkCallTarget(d);
      return true;
    case wire::Message::RETURN:
      verdict = checkReturnId(d.id);
      if (!verdict) return true;
      d.returnKind = f.returnKind;
      d.noFinishNeeded = f.noFinishNeeded;
      verdict = checkNoFinishNeeded(d);
      return true;
    case wire::Message::FINISH:
      d.releaseResultCaps = f.releaseResultCaps;
      verdict = checkFinish(d.id, d.releaseResultCaps);
      return true;
    case wire::Message::RELEASE:
      d.count = f.count;
      verdict = checkRelease(d.id, d.count);
      return true;
    default:
      return false;  // parseCommonFrame takes no other kind
  }
}

// Reads every field handleMessage uses and checks it against the tables. No state changes.
Status RpcConnection::decode(wire::Message::Reader m, Decoded& d) {
  d.which = m.which();
  switch (d.which) {
    case wire::Message::CALL: {
      wire::Call::Reader call = m.getCall();
      d.id = call.getQuestionId();
      AGATE_TRY(checkNewQuestion(d.id));
      d.interfaceId = call.getInterfaceId();
      d.methodId = call.getMethodId();
      d.noPipelining = call.getNoPromisePipelining();
      wire::MessageTarget::Reader target = call.getTarget();
      switch (target.which()) {
        case wire::MessageTarget::IMPORTED_CAP:
          d.targetIsAnswer = false;
          d.targetId = target.getImportedCap();
          AGATE_TRY(checkCallTarget(d));
          break;
        case wire::MessageTarget::PROMISED_ANSWER: {
          wire::PromisedAnswer::Reader pa = target.getPromisedAnswer();
          d.targetIsAnswer = true;
          d.targetId = pa.getQuestionId();
          AGATE_TRY(checkCallTarget(d));
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
      AGATE_TRY(checkReturnId(d.id));
      d.returnKind = r.which();
      d.noFinishNeeded = r.getNoFinishNeeded();
      switch (d.returnKind) {
        case wire::Return::RESULTS: {
          wire::Payload::Reader results = r.getResults();
          d.payload = capnp::AnyStruct::Reader(results);
          AGATE_TRY(decodeCapTable(results.getCapTable(), d));
          AGATE_TRY(checkNoFinishNeeded(d));
          if (d.refused.code != Errc::OK) d.returnKind = wire::Return::EXCEPTION;  // (Decoded)
          return {};
        }
        case wire::Return::EXCEPTION:
          d.exception = r.getException();
          (void)d.exception.getReason();  // read inside the boundary: a malformed Text throws
          return checkNoFinishNeeded(d);
        case wire::Return::CANCELED:
          return checkNoFinishNeeded(d);
        default:
          return Error(Errc::PROTOCOL_ERROR, "unknown return kind");
      }
    }
    case wire::Message::FINISH: {
      wire::Finish::Reader f = m.getFinish();
      d.id = f.getQuestionId();
      d.releaseResultCaps = f.getReleaseResultCaps();
      return checkFinish(d.id, d.releaseResultCaps);
    }
    case wire::Message::RELEASE: {
      wire::Release::Reader r = m.getRelease();
      d.id = r.getId();
      d.count = r.getReferenceCount();
      return checkRelease(d.id, d.count);
    }
    case wire::Message::ABORT:
      d.exception = m.getAbort();
      (void)d.exception.getReason();
      return {};
    case wire::Message::RESOLVE:
      return decodeResolve(m.getResolve(), d);
    case wire::Message::DISEMBARGO:
      return decodeDisembargo(m.getDisembargo(), d);
    case wire::Message::PROVIDE: {
      if (options_.network == nullptr)
        return Error(Errc::PROTOCOL_ERROR, "provide on a connection without a vat network");
      wire::Provide::Reader pr = m.getProvide();
      d.id = pr.getQuestionId();
      if (d.id >= options_.maxAnswers)
        return Error(Errc::PROTOCOL_ERROR, "question id beyond the answer table's bound");
      if (d.id < answers_.size() && answers_[d.id] && answers_[d.id]->state != Answer::State::FREE)
        return Error(Errc::PROTOCOL_ERROR, "question id reused before Finish and Return");
      d.vat = pr.getRecipient();
      d.provisionId = pr.getProvisionId();
      if (d.vat == NO_VAT || d.vat == options_.peerVat || d.vat == options_.network->vatId())
        return Error(Errc::PROTOCOL_ERROR, "provide for no vat, the introducer or the provider");
      const detail::HandoffTable& table = options_.network->handoffs();
      auto highest = table.highestProvision.find(options_.peerVat);
      if (highest != table.highestProvision.end() && d.provisionId <= highest->second)
        return Error(Errc::PROTOCOL_ERROR, "provision id not above the last one (a replay)");
      wire::MessageTarget::Reader target = pr.getTarget();
      switch (target.which()) {
        case wire::MessageTarget::IMPORTED_CAP:
          d.targetIsAnswer = false;
          d.targetId = target.getImportedCap();
          if (d.targetId >= exports_.size() || !exports_[d.targetId].inUse)
            return Error(Errc::PROTOCOL_ERROR, "provide of an export id that does not exist");
          // Export 0 stays in use on a connection without a bootstrap object: nothing to keep.
          if (exports_[d.targetId].object == nullptr)
            return Error(Errc::PROTOCOL_ERROR,
                         "provide of a bootstrap object this side does not have");
          return {};
        case wire::MessageTarget::PROMISED_ANSWER:
          d.targetIsAnswer = true;
          d.targetId = target.getPromisedAnswer().getQuestionId();
          if (d.targetId >= answers_.size() || !answers_[d.targetId] ||
              answers_[d.targetId]->state == Answer::State::FREE ||
              answers_[d.targetId]->finishReceived || d.targetId == d.id)
            return Error(Errc::PROTOCOL_ERROR, "provide of a promised answer that does not exist");
          if (answers_[d.targetId]->noPipelining)
            return Error(Errc::PROTOCOL_ERROR,
                         "provide on an answer sent without promise pipelining");
          return {};
        default:
          return Error(Errc::PROTOCOL_ERROR, "unknown provide target");
      }
    }
    case wire::Message::ACCEPT: {
      if (options_.network == nullptr)
        return Error(Errc::PROTOCOL_ERROR, "accept on a connection without a vat network");
      wire::Accept::Reader ac = m.getAccept();
      d.id = ac.getQuestionId();
      if (d.id >= options_.maxAnswers)
        return Error(Errc::PROTOCOL_ERROR, "question id beyond the answer table's bound");
      if (d.id < answers_.size() && answers_[d.id] && answers_[d.id]->state != Answer::State::FREE)
        return Error(Errc::PROTOCOL_ERROR, "question id reused before Finish and Return");
      d.vat = ac.getIntroducer();
      d.provisionId = ac.getProvisionId();
      d.embargo = ac.getEmbargo();
      if (d.vat == NO_VAT || d.vat == options_.peerVat || d.vat == options_.network->vatId())
        return Error(Errc::PROTOCOL_ERROR, "accept naming no introducer, itself or the provider");
      return {};
    }
  }
  return Error(Errc::PROTOCOL_ERROR, "unknown message kind");
}

Status RpcConnection::handleMessage(IncomingMessage& message) {
  Decoded d;
  Status decoded = {};
  // The common shapes are read from the words (each read checked against the frame's end), so
  // only the others pay for validation (MessageReceiverOptions::validateOnDemand).
  if (!decodeCommon(message.bytes(), d, decoded)) {
    AGATE_TRY(message.validate());
    Status read = message.tryRead<wire::Message>([&](wire::Message::Reader m) {
      decoded = decode(m, d);
      // Read here too, inside the reader's boundary: the table is walked again.
      if (decoded && d.refused.code != Errc::OK) {
        ++stats_.messagesRefused;
        if (resultsReleased(d)) {
          notePromisesOf(d.caps);  // the callee drops the references (Finish.releaseResultCaps)
        } else {
          dropRefusedCaps(d);
        }
      }
    });
    if (!read) return read;
  }
  if (!decoded) return decoded;
  // WOULD_BLOCK: the reader waits. Not for results nothing here takes.
  if (d.thirdPartyCount > 0 && !resultsReleased(d)) AGATE_TRY(resolveHosts(d));
  switch (d.which) {
    case wire::Message::CALL:
      return handleCall(message, d);
    case wire::Message::RETURN:
      return handleReturn(message, d);
    case wire::Message::PROVIDE:
      return handleProvide(d);
    case wire::Message::ACCEPT:
      return handleAccept(d);
    case wire::Message::FINISH:
      return handleFinish(d.id, d.releaseResultCaps);
    case wire::Message::RELEASE:
      return handleRelease(d.id, d.count);
    case wire::Message::RESOLVE:
      return handleResolve(d);
    case wire::Message::DISEMBARGO:
      return handleDisembargo(d);
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

const char* RpcConnection::copyRemoteReason(const char* text) {
  if (text == nullptr) text = "";
  return copyRemoteReason(text, strnlen(text, REMOTE_REASON_BYTES - 1));
}

const char* RpcConnection::copyRemoteReason(capnp::Text::Reader reason) {
  return copyRemoteReason(reason.begin(), reason.size());
}

const char* RpcConnection::copyRemoteReason(const char* text, size_t size) {
  std::array<char, REMOTE_REASON_BYTES>& slot = reasons_[nextReason_];
  nextReason_ = (nextReason_ + 1) % REMOTE_REASON_SLOTS;
  const size_t n = std::min(size, REMOTE_REASON_BYTES - 1);
  std::memcpy(slot.data(), text, n);
  slot[n] = '\0';
  return slot.data();
}

Error RpcConnection::remoteError(wire::Exception::Reader e) {
  return Error(errcFromWire(e.getErrc()), copyRemoteReason(e.getReason()));
}

Status RpcConnection::handleReturn(IncomingMessage& message, const Decoded& d) {
  ++stats_.returnsReceived;
  Question& q = questions_[d.id];
  q.returned = true;
  returnReplySpace(q);
  if (!held_.empty() && !heldTask_.isQueued()) loop_.post(heldTask_);  // space for held calls
  if (d.refused.code != Errc::OK) q.refused = d.refused;               // openQuestion cleared it
  if (d.noFinishNeeded) q.finishSent = true;  // none will be: the callee freed its answer
  if (!watchers_.empty()) takeWatchers(d);    // promises passed on that wait for this question
  const bool wanted = q.fulfiller.has_value() && !q.fulfiller->isCancelled();
  switch (d.returnKind) {
    case wire::Return::RESULTS: {
      if (q.resultsReleased) {
        // Our Finish, sent before this Return, released its references
        // (Finish.releaseResultCaps): nothing is taken, no Release follows, no handoff is
        // accepted. A promise is noted, for the Resolve that may cross that Finish.
        for (uint32_t i = 0; i < d.capCount; ++i) {
          if (d.capKinds[i] == detail::CapEntry::Kind::SENDER_PROMISE) notePromise(d.capIds[i]);
        }
        break;
      }
      // Every senderHosted entry is one more reference the peer gave us; the Response holds one
      // local reference per entry until it is dropped. Every receiverHosted entry (one of our
      // exports, passed back) is pinned now, until the Response is dropped: the peer may
      // release its own reference right behind the Return, and the Response must still name
      // the object the peer meant (not a freed export, nor another object under a reused id).
      for (uint32_t i = 0; i < d.capCount; ++i) {
        if (d.capKinds[i] == detail::CapEntry::Kind::RECEIVER_HOSTED) {
          ++exports_[d.capIds[i]].pins;  // live: checked at decode
          continue;
        }
        if (!isImported(d.capKinds[i])) continue;
        importRef(d.capIds[i]);
        countImported(d.capIds[i]);
        noteImported(d.capIds[i], d.capKinds[i]);
      }
      detail::ResponseSlot* slot = responseFree_;
      if (slot != nullptr) {
        responseFree_ = slot->nextFree;
      } else {
        responseStore_.push_back(std::make_unique<detail::ResponseSlot>(rx_.limits()));
        slot = responseStore_.back().get();
        charge(sizeof(detail::ResponseSlot));
      }
      if (d.thirdPartyCount > 0) slot->handedOff.resize(d.capCount);
      for (uint32_t i = 0; d.thirdPartyCount > 0 && i < d.capCount; ++i) {
        if (d.capKinds[i] != detail::CapEntry::Kind::THIRD_PARTY) continue;
        // Calls pipelined on this question reached the introducer, which forwards those on this
        // capability to the host through the vine: calls made on it after this Return must go
        // behind them, so the Accept is embargoed until a Disembargo sent through the vine,
        // behind them, reaches the host.
        slot->handedOff[i] = acceptThirdParty(d, i, /*embargo=*/q.pipelinedOn);
        const RemoteCap& taken = slot->handedOff[i];
        if (q.pipelinedOn && taken.conn_ != this && taken.kind_ != RemoteCap::Kind::BROKEN) {
          sendDisembargo(d.capIds[i], NONE);
          ++stats_.returnHandoffsEmbargoed;
        }
      }
      // Empty results (no content, no capability: a null call's) need nothing of the frame:
      // the Response reads as empty without it, so the reader need not wait for the caller.
      const bool empty = d.capCount == 0 && contentOf(d.payload).isNull();
      slot->payload = empty ? capnp::AnyStruct::Reader() : d.payload;
      slot->caps = d.caps;
      ++handles_;
      Response response(this, slot);
      if (wanted) {
        if (!empty) {
          slot->inPlace.emplace(std::move(message));
          heldSlot_ = slot;
        }
        resumedCaller_ = true;
        q.fulfiller->fulfill(std::move(response));
      }
      // Not wanted: the Response is dropped at the end of this scope, releasing its caps.
      break;
    }
    case wire::Return::EXCEPTION:
      if (wanted)
        q.fulfiller->fulfill(d.refused.code != Errc::OK ? d.refused : remoteError(d.exception));
      break;
    default:
      if (wanted) q.fulfiller->fulfill(Error(Errc::CANCELLED, "the call was cancelled"));
      break;
  }
  q.fulfiller.reset();
  q.vine.reset();  // an Accept returned: the introducer may reclaim its side of the handoff
  // Free again once Finish was sent too; with noFinishNeeded at once, with no Finish (a
  // RemotePromise still held sees the question's generation change and leaves it alone; a
  // Finish already sent, crossing this Return, is ignored by the callee).
  if (q.refs == 0 || d.noFinishNeeded) freeQuestion(d.id);
  if (!settling_.empty()) settleWatched();
  return {};
}

}  // namespace agate::rpc
