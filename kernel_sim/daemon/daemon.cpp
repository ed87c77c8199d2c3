#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <capnp/serialize.h>
#include <kj/exception.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <vector>

#include "agate/kernel/home.h"
#include "agate/runtime/doorbell.h"
#include "agate/runtime/fd_passing.h"
#include "kernel.capnp.h"
#include "syscalls.h"

namespace agate::kernel::daemon {
namespace {

// Frames served from one process per pass before the next process's turn (fairness).
constexpr int BATCH = 64;
// Busy passes between two non-blocking epoll polls (attaches, deaths, signals).
constexpr uint32_t EPOLL_POLL_PASSES = 256;
// The park's backstop: a process that withholds its doorbell wake delays only itself, by this.
constexpr int PARK_BACKSTOP_MS = 1000;
// The attach packet: an AttachRequest is a few words; anything above this is refused.
constexpr size_t ATTACH_PACKET_WORDS = 64;
// Every completion but an introspection answer fits here (an error with its detail text is the
// largest: a few words of struct and the text).
constexpr size_t SMALL_REPLY_WORDS = 64;
constexpr Rights REGISTRY_RIGHTS = Rights::READ | Rights::WRITE | Rights::GRANT;

bool printableName(capnp::Text::Reader name) {
  if (name.size() == 0 || name.size() > wire::MAX_NAME_BYTES) return false;
  for (char c : name)
    if (c < 0x20 || c > 0x7e) return false;
  return true;
}

void drainEventFd(int fd) {
  uint64_t count;
  while (::read(fd, &count, sizeof(count)) == sizeof(count)) {
  }
}

}  // namespace

KernelDaemon::KernelDaemon(const DaemonOptions& options)
    : options_(options),
      kernel_(Kernel::Options{.systemPages = options.systemPages,
                              .receiveLimit = options.receiveCaps}) {}

KernelDaemon::~KernelDaemon() {
  // Sessions first (they unwatch nothing: the epoll descriptor closes with us), then the socket.
  sessions_.clear();
  if (listen_.valid()) ::unlink(socketPath_.c_str());
  // The pidfile is ours while we hold kernel.lock (still held here): a clean exit leaves no
  // stale pid behind. kernel.lock itself stays: unlinking a held lock file would let a daemon
  // that opened it just before lock the unlinked file while a third one locks a fresh one.
  if (!pidPath_.empty()) ::unlink(pidPath_.c_str());
}

Result<std::unique_ptr<KernelDaemon>> KernelDaemon::tryCreate(const DaemonOptions& options) {
  std::unique_ptr<KernelDaemon> d(new KernelDaemon(options));
  AGATE_TRY(d->trySetUp());
  return d;
}

Status KernelDaemon::trySetUp() {
  const std::string& home = options_.home;
  if (::mkdir(home.c_str(), 0700) != 0 && errno != EEXIST)
    return Error::fromErrno(errno, "cannot create the kernel home directory");
  struct stat st {};
  if (::stat(home.c_str(), &st) != 0) return Error::fromErrno(errno, "cannot stat the home");
  if (!S_ISDIR(st.st_mode)) return Error(Errc::INVALID_ARGUMENT, "the home is not a directory");
  if (st.st_uid != ::geteuid())
    return Error(Errc::PERMISSION_DENIED, "the home directory belongs to another user");

  const std::string lockPath = home + "/" + KERNEL_LOCK_NAME;
  lock_.reset(::open(lockPath.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
  if (!lock_.valid()) return Error::fromErrno(errno, "cannot open kernel.lock");
  if (::flock(lock_.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return Error(Errc::ALREADY_EXISTS, "another agate-kernel serves this home");
    return Error::fromErrno(errno, "cannot lock kernel.lock");
  }

  // Many processes, each holding a socket, a pidfd, two rings (a memfd and two eventfds each)
  // and its regions: take every descriptor the hard limit allows.
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &nofile);
  }

  socketPath_ = home + "/" + KERNEL_SOCKET_NAME;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socketPath_.size() >= sizeof(addr.sun_path))
    return Error(Errc::INVALID_ARGUMENT, "the socket path is too long for a Unix socket");
  std::memcpy(addr.sun_path, socketPath_.c_str(), socketPath_.size() + 1);
  listen_.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listen_.valid()) return Error::fromErrno(errno, "socket() failed");
  ::unlink(socketPath_.c_str());  // stale: we hold the lock, so no daemon uses it
  if (::bind(listen_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return Error::fromErrno(errno, "cannot bind kernel.sock");
  if (::chmod(socketPath_.c_str(), 0600) != 0)
    return Error::fromErrno(errno, "cannot chmod kernel.sock");
  if (::listen(listen_.get(), 128) != 0) return Error::fromErrno(errno, "listen() failed");

  const std::string pidPath = home + "/" + KERNEL_PID_NAME;
  if (FILE* f = std::fopen(pidPath.c_str(), "we")) {
    std::fprintf(f, "%d\n", static_cast<int>(::getpid()));
    std::fclose(f);
    pidPath_ = pidPath;
  }

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &mask, nullptr) != 0)
    return Error::fromErrno(errno, "sigprocmask failed");
  signals_.reset(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!signals_.valid()) return Error::fromErrno(errno, "signalfd failed");

  epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) return Error::fromErrno(errno, "epoll_create1 failed");
  AGATE_TRY(tryWatch(listen_.get(), EPOLLIN, key(Key::LISTEN, 0)));
  AGATE_TRY(tryWatch(signals_.get(), EPOLLIN, key(Key::SIGNAL, 0)));

  // Scratch for decoding submissions and building completions, zeroed once.
  const uint64_t submissionMax = options_.submissionBytes / 2 - 8;
  const uint64_t completionMax = options_.completionBytes / 2 - 8;
  if (options_.submissionBytes < 4096 || options_.completionBytes < 4096)
    return Error(Errc::INVALID_ARGUMENT, "ring sizes below 4096 bytes");
  decodeScratch_.reset(new capnp::word[submissionMax / WORD_BYTES]());
  reader_ = std::make_unique<FrameReader>(
      std::span<capnp::word>(decodeScratch_.get(), submissionMax / WORD_BYTES));
  buildWords_ = completionMax / WORD_BYTES;
  buildScratch_.reset(new capnp::word[buildWords_]());

  if (options_.readyFd >= 0) {
    const char ready = 'R';
    (void)!::write(options_.readyFd, &ready, 1);
    ::close(options_.readyFd);
    options_.readyFd = -1;
  }
  return {};
}

Status KernelDaemon::tryWatch(int fd, uint32_t events, uint64_t k) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = k;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
    return Error::fromErrno(errno, "epoll_ctl ADD failed");
  return {};
}

void KernelDaemon::unwatch(int fd) {
  if (fd >= 0) (void)::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
}

void KernelDaemon::watchSocketWritable(Session& s, bool writable) {
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLRDHUP | (writable ? uint32_t{EPOLLOUT} : 0u);
  ev.data.u64 = key(Key::SOCKET, s.pid);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, s.socket.get(), &ev) != 0)
    doom(s, "lost its socket's epoll registration");
}

Status KernelDaemon::run() {
  using Clock = std::chrono::steady_clock;
  const auto pollFor = std::chrono::microseconds(options_.pollMicros);
  auto lastWork = Clock::now();
  uint32_t passes = 0;
  while (!stop_) {
    const bool progress = servePass();
    reapDoomed();
    if (++passes % EPOLL_POLL_PASSES == 0) {
      handleEvents(0);
      expirePending();
      reapDoomed();
    }
    if (progress) {
      lastWork = Clock::now();
      continue;
    }
    if (Clock::now() - lastWork < pollFor) {
      cpuRelax();
      continue;
    }
    // Park: announce, look once more, sleep only if that found nothing.
    const bool found = parkAnnounce();
    if (!found) handleEvents(parkTimeoutMs());
    parkCancel();
    expirePending();
    reapDoomed();
    lastWork = Clock::now();
  }
  return {};
}

