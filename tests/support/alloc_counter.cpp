#include "support/alloc_counter.h"

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace {
// The one global of the test support code: operator new has nowhere else to count.
std::atomic<uint64_t> gAllocations{0};

void* countedAllocate(size_t size, size_t alignment) {
  gAllocations.fetch_add(1, std::memory_order_relaxed);  // a counter: no ordering needed
  if (size == 0) size = 1;
  if (alignment <= alignof(std::max_align_t)) return std::malloc(size);
  size = (size + alignment - 1) / alignment * alignment;
  return std::aligned_alloc(alignment, size);
}
}  // namespace

namespace agate::testing {
uint64_t allocationCount() noexcept { return gAllocations.load(std::memory_order_relaxed); }
}  // namespace agate::testing

void* operator new(size_t size) {
  if (void* p = countedAllocate(size, 0)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t size) {
  if (void* p = countedAllocate(size, 0)) return p;
  throw std::bad_alloc();
}
void* operator new(size_t size, const std::nothrow_t&) noexcept { return countedAllocate(size, 0); }
void* operator new[](size_t size, const std::nothrow_t&) noexcept {
  return countedAllocate(size, 0);
}
void* operator new(size_t size, std::align_val_t al) {
  if (void* p = countedAllocate(size, static_cast<size_t>(al))) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t size, std::align_val_t al) {
  if (void* p = countedAllocate(size, static_cast<size_t>(al))) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }
