// A hostile process against agate-kernel: frames that are not messages, messages that do not
// match the schema, unknown calls, seeded random frames, corrupt ring indices, packets on the
// socket after attach, garbage at attach. The offender gets errors or is disconnected; another
// process keeps being served, and the kernel's books return to their baseline.
//
// The hostile side is a RawClient: it attaches by hand (the schema's handshake) and writes bytes
// straight into its submission ring, so nothing in agate::caps filters what it sends.
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <capnp/any.h>
#include <capnp/message.h>
#include <capnp/schema.h>
#include <capnp/serialize.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "agate/kernel/home.h"
#include "agate/runtime/fd_passing.h"
#include "agate/runtime/message.h"
#include "kernel.capnp.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using std::chrono::seconds;

struct Answer {
  uint64_t callId = 0;
  wire::Completion::Which which = wire::Completion::DONE;
  uint16_t error = 0;
  uint64_t handle = 0;      // the HANDLE arm
  bool fdsArrived = false;  // the completion's descriptors were on the socket
};

class RawClient {
 public:
  explicit RawClient(const std::string& home) {
    const std::string path = home + "/" + kernel::KERNEL_SOCKET_NAME;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    sock_.reset(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (::connect(sock_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return;
    capnp::MallocMessageBuilder message;
    auto request = message.initRoot<wire::AttachRequest>();
    request.setAbiVersion(wire::ABI_VERSION);
    request.setName("hostile");
    auto words = capnp::messageToFlatArray(message);
    if (!trySendPacket(sock_.get(), std::as_bytes(std::span(words.begin(), words.size())), {}))
      return;
    pollfd pfd{sock_.get(), POLLIN, 0};
    if (::poll(&pfd, 1, 5000) != 1) return;
    capnp::word packet[64];
    Fd fds[6];
    auto r = tryReceivePacket(sock_.get(), std::as_writable_bytes(std::span(packet)), fds);
    if (!r || r->fdCount != 6) return;
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(packet, r->bytes / 8));
    auto reply = reader.getRoot<wire::AttachReply>();
    if (!reply.isAttached()) return;
    pid_ = reply.getAttached().getPid();
    bank_ = reply.getAttached().getBank();
    dataEvent_ = Fd(::dup(fds[1].get()));
    auto sub = Channel::openShared(std::move(fds[0]), std::move(fds[1]), std::move(fds[2]));
    auto comp = Channel::openShared(std::move(fds[3]), std::move(fds[4]), std::move(fds[5]));
    if (!sub || !comp) return;
    sub_ = std::move(*sub);
    comp_ = std::move(*comp);
    tx_ = std::move(sub_->attachSender()).value();
    rx_ = std::move(comp_->attachReceiver()).value();
    scratch_.reset(new capnp::word[comp_->maxPayload() / 8]());
    reader_.emplace(std::span<capnp::word>(scratch_.get(), comp_->maxPayload() / 8));
    attached_ = true;
  }

  bool attached() const { return attached_; }
  ProcessId pid() const { return pid_; }
  uint64_t bank() const { return bank_; }
  int socket() const { return sock_.get(); }

  bool sendBytes(std::span<const std::byte> bytes) { return tx_.send(bytes).ok(); }
  bool sendMessage(capnp::MessageBuilder& message) {
    auto segments = message.getSegmentsForOutput();
    if (segments.size() != 1) return false;
    return sendBytes(std::as_bytes(std::span(segments[0].begin(), segments[0].size())));
  }
  // A well-formed Syscall: readBank of our bank.
  bool sendReadBank(uint64_t callId) {
    capnp::MallocMessageBuilder message;
    auto call = message.initRoot<wire::Syscall>();
    call.setCallId(callId);
    call.initReadBank().setBank(bank_);
    return sendMessage(message);
  }

  // The next completion (events skipped), or nothing after `timeout` or once disconnected.
  std::optional<Answer> next(std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    for (;;) {
      WaitPolicy policy;
      policy.timeout = timeout;
      auto frame = rx_.receive(policy);
      if (!frame) {
        lastError_ = frame.code();
        return std::nullopt;
      }
      auto view = reader_->tryDecode(frame->payload);
      rx_.release();
      if (!view) return std::nullopt;
      auto c = view->getRoot<wire::Completion>();
      bool fdsArrived = false;
      if (c.getFdCount() > 0) {  // the descriptors that came with it, already queued
        uint64_t id = 0;
        Fd fds[8];
        auto p = tryReceivePacket(sock_.get(), std::as_writable_bytes(std::span(&id, 1)), fds);
        fdsArrived = p.ok() && p->fdCount == c.getFdCount() && id == c.getCallId();
      }
      if (c.isEvent()) continue;
      Answer a{c.getCallId(), c.which(), c.isError() ? c.getError().getCode() : uint16_t{0},
               c.isHandle() ? c.getHandle() : 0, fdsArrived};
      return a;
    }
  }
  Errc lastError() const { return lastError_; }

  // The kernel closed our socket (hung up on us) within `limit`.
  bool hungUp(std::chrono::milliseconds limit = std::chrono::milliseconds(5000)) {
    pollfd pfd{sock_.get(), POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(limit.count())) != 1) return false;
    char b;
    return ::recv(sock_.get(), &b, 1, MSG_DONTWAIT) == 0 || (pfd.revents & POLLHUP) != 0;
  }

  Channel& submissionRing() { return *sub_; }
  Channel& completionRing() { return *comp_; }
  // Hangs up the completion ring as a process on its way out does (its receiver detaches).
  void detachCompletions() { rx_.detach(); }
  // Wakes a parked kernel without going through the (possibly corrupted) ring.
  void kick() {
    const uint64_t one = 1;
    (void)!::write(dataEvent_.get(), &one, sizeof(one));
  }

 private:
  Fd sock_;
  Fd dataEvent_;
  bool attached_ = false;
  ProcessId pid_ = 0;
  uint64_t bank_ = 0;
  std::unique_ptr<Channel> sub_;
  std::unique_ptr<Channel> comp_;
  Sender tx_;
  Receiver rx_;
  std::unique_ptr<capnp::word[]> scratch_;
  std::optional<FrameReader> reader_;
  Errc lastError_ = Errc::OK;
};

// The kernel's books with only `observer` attached: the system bank's usage.
uint64_t systemUsed(KernelConnection& observer) {
  auto banks = observer.sync().listBanks();
  return banks && !banks->empty() ? (*banks)[0].used : UINT64_MAX;
}

TEST(KernelHostile, FramesThatAreNotMessagesGetProtocolErrorsAndTheCallerStaysServed) {
  Watchdog dog("not messages", seconds(30));
  KernelProcess kernel;
  RawClient raw(kernel.home());
  ASSERT_TRUE(raw.attached());
  const std::byte odd[13] = {};
  ASSERT_TRUE(raw.sendBytes(odd));  // not whole words
  std::vector<std::byte> ones(64, std::byte{0xff});
  ASSERT_TRUE(raw.sendBytes(ones));  // a root pointer that is no struct
  capnp::MallocMessageBuilder listRoot;
  listRoot.initRoot<capnp::AnyPointer>().initAs<capnp::List<uint64_t>>(4);
  ASSERT_TRUE(raw.sendMessage(listRoot));  // a valid message whose root is a list
  for (int i = 0; i < 3; ++i) {
    auto a = raw.next();
    ASSERT_TRUE(a.has_value()) << i;
    EXPECT_EQ(a->callId, 0u);
    EXPECT_EQ(a->which, wire::Completion::ERROR);
    EXPECT_EQ(a->error, static_cast<uint16_t>(Errc::PROTOCOL_ERROR));
  }
  ASSERT_TRUE(raw.sendReadBank(5));
  auto a = raw.next();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->callId, 5u);
  EXPECT_EQ(a->which, wire::Completion::CREDIT);
}

