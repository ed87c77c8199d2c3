// Fibers waiting on promises of an EventLoop: the join of fiber.h and promise.h.
#include "agate/runtime/fiber_promise.h"

#include <gtest/gtest.h>

#include <chrono>
#include <vector>

namespace agate {
namespace {

using namespace std::chrono_literals;

// Every async test runs under a deadline so a hang fails instead of blocking ctest.
template <class T>
Result<T> runWithin(EventLoop& loop, Promise<T> p, Duration limit = 10s) {
  Result<T> r = loop.run(loop.deadline(std::move(p), limit));
  if (r.code() == Errc::TIMED_OUT) ADD_FAILURE() << "watchdog: the promise did not complete";
  return r;
}

Promise<int> afterAYield(EventLoop& loop, int v) {
  co_await loop.yield();
  co_return v;
}

// Declared in destruction order: fibers go first, then their scheduler, stacks, loop.
struct FiberLoopTest : ::testing::Test {
  EventLoop loop;
  StackPool stacks;
  LoopFiberScheduler scheduler{loop};
};

TEST_F(FiberLoopTest, FiberWaitsOnAPromiseThatTheLoopFulfillsLater) {
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  auto [finished, finish] = newPromiseAndFulfiller<int>();
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(
      stacks,
      [&, &promise = promise, &finish = finish] {
        Result<int> r = wait(promise);
        finish.fulfill(r.ok() ? r.value() + 1 : -1);
      },
      &scheduler);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  EXPECT_EQ((*fiber)->state(), Fiber::State::SUSPENDED);
  FunctionTask fulfil([&fulfiller = fulfiller] { fulfiller.fulfill(41); });
  loop.post(fulfil);
  Result<int> r = runWithin(loop, std::move(finished));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 42);
  EXPECT_TRUE(fiber->done());
}

TEST_F(FiberLoopTest, FiberWaitsOnALoopTimer) {
  auto [finished, finish] = newPromiseAndFulfiller<bool>();
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(
      stacks,
      [&, &finish = finish] {
        const auto start = std::chrono::steady_clock::now();
        Result<void> slept = wait(loop.sleep(2ms));
        finish.fulfill(slept.ok() && std::chrono::steady_clock::now() - start >= 2ms);
      },
      &scheduler);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  Result<bool> r = runWithin(loop, std::move(finished));
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r.value());
}

TEST_F(FiberLoopTest, FiberWaitsOnACoroutineAndGetsItsValue) {
  auto [finished, finish] = newPromiseAndFulfiller<int>();
  Result<OwnedFiber<void>> fiber = Fiber::tryStart(
      stacks,
      [&, &finish = finish] {
        Result<int> r = wait(afterAYield(loop, 20));
        finish.fulfill(r.ok() ? r.value() : -1);
      },
      &scheduler);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  Result<int> r = runWithin(loop, std::move(finished));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 20);
}

TEST_F(FiberLoopTest, WaitOnAReadyPromiseReturnsWithoutSuspending) {
  Result<OwnedFiber<int>> fiber = Fiber::tryStart(
      stacks,
      [] {
        Result<int> r = wait(readyPromise<int>(7));
        return r.ok() ? r.value() : -1;
      },
      &scheduler);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  ASSERT_TRUE(fiber->done());
  EXPECT_EQ(fiber->result(), 7);
}

TEST_F(FiberLoopTest, ErrorOfTheAwaitedPromiseReachesTheFiber) {
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  Result<OwnedFiber<Errc>> fiber = Fiber::tryStart(
      stacks, [&promise = promise] { return wait(promise).code(); }, &scheduler);
  ASSERT_TRUE(fiber.ok());
  fiber->resume();
  fulfiller.fulfill(Error(Errc::DISCONNECTED, "peer went away"));
  loop.runUntilIdle();
  ASSERT_TRUE(fiber->done());
  EXPECT_EQ(fiber->result(), Errc::DISCONNECTED);
}

TEST_F(FiberLoopTest, DestroyingAWaitingFiberCancelsItsWaitAndLeavesThePromiseToItsOwner) {
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  Errc seen = Errc::OK;
  {
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(
        stacks, [&, &promise = promise] { seen = wait(promise).code(); }, &scheduler);
    ASSERT_TRUE(fiber.ok());
    fiber->resume();
  }
  EXPECT_EQ(seen, Errc::CANCELLED);
  EXPECT_EQ(stacks.inUseCount(), 0u);
  fulfiller.fulfill(5);  // nobody waits any more: must not touch the dropped relay
  loop.runUntilIdle();
  ASSERT_TRUE(promise.isReady());
  Result<int> r = promise.takeResult();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 5);
}

TEST_F(FiberLoopTest, DestroyingAFiberWhosePromiseCompletedButWasNotYetDeliveredIsSafe) {
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  Errc seen = Errc::OK;
  {
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(
        stacks, [&, &promise = promise] { seen = wait(promise).code(); }, &scheduler);
    ASSERT_TRUE(fiber.ok());
    fiber->resume();
    fulfiller.fulfill(5);  // queues the wake-up on the loop; the loop has not run it yet
  }
  EXPECT_EQ(seen, Errc::CANCELLED);
  loop.runUntilIdle();  // the queued wake-up must find nothing to resume
  EXPECT_TRUE(promise.isReady());
}

TEST_F(FiberLoopTest, ManyFibersWaitingOnOnePromiseEachAreResumedByTheLoop) {
  constexpr int FIBERS = 8;
  auto [allDone, finishAll] = newPromiseAndFulfiller<int>();
  int finished = 0;
  std::vector<Promise<void>> copies;  // a promise has one consumer: each fiber waits on its own
  std::vector<Fulfiller<void>> openers;
  for (int i = 0; i < FIBERS; ++i) {
    auto [p, f] = newPromiseAndFulfiller<void>();
    copies.push_back(std::move(p));
    openers.push_back(std::move(f));
  }
  std::vector<OwnedFiber<void>> fibers;
  for (int i = 0; i < FIBERS; ++i) {
    Result<OwnedFiber<void>> fiber = Fiber::tryStart(
        stacks,
        [&, i, &finishAll = finishAll] {
          if (wait(copies[static_cast<size_t>(i)]).ok() && ++finished == FIBERS) {
            finishAll.fulfill(finished);
          }
        },
        &scheduler);
    ASSERT_TRUE(fiber.ok());
    fiber->resume();
    fibers.push_back(std::move(*fiber));
  }
  for (auto& f : openers) f.fulfill(Result<void>());
  Result<int> r = runWithin(loop, std::move(allDone));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), FIBERS);
}

}  // namespace
}  // namespace agate
