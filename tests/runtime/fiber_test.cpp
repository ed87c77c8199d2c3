#include "agate/runtime/fiber.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>

#include "../support/alloc_counter.h"

namespace agate {
namespace {

// Global heap allocations so far (tests/support/alloc_counter.cpp replaces operator new).
uint64_t newCalls() { return testing::allocationCount(); }

// A minimal FiberWaitable: a one-shot event, standing in for a promise.
class TestEvent {
 public:
  bool isReady() const noexcept { return set_; }
  void addWaiter(FiberWaiter& waiter) noexcept { waiters_.push_back(waiter); }
  void removeWaiter(FiberWaiter& waiter) noexcept {
    waiters_.erase(waiters_.iterator_to(waiter));
    ++removed_;
  }
  void set() noexcept {
    set_ = true;
    while (!waiters_.empty()) {
      FiberWaiter& w = waiters_.front();
      waiters_.pop_front();
      w.wake();
    }
  }
  bool hasWaiters() const noexcept { return !waiters_.empty(); }
  int removed() const noexcept { return removed_; }

 private:
  bool set_ = false;
  int removed_ = 0;
  FiberWaiterList waiters_;
};
static_assert(FiberWaitable<TestEvent>);
static_assert(FiberWaitable<Fiber>);

TEST(Fiber, StartDoesNotRunTheFunctionUntilResumed) {
  StackPool pool;
  bool ran = false;
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [&] { ran = true; });
  ASSERT_TRUE(fiber.ok());
  EXPECT_EQ((*fiber)->state(), Fiber::State::CREATED);
  EXPECT_FALSE(ran);
  EXPECT_EQ(fiber->resume(), nullptr);
  EXPECT_TRUE(ran);
  EXPECT_TRUE(fiber->done());
}

TEST(Fiber, ReturnsItsFunctionsValue) {
  StackPool pool;
  Result<OwnedFiber<std::string>> fiber =
      Fiber::tryStart(pool, [] { return std::string("forty-two, long enough to be on the heap"); });
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  ASSERT_TRUE(fiber->done());
  EXPECT_EQ(fiber->result(), "forty-two, long enough to be on the heap");
}

TEST(Fiber, PingPongPassesValuesBothWaysAcrossManySwitches) {
  StackPool pool;
  constexpr uintptr_t ROUNDS = 100000;
  Result<OwnedFiber<uintptr_t>> fiber = Fiber::tryStart(pool, [] {
    uintptr_t sum = 0;
    void* out = nullptr;
    for (uintptr_t i = 0; i < ROUNDS; ++i) {
      Result<void*> in = Fiber::suspend(out);
      if (!in.ok()) return uintptr_t{0};
      const auto v = reinterpret_cast<uintptr_t>(*in);
      sum += v;
      out = reinterpret_cast<void*>(v * 2);  // answer depends on the question
    }
    return sum;
  });
  ASSERT_TRUE(fiber.ok());
  EXPECT_EQ(fiber->resume(), nullptr);  // first run: reaches the first suspend()
  for (uintptr_t i = 1; i <= ROUNDS; ++i) {
    void* answer = fiber->resume(reinterpret_cast<void*>(i));
    if (i < ROUNDS) {
      ASSERT_EQ(reinterpret_cast<uintptr_t>(answer), i * 2) << "round " << i;
      ASSERT_EQ((*fiber)->state(), Fiber::State::SUSPENDED);
    }
  }
  ASSERT_TRUE(fiber->done());
  EXPECT_EQ(fiber->result(), ROUNDS * (ROUNDS + 1) / 2);
}

TEST(Fiber, CurrentNamesTheRunningFiberAndIsNullOutsideFibers) {
  StackPool pool;
  EXPECT_FALSE(Fiber::inFiber());
  EXPECT_EQ(Fiber::current(), nullptr);
  Fiber* seen = nullptr;
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [&] { seen = Fiber::current(); });
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  EXPECT_EQ(seen, fiber->get());
  EXPECT_EQ(Fiber::current(), nullptr);
}

