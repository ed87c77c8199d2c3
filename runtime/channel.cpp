#include "agate/runtime/channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <chrono>
#include <cstring>

namespace agate {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic_ref<uint32_t> word(uint32_t& w) { return std::atomic_ref<uint32_t>(w); }

bool pidfdExited(const Fd& pidfd) {
  pollfd p{pidfd.get(), POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;  // a pidfd becomes readable when its process exits
}

Result<Fd> openPidfd(pid_t pid) {
  Fd fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!fd.valid()) return Error::fromErrno(errno, "pidfd_open of the peer process failed");
  return fd;
}

// Spin-then-park around a non-blocking attempt. `attempt` returns a Result; WOULD_BLOCK means
// "not yet". Parks on `bell` in slices of policy.parkSlice, checking `peer` between slices: once
// it has exited, `peerDead` is set and the attempt is expected to report DISCONNECTED.
template <class Attempt>
auto waitUntil(Doorbell& bell, const WaitPolicy& policy, const Fd& peer, bool& peerDead,
               Attempt attempt) -> decltype(attempt()) {
  auto r = attempt();
  for (uint32_t i = 0; r.code() == Errc::WOULD_BLOCK && i < policy.spinIterations; ++i) {
    cpuRelax();
    r = attempt();
  }
  if (r.code() != Errc::WOULD_BLOCK) return r;
  bool forever = policy.timeout == std::chrono::nanoseconds::max();
  Clock::time_point deadline = forever ? Clock::time_point::max() : Clock::now() + policy.timeout;
  for (;;) {
    uint32_t snapshot = bell.announce();
    r = attempt();  // the re-check of the waiter protocol
    if (r.code() != Errc::WOULD_BLOCK) {
      bell.cancel();
      return r;
    }
    Clock::time_point now = Clock::now();
    if (now >= deadline) {
      bell.cancel();
      return Error(Errc::TIMED_OUT, "blocking channel call timed out");
    }
    std::chrono::nanoseconds slice = policy.parkSlice;
    if (!forever) slice = std::min(slice, std::chrono::nanoseconds(deadline - now));
    Status s = bell.wait(snapshot, slice);
    bell.cancel();
    if (!s.ok() && s.code() != Errc::TIMED_OUT) return s.error();
    if (peer.valid() && !peerDead && pidfdExited(peer)) peerDead = true;
  }
}

Error refused(const char* detail) { return Error(Errc::ATTACH_REFUSED, detail); }

}  // namespace

// ---- Channel ----

Channel::Channel(SharedMemory memory, const ChannelOptions& options, uint64_t capacity)
    : memory_(std::move(memory)), options_(options), view_(RingView::of(memory_.data(), capacity)) {
  if (options_.scope == ChannelScope::LOCAL && options_.maxSenders > 1)
    multi_ = std::make_unique<RingMultiProducer>(view_);
}

Channel::~Channel() {
  AGATE_REQUIRE(endpoints_.load(std::memory_order_acquire) == 0,
                "channel destroyed with %u endpoints still attached",
                endpoints_.load(std::memory_order_relaxed));
}

Result<std::unique_ptr<Channel>> Channel::create(const ChannelOptions& options) {
  uint64_t cap = options.capacityBytes;
  if (!std::has_single_bit(cap) || cap < RING_MIN_CAPACITY || cap > RING_MAX_CAPACITY)
    return Error(Errc::INVALID_ARGUMENT, "channel capacity must be a power of two in [64, 2^31]");
  if (options.maxSenders == 0)
    return Error(Errc::INVALID_ARGUMENT, "a channel needs room for at least one sender");
  if (options.maxSenders > 1 && options.scope != ChannelScope::LOCAL)
    return Error(Errc::INVALID_ARGUMENT, "only LOCAL channels take several senders");
  if (options.eventfdWakeups && options.scope == ChannelScope::PRIVATE)
    return Error(Errc::INVALID_ARGUMENT, "a PRIVATE channel has no doorbells to signal");
  size_t bytes = RING_CONTROL_BYTES + cap;
  Result<SharedMemory> memory = options.scope == ChannelScope::SHARED
                                    ? SharedMemory::createShared(bytes, "agate-channel")
                                    : SharedMemory::createAnonymous(bytes);
  if (!memory) return memory.error();
  initRing(memory->data(), cap);
  auto channel = std::unique_ptr<Channel>(new Channel(std::move(*memory), options, cap));
  if (options.eventfdWakeups) {
    channel->dataEvent_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    channel->spaceEvent_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!channel->dataEvent_.valid() || !channel->spaceEvent_.valid())
      return Error::fromErrno(errno, "eventfd for a channel doorbell failed");
  }
  return channel;
}

