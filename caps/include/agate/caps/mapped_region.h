// MappedRegion: this process's mapping of a kernel Region, owned.
//
// Made by KernelConnection::mapRegion from the descriptor the kernel sent: MAP_SHARED, readable,
// writable only when the cap carried WRITE and the region was not yet write-sealed (see
// kernel_sim/include/agate/kernel/region.h: a read-only holder cannot upgrade its mapping, by any
// path). Move-only; unmaps and closes its descriptor when destroyed. The pages stay alive while
// mapped, even after the region is destroyed in the kernel or the cap is revoked: the kernel
// cannot unmap another process's memory.
#pragma once

#include <cstddef>
#include <span>
#include <utility>

#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate::caps {

class MappedRegion {
 public:
  MappedRegion() noexcept = default;
  // Maps `bytes` of `fd` shared, writable if `writable`. SYSTEM_ERROR if mmap refuses.
  static Result<MappedRegion> tryMap(Fd fd, size_t bytes, bool writable);
  MappedRegion(MappedRegion&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        writable_(o.writable_),
        fd_(std::move(o.fd_)) {}
  MappedRegion& operator=(MappedRegion&& o) noexcept;
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;
  ~MappedRegion() { reset(); }

  std::span<std::byte> bytes() const noexcept { return {data_, size_}; }
  std::byte* data() const noexcept { return data_; }
  size_t size() const noexcept { return size_; }
  bool writable() const noexcept { return writable_; }
  // The region's descriptor (owned here), e.g. to hand to a device API.
  int fd() const noexcept { return fd_.get(); }
  bool mapped() const noexcept { return data_ != nullptr; }

 private:
  MappedRegion(std::byte* data, size_t size, bool writable, Fd fd) noexcept
      : data_(data), size_(size), writable_(writable), fd_(std::move(fd)) {}
  void reset() noexcept;

  std::byte* data_ = nullptr;
  size_t size_ = 0;
  bool writable_ = false;
  Fd fd_;
};

}  // namespace agate::caps
