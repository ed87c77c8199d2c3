// Promise<T>, coroutines and fulfillers: values, errors, cancellation by drop, deep chains.
#include "agate/runtime/promise.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <stdexcept>

#include <kj/debug.h>

#include "agate/runtime/event_loop.h"

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

Promise<int> leaf(EventLoop& loop, int v) {
  co_await loop.yield();
  co_return v;
}

Promise<int> failingLeaf(EventLoop& loop) {
  co_await loop.yield();
  co_return Error(Errc::PROTOCOL_ERROR, "leaf failed");
}

Promise<int> middle(EventLoop& loop, bool fail) {
  Result<int> r = fail ? co_await failingLeaf(loop) : co_await leaf(loop, 20);
  AGATE_CO_TRY(r);
  co_return r.value() + 1;
}

Promise<int> top(EventLoop& loop, bool fail) {
  Result<int> r = co_await middle(loop, fail);
  AGATE_CO_TRY(r);
  co_return r.value() * 2;
}

TEST(PromiseTest, ValuePropagatesThroughNestedCoroutines) {
  EventLoop loop;
  Result<int> r = runWithin(loop, top(loop, false));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 42);
}

TEST(PromiseTest, ErrorPropagatesThroughNestedCoroutinesUnchanged) {
  EventLoop loop;
  Result<int> r = runWithin(loop, top(loop, true));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::PROTOCOL_ERROR);
  EXPECT_STREQ(r.error().detail, "leaf failed");
}

// What Cap'n Proto throws when content another process sent cannot be read.
Promise<int> readsMalformedContent(EventLoop& loop, bool& unwound) {
  struct Guard {
    bool& unwound;
    ~Guard() { unwound = true; }
  } guard{unwound};
  co_await loop.yield();
  KJ_FAIL_REQUIRE("Message did not contain a struct where one was expected");
  co_return 1;
}

Promise<int> readsPastItsBudget(EventLoop& loop, bool& unwound) {
  Result<int> inner = co_await readsMalformedContent(loop, unwound);
  AGATE_CO_TRY(inner);
  co_return *inner + 1;
}

TEST(PromiseTest, AReadRefusedByCapnProtoEndsTheCoroutineWithProtocolError) {
  EventLoop loop;
  bool unwound = false;
  Result<int> r = runWithin(loop, readsPastItsBudget(loop, unwound));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::PROTOCOL_ERROR) << "propagated as an error value, not a crash";
  EXPECT_TRUE(unwound) << "the coroutine's locals were destroyed";
}

Promise<int> throwsSomethingElse(EventLoop& loop) {
  co_await loop.yield();
  throw std::runtime_error("a bug");
  co_return 1;
}

TEST(PromiseDeathTest, AnyOtherExceptionEscapingACoroutineIsABug) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        EventLoop loop;
        (void)loop.run(throwsSomethingElse(loop));
      },
      "");
}

Promise<void> setFlag(bool& flag) {
  flag = true;
  co_return {};
}

TEST(PromiseTest, CoroutineStartsEagerlyAndCompletesWithoutTheLoop) {
  EventLoop loop;
  bool ran = false;
  Promise<void> p = setFlag(ran);
  EXPECT_TRUE(ran);
  ASSERT_TRUE(p.isReady());
  EXPECT_TRUE(p.takeResult().ok());
}

struct SetOnDestroy {
  bool* flag;
  ~SetOnDestroy() { *flag = true; }
};

Promise<int> waitForever(EventLoop& loop, bool& destroyed, bool& resumed) {
  SetOnDestroy guard{&destroyed};
  (void)co_await loop.sleep(1h);
  resumed = true;
  co_return 1;
}

TEST(PromiseTest, DroppingAPendingCoroutineDestroysItsLocals) {
  EventLoop loop;
  bool destroyed = false;
  bool resumed = false;
  {
    Promise<int> p = waitForever(loop, destroyed, resumed);
    loop.runUntilIdle();
    EXPECT_FALSE(destroyed);
  }
  EXPECT_TRUE(destroyed);
  EXPECT_FALSE(resumed);
}

Promise<void> sleepThenSet(EventLoop& loop, Duration d, bool& fired) {
  (void)co_await loop.sleep(d);
  fired = true;
  co_return {};
}

TEST(PromiseTest, DroppedSleepNeverFires) {
  EventLoop loop;
  bool fired = false;
  { Promise<void> p = sleepThenSet(loop, 5ms, fired); }
  Result<void> waited = runWithin(loop, loop.sleep(30ms));
  EXPECT_TRUE(waited.ok());
  EXPECT_FALSE(fired);
}

TEST(PromiseTest, FulfillerDestroyedWithoutFulfillingResolvesToCancelled) {
  EventLoop loop;
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  { Fulfiller<int> gone = std::move(fulfiller); }
  ASSERT_TRUE(promise.isReady());
  Result<int> r = promise.takeResult();
  EXPECT_EQ(r.code(), Errc::CANCELLED);
}

TEST(PromiseTest, FulfillerSeesCancellationWhenPromiseIsDropped) {
  EventLoop loop;
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  EXPECT_FALSE(fulfiller.isCancelled());
  { Promise<int> gone = std::move(promise); }
  EXPECT_TRUE(fulfiller.isCancelled());
  fulfiller.fulfill(7);  // harmless: nobody listens
  EXPECT_FALSE(fulfiller.isFulfilled());
}

