#include "agate/caps/kernel_connection.h"
#include "agate/caps/process_info.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <string_view>

#include "agate/kernel/home.h"
#include "agate/runtime/fd_passing.h"
#include "agate/runtime/message.h"
#include "kernel.capnp.h"

namespace agate::caps {
namespace {

using Which = wire::Completion::Which;

// Room for a Syscall frame without text: the root pointer, the struct (call id, discriminant,
// the largest group: three words) and slack.
constexpr size_t SYSCALL_BYTES = 128;
// A Syscall with a service name: the name's words (with its NUL) on top.
size_t syscallBytesWithName(std::string_view name) {
  return SYSCALL_BYTES + ((name.size() + 1 + 7) & ~size_t{7});
}
constexpr size_t ATTACH_REPLY_WORDS = 64;

detail::NotificationReply readNotificationInfo(wire::NotificationInfo::Reader n) {
  return {true, n.getBytes(), n.getWake(), n.getRing()};
}

// The descriptors of a notification, from `fds` starting at `first`, in the wire order (page,
// wake, ring), checked against what the completion said; PROTOCOL_ERROR if they do not match.
Result<MappedNotification> takeNotification(detail::Reply& r, size_t first) {
  const detail::NotificationReply& n = r.notification;
  const size_t count = 1 + (n.wake ? 1 : 0) + (n.ring ? 1 : 0);
  if (!n.present || r.fdCount != first + count)
    return Error(Errc::PROTOCOL_ERROR, "a notification's descriptors do not match its reply");
  size_t i = first;
  Fd page = std::move(r.fds[i++]);
  Fd wake = n.wake ? std::move(r.fds[i++]) : Fd();
  Fd ring = n.ring ? std::move(r.fds[i++]) : Fd();
  return MappedNotification::tryMap(std::move(page), n.bytes, std::move(wake), std::move(ring));
}

// The text of the last attach the kernel refused on this thread: the Error that tryAttach
// returns points here (no connection is left to keep it), valid until the next refusal.
thread_local std::array<char, 192> attachRefusal{};

Error attachRefused(Error e, std::string_view detail) {
  std::string_view head = e.detail != nullptr ? e.detail : "";
  size_t n = std::min(head.size(), attachRefusal.size() - 1);
  std::memcpy(attachRefusal.data(), head.data(), n);
  if (!detail.empty() && n + 2 < attachRefusal.size() - 1) {
    attachRefusal[n++] = ':';
    attachRefusal[n++] = ' ';
    for (char c : detail) {  // the kernel's text, printable only
      if (n == attachRefusal.size() - 1) break;
      attachRefusal[n++] = c >= 0x20 && c <= 0x7e ? c : '?';
    }
  }
  attachRefusal[n] = '\0';
  return Error(e.code, attachRefusal.data());
}

Error kernelError(uint16_t code) {
  // The kernel's Errc values are ours (one enum, stable values); an unknown one is a failure.
  if (code == 0 || code > static_cast<uint16_t>(Errc::WRONG_TYPE))
    return Error(Errc::FAILED, "the kernel refused the call with an unknown error code");
  return Error(static_cast<Errc>(code), "refused by agate-kernel");
}

Result<Fd> connectTo(const std::string& home) {
  const std::string path = home + "/" + kernel::KERNEL_SOCKET_NAME;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path))
    return Error(Errc::INVALID_ARGUMENT, "the kernel socket path is too long");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  Fd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!sock.valid()) return Error::fromErrno(errno, "socket() failed");
  if (::connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (errno == ENOENT || errno == ECONNREFUSED)
      return Error(Errc::DISCONNECTED, "no agate-kernel listens in this home");
    return Error::fromErrno(errno, "connect to kernel.sock failed");
  }
  return sock;
}

}  // namespace

KernelConnection::KernelConnection(EventLoop& loop) noexcept : loop_(loop) {}

KernelConnection::~KernelConnection() {
  pump_.reset();  // stop reading before the rings go
  disconnect(Error(Errc::CANCELLED, "the connection was closed"));
}

