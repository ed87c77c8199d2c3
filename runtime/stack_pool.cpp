#include "agate/runtime/stack_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#ifdef AGATE_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace agate {
namespace {

size_t pageSize() noexcept { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

size_t roundUpToPage(size_t n) noexcept {
  const size_t page = pageSize();
  return (n + page - 1) / page * page;
}

}  // namespace

StackPool::StackPool(const StackPoolOptions& options)
    : stackSize_(roundUpToPage(options.stackSize)),
      guardSize_(roundUpToPage(options.guardSize)),
      maxStacks_(options.maxStacks),
      prefault_(options.prefault) {
  AGATE_REQUIRE(options.stackSize >= 4096, "stackSize %zu is below one page", options.stackSize);
  AGATE_REQUIRE(options.stackSize <= (size_t{1} << 30), "stackSize %zu is above 1 GiB",
                options.stackSize);
  AGATE_REQUIRE(options.guardSize >= 1 && options.guardSize <= (size_t{1} << 30),
                "guardSize %zu must be 1 byte .. 1 GiB (rounded up to pages)", options.guardSize);
  AGATE_REQUIRE(options.maxStacks >= 1, "maxStacks must be at least 1");
}

StackPool::~StackPool() {
  AGATE_ASSERT(inUseCount() == 0, "StackPool destroyed with %zu stacks still lent to fibers",
               inUseCount());
  while (freeList_ != nullptr) {
    FreeNode* node = freeList_;
    freeList_ = node->next;
    // The node sits just below the top of its stack.
    std::byte* top = reinterpret_cast<std::byte*>(node) + sizeof(FreeNode);
    unmapStack(FiberStack{top - stackSize_, stackSize_});
  }
}

StackPool::FreeNode* StackPool::nodeOf(FiberStack stack) noexcept {
  return reinterpret_cast<FreeNode*>(stack.top() - sizeof(FreeNode));
}

Result<FiberStack> StackPool::tryMapStack() {
  if (mappedCount_ >= maxStacks_) {
    return Error(Errc::OUT_OF_MEMORY, "stack pool is at maxStacks and every stack is in use");
  }
  const size_t total = guardSize_ + stackSize_;
  // Map everything inaccessible, then open the usable part: no window where the guard is usable.
  void* mapping =
      mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapping == MAP_FAILED) {
    return Error(Errc::OUT_OF_MEMORY, errno, "mmap of a fiber stack failed");
  }
  std::byte* base = static_cast<std::byte*>(mapping) + guardSize_;
  if (mprotect(base, stackSize_, PROT_READ | PROT_WRITE) != 0) {
    const int err = errno;
    munmap(mapping, total);
    return Error(Errc::OUT_OF_MEMORY, err, "mprotect of a fiber stack failed");
  }
  if (prefault_) {
    const size_t page = pageSize();
    for (size_t off = 0; off < stackSize_; off += page) {
      static_cast<volatile std::byte*>(base)[off] = std::byte{0};
    }
  }
  ++mappedCount_;
  return FiberStack{base, stackSize_};
}

void StackPool::unmapStack(FiberStack stack) noexcept {
  const int rc = munmap(stack.base - guardSize_, guardSize_ + stackSize_);
  AGATE_ASSERT(rc == 0, "munmap of a fiber stack failed: errno %d", errno);
  --mappedCount_;
}

Result<FiberStack> StackPool::tryAcquire() {
  if (freeList_ == nullptr) return tryMapStack();
  FreeNode* node = freeList_;
  freeList_ = node->next;
  --freeCount_;
  std::byte* top = reinterpret_cast<std::byte*>(node) + sizeof(FreeNode);
  return FiberStack{top - stackSize_, stackSize_};
}

void StackPool::release(FiberStack stack) noexcept {
  AGATE_REQUIRE(stack.base != nullptr && stack.size == stackSize_,
                "released stack (base %p, %zu bytes) was not lent by this pool (%zu-byte stacks)",
                static_cast<void*>(stack.base), stack.size, stackSize_);
  AGATE_REQUIRE(inUseCount() > 0, "released a stack while none is lent out");
#ifdef AGATE_ASAN
  // The fiber's last frames never returned (it switched away for good), so their redzones are
  // still poisoned; the next fiber on this stack must start from clean shadow memory.
  ASAN_UNPOISON_MEMORY_REGION(stack.base, stack.size);
#endif
  FreeNode* node = nodeOf(stack);
  node->next = freeList_;
  freeList_ = node;
  ++freeCount_;
}

Status StackPool::tryReserve(size_t count) {
  while (freeCount_ < count) {
    Result<FiberStack> stack = tryMapStack();
    if (!stack.ok()) return stack.error();
    FreeNode* node = nodeOf(*stack);
    node->next = freeList_;
    freeList_ = node;
    ++freeCount_;
  }
  return {};
}

}  // namespace agate
