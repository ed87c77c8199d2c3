#include "agate/runtime/fd.h"

#include <unistd.h>

namespace agate {

void Fd::reset(int fd) noexcept {
  if (fd_ >= 0) {
    // close() releases the descriptor even when it reports EINTR on Linux, so never retry.
    ::close(fd_);
  }
  fd_ = fd;
}

}  // namespace agate