void KernelDaemon::handleEvents(int timeoutMs) {
  epoll_event events[64];
  const int n = ::epoll_wait(epoll_.get(), events, 64, timeoutMs);
  for (int i = 0; i < n; ++i) {
    const uint64_t k = events[i].data.u64;
    const auto kind = static_cast<Key>(k & 0xff);
    const uint64_t id = k >> 8;
    const uint32_t flags = events[i].events;
    auto session = [&]() -> Session* {
      auto it = sessions_.find(static_cast<ProcessId>(id));
      return it == sessions_.end() ? nullptr : it->second.get();
    };
    switch (kind) {
      case Key::LISTEN:
        acceptConnections();
        break;
      case Key::SIGNAL: {
        signalfd_siginfo info;
        while (::read(signals_.get(), &info, sizeof(info)) == sizeof(info)) stop_ = true;
        break;
      }
      case Key::PENDING:
        attach(id);
        break;
      case Key::SOCKET:
        if (Session* s = session()) {
          // After attach the socket carries nothing towards the kernel: a packet is abuse, and
          // end of stream is a hang-up. Either way the process is gone for the kernel.
          if ((flags & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)) != 0) {
            doom(*s, "hung up");
          } else if ((flags & EPOLLIN) != 0) {
            doom(*s, "sent a packet on its socket after attach", Fault::ABUSE);
          } else if ((flags & EPOLLOUT) != 0 && s->socketFull) {
            s->socketFull = false;  // the outbox is retried on the next pass
            watchSocketWritable(*s, false);
          }
        }
        break;
      case Key::PIDFD:
        if (Session* s = session()) doom(*s, "exited");
        break;
      case Key::SUBMIT_BELL:
        if (Session* s = session()) drainEventFd(s->submitBell->eventFd());
        break;
      case Key::SPACE_BELL:
        if (Session* s = session()) drainEventFd(s->spaceBell->eventFd());
        break;
    }
  }
}

void KernelDaemon::acceptConnections() {
  for (;;) {
    Fd sock(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!sock.valid()) return;  // EAGAIN, or a transient failure: the next EPOLLIN retries
    const uint64_t id = nextPending_++;
    if (!tryWatch(sock.get(), EPOLLIN | EPOLLRDHUP, key(Key::PENDING, id))) continue;
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.attachTimeoutMs);
    pending_.emplace(id, Pending{std::move(sock), deadline});
  }
}

void KernelDaemon::refuse(int socket, const Error& e) {
  capnp::MallocMessageBuilder message;
  auto error = message.initRoot<wire::AttachReply>().initError();
  error.setCode(static_cast<uint16_t>(e.code));
  error.setDetail(e.detail);
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  (void)trySendPacket(socket, std::as_bytes(std::span(words.begin(), words.size())), {});
}

void KernelDaemon::expirePending() {
  if (pending_.empty()) return;
  const auto now = std::chrono::steady_clock::now();
  while (!pending_.empty() && pending_.begin()->second.deadline <= now) {
    Fd sock = std::move(pending_.begin()->second.socket);
    pending_.erase(pending_.begin());
    unwatch(sock.get());
    refuse(sock.get(), Error(Errc::TIMED_OUT, "attach did not complete in time"));
  }  // each socket closes here
}

int KernelDaemon::parkTimeoutMs() const {
  if (pending_.empty()) return PARK_BACKSTOP_MS;
  const auto left = pending_.begin()->second.deadline - std::chrono::steady_clock::now();
  // Rounded up, so the wake finds the deadline passed rather than a millisecond short of it.
  const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
  return static_cast<int>(std::clamp<long long>(ms, 0, PARK_BACKSTOP_MS));
}

