// Fibers on an EventLoop: a fiber waits on a Promise<T> and the loop resumes it.
//
//   EventLoop loop;
//   StackPool stacks;
//   LoopFiberScheduler fibers(loop);
//   auto fiber = Fiber::tryStart(stacks, [&] {
//     Result<size_t> n = wait(loop.read(fd, buf));   // blocks this fiber, not the thread
//     ...
//   }, &fibers);
//   fiber->resume();   // runs until its first wait(); the loop resumes it from then on
//
// How it joins the two (fiber.h names the seam): `wait(promise)` registers a FiberWaiter with the
// promise through a small relay coroutine that awaits the promise's readiness (not its result)
// and wakes the waiter. The waiter hands the fiber to LoopFiberScheduler, which posts one Task to
// the loop; that Task resumes every woken fiber from the loop's own stack, never re-entrantly
// inside a fulfill(). The relay's frame comes from the loop's FrameArena and the waiter lives on
// the fiber's stack, so a steady-state wait allocates nothing on the heap.
//
// Cancellation: a fiber unwound while it waits (its OwnedFiber destroyed) gets CANCELLED from
// wait(); the relay is dropped, which clears the promise's waiter. The promise itself stays with
// the caller: dropping it cancels its producer as usual.
//
// Threading: the loop, the scheduler, the fibers and the promises all belong to one thread.
#pragma once

#include <coroutine>
#include <optional>
#include <utility>

#include "agate/runtime/event_loop.h"
#include "agate/runtime/fiber.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/task.h"

namespace agate {

// The FiberScheduler of the fibers of one EventLoop. Must outlive those fibers (they keep a
// pointer to it) and be destroyed on the loop's thread before the loop.
class LoopFiberScheduler final : public FiberScheduler, private Task {
 public:
  explicit LoopFiberScheduler(EventLoop& loop) noexcept : loop_(loop) {}

  // Queues the fiber and, if not already done, posts the Task that resumes queued fibers.
  void scheduleFiber(Fiber& fiber) noexcept override {
    ready_.scheduleFiber(fiber);
    if (!isQueued()) loop_.post(*this);
  }

 private:
  void run() noexcept override {
    ready_.runReady();
    // Fibers woken while these ran go on the loop's next pass, behind other queued work.
    if (!ready_.empty() && !isQueued()) loop_.post(*this);
  }

  EventLoop& loop_;
  FiberReadyQueue ready_;
};

namespace detail {

// Awaits a promise node's readiness without taking its result. When the awaiter goes (the
// coroutine resumed, or destroyed while suspended here) the node forgets it, so it never resumes
// a freed frame.
template <class T>
class ReadinessAwaiter {
 public:
  explicit ReadinessAwaiter(PromiseNode<T>* node) noexcept : node_(node) {}
  ReadinessAwaiter(const ReadinessAwaiter&) = delete;
  ReadinessAwaiter& operator=(const ReadinessAwaiter&) = delete;
  // Also when the node is ready but has not resumed us yet (it may sit in the run queue).
  ~ReadinessAwaiter() {
    if (suspended_) node_->clearWaiter();
  }

  bool await_ready() const noexcept { return node_->isReady(); }
  void await_suspend(std::coroutine_handle<> self) noexcept {
    suspended_ = true;
    node_->setWaiter(self);
  }
  void await_resume() const noexcept {}

 private:
  PromiseNode<T>* node_;
  bool suspended_ = false;
};

// Wakes `waiter` once `node` is ready. Starts eagerly (Promise coroutines do) and is only started
// while the node is not ready yet.
template <class T>
Promise<void> relayReadiness(PromiseNode<T>* node, FiberWaiter* waiter) {
  co_await ReadinessAwaiter<T>(node);
  waiter->wake();
  co_return Result<void>();
}

// A Promise<T> seen as a FiberWaitable (fiber.h).
template <class T>
class PromiseWaitable {
 public:
  explicit PromiseWaitable(Promise<T>& promise) noexcept : node_(promise.node()) {}

  bool isReady() const noexcept { return node_->isReady(); }
  void addWaiter(FiberWaiter& waiter) { relay_.emplace(relayReadiness<T>(node_, &waiter)); }
  void removeWaiter(FiberWaiter&) noexcept { relay_.reset(); }

 private:
  PromiseNode<T>* node_;
  std::optional<Promise<void>> relay_;  // dropped (and its frame freed) with this adapter
};

}  // namespace detail

// Inside a fiber whose scheduler resumes it from `promise`'s loop (a LoopFiberScheduler):
// suspends the fiber until `promise` completes and returns its result. Errc::CANCELLED if the
// fiber is unwound while it waits (the promise is then left with the caller, not ready).
template <class T>
Result<T> wait(Promise<T>& promise) {
  AGATE_REQUIRE(promise.isValid(), "wait() on a moved-from promise");
  detail::PromiseWaitable<T> waitable(promise);
  Status waited = wait(waitable);
  if (!waited.ok()) return waited.error();
  return promise.takeResult();
}

// The same for a promise the caller does not keep (`wait(loop.sleep(1ms))`).
template <class T>
Result<T> wait(Promise<T>&& promise) {
  return wait(promise);
}

}  // namespace agate
