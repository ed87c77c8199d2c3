// Clocks and spin-waiting shared by every benchmark driver.
//
// Time is read with clock_gettime(CLOCK_MONOTONIC) through the vDSO: no system call, but not free
// either (the rings suite reports its cost as `floor_clock_read_ns`, so a reader can see how much
// of a per-sample latency is the clock itself). Waits spin with the CPU's pause hint and give the
// CPU away now and then, so that a peer sharing the same vCPU still gets to run.
#pragma once

#include <sched.h>
#include <time.h>

#include <cstdint>

namespace agate::bench {

// Nanoseconds on the monotonic clock. Comparable across processes of one machine.
inline uint64_t nowNs() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000u + static_cast<uint64_t>(ts.tv_nsec);
}

// Tells the CPU this is a busy-wait loop (lets a hyperthread sibling run, saves power).
inline void cpuRelax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// One busy-wait: spin with cpuRelax(), and every YIELD_EVERY spins call sched_yield() so that a
// peer preempted onto this same vCPU can make progress. On an idle machine with the parties on
// different vCPUs a wait never reaches the yield; when it does, the sample shows up as a tail.
class SpinWait {
 public:
  static constexpr uint32_t YIELD_EVERY = 4096;

  void once() noexcept {
    if (++spins_ % YIELD_EVERY == 0) {
      sched_yield();
      return;
    }
    cpuRelax();
  }

 private:
  uint32_t spins_ = 0;
};

}  // namespace agate::bench