void KernelDaemon::attach(uint64_t pendingId) {
  auto it = pending_.find(pendingId);
  if (it == pending_.end()) return;
  Fd sock = std::move(it->second.socket);
  const auto deadline = it->second.deadline;
  pending_.erase(it);
  unwatch(sock.get());

  capnp::word packet[ATTACH_PACKET_WORDS];
  Fd stray[1];
  auto received = tryReceivePacket(sock.get(), std::as_writable_bytes(std::span(packet)), stray);
  if (!received) {
    if (received.code() == Errc::WOULD_BLOCK) {  // spurious wakeup: keep waiting for it
      if (tryWatch(sock.get(), EPOLLIN | EPOLLRDHUP, key(Key::PENDING, pendingId)))
        pending_.emplace(pendingId, Pending{std::move(sock), deadline});
      return;
    }
    if (received.code() == Errc::PROTOCOL_ERROR) refuse(sock.get(), received.error());
    return;  // hung up before attaching: nothing to undo
  }
  if (received->fdCount != 0)
    return refuse(sock.get(), Error(Errc::PROTOCOL_ERROR, "an attach request carries no fds"));
  if (received->bytes % WORD_BYTES != 0 || received->bytes == 0)
    return refuse(sock.get(), Error(Errc::PROTOCOL_ERROR, "an attach request is whole words"));

  ucred cred{};
  socklen_t credLen = sizeof(cred);
  if (::getsockopt(sock.get(), SOL_SOCKET, SO_PEERCRED, &cred, &credLen) != 0 || cred.pid <= 0)
    return refuse(sock.get(), Error(Errc::ATTACH_REFUSED, "no peer credentials"));
  if (cred.uid != ::geteuid())
    return refuse(sock.get(), Error(Errc::ATTACH_REFUSED, "the kernel serves its own uid only"));

  // Decode the request (kj exceptions stop at this boundary).
  uint32_t abi = 0;
  std::string name;
  bool nameOk = false;
  try {
    capnp::ReaderOptions limits;
    limits.traversalLimitInWords = ATTACH_PACKET_WORDS * 4;
    limits.nestingLimit = 4;
    capnp::FlatArrayMessageReader reader(
        kj::ArrayPtr<const capnp::word>(packet, received->bytes / WORD_BYTES), limits);
    auto request = reader.getRoot<wire::AttachRequest>();
    abi = request.getAbiVersion();
    auto text = request.getName();
    nameOk = printableName(text);
    if (nameOk) name.assign(text.cStr(), text.size());
  } catch (const kj::Exception&) {
    return refuse(sock.get(), Error(Errc::PROTOCOL_ERROR, "the attach request is malformed"));
  }
  if (abi != wire::ABI_VERSION)
    return refuse(sock.get(), Error(Errc::ATTACH_REFUSED, "unsupported ABI version"));
  if (!nameOk)
    return refuse(sock.get(),
                  Error(Errc::INVALID_ARGUMENT, "a process name is 1..64 printable ASCII bytes"));

  std::unique_ptr<Session> session;
  std::vector<Fd> fds;
  uint64_t bank = 0;
  uint64_t registry = 0;
  if (Status st = tryAttach(sock, cred, std::move(name), session, fds, bank, registry); !st)
    return refuse(sock.get(), st.error());

  capnp::MallocMessageBuilder message;
  auto attached = message.initRoot<wire::AttachReply>().initAttached();
  attached.setPid(session->pid);
  attached.setBank(bank);
  attached.setRegistry(registry);
  attached.setKernelPid(::getpid());
  attached.setSubmissionBytes(session->submissionRing->capacity());
  attached.setCompletionBytes(session->completionRing->capacity());
  kj::Array<capnp::word> words = capnp::messageToFlatArray(message);
  int raw[6];
  for (size_t i = 0; i < fds.size(); ++i) raw[i] = fds[i].get();
  Status sent =
      trySendPacket(session->socket.get(), std::as_bytes(std::span(words.begin(), words.size())),
                    std::span<const int>(raw, fds.size()));
  const ProcessId pid = session->pid;
  Session& s = *session;
  sessions_.emplace(pid, std::move(session));
  bool watched = sent.ok();
  watched = watched && tryWatch(s.socket.get(), EPOLLIN | EPOLLRDHUP, key(Key::SOCKET, pid)).ok();
  watched = watched && tryWatch(s.pidfd.get(), EPOLLIN, key(Key::PIDFD, pid)).ok();
  watched = watched && tryWatch(s.submitBell->eventFd(), EPOLLIN, key(Key::SUBMIT_BELL, pid)).ok();
  watched = watched && tryWatch(s.spaceBell->eventFd(), EPOLLIN, key(Key::SPACE_BELL, pid)).ok();
  if (!watched) doom(s, "could not be sent its attach reply");
}

