#include "agate/kernel/region.h"

#include "agate/kernel/space_bank.h"

namespace agate::kernel {

Result<Fd> Region::tryCreateMemfd(uint64_t pages) {
  AGATE_REQUIRE(pages > 0 && pages <= MAX_PAGES, "region of %lu pages",
                static_cast<unsigned long>(pages));
  auto memfd = SealedMemfd::tryCreate(pages * PAGE_BYTES, "agate-region");
  if (!memfd) return memfd.error();
  return memfd->takeFd();
}

Region::Region(uint64_t pages, Fd memfd) noexcept
    : KernelObject(TYPE), pages_(pages), memfd_(std::move(memfd), pages * PAGE_BYTES) {}

Result<RegionMapping> Region::tryMap(bool writable) {
  auto fd = memfd_.tryDuplicate(writable);
  if (!fd) return fd.error();
  return RegionMapping{std::move(*fd), pages_ * PAGE_BYTES, writable};
}

}  // namespace agate::kernel
