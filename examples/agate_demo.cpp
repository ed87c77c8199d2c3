// agate-demo: two processes exchanging Cap'n Proto messages over shared-memory channels.
//
// The demo process creates two SHARED channels (pings one way, pongs the other), starts a second
// process — itself, re-executed with `--echo` — that inherits the two channel descriptors, and
// then measures:
//
//   * round trips with both sides spinning (the busy path: no system call at all),
//   * round trips with both sides parked on the futex doorbell between messages,
//   * one-way throughput of small messages.
//
// Every message is built in place in the ring with a FrameBuilder and read by the other process
// with a COPY_IN FrameReader, as any receiver of another process's memory must (message.h).
#include <fcntl.h>
#include <fmt/core.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "agate/runtime/channel.h"
#include "agate/runtime/message.h"
#include "demo.capnp.h"

namespace {

using agate::Channel;
using agate::ChannelOptions;
using agate::ChannelScope;
using agate::Errc;
using agate::Error;
using agate::Fd;
using agate::FrameBuilder;
using agate::FrameReader;
using agate::ReadPolicy;
using agate::Receiver;
using agate::Result;
using agate::Sender;
using agate::Status;
using agate::WaitPolicy;
using Clock = std::chrono::steady_clock;

constexpr uint64_t CHANNEL_BYTES = 64 * 1024;
constexpr size_t PING_FRAME_BYTES = 128;  // reserve per message: a Ping is 40-80 bytes

// Spin long enough that a busy peer is always caught; park at once.
constexpr WaitPolicy SPINNING{.spinIterations = 1'000'000'000};
constexpr WaitPolicy PARKING{.spinIterations = 0};

[[noreturn]] void die(const char* what, const Error& e) {
  char buf[256];
  fmt::print(stderr, "agate-demo: {}: {}\n", what, e.describe(buf, sizeof buf));
  std::exit(1);
}

template <class T>
T check(Result<T> r, const char* what) {
  if (!r.ok()) die(what, r.error());
  return std::move(r).value();
}

void check(Status s, const char* what) {
  if (!s.ok()) die(what, s.error());
}

// Builds one message of type T in place in the sender's ring and publishes it.
template <class T, class Fill>
Status sendMessage(Sender& tx, Fill&& fill) {
  auto frame = tx.reserve(PING_FRAME_BYTES);
  if (!frame.ok()) return frame.error();
  FrameBuilder builder(agate::asFrameWords(*frame));
  fill(builder.initRoot<T>());
  auto used = builder.tryFinish();
  if (!used.ok()) {
    tx.abandon();
    return used.error();
  }
  tx.commit(*used);
  return {};
}

// Receives one message of type T, validated in private memory, and hands its root to `use`.
template <class T, class Use>
Status receiveMessage(Receiver& rx, FrameReader& reader, const WaitPolicy& policy, Use&& use) {
  auto frame = rx.receive(policy);
  if (!frame.ok()) return frame.error();
  auto view = reader.tryDecode(frame->payload);
  rx.release();  // COPY_IN: the message now lives in the reader's scratch
  if (!view.ok()) return view.error();
  return view->tryRead<T>(std::forward<Use>(use));
}

// The echo process: answers every ping with a pong until told the sender is done.
int runEcho(int pingFd, int pongFd, pid_t parent) {
  auto pings = check(Channel::openShared(Fd(pingFd)), "open ping channel");
  auto pongs = check(Channel::openShared(Fd(pongFd)), "open pong channel");
  Receiver rx = check(pings->attachReceiver(), "attach ping receiver");
  Sender tx = check(pongs->attachSender(), "attach pong sender");
  check(rx.watchPeer(parent), "watch parent");
  check(tx.watchPeer(parent), "watch parent");
  std::vector<capnp::word> scratch(pings->maxPayload() / sizeof(capnp::word));
  FrameReader reader(scratch);
  const pid_t self = getpid();

  WaitPolicy policy = SPINNING;
  uint64_t oneWayCount = 0;
  for (;;) {
    uint64_t seq = 0;
    bool last = false, parked = false, oneWay = false;
    std::string text;
    Status got = receiveMessage<demo::Ping>(rx, reader, policy, [&](demo::Ping::Reader ping) {
      seq = ping.getSeq();
      last = ping.getLast();
      parked = ping.getParked();
      oneWay = ping.getOneWay();
      if (ping.hasText()) text = ping.getText().cStr();
    });
    if (got.code() == Errc::DISCONNECTED) return 0;  // the demo went away: nothing to answer
    check(got, "receive ping");
    policy = parked ? PARKING : SPINNING;
    if (oneWay && !last) {
      ++oneWayCount;
      continue;
    }
    check(sendMessage<demo::Pong>(tx,
                                  [&](demo::Pong::Builder pong) {
                                    pong.setSeq(oneWay ? oneWayCount : seq);
                                    pong.setEchoPid(self);
                                    if (!text.empty()) pong.setText("echo: " + text);
                                  }),
          "send pong");
    if (oneWay) oneWayCount = 0;
    if (last && !oneWay) return 0;
  }
}

struct Latency {
  double median, p99, p999;
};

Latency summarize(std::vector<int64_t>& ns) {
  std::sort(ns.begin(), ns.end());
  auto at = [&](double q) { return double(ns[size_t(q * double(ns.size() - 1))]); };
  return {at(0.5), at(0.99), at(0.999)};
}

// One ping and its pong; returns the round trip in nanoseconds.
int64_t roundTrip(Sender& tx, Receiver& rx, FrameReader& reader, uint64_t seq,
                  const WaitPolicy& policy, bool parked) {
  auto start = Clock::now();
  check(sendMessage<demo::Ping>(tx,
                                [&](demo::Ping::Builder ping) {
                                  ping.setSeq(seq);
                                  ping.setParked(parked);
                                }),
        "send ping");
  uint64_t echoed = 0;
  check(receiveMessage<demo::Pong>(rx, reader, policy,
                                   [&](demo::Pong::Reader pong) { echoed = pong.getSeq(); }),
        "receive pong");
  auto end = Clock::now();
  if (echoed != seq) {
    fmt::print(stderr, "agate-demo: pong {} answered ping {}\n", echoed, seq);
    std::exit(1);
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count();
}

int runDemo(const char* self) {
  ChannelOptions options{.scope = ChannelScope::SHARED, .capacityBytes = CHANNEL_BYTES};
  auto pings = check(Channel::create(options), "create ping channel");
  auto pongs = check(Channel::create(options), "create pong channel");
  Fd pingFd = check(pings->exportFd(), "export ping channel");
  Fd pongFd = check(pongs->exportFd(), "export pong channel");

  const pid_t parent = getpid();
  const pid_t child = fork();
  if (child < 0) die("fork", Error::fromErrno(errno, "fork"));
  if (child == 0) {
    // Hand the two descriptors to the echo process across exec.
    fcntl(pingFd.get(), F_SETFD, 0);
    fcntl(pongFd.get(), F_SETFD, 0);
    std::string a = std::to_string(pingFd.get()), b = std::to_string(pongFd.get()),
                p = std::to_string(parent);
    execl(self, self, "--echo", a.c_str(), b.c_str(), p.c_str(), static_cast<char*>(nullptr));
    fmt::print(stderr, "agate-demo: exec {}: {}\n", self, strerror(errno));
    _exit(127);
  }

  Sender tx = check(pings->attachSender(), "attach ping sender");
  Receiver rx = check(pongs->attachReceiver(), "attach pong receiver");
  check(tx.watchPeer(child), "watch echo process");
  check(rx.watchPeer(child), "watch echo process");
  std::vector<capnp::word> scratch(pongs->maxPayload() / sizeof(capnp::word));
  FrameReader reader(scratch);

  fmt::print("agate-demo: process {} started echo process {}; two SHARED channels of {} KiB\n",
             parent, child, CHANNEL_BYTES / 1024);

  // Hello: one message each way, to show the bytes crossed.
  check(sendMessage<demo::Ping>(tx,
                                [&](demo::Ping::Builder ping) {
                                  ping.setSeq(0);
                                  ping.setText(fmt::format("hello from process {}", parent));
                                }),
        "send hello");
  check(receiveMessage<demo::Pong>(rx, reader, SPINNING,
                                   [&](demo::Pong::Reader pong) {
                                     fmt::print("agate-demo: process {} answered \"{}\"\n",
                                                pong.getEchoPid(), pong.getText().cStr());
                                   }),
        "receive hello");

  uint64_t seq = 1;
  constexpr int WARMUP = 2'000, POLLED = 50'000, PARKED = 5'000;
  std::vector<int64_t> samples;
  samples.reserve(POLLED);
  for (int i = 0; i < WARMUP; ++i) (void)roundTrip(tx, rx, reader, seq++, SPINNING, false);
  for (int i = 0; i < POLLED; ++i)
    samples.push_back(roundTrip(tx, rx, reader, seq++, SPINNING, false));
  Latency polled = summarize(samples);

  samples.clear();
  for (int i = 0; i < PARKED; ++i)
    samples.push_back(roundTrip(tx, rx, reader, seq++, PARKING, true));
  Latency parked = summarize(samples);

  // One way: a burst of small pings; the echo process answers only the last, with its count.
  constexpr uint64_t ONE_WAY = 1'000'000;
  auto start = Clock::now();
  for (uint64_t i = 0; i < ONE_WAY; ++i) {
    check(sendMessage<demo::Ping>(tx,
                                  [&](demo::Ping::Builder ping) {
                                    ping.setSeq(i);
                                    ping.setOneWay(true);
                                    ping.setLast(i + 1 == ONE_WAY);
                                  }),
          "send one-way ping");
  }
  uint64_t counted = 0;
  check(receiveMessage<demo::Pong>(rx, reader, SPINNING,
                                   [&](demo::Pong::Reader pong) { counted = pong.getSeq(); }),
        "receive count");
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (counted + 1 != ONE_WAY) {
    fmt::print(stderr, "agate-demo: echo process counted {} of {} one-way pings\n", counted + 1,
               ONE_WAY);
    return 1;
  }

  // Done: the last ping ends the echo process.
  check(sendMessage<demo::Ping>(tx,
                                [&](demo::Ping::Builder ping) {
                                  ping.setSeq(seq);
                                  ping.setLast(true);
                                }),
        "send goodbye");
  int status = 0;
  waitpid(child, &status, 0);

  fmt::print("\n{:<44} {:>10} {:>10} {:>10}\n", "measured (Cap'n Proto message + answer)", "median",
             "p99", "p99.9");
  fmt::print("{:<44} {:>7.0f} ns {:>7.0f} ns {:>7.0f} ns\n", "round trip, both sides spinning",
             polled.median, polled.p99, polled.p999);
  fmt::print("{:<44} {:>7.1f} us {:>7.1f} us {:>7.1f} us\n", "round trip, both sides parked",
             parked.median / 1000, parked.p99 / 1000, parked.p999 / 1000);
  fmt::print("{:<44} {:>7.2f} M messages/s\n", "one way, Ping messages",
             double(ONE_WAY) / seconds / 1e6);
  fmt::print(
      "\nagate-demo: echo process {} exited with status {}. Figures beside their floors: "
      "bench/run rings\n",
      child, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::strcmp(argv[1], "--echo") == 0) {
    return runEcho(std::atoi(argv[2]), std::atoi(argv[3]), static_cast<pid_t>(std::atoi(argv[4])));
  }
  if (argc == 2 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
    fmt::print("usage: agate-demo\n");
    return 0;
  }
  if (argc != 1) {
    fmt::print(stderr, "usage: agate-demo\n");
    return 64;
  }
  return runDemo("/proc/self/exe");
}