Result<std::unique_ptr<KernelConnection>> KernelConnection::tryAttach(
    EventLoop& loop, const std::string& home, std::string_view name, Duration timeout,
    AsyncWaitPolicy completionWait) {
  if (name.empty() || name.size() > wire::MAX_NAME_BYTES)
    return Error(Errc::INVALID_ARGUMENT, "a process name is 1..64 bytes");
  auto sock = connectTo(home);
  if (!sock) return sock.error();

  {
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<wire::AttachRequest>();
    request.setAbiVersion(wire::ABI_VERSION);
    request.setName(capnp::Text::Reader(name.data(), name.size()));
    kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
    AGATE_TRY(
        trySendPacket(sock->get(), std::as_bytes(std::span(words.begin(), words.size())), {}));
  }

  pollfd pfd{sock->get(), POLLIN, 0};
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count();
  int ready;
  do {
    ready = ::poll(&pfd, 1, static_cast<int>(ms));
  } while (ready < 0 && errno == EINTR);
  if (ready == 0) return Error(Errc::TIMED_OUT, "the kernel did not answer the attach");
  if (ready < 0) return Error::fromErrno(errno, "poll on kernel.sock failed");

  capnp::word packet[ATTACH_REPLY_WORDS];
  Fd fds[6];
  auto received = tryReceivePacket(sock->get(), std::as_writable_bytes(std::span(packet)), fds);
  if (!received) return received.error();
  if (received->bytes % WORD_BYTES != 0)
    return Error(Errc::PROTOCOL_ERROR, "the attach reply is not whole words");

  std::unique_ptr<KernelConnection> c(new KernelConnection(loop));
  uint64_t submissionBytes = 0;
  uint64_t completionBytes = 0;
  Error refused;
  try {
    capnp::FlatArrayMessageReader reader(
        kj::ArrayPtr<const capnp::word>(packet, received->bytes / WORD_BYTES));
    auto reply = reader.getRoot<wire::AttachReply>();
    if (reply.isError()) {
      capnp::Text::Reader detail = reply.getError().getDetail();
      refused = attachRefused(kernelError(reply.getError().getCode()),
                              std::string_view(detail.begin(), detail.size()));
    } else {
      auto a = reply.getAttached();
      c->pid_ = a.getPid();
      c->bank_ = Cap<SpaceBank>{a.getBank()};
      c->registry_ = Cap<Registry>{a.getRegistry()};
      c->kernelPid_ = a.getKernelPid();
      submissionBytes = a.getSubmissionBytes();
      completionBytes = a.getCompletionBytes();
    }
  } catch (const kj::Exception&) {
    return Error(Errc::PROTOCOL_ERROR, "the attach reply is malformed");
  }
  if (refused.code != Errc::OK) return refused;
  if (received->fdCount != 6)
    return Error(Errc::PROTOCOL_ERROR, "the attach reply carries six descriptors");

  auto submission = Channel::openShared(std::move(fds[0]), std::move(fds[1]), std::move(fds[2]));
  if (!submission) return submission.error();
  auto completion = Channel::openShared(std::move(fds[3]), std::move(fds[4]), std::move(fds[5]));
  if (!completion) return completion.error();
  if ((*submission)->capacity() != submissionBytes || (*completion)->capacity() != completionBytes)
    return Error(Errc::PROTOCOL_ERROR, "the rings do not match the attach reply");
  c->submissionRing_ = std::move(*submission);
  c->completionRing_ = std::move(*completion);
  auto sender = c->submissionRing_->attachSender();
  if (!sender) return sender.error();
  auto receiver = c->completionRing_->attachReceiver();
  if (!receiver) return receiver.error();
  // The kernel's death ends every wait on the completion ring (DISCONNECTED once drained).
  if (c->kernelPid_ > 0) (void)receiver->watchPeer(c->kernelPid_);
  c->tx_ = std::make_unique<MessageSender>(std::move(*sender));
  c->rx_ = std::make_unique<MessageReceiver>(*c->completionRing_, std::move(*receiver));
  c->socket_ = std::move(*sock);
  c->completionWait_ = completionWait;
  c->calls_.resize(64);
  for (uint32_t i = 64; i-- > 0;) c->freeCalls_.push_back(i);
  c->pump_.emplace(c->pump());
  return c;
}

// ---- Created objects ----

CreatedObjects::CreatedObjects(KernelConnection& kernel)
    : kernel_(kernel), record_(std::make_shared<Record>()) {}

CreatedObjects::~CreatedObjects() {
  if (kept_) return;
  // Calls still in flight find the record abandoned and destroy what they made (complete()).
  record_->abandoned = true;
  for (size_t i = record_->made.size(); i-- > 0;) kernel_.destroyDetached(record_->made[i]);
  record_->made.clear();
}

void CreatedObjects::keep() noexcept {
  kept_ = true;
  record_->made.clear();
}

// ---- Submitting ----

uint32_t KernelConnection::allocateCall() {
  if (freeCalls_.empty()) {
    // Every slot is in flight: grow (only past the deepest pipeline seen so far).
    const auto old = static_cast<uint32_t>(calls_.size());
    calls_.resize(old * 2);
    for (uint32_t i = old * 2; i-- > old;) freeCalls_.push_back(i);
  }
  const uint32_t index = freeCalls_.back();
  freeCalls_.pop_back();
  calls_[index].busy = true;
  return index;
}

void KernelConnection::freeCall(uint32_t index) noexcept {
  PendingCall& call = calls_[index];
  call.busy = false;
  call.detached = false;
  call.made.reset();
  call.fulfiller.reset();
  // A new generation: a late or forged completion for the old id finds a mismatch.
  if (++call.generation == 0) call.generation = 1;
  freeCalls_.push_back(index);
}

void KernelConnection::FlushTask::run() noexcept { connection_.tx_->sender().flush(); }

void KernelConnection::RestartPumpTask::run() noexcept {
  KernelConnection& c = connection_;
  if (!c.pumpIdle_ || c.dead_.code != Errc::OK) return;
  // Dropping the parked receive withdraws its announce and takes no frame (message_channel.h).
  c.pump_.reset();
  c.pump_.emplace(c.pump());
}

void KernelConnection::scheduleFlush() noexcept {
  if (!flushTask_.isQueued()) loop_.post(flushTask_);
}

void KernelConnection::flush() noexcept {
  if (tx_) tx_->sender().flush();
}

// Room probed for before waking waiters: a batch of ordinary calls.
constexpr size_t SPACE_PROBE_BYTES = 4096;
// Waiters woken per sighting of room (each takes about SYSCALL_BYTES).
constexpr size_t SPACE_WAKE_BATCH = SPACE_PROBE_BYTES / SYSCALL_BYTES;
// The backstop of a space wait: the kernel process's doorbell wake could be lost or withheld.
constexpr auto SPACE_PARK_SLICE = std::chrono::milliseconds(10);

bool KernelConnection::ringHasRoom() noexcept {
  Sender& sender = tx_->sender();
  Result<std::span<std::byte>> probe = sender.tryReserve(SPACE_PROBE_BYTES);
  if (!probe) return probe.code() != Errc::WOULD_BLOCK;  // an error: let the waiters see it
  sender.abandon();
  return true;
}

Promise<void> KernelConnection::awaitSpace(bool again) {
  auto [promise, fulfiller] = newPromiseAndFulfiller<void>();
  QueuedCall entry{std::move(fulfiller), DetachedCall::DESTROY, AnyCap{}, nextTicket_++};
  if (again) {
    // Behind the calls of its batch that went back before it, ahead of everything else.
    const size_t at = std::min<size_t>(requeuedAhead_++, spaceWaiters_.size());
    spaceWaiters_.insert(spaceWaiters_.begin() + static_cast<std::ptrdiff_t>(at), std::move(entry));
  } else {
    spaceWaiters_.push_back(std::move(entry));
  }
  watchSpaceIfIdle();
  return std::move(promise);
}

