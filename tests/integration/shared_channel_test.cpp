// SHARED channels between real processes (fork): ordering over many wraps, parking and wakeup,
// a full ring with a slow consumer, a producer killed mid-frame, and a hostile producer that
// scribbles over the whole mapping.
//
// Watchdogs: every child arms alarm() and dies with its parent (PR_SET_PDEATHSIG); the parent
// arms alarm() per test and waits for children with a deadline, killing them when it passes;
// every blocking call in the parent carries a WaitPolicy timeout. ctest's TIMEOUT is the last
// resort.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <thread>

#include "agate/runtime/channel.h"

namespace agate {
namespace {

using namespace std::chrono_literals;

constexpr unsigned PARENT_WATCHDOG_S = 40;
constexpr unsigned CHILD_WATCHDOG_S = 30;

class ParentWatchdog {
 public:
  ParentWatchdog() { ::alarm(PARENT_WATCHDOG_S); }  // SIGALRM's default action ends the test
  ~ParentWatchdog() { ::alarm(0); }
};

// Runs `body` in a child process; its return value is the exit status.
pid_t spawn(const std::function<int()>& body) {
  pid_t pid = ::fork();
  AGATE_ASSERT(pid >= 0, "fork failed: %d", errno);
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::alarm(CHILD_WATCHDOG_S);
    ::_exit(body());
  }
  return pid;
}

// Waits for `pid` up to `limit`; kills it when the limit passes. Returns the exit status, or
// 128 + signal number when it was killed by a signal, or -1 after a timeout.
int waitChild(pid_t pid, std::chrono::milliseconds limit = 20s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      ADD_FAILURE() << "child " << pid << " ran past its deadline and was killed";
      return -1;
    }
    std::this_thread::sleep_for(1ms);
  }
}

const WaitPolicy PARENT_WAIT{1000, 10s, 20ms};

uint32_t patternByte(uint32_t seq, size_t i) { return (seq * 131 + i * 7) & 0xff; }

// Child side: opens the channel from the inherited descriptor and sends `count` messages whose
// sizes sweep 4..(4+span). Exit 0 on success, 1 on a failed call, 2 if it never parked when
// `mustPark`.
int sendSequence(int fd, uint32_t count, uint32_t span, bool mustPark) {
  Result<std::unique_ptr<Channel>> ch = Channel::openShared(Fd(fd));
  if (!ch) return 1;
  Result<Sender> tx = (*ch)->attachSender();
  if (!tx) return 1;
  for (uint32_t i = 0; i < count; ++i) {
    size_t size = 4 + (i * 13) % span;
    Result<std::span<std::byte>> buf = tx->reserve(size, WaitPolicy{1000, 10s, 20ms});
    if (!buf) return 1;
    std::memcpy(buf->data(), &i, 4);
    for (size_t j = 4; j < size; ++j) (*buf)[j] = std::byte(patternByte(i, j));
    tx->commit(size, static_cast<uint16_t>(i));
  }
  bool parked = tx->parkCount() > 0;
  tx->detach();
  return mustPark && !parked ? 2 : 0;
}

// Parent side: receives messages in order until DISCONNECTED; returns how many.
uint32_t receiveSequence(Receiver& rx, uint32_t span, std::chrono::microseconds delay = 0us) {
  uint32_t next = 0;
  for (;;) {
    Result<Frame> f = rx.receive(PARENT_WAIT);
    if (f.code() == Errc::DISCONNECTED) return next;
    EXPECT_TRUE(f.ok()) << errcName(f.code()) << " after " << next << " messages";
    if (!f.ok()) return next;
    uint32_t seq;
    EXPECT_EQ(f->payload.size(), 4 + (next * 13) % span);
    std::memcpy(&seq, f->payload.data(), 4);
    EXPECT_EQ(seq, next);
    EXPECT_EQ(f->tag, static_cast<uint16_t>(next));
    for (size_t j = 4; j < f->payload.size(); ++j)
      if (f->payload[j] != std::byte(patternByte(next, j))) {
        ADD_FAILURE() << "payload of message " << next << " corrupt at byte " << j;
        return next;
      }
    rx.release();
    ++next;
    if (delay > 0us) std::this_thread::sleep_for(delay);
  }
}

struct SharedSetup {
  std::unique_ptr<Channel> channel;
  Receiver rx;
  Fd exported;
  explicit SharedSetup(uint64_t capacity) {
    channel = Channel::create({ChannelScope::SHARED, capacity, 1}).value();
    rx = channel->attachReceiver().value();
    exported = channel->exportFd().value();
  }
};