TEST(KernelHostile, CallIdZeroAndTheNoneCallAreRefusedAsInvalidArguments) {
  Watchdog dog("call id zero", seconds(30));
  KernelProcess kernel;
  RawClient raw(kernel.home());
  ASSERT_TRUE(raw.attached());
  ASSERT_TRUE(raw.sendReadBank(0));
  capnp::MallocMessageBuilder none;
  none.initRoot<wire::Syscall>().setCallId(9);  // the zero arm: `none`
  ASSERT_TRUE(raw.sendMessage(none));
  auto a = raw.next();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->callId, 0u);
  EXPECT_EQ(a->error, static_cast<uint16_t>(Errc::INVALID_ARGUMENT));
  a = raw.next();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->callId, 9u);
  EXPECT_EQ(a->error, static_cast<uint16_t>(Errc::INVALID_ARGUMENT));
}

TEST(KernelHostile, SchemaMismatchAndUnknownCallsAreRefusedWithTheirCallId) {
  Watchdog dog("schema mismatch", seconds(30));
  KernelProcess kernel;
  RawClient raw(kernel.home());
  ASSERT_TRUE(raw.attached());
  {
    // registerService whose name is a list of words, not text: reading it throws in the kernel.
    capnp::MallocMessageBuilder message;
    auto call = message.initRoot<wire::Syscall>();
    call.setCallId(11);
    auto reg = call.initRegisterService();
    reg.setBank(raw.bank());
    message.getRoot<capnp::AnyStruct>().getPointerSection()[0].initAs<capnp::List<uint64_t>>(3);
    ASSERT_TRUE(raw.sendMessage(message));
  }
  {
    // A discriminant no schema version defines.
    capnp::MallocMessageBuilder message;
    message.initRoot<wire::Syscall>().setCallId(12);
    const uint32_t offset =
        capnp::Schema::from<wire::Syscall>().getProto().getStruct().getDiscriminantOffset();
    auto data = message.getRoot<capnp::AnyStruct>().getDataSection();
    const uint16_t unknown = 999;
    std::memcpy(data.begin() + offset * 2, &unknown, sizeof(unknown));
    ASSERT_TRUE(raw.sendMessage(message));
  }
  auto a = raw.next();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->callId, 11u);
  EXPECT_EQ(a->error, static_cast<uint16_t>(Errc::PROTOCOL_ERROR));
  a = raw.next();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->callId, 12u);
  EXPECT_EQ(a->error, static_cast<uint16_t>(Errc::INVALID_ARGUMENT));
  ASSERT_TRUE(raw.sendReadBank(13));
  a = raw.next();
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->which, wire::Completion::CREDIT);
}

