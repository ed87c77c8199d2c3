#include "agate/caps/mapped_credit_page.h"

#include <errno.h>
#include <sys/mman.h>

namespace agate::caps {

Result<MappedCreditPage> MappedCreditPage::tryMap(Fd fd, uint64_t bytes) {
  if (!fd.valid()) return Error(Errc::PROTOCOL_ERROR, "a credit page without its descriptor");
  if (bytes != sizeof(kernel::BankCreditPage))
    return Error(Errc::PROTOCOL_ERROR, "a credit page is one page");
  void* p = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mmap of a credit page failed");
  MappedCreditPage m;
  m.page_ = static_cast<const kernel::BankCreditPage*>(p);
  m.fd_ = std::move(fd);
  return m;
}

MappedCreditPage& MappedCreditPage::operator=(MappedCreditPage&& o) noexcept {
  if (this == &o) return *this;
  reset();
  page_ = std::exchange(o.page_, nullptr);
  fd_ = std::move(o.fd_);
  return *this;
}

Result<kernel::BankCredit> MappedCreditPage::tryRead() const noexcept {
  AGATE_REQUIRE(page_ != nullptr, "tryRead on an unmapped credit page");
  kernel::BankCredit credit;
  if (!kernel::tryReadCredit(*page_, credit))
    return Error(Errc::TIMED_OUT, "the credit page stayed mid-update");
  return credit;
}

void MappedCreditPage::reset() noexcept {
  if (page_ != nullptr) ::munmap(const_cast<kernel::BankCreditPage*>(page_), sizeof(*page_));
  page_ = nullptr;
  fd_.reset();
}

}  // namespace agate::caps