Promise<int> awaitAndRecord(Promise<int> p, bool& resumed) {
  Result<int> r = co_await p;
  resumed = true;
  co_return r;
}

TEST(PromiseTest, FulfillSchedulesTheWaiterInsteadOfResumingItInline) {
  EventLoop loop;
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  bool resumed = false;
  Promise<int> waiter = awaitAndRecord(std::move(promise), resumed);
  fulfiller.fulfill(5);
  EXPECT_FALSE(resumed);  // not re-entrant: the waiter runs on the loop's next task
  Result<int> r = runWithin(loop, std::move(waiter));
  EXPECT_TRUE(resumed);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 5);
}

TEST(PromiseTest, FulfillingWithAnErrorDeliversTheError) {
  EventLoop loop;
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  fulfiller.fulfill(Error(Errc::DISCONNECTED, "peer died"));
  Result<int> r = runWithin(loop, std::move(promise));
  EXPECT_EQ(r.code(), Errc::DISCONNECTED);
}

TEST(PromiseTest, MovedPromiseKeepsItsResultAndMovedFromOneIsInvalid) {
  EventLoop loop;
  Promise<int> a = readyPromise<int>(9);
  Promise<int> b = std::move(a);
  EXPECT_FALSE(a.isValid());  // NOLINT(bugprone-use-after-move): checking the moved-from state
  ASSERT_TRUE(b.isValid());
  Promise<int> c = readyPromise<int>(1);
  c = std::move(b);
  Result<int> r = c.takeResult();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 9);
}

TEST(PromiseTest, MoveOnlyValuesTravelThroughCoroutines) {
  EventLoop loop;
  auto make = [](EventLoop& l) -> Promise<std::unique_ptr<int>> {
    co_await l.yield();
    co_return std::make_unique<int>(3);
  };
  Result<std::unique_ptr<int>> r = runWithin(loop, make(loop));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r.value(), 3);
}

TEST(PromiseTest, ThenTransformsAValueAndPassesErrorsOn) {
  EventLoop loop;
  Promise<int> doubled =
      leaf(loop, 4).then([](Result<int> r) -> Result<int> { return r.ok() ? r.value() * 2 : r; });
  Result<int> r = runWithin(loop, std::move(doubled));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 8);

  Promise<int> failed = failingLeaf(loop).then([](Result<int> r2) -> Result<int> { return r2; });
  EXPECT_EQ(runWithin(loop, std::move(failed)).code(), Errc::PROTOCOL_ERROR);
}

Promise<int> nested(EventLoop& loop, int depth) {
  co_await loop.yield();  // unwind the native stack before descending further
  if (depth == 0) co_return 0;
  Result<int> r = co_await nested(loop, depth - 1);
  AGATE_CO_TRY(r);
  co_return r.value() + 1;
}

TEST(PromiseTest, HundredThousandNestedAwaitsDoNotOverflowTheStack) {
  EventLoop loop;
  Result<int> r = runWithin(loop, nested(loop, 100'000), 60s);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 100'000);
}

Promise<int> immediate(int v) { co_return v; }

Promise<int64_t> sequential(EventLoop& loop, int n) {
  int64_t sum = 0;
  for (int i = 0; i < n; ++i) {
    Result<int> r = co_await immediate(i);
    sum += r.value();
    if (i % 1000 == 0) co_await loop.yield();
  }
  co_return sum;
}

TEST(PromiseTest, HundredThousandSequentialAwaitsComplete) {
  EventLoop loop;
  Result<int64_t> r = runWithin(loop, sequential(loop, 100'000), 60s);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), int64_t{100'000} * 99'999 / 2);
}

Promise<void> bumpAfterYield(EventLoop& loop, int& counter) {
  co_await loop.yield();
  ++counter;
  co_return {};
}

TEST(PromiseTest, SpawnedPromisesRunDetached) {
  EventLoop loop;
  int counter = 0;
  for (int i = 0; i < 10; ++i) loop.spawn(bumpAfterYield(loop, counter));
  loop.runUntilIdle();
  EXPECT_EQ(counter, 10);
}

TEST(PromiseTest, DestroyingTheLoopCancelsSpawnedPromises) {
  bool destroyed = false;
  bool resumed = false;
  {
    EventLoop loop;
    loop.spawn(waitForever(loop, destroyed, resumed));
    loop.runUntilIdle();
    EXPECT_FALSE(destroyed);
  }
  EXPECT_TRUE(destroyed);
  EXPECT_FALSE(resumed);
}

TEST(PromiseTest, DeadlineCancelsTheSlowPromiseAndReportsTimedOut) {
  EventLoop loop;
  auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
  Result<int> r = loop.run(loop.deadline(std::move(promise), 5ms));
  EXPECT_EQ(r.code(), Errc::TIMED_OUT);
  EXPECT_TRUE(fulfiller.isCancelled());
}

TEST(PromiseTest, DeadlinePassesOnAResultThatArrivesInTime) {
  EventLoop loop;
  Result<int> r = loop.run(loop.deadline(leaf(loop, 11), 10s));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 11);
}

}  // namespace
}  // namespace agate
