// Cross-process floors. Each latency scenario forks party A (the one that times round trips) and
// party B (the echo); each throughput scenario forks a producer (A) and a consumer (B, which
// times). All state they share is mapped before fork and results come back through it.
#include <linux/futex.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <new>
#include <vector>

#include <benchmark/benchmark.h>

#include "rings/floors.h"
#include "support/latency.h"
#include "support/process_pair.h"
#include "support/round_trips.h"
#include "support/timing.h"

namespace agate::bench::rings {

namespace {

constexpr size_t CACHE_LINE = 64;
constexpr double NS_PER_S = 1e9;

// ---------------------------------------------------------------------------------------------
// Cache-line ping-pong: one 64-byte line, both parties spin on it.

// seq is odd when A has written (ping), even when B has answered (pong); STOP ends B.
struct alignas(CACHE_LINE) PingPongLine {
  std::atomic<uint64_t> seq{0};
};
constexpr uint64_t LINE_STOP = ~uint64_t{0};

// Round trip of one cache line between two processes, both busy-polling (no system call).
Status cachelineRtt(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto mapping = SharedMapping::tryCreate(sizeof(PingPongLine));
  if (!mapping) return mapping.error();
  auto* line = new (mapping->data()) PingPongLine{};

  auto partyA = [line, &o](SampleBuffer& samples) {
    uint64_t last = 0;
    const bool ok = recordRoundTrips(o, samples, [&] {
      // Release/acquire: a real message would travel with the flag; the floor pays the same.
      line->seq.store(last + 1, std::memory_order_release);
      SpinWait spin;
      uint64_t v;
      while ((v = line->seq.load(std::memory_order_acquire)) == last + 1) spin.once();
      if (v != last + 2) return false;  // not B's answer to this ping
      last = v;
      return true;
    });
    line->seq.store(LINE_STOP, std::memory_order_release);
    return ok ? 0 : 1;
  };
  auto partyB = [line] {
    uint64_t seen = 0;
    for (;;) {
      SpinWait spin;
      uint64_t v;
      while ((v = line->seq.load(std::memory_order_acquire)) == seen) spin.once();
      if (v == LINE_STOP) return 0;
      if (v != seen + 1) return 1;  // not the ping that follows our last pong
      seen = v + 1;
      line->seq.store(seen, std::memory_order_release);
    }
  };
  return runRoundTrips(scenario, o, report, partyA, partyB);
}

// ---------------------------------------------------------------------------------------------
// Futex ping-pong: both parties sleep in FUTEX_WAIT between messages.

struct alignas(CACHE_LINE) FutexWord {
  std::atomic<uint32_t> seq{0};  // same odd/even protocol as PingPongLine
};
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) &&
                  std::atomic<uint32_t>::is_always_lock_free,
              "the futex word is the atomic's storage");
constexpr uint32_t FUTEX_STOP = ~uint32_t{0};

uint32_t* futexAddress(std::atomic<uint32_t>& word) { return reinterpret_cast<uint32_t*>(&word); }

// Shared (not FUTEX_PRIVATE) operations: the word is in memory mapped by two processes.
void futexWake(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, futexAddress(word), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

// Sleeps while word == expected (returns at once if it already differs; EINTR just returns).
void futexWait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, futexAddress(word), FUTEX_WAIT, expected, nullptr, nullptr, 0);
}

// Round trip between two processes that both sleep in FUTEX_WAIT and wake each other (FUTEX_WAKE
// every message): two wake-ups and two context switches per round trip.
Status futexRtt(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto mapping = SharedMapping::tryCreate(sizeof(FutexWord));
  if (!mapping) return mapping.error();
  auto* word = new (mapping->data()) FutexWord{};

  auto partyA = [word, &o](SampleBuffer& samples) {
    uint32_t last = 0;
    const bool ok = recordRoundTrips(o, samples, [&] {
      const uint32_t ping = last + 1;
      word->seq.store(ping, std::memory_order_release);
      futexWake(word->seq);
      uint32_t v;
      while ((v = word->seq.load(std::memory_order_acquire)) == ping) futexWait(word->seq, ping);
      if (v != ping + 1) return false;
      last = v;
      return true;
    });
    word->seq.store(FUTEX_STOP, std::memory_order_release);
    futexWake(word->seq);
    return ok ? 0 : 1;
  };
  auto partyB = [word] {
    uint32_t seen = 0;
    for (;;) {
      uint32_t v;
      while ((v = word->seq.load(std::memory_order_acquire)) == seen) futexWait(word->seq, seen);
      if (v == FUTEX_STOP) return 0;
      if (v != seen + 1) return 1;
      seen = v + 1;
      word->seq.store(seen, std::memory_order_release);
      futexWake(word->seq);
    }
  };
  return runRoundTrips(scenario, o, report, partyA, partyB);
}

// ---------------------------------------------------------------------------------------------
// Unix socketpair ping-pong.

