// Agate's own figures in suite `rings`, each beside the floor it is compared with
// (Figure::ratioTo): SHARED channels between two forked processes (round trips polled and parked,
// one-way throughput), a LOCAL channel between two threads, a co_await round trip on the EventLoop
// and a Fiber switch.
//
// Cross-process scenarios create their Channels (SHARED scope, sealed memfd) in the driver before
// fork; each forked party attaches its own endpoints to the inherited mapping, exactly as a peer
// that opened the exported memfd would (openShared validates only once, at open: nothing on the
// measured path differs). A party's results travel back through a SharedMapping, as for the floors.
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include "agate/runtime/channel.h"
#include "agate/runtime/message.h"
#include "rings/floors.h"
#include "support/latency.h"
#include "support/process_pair.h"
#include "support/round_trips.h"
#include "support/timing.h"
#include "test_messages.capnp.h"

namespace agate::bench::rings {

namespace {

constexpr size_t CACHE_LINE = 64;
constexpr double NS_PER_S = 1e9;
constexpr uint64_t CHANNEL_BYTES = 256 * 1024;  // the same data area as the floor's raw ring
constexpr int MAX_WINDOWS = 64;

Result<std::unique_ptr<Channel>> makeChannel(ChannelScope scope) {
  return Channel::create(ChannelOptions{.scope = scope, .capacityBytes = CHANNEL_BYTES});
}

// Spins on `attempt` (a tryReceive or tryReserve) with the floors' SpinWait: pause, and a
// sched_yield every SpinWait::YIELD_EVERY checks so that a peer on the same vCPU can run. This is
// receive() with an unbounded spin budget (it never parks) and the floors' exact spin discipline,
// so the ratio compares like with like.
template <class Attempt>
auto spinUntilReady(Attempt&& attempt) -> decltype(attempt()) {
  SpinWait spin;
  for (;;) {
    auto r = attempt();
    if (r.code() != Errc::WOULD_BLOCK) return r;
    spin.once();
  }
}

// How a round-trip party waits for its peer.
enum class Waiting : uint8_t {
  POLLED,  // spin, never park
  PARKED,  // WaitPolicy{spinIterations = 0}: every wait announces and FUTEX_WAITs
};

// What one round-trip message carries.
enum class Payload : uint8_t {
  CAPNP,  // a Cap'n Proto test::Tree {value} (24 bytes) built in the frame, read with COPY_IN
  RAW,    // 8 raw bytes: the sequence number
};

// Bytes reserved for one round-trip message: the Tree root pointer, its data word and its (null)
// children pointer, 24 bytes, in one reservation of 32. Small on purpose: a reservation is zeroed
// whole, and every line of it the peer read last costs a transfer.
constexpr size_t RTT_RESERVE = 32;
constexpr size_t SCRATCH_WORDS = RTT_RESERVE / WORD_BYTES;

// One endpoint pair of a round-trip party: sends on one channel, receives on the other.
class RttParty {
 public:
  RttParty(Sender sender, Receiver receiver, Waiting waiting, Payload payload)
      : sender_(std::move(sender)),
        receiver_(std::move(receiver)),
        waiting_(waiting),
        payload_(payload),
        reader_(std::span(scratch_, SCRATCH_WORDS)) {}

  // Sends `value`. False when the channel broke.
  bool send(uint64_t value) {
    auto span = waiting_ == Waiting::POLLED
                    ? spinUntilReady([&] { return sender_.tryReserve(RTT_RESERVE); })
                    : sender_.reserve(RTT_RESERVE, PARKED_POLICY);
    if (!span) return false;
    if (payload_ == Payload::RAW) {
      std::memcpy(span->data(), &value, sizeof value);
      sender_.commit(sizeof value);
      return true;
    }
    FrameBuilder builder(asFrameWords(*span));
    builder.initRoot<test::Tree>().setValue(value);
    auto used = builder.tryFinish();
    if (!used) {
      sender_.abandon();
      return false;
    }
    sender_.commit(*used);
    return true;
  }

