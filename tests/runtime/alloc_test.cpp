// Steady state allocates nothing: this binary links the counting operator new
// (support/alloc_counter.h) and checks 100 000 co_await round trips through the loop after a
// warm-up.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <atomic>
#include <vector>

#include "agate/runtime/event_loop.h"
#include "support/alloc_counter.h"
#include "support/steady_state.h"

namespace agate {
namespace {

// One round trip: a child coroutine suspends on the loop (yield), a fulfiller resumes its
// awaiter through the run queue; every 100th, a zero-length timer goes through the timer tree
// and a futex wait through the backend.
Promise<int> child(EventLoop& loop, int i) {
  co_await loop.yield();
  co_return i;
}

Promise<int64_t> roundTrips(EventLoop& loop, int n) {
  std::atomic<uint32_t> word{0};
  int64_t sum = 0;
  for (int i = 0; i < n; ++i) {
    Result<int> r = co_await child(loop, i);
    auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
    fulfiller.fulfill(r.value());
    Result<int> f = co_await promise;
    if (i % 100 == 0) {
      AGATE_CO_TRY(co_await loop.sleep(Duration::zero()));
      // A kernel operation node too: a futex wait on a value that already differs.
      AGATE_CO_TRY(co_await loop.waitFutex(word, 1, /*shared=*/false));
    }
    sum += f.value();
  }
  co_return sum;
}

class AllocTest : public ::testing::TestWithParam<Backend> {};
INSTANTIATE_TEST_SUITE_P(Backends, AllocTest, ::testing::Values(Backend::URING, Backend::EPOLL),
                         [](const auto& p) { return std::string(backendName(p.param)); });

TEST_P(AllocTest, HundredThousandAwaitRoundTripsAllocateNothingInSteadyState) {
  EventLoop loop(LoopOptions{.backend = GetParam()});
  ASSERT_TRUE(loop.run(roundTrips(loop, 1000)).ok());  // warm-up fills the frame arena
  constexpr int N = 100'000;
  testing::expectNoAllocationsInSteadyState(
      loop,
      [&] {
        Result<int64_t> r = loop.run(roundTrips(loop, N));
        ASSERT_TRUE(r.ok());
        ASSERT_EQ(r.value(), int64_t{N} * (N - 1) / 2);
      },
      "100000 round trips");
}

// The steady-state check itself (support/steady_state.h): growth of the loop's arena is forgiven
// while it stops; anything else, or growth in every run, fails.
class SteadyStateCheckTest : public ::testing::Test {
 protected:
  // A size class nothing else here uses, so its first block comes from the heap.
  static constexpr size_t BIG = FrameArena::MAX_BLOCK;
  EventLoop loop_;
};

TEST_F(SteadyStateCheckTest, ARunThatAllocatesNothingPassesAtOnce) {
  int runs = 0;
  testing::expectNoAllocationsInSteadyState(
      loop_, [&] { ++runs; }, "nothing");
  EXPECT_EQ(runs, 1);
}

TEST_F(SteadyStateCheckTest, ArenaGrowthThatStopsIsForgiven) {
  int runs = 0;
  testing::expectNoAllocationsInSteadyState(
      loop_,
      [&] {
        ++runs;
        void* block = loop_.arena().allocate(BIG);  // a new peak in the first run only
        loop_.arena().deallocate(block, BIG);
      },
      "a new peak");
  EXPECT_EQ(runs, 2);
  EXPECT_EQ(loop_.arena().heapAllocations(), FrameArena::REFILL_BLOCKS);
}

TEST_F(SteadyStateCheckTest, AHeapAllocationOutsideTheArenaFailsTheFirstRun) {
  int runs = 0;
  EXPECT_NONFATAL_FAILURE(testing::expectNoAllocationsInSteadyState(
                              loop_,
                              [&] {
                                ++runs;
                                // Called directly: a new-expression paired with its delete
                                // may be elided by the optimiser.
                                ::operator delete(::operator new(sizeof(int)));
                              },
                              "a plain new"),
                          "1 heap allocation(s) during a plain new (run 1), of which 0 grew");
  EXPECT_EQ(runs, 1);
}

TEST_F(SteadyStateCheckTest, ArenaGrowthInEveryRunFails) {
  // Blocks kept per run, like a frame leaked per call: every run sets a new peak.
  std::vector<void*> kept;
  kept.reserve(3 * FrameArena::REFILL_BLOCKS);
  EXPECT_NONFATAL_FAILURE(testing::expectNoAllocationsInSteadyState(
                              loop_,
                              [&] {
                                for (size_t i = 0; i < FrameArena::REFILL_BLOCKS; ++i)
                                  kept.push_back(loop_.arena().allocate(BIG));
                              },
                              "a leak", 3),
                          "grew in every one of 3 runs of a leak (heap blocks per run: 4, 4, 4)");
  for (void* block : kept) loop_.arena().deallocate(block, BIG);
}

TEST(AllocCounterTest, CounterSeesAllocationsOutsideTheArena) {
  // operator new called directly: an optimiser may elide a new-expression paired with its
  // delete, and this test runs in the release build too.
  uint64_t before = testing::allocationCount();
  void* p = ::operator new(sizeof(int));
  uint64_t after = testing::allocationCount();
  ::operator delete(p);
  EXPECT_EQ(after - before, 1u);
}

}  // namespace
}  // namespace agate