void KernelConnection::dropWaiting(uint64_t ticket, IfDropped call) noexcept {
  if (dead_.code != Errc::OK) return;  // the kernel reclaims it with the process
  if (ticket != 0) {
    // Still waiting: the entry becomes the detached call, in its place.
    for (QueuedCall& q : spaceWaiters_) {
      if (q.ticket != ticket || !q.waiter) continue;
      q.waiter.reset();
      q.detached = call.call;
      q.cap = call.cap;
      return;
    }
    // Woken and not written yet: it keeps its turn at the front, as a call that went back.
    if (wokenToWrite_ > 0) {
      const size_t at = std::min<size_t>(requeuedAhead_++, spaceWaiters_.size());
      spaceWaiters_.insert(spaceWaiters_.begin() + static_cast<std::ptrdiff_t>(at),
                           QueuedCall{std::nullopt, call.call, call.cap, 0});
      watchSpaceIfIdle();
      return;
    }
  }
  callDetached(call.call, call.cap);
}

void KernelConnection::watchSpaceIfIdle() {
  if (spaceWatch_ && !spaceWatch_->isReady()) return;
  tx_->sender().flush();  // what is committed must reach the kernel for room to come back
  spaceWatch_.emplace(watchSpace());
}

Promise<void> KernelConnection::watchSpace() {
  Doorbell* bell = tx_->sender().spaceDoorbell();
  AGATE_ASSERT(bell != nullptr, "a SHARED submission ring has a space doorbell");
  const bool viaEventfd = !loop_.hasNativeFutexWait() && bell->eventFd() >= 0;
  while (!spaceWaiters_.empty()) {
    if (dead_.code != Errc::OK) co_return {};  // disconnect() failed the waiters
    bool room;
    {
      // Announce, re-check, park (doorbell.h's waiter protocol); the guard withdraws the announce
      // on every exit, including this coroutine being destroyed while parked.
      struct Announce {
        Doorbell* bell;
        bool viaEventfd;
        uint32_t snapshot;
        ~Announce() { bell->cancel(viaEventfd); }
      } announce{bell, viaEventfd, bell->announce(viaEventfd)};
      room = ringHasRoom();
      if (!room) {
        if (viaEventfd) {
          (void)co_await loop_.deadline(loop_.waitReady(bell->eventFd(), POLLIN), SPACE_PARK_SLICE);
          uint64_t count;
          (void)!::read(bell->eventFd(), &count, sizeof(count));
        } else {
          auto* word = reinterpret_cast<const std::atomic<uint32_t>*>(bell->futexWord());
          (void)co_await loop_.deadline(
              loop_.waitFutex(*word, announce.snapshot, bell->processShared()), SPACE_PARK_SLICE);
        }
        room = ringHasRoom();
      }
    }
    if (!room) continue;
    size_t woken = 0;
    while (woken < SPACE_WAKE_BATCH && !spaceWaiters_.empty()) {
      QueuedCall& next = spaceWaiters_.front();
      if (next.waiter) {
        Fulfiller<void> waiter = std::move(*next.waiter);
        spaceWaiters_.pop_front();
        ++wokenToWrite_;
        waiter.fulfill({});
        ++woken;
        continue;
      }
      // A detached call, written here in its turn: after the calls woken before it reserved.
      if (woken > 0) break;
      const DetachedCall detached = next.detached;
      const AnyCap cap = next.cap;
      Result<uint32_t> written = tryWriteDetached(detached, cap);
      if (dead_.code != Errc::OK) co_return {};  // the ring broke: disconnect() emptied the queue
      if (written.code() == Errc::WOULD_BLOCK) break;  // full again: park
      spaceWaiters_.pop_front();
    }
    co_await loop_.yield();  // the woken calls reserve (and may queue again) before we look
    wokenToWrite_ = 0;
    requeuedAhead_ = 0;
  }
  co_return {};
}

template <class Fill>
Result<uint32_t> KernelConnection::tryWrite(uint32_t expect, size_t maxBytes, Fill fill) {
  Sender& sender = tx_->sender();
  Result<std::span<std::byte>> frame = sender.tryReserve(maxBytes);
  if (!frame) {
    if (frame.code() != Errc::WOULD_BLOCK) disconnect(frame.error());
    return frame.error();
  }
  // Build in the ring, commit deferred (one doorbell per turn), all in this synchronous step.
  const uint32_t index = allocateCall();
  const uint64_t callId = (uint64_t{calls_[index].generation} << 32) | (index + 1);
  Result<size_t> length = Error(Errc::MESSAGE_TOO_LARGE);
  {
    FrameBuilder builder(asFrameWords(*frame));
    auto call = builder.initRoot<wire::Syscall>();
    call.setCallId(callId);
    fill(call);
    length = builder.tryFinish();
  }
  if (!length) {
    sender.abandon();
    freeCall(index);
    return length.error();
  }
  sender.commitDeferred(*length);
  scheduleFlush();
  ++inFlight_;
  ++submitted_;
  calls_[index].expect = expect;
  if (pumpIdle_ && completionWait_.spinIterations > 0 && !restartPumpTask_.isQueued())
    loop_.post(restartPumpTask_);
  return index;
}