Status KernelDaemon::tryAttach(Fd& socket, const ucred& cred, std::string name,
                               std::unique_ptr<Session>& out, std::vector<Fd>& replyFds,
                               uint64_t& replyBank, uint64_t& replyRegistry) {
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, cred.pid, 0)));
  if (!pidfd.valid()) return Error(Errc::DISCONNECTED, "the process exited before attaching");

  auto attached = kernel_.tryAttachProcess(options_.processPages);
  if (!attached) return attached.error();
  const ProcessId pid = attached->pid;
  // From here on, a failure must undo the attach.
  auto undo = [&](const Error& e) -> Status {
    (void)kernel_.tryKillProcess(pid);
    return e;
  };
  auto registry = kernel_.tryGrantRegistry(pid, REGISTRY_RIGHTS);
  if (!registry) return undo(registry.error());

  auto session = std::make_unique<Session>();
  session->pid = pid;
  session->osPid = cred.pid;
  session->uid = cred.uid;
  session->name = std::move(name);
  ChannelOptions ring{.scope = ChannelScope::SHARED,
                      .capacityBytes = options_.submissionBytes,
                      .maxSenders = 1,
                      .eventfdWakeups = true};
  auto submission = Channel::create(ring);
  if (!submission) return undo(submission.error());
  ring.capacityBytes = options_.completionBytes;
  auto completion = Channel::create(ring);
  if (!completion) return undo(completion.error());
  session->submissionRing = std::move(*submission);
  session->completionRing = std::move(*completion);
  auto receiver = session->submissionRing->attachReceiver();
  if (!receiver) return undo(receiver.error());
  auto sender = session->completionRing->attachSender();
  if (!sender) return undo(sender.error());
  session->submissions = std::move(*receiver);
  session->completions = std::move(*sender);
  // SHARED channels with eventfd wakeups always have both doorbells and their eventfds.
  session->submitBell = session->submissions.dataDoorbell();
  session->spaceBell = session->completions.spaceDoorbell();
  AGATE_ASSERT(session->submitBell != nullptr && session->spaceBell != nullptr &&
                   session->submitBell->eventFd() >= 0 && session->spaceBell->eventFd() >= 0,
               "a process's rings lack their eventfd doorbells");

  Result<Fd> exports[6] = {
      session->submissionRing->exportFd(),           session->submissionRing->exportDataEventFd(),
      session->submissionRing->exportSpaceEventFd(), session->completionRing->exportFd(),
      session->completionRing->exportDataEventFd(),  session->completionRing->exportSpaceEventFd()};
  for (Result<Fd>& e : exports) {
    if (!e) return undo(e.error());
    replyFds.push_back(std::move(*e));
  }
  session->socket = std::move(socket);
  session->pidfd = std::move(pidfd);
  replyBank = attached->bank.raw;
  replyRegistry = registry->raw;
  out = std::move(session);
  return {};
}

bool KernelDaemon::servePass() {
  bool progress = false;
  for (auto& [pid, s] : sessions_) progress |= serveSession(*s);
  for (auto& [pid, s] : sessions_) {
    if (!s->needsFlush) continue;
    s->needsFlush = false;
    s->completions.flush();
  }
  return progress;
}

