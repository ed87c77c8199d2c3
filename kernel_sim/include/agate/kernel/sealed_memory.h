// Sealed memfds: the two shapes of shared memory the kernel hands to processes.
//
//  * SealedMemfd ("writers first"): a memfd the kernel creates and holds but never maps (regions,
//    event buffers). Holders of a writable cap map it writable while no read-only holder has a
//    descriptor; the first read-only descriptor write-seals it for good. How that makes a
//    read-only cap stay read-only, and the limits, are written in region.h.
//  * KernelPage: one page the kernel itself maps writable and keeps mapped, so it can publish
//    into it at any time (a bank's credit page, a notification's doorbell word). Holders get
//    descriptors that are either read-only (F_SEAL_FUTURE_WRITE is added right after the kernel's
//    own writable mapping is made, before any descriptor leaves) or read-write.
//
// Both are sealed against grow and shrink (and, where no later seal is needed, F_SEAL_SEAL)
// before any descriptor leaves the kernel, so no holder can truncate a mapping under another
// (SIGBUS). Every descriptor handed out is a new F_DUPFD_CLOEXEC duplicate the caller owns.
//
// Threading: single-threaded, as the whole object model.
#pragma once

#include <cstddef>
#include <cstdint>

#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

class SealedMemfd {
 public:
  // A memfd of `bytes` (> 0, a multiple of the page size; checked by the caller) sealed against
  // grow and shrink. SYSTEM_ERROR if the kernel is out of descriptors or memory.
  static Result<SealedMemfd> tryCreate(uint64_t bytes, const char* name);

  SealedMemfd() noexcept = default;
  SealedMemfd(Fd fd, uint64_t bytes) noexcept : fd_(std::move(fd)), bytes_(bytes) {}

  // A new descriptor for a holder. `writable`: PERMISSION_DENIED once write-sealed. Read-only:
  // write-seals the memfd first if needed (F_SEAL_FUTURE_WRITE, then F_SEAL_SEAL, checked with
  // F_GET_SEALS; PERMISSION_DENIED if a writer sealed the seals to block it). SYSTEM_ERROR if no
  // descriptor can be made. Every failure leaves the memfd as it was.
  Result<Fd> tryDuplicate(bool writable);

  bool writeSealed() const noexcept { return writeSealed_; }
  uint64_t bytes() const noexcept { return bytes_; }
  int get() const noexcept { return fd_.get(); }
  // Hands the descriptor over (the memfd is then empty).
  Fd takeFd() noexcept { return std::move(fd_); }
  void reset() noexcept { fd_.reset(); }

 private:
  Fd fd_;
  uint64_t bytes_ = 0;
  bool writeSealed_ = false;
};

// What holders of a KernelPage may do with their descriptors.
enum class HolderAccess : uint8_t {
  READ_ONLY,   // F_SEAL_FUTURE_WRITE: no holder can write, whatever descriptor it has
  READ_WRITE,  // holders may map it writable (a doorbell word both sides write)
};

class KernelPage {
 public:
  static constexpr size_t BYTES = 4096;

  // A zeroed, sealed, pre-faulted page mapped writable into the kernel. SYSTEM_ERROR if the
  // memfd or the mapping cannot be made (nothing is left behind).
  static Result<KernelPage> tryCreate(const char* name, HolderAccess access);

  KernelPage() noexcept = default;
  KernelPage(KernelPage&& o) noexcept;
  KernelPage& operator=(KernelPage&& o) noexcept;
  KernelPage(const KernelPage&) = delete;
  KernelPage& operator=(const KernelPage&) = delete;
  // Unmaps the kernel's mapping and closes its descriptor; holders' mappings stay valid.
  ~KernelPage();

  // The kernel's writable view; null for a default-constructed page.
  std::byte* data() const noexcept { return data_; }
  HolderAccess access() const noexcept { return access_; }
  int fd() const noexcept { return fd_.get(); }
  // A descriptor for a holder. SYSTEM_ERROR if none can be made.
  Result<Fd> tryDuplicate() const;

 private:
  KernelPage(std::byte* data, Fd fd, HolderAccess access) noexcept
      : data_(data), fd_(std::move(fd)), access_(access) {}
  void release() noexcept;

  std::byte* data_ = nullptr;  // the kernel's MAP_SHARED writable mapping, owned
  Fd fd_;
  HolderAccess access_ = HolderAccess::READ_ONLY;
};

}  // namespace agate::kernel
