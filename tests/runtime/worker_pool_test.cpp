// WorkerPool: results come back on the loop thread, jobs run in parallel, cancellation by drop,
// shutdown, and a steady state without allocations. Links the counting operator new.
#include "agate/runtime/worker_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <thread>
#include <vector>

#include "agate/runtime/event_loop.h"
#include "support/alloc_counter.h"
#include "support/watchdog.h"

namespace agate {
namespace {

using namespace std::chrono_literals;
using testing::Watchdog;

// A gate a job blocks on until the test opens it.
class Gate {
 public:
  void open() {
    open_.store(true, std::memory_order_release);
    open_.notify_all();
  }
  void wait() const { open_.wait(false, std::memory_order_acquire); }

 private:
  std::atomic<bool> open_{false};
};

// Spins the loop until `done` is true (results may arrive while the loop is not in run()).
template <class Pred>
void turnUntil(EventLoop& loop, Pred done) {
  while (!done()) {
    loop.runUntilIdle();
    std::this_thread::yield();
  }
}

TEST(WorkerPool, ResultsArriveOnTheLoopThread) {
  Watchdog watchdog("ResultsArriveOnTheLoopThread", 20s);
  EventLoop loop;
  WorkerPool pool(2);
  const std::thread::id loopThread = std::this_thread::get_id();
  std::thread::id ranOn;
  std::thread::id resumedOn;
  auto body = [&]() -> Promise<int> {
    Result<int> r = co_await pool.run(loop, [&] {
      ranOn = std::this_thread::get_id();
      return 42;
    });
    resumedOn = std::this_thread::get_id();
    co_return r;
  };
  Result<int> r = loop.run(body());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 42);
  EXPECT_NE(ranOn, loopThread);
  EXPECT_EQ(resumedOn, loopThread);
}

TEST(WorkerPool, ManyJobsFromManyCoroutinesAllComplete) {
  Watchdog watchdog("ManyJobsFromManyCoroutinesAllComplete", 60s);
  EventLoop loop;
  WorkerPool pool(3);
  constexpr int COROUTINES = 16;
  constexpr int JOBS = 50;
  auto one = [&](int c) -> Promise<int64_t> {
    int64_t sum = 0;
    for (int j = 0; j < JOBS; ++j) {
      Result<int> r = co_await pool.run(loop, [c, j] { return c * 1000 + j; });
      if (!r.ok()) co_return r.error();
      sum += r.value();
    }
    co_return sum;
  };
  auto all = [&]() -> Promise<int64_t> {
    std::vector<Promise<int64_t>> running;
    for (int c = 0; c < COROUTINES; ++c) running.push_back(one(c));
    int64_t total = 0;
    for (auto& p : running) {
      Result<int64_t> r = co_await p;
      if (!r.ok()) co_return r.error();
      total += r.value();
    }
    co_return total;
  };
  Result<int64_t> r = loop.run(all());
  ASSERT_TRUE(r.ok());
  int64_t expected = 0;
  for (int c = 0; c < COROUTINES; ++c) {
    for (int j = 0; j < JOBS; ++j) expected += c * 1000 + j;
  }
  EXPECT_EQ(r.value(), expected);
}

TEST(WorkerPool, TwoJobsRunInParallel) {
  // Each job waits for the other at a barrier: a pool that ran them one at a time would hang,
  // and the watchdog would fail the test.
  Watchdog watchdog("TwoJobsRunInParallel", 20s);
  EventLoop loop;
  WorkerPool pool(2);
  std::barrier<> meet(2);
  Promise<int> a = pool.run(loop, [&] {
    meet.arrive_and_wait();
    return 1;
  });
  Promise<int> b = pool.run(loop, [&] {
    meet.arrive_and_wait();
    return 2;
  });
  EXPECT_EQ(loop.run(std::move(a)).value(), 1);
  EXPECT_EQ(loop.run(std::move(b)).value(), 2);
}

TEST(WorkerPool, JobDroppedBeforeItStartsNeverRuns) {
  Watchdog watchdog("JobDroppedBeforeItStartsNeverRuns", 20s);
  EventLoop loop;
  WorkerPool pool(1);
  Gate gate;
  std::atomic<int> ran{0};
  Promise<int> blocker = pool.run(loop, [&] {
    gate.wait();
    return 1;
  });
  {
    Promise<int> dropped = pool.run(loop, [&] {
      ran.fetch_add(1, std::memory_order_relaxed);
      return 2;
    });
  }  // dropped while the only worker is busy: still queued
  gate.open();
  EXPECT_EQ(loop.run(std::move(blocker)).value(), 1);
  pool.shutdown();  // joins: anything still queued would have run or been cancelled by now
  EXPECT_EQ(ran.load(std::memory_order_relaxed), 0);
}

TEST(WorkerPool, JobDroppedWhileRunningHasItsResultDiscarded) {
  Watchdog watchdog("JobDroppedWhileRunningHasItsResultDiscarded", 20s);
  EventLoop loop;
  WorkerPool pool(1);
  Gate started;
  Gate gate;
  std::atomic<bool> finished{false};
  WorkerJob<std::vector<int>> job;
  {
    Promise<std::vector<int>> p = pool.run(loop, job, [&] {
      started.open();
      gate.wait();
      finished.store(true, std::memory_order_release);
      return std::vector<int>(1000, 7);  // a heap result: ASan sees it freed exactly once
    });
    started.wait();
  }  // dropped while running
  EXPECT_TRUE(job.busy());
  gate.open();
  turnUntil(loop, [&] { return !job.busy(); });
  EXPECT_TRUE(finished.load(std::memory_order_acquire));
  // The node is reusable at once.
  EXPECT_EQ(loop.run(pool.run(loop, job, [] { return std::vector<int>(3, 1); })).value().size(),
            3u);
}

TEST(WorkerPool, DestroyingABusyWorkerJobWaitsForTheWorker) {
  Watchdog watchdog("DestroyingABusyWorkerJobWaitsForTheWorker", 20s);
  EventLoop loop;
  WorkerPool pool(1);
  Gate started;
  std::atomic<bool> finished{false};
  {
    auto job = std::make_unique<WorkerJob<int>>();
    {
      Promise<int> p = pool.run(loop, *job, [&] {
        started.open();
        std::this_thread::sleep_for(50ms);
        finished.store(true, std::memory_order_release);
        return 1;
      });
      started.wait();
    }
    job.reset();  // blocks until the worker let go of the node
    EXPECT_TRUE(finished.load(std::memory_order_acquire));
  }
}

TEST(WorkerPool, ShutdownCancelsQueuedJobsAndFinishesRunningOnes) {
  Watchdog watchdog("ShutdownCancelsQueuedJobsAndFinishesRunningOnes", 20s);
  EventLoop loop;
  WorkerPool pool(1);
  Gate gate;
  std::atomic<int> ran{0};
  Gate started;
  Promise<int> running = pool.run(loop, [&] {
    started.open();
    gate.wait();
    return 1;
  });
  started.wait();  // running, not queued, when the pool stops
  std::vector<Promise<int>> queued;
  for (int i = 0; i < 3; ++i) {
    queued.push_back(pool.run(loop, [&] {
      ran.fetch_add(1, std::memory_order_relaxed);
      return 2;
    }));
  }
  std::thread stopper([&] { pool.shutdown(); });  // blocks in join until the running job ends
  for (auto& p : queued) {
    Result<int> r = loop.run(std::move(p));
    EXPECT_EQ(r.code(), Errc::CANCELLED);
  }
  gate.open();
  EXPECT_EQ(loop.run(std::move(running)).value(), 1);
  stopper.join();
  EXPECT_EQ(ran.load(std::memory_order_relaxed), 0);
}

TEST(WorkerPool, RunAfterShutdownIsCancelledAndNeverRuns) {
  EventLoop loop;
  WorkerPool pool(1);
  pool.shutdown();
  pool.shutdown();  // idempotent
  bool ran = false;
  Promise<int> pooled = pool.run(loop, [&] {
    ran = true;
    return 1;
  });
  EXPECT_TRUE(pooled.isReady());
  EXPECT_EQ(loop.run(std::move(pooled)).code(), Errc::CANCELLED);
  WorkerJob<int> job;
  EXPECT_EQ(loop.run(pool.run(loop, job,
                              [&] {
                                ran = true;
                                return 1;
                              }))
                .code(),
            Errc::CANCELLED);
  EXPECT_FALSE(job.busy());
  EXPECT_FALSE(ran);
}

TEST(WorkerPool, PromiseOutlivesThePoolAndCompletesCancelled) {
  Watchdog watchdog("PromiseOutlivesThePoolAndCompletesCancelled", 20s);
  EventLoop loop;
  auto pool = std::make_unique<WorkerPool>(1);
  Gate gate;
  Gate started;
  Promise<int> running = pool->run(loop, [&] {
    started.open();
    gate.wait();
    return 1;
  });
  started.wait();
  Promise<int> queued = pool->run(loop, [] { return 2; });
  std::thread destroyer([&] { pool.reset(); });
  EXPECT_EQ(loop.run(std::move(queued)).code(), Errc::CANCELLED);
  gate.open();
  destroyer.join();
  EXPECT_EQ(loop.run(std::move(running)).value(), 1);
}

TEST(WorkerPool, CallablesReturningResultOrVoidAreUnwrapped) {
  Watchdog watchdog("CallablesReturningResultOrVoidAreUnwrapped", 20s);
  EventLoop loop;
  WorkerPool pool(1);
  Result<int> failed =
      loop.run(pool.run(loop, []() -> Result<int> { return Error(Errc::NOT_FOUND, "missing"); }));
  EXPECT_EQ(failed.code(), Errc::NOT_FOUND);
  Result<int> fine = loop.run(pool.run(loop, []() -> Result<int> { return 5; }));
  EXPECT_EQ(fine.value(), 5);
  bool ran = false;
  Status done = loop.run(pool.run(loop, [&] { ran = true; }));
  EXPECT_TRUE(done.ok());
  EXPECT_TRUE(ran);
}

// Round trips through a worker after a warm-up; returns the allocations they made.
template <class Submit>
uint64_t allocationsOfRoundTrips(EventLoop& loop, Submit submit) {
  auto trips = [&](int n) -> Promise<int64_t> {
    int64_t sum = 0;
    for (int i = 0; i < n; ++i) {
      Result<int> r = co_await submit(i);
      if (!r.ok()) co_return r.error();
      sum += r.value();
    }
    co_return sum;
  };
  EXPECT_TRUE(loop.run(trips(200)).ok());
  const uint64_t before = testing::allocationCount();
  Result<int64_t> r = loop.run(trips(2000));
  const uint64_t after = testing::allocationCount();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 1999 * 2000 / 2);
  return after - before;
}

TEST(WorkerPool, UserJobNodeAllocatesNothingInSteadyState) {
  Watchdog watchdog("UserJobNodeAllocatesNothingInSteadyState", 60s);
  EventLoop loop;
  WorkerPool pool(2);
  WorkerJob<int> job;
  EXPECT_EQ(
      allocationsOfRoundTrips(loop, [&](int i) { return pool.run(loop, job, [i] { return i; }); }),
      0u);
}

TEST(WorkerPool, PooledJobNodesAllocateNothingInSteadyState) {
  Watchdog watchdog("PooledJobNodesAllocateNothingInSteadyState", 60s);
  EventLoop loop;
  WorkerPool pool(2);
  EXPECT_EQ(allocationsOfRoundTrips(loop, [&](int i) { return pool.run(loop, [i] { return i; }); }),
            0u);
}

}  // namespace
}  // namespace agate
