// MappedCreditPage: a space bank's credit page mapped read-only into this process, owned.
//
// Made by KernelConnection::mapBankCredit. The kernel republishes the bank's used / limit /
// returned pages and its destruction into the page at every change (kernel/credit_page.h, a
// seqlock); tryRead() gives one consistent reading without a kernel call. The mapping is
// PROT_READ and cannot become writable: the kernel seals the page's memfd against writes
// (F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) before any descriptor leaves it, so a writable mmap,
// mprotect, write() through a re-open, truncation and new seals all fail for every holder.
//
// Threading: any thread may read; move-only; unmaps and closes its descriptor when destroyed.
#pragma once

#include <cstddef>
#include <utility>

#include "agate/kernel/credit_page.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate::caps {

class MappedCreditPage {
 public:
  MappedCreditPage() noexcept = default;
  // Maps the page read-only. PROTOCOL_ERROR unless `bytes` is one BankCreditPage; SYSTEM_ERROR if
  // mmap refuses.
  static Result<MappedCreditPage> tryMap(Fd fd, uint64_t bytes);
  MappedCreditPage(MappedCreditPage&& o) noexcept
      : page_(std::exchange(o.page_, nullptr)), fd_(std::move(o.fd_)) {}
  MappedCreditPage& operator=(MappedCreditPage&& o) noexcept;
  MappedCreditPage(const MappedCreditPage&) = delete;
  MappedCreditPage& operator=(const MappedCreditPage&) = delete;
  ~MappedCreditPage() { reset(); }

  // One consistent reading. TIMED_OUT if every try overlapped a kernel write (only if the kernel
  // stopped mid-write, i.e. died).
  Result<kernel::BankCredit> tryRead() const noexcept;
  const kernel::BankCreditPage* page() const noexcept { return page_; }
  // The page's descriptor (owned here); for tests that try to write through it.
  int fd() const noexcept { return fd_.get(); }

 private:
  void reset() noexcept;

  const kernel::BankCreditPage* page_ = nullptr;
  Fd fd_;
};

}  // namespace agate::caps