template <class Fill>
Promise<detail::Reply> KernelConnection::submit(uint32_t expect, size_t maxBytes, Fill fill,
                                                CreatedObjects* into,
                                                std::optional<IfDropped> ifDropped) {
  if (dead_.code != Errc::OK) co_return dead_;
  if (maxBytes > submissionRing_->maxPayload())
    co_return Error(Errc::MESSAGE_TOO_LARGE, "a syscall larger than a submission frame");
  // Armed while the call waits for room: this coroutine destroyed then (its caller went) leaves
  // `ifDropped` to go detached, in the call's turn (dropWaiting). Disarmed once the call is
  // written or can never be.
  struct DropGuard {
    KernelConnection* connection;
    std::optional<IfDropped> call;
    uint64_t ticket = 0;  // its entry in spaceWaiters_ while it waits
    ~DropGuard() {
      if (call) connection->dropWaiting(ticket, *call);
    }
  } guard{this, ifDropped};
  // FIFO: a new call queues behind calls already waiting for room, or woken and still to write.
  bool queued = mustQueue();
  bool woken = false;
  Result<uint32_t> index = Error(Errc::WOULD_BLOCK);
  for (;;) {
    if (!queued) {
      // A woken call writes only if none woken before it in its batch went back (the ring may
      // have room again by now, but it would overtake them).
      if (!woken || requeuedAhead_ == 0) index = tryWrite(expect, maxBytes, fill);
      if (woken && wokenToWrite_ > 0) --wokenToWrite_;  // 0: its batch is over already
      if (index.code() != Errc::WOULD_BLOCK) break;
    }
    guard.ticket = nextTicket_;  // the one awaitSpace gives its entry
    Status room = co_await awaitSpace(/*again=*/woken);
    woken = true;
    if (!room || dead_.code != Errc::OK) {
      guard.call.reset();
      co_return !room ? room.error() : dead_;
    }
    queued = false;
  }
  guard.call.reset();
  if (!index) co_return index.error();
  // Still in the step that wrote the call: nothing can have answered it yet.
  auto [promise, fulfiller] = newPromiseAndFulfiller<detail::Reply>();
  calls_[*index].fulfiller.emplace(std::move(fulfiller));
  if (into != nullptr) calls_[*index].made = into->record_;
  co_return co_await promise;
}

Result<uint32_t> KernelConnection::tryWriteDetached(DetachedCall detached, AnyCap cap) {
  Result<uint32_t> index = tryWrite(Which::DONE, SYSCALL_BYTES, [&](auto call) {
    if (detached == DetachedCall::DESTROY) {
      call.initDestroyObject().setCap(cap.handle);
    } else {
      call.initDeleteCap().setCap(cap.handle);
    }
  });
  if (index) calls_[*index].detached = true;
  return index;
}

void KernelConnection::callDetached(DetachedCall detached, AnyCap cap) noexcept {
  if (dead_.code != Errc::OK || !cap.valid()) return;  // the kernel reclaims it with the process
  if (!mustQueue() && tryWriteDetached(detached, cap).code() != Errc::WOULD_BLOCK)
    return;  // written (or the ring broke, and the connection with it)
  spaceWaiters_.push_back(QueuedCall{std::nullopt, detached, cap, 0});
  watchSpaceIfIdle();
}

void KernelConnection::destroyDetached(AnyCap cap) noexcept {
  callDetached(DetachedCall::DESTROY, cap);
}

void KernelConnection::deleteCapDetached(AnyCap cap) noexcept {
  callDetached(DetachedCall::DELETE_CAP, cap);
}

// ---- Completing ----

Promise<void> KernelConnection::pump() {
  for (;;) {
    AsyncWaitPolicy wait = completionWait_;
    pumpIdle_ = inFlight_ == 0;
    if (pumpIdle_) wait.spinIterations = 0;
    Result<IncomingMessage> in = co_await rx_->receiveAsync(loop_, wait);
    pumpIdle_ = false;
    if (!in) {
      disconnect(in.code() == Errc::DISCONNECTED ? Error(Errc::DISCONNECTED, "agate-kernel is gone")
                                                 : in.error());
      co_return {};
    }
    Status handled;
    Status read = in->tryRead<wire::Completion>(
        [&](wire::Completion::Reader completion) { handled = complete(completion); });
    if (!read) handled = read;
    if (!handled) {
      disconnect(handled.error());
      co_return {};
    }
  }
}