TEST(Fiber, FiberCanStartAndResumeANestedFiberThatSuspendsBackToIt) {
  StackPool pool;
  std::string trace;
  Result<OwnedFiber<int>> outer = Fiber::tryStart(pool, [&] {
    Fiber* self = Fiber::current();
    Result<OwnedFiber<int>> inner = Fiber::tryStart(pool, [&] {
      trace += "i1 ";
      EXPECT_NE(Fiber::current(), self);
      (void)Fiber::suspend();  // back to outer, not to the thread
      trace += "i2 ";
      return 7;
    });
    if (!inner.ok()) return -1;
    inner->resume();
    trace += "o1 ";
    EXPECT_EQ(Fiber::current(), self);
    (void)Fiber::suspend();  // back to the thread, inner still suspended
    trace += "o2 ";
    inner->resume();
    return inner->result() * 6;
  });
  ASSERT_TRUE(outer.ok());
  outer->resume();
  EXPECT_EQ(trace, "i1 o1 ");
  EXPECT_EQ(pool.inUseCount(), 2u);
  outer->resume();
  ASSERT_TRUE(outer->done());
  EXPECT_EQ(trace, "i1 o1 o2 i2 ");
  EXPECT_EQ(outer->result(), 42);
  EXPECT_EQ(pool.inUseCount(), 1u);  // inner was destroyed at the end of outer's function
}

TEST(Fiber, DestroyingASuspendedFiberUnwindsItsStackAndReturnsTheStack) {
  StackPool pool;
  struct Sentinel {
    int* destroyed;
    ~Sentinel() { ++*destroyed; }
  };
  int destroyed = 0;
  Errc seenBySuspend = Errc::OK;
  {
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [&] {
      Sentinel onStack{&destroyed};
      Result<void*> r = Fiber::suspend();
      seenBySuspend = r.code();
      Result<void*> again = Fiber::suspend();  // returns at once once cancelled
      EXPECT_EQ(again.code(), Errc::CANCELLED);
    });
    ASSERT_TRUE(fiber.ok());
    fiber->resume();
    EXPECT_EQ((*fiber)->state(), Fiber::State::SUSPENDED);
    EXPECT_EQ(destroyed, 0);
    EXPECT_EQ(pool.inUseCount(), 1u);
  }
  EXPECT_EQ(seenBySuspend, Errc::CANCELLED);
  EXPECT_EQ(destroyed, 1);
  EXPECT_EQ(pool.inUseCount(), 0u);
  EXPECT_EQ(pool.freeCount(), 1u);
}

TEST(Fiber, DestroyingAFiberThatNeverRanDestroysItsCallableWithoutRunningIt) {
  StackPool pool;
  struct Capture {
    int* destroyed;
    explicit Capture(int* d) : destroyed(d) {}
    Capture(Capture&& o) noexcept : destroyed(std::exchange(o.destroyed, nullptr)) {}
    ~Capture() {
      if (destroyed != nullptr) ++*destroyed;
    }
  };
  int destroyed = 0;
  bool ran = false;
  {
    Result<OwnedFiber<void>> fiber =
        Fiber::tryStart(pool, [c = Capture(&destroyed), &ran] { ran = true; });
    ASSERT_TRUE(fiber.ok());
    EXPECT_EQ(destroyed, 0);
  }
  EXPECT_FALSE(ran);
  EXPECT_EQ(destroyed, 1);
  EXPECT_EQ(pool.inUseCount(), 0u);
}

TEST(Fiber, StartOnAnExhaustedPoolFailsWithOutOfMemoryAndLeavesThePoolUnchanged) {
  StackPool pool(StackPoolOptions{.maxStacks = 1});
  Result<OwnedFiber<void>> first = Fiber::tryStart(pool, [] {});
  ASSERT_TRUE(first.ok());
  bool ran = false;
  Result<OwnedFiber<void>> second = Fiber::tryStart(pool, [&] { ran = true; });
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.code(), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(pool.mappedCount(), 1u);
  EXPECT_EQ(pool.inUseCount(), 1u);
  EXPECT_EQ(pool.freeCount(), 0u);
  EXPECT_FALSE(ran);
  first->resume();
  EXPECT_TRUE(first->done());
}

TEST(Fiber, CallableTooLargeForTheStackIsRefusedWithInvalidArgument) {
  StackPool pool(StackPoolOptions{.stackSize = 16 * 1024});
  struct Big {
    char bytes[8 * 1024];
  };
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [big = Big{}] { (void)big; });
  ASSERT_FALSE(fiber.ok());
  EXPECT_EQ(fiber.code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(pool.mappedCount(), 0u);
}

TEST(Fiber, SecondFiberRunsOnTheRecycledStackOfTheFirst) {
  StackPool pool;
  for (int i = 0; i < 3; ++i) {
    Result<OwnedFiber<int>> fiber = Fiber::tryStart(pool, [i] { return i; });
    ASSERT_TRUE(fiber.ok());
    fiber->resume();
    EXPECT_EQ(fiber->result(), i);
  }
  EXPECT_EQ(pool.mappedCount(), 1u);
  EXPECT_EQ(pool.freeCount(), 1u);
}