// Both ends of a socketpair, closed on destruction (in the driver; children simply exit).
struct SocketPair {
  int fd[2] = {-1, -1};
  SocketPair() = default;
  SocketPair(const SocketPair&) = delete;
  SocketPair& operator=(const SocketPair&) = delete;
  ~SocketPair() {
    for (int f : fd) {
      if (f >= 0) close(f);
    }
  }
};

constexpr uint64_t SOCKET_STOP = ~uint64_t{0};

// Reads or writes exactly 8 bytes; false on EOF or error.
bool readWord(int fd, uint64_t& v) {
  size_t done = 0;
  while (done < sizeof v) {
    const ssize_t n = read(fd, reinterpret_cast<char*>(&v) + done, sizeof v - done);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n == 0 || errno != EINTR) {
      return false;
    }
  }
  return true;
}
bool writeWord(int fd, uint64_t v) {
  size_t done = 0;
  while (done < sizeof v) {
    const ssize_t n = write(fd, reinterpret_cast<const char*>(&v) + done, sizeof v - done);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && errno != EINTR) {
      return false;
    }
  }
  return true;
}

// Round trip of an 8-byte message over an AF_UNIX SOCK_STREAM socketpair, both parties blocked
// in read() between messages.
Status socketpairRtt(const Scenario& scenario, const RunOptions& o, Report& report) {
  SocketPair sp;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp.fd) != 0) {
    return Error::fromErrno(errno, "socketpair");
  }
  const int fdA = sp.fd[0];
  const int fdB = sp.fd[1];
  auto partyA = [fdA, &o](SampleBuffer& samples) {
    uint64_t next = 0;
    const bool ok = recordRoundTrips(o, samples, [&] {
      uint64_t v = 0;
      if (!writeWord(fdA, ++next) || !readWord(fdA, v)) return false;
      return v == next;
    });
    // The driver also holds both ends, so B would never read EOF: tell it to stop instead.
    writeWord(fdA, SOCKET_STOP);
    return ok ? 0 : 1;
  };
  auto partyB = [fdB] {
    uint64_t v = 0;
    while (readWord(fdB, v)) {
      if (v == SOCKET_STOP) return 0;
      if (!writeWord(fdB, v)) return 1;
    }
    return 1;  // EOF or error before STOP
  };
  return runRoundTrips(scenario, o, report, partyA, partyB);
}

// ---------------------------------------------------------------------------------------------
// Raw SPSC ring of fixed-size records: the floor for any shared-memory channel.

constexpr size_t RING_BYTES = 256 * 1024;
constexpr int MAX_WINDOWS = 64;

// One producer (A), one consumer (B). Indices count records from 0 and never wrap in practice
// (2^64); slot = index % CAPACITY. Each index is written by one side only and sits on its own
// cache line; each side keeps a private copy of the other's index and reloads it only when the
// ring looks full (producer) or empty (consumer), so the steady state shares no line but the
// records themselves.
template <size_t RECORD>
struct alignas(CACHE_LINE) RawRing {
  static constexpr size_t CAPACITY = RING_BYTES / RECORD;
  static_assert(RECORD >= sizeof(uint64_t) && RECORD % sizeof(uint64_t) == 0);
  static_assert((CAPACITY & (CAPACITY - 1)) == 0, "capacity is a power of two");

  // Consumer → producer: records [0, head) may be overwritten. Release by the consumer after it
  // has copied the record out; acquire by the producer before reusing the slot.
  alignas(CACHE_LINE) std::atomic<uint64_t> head{0};
  // Producer → consumer: records [0, tail) are complete. Release after the record's bytes are
  // written; acquire by the consumer before reading them.
  alignas(CACHE_LINE) std::atomic<uint64_t> tail{0};
  // Consumer → producer: the measurement is over. Relaxed: it orders nothing.
  alignas(CACHE_LINE) std::atomic<uint32_t> stop{0};
  // Written by the consumer only, read by the driver after both exited.
  uint32_t windows = 0;
  uint64_t windowRecords[MAX_WINDOWS] = {};
  uint64_t windowNs[MAX_WINDOWS] = {};
  alignas(CACHE_LINE) std::byte slots[RING_BYTES];

  std::byte* slot(uint64_t index) { return slots + (index % CAPACITY) * RECORD; }
};

// Producer: stamps each record with its index and publishes records one at a time.
template <size_t RECORD>
int produce(RawRing<RECORD>& ring) {
  alignas(8) std::byte record[RECORD];
  std::memset(record, 0xA5, RECORD);
  uint64_t tail = 0;
  uint64_t cachedHead = 0;
  SpinWait spin;
  for (;;) {
    if (tail - cachedHead == RawRing<RECORD>::CAPACITY) {
      cachedHead = ring.head.load(std::memory_order_acquire);
      if (tail - cachedHead == RawRing<RECORD>::CAPACITY) {
        if (ring.stop.load(std::memory_order_relaxed) != 0) return 0;
        spin.once();
        continue;
      }
    }
    std::memcpy(record, &tail, sizeof tail);
    std::memcpy(ring.slot(tail), record, RECORD);
    ring.tail.store(++tail, std::memory_order_release);
    if (tail % 1024 == 0 && ring.stop.load(std::memory_order_relaxed) != 0) return 0;
  }
}

