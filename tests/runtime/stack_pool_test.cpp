#include "agate/runtime/stack_pool.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace agate {
namespace {

size_t pageSize() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

TEST(StackPool, AcquireLendsAWritableStackOfTheConfiguredSize) {
  StackPool pool(StackPoolOptions{.stackSize = 16 * 1024});
  Result<FiberStack> stack = pool.tryAcquire();
  ASSERT_TRUE(stack.ok());
  EXPECT_EQ(stack->size, 16u * 1024);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(stack->base) % pageSize(), 0u);
  std::memset(stack->base, 0xab, stack->size);  // every usable byte is writable
  EXPECT_EQ(pool.inUseCount(), 1u);
  EXPECT_EQ(pool.freeCount(), 0u);
  EXPECT_EQ(pool.mappedCount(), 1u);
  pool.release(*stack);
}

TEST(StackPool, SizesRoundUpToWholePages) {
  StackPool pool(StackPoolOptions{.stackSize = 5000, .guardSize = 1});
  EXPECT_EQ(pool.stackSize(), 2 * pageSize());
  EXPECT_EQ(pool.guardSize(), pageSize());
}

TEST(StackPoolDeathTest, ByteBelowTheStackIsAGuardThatFaults) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool;
        Result<FiberStack> stack = pool.tryAcquire();
        if (!stack.ok()) _exit(0);  // would not die: the test fails
        static_cast<volatile std::byte*>(stack->base)[-1] = std::byte{1};
        _exit(0);
      },
      "");
}

TEST(StackPool, ReleasedStackIsLentAgainWithoutMappingAnother) {
  StackPool pool;
  Result<FiberStack> first = pool.tryAcquire();
  ASSERT_TRUE(first.ok());
  pool.release(*first);
  EXPECT_EQ(pool.freeCount(), 1u);
  Result<FiberStack> second = pool.tryAcquire();
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(pool.mappedCount(), 1u);
  EXPECT_EQ(pool.freeCount(), 0u);
  EXPECT_EQ(pool.inUseCount(), 1u);
  pool.release(*second);
}

TEST(StackPool, ExhaustedPoolRefusesAcquireWithOutOfMemoryAndKeepsItsState) {
  StackPool pool(StackPoolOptions{.maxStacks = 2});
  Result<FiberStack> a = pool.tryAcquire();
  Result<FiberStack> b = pool.tryAcquire();
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  Result<FiberStack> c = pool.tryAcquire();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.code(), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(pool.mappedCount(), 2u);
  EXPECT_EQ(pool.inUseCount(), 2u);
  EXPECT_EQ(pool.freeCount(), 0u);
  // Still usable: a returned stack is lent again.
  pool.release(*a);
  Result<FiberStack> d = pool.tryAcquire();
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(pool.mappedCount(), 2u);
  pool.release(*b);
  pool.release(*d);
}

TEST(StackPool, ReserveMapsFreeStacksSoAcquireNeedsNoMapping) {
  StackPool pool(StackPoolOptions{.maxStacks = 4});
  ASSERT_TRUE(pool.tryReserve(3).ok());
  EXPECT_EQ(pool.freeCount(), 3u);
  EXPECT_EQ(pool.mappedCount(), 3u);
  std::vector<FiberStack> lent;
  for (int i = 0; i < 3; ++i) {
    Result<FiberStack> s = pool.tryAcquire();
    ASSERT_TRUE(s.ok());
    lent.push_back(*s);
  }
  EXPECT_EQ(pool.mappedCount(), 3u);
  for (FiberStack s : lent) pool.release(s);
}

TEST(StackPool, ReserveBeyondTheCapFailsWithOutOfMemoryKeepingWhatItMapped) {
  StackPool pool(StackPoolOptions{.maxStacks = 2});
  Status s = pool.tryReserve(3);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(pool.mappedCount(), 2u);
  EXPECT_EQ(pool.freeCount(), 2u);
  EXPECT_EQ(pool.inUseCount(), 0u);
}

TEST(StackPool, PrefaultedStackIsZeroedAndWritable) {
  StackPool pool(StackPoolOptions{.stackSize = 32 * 1024, .prefault = true});
  Result<FiberStack> stack = pool.tryAcquire();
  ASSERT_TRUE(stack.ok());
  for (size_t i = 0; i < stack->size; i += 512) EXPECT_EQ(stack->base[i], std::byte{0});
  std::memset(stack->base, 1, stack->size);
  pool.release(*stack);
}

TEST(StackPoolDeathTest, ZeroMaxStacksIsAPreconditionViolation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(StackPool(StackPoolOptions{.maxStacks = 0}), "maxStacks must be at least 1");
}

TEST(StackPoolDeathTest, ReleasingAStackOfAnotherSizeIsAPreconditionViolation) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  StackPool small(StackPoolOptions{.stackSize = 16 * 1024});
  StackPool large(StackPoolOptions{.stackSize = 32 * 1024});
  Result<FiberStack> stack = large.tryAcquire();
  ASSERT_TRUE(stack.ok());
  EXPECT_DEATH(small.release(*stack), "was not lent by this pool");
  large.release(*stack);
}

TEST(StackPoolDeathTest, DestroyingAPoolWithALentStackIsABug) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        StackPool pool;
        (void)pool.tryAcquire();
      },
      "destroyed with 1 stacks still lent");
}

}  // namespace
}  // namespace agate