template <class Reader>
Status KernelConnection::complete(Reader c) {
  const uint64_t callId = c.getCallId();
  const uint8_t fdCount = c.getFdCount();
  Fd fds[MAX_PACKET_FDS];
  // OK, or why this completion's descriptors are missing (this process's table was full).
  Error fdsError;
  if (fdCount > 0) {
    // Sent before the completion was committed, so already queued on the socket.
    uint64_t echoed = 0;
    auto packet = tryReceivePacket(socket_.get(), std::as_writable_bytes(std::span(&echoed, 1)),
                                   std::span(fds, fdCount > MAX_PACKET_FDS ? 0 : fdCount),
                                   DroppedFds::REPORT);
    if (!packet || packet->bytes != sizeof(echoed) || echoed != callId ||
        (!packet->fdsDropped && packet->fdCount != fdCount))
      return Error(Errc::PROTOCOL_ERROR, "a completion's descriptors did not arrive with it");
    // The packet was read whole, so the socket stays in step with the ring: only what the
    // descriptors were for fails (the ones that arrived were closed).
    if (packet->fdsDropped)
      fdsError = Error(Errc::OUT_OF_MEMORY, EMFILE,
                       "the process's descriptor table is full (RLIMIT_NOFILE): the descriptors "
                       "of a kernel reply were dropped");
  }
  const auto which = c.which();

  if (callId == 0) {
    if (which == Which::ERROR) {
      ++unreadableFrameErrors_;
      lastErrorDetail_ = c.getError().getDetail().cStr();
      return {};
    }
    if (which != Which::EVENT) return Error(Errc::PROTOCOL_ERROR, "call id 0 without an event");
    auto e = c.getEvent();
    KernelEvent event;
    switch (e.getType()) {
      case wire::EventType::BUSHEL_OPENED:
        event.type = EventType::BUSHEL_OPENED;
        if (fdCount != 2) return Error(Errc::PROTOCOL_ERROR, "BUSHEL_OPENED without its rings");
        event.request = std::move(fds[0]);
        event.reply = std::move(fds[1]);
        event.error = fdsError;
        break;
      case wire::EventType::BUSHEL_CLOSED:
        event.type = EventType::BUSHEL_CLOSED;
        break;
      case wire::EventType::SERVICE_GONE:
        event.type = EventType::SERVICE_GONE;
        break;
      case wire::EventType::INTRODUCED:
        event.type = EventType::INTRODUCED;
        break;
      default:
        return {};  // an event type from a newer kernel: ignored
    }
    event.bushel = e.getBushel();
    event.service = e.getService();
    event.peer = e.getPeer();
    event.cap = e.getCap();
    if (eventWaiter_ && eventWaiter_->isCancelled()) eventWaiter_.reset();  // its caller left
    if (eventWaiter_) {
      Fulfiller<KernelEvent> waiter = std::move(*eventWaiter_);
      eventWaiter_.reset();
      waiter.fulfill(std::move(event));
    } else {
      events_.push_back(std::move(event));
    }
    return {};
  }

  const uint64_t index = (callId & 0xffffffffu) - 1;
  const auto generation = static_cast<uint32_t>(callId >> 32);
  if (index >= calls_.size() || !calls_[index].busy || calls_[index].generation != generation)
    return Error(Errc::PROTOCOL_ERROR, "a completion names no pending call");
  PendingCall& call = calls_[index];
  if (!call.fulfiller && !call.detached) {
    // Submitted but its coroutine has not stored the fulfiller yet: impossible, since the
    // kernel answers only committed frames and the store follows the commit synchronously.
    return Error(Errc::PROTOCOL_ERROR, "a completion arrived for an unsubmitted call");
  }
  std::optional<Fulfiller<detail::Reply>> fulfiller = std::move(call.fulfiller);
  const std::shared_ptr<CreatedObjects::Record> made = std::move(call.made);
  const uint32_t expect = call.expect;
  freeCall(static_cast<uint32_t>(index));
  --inFlight_;

  if (which == Which::ERROR) {
    auto error = c.getError();
    lastErrorDetail_ = error.getDetail().cStr();
    if (fulfiller) {
      fulfiller->fulfill(kernelError(error.getCode()));
    } else {
      ++detachedRefused_;
    }
    return {};
  }
  if (static_cast<uint32_t>(which) != expect)
    return Error(Errc::PROTOCOL_ERROR, "a completion's result does not match its call");
  detail::Reply reply;
  switch (which) {
    case Which::HANDLE:
      reply.value = c.getHandle();
      break;
    case Which::COUNT:
      reply.value = c.getCount();
      break;
    case Which::KOID:
      reply.value = c.getKoid();
      break;
    case Which::DONE:
      reply.value = c.getServer();  // bushelFds: the bushel's server; 0 for any other call
      break;
    case Which::CAP_INFO: {
      auto i = c.getCapInfo();
      reply.capInfo = {i.getKoid(), static_cast<ObjectType>(i.getType()),
                       static_cast<Rights>(i.getRights()), i.getBadge()};
      break;
    }
    case Which::CREDIT: {
      auto b = c.getCredit();
      reply.credit = {b.getUsed(), b.getLimit(), b.getReturned(), b.getDestroyed()};
      break;
    }
    case Which::REGION: {
      auto r = c.getRegion();
      reply.bytes = r.getBytes();
      reply.writable = r.getWritable();
      break;
    }
    case Which::PROCESSES:
      reply.nextCursor = c.getNextCursor();
      for (auto p : c.getProcesses()) reply.processes.push_back(decodeProcessInfo(p));
      break;
    case Which::BANKS:
      reply.nextCursor = c.getNextCursor();
      for (auto b : c.getBanks())
        reply.banks.push_back({b.getKoid(), b.getParent(), b.getUsed(), b.getLimit(),
                               b.getOwnPages(), b.getObjects(), b.getCaps()});
      break;
    case Which::CAPS:
      reply.nextCursor = c.getNextCursor();
      for (auto e : c.getCaps())
        reply.caps.push_back({e.getHandle(), e.getKoid(), static_cast<ObjectType>(e.getType()),
                              static_cast<Rights>(e.getRights()), e.getBadge(), e.getParentHandle(),
                              e.getParentPid()});
      break;
    case Which::NOTIFICATION:
      reply.notification = readNotificationInfo(c.getNotification());
      break;
    case Which::EVENT_BUFFER: {
      auto b = c.getEventBuffer();
      reply.bytes = b.getBytes();
      reply.slots = b.getSlots();
      reply.writable = b.getWritable();
      if (b.hasNotification()) reply.notification = readNotificationInfo(b.getNotification());
      break;
    }
    case Which::CREDIT_PAGE:
      reply.bytes = c.getCreditPage();
      break;
    default:
      return Error(Errc::PROTOCOL_ERROR, "a completion with an unexpected result");
  }
  // Recorded now, while no caller can have lost it: a create whose caller went is undone here.
  if (made && which == Which::HANDLE && reply.value != 0) {
    if (made->abandoned) {
      destroyDetached(AnyCap{reply.value});
    } else {
      made->made.push_back(AnyCap{reply.value});
    }
  }
  if (!fulfiller) return {};  // detached: nobody to tell
  if (fdsError.code != Errc::OK) {
    fulfiller->fulfill(fdsError);
    return {};
  }
  reply.fdCount = fdCount;
  for (size_t i = 0; i < fdCount && i < MAX_PACKET_FDS; ++i) reply.fds[i] = std::move(fds[i]);
  fulfiller->fulfill(std::move(reply));
  return {};
}

