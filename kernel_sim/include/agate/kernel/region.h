// Region: page-granular memory charged to a bank. Here only its trusted record (size in pages);
// the daemon will back it with a sealed memfd and map it for holders with READ / WRITE.
#pragma once

#include <cstdint>

#include "agate/kernel/object.h"

namespace agate::kernel {

class Region final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::REGION;
  // Bounds a region (and one charge) so that page arithmetic cannot overflow: 2^32 pages = 16 TiB.
  static constexpr uint64_t MAX_PAGES = uint64_t{1} << 32;

  explicit Region(uint64_t pages) noexcept : KernelObject(TYPE), pages_(pages) {}

  uint64_t pages() const noexcept { return pages_; }

 private:
  uint64_t pages_;  // fixed for life: a sealed region never grows nor shrinks
};

}  // namespace agate::kernel
