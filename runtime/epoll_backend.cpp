// The epoll fallback, for machines where io_uring is disabled (kernel.io_uring_disabled, seccomp).
//
//  * read / write: attempted at once (pread / pwrite, or read / write at CURRENT_POSITION).
//    Regular files are always "ready", so they complete synchronously inside the call. On a
//    non-blocking fd that returns EAGAIN the op waits for readiness (one-shot) and retries. A
//    blocking pipe or socket that is not ready blocks the loop: use O_NONBLOCK fds here.
//  * waitReady: a one-shot epoll registration. epoll allows one registration per fd per loop,
//    so a second concurrent wait on the same fd resolves to SYSTEM_ERROR (EEXIST).
//  * futex waits: never reach this backend; the loop polls the word (see event_loop.h).
//  * wake: an eventfd in the epoll set.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

#include "loop_core.h"

namespace agate::detail {
namespace {

class EpollBackend final : public IoBackend {
 public:
  explicit EpollBackend(LoopCore& core) noexcept : core_(core) {}
  ~EpollBackend() override {
    if (epfd_ >= 0) close(epfd_);
    if (wakeFd_ >= 0) close(wakeFd_);
  }

  Status init() {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epfd_ < 0) return Error::fromErrno(errno, "epoll_create1");
    wakeFd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wakeFd_ < 0) return Error::fromErrno(errno, "eventfd");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = nullptr;  // null marks the wake fd
    if (epoll_ctl(epfd_, EPOLL_CTL_ADD, wakeFd_, &ev) < 0) {
      return Error::fromErrno(errno, "epoll_ctl(wake fd)");
    }
    return {};
  }

  Backend kind() const noexcept override { return Backend::EPOLL; }
  bool hasNativeFutexWait() const noexcept override { return false; }

  void start(IoOp& op) noexcept override {
    if (op.kind == IoOp::Kind::OP_POLL) {
      arm(op, op.events);
      return;
    }
    AGATE_ASSERT(op.kind == IoOp::Kind::OP_READ || op.kind == IoOp::Kind::OP_WRITE,
                 "futex waits are polled by the loop on this backend (kind %d)",
                 static_cast<int>(op.kind));
    attemptTransfer(op);
  }

  void cancel(IoOp& op) noexcept override {
    // Nothing is ever in the middle of a transfer here: unregistering is the whole cancel.
    epoll_ctl(epfd_, EPOLL_CTL_DEL, op.fd, nullptr);
    core_.finish(op, -ECANCELED);
  }

  void wait(std::optional<Duration> timeout) noexcept override {
    epoll_event events[64];
    timespec ts{};
    if (timeout) {
      ts.tv_sec = std::max<int64_t>(0, timeout->count()) / 1'000'000'000;
      ts.tv_nsec = std::max<int64_t>(0, timeout->count()) % 1'000'000'000;
    }
    int n = epoll_pwait2(epfd_, events, 64, timeout ? &ts : nullptr, nullptr);
    if (n < 0 && errno == ENOSYS) {  // kernels before 5.11: millisecond timeouts, rounded up
      int ms = timeout ? static_cast<int>((timeout->count() + 999'999) / 1'000'000) : -1;
      n = epoll_wait(epfd_, events, 64, ms);
    }
    for (int i = 0; i < n; ++i) {
      auto* op = static_cast<IoOp*>(events[i].data.ptr);
      if (op == nullptr) {
        uint64_t count;
        while (::read(wakeFd_, &count, sizeof count) < 0 && errno == EINTR) {
        }
        continue;
      }
      epoll_ctl(epfd_, EPOLL_CTL_DEL, op->fd, nullptr);
      op->inFlight = false;
      if (op->kind == IoOp::Kind::OP_POLL) {
        core_.finish(*op, static_cast<int32_t>(events[i].events));
      } else {
        attemptTransfer(*op);
      }
    }
  }

  void wake() noexcept override {
    uint64_t one = 1;
    while (::write(wakeFd_, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }

 private:
  void arm(IoOp& op, uint32_t events) noexcept {
    epoll_event ev{};
    ev.events = events | EPOLLONESHOT;
    ev.data.ptr = &op;
    if (epoll_ctl(epfd_, EPOLL_CTL_ADD, op.fd, &ev) < 0) {
      core_.finish(op, -errno);
      return;
    }
    op.inFlight = true;
  }

  void attemptTransfer(IoOp& op) noexcept {
    ssize_t r;
    do {
      if (op.kind == IoOp::Kind::OP_READ) {
        r = op.offset == EventLoop::CURRENT_POSITION ? ::read(op.fd, op.buf, op.len)
                                                     : ::pread(op.fd, op.buf, op.len, op.offset);
      } else {
        r = op.offset == EventLoop::CURRENT_POSITION ? ::write(op.fd, op.buf, op.len)
                                                     : ::pwrite(op.fd, op.buf, op.len, op.offset);
      }
    } while (r < 0 && errno == EINTR);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      arm(op, op.kind == IoOp::Kind::OP_READ ? EPOLLIN : EPOLLOUT);
      return;
    }
    core_.finish(op, r < 0 ? -errno : static_cast<int32_t>(r));
  }

  LoopCore& core_;
  int epfd_ = -1;
  int wakeFd_ = -1;
};

}  // namespace

Result<std::unique_ptr<IoBackend>> tryCreateEpollBackend(LoopCore& core) {
  auto backend = std::make_unique<EpollBackend>(core);
  AGATE_TRY(backend->init());
  return std::unique_ptr<IoBackend>(std::move(backend));
}

}  // namespace agate::detail
