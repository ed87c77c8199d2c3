#include "agate/runtime/frame_arena.h"

#include <new>

#include "agate/runtime/event_loop.h"

namespace agate {

FrameArena::FrameArena(size_t maxCachedPerClass) noexcept : maxCachedPerClass_(maxCachedPerClass) {}

FrameArena::~FrameArena() {
  for (size_t c = 0; c < NUM_CLASSES; ++c) {
    while (FreeBlock* b = free_[c]) {
      free_[c] = b->next;
      ::operator delete(b, MIN_BLOCK << c);
    }
  }
}

static_assert(FrameArena::classOf(0) == 0 && FrameArena::classOf(1) == 0 &&
              FrameArena::classOf(FrameArena::MIN_BLOCK) == 0);
static_assert(FrameArena::classOf(FrameArena::MIN_BLOCK + 1) == 1 &&
              FrameArena::classOf(2 * FrameArena::MIN_BLOCK) == 1 &&
              FrameArena::classOf(2 * FrameArena::MIN_BLOCK + 1) == 2);
static_assert(FrameArena::classOf(FrameArena::MAX_BLOCK) == FrameArena::NUM_CLASSES - 1 &&
              FrameArena::classOf(FrameArena::MAX_BLOCK + 1) == -1);

void* FrameArena::allocate(size_t size) {
  int c = classOf(size);
  if (c < 0) return ::operator new(size);
  if (FreeBlock* b = free_[c]) {
    free_[c] = b->next;
    --cached_[c];
    return b;
  }
  const size_t bytes = MIN_BLOCK << c;
  void* block = ::operator new(bytes);
  ++heapAllocations_;
  // Spares for the next new peak (see the header). Best effort: a refused spare just means the
  // next allocation goes to the heap again.
  for (size_t i = 1; i < REFILL_BLOCKS && cached_[c] < maxCachedPerClass_; ++i) {
    auto* spare = static_cast<FreeBlock*>(::operator new(bytes, std::nothrow));
    if (spare == nullptr) break;
    ++heapAllocations_;
    spare->next = free_[c];
    free_[c] = spare;
    ++cached_[c];
  }
  return block;
}

void FrameArena::deallocate(void* p, size_t size) noexcept {
  int c = classOf(size);
  if (c < 0) {
    ::operator delete(p, size);
    return;
  }
  if (cached_[c] >= maxCachedPerClass_) {
    ::operator delete(p, MIN_BLOCK << c);
    return;
  }
  auto* b = static_cast<FreeBlock*>(p);
  b->next = free_[c];
  free_[c] = b;
  ++cached_[c];
}

void* FrameArena::allocateFromCurrent(size_t size) {
  if (EventLoop* loop = EventLoop::current()) return loop->arena().allocate(size);
  int c = classOf(size);
  return ::operator new(c < 0 ? size : MIN_BLOCK << c);
}

void FrameArena::deallocateToCurrent(void* p, size_t size) noexcept {
  if (EventLoop* loop = EventLoop::current()) {
    loop->arena().deallocate(p, size);
    return;
  }
  int c = classOf(size);
  ::operator delete(p, c < 0 ? size : MIN_BLOCK << c);
}

}  // namespace agate
