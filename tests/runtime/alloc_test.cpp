// Steady state allocates nothing: this binary links the counting operator new
// (support/alloc_counter.h) and checks 100 000 co_await round trips through the loop after a
// warm-up.
#include <gtest/gtest.h>

#include <atomic>

#include "agate/runtime/event_loop.h"
#include "support/alloc_counter.h"

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
  uint64_t before = testing::allocationCount();
  Result<int64_t> r = loop.run(roundTrips(loop, N));
  uint64_t after = testing::allocationCount();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), int64_t{N} * (N - 1) / 2);
  EXPECT_EQ(after - before, 0u) << "heap allocations during " << N << " round trips";
}

TEST(AllocCounterTest, CounterSeesAllocationsOutsideTheArena) {
  uint64_t before = testing::allocationCount();
  auto* p = new int(5);
  uint64_t after = testing::allocationCount();
  delete p;
  EXPECT_EQ(after - before, 1u);
}

}  // namespace
}  // namespace agate