bool KernelDaemon::serveSession(Session& s) {
  if (s.doomed) return false;
  bool progress = flushOutbox(s);
  for (int i = 0; i < BATCH && !s.doomed && s.outbox.empty(); ++i) {
    Result<Frame> frame = s.submissions.tryReceive();
    if (!frame) {
      if (frame.code() == Errc::WOULD_BLOCK) break;
      if (frame.code() == Errc::DISCONNECTED)
        doom(s, "closed its submission ring");
      else
        doom(s, "corrupted its submission ring", Fault::ABUSE);
      break;
    }
    progress = true;
    serveFrame(s, frame->payload);
  }
  s.submissions.flushReleases();
  return progress;
}

void KernelDaemon::serveFrame(Session& s, std::span<const std::byte> frame) {
  // Decode into private memory (COPY_IN), then give the ring space back at once.
  Result<MessageView> view = reader_->tryDecode(frame);
  s.submissions.releaseDeferred();

  size_t bytes = 0;
  uint64_t callId = 0;
  std::vector<Fd> fds;
  // Only introspection answers grow with the kernel's state; every other completion is built in
  // the first SMALL_REPLY_WORDS of the scratch (so only those are zeroed and checked).
  size_t replyWords = SMALL_REPLY_WORDS;
  if (view) {
    // The root and its discriminant are covered by validation (message.h): no throw, no second
    // pass through the decode boundary.
    const auto which = view->getRoot<wire::Syscall>().which();
    if (which == wire::Syscall::LIST_PROCESSES || which == wire::Syscall::LIST_BANKS ||
        which == wire::Syscall::LIST_CAPS || which == wire::Syscall::LIST_PROCESSES_PAGE ||
        which == wire::Syscall::LIST_BANKS_PAGE || which == wire::Syscall::LIST_CAPS_PAGE)
      replyWords = buildWords_;
  }
  {
    std::optional<FrameBuilder> builder;
    builder.emplace(std::span<capnp::word>(buildScratch_.get(), replyWords));
    auto reply = builder->initRoot<wire::Completion>();
    CallContext ctx{kernel_, s.pid, sessions_, reply, replyWords, {}};
    if (!view) {
      ctx.fail(Error(Errc::PROTOCOL_ERROR, "a submission frame is not a valid message"));
    } else {
      Status read = view->tryRead<wire::Syscall>([&](wire::Syscall::Reader call) {
        callId = call.getCallId();
        if (callId == 0) return ctx.fail(Error(Errc::INVALID_ARGUMENT, "call id 0 is reserved"));
        dispatch(ctx, call);
      });
      if (!read) {
        // Thrown while decoding (syscalls.h: before the kernel call): nothing changed.
        ctx.fds.clear();
        ctx.fail(read.error());
      }
    }
    reply.setCallId(callId);
    reply.setFdCount(static_cast<uint8_t>(ctx.fds.size()));
    Result<size_t> finished = builder->tryFinish();
    if (!finished) {
      // Only introspection answers can outgrow the largest completion frame.
      std::memset(buildScratch_.get(), 0, builder->usedBytes());
      builder.reset();
      builder.emplace(std::span<capnp::word>(buildScratch_.get(), SMALL_REPLY_WORDS));
      auto small = builder->initRoot<wire::Completion>();
      small.setCallId(callId);
      CallContext retry{kernel_, s.pid, sessions_, small, SMALL_REPLY_WORDS, {}};
      retry.fail(Error(Errc::MESSAGE_TOO_LARGE, "the answer exceeds a completion frame"));
      ctx.fds.clear();
      finished = builder->tryFinish();
      AGATE_ASSERT(finished.ok(), "an error completion fits any completion frame");
    }
    bytes = *finished;
    fds = std::move(ctx.fds);
    deliver(s, bytes, callId, fds);
    std::memset(buildScratch_.get(), 0, builder->usedBytes());
  }
  if (kernel_.hasPendingEvents()) deliverEvents();
}

