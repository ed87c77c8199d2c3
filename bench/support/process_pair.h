// The cross-process harness: shared memory made before fork, and two forked parties started
// together under a watchdog.
//
// A cross-process scenario maps its shared state with SharedMapping (MAP_SHARED|MAP_ANONYMOUS,
// pre-faulted), then calls runPair with two party bodies. runPair forks one child per party; each
// child optionally pins itself, meets the other at a start barrier, runs its body and reports the
// CPU it finished on. The driver process only waits: it never takes part in the measurement.
// Results travel back through the shared mapping (e.g. a SampleBuffer placed in it).
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>

#include "agate/runtime/result.h"

namespace agate::bench {

// Anonymous shared memory, inherited by every child forked after it is made. Owns the mapping
// (munmap on destruction); moves, never copies. Every page is touched at creation, so neither
// party pays a page fault (10-20 us in these VMs) during a measurement.
class SharedMapping {
 public:
  static Result<SharedMapping> tryCreate(size_t bytes);

  SharedMapping(SharedMapping&& other) noexcept;
  SharedMapping& operator=(SharedMapping&& other) noexcept;
  SharedMapping(const SharedMapping&) = delete;
  SharedMapping& operator=(const SharedMapping&) = delete;
  ~SharedMapping();

  // Page-aligned, zero-filled at creation.
  void* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }

 private:
  SharedMapping(void* data, size_t size) noexcept : data_(data), size_(size) {}
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A party's body, run in a forked child once both parties have reached the start barrier.
// Returns the child's exit code: 0 for success; anything else fails the run.
using PartyBody = std::function<int()>;

struct PairOptions {
  // Both parties must have exited by then, or both are killed and the run fails.
  std::chrono::milliseconds watchdog{30'000};
  // CPU to pin each party to with sched_setaffinity; -1 leaves it to the scheduler.
  int cpuA = -1;
  int cpuB = -1;
};

// Where the parties ran: sched_getcpu() of each when its body returned.
struct PairPlacement {
  int cpuA = -1;
  int cpuB = -1;
};

// Forks parties A and B, starts them together and waits for both.
// Errors: SYSTEM_ERROR when fork or the control mapping fails; FAILED when a party exits non-zero
// or dies from a signal (the other is then killed, since it may be waiting for its peer);
// TIMED_OUT when the watchdog expires (both are killed). The reason is also written to stderr.
// Never returns before both children have been reaped.
Result<PairPlacement> runPair(const PairOptions& options, const PartyBody& partyA,
                              const PartyBody& partyB);

}  // namespace agate::bench
