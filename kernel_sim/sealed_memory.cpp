#include "agate/kernel/sealed_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

namespace agate::kernel {

Result<SealedMemfd> SealedMemfd::tryCreate(uint64_t bytes, const char* name) {
  AGATE_REQUIRE(bytes > 0 && bytes % KernelPage::BYTES == 0, "sealed memfd of %lu bytes",
                static_cast<unsigned long>(bytes));
  Fd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return Error::fromErrno(errno, "memfd_create failed");
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0)
    return Error::fromErrno(errno, "sizing a memfd failed");
  // Before any descriptor leaves the kernel: nobody may ever change the size.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) != 0)
    return Error::fromErrno(errno, "sealing a memfd's size failed");
  return SealedMemfd(std::move(fd), bytes);
}

Result<Fd> SealedMemfd::tryDuplicate(bool writable) {
  if (writable && writeSealed_)
    return Error(Errc::PERMISSION_DENIED,
                 "write-sealed: writable mappings must be made before the first read-only one");
  // The descriptor first: if it cannot be made, nothing (not even the seal) has changed.
  Fd fd(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!fd.valid()) return Error::fromErrno(errno, "duplicating a memfd failed");
  if (!writable && !writeSealed_) {
    // May fail if a writer added F_SEAL_SEAL itself; what counts is the seal being there.
    (void)::fcntl(fd_.get(), F_ADD_SEALS, F_SEAL_FUTURE_WRITE);
    (void)::fcntl(fd_.get(), F_ADD_SEALS, F_SEAL_SEAL);
    const int seals = ::fcntl(fd_.get(), F_GET_SEALS);
    if (seals < 0 || (seals & (F_SEAL_FUTURE_WRITE | F_SEAL_WRITE)) == 0)
      return Error(Errc::PERMISSION_DENIED,
                   "the seals were sealed by a writer: a read-only mapping cannot be guaranteed");
    writeSealed_ = true;
  }
  return fd;
}

Result<KernelPage> KernelPage::tryCreate(const char* name, HolderAccess access) {
  auto memfd = SealedMemfd::tryCreate(BYTES, name);
  if (!memfd) return memfd.error();
  Fd fd = memfd->takeFd();
  void* p = ::mmap(nullptr, BYTES, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.get(), 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mapping a kernel page failed");
  KernelPage page(static_cast<std::byte*>(p), std::move(fd), access);
  // After the kernel's own writable mapping (which keeps writing), before any descriptor leaves:
  // from here on no holder can map it writable, mprotect it writable, or write() to it.
  int seals = F_SEAL_SEAL;
  if (access == HolderAccess::READ_ONLY) seals |= F_SEAL_FUTURE_WRITE;
  if (::fcntl(page.fd(), F_ADD_SEALS, seals) != 0)
    return Error::fromErrno(errno, "sealing a kernel page failed");
  return page;
}

KernelPage::KernelPage(KernelPage&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), fd_(std::move(o.fd_)), access_(o.access_) {}

KernelPage& KernelPage::operator=(KernelPage&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    fd_ = std::move(o.fd_);
    access_ = o.access_;
  }
  return *this;
}

KernelPage::~KernelPage() { release(); }

void KernelPage::release() noexcept {
  if (data_) ::munmap(data_, BYTES);
  data_ = nullptr;
  fd_.reset();
}

Result<Fd> KernelPage::tryDuplicate() const {
  Fd fd(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!fd.valid()) return Error::fromErrno(errno, "duplicating a kernel page's memfd failed");
  return fd;
}

}  // namespace agate::kernel
