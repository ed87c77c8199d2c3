// StackPool: guard-paged fiber stacks, created once and reused.
//
// Creating a stack costs an mmap, an mprotect and (optionally) page faults: 20-60 us on these
// machines, against ~44 ns for a fiber switch-in. A fiber therefore takes its stack from a pool and
// gives it back when it ends; in steady state acquiring and releasing a stack is a pointer pop/push
// with no system call and no heap allocation.
//
// Layout of one stack mapping (addresses grow to the right; the stack grows to the left):
//
//     [ guard: guardSize bytes, PROT_NONE ][ usable: stackSize bytes, read/write ]
//     ^ mapping                            ^ FiberStack::base                    ^
//     FiberStack::top()
//
// Running past `base` touches the guard and faults; the fiber runtime (fiber.h) turns that fault
// into a clear "fiber stack overflow" report instead of silent corruption of a neighbour.
//
// Ownership: the pool owns every mapping it created. A FiberStack handed out by tryAcquire() is
// lent, not owned: it must go back through release() before the pool is destroyed (checked).
// Free stacks are kept on an intrusive list threaded through the free stacks themselves, so the
// pool's bookkeeping never allocates.
//
// Threading: a pool is not thread-safe. One thread uses it at a time (normally the thread of one
// event loop, whose fibers never migrate).
#pragma once

#include <cstddef>
#include <cstdint>

#include "agate/runtime/result.h"

namespace agate {

struct StackPoolOptions {
  // Usable bytes per stack, rounded up to whole pages. The guard is extra.
  size_t stackSize = 64 * 1024;
  // PROT_NONE bytes below each stack, rounded up to whole pages (at least one page). A frame larger
  // than the guard can jump over it: raise this for code with big stack arrays.
  size_t guardSize = 4096;
  // Most stacks this pool will ever have mapped at once (in use + free). Past it tryAcquire() fails
  // with OUT_OF_MEMORY instead of mapping more.
  size_t maxStacks = 1024;
  // Touch every usable page when a stack is created, so a fiber's first run takes no page faults
  // (each costs 10-20 us here). Costs resident memory for the whole stack.
  bool prefault = false;
};

// A stack lent by a StackPool. A plain value; it owns nothing.
struct FiberStack {
  std::byte* base = nullptr;  // lowest usable byte; the guard lies just below
  size_t size = 0;            // usable bytes

  std::byte* top() const noexcept { return base + size; }
  explicit operator bool() const noexcept { return base != nullptr; }
};

class StackPool {
 public:
  // Options outside their documented range are a caller's bug (AGATE_REQUIRE). Maps nothing yet.
  explicit StackPool(const StackPoolOptions& options = {});
  // Unmaps every free stack. A stack still lent out is a bug (AGATE_ASSERT): a fiber would be left
  // running on unmapped memory.
  ~StackPool();

  StackPool(const StackPool&) = delete;
  StackPool& operator=(const StackPool&) = delete;

  // Lends a stack: a free one if any (no system call), else a freshly mapped one.
  // Fails with OUT_OF_MEMORY when maxStacks are mapped and none is free, or when the kernel refuses
  // the mapping; the pool is then unchanged.
  Result<FiberStack> tryAcquire();

  // Takes back a stack lent by this pool (its size and the in-use count are checked). It stays
  // mapped for the next tryAcquire().
  void release(FiberStack stack) noexcept;

  // Maps stacks until `count` are free, so later tryAcquire() calls make no system call.
  // Fails like tryAcquire(); the stacks mapped before the failure stay in the pool.
  Status tryReserve(size_t count);

  size_t stackSize() const noexcept { return stackSize_; }
  size_t guardSize() const noexcept { return guardSize_; }
  size_t maxStacks() const noexcept { return maxStacks_; }
  size_t freeCount() const noexcept { return freeCount_; }
  size_t inUseCount() const noexcept { return mappedCount_ - freeCount_; }
  size_t mappedCount() const noexcept { return mappedCount_; }

 private:
  // A free stack's first bytes below its top hold this link.
  struct FreeNode {
    FreeNode* next;
  };

  Result<FiberStack> tryMapStack();
  void unmapStack(FiberStack stack) noexcept;
  static FreeNode* nodeOf(FiberStack stack) noexcept;

  size_t stackSize_;
  size_t guardSize_;
  size_t maxStacks_;
  bool prefault_;
  size_t mappedCount_ = 0;
  size_t freeCount_ = 0;
  FreeNode* freeList_ = nullptr;  // singly linked through free stacks; LIFO keeps caches warm
};

}  // namespace agate