  // Receives one message into `value`. DISCONNECTED when the peer detached; other errors when
  // the channel broke or the message did not decode.
  Status receive(uint64_t& value) {
    auto frame = waiting_ == Waiting::POLLED
                     ? spinUntilReady([&] { return receiver_.tryReceive(); })
                     : receiver_.receive(PARKED_POLICY);
    if (!frame) return frame.error();
    Status status;
    if (payload_ == Payload::RAW) {
      if (frame->payload.size() != sizeof value) {
        status = Error(Errc::PROTOCOL_ERROR, "raw frame of the wrong size");
      } else {
        std::memcpy(&value, frame->payload.data(), sizeof value);
      }
    } else {
      // COPY_IN: the frame stays writable by the peer process, so it is read from a private copy.
      auto view = reader_.tryDecode(frame->payload);
      if (!view) {
        status = view.error();
      } else {
        value = view->getRoot<test::Tree>().getValue();
      }
    }
    receiver_.release();
    return status;
  }

 private:
  static constexpr WaitPolicy PARKED_POLICY{.spinIterations = 0};

  Sender sender_;
  Receiver receiver_;
  Waiting waiting_;
  Payload payload_;
  capnp::word scratch_[SCRATCH_WORDS];
  FrameReader reader_;
};

// A round trip of one message and its answer over two SHARED channels between two processes:
// A sends n on `ping`, B answers n + 1 on `pong`. A times each round trip; A's detaching ends B.
Status sharedRtt(const Scenario& scenario, const RunOptions& o, Report& report, Waiting waiting,
                 Payload payload, std::string_view floor) {
  auto ping = makeChannel(ChannelScope::SHARED);
  if (!ping) return ping.error();
  auto pong = makeChannel(ChannelScope::SHARED);
  if (!pong) return pong.error();
  auto partyA = [&](SampleBuffer& samples) -> int {
    auto sender = (*ping)->attachSender();
    auto receiver = (*pong)->attachReceiver();
    if (!sender || !receiver) return 2;
    auto party =
        std::make_unique<RttParty>(std::move(*sender), std::move(*receiver), waiting, payload);
    uint64_t next = 0;
    const bool ok = recordRoundTrips(o, samples, [&] {
      uint64_t answer = 0;
      if (!party->send(++next) || !party->receive(answer).ok()) return false;
      return answer == ++next;
    });
    return ok ? 0 : 1;  // destroying `party` detaches, which ends B
  };
  auto partyB = [&]() -> int {
    auto receiver = (*ping)->attachReceiver();
    auto sender = (*pong)->attachSender();
    if (!sender || !receiver) return 2;
    auto party =
        std::make_unique<RttParty>(std::move(*sender), std::move(*receiver), waiting, payload);
    for (;;) {
      uint64_t v = 0;
      Status s = party->receive(v);
      if (s.code() == Errc::DISCONNECTED) return 0;  // A is done
      if (!s.ok() || !party->send(v + 1)) return 1;
    }
  };
  return runRoundTrips(scenario, o, report, partyA, partyB, floor);
}

// ---------------------------------------------------------------------------------------------
// One-way throughput.

// What the consumer leaves for the driver; in shared memory, written by the consumer only.
struct alignas(CACHE_LINE) ThroughputResult {
  alignas(CACHE_LINE) std::atomic<uint32_t> stop{0};  // consumer → producer: done. Relaxed.
  alignas(CACHE_LINE) uint32_t windows = 0;
  uint64_t windowRecords[MAX_WINDOWS] = {};
  uint64_t windowNs[MAX_WINDOWS] = {};
};

// Frames published per flush: commitDeferred for each, flush() (one release store of the run's
// first frame header, which publishes the run, and one doorbell check) every BATCH frames or when
// the ring is full.
constexpr uint32_t BATCH = 16;

// Producer: stamps each RECORD-byte payload with its index, as fast as the ring takes them.
// Returns when the consumer says stop or detaches.
template <size_t RECORD>
int produceFrames(Sender& sender, const ThroughputResult& result) {
  uint64_t index = 0;
  uint32_t pending = 0;
  SpinWait spin;
  for (;;) {
    auto span = sender.tryReserve(RECORD);
    if (!span) {
      if (span.code() != Errc::WOULD_BLOCK) return span.code() == Errc::DISCONNECTED ? 0 : 1;
      sender.flush();
      pending = 0;
      if (result.stop.load(std::memory_order_relaxed) != 0) return 0;
      spin.once();
      continue;
    }
    std::memcpy(span->data(), &index, sizeof index);
    if constexpr (RECORD > sizeof index) {
      std::memset(span->data() + sizeof index, 0xA5, RECORD - sizeof index);
    }
    ++index;
    sender.commitDeferred(RECORD);
    if (++pending == BATCH) {
      sender.flush();
      pending = 0;
      if (result.stop.load(std::memory_order_relaxed) != 0) return 0;
    }
  }
}

// Consumer: copies every payload out and checks its stamp; times windows like the floor.
template <size_t RECORD>
int consumeFrames(Receiver& receiver, ThroughputResult& result, const RunOptions& o) {
  alignas(8) std::byte record[RECORD];
  uint64_t expected = 0;
  bool intact = true;
  auto popBatch = [&] {
    for (int i = 0; i < 1024; ++i) {
      auto frame = spinUntilReady([&] { return receiver.tryReceive(); });
      if (!frame || frame->payload.size() != RECORD) {
        intact = false;
        return false;
      }
      std::memcpy(record, frame->payload.data(), RECORD);
      benchmark::DoNotOptimize(record);
      uint64_t stamp;
      std::memcpy(&stamp, record, sizeof stamp);
      intact &= stamp == expected++;
      // Frames' space goes back at once; the doorbell (a locked RMW) is rung per BATCH.
      receiver.releaseDeferred();
      if (expected % BATCH == 0) receiver.flushReleases();
    }
    return true;
  };
  const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
  while (nowNs() < warmEnd) {
    if (!popBatch()) return 1;
  }
  const int windows = std::clamp(o.repetitions, 1, MAX_WINDOWS);
  const uint64_t windowNs = secondsToNs(o.measureSeconds) / static_cast<uint64_t>(windows);
  for (int w = 0; w < windows; ++w) {
    const uint64_t start = expected;
    const uint64_t t0 = nowNs();
    uint64_t t1;
    do {
      if (!popBatch()) return 1;
    } while ((t1 = nowNs()) - t0 < windowNs);
    result.windowRecords[w] = expected - start;
    result.windowNs[w] = t1 - t0;
  }
  result.windows = static_cast<uint32_t>(windows);
  result.stop.store(1, std::memory_order_relaxed);
  return intact ? 0 : 1;
}

// The lower median of the consumer's window rates, as one figure.
Status addRate(const Scenario& scenario, Report& report, const ThroughputResult& result,
               std::string_view floor) {
  const uint32_t windows = std::min<uint32_t>(result.windows, MAX_WINDOWS);
  std::vector<double> rates;
  for (uint32_t w = 0; w < windows; ++w) {
    if (result.windowNs[w] == 0) continue;
    rates.push_back(static_cast<double>(result.windowRecords[w]) * NS_PER_S /
                    static_cast<double>(result.windowNs[w]));
  }
  if (rates.empty()) return Error(Errc::FAILED, "the consumer measured no window");
  std::sort(rates.begin(), rates.end());
  report.add(Figure{.name = std::string(scenario.name),
                    .value = rates[(rates.size() - 1) / 2],
                    .unit = std::string(scenario.unit),
                    .scenario = std::string(scenario.name),
                    .samples = rates.size(),
                    .ratioTo = std::string(floor)});
  return {};
}

// One-way throughput of RECORD-byte payloads over a SHARED channel between two processes.
template <size_t RECORD>
Status sharedOneway(const Scenario& scenario, const RunOptions& o, Report& report,
                    std::string_view floor) {
  auto channel = makeChannel(ChannelScope::SHARED);
  if (!channel) return channel.error();
  auto mapping = SharedMapping::tryCreate(sizeof(ThroughputResult));
  if (!mapping) return mapping.error();
  auto* result = new (mapping->data()) ThroughputResult{};
  auto placement = runPair(
      o.pairOptions(),
      [&]() -> int {
        auto sender = (*channel)->attachSender();
        if (!sender) return 2;
        return produceFrames<RECORD>(*sender, *result);
      },
      [&]() -> int {
        auto receiver = (*channel)->attachReceiver();
        if (!receiver) return 2;
        return consumeFrames<RECORD>(*receiver, *result, o);
      });
  if (!placement) return placement.error();
  AGATE_TRY(addRate(scenario, report, *result, floor));
  report.addPlacement(scenario.name, {placement->cpuA, placement->cpuB});
  return {};
}

// One-way throughput of 32-byte payloads over a LOCAL channel between two threads of this process.
Status localOneway32(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto channel = makeChannel(ChannelScope::LOCAL);
  if (!channel) return channel.error();
  auto sender = (*channel)->attachSender();
  if (!sender) return sender.error();
  auto receiver = (*channel)->attachReceiver();
  if (!receiver) return receiver.error();
  auto result = std::make_unique<ThroughputResult>();
  std::atomic<int> producerCpu{-1};
  std::atomic<int> producerRc{0};
  std::thread producer([&] {
    producerRc.store(produceFrames<32>(*sender, *result), std::memory_order_relaxed);
    producerCpu.store(sched_getcpu(), std::memory_order_relaxed);
    sender->detach();
  });
  const int consumerRc = consumeFrames<32>(*receiver, *result, o);
  const int consumerCpu = sched_getcpu();
  receiver->detach();  // a producer waiting for space sees DISCONNECTED
  producer.join();
  if (consumerRc != 0 || producerRc.load(std::memory_order_relaxed) != 0)
    return Error(Errc::FAILED, "a party of the local channel failed");
  AGATE_TRY(addRate(scenario, report, *result, "floor_spsc_32b_msgs_per_s"));
  report.addPlacement(scenario.name, {producerCpu.load(std::memory_order_relaxed), consumerCpu});
  return {};
}

// ---------------------------------------------------------------------------------------------
// The table. Each cross-process latency figure and its tails point at the floor's.

template <Waiting W, Payload P>
Status sharedRttScenario(const Scenario& scenario, const RunOptions& o, Report& report) {
  return sharedRtt(scenario, o, report, W, P,
                   W == Waiting::POLLED ? "floor_cacheline_rtt_ns" : "floor_futex_rtt_ns");
}

Status sharedOneway32(const Scenario& scenario, const RunOptions& o, Report& report) {
  return sharedOneway<32>(scenario, o, report, "floor_spsc_32b_msgs_per_s");
}
Status sharedOneway1k(const Scenario& scenario, const RunOptions& o, Report& report) {
  return sharedOneway<1024>(scenario, o, report, "floor_spsc_1k_msgs_per_s");
}

constexpr Scenario AGATE_RINGS[] = {
    {"shared_rtt_polled_ns", "ns",
     "round trip of a Cap'n Proto message (built in the frame, read COPY_IN) and its answer over "
     "two SHARED channels between two processes, both spinning",
     sharedRttScenario<Waiting::POLLED, Payload::CAPNP>},
    {"shared_rtt_polled_raw_ns", "ns",
     "the same round trip with 8 raw bytes instead of a Cap'n Proto message",
     sharedRttScenario<Waiting::POLLED, Payload::RAW>},
    {"shared_rtt_parked_ns", "ns",
     "the Cap'n Proto round trip with both parties parked (futex) between messages",
     sharedRttScenario<Waiting::PARKED, Payload::CAPNP>},
    {"shared_oneway_32b_msgs_per_s", "msgs/s",
     "one-way 32-byte frames/s over a SHARED channel between two processes (commitDeferred, "
     "flush every 16), consumer spinning, copying each payload out, releaseDeferred + "
     "flushReleases every 16",
     sharedOneway32},
    {"shared_oneway_1k_msgs_per_s", "msgs/s", "the same with 1 KiB frames", sharedOneway1k},
    {"local_oneway_32b_msgs_per_s", "msgs/s",
     "one-way 32-byte frames/s over a LOCAL channel between two threads (flush every 16)",
     localOneway32},
};

}  // namespace

std::span<const Scenario> agateRingScenarios() { return AGATE_RINGS; }

}  // namespace agate::bench::rings