Result<std::unique_ptr<Channel>> Channel::openShared(Fd memfd, Fd dataEvent, Fd spaceEvent) {
  Result<SharedMemory> memory = SharedMemory::openShared(std::move(memfd), 0);
  if (!memory) return memory.error();
  Result<uint64_t> cap = validateRing(memory->data(), memory->size());
  if (!cap) return cap.error();
  ChannelOptions options{ChannelScope::SHARED, *cap, 1, dataEvent.valid()};
  auto channel = std::unique_ptr<Channel>(new Channel(std::move(*memory), options, *cap));
  channel->dataEvent_ = std::move(dataEvent);
  channel->spaceEvent_ = std::move(spaceEvent);
  return channel;
}

Result<Fd> Channel::exportFd() const {
  if (options_.scope != ChannelScope::SHARED)
    return Error(Errc::INVALID_ARGUMENT, "only a SHARED channel can be exported");
  return memory_.duplicateFd();
}

namespace {
Result<Fd> duplicateEventFd(const Fd& fd, ChannelScope scope) {
  if (scope != ChannelScope::SHARED || !fd.valid())
    return Error(Errc::INVALID_ARGUMENT, "only a SHARED channel with eventfdWakeups has eventfds");
  Fd dup(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
  if (!dup.valid()) return Error::fromErrno(errno, "dup of a doorbell eventfd failed");
  return dup;
}
}  // namespace

Result<Fd> Channel::exportDataEventFd() const {
  return duplicateEventFd(dataEvent_, options_.scope);
}
Result<Fd> Channel::exportSpaceEventFd() const {
  return duplicateEventFd(spaceEvent_, options_.scope);
}

Result<Sender> Channel::attachSender() {
  uint32_t limit = options_.scope == ChannelScope::LOCAL ? options_.maxSenders : 1;
  // The count lives in the control block so that SHARED attach limits hold across processes.
  // acq_rel: a later detach's CLOSED mark is ordered after our attach.
  auto senders = word(view_.control->senders);
  uint32_t cur = senders.load(std::memory_order_acquire);
  do {
    if ((cur & ATTACH_CLOSED_BIT) != 0)
      return refused("the channel's senders have detached; it is closed for sending");
    if (cur >= limit)
      return refused(options_.scope == ChannelScope::LOCAL
                         ? "the channel already has maxSenders senders attached"
                         : "a PRIVATE or SHARED channel takes one sender only");
  } while (!senders.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel,
                                          std::memory_order_acquire));
  endpoints_.fetch_add(1, std::memory_order_relaxed);
  return Sender(this);
}

Result<Receiver> Channel::attachReceiver() {
  auto receiver = word(view_.control->receiver);
  uint32_t expected = 0;
  if (!receiver.compare_exchange_strong(expected, 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire))
    return refused((expected & ATTACH_CLOSED_BIT) != 0
                       ? "the channel's receiver has detached; it is closed for receiving"
                       : "a channel takes one receiver only");
  endpoints_.fetch_add(1, std::memory_order_relaxed);
  return Receiver(this);
}

// ---- Sender ----

Sender::Sender(Channel* channel) noexcept : channel_(channel) {
  const RingView& v = channel->view_;
  bool shared = channel->options_.scope == ChannelScope::SHARED;
  if (channel->options_.scope == ChannelScope::PRIVATE) {
    mode_ = Mode::PLAIN;
    plain_ = RingProducer<PlainSync>(v);
    return;
  }
  mode_ = channel->multi_ ? Mode::MULTI : Mode::SINGLE;
  if (mode_ == Mode::SINGLE) single_ = RingProducer<AtomicSync>(v);
  dataBell_ = Doorbell(&v.control->dataBell, shared, channel->dataEvent_.get());
  spaceBell_ = Doorbell(&v.control->spaceBell, shared, channel->spaceEvent_.get());
}

