// Doorbells: how a ring's consumer (or producer) sleeps without making the busy path pay for it.
//
// A doorbell is two 32-bit words in (possibly shared) memory: `seq`, the futex word, bumped on
// every ring that has a sleeper to wake; and `sleepers`, the number of waiters that have announced
// they may park. The side that publishes (the ringer) makes a system call only when somebody
// announced it sleeps, so a producer and a consumer that both stay awake never enter the kernel.
//
// Waiter protocol (see waitUntil in channel.cpp for the loop that drives it):
//   1. announce():   sleepers += 1 (acq_rel RMW), snapshot = seq (acquire)
//   2. re-check the condition (e.g. load the frame header at head, acquire); if it holds: cancel()
//   3. wait(snapshot, timeout): FUTEX_WAIT on seq expecting `snapshot`
//   4. cancel():     sleepers -= 1
// Ringer protocol, after publishing (e.g. storing a frame header with release):
//   ring(): if (sleepers += 0) > 0 (acq_rel RMW): seq += 1 (release), FUTEX_WAKE all
//
// Why no wakeup is lost (Dekker's store -> full barrier -> load, on both sides): both sides do a
// read-modify-write on `sleepers`, and RMWs on one location are totally ordered. If the ringer's
// RMW comes later it reads the waiter's announce and wakes. If it comes earlier, the waiter's
// RMW reads from it (acquire of a release), so everything the ringer published before ring() is
// visible to the waiter's re-check in step 2 and it does not sleep. If the seq bump lands after
// the snapshot, FUTEX_WAIT finds seq != snapshot and returns at once. (An RMW rather than a
// seq_cst fence + load: the same cost on x86, and ThreadSanitizer can check it; GCC's TSan does
// not support fences.) The busy path pays one uncontended locked instruction per ring.
//
// Trust: in shared scope the peer can write both words at will. That can only cause spurious
// wakeups or missed wakeups; waiters therefore always park with a finite timeout slice when
// the peer is untrusted (the channel's WaitPolicy), and never rely on the words for safety.
//
// Eventfd wakeups: an event loop that cannot wait on a futex announces with viaEventfd = true
// (which counts in the upper 16 bits of `sleepers`), re-checks, then polls the doorbell's eventfd.
// The ringer's one RMW sees both counts; it writes the eventfd (plain write(), never through
// io_uring) only when an eventfd waiter announced. The eventfd belongs to the channel, which
// passes it to both sides (for SHARED scope, alongside the memfd).
//
// The futex word is exposed (futexWord()) so an io_uring event loop can wait on it with
// IORING_OP_FUTEX_WAIT (flags FUTEX2_SIZE_U32, plus FUTEX2_PRIVATE only when !processShared())
// instead of blocking a thread: announce(), re-check, submit the wait with the snapshot as the
// expected value, cancel() when it completes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "agate/runtime/result.h"

namespace agate {

// The two words of a doorbell as they lie in memory. 8 bytes, 4-byte aligned; plain integers so
// the struct can live in a shared mapping, accessed only through std::atomic_ref.
struct DoorbellWord {
  uint32_t seq;       // the futex word
  uint32_t sleepers;  // waiters between announce() and cancel(): futex waiters in the low 16
                      // bits, eventfd waiters in the high 16 bits
};
inline constexpr uint32_t DOORBELL_FUTEX_WAITER = 1;
inline constexpr uint32_t DOORBELL_EVENTFD_WAITER = 1u << 16;

// How a blocking call waits: spin (with a pause instruction) for up to `spinIterations` checks,
// then park on the doorbell's futex. The call gives up with TIMED_OUT after `timeout` overall.
// `parkSlice` bounds each park, so a waiter re-checks peer liveness (pidfd) and survives a lost
// wakeup from a hostile peer; it is also what an untrusted doorbell costs in the worst case.
struct WaitPolicy {
  uint32_t spinIterations = 4000;
  std::chrono::nanoseconds timeout = std::chrono::nanoseconds::max();
  std::chrono::nanoseconds parkSlice = std::chrono::milliseconds(50);
};

// One process's handle on a DoorbellWord. Does not own the word. Thread-safe: any number of
// threads may announce/wait/ring concurrently.
class Doorbell {
 public:
  Doorbell() noexcept = default;
  // `processShared`: the word lives in memory mapped by several processes (no FUTEX_PRIVATE_FLAG).
  // `eventFd`: the eventfd to write for eventfd waiters (-1: none; not owned).
  Doorbell(DoorbellWord* word, bool processShared, int eventFd = -1) noexcept
      : word_(word), processShared_(processShared), eventFd_(eventFd) {}

  // Step 1 of the waiter protocol; returns the seq snapshot to pass to wait(). `viaEventfd`: the
  // caller will wait by polling eventFd() instead of calling wait().
  uint32_t announce(bool viaEventfd = false) noexcept;
  // Step 4: withdraws an announce() (whether or not wait() was called); same `viaEventfd`.
  void cancel(bool viaEventfd = false) noexcept;
  // Step 3: parks until rung, `timeout` passes, a signal arrives, or seq != snapshot. Returns OK
  // (woken or seq already moved), TIMED_OUT, or SYSTEM_ERROR for an unexpected futex failure.
  Status wait(uint32_t snapshot, std::chrono::nanoseconds timeout) noexcept;
  // Ringer: wakes all parked waiters if any announced. No system call otherwise.
  void ring() noexcept;

  uint32_t* futexWord() const noexcept { return &word_->seq; }
  // The eventfd rung for eventfd waiters, or -1. Readable after a ring; the waiter reads it to
  // reset it (it is created EFD_NONBLOCK).
  int eventFd() const noexcept { return eventFd_; }
  bool processShared() const noexcept { return processShared_; }
  bool bound() const noexcept { return word_ != nullptr; }

  // Number of times this handle actually entered FUTEX_WAIT / issued FUTEX_WAKE (process-local
  // counters, for tests and statistics; never read from shared memory). Relaxed atomics: another
  // thread may read them while the handle parks, and several local producers may share it.
  uint64_t parkCount() const noexcept {
    return std::atomic_ref<const uint64_t>(parks_).load(std::memory_order_relaxed);
  }
  uint64_t wakeCount() const noexcept {
    return std::atomic_ref<const uint64_t>(wakes_).load(std::memory_order_relaxed);
  }

 private:
  DoorbellWord* word_ = nullptr;
  bool processShared_ = false;
  int eventFd_ = -1;
  alignas(std::atomic_ref<uint64_t>::required_alignment) uint64_t parks_ = 0;
  alignas(std::atomic_ref<uint64_t>::required_alignment) uint64_t wakes_ = 0;
};

// A pause hint for spin loops (x86 PAUSE, AArch64 YIELD).
inline void cpuRelax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace agate