TEST(SharedChannelProcesses, MessagesArriveInOrderOverManyWraps) {
  ParentWatchdog watchdog;
  SharedSetup s(4096);
  constexpr uint32_t COUNT = 100000;
  int fd = s.exported.get();
  pid_t child = spawn([fd] { return sendSequence(fd, COUNT, 300, false); });
  s.exported.reset();
  ASSERT_TRUE(s.rx.watchPeer(child).ok());
  EXPECT_EQ(receiveSequence(s.rx, 300), COUNT);
  EXPECT_EQ(waitChild(child), 0);
  auto* control = reinterpret_cast<RingControl*>(s.channel->memory().data());
  EXPECT_GT(control->tail / 4096, 1000u) << "the ring must have wrapped many times";
}

TEST(SharedChannelProcesses, ParkedConsumerIsWokenByTheDoorbell) {
  ParentWatchdog watchdog;
  SharedSetup s(4096);
  int fd = s.exported.get();
  pid_t child = spawn([fd] {
    Result<std::unique_ptr<Channel>> ch = Channel::openShared(Fd(fd));
    if (!ch) return 1;
    Sender tx = (*ch)->attachSender().value();
    std::this_thread::sleep_for(200ms);  // long enough for the parent to park
    uint32_t v = 7;
    if (!tx.send(std::as_bytes(std::span(&v, 1)), 1).ok()) return 1;
    tx.detach();
    return 0;
  });
  s.exported.reset();
  // No spinning and one 10 s park slice: only a FUTEX_WAKE can end the park in time.
  auto start = std::chrono::steady_clock::now();
  Result<Frame> f = s.rx.receive(WaitPolicy{0, 20s, 10s});
  auto waited = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(f.ok()) << errcName(f.code());
  EXPECT_EQ(f->tag, 1);
  EXPECT_GE(s.rx.parkCount(), 1u) << "the receiver must actually have parked";
  EXPECT_LT(waited, 5s) << "woken by the doorbell, not by the park slice";
  s.rx.release();
  EXPECT_EQ(s.rx.receive(PARENT_WAIT).code(), Errc::DISCONNECTED);
  EXPECT_EQ(waitChild(child), 0);
}

TEST(SharedChannelProcesses, FullRingParksTheProducerUntilTheSlowConsumerCatchesUp) {
  ParentWatchdog watchdog;
  SharedSetup s(1024);
  constexpr uint32_t COUNT = 400;
  int fd = s.exported.get();
  pid_t child = spawn([fd] { return sendSequence(fd, COUNT, 400, true); });
  s.exported.reset();
  ASSERT_TRUE(s.rx.watchPeer(child).ok());
  EXPECT_EQ(receiveSequence(s.rx, 400, 2ms), COUNT);
  EXPECT_EQ(waitChild(child), 0) << "exit 2: the producer never parked on a full ring";
}