Sender::Sender(Sender&& o) noexcept { *this = std::move(o); }

Sender& Sender::operator=(Sender&& o) noexcept {
  if (this == &o) return *this;
  detach();
  channel_ = std::exchange(o.channel_, nullptr);
  mode_ = o.mode_;
  plain_ = o.plain_;
  single_ = o.single_;
  slot_ = o.slot_;
  claimed_ = std::exchange(o.claimed_, false);
  dataBell_ = o.dataBell_;
  spaceBell_ = o.spaceBell_;
  ringPending_ = std::exchange(o.ringPending_, false);
  peer_ = std::move(o.peer_);
  peerDead_ = o.peerDead_;
  return *this;
}

Result<std::span<std::byte>> Sender::tryReserve(size_t bytes) noexcept {
  AGATE_REQUIRE(channel_ != nullptr, "tryReserve on a detached sender");
  RingControl* control = channel_->view_.control;
  if (mode_ == Mode::PLAIN) {
    if ((control->receiver & ATTACH_CLOSED_BIT) != 0)
      return Error(Errc::DISCONNECTED, "the receiver detached");
    return plain_.tryReserve(bytes);
  }
  // Acquire pairs with the receiver's detach; a line the receiver writes once in its life.
  if ((word(control->receiver).load(std::memory_order_acquire) & ATTACH_CLOSED_BIT) != 0)
    return Error(Errc::DISCONNECTED, "the receiver detached");
  if (peerDead_) return Error(Errc::DISCONNECTED, "the receiver's process exited");
  if (mode_ == Mode::SINGLE) return single_.tryReserve(bytes);
  AGATE_REQUIRE(!claimed_, "tryReserve with a reservation outstanding (%zu bytes)", bytes);
  Result<RingSlot> slot = channel_->multi_->tryClaim(bytes);
  if (!slot) return slot.error();
  slot_ = *slot;
  claimed_ = true;
  return std::span<std::byte>(channel_->multi_->payload(slot_), bytes);
}

Result<std::span<std::byte>> Sender::reserve(size_t bytes, const WaitPolicy& policy) noexcept {
  if (mode_ == Mode::PLAIN) return tryReserve(bytes);  // nothing else could make room
  Result<std::span<std::byte>> frame = tryReserve(bytes);
  if (frame.code() != Errc::WOULD_BLOCK) return frame;
  ringPending();  // the receiver must hear of what fills the ring before we wait for it to drain
  return waitUntil(spaceBell_, policy, peer_, peerDead_, [&] { return tryReserve(bytes); });
}

void Sender::ringData() noexcept {
  ringPending_ = false;
  if (mode_ != Mode::PLAIN) dataBell_.ring();
}

void Sender::commitWithoutRing(size_t length, uint16_t tag) noexcept {
  commitDeferred(length, tag);
  switch (mode_) {
    case Mode::PLAIN:
      plain_.publish();  // no doorbells: nothing is ever pending
      return;
    case Mode::SINGLE:
      if (single_.publish()) ringPending_ = true;
      return;
    case Mode::MULTI:
      ringPending_ = true;  // commitDeferred published it, in claim order
      return;
  }
}

bool Sender::ringPending() noexcept {
  if (!ringPending_ || channel_ == nullptr) return false;
  ringData();
  return true;
}

void Sender::commit(size_t length, uint16_t tag) noexcept {
  commitDeferred(length, tag);
  flush();
}

void Sender::commitDeferred(size_t length, uint16_t tag) noexcept {
  AGATE_REQUIRE(channel_ != nullptr, "commit on a detached sender");
  switch (mode_) {
    case Mode::PLAIN:
      plain_.commit(length, tag, false);
      return;
    case Mode::SINGLE:
      single_.commit(length, tag, false);
      return;
    case Mode::MULTI:
      AGATE_REQUIRE(claimed_, "commit without a reservation");
      channel_->multi_->commit(slot_, length, tag);  // publishes in claim order
      claimed_ = false;
      return;
  }
}

