#include "agate/runtime/message_channel.h"

#include <poll.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

namespace agate {
namespace {

// A spinning waiter gives its CPU away this often: on a machine with fewer CPUs than spinning
// parties (two vCPUs here), the peer it waits for may be queued behind it on the same CPU.
constexpr uint32_t SPINS_PER_SCHED_YIELD = 4096;

// Withdraws a doorbell announce when it goes out of scope: on the normal path and when a parked
// coroutine's frame is destroyed because its promise was dropped.
class AnnounceGuard {
 public:
  AnnounceGuard(Doorbell& bell, bool viaEventfd) noexcept
      : bell_(bell), viaEventfd_(viaEventfd), snapshot_(bell.announce(viaEventfd)) {}
  AnnounceGuard(const AnnounceGuard&) = delete;
  AnnounceGuard& operator=(const AnnounceGuard&) = delete;
  ~AnnounceGuard() { bell_.cancel(viaEventfd_); }
  uint32_t snapshot() const noexcept { return snapshot_; }

 private:
  Doorbell& bell_;
  bool viaEventfd_;
  uint32_t snapshot_;
};

// Resumes the awaiting coroutine when the first of up to three promises completes. The others
// are then dropped by their owner (cancelling them).
struct FirstOf {
  detail::PromiseNodeBase* nodes[3];
  bool await_ready() const noexcept {
    for (detail::PromiseNodeBase* n : nodes)
      if (n != nullptr && n->isReady()) return true;
    return false;
  }
  void await_suspend(std::coroutine_handle<> h) noexcept {
    for (detail::PromiseNodeBase* n : nodes)
      if (n != nullptr) n->setWaiter(h);
  }
  void await_resume() noexcept {
    for (detail::PromiseNodeBase* n : nodes)
      if (n != nullptr) n->clearWaiter();
  }
};

// One park: returns once the doorbell may have rung, the peer may have exited, or `slice` passed.
// The caller has announced (so the doorbell's ringer will signal) and re-checked. Every wait
// promise is a local, so dropping this coroutine's promise cancels them all.
Promise<void> parkOnce(EventLoop& loop, Doorbell& bell, bool viaEventfd, uint32_t snapshot,
                       int peerFd, Duration slice) {
  Promise<void> timer = loop.sleep(slice);
  std::optional<Promise<uint32_t>> peer;
  if (peerFd >= 0) peer.emplace(loop.waitReady(peerFd, POLLIN));
  detail::PromiseNodeBase* peerNode = peer ? peer->node() : nullptr;
  if (viaEventfd) {
    Promise<uint32_t> event = loop.waitReady(bell.eventFd(), POLLIN);
    co_await FirstOf{{event.node(), peerNode, timer.node()}};
  } else {
    // The futex word is a plain uint32_t in the ring's control block; the loop reads it as an
    // atomic (it is only ever accessed through atomics), hence the reinterpretation.
    auto* word = reinterpret_cast<const std::atomic<uint32_t>*>(bell.futexWord());
    static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
    Promise<void> futex = loop.waitFutex(*word, snapshot, bell.processShared());
    co_await FirstOf{{futex.node(), peerNode, timer.node()}};
  }
  co_return {};
}

// Resets the doorbell's eventfd (EFD_NONBLOCK). Called after announcing and before re-checking:
// a ring that lands after this read makes the eventfd readable again, and one that landed before
// it published state that the re-check sees.
void drainEventFd(int fd) noexcept {
  uint64_t count = 0;
  while (::read(fd, &count, sizeof count) < 0 && errno == EINTR) {
  }
}

bool preferEventfd(const EventLoop& loop, const Doorbell& bell) noexcept {
  return !loop.hasNativeFutexWait() && bell.eventFd() >= 0;
}

// Spin, then park until `attempt` gives something other than WOULD_BLOCK. `checkPeer` latches
// the endpoint's peer death so that the next attempt reports DISCONNECTED once drained.
template <class T, class Attempt, class CheckPeer>
Promise<T> awaitAttempt(EventLoop& loop, Doorbell* bell, int peerFd, AsyncWaitPolicy policy,
                        Attempt attempt, CheckPeer checkPeer) {
  Result<T> r = attempt();
  for (uint32_t i = 0; r.code() == Errc::WOULD_BLOCK && i < policy.spinIterations; ++i) {
    if (busyPollStep(loop, i)) co_await loop.yield();
    r = attempt();
  }
  if (r.code() != Errc::WOULD_BLOCK || bell == nullptr) co_return r;
  const bool viaEventfd = preferEventfd(loop, *bell);
  for (;;) {
    {
      AnnounceGuard announce(*bell, viaEventfd);
      if (viaEventfd) drainEventFd(bell->eventFd());
      r = attempt();  // the re-check of the waiter protocol
      if (r.code() != Errc::WOULD_BLOCK) co_return r;
      AGATE_CO_TRY(co_await parkOnce(loop, *bell, viaEventfd, announce.snapshot(), peerFd,
                                     policy.parkSlice));
    }
    checkPeer();
    r = attempt();
    if (r.code() != Errc::WOULD_BLOCK) co_return r;
  }
}

}  // namespace

bool busyPollStep(const EventLoop& loop, uint32_t step) noexcept {
  // Spin only while the loop has nothing else to do (event_loop.h): a queued Task (often the
  // very work that will produce what we wait for, such as a deferred doorbell flush) runs
  // first, run() returns as soon as its promise is ready, and an eager start returns to its
  // caller, so a long spin budget never stalls the loop's thread.
  if (loop.busyPollShouldYield()) return true;
  if ((step + 1) % SPINS_PER_SCHED_YIELD == 0) {
    sched_yield();  // a peer preempted onto this CPU gets to produce what we wait for
  } else {
    cpuRelax();
  }
  return false;
}

// ---- OutgoingMessage ----

OutgoingMessage& OutgoingMessage::operator=(OutgoingMessage&& o) noexcept {
  if (this != &o) {
    abandon();
    owner_ = std::exchange(o.owner_, nullptr);
  }
  return *this;
}

capnp::MessageBuilder& OutgoingMessage::builder() {
  AGATE_REQUIRE(owner_ != nullptr, "use of an OutgoingMessage already sent, abandoned or moved");
  return *owner_->builder_;
}

Status OutgoingMessage::send(uint16_t tag) {
  AGATE_REQUIRE(owner_ != nullptr, "send() of an OutgoingMessage already sent or abandoned");
  return std::exchange(owner_, nullptr)->sendBuilt(tag);
}

Status OutgoingMessage::sendWithoutRing(uint16_t tag) {
  AGATE_REQUIRE(owner_ != nullptr, "send() of an OutgoingMessage already sent or abandoned");
  return std::exchange(owner_, nullptr)->sendBuilt(tag, false);
}

void OutgoingMessage::abandon() noexcept {
  if (MessageSender* owner = std::exchange(owner_, nullptr)) owner->abandonBuilt();
}

// ---- MessageSender ----

MessageSender::~MessageSender() {
  AGATE_REQUIRE(!builder_.has_value(), "MessageSender destroyed with an OutgoingMessage pending");
}

Result<OutgoingMessage> MessageSender::startIn(Result<std::span<std::byte>> frame) {
  if (!frame) return frame.error();
  builder_.emplace(asFrameWords(*frame));
  return OutgoingMessage(this);
}

static size_t frameBytesFor(size_t maxBytes) {
  return (maxBytes + WORD_BYTES - 1) / WORD_BYTES * WORD_BYTES;
}

Result<OutgoingMessage> MessageSender::tryStartMessage(size_t maxBytes) {
  AGATE_REQUIRE(!builder_.has_value(), "a second message started before the first was sent");
  return startIn(sender_.tryReserve(frameBytesFor(maxBytes)));
}

Result<OutgoingMessage> MessageSender::startMessage(size_t maxBytes, const WaitPolicy& policy) {
  AGATE_REQUIRE(!builder_.has_value(), "a second message started before the first was sent");
  return startIn(sender_.reserve(frameBytesFor(maxBytes), policy));
}

Promise<OutgoingMessage> MessageSender::startMessageAsync(EventLoop& loop, size_t maxBytes,
                                                          AsyncWaitPolicy policy) {
  AGATE_REQUIRE(!builder_.has_value(), "a second message started before the first was sent");
  const size_t bytes = frameBytesFor(maxBytes);
  // A ring still owed (commitWithoutRing) is rung first: the receiver must hear of what fills
  // the ring before this waits for it to drain.
  sender_.ringPending();
  // The reservation is taken in the same step that completes the promise, so a dropped promise
  // never holds one.
  Result<std::span<std::byte>> frame = co_await awaitAttempt<std::span<std::byte>>(
      loop, sender_.spaceDoorbell(), sender_.peerFd(), policy,
      [this, bytes] { return sender_.tryReserve(bytes); },
      [this] { (void)sender_.checkPeerExited(); });
  co_return startIn(std::move(frame));
}

Status MessageSender::sendBuilt(uint16_t tag, bool ring) {
  Result<size_t> used = builder_->tryFinish();
  builder_.reset();
  if (!used) {
    sender_.abandon();  // the ring zeroes a frame again when it next reserves it
    return used.error();
  }
  if (ring) {
    sender_.commit(*used, tag);
  } else {
    sender_.commitWithoutRing(*used, tag);
  }
  return {};
}

void MessageSender::abandonBuilt() noexcept {
  builder_.reset();
  sender_.abandon();
}

// ---- IncomingMessage ----

IncomingMessage& IncomingMessage::operator=(IncomingMessage&& o) noexcept {
  if (this != &o) {
    reset();
    owner_ = std::exchange(o.owner_, nullptr);
    view_ = o.view_;
    bytes_ = o.bytes_;
    tag_ = o.tag_;
  }
  return *this;
}

Status IncomingMessage::validate() {
  if (view_) return {};
  AGATE_REQUIRE(owner_ != nullptr, "validate() on a dropped IncomingMessage");
  return owner_->validate(*this);
}

void IncomingMessage::reset() noexcept {
  if (MessageReceiver* owner = std::exchange(owner_, nullptr)) owner->finishMessage();
}

// ---- MessageReceiver ----

MessageReceiver::MessageReceiver(const Channel& channel, Receiver receiver,
                                 MessageReceiverOptions options)
    : receiver_(std::move(receiver)),
      deferReleases_(options.deferReleases),
      validateOnDemand_(options.validateOnDemand) {
  ReadPolicy policy = options.policy.value_or(
      channel.scope() == ChannelScope::SHARED ? ReadPolicy::COPY_IN : ReadPolicy::IN_PLACE);
  if (policy == ReadPolicy::IN_PLACE) {
    reader_.emplace(options.limits);
    return;
  }
  size_t words = channel.maxPayload() / WORD_BYTES;
  scratch_ = std::make_unique<capnp::word[]>(words);
  reader_.emplace(std::span<capnp::word>(scratch_.get(), words), options.limits);
}

MessageReceiver::~MessageReceiver() {
  AGATE_REQUIRE(!outstanding_, "MessageReceiver destroyed while an IncomingMessage lives");
}

Result<IncomingMessage> MessageReceiver::decode(Result<Frame> frame) {
  if (!frame) {
    if (frame.code() == Errc::WOULD_BLOCK) ++emptyReads_;
    if (frame.code() == Errc::PROTOCOL_ERROR) poison_ = frame.error();
    return frame.error();
  }
  Result<std::span<const std::byte>> taken = reader_->take(frame->payload);
  std::optional<MessageView> view;
  if (taken && !validateOnDemand_) {
    Result<MessageView> validated = reader_->validate(*taken);
    if (validated) {
      view = *validated;
    } else {
      taken = validated.error();
    }
  }
  if (!taken) {
    receiver_.release();
    poison_ = taken.error();
    return poison_;
  }
  // COPY_IN: the message now lives in the scratch; the frame goes back at once.
  const bool inPlace = reader_->policy() == ReadPolicy::IN_PLACE;
  if (!inPlace) releaseFrame();
  outstanding_ = true;
  holdsFrame_ = inPlace;
  return IncomingMessage(this, view, *taken, frame->tag);
}

Status MessageReceiver::validate(IncomingMessage& message) {
  if (poisoned()) return poison_;
  Result<MessageView> view = reader_->validate(message.bytes_);
  if (!view) {
    poison_ = view.error();
    return poison_;
  }
  message.view_ = *view;
  return {};
}

Result<IncomingMessage> MessageReceiver::tryReceive() {
  AGATE_REQUIRE(!outstanding_, "a message received before the previous one was dropped");
  if (poisoned()) return poison_;
  return decode(receiver_.tryReceive());
}

Result<IncomingMessage> MessageReceiver::receive(const WaitPolicy& policy) {
  AGATE_REQUIRE(!outstanding_, "a message received before the previous one was dropped");
  if (poisoned()) return poison_;
  return decode(receiver_.receive(policy));
}

Promise<IncomingMessage> MessageReceiver::receiveAsync(EventLoop& loop, AsyncWaitPolicy policy) {
  AGATE_REQUIRE(!outstanding_, "a message received before the previous one was dropped");
  if (poisoned()) co_return poison_;
  // Frames are only ever taken (and decoded) inside one synchronous attempt that also completes
  // this promise, so dropping it while parked takes nothing.
  co_return co_await awaitAttempt<IncomingMessage>(
      loop, receiver_.dataDoorbell(), receiver_.peerFd(), policy,
      [this] { return decode(receiver_.tryReceive()); },
      [this] { (void)receiver_.checkPeerExited(); });
}

void MessageReceiver::finishMessage() noexcept {
  outstanding_ = false;
  if (std::exchange(holdsFrame_, false)) releaseFrame();
}

void MessageReceiver::releaseFrame() noexcept {
  if (deferReleases_) {
    receiver_.releaseDeferred();  // published every quarter ring, and when found empty
  } else {
    receiver_.release();
  }
}

}  // namespace agate
