// MappedNotification: this process's view of a kernel Notification, owned: the doorbell page
// (mapped MAP_SHARED read-write), the wake descriptor if the notification has one, and its ring
// end if the cap carried WRITE.
//
// Made by KernelConnection::mapNotification (and, inside a MappedEventBuffer, by
// mapEventBuffer) from the descriptors the kernel sent. The page holds a DoorbellWord
// (runtime/doorbell.h) that the kernel, bound banks and other holders ring; a ring carries no
// data and means "look again" at whatever state the notification announces (an event buffer's
// slots, a bank's credit page).
//
// Waiting. waitAsync(loop, ready, timeout) runs the doorbell's waiter protocol inside an event
// loop: announce, re-check `ready()`, park, withdraw, re-check. It parks either on the futex word
// (EventLoop::waitFutex: IORING_OP_FUTEX_WAIT where the kernel has it) or by polling the wake
// descriptor (EventLoop::waitReady), which any loop can do; WaitVia picks (AUTO: the wake
// descriptor when there is one and the loop lacks a native futex wait). Every other holder of
// the page can write the word, so a hostile one can cause spurious or missed wakeups: each park
// is bounded (PARK_SLICE by default) and `ready()` is always re-checked, so a missed wakeup costs
// at most a slice.
//
// The wake descriptor is the read end of a pipe, not an eventfd (kernel_sim/README.md says why);
// it reads like one: 8 bytes per ring, drained by the waiter. The received pipe ends share their
// file description (and its O_NONBLOCK flag) with every other holder, so tryMap re-opens each
// through /proc/self/fd as a description of our own, O_NONBLOCK: no holder can make our drain
// or our ring block.
//
// Threading: one loop's thread. Move-only; unmaps and closes everything when destroyed.
#pragma once

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

#include "agate/runtime/doorbell.h"
#include "agate/runtime/event_loop.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"

namespace agate::caps {

enum class WaitVia : uint8_t {
  AUTO,     // the wake descriptor if there is one and the loop cannot wait on a futex natively
  FUTEX,    // the doorbell's futex word
  WAKE_FD,  // the wake descriptor (INVALID_ARGUMENT if the notification has none)
};

class MappedNotification {
 public:
  // The longest one park lasts before `ready()` is re-checked (the bound on a missed wakeup).
  static constexpr Duration PARK_SLICE = std::chrono::milliseconds(50);

  MappedNotification() noexcept = default;
  // Maps `bytes` of `page` shared read-write. INVALID_ARGUMENT if the page is missing or smaller
  // than a DoorbellWord; SYSTEM_ERROR if mmap refuses.
  static Result<MappedNotification> tryMap(Fd page, uint64_t bytes, Fd wake, Fd ring);
  MappedNotification(MappedNotification&& o) noexcept { *this = std::move(o); }
  MappedNotification& operator=(MappedNotification&& o) noexcept;
  MappedNotification(const MappedNotification&) = delete;
  MappedNotification& operator=(const MappedNotification&) = delete;
  ~MappedNotification() { reset(); }

  bool mapped() const noexcept { return word_ != nullptr; }
  const DoorbellWord& word() const noexcept { return *word_; }
  // The read end of the wake pipe, or -1.
  int wakeFd() const noexcept { return wake_.get(); }
  // Whether ring() reaches waiters parked on the wake descriptor (the cap carried WRITE and the
  // notification has a wake pipe); futex waiters are reached by any holder.
  bool canRingWakeFd() const noexcept { return ring_.valid(); }

  // The page's ends word (NOTIFICATION_ENDS_OFFSET, kernel/event_slot.h): how many event buffers
  // of this notification the kernel destroyed, as far as the page says (any holder may write it:
  // a hint). Precondition: mapped().
  uint32_t ends() const noexcept;
  // Rings the doorbell: wakes futex waiters and, with the ring end, wake-descriptor waiters. No
  // system call unless someone announced. Precondition: mapped().
  void ring() noexcept;
  // Reads the wake pipe empty (after a park on it).
  void drainWake() noexcept;

  // Resolves to true once `ready()` holds (checked under the waiter protocol, so a ring between
  // the check and the park is never lost), or to false when `timeout` passes. Each park lasts
  // at most `slice`. INVALID_ARGUMENT for WAKE_FD without a wake descriptor. `ready` runs on the
  // loop's thread and must not block.
  template <class Ready>
  Promise<bool> waitAsync(EventLoop& loop, Ready ready, Duration timeout,
                          WaitVia via = WaitVia::AUTO, Duration slice = PARK_SLICE);

 private:
  void reset() noexcept;

  std::byte* data_ = nullptr;
  size_t size_ = 0;
  DoorbellWord* word_ = nullptr;  // at data_
  Fd page_;
  Fd wake_;
  Fd ring_;
  // Process-shared (the word is in a MAP_SHARED page); writes ring_ for eventfd-style waiters.
  Doorbell doorbell_;
};

template <class Ready>
Promise<bool> MappedNotification::waitAsync(EventLoop& loop, Ready ready, Duration timeout,
                                            WaitVia via, Duration slice) {
  AGATE_REQUIRE(mapped(), "waitAsync on an unmapped notification");
  if (via == WaitVia::WAKE_FD && !wake_.valid())
    co_return Error(Errc::INVALID_ARGUMENT, "the notification has no wake descriptor");
  const bool viaWake = via == WaitVia::WAKE_FD ||
                       (via == WaitVia::AUTO && wake_.valid() && !loop.hasNativeFutexWait());
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    // Announce, re-check, park; the guard withdraws the announce on every exit (including this
    // coroutine being destroyed while parked).
    struct Announce {
      Doorbell& bell;
      bool viaWake;
      uint32_t snapshot;
      ~Announce() { bell.cancel(viaWake); }
    } announce{doorbell_, viaWake, doorbell_.announce(viaWake)};
    if (ready()) co_return true;
    const auto left = end - std::chrono::steady_clock::now();
    if (left <= Duration::zero()) co_return false;
    const Duration park = std::min<Duration>(left, slice);
    if (viaWake) {
      (void)co_await loop.deadline(loop.waitReady(wake_.get(), POLLIN), park);
      drainWake();
    } else {
      // The word is a plain uint32_t in shared memory; the loop waits on it as an atomic (the
      // same cast KernelConnection makes for its ring doorbells).
      auto* seq = reinterpret_cast<const std::atomic<uint32_t>*>(doorbell_.futexWord());
      (void)co_await loop.deadline(loop.waitFutex(*seq, announce.snapshot, /*shared=*/true), park);
    }
  }
}

}  // namespace agate::caps