void KernelConnection::disconnect(Error e) noexcept {
  if (dead_.code == Errc::OK) dead_ = e;
  for (uint32_t i = 0; i < calls_.size(); ++i) {
    if (!calls_[i].busy) continue;
    std::optional<Fulfiller<detail::Reply>> fulfiller = std::move(calls_[i].fulfiller);
    freeCall(i);
    --inFlight_;
    if (fulfiller) fulfiller->fulfill(dead_);
  }
  if (eventWaiter_) {
    Fulfiller<KernelEvent> waiter = std::move(*eventWaiter_);
    eventWaiter_.reset();
    waiter.fulfill(dead_);
  }
  // Detached calls queued for room are dropped: the kernel is gone, or this process is closing
  // its connection (the kernel reclaims what it held when the process exits).
  while (!spaceWaiters_.empty()) {
    std::optional<Fulfiller<void>> waiter = std::move(spaceWaiters_.front().waiter);
    spaceWaiters_.pop_front();
    if (waiter) waiter->fulfill(dead_);
  }
}

// ---- The calls ----

Promise<uint64_t> KernelConnection::copyAny(AnyCap cap, Rights rights, uint64_t badge) {
  Result<detail::Reply> r = co_await submit(Which::HANDLE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initCopyCap();
    g.setCap(cap.handle);
    g.setRights(static_cast<uint32_t>(rights));
    g.setBadge(badge);
  });
  if (!r) co_return r.error();
  co_return r->value;
}

Promise<void> KernelConnection::deleteCap(AnyCap cap) {
  Result<detail::Reply> r = co_await submit(
      Which::DONE, SYSCALL_BYTES, [&](auto call) { call.initDeleteCap().setCap(cap.handle); },
      nullptr, IfDropped{DetachedCall::DELETE_CAP, cap});
  if (!r) co_return r.error();
  co_return {};
}

Promise<uint64_t> KernelConnection::revokeCap(AnyCap cap) {
  Result<detail::Reply> r = co_await submit(
      Which::COUNT, SYSCALL_BYTES, [&](auto call) { call.initRevokeCap().setCap(cap.handle); });
  if (!r) co_return r.error();
  co_return r->value;
}

Promise<uint64_t> KernelConnection::transferAny(AnyCap cap, ProcessId to, TransferMode mode) {
  Result<detail::Reply> r = co_await submit(Which::HANDLE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initTransferCap();
    g.setCap(cap.handle);
    g.setTo(to);
    g.setMode(mode == TransferMode::MOVE ? wire::TransferMode::MOVE : wire::TransferMode::COPY);
  });
  if (!r) co_return r.error();
  co_return r->value;
}

Promise<uint64_t> KernelConnection::setReceiveLimit(uint32_t limit) {
  Result<detail::Reply> r = co_await submit(
      Which::COUNT, SYSCALL_BYTES, [&](auto call) { call.initSetReceiveLimit().setLimit(limit); });
  if (!r) co_return r.error();
  co_return r->value;
}

Promise<CapInfo> KernelConnection::inspectCap(AnyCap cap) {
  Result<detail::Reply> r = co_await submit(
      Which::CAP_INFO, SYSCALL_BYTES, [&](auto call) { call.initInspectCap().setCap(cap.handle); });
  if (!r) co_return r.error();
  co_return r->capInfo;
}

Promise<void> KernelConnection::destroy(AnyCap cap) {
  Result<detail::Reply> r = co_await submit(
      Which::DONE, SYSCALL_BYTES, [&](auto call) { call.initDestroyObject().setCap(cap.handle); },
      nullptr, IfDropped{DetachedCall::DESTROY, cap});
  if (!r) co_return r.error();
  co_return {};
}

Promise<Cap<SpaceBank>> KernelConnection::createBank(Cap<SpaceBank> parent, uint64_t limit) {
  Result<detail::Reply> r = co_await submit(Which::HANDLE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initCreateBank();
    g.setBank(parent.handle);
    g.setLimit(limit);
  });
  if (!r) co_return r.error();
  co_return Cap<SpaceBank>{r->value};
}

Promise<void> KernelConnection::setBankLimit(Cap<SpaceBank> bank, uint64_t limit) {
  Result<detail::Reply> r = co_await submit(Which::DONE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initSetBankLimit();
    g.setBank(bank.handle);
    g.setLimit(limit);
  });
  if (!r) co_return r.error();
  co_return {};
}

Promise<BankCredit> KernelConnection::readBank(Cap<SpaceBank> bank) {
  Result<detail::Reply> r = co_await submit(
      Which::CREDIT, SYSCALL_BYTES, [&](auto call) { call.initReadBank().setBank(bank.handle); });
  if (!r) co_return r.error();
  co_return r->credit;
}

Promise<Cap<Region>> KernelConnection::createRegion(Cap<SpaceBank> bank, uint64_t pages) {
  Result<detail::Reply> r = co_await submit(Which::HANDLE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initCreateRegion();
    g.setBank(bank.handle);
    g.setPages(pages);
  });
  if (!r) co_return r.error();
  co_return Cap<Region>{r->value};
}

Promise<MappedRegion> KernelConnection::mapRegion(Cap<Region> region, bool writable) {
  Result<detail::Reply> r = co_await submit(Which::REGION, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initMapRegion();
    g.setRegion(region.handle);
    g.setWritable(writable);
  });
  if (!r) co_return r.error();
  if (!r->fds[0].valid())
    co_return Error(Errc::PROTOCOL_ERROR, "a region mapping arrived without its descriptor");
  co_return MappedRegion::tryMap(std::move(r->fds[0]), r->bytes, r->writable);
}

Promise<MappedCreditPage> KernelConnection::mapBankCredit(Cap<SpaceBank> bank) {
  Result<detail::Reply> r = co_await submit(Which::CREDIT_PAGE, SYSCALL_BYTES, [&](auto call) {
    call.initMapBankCredit().setBank(bank.handle);
  });
  if (!r) co_return r.error();
  if (r->fdCount != 1)
    co_return Error(Errc::PROTOCOL_ERROR, "a credit page arrived without its descriptor");
  co_return MappedCreditPage::tryMap(std::move(r->fds[0]), r->bytes);
}

