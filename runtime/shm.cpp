#include "agate/runtime/shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace agate {
namespace {

constexpr int REQUIRED_SEALS = F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL;

Result<std::byte*> mapShared(int fd, size_t size) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mmap of a shared region failed");
  return static_cast<std::byte*>(p);
}

}  // namespace

Result<SharedMemory> SharedMemory::createAnonymous(size_t size) {
  if (size == 0) return Error(Errc::INVALID_ARGUMENT, "a memory region needs a non-zero size");
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mmap of an anonymous region failed");
  return SharedMemory(static_cast<std::byte*>(p), size, Fd());
}

Result<SharedMemory> SharedMemory::createShared(size_t size, const char* name) {
  if (size == 0) return Error(Errc::INVALID_ARGUMENT, "a memory region needs a non-zero size");
  Fd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return Error::fromErrno(errno, "memfd_create failed");
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return Error::fromErrno(errno, "ftruncate of a new memfd failed");
  // Seal before the descriptor can reach anyone else; F_SEAL_SEAL last so nobody can lift them.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) != 0 ||
      ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SEAL) != 0)
    return Error::fromErrno(errno, "sealing a new memfd failed");
  Result<std::byte*> p = mapShared(fd.get(), size);
  if (!p) return p.error();
  return SharedMemory(*p, size, std::move(fd));
}

Result<SharedMemory> SharedMemory::openShared(Fd fd, size_t expectedSize) {
  if (!fd.valid()) return Error(Errc::INVALID_ARGUMENT, "no descriptor given for a shared region");
  int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) return Error(Errc::INVALID_ARGUMENT, errno, "descriptor is not a sealable memfd");
  if ((seals & REQUIRED_SEALS) != REQUIRED_SEALS)
    return Error(Errc::INVALID_ARGUMENT,
                 "memfd is not sealed against grow/shrink (and F_SEAL_SEAL): its creator could "
                 "truncate it under our mapping");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Error::fromErrno(errno, "fstat of a shared region");
  if (st.st_size <= 0) return Error(Errc::INVALID_ARGUMENT, "shared region is empty");
  size_t size = static_cast<size_t>(st.st_size);
  if (expectedSize != 0 && size != expectedSize)
    return Error(Errc::INVALID_ARGUMENT, "shared region size differs from the expected size");
  Result<std::byte*> p = mapShared(fd.get(), size);
  if (!p) return p.error();
  return SharedMemory(*p, size, std::move(fd));
}

SharedMemory::SharedMemory(SharedMemory&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      fd_(std::move(o.fd_)) {}

SharedMemory& SharedMemory::operator=(SharedMemory&& o) noexcept {
  if (this != &o) {
    unmap();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    fd_ = std::move(o.fd_);
  }
  return *this;
}

SharedMemory::~SharedMemory() { unmap(); }

void SharedMemory::unmap() noexcept {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  fd_.reset();
}

Result<Fd> SharedMemory::duplicateFd() const {
  if (!fd_.valid()) return Error(Errc::INVALID_ARGUMENT, "an anonymous region has no descriptor");
  Fd dup(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!dup.valid()) return Error::fromErrno(errno, "dup of a memfd failed");
  return dup;
}

}  // namespace agate
