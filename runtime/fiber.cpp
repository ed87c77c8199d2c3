#include "agate/runtime/fiber.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <boost/context/detail/fcontext.hpp>
#include <cerrno>
#include <cstring>
#include <mutex>

#ifdef AGATE_ASAN
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef AGATE_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace agate {
namespace detail {
constinit thread_local FiberThread tFiberThread;  // see fiber.h
}  // namespace detail

namespace {

using detail::FiberThread;
using detail::tFiberThread;
namespace ctx = boost::context::detail;

// An alternate signal stack this thread installed, removed when the thread exits. The fault
// handler must not run on the overflowed fiber stack, so every thread that runs fibers has one.
class AltSignalStack {
 public:
  static constexpr size_t SIZE = 64 * 1024;
  static constexpr size_t MIN_EXISTING = 16 * 1024;  // a stack someone else installed we accept

  ~AltSignalStack() {
    if (mapping_ == nullptr) return;
    stack_t current{};
    // Put back what was there, unless someone replaced ours meanwhile.
    if (sigaltstack(nullptr, &current) == 0 && current.ss_sp == usable()) {
      sigaltstack(&previous_, nullptr);
    }
    munmap(mapping_, guardSize() + SIZE);
  }

  Status tryInstall() {
    stack_t existing{};
    if (sigaltstack(nullptr, &existing) != 0) {
      return Error::fromErrno(errno, "sigaltstack query failed");
    }
    if ((existing.ss_flags & SS_DISABLE) == 0 && existing.ss_size >= MIN_EXISTING) return {};
    void* mapping = mmap(nullptr, guardSize() + SIZE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) {
      return Error::fromErrno(errno, "mmap of the alternate signal stack failed");
    }
    if (mprotect(mapping, guardSize(), PROT_NONE) != 0) {
      const int err = errno;
      munmap(mapping, guardSize() + SIZE);
      return Error::fromErrno(err, "mprotect of the alternate signal stack guard failed");
    }
    mapping_ = mapping;
    stack_t ours{};
    ours.ss_sp = usable();
    ours.ss_size = SIZE;
    ours.ss_flags = 0;
    if (sigaltstack(&ours, &previous_) != 0) {
      const int err = errno;
      munmap(mapping_, guardSize() + SIZE);
      mapping_ = nullptr;
      return Error::fromErrno(err, "sigaltstack install failed");
    }
    return {};
  }

 private:
  static size_t guardSize() noexcept { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  void* usable() const noexcept { return static_cast<std::byte*>(mapping_) + guardSize(); }

  void* mapping_ = nullptr;
  stack_t previous_{};
};
thread_local AltSignalStack tAltSignalStack;

// Process-wide: the SIGSEGV/SIGBUS actions found when Agate installed its fault handler, to which
// faults that are not fiber stack overflows are passed on. Written once under gHandlerOnce, read
// only by the handler afterwards.
struct sigaction gPreviousSegv;
struct sigaction gPreviousBus;
std::once_flag gHandlerOnce;
int gHandlerErrno = 0;  // errno of a failed installation, 0 if it succeeded

#ifdef AGATE_TSAN
// The kernel's view of a signal action (asm-generic layout, with sa_restorer as on x86-64 and
// arm64). TSan's interceptor hides its own handler behind sigaction(); the raw system call sees it.
struct KernelSigaction {
  void* handler;
  unsigned long flags;
  void* restorer;
  uint64_t mask;
};
KernelSigaction gKernelSegv;
KernelSigaction gKernelBus;
#endif

// Async-signal-safe formatting: appends to a fixed buffer, never allocates.
class SignalSafeLine {
 public:
  SignalSafeLine& add(const char* s) noexcept {
    while (*s != '\0' && len_ < sizeof buf_) buf_[len_++] = *s++;
    return *this;
  }
  SignalSafeLine& add(uint64_t v) noexcept {
    char digits[24];
    size_t n = 0;
    do {
      digits[n++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v != 0);
    while (n > 0 && len_ < sizeof buf_) buf_[len_++] = digits[--n];
    return *this;
  }
  SignalSafeLine& addHex(uintptr_t v) noexcept {
    add("0x");
    char digits[2 * sizeof v];
    size_t n = 0;
    do {
      digits[n++] = "0123456789abcdef"[v & 0xf];
      v >>= 4;
    } while (v != 0);
    while (n > 0 && len_ < sizeof buf_) buf_[len_++] = digits[--n];
    return *this;
  }
  void writeTo(int fd) const noexcept {
    size_t done = 0;
    while (done < len_) {
      const ssize_t n = write(fd, buf_ + done, len_ - done);
      if (n <= 0) return;
      done += static_cast<size_t>(n);
    }
  }

 private:
  char buf_[256];
  size_t len_ = 0;
};

uintptr_t interruptedStackPointer(const void* ucontext) noexcept {
  const auto* uc = static_cast<const ucontext_t*>(ucontext);
#if defined(__x86_64__)
  return static_cast<uintptr_t>(uc->uc_mcontext.gregs[REG_RSP]);
#elif defined(__aarch64__)
  return static_cast<uintptr_t>(uc->uc_mcontext.sp);
#else
  (void)uc;
  return 0;  // unknown architecture: only the fault address is used
#endif
}

// Passes a fault that is not a fiber overflow to whoever handled it before Agate.
void chainFault(int sig, siginfo_t* info, void* ucontext) noexcept {
  const struct sigaction& previous = sig == SIGSEGV ? gPreviousSegv : gPreviousBus;
#ifdef AGATE_TSAN
  // TSan runs this handler inside its signal wrapper, and its deadly-signal handler faults while
  // unwinding from there ("nested bug"), losing the stack trace. So hand the kernel back the exact
  // action TSan had installed (bypassing TSan's sigaction interceptor) and return: the faulting
  // instruction runs again and TSan reports it as if Agate were not there.
  if (info != nullptr && info->si_code > 0) {
    syscall(SYS_rt_sigaction, sig, sig == SIGSEGV ? &gKernelSegv : &gKernelBus, nullptr,
            sizeof(uint64_t));
    return;
  }
#endif
  if ((previous.sa_flags & SA_SIGINFO) != 0 && previous.sa_sigaction != nullptr) {
    previous.sa_sigaction(sig, info, ucontext);
    return;
  }
  if ((previous.sa_flags & SA_SIGINFO) == 0 && previous.sa_handler != SIG_DFL &&
      previous.sa_handler != SIG_IGN) {
    previous.sa_handler(sig);
    return;
  }
  // Default action (an ignored fault would loop forever, so it gets the default too): restore it
  // and return. A real fault re-executes the faulting instruction and dies by the signal as if
  // Agate were not there; a signal sent by kill() is raised again and delivered on return.
  struct sigaction fallback {};
  fallback.sa_handler = SIG_DFL;
  sigemptyset(&fallback.sa_mask);
  sigaction(sig, &fallback, nullptr);
  if (info == nullptr || info->si_code <= 0) raise(sig);
}

}  // namespace

namespace detail {

// Switching, entry and fault handling: the parts of Fiber that touch Boost.Context, sanitizers
// and signals, kept out of the public header.
struct FiberRuntime {
  // Announces a switch from the current stack to [bottom, bottom + size). `fakeStack` keeps the
  // current stack's ASan fake frames while it is away; nullptr when the current stack is done.
  static void beforeSwitch([[maybe_unused]] void** fakeStack, [[maybe_unused]] const void* bottom,
                           [[maybe_unused]] size_t size,
                           [[maybe_unused]] void* tsanTarget) noexcept {
#ifdef AGATE_ASAN
    __sanitizer_start_switch_fiber(fakeStack, bottom, size);
#endif
#ifdef AGATE_TSAN
    __tsan_switch_to_fiber(tsanTarget, 0);
#endif
  }

  // Completes a switch on the stack that was switched to; reports the stack that was left.
  static void afterSwitch([[maybe_unused]] void* fakeStack, [[maybe_unused]] const void** oldBottom,
                          [[maybe_unused]] size_t* oldSize) noexcept {
#ifdef AGATE_ASAN
    __sanitizer_finish_switch_fiber(fakeStack, oldBottom, oldSize);
#endif
  }

  // First code run on a fiber's stack. Never returns: the last switch leaves the stack for good.
  static void entry(ctx::transfer_t from) noexcept {
    auto* fiber = static_cast<Fiber*>(from.data);
    fiber->resumerContext_ = from.fctx;
    afterSwitch(nullptr, &fiber->asanResumerBottom_, &fiber->asanResumerSize_);
    fiber->runBody();
    fiber->state_ = Fiber::State::FINISHED;
    fiber->wakeJoiners();
    // nullptr: this stack's fake frames can be freed, it will not be switched back to.
    beforeSwitch(nullptr, fiber->asanResumerBottom_, fiber->asanResumerSize_, fiber->tsanResumer_);
    ctx::jump_fcontext(fiber->resumerContext_, fiber);
    AGATE_ASSERT(false, "fiber %llu was resumed after it finished",
                 static_cast<unsigned long long>(fiber->id_));
  }

  // SIGSEGV/SIGBUS on any thread. Async-signal-safe: reads the thread's current fiber and its
  // immutable stack bounds, writes with write(2), aborts.
  static void onFault(int sig, siginfo_t* info, void* ucontext) noexcept {
    const Fiber* fiber = tFiberThread.current;
    if (fiber != nullptr && info != nullptr && isOverflow(*fiber, info, ucontext)) {
      SignalSafeLine()
          .add("agate: fiber stack overflow: fiber ")
          .add(fiber->id_)
          .add(" ran past its ")
          .add(static_cast<uint64_t>(fiber->stack_.size / 1024))
          .add(" KiB stack (fault at ")
          .addHex(reinterpret_cast<uintptr_t>(info->si_addr))
          .add(", stack ")
          .addHex(reinterpret_cast<uintptr_t>(fiber->stack_.base))
          .add("-")
          .addHex(reinterpret_cast<uintptr_t>(fiber->stack_.top()))
          .add(")\n")
          .writeTo(STDERR_FILENO);
      abort();
    }
    chainFault(sig, info, ucontext);
  }

  // The fault hit the guard below the running fiber's stack, or the fiber's stack pointer has
  // already left its stack downwards (a frame bigger than the guard jumped over it).
  static bool isOverflow(const Fiber& fiber, const siginfo_t* info, const void* ucontext) noexcept {
    const auto base = reinterpret_cast<uintptr_t>(fiber.stack_.base);
    const uintptr_t guardLow = base - fiber.guardSize_;
    const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
    if (addr >= guardLow && addr < base) return true;
    // Bound the distance so a stale or unrelated stack pointer is never taken for an overflow.
    constexpr uintptr_t SP_SLACK = 1024 * 1024;
    const uintptr_t sp = interruptedStackPointer(ucontext);
    return sp != 0 && sp < base && base - sp <= SP_SLACK;
  }

  static Status tryPrepareThread() {
    std::call_once(gHandlerOnce, [] {
#ifdef AGATE_TSAN
      syscall(SYS_rt_sigaction, SIGSEGV, nullptr, &gKernelSegv, sizeof(uint64_t));
      syscall(SYS_rt_sigaction, SIGBUS, nullptr, &gKernelBus, sizeof(uint64_t));
#endif
      struct sigaction ours {};
      ours.sa_sigaction = &FiberRuntime::onFault;
      ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
      sigemptyset(&ours.sa_mask);
      if (sigaction(SIGSEGV, &ours, &gPreviousSegv) != 0) {
        gHandlerErrno = errno;
        return;
      }
      if (sigaction(SIGBUS, &ours, &gPreviousBus) != 0) {
        gHandlerErrno = errno;
        sigaction(SIGSEGV, &gPreviousSegv, nullptr);
      }
    });
    if (gHandlerErrno != 0) {
      return Error::fromErrno(gHandlerErrno, "installing the fiber fault handler failed");
    }
    AGATE_TRY(tAltSignalStack.tryInstall());
    tFiberThread.prepared = true;
    return {};
  }
};

}  // namespace detail

using detail::FiberRuntime;

void FiberWaiter::wake() noexcept {
  if (woken_) return;
  woken_ = true;
  fiber_.wake();
}

Fiber* Fiber::current() noexcept { return tFiberThread.current; }

Status Fiber::tryPrepareThread() {
  if (tFiberThread.prepared) return {};
  return FiberRuntime::tryPrepareThread();
}

Result<FiberStack> Fiber::tryAcquireStack(StackPool& pool, size_t frameSize, size_t frameAlign) {
  if (frameSize + frameAlign > pool.stackSize() / 4) {
    return Error(Errc::INVALID_ARGUMENT,
                 "a fiber's callable and result fill more than a quarter of its stack");
  }
  AGATE_TRY(tryPrepareThread());
  return pool.tryAcquire();
}

Fiber::Fiber(FiberStack stack, StackPool& pool, FiberScheduler* scheduler,
             void* contextTop) noexcept
    : stack_(stack),
      pool_(&pool),
      guardSize_(pool.guardSize()),
      scheduler_(scheduler),
      ownerThread_(&tFiberThread),
      id_(++tFiberThread.lastId) {
  // make_fcontext aligns the top itself and keeps its own small record below it.
  const size_t usable = static_cast<size_t>(static_cast<std::byte*>(contextTop) - stack.base);
  context_ = ctx::make_fcontext(contextTop, usable, &FiberRuntime::entry);
#ifdef AGATE_TSAN
  tsanFiber_ = __tsan_create_fiber(0);
#endif
}

Fiber::~Fiber() = default;

#if defined(AGATE_ASAN) || defined(AGATE_TSAN)
void Fiber::announceResume(void** resumerFakeStack) noexcept {
#ifdef AGATE_TSAN
  tsanResumer_ = __tsan_get_current_fiber();
#endif
  FiberRuntime::beforeSwitch(resumerFakeStack, stack_.base, stack_.size, tsanFiber_);
}

void Fiber::finishResume(void* resumerFakeStack) noexcept {
  FiberRuntime::afterSwitch(resumerFakeStack, nullptr, nullptr);
}

void Fiber::announceSuspend() noexcept {
  FiberRuntime::beforeSwitch(&asanFakeStack_, asanResumerBottom_, asanResumerSize_, tsanResumer_);
}

void Fiber::finishSuspend() noexcept {
  FiberRuntime::afterSwitch(asanFakeStack_, &asanResumerBottom_, &asanResumerSize_);
}
#endif

void Fiber::wake() noexcept {
  AGATE_ASSERT(ownerThread_ == &tFiberThread,
               "fiber %llu woken on another thread: wake it through its loop's doorbell",
               static_cast<unsigned long long>(id_));
  AGATE_REQUIRE(scheduler_ != nullptr, "fiber %llu woken but has no FiberScheduler",
                static_cast<unsigned long long>(id_));
  if (state_ == State::FINISHED) return;  // nothing left to resume
  scheduler_->scheduleFiber(*this);
}

void Fiber::wakeJoiners() noexcept {
  while (!joiners_.empty()) {
    FiberWaiter& waiter = joiners_.front();
    joiners_.pop_front();
    waiter.wake();
  }
}

void Fiber::destroy() noexcept {
  AGATE_ASSERT(ownerThread_ == &tFiberThread,
               "fiber %llu destroyed on a thread other than the one that started it",
               static_cast<unsigned long long>(id_));
  AGATE_REQUIRE(state_ != State::RUNNING,
                "fiber %llu destroyed while running (by itself or by a fiber it resumed)",
                static_cast<unsigned long long>(id_));
  if (state_ == State::SUSPENDED) {
    // Unwind: every suspend()/wait() now returns CANCELLED without switching, so one resume runs
    // the function to its end and the destructors on the fiber's stack run there.
    cancelRequested_ = true;
    resume(nullptr);
    AGATE_ASSERT(state_ == State::FINISHED, "fiber %llu did not finish when unwound",
                 static_cast<unsigned long long>(id_));
  } else if (state_ == State::CREATED) {
    state_ = State::FINISHED;  // never ran: its callable is destroyed below, here
    wakeJoiners();
  }
#ifdef AGATE_TSAN
  __tsan_destroy_fiber(tsanFiber_);
#endif
  StackPool& pool = *pool_;
  const FiberStack stack = stack_;
  this->~Fiber();  // virtual: destroys the callable (if it never ran) and the result
  pool.release(stack);
}

size_t FiberReadyQueue::runReady() noexcept {
  Queue batch;
  batch.splice(batch.end(), queue_);
  size_t resumed = 0;
  while (!batch.empty()) {
    Fiber& fiber = batch.front();
    batch.pop_front();
    if (fiber.state() == Fiber::State::RUNNING) {
      queue_.push_back(fiber);
      continue;
    }
    if (fiber.state() == Fiber::State::FINISHED) continue;
    fiber.resume(nullptr);
    ++resumed;
  }
  return resumed;
}

}  // namespace agate