Promise<void> KernelConnection::bindBankNotification(Cap<SpaceBank> bank,
                                                     Cap<Notification> notification) {
  Result<detail::Reply> r = co_await submit(Which::DONE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initBindBankNotification();
    g.setBank(bank.handle);
    g.setNotification(notification.handle);
  });
  if (!r) co_return r.error();
  co_return {};
}

Promise<void> KernelConnection::unbindBankNotification(Cap<SpaceBank> bank,
                                                       Cap<Notification> notification) {
  Result<detail::Reply> r = co_await submit(Which::DONE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initUnbindBankNotification();
    g.setBank(bank.handle);
    g.setNotification(notification.handle);
  });
  if (!r) co_return r.error();
  co_return {};
}

Promise<Cap<Notification>> KernelConnection::createNotification(Cap<SpaceBank> bank, bool wakeFd,
                                                                CreatedObjects* into) {
  Result<detail::Reply> r = co_await submit(
      Which::HANDLE, SYSCALL_BYTES,
      [&](auto call) {
        auto g = call.initCreateNotification();
        g.setBank(bank.handle);
        g.setWakeFd(wakeFd);
      },
      into);
  if (!r) co_return r.error();
  co_return Cap<Notification>{r->value};
}

Promise<MappedNotification> KernelConnection::mapNotification(Cap<Notification> notification) {
  Result<detail::Reply> r = co_await submit(Which::NOTIFICATION, SYSCALL_BYTES, [&](auto call) {
    call.initNotificationFds().setNotification(notification.handle);
  });
  if (!r) co_return r.error();
  co_return takeNotification(*r, 0);
}

Promise<void> KernelConnection::signal(Cap<Notification> notification) {
  Result<detail::Reply> r = co_await submit(Which::DONE, SYSCALL_BYTES, [&](auto call) {
    call.initSignal().setNotification(notification.handle);
  });
  if (!r) co_return r.error();
  co_return {};
}

Promise<Cap<EventBuffer>> KernelConnection::createEventBuffer(Cap<SpaceBank> bank, uint32_t slots,
                                                              Cap<Notification> notification,
                                                              CreatedObjects* into) {
  Result<detail::Reply> r = co_await submit(
      Which::HANDLE, SYSCALL_BYTES,
      [&](auto call) {
        auto g = call.initCreateEventBuffer();
        g.setBank(bank.handle);
        g.setSlots(slots);
        g.setNotification(notification.handle);
      },
      into);
  if (!r) co_return r.error();
  co_return Cap<EventBuffer>{r->value};
}

Promise<MappedEventBuffer> KernelConnection::mapEventBuffer(Cap<EventBuffer> buffer,
                                                            bool writable) {
  Result<detail::Reply> r = co_await submit(Which::EVENT_BUFFER, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initMapEventBuffer();
    g.setBuffer(buffer.handle);
    g.setWritable(writable);
  });
  if (!r) co_return r.error();
  if (r->fdCount < 1)
    co_return Error(Errc::PROTOCOL_ERROR, "an event buffer arrived without its descriptor");
  std::optional<MappedNotification> notification;
  if (r->notification.present) {
    auto n = takeNotification(*r, 1);
    if (!n) co_return n.error();
    notification.emplace(std::move(*n));
  } else if (r->fdCount != 1) {
    co_return Error(Errc::PROTOCOL_ERROR, "an event buffer's descriptors do not match its reply");
  }
  co_return MappedEventBuffer::tryMap(std::move(r->fds[0]), r->bytes, r->slots, r->writable,
                                      std::move(notification));
}

Promise<Cap<Registry>> KernelConnection::grantRegistry(Cap<Registry> registry, ProcessId to,
                                                       Rights rights) {
  Result<detail::Reply> r = co_await submit(Which::HANDLE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initGrantRegistry();
    g.setRegistry(registry.handle);
    g.setTo(to);
    g.setRights(static_cast<uint32_t>(rights));
  });
  if (!r) co_return r.error();
  co_return Cap<Registry>{r->value};
}

Promise<Cap<Service>> KernelConnection::registerService(Cap<Registry> registry,
                                                        std::string_view name,
                                                        Cap<SpaceBank> bank) {
  Result<detail::Reply> r =
      co_await submit(Which::HANDLE, syscallBytesWithName(name), [&](auto call) {
        auto g = call.initRegisterService();
        g.setRegistry(registry.handle);
        g.setName(capnp::Text::Reader(name.data(), name.size()));
        g.setBank(bank.handle);
      });
  if (!r) co_return r.error();
  co_return Cap<Service>{r->value};
}

Promise<Koid> KernelConnection::lookupService(Cap<Registry> registry, std::string_view name) {
  Result<detail::Reply> r =
      co_await submit(Which::KOID, syscallBytesWithName(name), [&](auto call) {
        auto g = call.initLookupService();
        g.setRegistry(registry.handle);
        g.setName(capnp::Text::Reader(name.data(), name.size()));
      });
  if (!r) co_return r.error();
  co_return r->value;
}

Promise<Cap<Bushel>> KernelConnection::openBushel(Cap<Registry> registry, std::string_view name,
                                                  Cap<SpaceBank> bank) {
  Result<detail::Reply> r =
      co_await submit(Which::HANDLE, syscallBytesWithName(name), [&](auto call) {
        auto g = call.initOpenBushel();
        g.setRegistry(registry.handle);
        g.setName(capnp::Text::Reader(name.data(), name.size()));
        g.setBank(bank.handle);
      });
  if (!r) co_return r.error();
  co_return Cap<Bushel>{r->value};
}

Promise<uint64_t> KernelConnection::growBushelState(Cap<Service> service, Koid bushel,
                                                    uint64_t pages) {
  Result<detail::Reply> r = co_await submit(Which::COUNT, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initGrowBushelState();
    g.setService(service.handle);
    g.setBushel(bushel);
    g.setPages(pages);
  });
  if (!r) co_return r.error();
  co_return r->value;
}

