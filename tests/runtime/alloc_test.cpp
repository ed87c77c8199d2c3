// Steady state allocates nothing: this binary replaces the global operator new with a counting
// one and checks 100 000 co_await round trips through the loop after a warm-up.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "agate/runtime/event_loop.h"

namespace {
std::atomic<uint64_t> gAllocations{0};
}

void* operator new(size_t size) {
  gAllocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace agate {
namespace {

// One round trip: a child coroutine suspends on the loop (yield), a fulfiller resumes its
// awaiter through the run queue, and a zero-length timer goes through the timer tree.
Promise<int> child(EventLoop& loop, int i) {
  co_await loop.yield();
  co_return i;
}

Promise<int64_t> roundTrips(EventLoop& loop, int n) {
  int64_t sum = 0;
  for (int i = 0; i < n; ++i) {
    Result<int> r = co_await child(loop, i);
    auto [promise, fulfiller] = newPromiseAndFulfiller<int>();
    fulfiller.fulfill(r.value());
    Result<int> f = co_await promise;
    if (i % 100 == 0) AGATE_CO_TRY(co_await loop.sleep(Duration::zero()));
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
  uint64_t before = gAllocations.load(std::memory_order_relaxed);
  Result<int64_t> r = loop.run(roundTrips(loop, N));
  uint64_t after = gAllocations.load(std::memory_order_relaxed);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), int64_t{N} * (N - 1) / 2);
  EXPECT_EQ(after - before, 0u) << "heap allocations during " << N << " round trips";
}

TEST(AllocCounterTest, CounterSeesAllocationsOutsideTheArena) {
  uint64_t before = gAllocations.load(std::memory_order_relaxed);
  auto* p = new int(5);
  uint64_t after = gAllocations.load(std::memory_order_relaxed);
  delete p;
  EXPECT_EQ(after - before, 1u);
}

}  // namespace
}  // namespace agate