// Consumer: copies every record out and checks its stamp; times `windows` windows of equal
// length after a warm-up and leaves records and nanoseconds per window in the ring.
template <size_t RECORD>
int consume(RawRing<RECORD>& ring, const RunOptions& o) {
  alignas(8) std::byte record[RECORD];
  uint64_t head = 0;
  uint64_t cachedTail = 0;
  bool intact = true;
  // Pops 1024 records.
  auto popBatch = [&] {
    for (int i = 0; i < 1024; ++i) {
      if (head == cachedTail) {
        SpinWait spin;
        while ((cachedTail = ring.tail.load(std::memory_order_acquire)) == head) spin.once();
      }
      std::memcpy(record, ring.slot(head), RECORD);
      benchmark::DoNotOptimize(record);  // the copy is the work: keep all of it
      uint64_t stamp;
      std::memcpy(&stamp, record, sizeof stamp);
      intact &= stamp == head;
      ring.head.store(++head, std::memory_order_release);
    }
  };
  const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
  while (nowNs() < warmEnd) popBatch();
  const int windows = std::clamp(o.repetitions, 1, MAX_WINDOWS);
  const uint64_t windowNs = secondsToNs(o.measureSeconds) / static_cast<uint64_t>(windows);
  for (int w = 0; w < windows; ++w) {
    const uint64_t start = head;
    const uint64_t t0 = nowNs();
    uint64_t t1;
    do {
      popBatch();
    } while ((t1 = nowNs()) - t0 < windowNs);
    ring.windowRecords[w] = head - start;
    ring.windowNs[w] = t1 - t0;
  }
  ring.windows = static_cast<uint32_t>(windows);
  ring.stop.store(1, std::memory_order_relaxed);
  return intact ? 0 : 1;
}

// One-way throughput of RECORD-byte records through a raw SPSC ring in shared memory, producer
// and consumer in two processes, both copying every record: the median over windows.
template <size_t RECORD>
Status spscThroughput(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto mapping = SharedMapping::tryCreate(sizeof(RawRing<RECORD>));
  if (!mapping) return mapping.error();
  auto* ring = new (mapping->data()) RawRing<RECORD>{};
  auto placement = runPair(
      o.pairOptions(), [ring] { return produce<RECORD>(*ring); },
      [ring, &o] { return consume<RECORD>(*ring, o); });
  if (!placement) return placement.error();

  // Written by another process: each value is read once and checked before use.
  const uint32_t windows = std::min<uint32_t>(ring->windows, MAX_WINDOWS);
  std::vector<double> rates;
  for (uint32_t w = 0; w < windows; ++w) {
    const uint64_t records = ring->windowRecords[w];
    const uint64_t ns = ring->windowNs[w];
    if (ns == 0) continue;
    rates.push_back(static_cast<double>(records) * NS_PER_S / static_cast<double>(ns));
  }
  if (rates.empty()) return Error(Errc::FAILED, "the consumer timed no window");
  std::sort(rates.begin(), rates.end());
  report.add(Figure{.name = std::string(scenario.name),
                    .value = rates[(rates.size() - 1) / 2],  // the lower median
                    .unit = std::string(scenario.unit),
                    .scenario = std::string(scenario.name),
                    .samples = rates.size(),
                    .ratioTo = {}});
  report.addPlacement(scenario.name, {placement->cpuA, placement->cpuB});
  return {};
}

constexpr Scenario CROSS_PROCESS_FLOORS[] = {
    {"floor_cacheline_rtt_ns", "ns",
     "round trip of one shared cache line between two processes, both spinning", cachelineRtt},
    {"floor_futex_rtt_ns", "ns",
     "round trip between two processes that both sleep in FUTEX_WAIT between messages", futexRtt},
    {"floor_socketpair_rtt_ns", "ns",
     "round trip of 8 bytes over a Unix socketpair between two processes", socketpairRtt},
    {"floor_spsc_32b_msgs_per_s", "msgs/s",
     "one-way 32-byte records/s through a raw SPSC ring in shared memory, two processes",
     spscThroughput<32>},
    {"floor_spsc_1k_msgs_per_s", "msgs/s",
     "one-way 1 KiB records/s through a raw SPSC ring in shared memory, two processes",
     spscThroughput<1024>},
};

}  // namespace

std::span<const Scenario> crossProcessFloors() { return CROSS_PROCESS_FLOORS; }

}  // namespace agate::bench::rings