Promise<void> KernelConnection::closeBushel(Cap<Service> service, Koid bushel) {
  Result<detail::Reply> r = co_await submit(Which::DONE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initCloseBushel();
    g.setService(service.handle);
    g.setBushel(bushel);
  });
  if (!r) co_return r.error();
  co_return {};
}

Promise<BushelRings> KernelConnection::bushelRings(Cap<Bushel> bushel) {
  Result<detail::Reply> r = co_await submit(Which::DONE, SYSCALL_BYTES, [&](auto call) {
    call.initBushelFds().setBushel(bushel.handle);
  });
  if (!r) co_return r.error();
  if (!r->fds[0].valid() || !r->fds[1].valid())
    co_return Error(Errc::PROTOCOL_ERROR, "a bushel's rings arrived without their descriptors");
  co_return BushelRings{std::move(r->fds[0]), std::move(r->fds[1]),
                        static_cast<ProcessId>(r->value)};
}

Promise<Cap<Service>> KernelConnection::introduce(Cap<Bushel> bushel, ProcessId to) {
  Result<detail::Reply> r = co_await submit(Which::HANDLE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initIntroduce();
    g.setBushel(bushel.handle);
    g.setTo(to);
  });
  if (!r) co_return r.error();
  co_return Cap<Service>{r->value};
}

Promise<Cap<Bushel>> KernelConnection::openBushelVia(Cap<Service> service, Cap<SpaceBank> bank) {
  Result<detail::Reply> r = co_await submit(Which::HANDLE, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initOpenBushelVia();
    g.setService(service.handle);
    g.setBank(bank.handle);
  });
  if (!r) co_return r.error();
  co_return Cap<Bushel>{r->value};
}

template <class T, class Fetch>
Promise<std::vector<T>> KernelConnection::collectPages(Fetch fetch) {
  std::vector<T> all;
  uint64_t cursor = 0;
  for (;;) {
    Result<Page<T>> page = co_await fetch(cursor);
    if (!page) co_return page.error();
    all.insert(all.end(), std::make_move_iterator(page->entries.begin()),
               std::make_move_iterator(page->entries.end()));
    if (page->nextCursor == 0) co_return all;
    // Keys only grow: a cursor that does not would make this loop forever.
    if (page->nextCursor <= cursor)
      co_return Error(Errc::PROTOCOL_ERROR, "an introspection page's cursor went backwards");
    cursor = page->nextCursor;
  }
}

Promise<std::vector<ProcessInfo>> KernelConnection::listProcesses() {
  return collectPages<ProcessInfo>([this](uint64_t cursor) { return listProcessesPage(cursor); });
}

Promise<std::vector<BankInfo>> KernelConnection::listBanks() {
  return collectPages<BankInfo>([this](uint64_t cursor) { return listBanksPage(cursor); });
}

Promise<std::vector<CapEntry>> KernelConnection::listCaps(ProcessId pid) {
  return collectPages<CapEntry>([this, pid](uint64_t cursor) { return listCapsPage(pid, cursor); });
}

Promise<Page<ProcessInfo>> KernelConnection::listProcessesPage(uint64_t cursor, uint32_t limit) {
  Result<detail::Reply> r = co_await submit(Which::PROCESSES, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initListProcessesPage();
    g.setCursor(cursor);
    g.setLimit(limit);
  });
  if (!r) co_return r.error();
  co_return Page<ProcessInfo>{std::move(r->processes), r->nextCursor};
}

Promise<Page<BankInfo>> KernelConnection::listBanksPage(uint64_t cursor, uint32_t limit) {
  Result<detail::Reply> r = co_await submit(Which::BANKS, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initListBanksPage();
    g.setCursor(cursor);
    g.setLimit(limit);
  });
  if (!r) co_return r.error();
  co_return Page<BankInfo>{std::move(r->banks), r->nextCursor};
}

Promise<Page<CapEntry>> KernelConnection::listCapsPage(ProcessId pid, uint64_t cursor,
                                                       uint32_t limit) {
  Result<detail::Reply> r = co_await submit(Which::CAPS, SYSCALL_BYTES, [&](auto call) {
    auto g = call.initListCapsPage();
    g.setPid(pid);
    g.setCursor(cursor);
    g.setLimit(limit);
  });
  if (!r) co_return r.error();
  co_return Page<CapEntry>{std::move(r->caps), r->nextCursor};
}

Promise<KernelEvent> KernelConnection::nextEvent() {
  if (!events_.empty()) {
    KernelEvent e = std::move(events_.front());
    events_.pop_front();
    return readyPromise<KernelEvent>(std::move(e));
  }
  if (dead_.code != Errc::OK) return readyPromise<KernelEvent>(dead_);
  if (eventWaiter_ && eventWaiter_->isCancelled()) eventWaiter_.reset();  // e.g. a deadline hit
  AGATE_REQUIRE(!eventWaiter_, "nextEvent() while another nextEvent() waits");
  auto [promise, fulfiller] = newPromiseAndFulfiller<KernelEvent>();
  eventWaiter_.emplace(std::move(fulfiller));
  return std::move(promise);
}

ProcessInfo decodeProcessInfo(wire::ProcessInfo::Reader p) {
  ProcessInfo info{p.getPid(),         p.getOsPid(), p.getUid(),
                   p.getName().cStr(), p.getBank(),  p.getCaps()};
  auto services = p.getServices();
  const unsigned shown = std::min<unsigned>(services.size(), wire::MAX_SERVICES_LISTED);
  for (unsigned i = 0; i < shown; ++i) info.services.emplace_back(services[i].cStr());
  info.serviceCount = std::max<uint32_t>(p.getServiceCount(), shown);
  return info;
}

}  // namespace agate::caps
