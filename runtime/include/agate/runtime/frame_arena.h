// FrameArena: a size-class pool for coroutine frames and promise nodes.
//
// g++ 12 never elides coroutine frame allocations, so every call of a coroutine would otherwise
// reach malloc. Each EventLoop owns one FrameArena; `promise_type::operator new` and the loop's
// operation nodes draw from the arena of the loop current on the calling thread (the
// thread_local "current loop", the one process-wide mutable state Agate accepts; see
// event_loop.h).
//
// Blocks are kept in per-size-class free lists (powers of two from 64 B to 16 KiB). Every block
// is its own `::operator new` allocation of its class's size, so a block may be freed into any
// arena (a frame destroyed on another thread, or after its loop is gone) or straight back to the
// heap: no block ever points back at the arena it came from. Requests above 16 KiB, and requests
// made on a thread with no current loop, go to the heap directly.
//
// Steady state: once a program's working set of frames has been allocated once, allocate and
// free are a free-list pop and push, with no heap traffic. A class whose free list runs dry is
// refilled with REFILL_BLOCKS blocks at once, not one: the number of live blocks wanders above
// its usual peak now and then (a loop operation whose promise completed lives on until the
// kernel's completion for its cancellation arrives, and a loaded machine delivers those later),
// and the spares absorb such a wander instead of costing a heap allocation each time it sets a
// new peak.
//
// Threading: an arena is used only by its loop's thread.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>

namespace agate {

class FrameArena {
 public:
  static constexpr size_t MIN_BLOCK = 64;
  static constexpr size_t NUM_CLASSES = 9;  // 64 B .. 16 KiB
  static constexpr size_t MAX_BLOCK = MIN_BLOCK << (NUM_CLASSES - 1);
  // Blocks taken from the heap when a class's free list is empty: one to return, the rest kept
  // (within maxCachedPerClass).
  static constexpr size_t REFILL_BLOCKS = 4;

  // `maxCachedPerClass` bounds how many free blocks one class keeps; the excess goes back to the
  // heap, so a burst does not pin memory forever.
  explicit FrameArena(size_t maxCachedPerClass = 4096) noexcept;
  ~FrameArena();
  FrameArena(const FrameArena&) = delete;
  FrameArena& operator=(const FrameArena&) = delete;

  // A block of at least `size` bytes, aligned to __STDCPP_DEFAULT_NEW_ALIGNMENT__.
  void* allocate(size_t size);
  // Returns a block obtained from any arena's allocate(size) or allocateFromCurrent(size).
  void deallocate(void* p, size_t size) noexcept;

  // Through the current thread's loop arena, or the heap when the thread has no loop.
  static void* allocateFromCurrent(size_t size);
  static void deallocateToCurrent(void* p, size_t size) noexcept;

  // Blocks this arena obtained from the heap so far (for tests and statistics).
  uint64_t heapAllocations() const noexcept { return heapAllocations_; }
  // The class that serves `size`: blocks of MIN_BLOCK << class bytes; -1 above MAX_BLOCK.
  static constexpr int classOf(size_t size) noexcept {
    if (size > MAX_BLOCK) return -1;
    if (size <= MIN_BLOCK) return 0;
    return static_cast<int>(std::bit_width((size - 1) / MIN_BLOCK));
  }
  // Free blocks the arena keeps in the class that serves `size` (0 above MAX_BLOCK).
  size_t cachedBlocks(size_t size) const noexcept {
    const int c = classOf(size);
    return c < 0 ? 0 : cached_[static_cast<size_t>(c)];
  }

 private:
  struct FreeBlock {
    FreeBlock* next;
  };

  std::array<FreeBlock*, NUM_CLASSES> free_{};
  std::array<size_t, NUM_CLASSES> cached_{};
  size_t maxCachedPerClass_;
  uint64_t heapAllocations_ = 0;
};

}  // namespace agate
