#include "agate/caps/mapped_region.h"

#include <errno.h>
#include <sys/mman.h>

namespace agate::caps {

Result<MappedRegion> MappedRegion::tryMap(Fd fd, size_t bytes, bool writable) {
  if (!fd.valid() || bytes == 0) return Error(Errc::INVALID_ARGUMENT, "no region to map");
  const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* p = ::mmap(nullptr, bytes, prot, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mmap of a region failed");
  return MappedRegion(static_cast<std::byte*>(p), bytes, writable, std::move(fd));
}

MappedRegion& MappedRegion::operator=(MappedRegion&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    writable_ = o.writable_;
    fd_ = std::move(o.fd_);
  }
  return *this;
}

void MappedRegion::reset() noexcept {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  fd_.reset();
}

}  // namespace agate::caps