TEST(Fiber, WaitSuspendsUntilTheWaitableWakesItThroughItsScheduler) {
  StackPool pool;
  FiberReadyQueue ready;
  TestEvent event;
  int stage = 0;
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(
      pool,
      [&] {
        stage = 1;
        Status s = wait(event);
        EXPECT_TRUE(s.ok());
        stage = 2;
      },
      &ready);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  EXPECT_EQ(stage, 1);
  EXPECT_TRUE(event.hasWaiters());
  EXPECT_EQ(ready.runReady(), 0u);  // not woken: nothing to run
  EXPECT_EQ(stage, 1);
  event.set();  // wakes: queues the fiber, does not run it
  EXPECT_EQ(stage, 1);
  EXPECT_FALSE(ready.empty());
  EXPECT_EQ(ready.runReady(), 1u);
  EXPECT_EQ(stage, 2);
  EXPECT_TRUE(fiber->done());
}

TEST(Fiber, WaitOnAReadyWaitableReturnsWithoutSuspending) {
  StackPool pool;
  TestEvent event;
  event.set();
  Result<OwnedFiber<bool>> fiber = Fiber::tryStart(pool, [&] { return wait(event).ok(); });
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  ASSERT_TRUE(fiber->done());
  EXPECT_TRUE(fiber->result());
}

TEST(Fiber, WaitToleratesASpuriousResume) {
  StackPool pool;
  FiberReadyQueue ready;
  TestEvent event;
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(
      pool, [&] { (void)wait(event); }, &ready);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  fiber->resume();  // not woken: wait() suspends again
  EXPECT_EQ((*fiber)->state(), Fiber::State::SUSPENDED);
  event.set();
  ready.runReady();
  EXPECT_TRUE(fiber->done());
}

TEST(Fiber, DestroyingAFiberBlockedInWaitCancelsTheWaitAndRemovesItsWaiter) {
  StackPool pool;
  FiberReadyQueue ready;
  TestEvent event;
  Errc seen = Errc::OK;
  {
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(
        pool, [&] { seen = wait(event).code(); }, &ready);
    ASSERT_TRUE(fiber.ok());
    fiber->resume();
    EXPECT_TRUE(event.hasWaiters());
  }
  EXPECT_EQ(seen, Errc::CANCELLED);
  EXPECT_FALSE(event.hasWaiters());
  EXPECT_EQ(event.removed(), 1);
  EXPECT_EQ(pool.inUseCount(), 0u);
  event.set();  // nobody left to wake
  EXPECT_TRUE(ready.empty());
}

TEST(Fiber, DestroyingAWokenButNotYetResumedFiberLeavesTheReadyQueue) {
  StackPool pool;
  FiberReadyQueue ready;
  TestEvent event;
  {
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(
        pool, [&] { (void)wait(event); }, &ready);
    ASSERT_TRUE(fiber.ok());
    fiber->resume();
    event.set();
    EXPECT_FALSE(ready.empty());
  }
  EXPECT_TRUE(ready.empty());
  EXPECT_EQ(ready.runReady(), 0u);
}

TEST(Fiber, WakingAQueuedFiberAgainQueuesItOnce) {
  StackPool pool;
  FiberReadyQueue ready;
  int resumes = 0;
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(
      pool,
      [&] {
        while (Fiber::suspend().ok()) ++resumes;
      },
      &ready);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  (*fiber)->wake();
  (*fiber)->wake();
  EXPECT_EQ(ready.runReady(), 1u);
  EXPECT_EQ(resumes, 1);
  EXPECT_TRUE(ready.empty());
}

TEST(Fiber, WakingAFinishedFiberQueuesNothing) {
  StackPool pool;
  FiberReadyQueue ready;
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(
      pool, [] {}, &ready);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  (*fiber)->wake();
  EXPECT_TRUE(ready.empty());
}

TEST(Fiber, JoinWaitsForAnotherFiberToFinish) {
  StackPool pool;
  FiberReadyQueue ready;
  TestEvent event;
  Result<OwnedFiber<int>> worker = Fiber::tryStart(
      pool, [&] { return wait(event).ok() ? 5 : -1; }, &ready);
  ASSERT_TRUE(worker.ok());
  OwnedFiber<int>& w = *worker;
  Result<OwnedFiber<int>> joiner = Fiber::tryStart(
      pool,
      [&] {
        if (!w.join().ok()) return -1;
        return w.result() + 1;
      },
      &ready);
  ASSERT_TRUE(joiner.ok());
  w.resume();
  joiner->resume();
  EXPECT_FALSE(joiner->done());
  event.set();
  ready.runReady();  // worker finishes and wakes the joiner (queued for the next turn)
  EXPECT_TRUE(w.done());
  ready.runReady();
  ASSERT_TRUE(joiner->done());
  EXPECT_EQ(joiner->result(), 6);
}