// Seeded: reproducible, and a different seed per run is one edit away.
TEST(KernelHostile, RandomFramesNeverStopTheKernelServingAnotherProcess) {
  Watchdog dog("random frames", seconds(60));
  KernelProcess kernel;
  EventLoop loop;
  auto observer = std::move(KernelConnection::tryAttach(loop, kernel.home(), "observer")).value();
  const uint64_t baseline = systemUsed(*observer);
  std::mt19937_64 rng(0xa6a7e);
  int answered = 0;
  int disconnected = 0;
  for (int round = 0; round < 8; ++round) {
    RawClient raw(kernel.home());
    ASSERT_TRUE(raw.attached());
    bool alive = true;
    for (int i = 0; i < 200 && alive; ++i) {
      std::vector<std::byte> bytes;
      if (rng() % 4 == 0) {
        // A real syscall with some of its bytes flipped.
        capnp::MallocMessageBuilder message;
        auto call = message.initRoot<wire::Syscall>();
        call.setCallId(1 + rng() % 1000);
        auto open = call.initOpenBushel();
        open.setName("svc");
        open.setBank(raw.bank());
        auto words = capnp::messageToFlatArray(message);
        auto all = words.asBytes().slice(8, words.asBytes().size());  // drop the segment table
        bytes.assign(reinterpret_cast<const std::byte*>(all.begin()),
                     reinterpret_cast<const std::byte*>(all.end()));
        for (int flips = 1 + rng() % 4; flips > 0; --flips)
          bytes[rng() % bytes.size()] = static_cast<std::byte>(rng());
      } else {
        bytes.resize(1 + rng() % 512);
        for (std::byte& b : bytes) b = static_cast<std::byte>(rng());
      }
      if (!raw.sendBytes(bytes)) break;
      auto a = raw.next();
      if (!a) {
        alive = false;
        ++disconnected;
        break;
      }
      ++answered;
    }
    // The other process is served all along.
    ASSERT_TRUE(observer->sync().readBank(observer->bank()).ok()) << round;
  }
  EXPECT_GT(answered, 0);
  // Every hostile process is gone; nothing it held is still charged.
  EXPECT_TRUE(
      agate::testing::eventually([&] { return observer->sync().listProcesses()->size() == 1; }));
  EXPECT_EQ(systemUsed(*observer), baseline);
  (void)disconnected;
}

