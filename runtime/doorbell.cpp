#include "agate/runtime/doorbell.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>

namespace agate {
namespace {

std::atomic_ref<uint32_t> ref(uint32_t& w) { return std::atomic_ref<uint32_t>(w); }

long futex(uint32_t* addr, int op, uint32_t val, const timespec* timeout) {
  return ::syscall(SYS_futex, addr, op, val, timeout, nullptr, 0);
}

}  // namespace

uint32_t Doorbell::announce(bool viaEventfd) noexcept {
  // acq_rel RMW: if a ringer's RMW on `sleepers` precedes ours in its modification order, we
  // synchronise with it and the caller's re-check sees what that ringer published.
  ref(word_->sleepers)
      .fetch_add(viaEventfd ? DOORBELL_EVENTFD_WAITER : DOORBELL_FUTEX_WAITER,
                 std::memory_order_acq_rel);
  // Acquire: if a ringer's bump is already visible, so is everything it published before it.
  return ref(word_->seq).load(std::memory_order_acquire);
}

void Doorbell::cancel(bool viaEventfd) noexcept {
  // Relaxed: a late decrement can only cause one needless wake, never a lost one.
  ref(word_->sleepers)
      .fetch_sub(viaEventfd ? DOORBELL_EVENTFD_WAITER : DOORBELL_FUTEX_WAITER,
                 std::memory_order_relaxed);
}

Status Doorbell::wait(uint32_t snapshot, std::chrono::nanoseconds timeout) noexcept {
  if (timeout <= std::chrono::nanoseconds::zero()) return Error(Errc::TIMED_OUT, "doorbell wait");
  timespec ts{};
  const timespec* tsp = nullptr;
  if (timeout != std::chrono::nanoseconds::max()) {
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
    tsp = &ts;
  }
  std::atomic_ref<uint64_t>(parks_).fetch_add(1, std::memory_order_relaxed);
  int op = FUTEX_WAIT | (processShared_ ? 0 : FUTEX_PRIVATE_FLAG);
  if (futex(&word_->seq, op, snapshot, tsp) == 0) return {};
  switch (errno) {
    case EAGAIN:  // seq moved between the snapshot and the wait: a ring already happened
    case EINTR:
      return {};
    case ETIMEDOUT:
      return Error(Errc::TIMED_OUT, "doorbell wait");
    default:
      return Error::fromErrno(errno, "FUTEX_WAIT on a doorbell failed");
  }
}

void Doorbell::ring() noexcept {
  // An RMW, not a plain load: RMWs on `sleepers` are totally ordered. If ours comes after a
  // waiter's announce we read >= 1 and wake it; if it comes before, the waiter's acq_rel RMW
  // reads ours, so what the caller published before ring() is visible to the waiter's re-check.
  // (The same guarantee as store->seq_cst fence->load, in a form TSan can check; the cost is one
  // locked instruction, like the fence it replaces.)
  uint32_t sleepers = ref(word_->sleepers).fetch_add(0, std::memory_order_acq_rel);
  if (sleepers == 0) return;
  if ((sleepers & (DOORBELL_EVENTFD_WAITER - 1)) != 0) {
    // Release: a waiter whose snapshot reads the new value also sees what was published.
    ref(word_->seq).fetch_add(1, std::memory_order_release);
    std::atomic_ref<uint64_t>(wakes_).fetch_add(1, std::memory_order_relaxed);
    futex(&word_->seq, FUTEX_WAKE | (processShared_ ? 0 : FUTEX_PRIVATE_FLAG), INT_MAX, nullptr);
  }
  if (sleepers >= DOORBELL_EVENTFD_WAITER && eventFd_ >= 0) {
    uint64_t one = 1;
    std::atomic_ref<uint64_t>(wakes_).fetch_add(1, std::memory_order_relaxed);
    // EAGAIN (counter saturated) still leaves it readable: nothing to handle.
    [[maybe_unused]] ssize_t n = ::write(eventFd_, &one, sizeof one);
  }
}

}  // namespace agate
