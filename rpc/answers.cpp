// RpcConnection's server side: calls delivered to exported objects, their Returns, calls
// pipelined on answers (queued, settled in order by an iterative worklist), Finish and Release.
#include <kj/exception.h>

#include "connection_internal.h"

namespace agate::rpc {

using namespace internal;

// ---------------------------------------------------------------------------------------------
// Server side: answers

// The (free) entry for a new answer `id`: a Call, Provide or Accept naming it.
RpcConnection::Answer& RpcConnection::answerAt(uint32_t id, bool* paid) {
  size_t slots = 0;  // bytes of table slots added
  if (id >= answers_.size()) {
    const size_t before = answers_.capacity();
    answers_.resize(id + 1);
    slots = (answers_.capacity() - before) * sizeof(answers_[0]);
  }
  if (!answers_[id]) {
    answers_[id] = std::make_unique<Answer>(id);
    answers_[id]->unpaid = true;
  }
  Answer& entry = *answers_[id];
  if (paid == nullptr) {  // owed if it cannot be paid now
    charge(slots);
  } else {
    (void)tryCharge(slots);  // else kept unpaid: pointers, bounded by maxAnswers
  }
  if (entry.unpaid) {
    // A new entry, or one a refused call left unpaid: paid before it serves a call.
    if (paid == nullptr) {
      charge(sizeof(Answer));
    } else if (!tryCharge(sizeof(Answer))) {
      *paid = false;  // the call is refused; the entry is kept until the caller finishes it
    }
    if (paid == nullptr || *paid) entry.unpaid = false;
  }
  Answer& a = *answers_[id];
  // A Finish crossing the id's last (noFinishNeeded) Return would have arrived before this
  // message: the caller reuses an id only after reading that Return.
  a.finishMayCross = false;
  a.driver.reset();  // finished: kept since the answer was freed from inside it
  return a;
}

Status RpcConnection::handleCall(IncomingMessage& message, const Decoded& d) {
  ++stats_.callsReceived;
  bool paid = true;
  Answer& a = answerAt(d.id, &paid);
  a.arrival = ++callsArrived_;
  a.state = Answer::State::QUEUED;
  a.finishReceived = false;
  a.noPipelining = d.noPipelining;
  a.error.clear();
  ++answersLive_;
  CallContext& ctx = a.context;
  ctx.conn_ = this;
  ctx.answerId_ = d.id;
  if (d.refused.code != Errc::OK) {  // its capabilities were dropped as it was read
    failAnswer(a, d.refused);
    return {};
  }
  if (!paid) {  // nothing of it is taken: its capabilities are released as they came
    // (the import slots that takes are kept unpaid, bounded by maxImports: releasing must not
    // end the connection)
    refusingForQuota_ = true;
    dropRefusedCaps(d);
    refusingForQuota_ = false;
    ++stats_.callsRefusedQuota;
    failAnswer(a, Error(Errc::QUOTA_EXCEEDED,
                        "the caller's quota cannot pay for one more call in progress at the "
                        "callee (RpcOptions::budget)"));
    return {};
  }
  ctx.paramCaps_.reserve(*this, d.capCount);  // past the inline entries: a pooled block
  for (uint32_t i = 0; i < d.capCount; ++i) {
    ReceivedCap& cap = ctx.paramCaps_.emplaceBack();
    switch (d.capKinds[i]) {
      case detail::CapEntry::Kind::SENDER_HOSTED:
      case detail::CapEntry::Kind::SENDER_PROMISE:
        cap.remote.conn_ = this;
        cap.remote.kind_ = RemoteCap::Kind::IMPORT;
        cap.remote.id_ = d.capIds[i];
        cap.remote.addRef();
        countImported(d.capIds[i]);
        noteImported(d.capIds[i], d.capKinds[i]);
        break;
      case detail::CapEntry::Kind::RECEIVER_HOSTED:
        cap.local = exports_[d.capIds[i]].object;
        ++exports_[d.capIds[i]].pins;  // the peer cannot release it under the running call
        answerPools_->pins.push(a.paramPins, d.capIds[i]);
        break;
      case detail::CapEntry::Kind::THIRD_PARTY:
        cap.remote = acceptThirdParty(d, i);
        break;
      case detail::CapEntry::Kind::RECEIVER_ANSWER: {
        // Validated at decode. Resolved now if that answer returned, else when it does.
        Answer& q = *answers_[d.capIds[i]];
        capnp::List<uint16_t>::Reader transform = d.caps[i].getReceiverAnswer().getTransform();
        Answer::ParamAnswer entry;
        entry.answerId = q.id;
        entry.slot = i;
        entry.pathLength = static_cast<uint8_t>(transform.size());
        for (uint32_t s = 0; s < transform.size(); ++s) entry.path[s] = transform[s];
        if (q.state == Answer::State::RETURNED) {
          resolveParamAnswer(a, i, {entry.path.data(), entry.pathLength}, q);
          break;
        }
        entry.pending = true;
        entry.waiter = static_cast<uint32_t>(q.paramWaiters.size());
        q.paramWaiters.emplace_back(a.id, static_cast<uint32_t>(a.paramAnswers.size()));
        answerPools_->paramAnswers.push(a.paramAnswers, entry);
        ++a.paramWaits;
        break;
      }
      case detail::CapEntry::Kind::NONE:
      case detail::CapEntry::Kind::FOREIGN:  // never decoded
        break;
    }
  }
  if (a.paramWaits > 0) ++stats_.callsAwaitingParamAnswers;
  if (!d.targetIsAnswer) {
    const uint32_t exportId = settledRoute(d.targetId);
    if (mustQueueOnExport(a, exportId)) {
      if (detail::SpillBuffer* copy = copyToQueue(a, message, d)) queueOnExport(a, exportId, copy);
      return {};
    }
    deliver(a, exportId, d.interfaceId, d.methodId, d.payload);
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
    *exportId = settledRoute(*exportId);
    if (mustQueueOnExport(a, *exportId)) {
      if (detail::SpillBuffer* copy = copyToQueue(a, message, d)) queueOnExport(a, *exportId, copy);
      return {};
    }
    deliver(a, *exportId, d.interfaceId, d.methodId, d.payload);
    return {};
  }
  // The promised answer has not returned: keep a private copy of the call, queued in order.
  detail::SpillBuffer* copy = copyToQueue(a, message, d);
  if (copy == nullptr) return {};
  keepQueuedCall(a, copy);
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

// A private copy of call `a`, to keep it waiting here; null when the copies kept would pass
// RpcOptions::maxQueuedCallBytes (the call is then failed: OUT_OF_MEMORY), or when a new buffer
// for it is more than RpcOptions::budget pays for (QUOTA_EXCEEDED).
detail::SpillBuffer* RpcConnection::copyToQueue(Answer& a, IncomingMessage& message,
                                                const Decoded& d) {
  detail::SpillBuffer* copy = copyCall(message, d);
  if (copy == nullptr) {
    ++stats_.callsRefusedQuota;
    failAnswer(a, Error(Errc::QUOTA_EXCEEDED,
                        "the caller's quota cannot pay for keeping this call until it can be "
                        "delivered (RpcOptions::budget)"));
    return nullptr;
  }
  if (queuedCallBytes_ + copy->capacity() > options_.maxQueuedCallBytes) {
    giveSpill(copy);
    ++stats_.callsRefusedQueueFull;
    failAnswer(a, Error(Errc::OUT_OF_MEMORY,
                        "the calls waiting at the callee hold all it keeps for this connection "
                        "(RpcOptions::maxQueuedCallBytes)"));
    return nullptr;
  }
  return copy;
}

void RpcConnection::keepQueuedCall(Answer& a, detail::SpillBuffer* copy) noexcept {
  a.queuedCall = copy;
  queuedCallBytes_ += copy->capacity();
}

detail::SpillBuffer* RpcConnection::takeQueuedCall(Answer& a) noexcept {
  detail::SpillBuffer* copy = std::exchange(a.queuedCall, nullptr);
  if (copy != nullptr) queuedCallBytes_ -= copy->capacity();
  return copy;
}

// A private copy of an inbound Call, for queueing it: it is read again with Cap'n Proto's
// readers when it is delivered. A call read from its words only (decodeCommon: no params, no
// capabilities; not validated) is written afresh from the fields read, as this side writes such
// a call (emptyCallWords), so the copy is well formed and holds nothing that was never read; any
// other call was validated when it was read, and is copied as it came.
detail::SpillBuffer* RpcConnection::copyCall(IncomingMessage& message, const Decoded& d) {
  std::array<uint64_t, internal::MAX_EMPTY_CALL_WORDS> words;
  std::span<const std::byte> bytes = message.bytes();
  if (!message.validated()) {
    const size_t n =
        internal::emptyCallWords(words, d.id, d.interfaceId, d.methodId, d.noPipelining,
                                 d.targetIsAnswer, d.targetId, {d.path.data(), d.pathLength});
    bytes = std::as_bytes(std::span<const uint64_t>(words.data(), n));
  }
  detail::SpillBuffer* copy = takeSpill(bytes.size(), /*refusable=*/true);
  if (copy == nullptr) return nullptr;
  std::memcpy(copy->words.get(), bytes.data(), bytes.size());
  copy->usedBytes = copy->dirtyBytes = bytes.size();
  return copy;
}

// A method that throws fails its call, not the connection: Cap'n Proto throws when a method
// reads params that do not match their schema without tryReadParams (a coroutine's throw already
// ends as its promise's PROTOCOL_ERROR, runtime/promise.h). Anything but a kj::Exception is a bug
// of this process and is not caught.
Promise<void> RpcConnection::dispatchCaught(ServerObject& object, uint64_t interfaceId,
                                            uint16_t methodId, CallContext& ctx) {
  try {
    return object.dispatch(interfaceId, methodId, ctx);
  } catch (const kj::Exception&) {
    return readyPromise<void>(Error(Errc::PROTOCOL_ERROR,
                                    "the method threw: its params could not be read as the "
                                    "schema it read them with (use tryReadParams)"));
  }
}

// Calls `exportId`'s dispatch with the answer's context; the Return goes out when it completes.
void RpcConnection::deliver(Answer& a, uint32_t exportId, uint64_t interfaceId, uint16_t methodId,
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
  ++dispatching_;
  Promise<void> dispatch = dispatchCaught(*e.object, interfaceId, methodId, ctx);
  --dispatching_;
  ctx.paramsValid_ = false;
  if (dispatch.isReady()) {
    // Served synchronously (the common case): the Return goes out now, with no driver coroutine.
    completeAnswer(a.id, dispatch.takeResult());
    return;
  }
  a.driver.emplace(drive(a.id, std::move(dispatch)));
}

Promise<void> RpcConnection::drive(uint32_t answerId, Promise<void> dispatch) {
  std::optional<Status> status;
  {
    Promise<void> running = std::move(dispatch);
    status.emplace(co_await running);
  }  // the server's coroutine and what it holds (parameters included) go before the Return: a
     // driver kept after it (an answer freed at its Return stays with its finished driver until
     // the id is used again) then holds nothing but itself
  completeAnswer(answerId, *status);
  co_return {};
}

void RpcConnection::completeAnswer(uint32_t answerId, Status status) {
  // Handoffs and proxies decided as the Return goes (first: a Provide's failure can end this
  // connection). On a dead connection too: its entries are then proxies, written for nothing.
  if (status) settleForeignCaps(answers_[answerId]->context.resultCaps_, /*inReturn=*/true);
  Answer& a = *answers_[answerId];
  AGATE_ASSERT(a.state == Answer::State::RUNNING, "answer %u completed twice", answerId);
  CallContext& ctx = a.context;
  if (!status) {
    if (ctx.results_.active()) abandonOut(ctx.results_);
    ctx.resultCaps_.clear();
    failAnswer(a, status.error());
    return;
  }
  if (!ctx.results_.active()) {
    // No results were built (so no capabilities either): the fixed words of an empty Return.
    const std::array<uint64_t, EMPTY_RETURN_WORDS> words = emptyReturnWords(a.id, a.noPipelining);
    Status sent = sendWords(words, OutKind::REPLY);
    if (sent) {
      ++stats_.returnsSent;
      if (a.noPipelining) {
        releaseAtReturn(a);
        return;
      }
    } else if (isOpen()) {
      failAnswer(a, sent.error());
      return;
    }
  } else {
    const uint32_t n = ctx.resultCaps_.size();
    Status written = {};
    if (n > ENVELOPE_CAPS) {
      written = roomForCapTable(ctx.results_, ctx.resultCaps_, OutKind::PRIVATE_REPLY);
      if (written) {
        ctx.return_ = ctx.results_.builder().getRoot<wire::Message>().getReturn();
        ctx.content_ = ctx.return_.getResults().getContent();
      }
    }
    if (written && n > 0) {
      written = writeCapTable(ctx.return_.getResults().initCapTable(n), ctx.resultCaps_);
    }
    if (!written) {
      abandonOut(ctx.results_);
      rollBackExports(ctx.resultCaps_);
      ctx.resultCaps_.clear();
      failAnswer(a, written.error());
      return;
    }
    const bool noFinishNeeded = a.noPipelining && n == 0;
    if (noFinishNeeded) ctx.return_.setNoFinishNeeded(true);
    // The results were built in a private buffer (initResults): the Return goes out as a copy
    // of its words, queued behind the bound like any reply if the ring is full. With
    // capabilities, calls pipelined on this answer resolve their paths against the results, so
    // the buffer stays with the answer (frames are position-independent).
    Status sent = {};
    detail::SpillBuffer* built = ctx.results_.spill_;
    AGATE_ASSERT(built != nullptr, "results built outside a private buffer");
    Result<size_t> used = built->builder->tryFinish();
    if (used) {
      built->builder.reset();
      built->usedBytes = built->dirtyBytes = *used;
      ctx.results_.spill_ = nullptr;
      sent = sendWords(
          std::span(reinterpret_cast<const uint64_t*>(built->words.get()), *used / WORD_BYTES),
          OutKind::REPLY);
      if (n > 0) {
        a.results = built;
      } else {
        giveSpill(built);
      }
    } else {
      sent = finishOut(ctx.results_);  // says why (too large) and gives the buffer back
    }
    if (sent && noFinishNeeded) {
      ++stats_.returnsSent;
      releaseAtReturn(a);
      return;
    }
    if (sent) {
      ++stats_.returnsSent;
      // The exports the results name stay pinned while the answer lives (pipelined calls).
      for (uint32_t i = 0; a.results != nullptr && i < n; ++i) {
        const detail::CapEntry& e = ctx.resultCaps_[i];
        answerPools_->results.push(a.resultCaps, {e.kind, e.id});
        if (isExported(e.kind)) ++exports_[e.id].pins;
      }
      if (a.releaseResultCaps) dropReleasedResults(a);  // its Finish came first
    } else {
      // Nothing went out: take back the references the cap table gave, and fail the call
      // (results too large for a frame), or stop (the connection died).
      if (a.results != nullptr) giveSpill(std::exchange(a.results, nullptr));
      for (uint32_t i = 0; i < n; ++i) {
        const detail::CapEntry& e = ctx.resultCaps_[i];
        if (!isExported(e.kind) || e.id == 0 || !exports_[e.id].inUse) continue;
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
  wakeParamWaiters(a);
  settleQueue(a);
}

// Sends a Return with `error` for an answer that has not returned, and lets calls pipelined on
// it fail the same way.
void RpcConnection::failAnswer(Answer& a, const Error& error) {
  a.error = error;
  unlinkFromTarget(a);
  dropParamAnswers(a);
  dropProvision(a);
  stopWaiting(a);
  if (a.queuedCall != nullptr) giveSpill(takeQueuedCall(a));
  Result<detail::OutSlot> slot = startOut(EXCEPTION_BYTES);
  bool sent = false;
  if (slot) {
    wire::Return::Builder ret = slot->builder().initRoot<wire::Message>().initReturn();
    ret.setAnswerId(a.id);
    if (a.noPipelining) ret.setNoFinishNeeded(true);  // an exception carries no capability
    if (error.code == Errc::CANCELLED) {
      ret.setCanceled();
    } else {
      // This answer's own copy: `error` may point into another answer's, which the steps above
      // may have freed.
      writeException(ret.initException(), a.error.get());
    }
    sent = finishOut(*slot).ok();
    if (sent) ++stats_.returnsSent;
  }
  if (sent && a.noPipelining) {
    releaseAtReturn(a);
    return;
  }
  a.state = Answer::State::RETURNED;
  exportUnpin(std::exchange(a.pinnedExport, NONE));
  wakeParamWaiters(a);
  settleQueue(a);
}

void RpcConnection::settleQueue(Answer& a) {
  if (a.inWorklist) return;
  a.inWorklist = true;
  worklist_.push_back(a.id);
  scheduleWorklist();
}

// The worklist runs after the reader's message (runWorklist at its end), or from a posted task.
void RpcConnection::scheduleWorklist() {
  if (!workRunning_ && !inReader_ && !worklistTask_.isQueued()) loop_.post(worklistTask_);
}

// Answer `a` had its Finish and may have lost the last thing that kept it running (calls
// pipelined on it, calls waiting for it in their params): cancelIfUnwanted decides, from the
// worklist, so that one call ending never cancels a chain of answers recursively.
void RpcConnection::cancelLaterIfUnwanted(Answer& a) {
  if (!a.finishReceived || !isOpen() || a.state == Answer::State::RETURNED ||
      a.queueHead != nullptr || !a.paramWaiters.empty())
    return;
  answersToCancel_.push_back(a.id);
  scheduleWorklist();
}

// Settles answers that returned: delivers (or fails) the calls queued on them, in order, then
// frees those the caller has finished. Iterative, so a long pipeline cannot grow the stack.
void RpcConnection::runWorklist() {
  if (workRunning_) return;
  workRunning_ = true;
  for (;;) {
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
    if ((exportsToDrain_.empty() && answersToCancel_.empty()) || !isOpen()) break;
    std::vector<uint32_t> cancels;
    cancels.swap(answersToCancel_);
    for (uint32_t id : cancels) {
      if (isOpen()) cancelIfUnwanted(*answers_[id]);
    }
    std::vector<uint32_t> drains;
    drains.swap(exportsToDrain_);
    for (uint32_t id : drains) {
      if (isOpen()) drainExport(id);
    }
    if (worklist_.empty() && exportsToDrain_.empty() && answersToCancel_.empty()) break;
  }
  exportsToDrain_.clear();
  answersToCancel_.clear();
  workRunning_ = false;
}

void RpcConnection::deliverQueued(Answer& q) {
  AGATE_ASSERT(q.state == Answer::State::QUEUED && q.queuedCall != nullptr,
               "answer %u delivered from a queue twice", q.id);
  detail::SpillBuffer* copy = takeQueuedCall(q);
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
  *exportId = settledRoute(*exportId);
  if (mustQueueOnExport(q, *exportId)) {  // a promise, calls queued there, or params to wait for
    queueOnExport(q, *exportId, copy);
    return;
  }
  deliver(q, *exportId, call.getInterfaceId(), call.getMethodId(),
          capnp::AnyStruct::Reader(call.getParams()));
  giveSpill(copy);  // params were readable during dispatch's synchronous part only
}

Result<uint32_t> RpcConnection::resolvePipeline(Answer& target, std::span<const uint16_t> path) {
  if (target.error.code() != Errc::OK) return target.error.get();
  if (target.results == nullptr)
    return Error(Errc::FAILED, "pipelined call: the results hold no capability");
  Result<uint32_t> index =
      OwnResults({reinterpret_cast<const uint64_t*>(target.results->words.get()),
                  target.results->usedBytes / WORD_BYTES})
          .capIndexAt(path);
  if (!index) return index.error();
  if (*index >= target.resultCaps.size())
    return Error(Errc::FAILED, "pipelined call: capability index outside the results' table");
  // A handed-off capability resolves to its vine, which forwards the call to the host: the
  // caller's pipelined reference keeps its route (through this vat) for its whole life.
  if (!isExported(target.resultCaps[*index].kind))
    return Error(Errc::UNSUPPORTED, "pipelined call on a capability this side does not host");
  return target.resultCaps[*index].id;
}

// The answer of a call sent with noPromisePipelining, whose Return (with noFinishNeeded) was just
// written: freed now, before anything more is read, since the caller frees its question on
// reading that Return and may reuse the id at once. No call can be queued on it (pipelining on
// it is a PROTOCOL_ERROR). One Finish may still come: the caller dropped its promise as the
// Return crossed it (see Finish in schemas/rpc.capnp).
void RpcConnection::releaseAtReturn(Answer& a) {
  ++stats_.returnsNoFinishNeeded;
  const bool finishMayCross = !a.finishReceived;
  a.state = Answer::State::RETURNED;
  // May run inside drive(): the finished driver stays until the id is used again (answerAt).
  std::optional<Promise<void>> driver = std::move(a.driver);
  a.driver.reset();
  freeAnswer(a);
  a.driver = std::move(driver);
  a.finishMayCross = finishMayCross;
}

void RpcConnection::finishAnswerIfDone(Answer& a) {
  if (a.state == Answer::State::RETURNED && a.finishReceived && a.queueHead == nullptr &&
      !a.inWorklist)
    freeAnswer(a);
}

void RpcConnection::unlinkFromTarget(Answer& a) {
  if (a.waitingOnExport != NONE) {
    const uint32_t id = std::exchange(a.waitingOnExport, NONE);
    Export& e = exports_[id];
    Answer* prev = nullptr;
    for (Answer* it = e.queueHead; it != nullptr; prev = it, it = it->nextInQueue) {
      if (it != &a) continue;
      (prev != nullptr ? prev->nextInQueue : e.queueHead) = a.nextInQueue;
      if (e.queueTail == &a) e.queueTail = prev;
      break;
    }
    a.nextInQueue = nullptr;
    // The calls behind it may go on now (unless the export is a promise still pending), or, the
    // queue being empty, what waited for it goes on: the settled promise's Resolve, the
    // recipient's Disembargo passed on to the provider (forwardDisembargo), or the Accepts that
    // matched the export's provisions (releaseQueuedAccepts).
    if (e.queueHead != nullptr || e.resolveAfterQueue || e.disembargoAfterQueue ||
        e.acceptAfterQueue)
      settleExport(id);
    exportUnpin(id);
    return;
  }
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
  cancelLaterIfUnwanted(t);  // it may have been kept only for the calls pipelined on it
}

size_t RpcConnection::answerEntriesRetained() const noexcept {
  size_t n = 0;
  for (const std::unique_ptr<Answer>& a : answers_) {
    if (!a) continue;
    n += a->paramPins.capacity() + a->resultCaps.capacity() + a->paramAnswers.capacity() +
         a->paramWaiters.capacity();
  }
  return n;
}

void RpcConnection::freeAnswer(Answer& a) {
  unlinkFromTarget(a);
  dropParamAnswers(a);
  releaseIfLarge(a.paramWaiters);  // only when the connection ends: the calls waiting go too
  a.driver.reset();                // cancels a running dispatch
  CallContext& ctx = a.context;
  if (ctx.results_.active()) abandonOut(ctx.results_);
  ctx.resultCaps_.clear();
  ctx.paramCaps_.clear();
  ctx.paramsValid_ = false;
  if (a.queuedCall != nullptr) giveSpill(takeQueuedCall(a));
  if (a.results != nullptr) giveSpill(std::exchange(a.results, nullptr));
  dropProvision(a);
  stopWaiting(a);
  a.embargo = a.isProvide = a.disembargoed = false;
  a.providedExport = NONE;
  exportUnpin(std::exchange(a.pinnedExport, NONE));
  // Taken out first (unpinning may free an export, whose object's destructor may reach this
  // connection), then put back empty with their capacity.
  std::vector<uint32_t> pins = std::move(a.paramPins);
  std::vector<Answer::ResultCap> results = std::move(a.resultCaps);
  for (uint32_t id : pins) exportUnpin(id);
  for (const Answer::ResultCap& r : results) {
    if (isExported(r.kind)) exportUnpin(r.id);
  }
  answerPools_->pins.retire(pins);
  answerPools_->results.retire(results);
  a.paramPins = std::move(pins);
  a.resultCaps = std::move(results);
  a.queueHead = a.queueTail = nullptr;
  a.state = Answer::State::FREE;
  a.finishReceived = a.releaseResultCaps = false;
  a.noPipelining = false;
  a.inWorklist = false;
  a.error.clear();
  --answersLive_;
}

// ---------------------------------------------------------------------------------------------
// receiverAnswer: a capability pipelined on one of our answers, passed back in a call's params

// Whether call `a`, addressed to `exportId`, waits in the export's queue: the export is a
// pending promise, calls already wait there (E-order), or `a`'s params name answers that have
// not returned.
// A promise export still pending, and not sending its calls on (PromiseNode::forward_): calls
// to it wait in its queue until it settles.
bool RpcConnection::promiseHoldsCalls(const Export& e) noexcept {
  if (!e.promise) return false;
  const auto* node = static_cast<const detail::PromiseNode*>(e.object);
  return node->pending() && node->forward_ == nullptr;
}

// Where a call addressed to export `exportId` goes: a promise of ours that settled on an object
// exported here too (its Resolve named that export), with no call waiting in its own queue,
// hands its calls to that export, so they queue there, in arrival order, with the calls the
// peer makes on the resolution once it read the Resolve. Else (pending, broken, resolved to the
// peer's own object or to a third party, or calls still waiting on it) the export itself. A
// call made on the promise before the peer read its Resolve that must wait (for the answers its
// params name) then holds back the calls made on the resolution after it (E-order).
uint32_t RpcConnection::settledRoute(uint32_t exportId) const noexcept {
  const Export& e = exports_[exportId];
  if (!e.promise || e.queueHead != nullptr || e.resolveAfterQueue) return exportId;
  const auto* node = static_cast<const detail::PromiseNode*>(e.object);
  if (node->state_ != detail::PromiseNode::State::RESOLVED || node->toReceiver_ ||
      !node->handOff_.isNull() || node->target_ == nullptr)
    return exportId;
  auto found = exportByObject_.find(node->target_);
  if (found == exportByObject_.end() || !exports_[found->second].inUse) return exportId;
  return found->second;
}

bool RpcConnection::mustQueueOnExport(const Answer& a, uint32_t exportId) const noexcept {
  if (a.paramWaits > 0) return true;
  const Export& e = exports_[exportId];
  if (promiseHoldsCalls(e)) return true;
  // Calls wait there: a newer call goes behind them (E-order). An older one, coming out of an
  // answer's queue, was made before them (on another reference) and does not wait for them: it
  // may be the very answer they wait for.
  return e.queueHead != nullptr && e.queueHead->arrival < a.arrival;
}

// Resolves one receiverAnswer entry of call `a` against answer `q`, which has returned: into
// the call's param slot as receiverHosted would be, our own object (pinned while the call runs),
// or a broken capability with the answer's error (UNSUPPORTED for a capability this side does
// not host).
void RpcConnection::resolveParamAnswer(Answer& a, uint32_t slot, std::span<const uint16_t> path,
                                       Answer& q) {
  ReceivedCap& cap = a.context.paramCaps_[slot];
  cap = ReceivedCap{};
  Result<uint32_t> exportId = resolvePipeline(q, path);
  if (!exportId) {
    // The text may be q's own copy, which goes with q: the method may keep the capability
    // longer, so it gets a copy in the ring a peer's errors live in.
    cap.remote.kind_ = RemoteCap::Kind::BROKEN;
    cap.remote.broken_ = Error(exportId.error().code, exportId.error().sysErrno,
                               copyRemoteReason(exportId.error().detail));
    return;
  }
  cap.local = exports_[*exportId].object;
  ++exports_[*exportId].pins;  // the peer cannot release it under the call (freeAnswer unpins)
  answerPools_->pins.push(a.paramPins, *exportId);
}

// Call `a` ends without waiting any more (delivered, failed, freed): its pending entries leave
// their answers' waiter lists (in O(1) each: the last waiter takes the freed place). An answer
// whose Finish came while only such calls kept it is cancelled now, as the Finish would have.
void RpcConnection::dropParamAnswers(Answer& a) {
  for (const Answer::ParamAnswer& entry : a.paramAnswers) {
    if (!entry.pending || entry.answerId >= answers_.size() || !answers_[entry.answerId]) continue;
    Answer& q = *answers_[entry.answerId];
    if (entry.waiter >= q.paramWaiters.size()) continue;  // freed with the connection
    const auto moved = q.paramWaiters.back();
    q.paramWaiters[entry.waiter] = moved;
    answers_[moved.first]->paramAnswers[moved.second].waiter = entry.waiter;
    q.paramWaiters.pop_back();
    if (q.paramWaiters.empty()) releaseIfLarge(q.paramWaiters);
    cancelLaterIfUnwanted(q);
  }
  answerPools_->paramAnswers.retire(a.paramAnswers);
  a.paramWaits = 0;
}

// `answer` returned: the entries waiting for it are resolved now (so nothing keeps the answer
// past its Finish, and the caller may reuse its id), and a call with nothing left to wait for
// may go on (its export's queue is drained in the worklist).
void RpcConnection::wakeParamWaiters(Answer& answer) {
  if (answer.paramWaiters.empty()) return;
  std::vector<std::pair<uint32_t, uint32_t>> waiters;
  waiters.swap(answer.paramWaiters);
  for (const auto& [id, index] : waiters) {
    Answer& x = *answers_[id];
    Answer::ParamAnswer& entry = x.paramAnswers[index];
    entry.pending = false;
    resolveParamAnswer(x, entry.slot, {entry.path.data(), entry.pathLength}, answer);
    if (--x.paramWaits == 0) {
      answerPools_->paramAnswers.retire(x.paramAnswers);
      if (x.waitingOnExport != NONE) settleExport(x.waitingOnExport);
    }
  }
}

void RpcConnection::settleExport(uint32_t exportId) {
  exportsToDrain_.push_back(exportId);
  scheduleWorklist();
}

// Delivers the calls queued on export `exportId`, in order, up to the first that must still
// wait (its params' answers, or the export is a promise still pending).
void RpcConnection::drainExport(uint32_t exportId) {
  if (exportId >= exports_.size() || !exports_[exportId].inUse) return;
  ++exports_[exportId].pins;  // the export outlives the deliveries (exports_ may grow meanwhile)
  while (Answer* q = exports_[exportId].queueHead) {
    if (q->paramWaits > 0 || promiseHoldsCalls(exports_[exportId])) break;
    exports_[exportId].queueHead = q->nextInQueue;
    if (exports_[exportId].queueHead == nullptr) exports_[exportId].queueTail = nullptr;
    q->nextInQueue = nullptr;
    q->waitingOnExport = NONE;
    exportUnpin(exportId);  // the queued call's pin; deliver() pins it again while it runs
    deliverOnExport(*q, exportId);
    if (!isOpen()) break;
  }
  if (exports_[exportId].queueHead == nullptr &&
      std::exchange(exports_[exportId].disembargoAfterQueue, false) && isOpen() &&
      exports_[exportId].inUse)
    forwardDisembargo(exportId);
  if (exports_[exportId].queueHead == nullptr &&
      std::exchange(exports_[exportId].acceptAfterQueue, false) && isOpen() &&
      exports_[exportId].inUse)
    releaseQueuedAccepts(exportId);
  Export& e = exports_[exportId];
  if (e.queueHead == nullptr && std::exchange(e.resolveAfterQueue, false) && isOpen() && e.inUse) {
    auto& node = *static_cast<detail::PromiseNode*>(e.object);
    if (e.remoteRefs == 0) {
      e.resolvePending = false;  // the peer released it meanwhile: nothing to settle there
    } else if (!node.pending()) {
      sendResolve(exportId, node);
    }
  }
  exportUnpin(exportId);
}

Status RpcConnection::handleFinish(uint32_t answerId, bool releaseResultCaps) {
  ++stats_.finishesReceived;
  Answer& a = *answers_[answerId];
  if (a.state == Answer::State::FREE) {
    // Crossed the answer's noFinishNeeded Return (checkFinish let only that one through).
    a.finishMayCross = false;
    ++stats_.finishesIgnored;
    return {};
  }
  a.finishReceived = true;
  a.releaseResultCaps = releaseResultCaps;
  if (releaseResultCaps && a.state == Answer::State::RETURNED) dropReleasedResults(a);
  cancelIfUnwanted(a);
  finishAnswerIfDone(a);
  return {};
}

// Answer `a` got its Finish before returning: it is cancelled unless something still needs its
// results, calls pipelined on it (queued) or calls whose params name it (receiverAnswer) and
// wait for it. A provision is reclaimed all the same (its results hold no capability for them
// anyway).
void RpcConnection::cancelIfUnwanted(Answer& a) {
  if (!a.finishReceived || a.state == Answer::State::FREE || a.state == Answer::State::RETURNED)
    return;
  if (!((a.queueHead == nullptr && a.paramWaiters.empty()) || a.providing)) return;
  if (a.state == Answer::State::RUNNING) {
    a.driver.reset();  // the server sees the cancellation: its coroutine is destroyed
    if (a.context.results_.active()) abandonOut(a.context.results_);
    a.context.resultCaps_.clear();
  }
  failAnswer(a, Error(Errc::CANCELLED, "the caller cancelled the call"));
}

// Answer `a` has sent its Return and has its Finish with releaseResultCaps: the caller took none
// of the references the Return's cap table gave, so they are dropped here, one per exported
// entry, as Releases of 1 would (checkFinish made sure the caller released none of them). The
// answer still pins those exports: they go once it is freed, if nothing else holds them.
void RpcConnection::dropReleasedResults(Answer& a) noexcept {
  for (const Answer::ResultCap& r : a.resultCaps) {
    if (!isExported(r.kind)) continue;
    Export& e = exports_[r.id];
    AGATE_ASSERT(e.pins > 0 && e.remoteRefs > 0, "result export %u dropped twice", r.id);
    --e.remoteRefs;
    ++stats_.resultRefsReleasedByFinish;
  }
}

Status RpcConnection::handleRelease(uint32_t exportId, uint32_t count) {
  ++stats_.releasesReceived;
  Export& e = exports_[exportId];
  if ((e.remoteRefs -= count) == 0 && e.pins == 0) maybeFreeExport(exportId);
  return {};
}

Result<capnp::AnyPointer::Builder> RpcConnection::initResults(CallContext& ctx, size_t sizeHint) {
  if (ctx.results_.active()) return ctx.content_;
  // Built in private memory, not in a ring frame: a method may suspend after initResults(), and
  // a ring frame held open meanwhile would hold back every other message to the peer (a call
  // back to the caller included, a deadlock). Copying the finished words into the ring costs
  // less than building across the cache lines the peer is polling.
  Result<detail::OutSlot> slot = startOut(sizeHint + ENVELOPE_BYTES, OutKind::PRIVATE_REPLY);
  if (!slot) return slot.error();
  ctx.results_ = std::move(*slot);
  ctx.return_ = ctx.results_.builder().initRoot<wire::Message>().initReturn();
  ctx.return_.setAnswerId(ctx.answerId_);
  ctx.content_ = ctx.return_.initResults().getContent();
  return ctx.content_;
}

}  // namespace agate::rpc
