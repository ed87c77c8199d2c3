// FrameArena: size classes, reuse of freed blocks, refill in batches, the cache bound, and the
// heap fallbacks (oversized requests, threads with no loop). The binary links the counting
// operator new (support/alloc_counter.h), so "no heap traffic" is checked, not assumed.
#include "agate/runtime/frame_arena.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "agate/runtime/event_loop.h"
#include "support/alloc_counter.h"

namespace agate {
namespace {

TEST(FrameArenaTest, AFreedBlockIsReusedForTheSameClassWithNoHeapTraffic) {
  FrameArena arena;
  void* a = arena.allocate(100);  // class 128
  arena.deallocate(a, 100);
  const uint64_t heapBefore = arena.heapAllocations();
  const uint64_t countBefore = testing::allocationCount();
  void* b = arena.allocate(120);  // same class
  EXPECT_EQ(b, a);
  EXPECT_EQ(arena.heapAllocations(), heapBefore);
  EXPECT_EQ(testing::allocationCount(), countBefore);
  arena.deallocate(b, 120);
}

TEST(FrameArenaTest, BlocksOfDifferentClassesAreNotMixed) {
  FrameArena arena;
  void* small = arena.allocate(64);
  arena.deallocate(small, 64);
  void* big = arena.allocate(65);  // class 128: must not get the 64-byte block back
  EXPECT_NE(big, small);
  std::memset(big, 0xab, 128);  // the whole class size is usable (ASan checks it)
  arena.deallocate(big, 65);
}

TEST(FrameArenaTest, AnEmptyClassIsRefilledInABatchSoTheNextPeaksCostNoHeapCall) {
  FrameArena arena;
  void* first = arena.allocate(200);
  EXPECT_EQ(arena.heapAllocations(), FrameArena::REFILL_BLOCKS);
  EXPECT_EQ(arena.cachedBlocks(200), FrameArena::REFILL_BLOCKS - 1);
  std::vector<void*> more;
  more.reserve(FrameArena::REFILL_BLOCKS);
  const uint64_t countBefore = testing::allocationCount();
  for (size_t i = 1; i < FrameArena::REFILL_BLOCKS; ++i) more.push_back(arena.allocate(200));
  EXPECT_EQ(testing::allocationCount(), countBefore) << "the spares served these";
  EXPECT_EQ(arena.cachedBlocks(200), 0u);
  // Every block is distinct and fully usable.
  more.push_back(first);
  for (size_t i = 0; i < more.size(); ++i) {
    std::memset(more[i], static_cast<int>(i), 256);
    for (size_t j = i + 1; j < more.size(); ++j) EXPECT_NE(more[i], more[j]);
  }
  // The next one goes to the heap again, with a new batch.
  void* next = arena.allocate(200);
  EXPECT_EQ(arena.heapAllocations(), 2 * FrameArena::REFILL_BLOCKS);
  arena.deallocate(next, 200);
  for (void* p : more) arena.deallocate(p, 200);
  EXPECT_EQ(arena.cachedBlocks(200), 2 * FrameArena::REFILL_BLOCKS);
}

TEST(FrameArenaTest, TheCacheBoundHoldsForFreedBlocksAndForSpares) {
  FrameArena arena(/*maxCachedPerClass=*/2);
  void* a = arena.allocate(64);
  EXPECT_EQ(arena.cachedBlocks(64), 2u) << "spares stop at the bound";
  std::vector<void*> held{a, arena.allocate(64), arena.allocate(64), arena.allocate(64)};
  EXPECT_EQ(arena.cachedBlocks(64), 2u) << "the fourth block came with two spares";
  EXPECT_EQ(arena.heapAllocations(), 6u);
  for (void* p : held) arena.deallocate(p, 64);
  EXPECT_EQ(arena.cachedBlocks(64), 2u) << "blocks past the bound went back to the heap";
}

TEST(FrameArenaTest, OversizedRequestsGoStraightToTheHeap) {
  FrameArena arena;
  const uint64_t before = testing::allocationCount();
  void* p = arena.allocate(FrameArena::MAX_BLOCK + 1);
  EXPECT_EQ(testing::allocationCount(), before + 1);
  EXPECT_EQ(arena.heapAllocations(), 0u);
  EXPECT_EQ(arena.cachedBlocks(FrameArena::MAX_BLOCK + 1), 0u);
  std::memset(p, 0, FrameArena::MAX_BLOCK + 1);
  arena.deallocate(p, FrameArena::MAX_BLOCK + 1);
  EXPECT_EQ(arena.cachedBlocks(FrameArena::MAX_BLOCK + 1), 0u);
}

TEST(FrameArenaTest, CurrentArenaIsTheLoopsAndTheHeapWithoutALoop) {
  // No loop on this thread: straight to the heap, and a block from a loop's arena may be freed
  // here (blocks never point back at their arena).
  const uint64_t before = testing::allocationCount();
  void* p = FrameArena::allocateFromCurrent(64);
  EXPECT_EQ(testing::allocationCount(), before + 1);
  FrameArena::deallocateToCurrent(p, 64);

  ASSERT_EQ(EventLoop::current(), nullptr);
  EventLoop loop;
  ASSERT_EQ(EventLoop::current(), &loop);
  void* q = FrameArena::allocateFromCurrent(64);
  FrameArena::deallocateToCurrent(q, 64);
  const size_t cached = loop.arena().cachedBlocks(64);
  const uint64_t countBefore = testing::allocationCount();
  void* again = FrameArena::allocateFromCurrent(64);
  EXPECT_EQ(again, q);
  EXPECT_EQ(loop.arena().cachedBlocks(64), cached - 1);
  EXPECT_EQ(testing::allocationCount(), countBefore);
  FrameArena::deallocateToCurrent(again, 64);
}

}  // namespace
}  // namespace agate