TEST(Fiber, FibersRunOnASecondThreadWithTheirOwnCurrentFiber) {
  StackPool mainPool;
  Result<OwnedFiber<void>> here = Fiber::tryStart(mainPool, [] { (void)Fiber::suspend(); });
  ASSERT_TRUE(here.ok());
  here->resume();
  int result = 0;
  std::thread other([&] {
    StackPool pool;
    EXPECT_EQ(Fiber::current(), nullptr);  // the main thread's fiber is not current here
    Result<OwnedFiber<int>> fiber = Fiber::tryStart(pool, [] { return 3; });
    if (!fiber.ok()) return;
    fiber->resume();
    result = fiber->result();
  });
  other.join();
  EXPECT_EQ(result, 3);
}

TEST(Fiber, PreparingAThreadInstallsAnAlternateSignalStackAndTheFaultHandler) {
  std::thread([] {
    ASSERT_TRUE(Fiber::tryPrepareThread().ok());
    ASSERT_TRUE(Fiber::tryPrepareThread().ok());  // idempotent
    stack_t alt{};
    ASSERT_EQ(sigaltstack(nullptr, &alt), 0);
    EXPECT_EQ(alt.ss_flags & SS_DISABLE, 0);
    EXPECT_GE(alt.ss_size, 16u * 1024);
    struct sigaction segv {};
    ASSERT_EQ(sigaction(SIGSEGV, nullptr, &segv), 0);
    EXPECT_NE(segv.sa_flags & SA_ONSTACK, 0);
    EXPECT_NE(segv.sa_flags & SA_SIGINFO, 0);
  }).join();
}

TEST(Fiber, SwitchingAndStartingFromAWarmPoolAllocateNothing) {
  StackPool pool;
  FiberReadyQueue ready;
  TestEvent event;
  {  // warm: the pool maps its stack, the thread sets up its fault handling
    Result<OwnedFiber<void>> warm = Fiber::tryStart(pool, [] {});
    ASSERT_TRUE(warm.ok());
    warm->resume();
  }
  const size_t before = newCalls();
  {
    Result<OwnedFiber<int>> fiber = Fiber::tryStart(
        pool,
        [&] {
          int n = 0;
          for (int i = 0; i < 1000; ++i) {
            if (Fiber::suspend().ok()) ++n;
          }
          if (wait(event).ok()) ++n;
          return n;
        },
        &ready);
    if (!fiber.ok()) std::abort();
    for (int i = 0; i <= 1000; ++i) fiber->resume();
    event.set();
    ready.runReady();
    if (!fiber->done() || fiber->result() != 1001) std::abort();
  }
  const size_t after = newCalls();
  EXPECT_EQ(after - before, 0u);
  EXPECT_EQ(pool.mappedCount(), 1u);
}

// --- Precondition and thread checks ---------------------------------------------------------

TEST(FiberDeathTest, SuspendOutsideAnyFiberIsAPreconditionViolation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH((void)Fiber::suspend(), "called outside any fiber");
}

TEST(FiberDeathTest, ResumingAFinishedFiberIsAPreconditionViolation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  StackPool pool;
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [] {});
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  EXPECT_DEATH(fiber->resume(), "resumed while finished");
}

TEST(FiberDeathTest, FiberResumingItselfIsAPreconditionViolation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool;
        Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [] { Fiber::current()->resume(); });
        if (fiber.ok()) fiber->resume();
      },
      "resumed while running");
}

TEST(FiberDeathTest, DestroyingARunningFiberIsAPreconditionViolation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool;
        OwnedFiber<void> self;
        Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [&] { self.reset(); });
        if (!fiber.ok()) return;
        self = std::move(*fiber);
        self.resume();
      },
      "destroyed while running");
}

TEST(FiberDeathTest, ResumingOnAnotherThreadIsRefusedBecauseFibersNeverMigrate) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool;
        Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [] { (void)Fiber::suspend(); });
        if (!fiber.ok()) return;
        fiber->resume();
        std::thread([&] { fiber->resume(); }).join();
      },
      "resumed on a thread other than the one that started it");
}