void KernelDaemon::deliver(Session& s, size_t bytes, uint64_t callId, std::vector<Fd>& fds,
                           Koid openedBushel) {
  if (s.doomed) return;  // the caller's vector closes the descriptors
  const std::span<const std::byte> data(reinterpret_cast<const std::byte*>(buildScratch_.get()),
                                        bytes);
  if (s.outbox.empty() && tryCommit(s, data, callId, fds)) return;
  if (s.doomed) return;
  PendingCompletion pending;
  pending.words.resize(bytes / WORD_BYTES);
  std::memcpy(pending.words.data(), buildScratch_.get(), pending.words.size() * WORD_BYTES);
  pending.bytes = bytes;
  pending.callId = callId;
  pending.fds = std::move(fds);
  pending.openedBushel = openedBushel;
  s.outbox.push_back(std::move(pending));
}

// A bushel that died while its BUSHEL_OPENED still waits in the server's outbox (the server is
// not reading): the event goes, with its ring descriptors, and so does the BUSHEL_CLOSED that
// would follow it. Without this, a client opening and closing bushels in a loop would grow a
// stalled server's outbox (and the daemon's open descriptors) without bound, at no cost to
// itself. Returns whether it withdrew one.
bool KernelDaemon::withdrawOpened(Session& s, Koid bushel) {
  for (auto it = s.outbox.begin(); it != s.outbox.end(); ++it) {
    if (it->openedBushel != bushel) continue;
    s.outbox.erase(it);  // closes the descriptors
    return true;
  }
  return false;
}

bool KernelDaemon::tryCommit(Session& s, std::span<const std::byte> bytes, uint64_t callId,
                             std::vector<Fd>& fds) {
  Result<std::span<std::byte>> frame = s.completions.tryReserve(bytes.size());
  if (!frame) {
    // A receiver that detached (a process on its way out) is a death, not abuse; any other
    // refusal means the process corrupted the ring's shared state.
    if (frame.code() == Errc::DISCONNECTED)
      doom(s, "detached its completion ring", Fault::DEATH);
    else if (frame.code() != Errc::WOULD_BLOCK)
      doom(s, "broke its completion ring", Fault::ABUSE);
    return false;
  }
  if (!fds.empty()) {
    // The descriptors go first, so that they are queued when the completion is read.
    int raw[MAX_PACKET_FDS];
    AGATE_ASSERT(fds.size() <= MAX_PACKET_FDS, "%zu descriptors for one completion", fds.size());
    for (size_t i = 0; i < fds.size(); ++i) raw[i] = fds[i].get();
    std::byte id[sizeof(callId)];
    std::memcpy(id, &callId, sizeof(callId));  // little-endian on every supported target
    Status sent = trySendPacket(s.socket.get(), id, std::span<const int>(raw, fds.size()));
    if (!sent) {
      s.completions.abandon();
      if (sent.code() == Errc::WOULD_BLOCK) {
        // The process has not read earlier descriptors yet: wait for room, keep the order.
        s.socketFull = true;
        watchSocketWritable(s, true);
      } else {
        doom(s, "lost its socket");
      }
      return false;
    }
    fds.clear();  // the process holds duplicates now; ours close here
  }
  std::memcpy(frame->data(), bytes.data(), bytes.size());
  s.completions.commitDeferred(bytes.size());
  s.needsFlush = true;
  return true;
}

bool KernelDaemon::flushOutbox(Session& s) {
  bool progress = false;
  if (s.socketFull) return false;  // epoll says when the socket takes descriptors again
  while (!s.outbox.empty() && !s.doomed) {
    PendingCompletion& p = s.outbox.front();
    const std::span<const std::byte> data(reinterpret_cast<const std::byte*>(p.words.data()),
                                          p.bytes);
    if (!tryCommit(s, data, p.callId, p.fds)) break;
    s.outbox.pop_front();
    progress = true;
  }
  return progress;
}

