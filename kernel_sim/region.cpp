#include "agate/kernel/region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "agate/kernel/space_bank.h"

namespace agate::kernel {

Result<Fd> Region::tryCreateMemfd(uint64_t pages) {
  AGATE_REQUIRE(pages > 0 && pages <= MAX_PAGES, "region of %lu pages",
                static_cast<unsigned long>(pages));
  Fd fd(::memfd_create("agate-region", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return Error::fromErrno(errno, "memfd_create for a region failed");
  if (::ftruncate(fd.get(), static_cast<off_t>(pages * PAGE_BYTES)) != 0)
    return Error::fromErrno(errno, "sizing a region's memfd failed");
  // Before any descriptor leaves the kernel: nobody may ever change the size.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) != 0)
    return Error::fromErrno(errno, "sealing a region's size failed");
  return fd;
}

Region::Region(uint64_t pages, Fd memfd) noexcept
    : KernelObject(TYPE), pages_(pages), memfd_(std::move(memfd)) {}

Result<RegionMapping> Region::tryMap(bool writable) {
  if (writable && writeSealed_)
    return Error(Errc::PERMISSION_DENIED,
                 "region is write-sealed: writable mappings must be made before the first "
                 "read-only one");
  // The descriptor first: if it cannot be made, nothing (not even the seal) has changed.
  Fd fd(::fcntl(memfd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!fd.valid()) return Error::fromErrno(errno, "duplicating a region's memfd failed");
  if (!writable && !writeSealed_) {
    // May fail if a writer added F_SEAL_SEAL itself; what counts is the seal being there.
    (void)::fcntl(memfd_.get(), F_ADD_SEALS, F_SEAL_FUTURE_WRITE);
    (void)::fcntl(memfd_.get(), F_ADD_SEALS, F_SEAL_SEAL);
    const int seals = ::fcntl(memfd_.get(), F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_FUTURE_WRITE | F_SEAL_WRITE)) == 0)
      return Error(Errc::PERMISSION_DENIED,
                   "region's seals were sealed by a writer: a read-only mapping cannot be "
                   "guaranteed");
    writeSealed_ = true;
  }
  return RegionMapping{std::move(fd), pages_ * PAGE_BYTES, writable};
}

}  // namespace agate::kernel
