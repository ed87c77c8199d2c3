// Region: page-granular shared memory charged to a bank, backed by a memfd the kernel holds.
//
// Life. tryCreateMemfd() makes a memfd of `pages` pages, sealed against growing and shrinking
// (F_SEAL_GROW | F_SEAL_SHRINK) before any descriptor leaves the kernel, so no holder can ever
// truncate it under another holder's mapping (SIGBUS). The Region owns that descriptor; the
// kernel never maps a region itself. Destroying the region closes it; each holder's mapping
// keeps the pages alive until the holder unmaps (the kernel cannot unmap another process).
//
// Mapping rights: how a read-only cap stays read-only. A descriptor is not a permission
// boundary: whoever holds one can re-open /proc/self/fd/N O_RDWR, so handing a reader an
// O_RDONLY descriptor guarantees nothing. The guarantee comes from the memfd itself:
//
//  * "Writers first." While the region is open for writers (`writeSealed() == false`), a holder
//    of READ|WRITE gets a descriptor it may map writable (tryMap(true)). No read-only holder has
//    a descriptor yet.
//  * The first read-only map request (tryMap(false)) seals the memfd with F_SEAL_FUTURE_WRITE and
//    then F_SEAL_SEAL, and checks with F_GET_SEALS that the write seal is really there (a writer
//    holding the descriptor could have added F_SEAL_SEAL itself to block it: then the request is
//    refused with PERMISSION_DENIED and no read-only descriptor ever leaves). Only then is a
//    descriptor handed out. From then on, for EVERY holder of the memfd, through any descriptor
//    (received, duplicated, or re-opened through /proc): a new MAP_SHARED writable mapping,
//    mprotect(PROT_WRITE) of a shared read mapping, write()/pwrite(), fallocate() hole punching,
//    ftruncate and adding or changing seals all fail. Writable MAP_SHARED mappings made before
//    the seal keep working: that is how the writers write and the readers see it.
//  * After the seal, a writable map request is refused (PERMISSION_DENIED, nothing changed): a
//    writer must map before the region is shared read-only.
//
// Limits, written down. (1) MAP_PRIVATE writable mappings remain possible for anyone: they are
// copy-on-write, and writes to them never reach the shared pages. (2) A writer that got its
// descriptor before the seal can hand it to anyone (it could equally copy its bytes): a WRITE
// right, once exercised, is delegable outside the kernel; revoking a writer's cap does not
// unmap what it mapped. (3) The seal is one-way: a region never becomes writable again.
//
// Threading: single-threaded, as the whole object model.
#pragma once

#include <cstdint>

#include "agate/kernel/object.h"
#include "agate/kernel/sealed_memory.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

// What a holder needs to map a region: its own descriptor (the daemon passes it with
// SCM_RIGHTS and closes its copy), the size, and whether it may map it writable.
struct RegionMapping {
  Fd fd;
  uint64_t bytes = 0;
  bool writable = false;
};

class Region final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::REGION;
  // Bounds a region (and one charge) so that page arithmetic cannot overflow: 2^32 pages = 16 TiB.
  static constexpr uint64_t MAX_PAGES = uint64_t{1} << 32;

  // A memfd of `pages` pages (1..MAX_PAGES, checked by the caller), sealed against grow and
  // shrink. SYSTEM_ERROR if the kernel is out of descriptors or memory.
  static Result<Fd> tryCreateMemfd(uint64_t pages);

  Region(uint64_t pages, Fd memfd) noexcept;

  uint64_t pages() const noexcept { return pages_; }
  bool writeSealed() const noexcept { return memfd_.writeSealed(); }
  // The kernel's descriptor (still owned here).
  int memfd() const noexcept { return memfd_.get(); }

  // A new descriptor for a holder. `writable`: PERMISSION_DENIED once write-sealed. Read-only:
  // write-seals the region first if needed (see the overview). SYSTEM_ERROR if no descriptor
  // can be made. Every failure leaves the region as it was.
  Result<RegionMapping> tryMap(bool writable);

 private:
  void teardown() noexcept override { memfd_.reset(); }

  uint64_t pages_;     // fixed for life: a sealed region never grows nor shrinks
  SealedMemfd memfd_;  // writers first (sealed_memory.h); closed on destruction
};

}  // namespace agate::kernel
