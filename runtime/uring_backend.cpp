// The io_uring backend: one ring per loop, all submissions of a loop turn flushed by the single
// io_uring_submit_and_wait_timeout that also waits for completions.
//
// user_data of an SQE is the IoOp it serves, or one of two tags: CANCEL_TAG for the loop's own
// cancel requests (their completions are ignored) and WAKE_TAG for the read that the loop keeps
// posted on its wake eventfd.
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <liburing.h>
#include <sched.h>
#include <cerrno>
#include <cstring>

#include "loop_core.h"

namespace agate::detail {
namespace {

constexpr uint64_t CANCEL_TAG = 0;
constexpr uint64_t WAKE_TAG = 1;

// IORING_OP_FUTEX_WAIT (kernel >= 6.7) is newer than liburing 2.3, so its SQE is filled by hand.
constexpr uint8_t OP_FUTEX_WAIT = 51;
constexpr uint32_t FUTEX2_SIZE_U32 = 0x02;
constexpr uint32_t FUTEX2_PRIVATE = 128;
constexpr uint64_t FUTEX_BITSET_MATCH_ANY = 0xffffffff;

// Linux >= 6.16 gives a process its own futex hash when it creates its first thread (and may
// re-size it later). A private futex wait queued through io_uring before such a switch stays in
// the old hash, where no wake finds it (observed on 6.18). Pinning the process to the global hash
// while it has no private one makes the switch never happen. Older kernels reject the prctl
// (EINVAL): they have no private hash, hence nothing to pin. A process that already has a
// private hash keeps it; the loop's backstop re-check covers a later re-size.
constexpr int PR_FUTEX_HASH_OPTION = 78;
constexpr int PR_FUTEX_HASH_SET_SLOTS_ARG = 1;
constexpr int PR_FUTEX_HASH_GET_SLOTS_ARG = 2;

void pinProcessFutexHash() noexcept {
  if (prctl(PR_FUTEX_HASH_OPTION, PR_FUTEX_HASH_GET_SLOTS_ARG, 0, 0, 0) == 0) {
    (void)prctl(PR_FUTEX_HASH_OPTION, PR_FUTEX_HASH_SET_SLOTS_ARG, 0, 0, 0);
  }
}

class UringBackend final : public IoBackend {
 public:
  explicit UringBackend(LoopCore& core) noexcept : core_(core) {}

  ~UringBackend() override {
    if (ringReady_) {
      // Cancel everything still in the kernel (including the wake read into wakeBuf_) and wait
      // until it is gone, then hand every op its completion so the loop can free it.
      io_uring_sync_cancel_reg reg{};
      reg.flags = IORING_ASYNC_CANCEL_ANY;
      reg.timeout.tv_sec = -1;
      reg.timeout.tv_nsec = -1;
      io_uring_submit(&ring_);
      int r;
      do {
        r = io_uring_register_sync_cancel(&ring_, &reg);
      } while (r == -EINTR);
      reap();
      io_uring_queue_exit(&ring_);
    }
    if (wakeFd_ >= 0) close(wakeFd_);
  }

  Status init(const LoopOptions& options) {
    if (options.simulateUringInitErrno != 0) {
      return Error(Errc::UNSUPPORTED, options.simulateUringInitErrno,
                   "io_uring_queue_init (simulated failure)");
    }
    io_uring_params params{};
    if (options.sqpoll) {
      params.flags |= IORING_SETUP_SQPOLL;
      params.sq_thread_idle = options.sqThreadIdleMs;
    }
    int r = io_uring_queue_init_params(options.ringEntries, &ring_, &params);
    if (r < 0) {
      Errc code =
          (r == -EPERM || r == -ENOSYS || r == -EACCES) ? Errc::UNSUPPORTED : Errc::SYSTEM_ERROR;
      return Error(code, -r, "io_uring_queue_init");
    }
    ringReady_ = true;
    sqpoll_ = options.sqpoll;
    if (io_uring_probe* probe = io_uring_get_probe_ring(&ring_)) {
      nativeFutex_ = io_uring_opcode_supported(probe, OP_FUTEX_WAIT) != 0;
      io_uring_free_probe(probe);
    }
    if (nativeFutex_) pinProcessFutexHash();
    // Blocking eventfd: io_uring arms an internal poll on it. (An O_NONBLOCK file would make the
    // read complete at once with -EAGAIN.)
    wakeFd_ = eventfd(0, EFD_CLOEXEC);
    if (wakeFd_ < 0) return Error::fromErrno(errno, "eventfd");
    armWakeRead();
    return {};
  }

  Backend kind() const noexcept override { return Backend::URING; }
  bool hasNativeFutexWait() const noexcept override { return nativeFutex_; }

