#include "agate/client/event_stream.h"

#include <algorithm>
#include <utility>

namespace agate::client {

using caps::Cap;
using caps::Rights;

// --- EventScanner ---

Status EventScanner::scan(const caps::MappedEventBuffer& buffer, std::vector<EventUpdate>& updates,
                          std::vector<uint32_t>& stuck) {
  AGATE_REQUIRE(buffer.slots() == seen_.size(), "scanner of %zu slots over a buffer of %u",
                seen_.size(), buffer.slots());
  for (uint32_t slot = 0; slot < seen_.size(); ++slot) {
    const uint64_t peeked = buffer.peekSequence(slot);
    if (peeked == seen_[slot] || peeked == stuckAt_[slot]) continue;  // unchanged, or known stuck
    caps::EventRecord record;
    if (!buffer.tryRead(slot, record)) {
      // Every try overlapped a post: a writer stuck mid-post (or a very slow one). Report it
      // once per odd value; the slot is read again when its sequence moves.
      const uint64_t now = buffer.peekSequence(slot);
      stuckAt_[slot] = (now & 1) ? now : (peeked | 1);
      stuck.push_back(slot);
      continue;
    }
    stuckAt_[slot] = 0;
    if (record.sequence == seen_[slot]) continue;  // back where it was: nothing new to report
    if (record.sequence < seen_[slot])
      return Error(Errc::PROTOCOL_ERROR, "an event slot's sequence went backwards");
    EventUpdate& u = updates.emplace_back();
    u.slot = slot;
    u.sequence = record.sequence;
    u.coalesced = kernel::postsOf(record.sequence) - kernel::postsOf(seen_[slot]);
    u.words = record.words;
    seen_[slot] = record.sequence;
  }
  return {};
}

// --- EventStream ---

EventStream& EventStream::operator=(EventStream&& o) noexcept {
  if (this == &o) return *this;
  release();
  kernel_ = std::exchange(o.kernel_, nullptr);
  from_ = std::move(o.from_);
  cap_ = std::exchange(o.cap_, {});
  koid_ = std::exchange(o.koid_, 0);
  buffer_ = std::move(o.buffer_);
  scanner_ = std::move(o.scanner_);
  updates_ = std::move(o.updates_);
  stuck_ = std::move(o.stuck_);
  ended_ = std::exchange(o.ended_, Error{});
  batches_ = std::exchange(o.batches_, 0);
  parkSlice_ = o.parkSlice_;
  ends_ = std::exchange(o.ends_, 0);
  checkOwed_ = std::exchange(o.checkOwed_, false);
  checkEnd_ = std::exchange(o.checkEnd_, false);
  probe_ = std::exchange(o.probe_, std::nullopt);
  probedEnds_ = std::exchange(o.probedEnds_, 0);
  lastCheck_ = o.lastCheck_;
  endChecks_ = std::exchange(o.endChecks_, 0);
  return *this;
}

EventStream::~EventStream() { release(); }

void EventStream::release() noexcept {
  probe_.reset();  // a check in flight: its answer is read and dropped by the connection
  if (kernel_ != nullptr && cap_.valid()) {
    // Detached: written now, or queued until the submission ring has room (never lost); its
    // answer is dropped.
    kernel_->deleteCapDetached(cap_);
  }
  kernel_ = nullptr;
  from_.reset();
  cap_ = {};
  buffer_ = caps::MappedEventBuffer();
}

Promise<EventStream> EventStream::open(Session& session, rpc::RpcConnection& from,
                                       events::EventStream::Reader handle) {
  // Copied before the first suspension: the reader points into a response's frame.
  const Cap<caps::EventBuffer> cap{handle.getHandle()};
  const caps::Koid claimedKoid = handle.getKoid();
  const uint32_t claimedSlots = handle.getSlots();
  // Counted before the first suspension: the caller may let go of everything else on `from`
  // (and close its bushel) while this waits for the kernel, and the Session frees a closed
  // connection nothing refers to.
  rpc::ConnectionRef held(from);
  if (!from.isOpen()) co_return Error(Errc::DISCONNECTED, "the stream's connection is closed");
  if (!cap.valid()) co_return Error(Errc::PROTOCOL_ERROR, "the server sent a null stream handle");
  caps::KernelConnection& kernel = session.kernel();

  // Decode: what the kernel says the handle is, against what the server claimed.
  Result<caps::CapInfo> info = co_await kernel.inspectCap(cap);
  if (!info) {
    if (info.code() == Errc::INVALID_HANDLE || info.code() == Errc::WRONG_TYPE)
      co_return Error(Errc::PROTOCOL_ERROR, "the stream handle names no cap of this process");
    co_return info.error();
  }
  if (info->type != caps::ObjectType::EVENT_BUFFER)
    co_return Error(Errc::PROTOCOL_ERROR, "the stream handle is not an event buffer");
  if (!kernel::hasRights(info->rights, Rights::READ) ||
      (info->rights & ~(Rights::READ | Rights::GRANT)) != Rights::NONE)
    co_return Error(Errc::PROTOCOL_ERROR, "the stream handle is not read-only");
  if (info->koid != claimedKoid)
    co_return Error(Errc::PROTOCOL_ERROR, "the stream handle names another event buffer");

  // Invoke: map it read-only (the kernel seals it against writable maps from now on).
  Result<caps::MappedEventBuffer> mapped = co_await kernel.mapEventBuffer(cap, /*writable=*/false);
  if (!mapped) co_return mapped.error();
  if (mapped->slots() != claimedSlots)
    co_return Error(Errc::PROTOCOL_ERROR, "the stream's slot count is not the kernel's");
  if (mapped->notification() == nullptr)
    co_return Error(Errc::PROTOCOL_ERROR, "the stream's event buffer has no notification");
  if (!held->isOpen()) co_return Error(Errc::DISCONNECTED, "the stream's connection closed");

  EventStream s;
  s.kernel_ = &kernel;
  s.from_ = std::move(held);
  s.cap_ = cap;
  s.koid_ = info->koid;
  s.scanner_ = EventScanner(mapped->slots());
  // A batch holds at most every slot once: next() never allocates after this.
  s.updates_.reserve(mapped->slots());
  s.stuck_.reserve(mapped->slots());
  s.buffer_ = std::move(*mapped);
  s.ends_ = s.buffer_.notification()->ends();
  co_return std::move(s);
}

bool EventStream::collect() noexcept {
  if (ended_.code != Errc::OK) return true;
  // Before the scan: what was posted before an end is in this scan or an earlier one.
  if (const uint32_t ends = buffer_.notification()->ends(); ends != ends_) {
    ends_ = ends;
    checkOwed_ = true;
  }
  Status scanned = scanner_.scan(buffer_, updates_, stuck_);
  if (!scanned) {
    ended_ = scanned.error();
    return true;
  }
  if (!updates_.empty() || !stuck_.empty()) return true;
  // Checked after the scan: what was posted before the end is delivered first.
  if (!from_->isOpen()) ended_ = Error(Errc::DISCONNECTED, "the event stream's server is gone");
  if (ended_.code != Errc::OK) return true;
  // The ends word moved and nothing is new: the publisher may have closed the stream (see the
  // header). The kernel is asked at most once per park slice; a check put off is made when a
  // slice ends.
  if (checkOwed_ && std::chrono::steady_clock::now() - lastCheck_ >= parkSlice_) {
    checkEnd_ = true;
    return true;
  }
  return false;
}

void EventStream::startCheck() {
  if (probe_) return;  // one in flight (sent by tryNext): its answer serves
  lastCheck_ = std::chrono::steady_clock::now();
  ++endChecks_;
  probedEnds_ = ends_;
  probe_.emplace(kernel_->inspectCap(cap_));
}

void EventStream::settleCheck(Result<caps::CapInfo> info) noexcept {
  // A move of the ends word seen after the check was sent is owed a check of its own: the
  // kernel may have answered before the end that move announces.
  if (ends_ == probedEnds_) checkOwed_ = false;
  if (info) return;  // still there: the word moved for another buffer, or was forged
  if (info.code() == Errc::INVALID_HANDLE || info.code() == Errc::WRONG_TYPE) {
    // Only the buffer's destruction (or this process) deletes the cap: the publisher closed it.
    // What it posted before is in the slots (the kernel counted the end after the posts): one
    // last scan delivers it before the end.
    Status scanned = scanner_.scan(buffer_, updates_, stuck_);
    ended_ = scanned ? Error(Errc::DISCONNECTED, "the publisher closed the event stream")
                     : scanned.error();
  } else {
    ended_ = Error(Errc::DISCONNECTED, "the kernel connection is gone");
  }
}

void EventStream::takeAnsweredCheck() noexcept {
  if (!probe_ || !probe_->isReady()) return;
  Result<caps::CapInfo> info = probe_->takeResult();
  probe_.reset();
  settleCheck(std::move(info));
}

Result<EventBatch> EventStream::deliver() noexcept {
  if (updates_.empty() && stuck_.empty() && ended_.code != Errc::OK) return ended_;
  if (!updates_.empty() || !stuck_.empty()) ++batches_;
  return EventBatch{updates_, stuck_};
}

Result<EventBatch> EventStream::tryNext() {
  AGATE_REQUIRE(valid(), "tryNext() on an empty EventStream");
  updates_.clear();
  stuck_.clear();
  if (ended_.code == Errc::OK) takeAnsweredCheck();
  (void)collect();
  // The kernel's answer is not waited for: the check is sent now, and a later call (once the
  // loop has read the answer) takes it.
  if (std::exchange(checkEnd_, false)) startCheck();
  return deliver();
}

Promise<EventBatch> EventStream::next(Duration timeout) {
  AGATE_REQUIRE(valid(), "next() on an empty EventStream");
  updates_.clear();
  stuck_.clear();
  if (ended_.code == Errc::OK) takeAnsweredCheck();
  caps::MappedNotification& notification = *buffer_.notification();
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    // collect() runs under the waiter protocol (announce, check, park), so a ring between a
    // scan and the park is never lost; each park lasts at most PARK_SLICE.
    checkEnd_ = false;
    const Duration left = std::max<Duration>(end - std::chrono::steady_clock::now(), {});
    Result<bool> ready = co_await notification.waitAsync(
        kernel_->loop(), [this] { return collect(); }, left, caps::WaitVia::AUTO, parkSlice_);
    if (!ready) co_return ready.error();
    if (!*ready) co_return Error(Errc::TIMED_OUT, "no event before the timeout");
    if (!checkEnd_) co_return deliver();
    startCheck();
    // Awaited from this frame, not through the member: a next() dropped while it waits drops
    // the check with it (the check stays owed; a later call makes it after its interval).
    Promise<caps::CapInfo> probe = std::move(*probe_);
    probe_.reset();
    Result<caps::CapInfo> info = co_await probe;
    settleCheck(std::move(info));
    if (ended_.code != Errc::OK) co_return deliver();
  }
}

}  // namespace agate::client
