// In-process floors, measured with Google Benchmark (see support/in_process.h): the median over
// repetitions of the time per operation.
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <coroutine>
#include <cstdlib>
#include <exception>
#include <memory>
#include <utility>

#include <boost/context/detail/fcontext.hpp>

#include "rings/floors.h"
#include "support/in_process.h"
#include "support/timing.h"

#if defined(AGATE_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace agate::bench::rings {

namespace {

// Adds the one figure of an in-process scenario and the CPU it finished on.
Status addInProcess(const Scenario& scenario, Report& report, Result<double> ns) {
  if (!ns) return ns.error();
  report.add(Figure{.name = std::string(scenario.name),
                    .value = *ns,
                    .unit = std::string(scenario.unit),
                    .scenario = std::string(scenario.name),
                    .samples = 0,
                    .ratioTo = {}});
  report.addPlacement(scenario.name, {sched_getcpu()});
  return {};
}

// One clock_gettime(CLOCK_MONOTONIC) through the vDSO: the cost hidden in every latency sample.
Status clockRead(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addInProcess(scenario, report,
                      measureInProcess(scenario.name, o, [](benchmark::State& state) {
                        for (auto _ : state) benchmark::DoNotOptimize(nowNs());
                      }));
}

// One bare system call (getppid, which glibc does not cache), entry to exit.
Status bareSyscall(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addInProcess(scenario, report,
                      measureInProcess(scenario.name, o, [](benchmark::State& state) {
                        for (auto _ : state) benchmark::DoNotOptimize(syscall(SYS_getppid));
                      }));
}

// A bare C++20 coroutine that suspends forever in a loop, with no framework around it.
class Ticker {
 public:
  struct promise_type {
    Ticker get_return_object() noexcept {
      return Ticker(std::coroutine_handle<promise_type>::from_promise(*this));
    }
    std::suspend_always initial_suspend() noexcept { return {}; }
    std::suspend_always final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
    void unhandled_exception() noexcept { std::terminate(); }
  };

  Ticker(Ticker&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  Ticker& operator=(Ticker&&) = delete;
  ~Ticker() {
    if (handle_) handle_.destroy();
  }

  // Runs the body to its next suspension point.
  void resume() const { handle_.resume(); }

 private:
  explicit Ticker(std::coroutine_handle<promise_type> h) noexcept : handle_(h) {}
  std::coroutine_handle<promise_type> handle_;
};

// The frame is allocated once, here, never in the measured loop.
[[gnu::noinline]] Ticker tick(uint64_t& resumes) {
  for (;;) {
    ++resumes;
    co_await std::suspend_always{};
  }
}

// One resume of a suspended C++20 coroutine and its suspension again (resume() returns).
Status coroutineResume(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addInProcess(scenario, report,
                      measureInProcess(scenario.name, o, [](benchmark::State& state) {
                        uint64_t resumes = 0;
                        Ticker ticker = tick(resumes);
                        for (auto _ : state) ticker.resume();
                        benchmark::DoNotOptimize(resumes);
                      }));
}

namespace fctx = boost::context::detail;

// The two contexts of the fcontext ping-pong, and (under TSan) the fibers TSan must be told about:
// without that it would see one thread's stack jump and report nonsense.
struct FcontextPair {
#if defined(AGATE_TSAN)
  void* mainFiber = __tsan_get_current_fiber();
  void* bounceFiber = __tsan_create_fiber(0);
  ~FcontextPair() { __tsan_destroy_fiber(bounceFiber); }
#endif
  void enterBounce() {
#if defined(AGATE_TSAN)
    __tsan_switch_to_fiber(bounceFiber, 0);
#endif
  }
  void enterMain() {
#if defined(AGATE_TSAN)
    __tsan_switch_to_fiber(mainFiber, 0);
#endif
  }
};

// The other side of the ping-pong: jumps straight back to whoever jumped to it, forever.
void bounce(fctx::transfer_t t) {
  auto* pair = static_cast<FcontextPair*>(t.data);
  for (;;) {
    pair->enterMain();
    t = fctx::jump_fcontext(t.fctx, pair);
  }
}

// One Boost.Context jump_fcontext, one way: half of a jump there and back.
Status fcontextSwitch(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto ns = measureInProcess(scenario.name, o, [](benchmark::State& state) {
    constexpr size_t STACK_BYTES = 64 * 1024;
    auto stack = std::make_unique<std::byte[]>(STACK_BYTES);  // malloc'd: no guard page needed
    FcontextPair pair;
    // The stack grows down: make_fcontext takes its top.
    fctx::fcontext_t other = fctx::make_fcontext(stack.get() + STACK_BYTES, STACK_BYTES, bounce);
    for (auto _ : state) {
      pair.enterBounce();
      other = fctx::jump_fcontext(other, &pair).fctx;
    }
    // `bounce` never returns; its stack is simply freed: nothing on it owns anything.
  });
  if (ns) ns = *ns / 2;
  return addInProcess(scenario, report, ns);
}

constexpr Scenario IN_PROCESS_FLOORS[] = {
    {"floor_clock_read_ns", "ns", "one clock_gettime(CLOCK_MONOTONIC), the cost in every sample",
     clockRead},
    {"floor_syscall_ns", "ns", "one bare system call (getppid)", bareSyscall},
    {"floor_coroutine_resume_ns", "ns", "resume + suspend of a bare C++20 coroutine, no framework",
     coroutineResume},
    {"floor_fcontext_switch_ns", "ns", "one Boost.Context jump_fcontext, one way", fcontextSwitch},
};

}  // namespace

std::span<const Scenario> inProcessFloors() { return IN_PROCESS_FLOORS; }

}  // namespace agate::bench::rings
