// SharedMemory: a mapped, pre-faulted memory region, either private to this process (anonymous)
// or backed by a sealed memfd that can be handed to another process.
//
// Safety contract for shared regions: the creator sizes the memfd, then seals it against growing
// and shrinking and finally seals the seals (F_SEAL_GROW | F_SEAL_SHRINK, then F_SEAL_SEAL), all
// before any other process can see the descriptor. A process that opens a region from a received
// descriptor refuses it unless those seals are present and its size is the size it expects: an
// unsealed memfd could be truncated by its creator, and any later access to the mapping would
// raise SIGBUS in the reader. Sealing makes the mapping's size a fact, not a promise.
//
// Pages are pre-faulted (MAP_POPULATE) at creation and open: a page fault costs 10-20 us on the
// target machines, which must not land on the first message.
//
// A SharedMemory is move-only; it unmaps (and closes its memfd) when destroyed. It does not
// synchronise access to its bytes: that is the job of whatever lives in them (see ring.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate {

class SharedMemory {
 public:
  // Anonymous private memory (MAP_PRIVATE|MAP_ANONYMOUS), for private and local scope.
  static Result<SharedMemory> createAnonymous(size_t size);

  // A sealed memfd of `size` bytes, mapped shared. `name` shows up in /proc/PID/maps.
  static Result<SharedMemory> createShared(size_t size, const char* name);

  // Maps a memfd received from another process. Fails with INVALID_ARGUMENT if `fd` is not a
  // sealed memfd of exactly `expectedSize` bytes (expectedSize 0: take fstat's size, which must
  // still be non-zero and sealed). Takes ownership of `fd` in every case.
  static Result<SharedMemory> openShared(Fd fd, size_t expectedSize);

  SharedMemory() noexcept = default;
  SharedMemory(SharedMemory&& o) noexcept;
  SharedMemory& operator=(SharedMemory&& o) noexcept;
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  ~SharedMemory();

  std::byte* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  std::span<std::byte> bytes() const noexcept { return {data_, size_}; }
  bool isShared() const noexcept { return fd_.valid(); }

  // The memfd (shared regions only; -1 otherwise). Still owned by this object.
  int fd() const noexcept { return fd_.get(); }

  // A new descriptor for the same memfd (F_DUPFD_CLOEXEC), to pass to another process.
  Result<Fd> duplicateFd() const;

 private:
  SharedMemory(std::byte* data, size_t size, Fd fd) noexcept
      : data_(data), size_(size), fd_(std::move(fd)) {}
  void unmap() noexcept;

  std::byte* data_ = nullptr;
  size_t size_ = 0;
  Fd fd_;
};

}  // namespace agate