void Sender::flush() noexcept {
  if (channel_ == nullptr) return;
  switch (mode_) {
    case Mode::PLAIN:
      plain_.publish();
      return;
    case Mode::SINGLE:
      if (single_.publish() || ringPending_) ringData();
      return;
    case Mode::MULTI:
      ringData();
      return;
  }
}

void Sender::abandon() noexcept {
  if (channel_ == nullptr) return;
  switch (mode_) {
    case Mode::PLAIN:
      plain_.abandon();
      return;
    case Mode::SINGLE:
      single_.abandon();
      return;
    case Mode::MULTI:
      if (claimed_) channel_->multi_->abandon(slot_);  // later claims wait on this slot
      claimed_ = false;
      return;
  }
}

Status Sender::trySend(std::span<const std::byte> payload, uint16_t tag) noexcept {
  Result<std::span<std::byte>> buf = tryReserve(payload.size());
  if (!buf) return buf.error();
  if (!payload.empty()) std::memcpy(buf->data(), payload.data(), payload.size());
  commit(payload.size(), tag);
  return {};
}

Status Sender::send(std::span<const std::byte> payload, uint16_t tag,
                    const WaitPolicy& policy) noexcept {
  Result<std::span<std::byte>> buf = reserve(payload.size(), policy);
  if (!buf) return buf.error();
  if (!payload.empty()) std::memcpy(buf->data(), payload.data(), payload.size());
  commit(payload.size(), tag);
  return {};
}

Status Sender::watchPeer(pid_t pid) noexcept {
  Result<Fd> fd = openPidfd(pid);
  if (!fd) return fd.error();
  peer_ = std::move(*fd);
  peerDead_ = false;
  return {};
}

uint64_t Sender::maxPayload() const noexcept {
  return channel_ != nullptr ? channel_->maxPayload() : 0;
}

bool Sender::checkPeerExited() noexcept {
  if (peer_.valid() && !peerDead_ && pidfdExited(peer_)) peerDead_ = true;
  return peerDead_;
}

void Sender::detach() noexcept {
  if (channel_ == nullptr) return;
  abandon();
  flush();
  auto senders = word(channel_->view_.control->senders);
  // acq_rel: our commits happen-before the receiver's acquire of the CLOSED mark.
  if (senders.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    uint32_t zero = 0;
    senders.compare_exchange_strong(zero, ATTACH_CLOSED_BIT, std::memory_order_acq_rel,
                                    std::memory_order_relaxed);
  }
  ringData();  // a parked receiver must see the close
  channel_->endpoints_.fetch_sub(1, std::memory_order_release);
  channel_ = nullptr;
}

// ---- Receiver ----

Receiver::Receiver(Channel* channel) noexcept : channel_(channel) {
  const RingView& v = channel->view_;
  plain_ = channel->options_.scope == ChannelScope::PRIVATE;
  if (plain_) {
    plainRing_ = RingConsumer<PlainSync>(v);
    return;
  }
  bool shared = channel->options_.scope == ChannelScope::SHARED;
  atomicRing_ = RingConsumer<AtomicSync>(v);
  dataBell_ = Doorbell(&v.control->dataBell, shared, channel->dataEvent_.get());
  spaceBell_ = Doorbell(&v.control->spaceBell, shared, channel->spaceEvent_.get());
}

Receiver::Receiver(Receiver&& o) noexcept { *this = std::move(o); }

Receiver& Receiver::operator=(Receiver&& o) noexcept {
  if (this == &o) return *this;
  detach();
  channel_ = std::exchange(o.channel_, nullptr);
  plain_ = o.plain_;
  plainRing_ = o.plainRing_;
  atomicRing_ = o.atomicRing_;
  dataBell_ = o.dataBell_;
  spaceBell_ = o.spaceBell_;
  peer_ = std::move(o.peer_);
  peerDead_ = o.peerDead_;
  releasesDeferred_ = std::exchange(o.releasesDeferred_, false);
  return *this;
}