TEST(FiberDeathTest, WaitWithoutASchedulerIsAPreconditionViolation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool;
        TestEvent event;
        Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [&] { (void)wait(event); });
        if (fiber.ok()) fiber->resume();
      },
      "waits but has no FiberScheduler");
}

// --- Stack overflow and ordinary faults ------------------------------------------------------

// Recurses with a frame the compiler cannot shrink, until the stack runs out.
int recurseDeeply(int depth) {
  volatile char frame[256];
  frame[0] = static_cast<char>(depth);
  if (depth > 1000000000) return frame[0];
  return recurseDeeply(depth + 1) + frame[0];
}

TEST(FiberDeathTest, OverflowingAFiberStackIsReportedClearly) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool;  // 64 KiB stacks
        Result<OwnedFiber<int>> fiber = Fiber::tryStart(pool, [] { return recurseDeeply(0); });
        if (fiber.ok()) fiber->resume();
      },
      "agate: fiber stack overflow: fiber [0-9]+ ran past its 64 KiB stack");
}

// One frame far larger than the 4 KiB guard. Without stack-clash probing (-fstack-clash-protection,
// set in cmake/AgateOptions.cmake) it would jump over the guard into the mapping below and corrupt
// it silently; the test puts a writable mapping right there when that address range is free.
__attribute__((noinline)) int useHugeFrame(int seed) {
  volatile char frame[48 * 1024];
  frame[0] = static_cast<char>(seed);
  frame[sizeof frame - 1] = static_cast<char>(seed);
  return frame[0] + frame[sizeof frame - 1];
}

TEST(FiberDeathTest, OverflowByAFrameLargerThanTheGuardIsStillReported) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool(StackPoolOptions{.stackSize = 32 * 1024});
        Result<FiberStack> probe = pool.tryAcquire();  // learn where the next fiber's stack is
        if (!probe.ok()) std::abort();
        std::byte* guardLow = probe->base - pool.guardSize();
        pool.release(*probe);
        constexpr size_t BELOW = 64 * 1024;
        // Fails (EEXIST) when something is already mapped there, often a library's data: the
        // same hazard, so the test goes on either way.
        (void)mmap(guardLow - BELOW, BELOW, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        Result<OwnedFiber<int>> fiber = Fiber::tryStart(pool, [] { return useHugeFrame(1); });
        if (fiber.ok()) fiber->resume();
      },
      "agate: fiber stack overflow: fiber [0-9]+ ran past its 32 KiB stack");
}

TEST(FiberDeathTest, OverflowOnASecondThreadIsReportedOnThatThreadsAltStack) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        std::thread([] {
          StackPool pool(StackPoolOptions{.stackSize = 32 * 1024});
          Result<OwnedFiber<int>> fiber = Fiber::tryStart(pool, [] { return recurseDeeply(0); });
          if (fiber.ok()) fiber->resume();
        }).join();
      },
      "agate: fiber stack overflow: fiber [0-9]+ ran past its 32 KiB stack");
}

// Writes through a null pointer (UBSan's null check is off here: the point is the real fault).
__attribute__((no_sanitize("undefined"), noinline)) void writeThroughNull() {
  volatile int* volatile p = nullptr;
  *p = 1;
}

// An ordinary crash must look ordinary: killed by SIGSEGV in a plain build; under a sanitizer,
// passed on to the sanitizer's own SEGV report. Never reported as a fiber overflow.
#if defined(AGATE_ASAN) || defined(AGATE_TSAN)
#define AGATE_EXPECT_ORDINARY_SEGV(stmt) \
  EXPECT_EXIT(                           \
      stmt, [](int status) { return status != 0; }, "SEGV on unknown address")
#else
#define AGATE_EXPECT_ORDINARY_SEGV(stmt) EXPECT_EXIT(stmt, ::testing::KilledBySignal(SIGSEGV), "")
#endif

TEST(FiberDeathTest, NullDereferenceOutsideFibersStillCrashesAsAnOrdinarySegfault) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  AGATE_EXPECT_ORDINARY_SEGV({
    StackPool pool;  // starting a fiber installs Agate's fault handler
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [] {});
    if (fiber.ok()) fiber->resume();
    writeThroughNull();
  });
}

TEST(FiberDeathTest, NullDereferenceInsideAFiberIsNotReportedAsOverflow) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  AGATE_EXPECT_ORDINARY_SEGV({
    StackPool pool;
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(pool, [] { writeThroughNull(); });
    if (fiber.ok()) fiber->resume();
  });
}

}  // namespace
}  // namespace agate