TEST(KernelHostile, CorruptFrameHeaderDisconnectsTheOffenderOnly) {
  Watchdog dog("corrupt ring", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto observer = std::move(KernelConnection::tryAttach(loop, kernel.home(), "observer")).value();
  const uint64_t baseline = systemUsed(*observer);
  const int fds = kernel.openFds();
  const int maps = kernel.memfdMappings();
  {
    RawClient raw(kernel.home());
    ASSERT_TRUE(raw.attached());
    ASSERT_TRUE(raw.sendReadBank(1));
    ASSERT_TRUE(raw.next().has_value());
    // Garbage where the kernel polls for the next frame header: not committed, no valid lap.
    Channel& ring = raw.submissionRing();
    auto* control = reinterpret_cast<RingControl*>(ring.memory().data());
    const uint64_t head = std::atomic_ref<uint64_t>(control->head).load(std::memory_order_acquire);
    auto* next = reinterpret_cast<uint64_t*>(ring.memory().data() + RING_CONTROL_BYTES +
                                             (head & (ring.capacity() - 1)));
    std::atomic_ref<uint64_t>(*next).store(0x0123'4567'89ab'cdefull, std::memory_order_release);
    raw.kick();
    EXPECT_TRUE(raw.hungUp());
    EXPECT_NE(kernel.log().find("corrupted its submission ring"), std::string::npos)
        << kernel.log();
  }
  ASSERT_TRUE(observer->sync().readBank(observer->bank()).ok());
  EXPECT_TRUE(
      agate::testing::eventually([&] { return observer->sync().listProcesses()->size() == 1; }));
  EXPECT_EQ(systemUsed(*observer), baseline);
  EXPECT_EQ(kernel.openFds(), fds);
  EXPECT_EQ(kernel.memfdMappings(), maps);
}

// A receiver that detaches its completion ring is a process on its way out: the kernel hangs up
// on it as on any death, without reporting it as abuse, and its books return to baseline.
TEST(KernelHostile, DetachingTheCompletionRingIsADeathNotAbuse) {
  Watchdog dog("detached completions", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto observer = std::move(KernelConnection::tryAttach(loop, kernel.home(), "observer")).value();
  const uint64_t baseline = systemUsed(*observer);
  const int fds = kernel.openFds();
  {
    RawClient raw(kernel.home());
    ASSERT_TRUE(raw.attached());
    ASSERT_TRUE(raw.sendReadBank(1));
    ASSERT_TRUE(raw.next().has_value());
    raw.detachCompletions();
    ASSERT_TRUE(raw.sendReadBank(2));  // its completion finds the receiver gone
    EXPECT_TRUE(raw.hungUp());
  }
  EXPECT_TRUE(
      agate::testing::eventually([&] { return observer->sync().listProcesses()->size() == 1; }));
  EXPECT_EQ(systemUsed(*observer), baseline);
  EXPECT_EQ(kernel.openFds(), fds);
  EXPECT_EQ(kernel.log().find("disconnected process"), std::string::npos) << kernel.log();
}

// A head index the kernel cannot trust (misaligned, here) is noticed when the ring fills and the
// kernel reads it: the process broke its completion ring, is disconnected and reported; another
// process keeps being served.
TEST(KernelHostile, ACorruptCompletionHeadDisconnectsTheOffenderAndIsReported) {
  Watchdog dog("corrupt completion head", seconds(60));
  KernelProcess kernel;
  EventLoop loop;
  auto observer = std::move(KernelConnection::tryAttach(loop, kernel.home(), "observer")).value();
  const uint64_t baseline = systemUsed(*observer);
  {
    RawClient raw(kernel.home());
    ASSERT_TRUE(raw.attached());
    auto* control = reinterpret_cast<RingControl*>(raw.completionRing().memory().data());
    std::atomic_ref<uint64_t>(control->head).store(3, std::memory_order_release);
    // Completions are never read: the ring fills, and the kernel reads the head to find room.
    const uint64_t calls = raw.completionRing().capacity() / 16;
    for (uint64_t i = 1; i <= calls && !raw.hungUp(std::chrono::milliseconds(0)); ++i)
      ASSERT_TRUE(raw.sendReadBank(i) || raw.hungUp()) << i;
    EXPECT_TRUE(raw.hungUp());
    const std::string log = kernel.log();
    EXPECT_NE(log.find("disconnected process " + std::to_string(raw.pid())), std::string::npos)
        << log;
    EXPECT_NE(log.find("broke its completion ring"), std::string::npos) << log;
  }
  ASSERT_TRUE(observer->sync().readBank(observer->bank()).ok());
  EXPECT_TRUE(
      agate::testing::eventually([&] { return observer->sync().listProcesses()->size() == 1; }));
  EXPECT_EQ(systemUsed(*observer), baseline);
}

// Hundreds of completions with descriptors, none read for a while: the socket's buffer fills,
// the kernel holds the rest back (backpressure, not abuse), and every one arrives, in order.
TEST(KernelHostile, UnreadDescriptorsHoldCompletionsBackWithoutDisconnecting) {
  Watchdog dog("unread descriptors", seconds(60));
  KernelProcess kernel;
  RawClient raw(kernel.home());
  ASSERT_TRUE(raw.attached());
  {
    capnp::MallocMessageBuilder message;
    auto call = message.initRoot<wire::Syscall>();
    call.setCallId(1);
    auto create = call.initCreateRegion();
    create.setBank(raw.bank());
    create.setPages(1);
    ASSERT_TRUE(raw.sendMessage(message));
  }
  auto created = raw.next();
  ASSERT_TRUE(created.has_value());
  ASSERT_EQ(created->which, wire::Completion::HANDLE);
  constexpr int N = 600;
  for (int i = 0; i < N; ++i) {
    capnp::MallocMessageBuilder message;
    auto call = message.initRoot<wire::Syscall>();
    call.setCallId(100 + i);
    auto map = call.initMapRegion();
    map.setRegion(created->handle);
    map.setWritable(false);
    ASSERT_TRUE(raw.sendMessage(message));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the socket fills meanwhile
  for (int i = 0; i < N; ++i) {
    auto a = raw.next();
    ASSERT_TRUE(a.has_value()) << i << " lost: " << errcName(raw.lastError());
    EXPECT_EQ(a->callId, 100u + i);
    EXPECT_EQ(a->which, wire::Completion::REGION);
    EXPECT_TRUE(a->fdsArrived) << i;
  }
  ASSERT_TRUE(raw.sendReadBank(2));
  EXPECT_TRUE(raw.next().has_value());
}

// A server that stops reading its completions while a client opens and closes bushels to it in a
// loop (each costs the client nothing once closed): the BUSHEL_OPENED events the server has not
// taken are withdrawn with their ring descriptors when their bushel dies, so the daemon's open
// descriptors stay flat instead of growing with every bushel ever opened.
TEST(KernelHostile, AStalledServerDoesNotMakeTheKernelKeepDeadBushelsDescriptors) {
  Watchdog dog("stalled server", seconds(90));
  KernelProcess kernel;
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t server = ::fork();
  if (server == 0) {
    ::close(ready[0]);
    EventLoop loop;
    auto conn = KernelConnection::tryAttach(loop, kernel.home(), "stalled-server");
    if (!conn) ::_exit(2);
    auto service = (*conn)->sync().registerService((*conn)->registry(), "stalled", (*conn)->bank());
    if (!service) ::_exit(3);
    const char one = 1;
    if (::write(ready[1], &one, 1) != 1) ::_exit(4);
    ::pause();  // never reads a completion again
    ::_exit(0);
  }
  ::close(ready[1]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  ::close(ready[0]);
  {
    EventLoop loop;
    auto client = std::move(KernelConnection::tryAttach(loop, kernel.home(), "looper")).value();
    auto s = client->sync();
    // Enough rounds to fill the server's completion ring and socket first.
    for (int i = 0; i < 400; ++i) {
      auto bushel = s.openBushel(client->registry(), "stalled", client->bank());
      ASSERT_TRUE(bushel.ok()) << i << ": " << errcName(bushel.code());
      ASSERT_TRUE(s.deleteCap(*bushel).ok());
    }
    const int fdsBefore = kernel.openFds();
    for (int i = 0; i < 2000; ++i) {
      auto bushel = s.openBushel(client->registry(), "stalled", client->bank());
      ASSERT_TRUE(bushel.ok()) << i << ": " << errcName(bushel.code());
      ASSERT_TRUE(s.deleteCap(*bushel).ok());
    }
    EXPECT_LT(kernel.openFds() - fdsBefore, 16) << "descriptors of dead bushels were kept";
  }
  ::kill(server, SIGKILL);
  ::waitpid(server, nullptr, 0);
}

TEST(KernelHostile, APacketOnTheSocketAfterAttachDisconnectsTheSender) {
  Watchdog dog("socket abuse", seconds(30));
  KernelProcess kernel;
  RawClient raw(kernel.home());
  ASSERT_TRUE(raw.attached());
  const std::byte junk[8] = {};
  ASSERT_TRUE(trySendPacket(raw.socket(), junk, {}).ok());
  EXPECT_TRUE(raw.hungUp());
}

TEST(KernelHostile, GarbageAtAttachIsRefusedAndAttachesNothing) {
  Watchdog dog("attach garbage", seconds(30));
  KernelProcess kernel;
  EventLoop loop;
  auto observer = std::move(KernelConnection::tryAttach(loop, kernel.home(), "observer")).value();
  const std::string path = kernel.home() + "/" + kernel::KERNEL_SOCKET_NAME;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  for (int kind = 0; kind < 3; ++kind) {
    Fd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    std::vector<std::byte> bytes(kind == 0 ? 13 : 64, std::byte{0x5a});
    Fd extra(::eventfd(0, EFD_CLOEXEC));
    const int extraFd = extra.get();
    ASSERT_TRUE(
        trySendPacket(sock.get(), bytes,
                      kind == 2 ? std::span<const int>(&extraFd, 1) : std::span<const int>())
            .ok());
    pollfd pfd{sock.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&pfd, 1, 5000), 1);
    capnp::word packet[64];
    Fd none[1];
    auto r = tryReceivePacket(sock.get(), std::as_writable_bytes(std::span(packet)), none);
    ASSERT_TRUE(r.ok()) << kind;
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(packet, r->bytes / 8));
    auto reply = reader.getRoot<wire::AttachReply>();
    ASSERT_TRUE(reply.isError()) << kind;
    EXPECT_EQ(reply.getError().getCode(), static_cast<uint16_t>(Errc::PROTOCOL_ERROR)) << kind;
  }
  EXPECT_EQ(observer->sync().listProcesses()->size(), 1u);
}

}  // namespace
}  // namespace agate::caps