bool Receiver::sendersGone() noexcept {
  uint32_t& senders = channel_->view_.control->senders;
  uint32_t s = plain_ ? senders : word(senders).load(std::memory_order_acquire);
  return (s & ATTACH_CLOSED_BIT) != 0 || peerDead_;
}

uint64_t Receiver::capacity() const noexcept {
  return channel_ != nullptr ? channel_->capacity() : 0;
}

Result<Frame> Receiver::tryReceive() noexcept {
  AGATE_REQUIRE(channel_ != nullptr, "tryReceive on a detached receiver");
  if (plain_) {
    Result<Frame> f = plainRing_.tryPeek();
    if (f.code() != Errc::WOULD_BLOCK || !sendersGone()) return f;
    return Error(Errc::DISCONNECTED, "every sender detached and the ring is drained");
  }
  Result<Frame> f = atomicRing_.tryPeek();
  if (atomicRing_.takeSkippedPadding()) spaceBell_.ring();
  if (f.code() == Errc::WOULD_BLOCK) flushReleases();  // empty: this receiver is about to wait
  if (f.code() != Errc::WOULD_BLOCK || !sendersGone()) return f;
  // The senders' last commits happen-before their CLOSED mark (acquired above): look once more.
  f = atomicRing_.tryPeek();
  if (f.code() != Errc::WOULD_BLOCK) return f;
  return Error(Errc::DISCONNECTED, peerDead_ ? "the sender's process exited and the ring is drained"
                                             : "every sender detached and the ring is drained");
}

Result<Frame> Receiver::receive(const WaitPolicy& policy) noexcept {
  if (plain_) return tryReceive();  // nothing else could fill it
  return waitUntil(dataBell_, policy, peer_, peerDead_, [&] { return tryReceive(); });
}

void Receiver::release() noexcept {
  AGATE_REQUIRE(channel_ != nullptr, "release on a detached receiver");
  if (plain_) {
    plainRing_.release();
    return;
  }
  atomicRing_.release();
  spaceBell_.ring();
  releasesDeferred_ = false;
}

void Receiver::releaseDeferred() noexcept {
  AGATE_REQUIRE(channel_ != nullptr, "releaseDeferred on a detached receiver");
  if (plain_) {
    plainRing_.release();  // PRIVATE scope has no doorbells: nothing to defer
    return;
  }
  // Head is published every capacity/4 bytes, or at the flush: a sender polling for space pulls
  // head's line once per batch rather than once per frame. Each quarter published is rung too,
  // so a sender parked on a full ring refills it while this receiver drains the rest, instead of
  // waking only once the ring is empty (a flooded ring would otherwise run dry once a lap, and
  // the sender's wake-up latency with it).
  if (atomicRing_.releaseLazily()) {
    spaceBell_.ring();
    releasesDeferred_ = false;  // everything released so far is published
    return;
  }
  releasesDeferred_ = true;
}

void Receiver::flushReleases() noexcept {
  if (!releasesDeferred_) return;
  releasesDeferred_ = false;
  atomicRing_.publishHead();  // before the ring: a woken sender's re-check must see the space
  spaceBell_.ring();
}

Status Receiver::watchPeer(pid_t pid) noexcept {
  Result<Fd> fd = openPidfd(pid);
  if (!fd) return fd.error();
  peer_ = std::move(*fd);
  peerDead_ = false;
  return {};
}

bool Receiver::checkPeerExited() noexcept {
  if (peer_.valid() && !peerDead_ && pidfdExited(peer_)) peerDead_ = true;
  return peerDead_;
}

void Receiver::detach() noexcept {
  if (channel_ == nullptr) return;
  uint32_t& receiver = channel_->view_.control->receiver;
  if (plain_) {
    receiver = ATTACH_CLOSED_BIT;
  } else {
    // Release: pairs with the senders' acquire in tryReserve.
    atomicRing_.publishHead();
    word(receiver).store(ATTACH_CLOSED_BIT, std::memory_order_release);
    releasesDeferred_ = false;
    spaceBell_.ring();  // parked senders must see the close (and any deferred release)
  }
  channel_->endpoints_.fetch_sub(1, std::memory_order_release);
  channel_ = nullptr;
}

}  // namespace agate