TEST(SharedChannelProcesses, ProducerKilledMidFrameLeavesOnlyWholeFramesThenDisconnected) {
  ParentWatchdog watchdog;
  SharedSetup s(4096);
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  Fd readyRead(ready[0]), readyWrite(ready[1]);
  int fd = s.exported.get();
  int signal = readyWrite.get();
  pid_t child = spawn([fd, signal] {
    Result<std::unique_ptr<Channel>> ch = Channel::openShared(Fd(fd));
    if (!ch) return 1;
    Sender tx = (*ch)->attachSender().value();
    for (uint32_t i = 0; i < 10; ++i)
      if (!tx.send(std::as_bytes(std::span(&i, 1)), 1).ok()) return 1;
    Result<std::span<std::byte>> buf = tx.tryReserve(200);
    if (!buf) return 1;
    std::memset(buf->data(), 0xee, 100);  // half a frame, never committed
    char c = 1;
    if (::write(signal, &c, 1) != 1) return 1;
    ::pause();  // killed here
    return 1;
  });
  s.exported.reset();
  readyWrite.reset();
  ASSERT_TRUE(s.rx.watchPeer(child).ok());
  pollfd p{readyRead.get(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 10000), 1) << "the child never reached the middle of its frame";
  ::kill(child, SIGKILL);
  EXPECT_EQ(waitChild(child), 128 + SIGKILL);
  for (uint32_t i = 0; i < 10; ++i) {
    Result<Frame> f = s.rx.receive(PARENT_WAIT);
    ASSERT_TRUE(f.ok()) << errcName(f.code());
    ASSERT_EQ(f->payload.size(), 4u);
    uint32_t v;
    std::memcpy(&v, f->payload.data(), 4);
    EXPECT_EQ(v, i);
    s.rx.release();
  }
  auto start = std::chrono::steady_clock::now();
  Result<Frame> last = s.rx.receive(WaitPolicy{100, 10s, 20ms});
  EXPECT_EQ(last.code(), Errc::DISCONNECTED) << "the pid watch reports the dead sender";
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

TEST(SharedChannelProcesses, SenderBlockedOnADeadReceiverGetsDisconnected) {
  ParentWatchdog watchdog;
  auto channel = Channel::create({ChannelScope::SHARED, 256, 1}).value();
  Sender tx = channel->attachSender().value();
  Fd exported = channel->exportFd().value();
  int fd = exported.get();
  pid_t child = spawn([fd] {
    Result<std::unique_ptr<Channel>> ch = Channel::openShared(Fd(fd));
    if (!ch) return 1;
    Receiver rx = (*ch)->attachReceiver().value();
    ::pause();  // attached, never receives; killed here
    return 1;
  });
  exported.reset();
  ASSERT_TRUE(tx.watchPeer(child).ok());
  uint64_t filler = 0;
  while (tx.trySend(std::as_bytes(std::span(&filler, 1))).ok()) ++filler;
  EXPECT_EQ(filler, (256u - 8) / 16);  // the last 8 bytes are the terminator
  std::thread killer([child] {
    std::this_thread::sleep_for(100ms);
    ::kill(child, SIGKILL);
  });
  auto start = std::chrono::steady_clock::now();
  Status s = tx.send(std::as_bytes(std::span(&filler, 1)), 0, WaitPolicy{100, 10s, 20ms});
  killer.join();
  EXPECT_EQ(s.code(), Errc::DISCONNECTED);
  EXPECT_GE(tx.parkCount(), 1u);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  EXPECT_EQ(waitChild(child), 128 + SIGKILL);
}

// A producer that writes random bytes over the whole mapping (control block and data). The
// consumer must only ever see in-bounds frames, end with PROTOCOL_ERROR (or DISCONNECTED if the
// noise happened to set the closed bit while the ring looked empty), and keep working.
TEST(SharedChannelProcesses, HostileProducerCannotCrashTheConsumer) {
  ParentWatchdog watchdog;
  int protocolErrors = 0;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    SharedSetup s(4096);
    int fd = s.exported.get();
    pid_t child = spawn([fd, seed] {
      Result<std::unique_ptr<Channel>> ch = Channel::openShared(Fd(fd));
      if (!ch) return 1;
      Sender tx = (*ch)->attachSender().value();
      for (uint32_t i = 0; i < 20; ++i)
        if (!tx.send(std::as_bytes(std::span(&i, 1)), 1).ok()) return 1;
      std::span<std::byte> mem = (*ch)->memory();
      auto* words = reinterpret_cast<uint64_t*>(mem.data());
      size_t n = mem.size() / 8;
      uint64_t x = seed * 0x9e3779b97f4a7c15ull;
      auto end = std::chrono::steady_clock::now() + 300ms;
      while (std::chrono::steady_clock::now() < end) {
        for (int k = 0; k < 1000; ++k) {
          x ^= x << 13, x ^= x >> 7, x ^= x << 17;
          std::atomic_ref<uint64_t>(words[x % n]).store(x, std::memory_order_relaxed);
        }
      }
      ::_exit(0);  // no detach: the pid watch ends it
    });
    s.exported.reset();
    ASSERT_TRUE(s.rx.watchPeer(child).ok());
    std::span<std::byte> mem = s.channel->memory();
    Errc outcome = Errc::OK;
    uint64_t checksum = 0;
    for (int frames = 0; frames < 1'000'000; ++frames) {
      Result<Frame> f = s.rx.receive(WaitPolicy{100, 5s, 10ms});
      if (!f.ok()) {
        outcome = f.code();
        break;
      }
      const std::byte* begin = f->payload.data();
      ASSERT_GE(begin, mem.data() + RING_CONTROL_BYTES);
      ASSERT_LE(begin + f->payload.size(), mem.data() + mem.size());
      for (std::byte b : f->payload) checksum += static_cast<uint8_t>(b);
      s.rx.release();
    }
    EXPECT_TRUE(outcome == Errc::PROTOCOL_ERROR || outcome == Errc::DISCONNECTED)
        << errcName(outcome);
    if (outcome == Errc::PROTOCOL_ERROR) {
      ++protocolErrors;
      EXPECT_EQ(s.rx.tryReceive().code(), Errc::PROTOCOL_ERROR) << "the error must stick";
    }
    EXPECT_EQ(waitChild(child), 0);
    (void)checksum;
  }
  EXPECT_GE(protocolErrors, 1) << "random noise over the frame headers must be detected";

  // The consumer process is unharmed: a fresh, healthy channel works.
  SharedSetup healthy(4096);
  int fd = healthy.exported.get();
  pid_t child = spawn([fd] { return sendSequence(fd, 5000, 200, false); });
  healthy.exported.reset();
  ASSERT_TRUE(healthy.rx.watchPeer(child).ok());
  EXPECT_EQ(receiveSequence(healthy.rx, 200), 5000u);
  EXPECT_EQ(waitChild(child), 0);
}

}  // namespace
}  // namespace agate