void KernelDaemon::deliverEvents() {
  for (auto& [pid, s] : sessions_) {
    if (!kernel_.hasPendingEvents()) return;
    std::vector<KernelEvent> events = kernel_.takeEvents(pid);
    for (KernelEvent& e : events) {
      if (e.type == KernelEventType::BUSHEL_CLOSED && !s->outbox.empty() &&
          withdrawOpened(*s, e.object))
        continue;
      std::optional<FrameBuilder> builder;
      builder.emplace(std::span<capnp::word>(buildScratch_.get(), SMALL_REPLY_WORDS));
      auto reply = builder->initRoot<wire::Completion>();
      reply.setCallId(0);
      reply.setFdCount(static_cast<uint8_t>(e.fds.size()));
      auto event = reply.initEvent();
      switch (e.type) {
        case KernelEventType::BUSHEL_OPENED:
          event.setType(wire::EventType::BUSHEL_OPENED);
          break;
        case KernelEventType::BUSHEL_CLOSED:
          event.setType(wire::EventType::BUSHEL_CLOSED);
          break;
        case KernelEventType::SERVICE_GONE:
          event.setType(wire::EventType::SERVICE_GONE);
          break;
        case KernelEventType::INTRODUCED:
          event.setType(wire::EventType::INTRODUCED);
          break;
      }
      event.setBushel(e.object);
      event.setService(e.service);
      event.setPeer(e.peer);
      event.setCap(e.cap);
      Result<size_t> bytes = builder->tryFinish();
      AGATE_ASSERT(bytes.ok(), "an event fits any completion frame");
      deliver(*s, *bytes, 0, e.fds, e.type == KernelEventType::BUSHEL_OPENED ? e.object : 0);
      std::memset(buildScratch_.get(), 0, builder->usedBytes());
    }
  }
}

void KernelDaemon::doom(Session& s, const char* reason, Fault fault) {
  if (s.doomed) return;
  s.doomed = true;
  ++doomedCount_;
  s.doomReason = reason;
  // Deaths are normal; a process cut off for breaking the protocol is worth a line.
  if (fault == Fault::ABUSE)
    std::fprintf(stderr, "agate-kernel: disconnected process %u (%s, pid %d): %s\n", s.pid,
                 s.name.c_str(), static_cast<int>(s.osPid), reason);
}

void KernelDaemon::reapDoomed() {
  // Called after every pass: with nothing doomed (the steady state) it must not walk the sessions.
  if (doomedCount_ == 0) return;
  std::vector<ProcessId> doomed;
  for (auto& [pid, s] : sessions_)
    if (s->doomed) doomed.push_back(pid);
  doomedCount_ = 0;
  for (ProcessId pid : doomed) kill(pid);
}

void KernelDaemon::kill(ProcessId pid) {
  auto it = sessions_.find(pid);
  if (it == sessions_.end()) return;
  Session& s = *it->second;
  unwatch(s.socket.get());
  unwatch(s.pidfd.get());
  unwatch(s.submitBell->eventFd());
  unwatch(s.spaceBell->eventFd());
  (void)kernel_.tryKillProcess(pid);
  sessions_.erase(it);  // closes the socket, the pidfd, both rings and the outbox's descriptors
  if (kernel_.hasPendingEvents()) {
    deliverEvents();
    for (auto& [other, session] : sessions_) {
      if (!session->needsFlush) continue;
      session->needsFlush = false;
      session->completions.flush();
    }
  }
}

bool KernelDaemon::parkAnnounce() {
  for (auto& [pid, s] : sessions_) {
    if (s->doomed) continue;
    s->submitBell->announce(/*viaEventfd=*/true);
    s->submitAnnounced = true;
    if (!s->outbox.empty() && !s->socketFull) {
      s->spaceBell->announce(/*viaEventfd=*/true);
      s->spaceAnnounced = true;
    }
  }
  // A frame published before our announce rang nobody: look once more before sleeping.
  bool found = servePass();
  found |= doomedCount_ != 0;
  return found;
}

void KernelDaemon::parkCancel() {
  for (auto& [pid, s] : sessions_) {
    if (std::exchange(s->submitAnnounced, false)) s->submitBell->cancel(true);
    if (std::exchange(s->spaceAnnounced, false)) s->spaceBell->cancel(true);
  }
}

}  // namespace agate::kernel::daemon