  void start(IoOp& op) noexcept override {
    io_uring_sqe* sqe = getSqe();
    switch (op.kind) {
      case IoOp::Kind::OP_READ:
        io_uring_prep_read(sqe, op.fd, op.buf, op.len, static_cast<uint64_t>(op.offset));
        break;
      case IoOp::Kind::OP_WRITE:
        io_uring_prep_write(sqe, op.fd, op.buf, op.len, static_cast<uint64_t>(op.offset));
        break;
      case IoOp::Kind::OP_POLL:
        io_uring_prep_poll_add(sqe, op.fd, op.events);
        break;
      case IoOp::Kind::OP_FUTEX_WAIT:
        memset(sqe, 0, sizeof *sqe);
        sqe->opcode = OP_FUTEX_WAIT;
        sqe->fd = static_cast<int32_t>(FUTEX2_SIZE_U32 | (op.shared ? 0 : FUTEX2_PRIVATE));
        sqe->addr = reinterpret_cast<uint64_t>(op.word);
        sqe->off = op.expected;
        sqe->addr3 = FUTEX_BITSET_MATCH_ANY;
        break;
    }
    io_uring_sqe_set_data64(sqe, reinterpret_cast<uint64_t>(&op));
    op.inFlight = true;
  }

  void cancel(IoOp& op) noexcept override {
    if (op.kind != IoOp::Kind::OP_READ && op.kind != IoOp::Kind::OP_WRITE) {
      // No caller memory involved: ask asynchronously; the op is freed at its CQE.
      io_uring_sqe* sqe = getSqe();
      io_uring_prep_cancel64(sqe, reinterpret_cast<uint64_t>(&op), 0);
      io_uring_sqe_set_data64(sqe, CANCEL_TAG);
      return;
    }
    cancelSynchronously(op);
  }

  void wait(std::optional<Duration> timeout) noexcept override {
    if (timeout && *timeout <= Duration::zero()) {
      if (io_uring_sq_ready(&ring_) > 0) io_uring_submit(&ring_);
    } else {
      __kernel_timespec ts{};
      if (timeout) {
        ts.tv_sec = timeout->count() / 1'000'000'000;
        ts.tv_nsec = timeout->count() % 1'000'000'000;
      }
      io_uring_cqe* cqe = nullptr;
      // -ETIME (timeout) and -EINTR are ordinary outcomes; completions are reaped below either
      // way.
      (void)io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, timeout ? &ts : nullptr, nullptr);
    }
    reap();
  }

  void wake() noexcept override {
    uint64_t one = 1;
    while (::write(wakeFd_, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }

 private:
  io_uring_sqe* getSqe() noexcept {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    while (sqe == nullptr) {  // the submission queue is full: flush it
      io_uring_submit(&ring_);
      sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) sched_yield();  // SQPOLL thread has not consumed the queue yet
    }
    return sqe;
  }

  void armWakeRead() noexcept {
    io_uring_sqe* sqe = getSqe();
    io_uring_prep_read(sqe, wakeFd_, &wakeBuf_, sizeof wakeBuf_, 0);
    io_uring_sqe_set_data64(sqe, WAKE_TAG);
  }

  void reap() noexcept {
    unsigned head;
    unsigned seen = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      uint64_t tag = cqe->user_data;
      if (tag == CANCEL_TAG) continue;
      if (tag == WAKE_TAG) {
        if (cqe->res != -ECANCELED) armWakeRead();
        continue;
      }
      core_.finish(*reinterpret_cast<IoOp*>(tag), cqe->res);
    }
    io_uring_cq_advance(&ring_, seen);
  }

  bool completionPending(const IoOp& op) noexcept {
    unsigned head;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      if (cqe->user_data == reinterpret_cast<uint64_t>(&op)) return true;
    }
    return false;
  }

  // Returns once the kernel no longer references op.buf: the op was cancelled or has completed.
  // Its CQE is reaped later, as any other.
  void cancelSynchronously(IoOp& op) noexcept {
    io_uring_submit(&ring_);  // the op may still sit in the submission queue
    io_uring_sync_cancel_reg reg{};
    reg.addr = reinterpret_cast<uint64_t>(&op);
    reg.timeout.tv_sec = -1;
    reg.timeout.tv_nsec = -1;
    for (;;) {
      int r = io_uring_register_sync_cancel(&ring_, &reg);
      if (r == -EINTR) continue;
      if (r == 0) return;
      AGATE_ASSERT(r == -ENOENT, "synchronous io_uring cancel failed: %s", strerror(-r));
      // Not found: the op has completed (its CQE waits in the ring), or, under SQPOLL, the kernel
      // thread has not picked it up yet.
      if (completionPending(op)) return;
      AGATE_ASSERT(sqpoll_, "io_uring lost track of an operation being cancelled");
      sched_yield();
    }
  }

  LoopCore& core_;
  io_uring ring_{};
  bool ringReady_ = false;
  bool sqpoll_ = false;
  bool nativeFutex_ = false;
  int wakeFd_ = -1;
  uint64_t wakeBuf_ = 0;  // target of the wake read; the kernel may write it until ring exit
};

}  // namespace

Result<std::unique_ptr<IoBackend>> tryCreateUringBackend(LoopCore& core,
                                                         const LoopOptions& options) {
  auto backend = std::make_unique<UringBackend>(core);
  AGATE_TRY(backend->init(options));
  return std::unique_ptr<IoBackend>(std::move(backend));
}

}  // namespace agate::detail
