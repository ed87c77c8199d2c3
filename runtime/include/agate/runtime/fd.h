// Fd: an owning file descriptor.
//
// A move-only value that closes its descriptor when destroyed. Raw `int`s never own a descriptor
// in Agate; anything that keeps one alive holds an Fd. `release()` hands ownership back to the
// caller (e.g. to pass it to a system call that takes ownership).
#pragma once

#include <utility>

namespace agate {

class Fd {
 public:
  Fd() noexcept = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }

  bool valid() const noexcept { return fd_ >= 0; }
  int get() const noexcept { return fd_; }

  // Gives up ownership without closing; the Fd becomes invalid.
  int release() noexcept { return std::exchange(fd_, -1); }

  // Closes the current descriptor (if any) and takes ownership of `fd`.
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

}  // namespace agate
