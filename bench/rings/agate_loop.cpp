// Agate's EventLoop and Fibers in suite `rings`, each figure beside the floor it is compared with
// (Figure::ratioTo), measured in this process with Google Benchmark (support/in_process.h).
// A file of its own: fiber.h and channel.h cannot share a translation unit under -Wshadow
// (fiber.h's member alias `Frame` shadows agate::Frame of ring.h).
#include <sched.h>

#include <string>
#include <string_view>

#include <benchmark/benchmark.h>
#include <boost/context/fiber.hpp>

#include "agate/runtime/event_loop.h"
#include "agate/runtime/fiber.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/stack_pool.h"
#include "rings/floors.h"
#include "support/in_process.h"

namespace agate::bench::rings {

namespace {

Status addInProcess(const Scenario& scenario, Report& report, Result<double> ns,
                    std::string_view floor) {
  if (!ns) return ns.error();
  report.add(Figure{.name = std::string(scenario.name),
                    .value = *ns,
                    .unit = std::string(scenario.unit),
                    .scenario = std::string(scenario.name),
                    .samples = 0,
                    .ratioTo = std::string(floor)});
  report.addPlacement(scenario.name, {sched_getcpu()});
  return {};
}

// The measured coroutine: one `co_await loop.yield()` per benchmark iteration.
Promise<void> yieldLoop(EventLoop& loop, benchmark::State& state) {
  for (auto _ : state) co_await loop.yield();
  co_return {};
}

// One co_await round trip on the EventLoop: the coroutine suspends on loop.yield(), the loop's
// run queue resumes it.
Status coawaitResume(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addInProcess(scenario, report,
                      measureInProcess(scenario.name, o,
                                       [](benchmark::State& state) {
                                         EventLoop loop;
                                         Result<void> r = loop.run(yieldLoop(loop, state));
                                         if (!r.ok()) state.SkipWithError("the loop failed");
                                       }),
                      "floor_coroutine_resume_ns");
}

// One Fiber switch, one way: half of resume() + the fiber's suspend().
Status fiberSwitch(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto ns = measureInProcess(scenario.name, o, [](benchmark::State& state) {
    StackPool pool;
    bool stop = false;
    auto fiber = Fiber::tryStart(pool, [&] {
      while (!stop && Fiber::suspend().ok()) {
      }
    });
    if (!fiber.ok()) {
      state.SkipWithError("Fiber::tryStart failed");
      return;
    }
    for (auto _ : state) fiber->resume();
    stop = true;
    fiber->resume();
  });
  if (ns) ns = *ns / 2;
  return addInProcess(scenario, report, ns, "floor_fcontext_switch_ns");
}

// Peer: one boost::context::fiber switch one way (its own stack allocator, no sanitizer hooks):
// what a user would pick instead of agate::Fiber.
Status boostFiberSwitch(const Scenario& scenario, const RunOptions& o, Report& report) {
  auto ns = measureInProcess(scenario.name, o, [](benchmark::State& state) {
    namespace ctx = boost::context;
    bool stop = false;
    ctx::fiber f{[&](ctx::fiber&& back) {
      while (!stop) back = std::move(back).resume();
      return std::move(back);
    }};
    for (auto _ : state) f = std::move(f).resume();
    stop = true;
    f = std::move(f).resume();
  });
  if (ns) ns = *ns / 2;
  return addInProcess(scenario, report, ns, "floor_fcontext_switch_ns");
}

// Floor for the stack pool: mapping a fresh guard-paged, prefaulted stack and unmapping it (what
// pooling avoids).
Status mapFreshStack(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addInProcess(scenario, report,
                      measureInProcess(scenario.name, o,
                                       [](benchmark::State& state) {
                                         for (auto _ : state) {
                                           StackPool pool(StackPoolOptions{.prefault = true});
                                           auto stack = pool.tryAcquire();
                                           if (!stack) {
                                             state.SkipWithError("tryAcquire failed");
                                             return;
                                           }
                                           benchmark::DoNotOptimize(stack->base);
                                           pool.release(*stack);
                                         }
                                       }),
                      {});
}

// Start a Fiber on a warm pool, run it to its end, destroy it (the stack goes back to the pool).
Status fiberStartWarmPool(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addInProcess(scenario, report,
                      measureInProcess(scenario.name, o,
                                       [](benchmark::State& state) {
                                         StackPool pool;
                                         for (auto _ : state) {
                                           auto fiber = Fiber::tryStart(pool, [] { return 1; });
                                           if (!fiber) {
                                             state.SkipWithError("Fiber::tryStart failed");
                                             return;
                                           }
                                           fiber->resume();
                                           benchmark::DoNotOptimize(fiber->result());
                                         }
                                       }),
                      "floor_map_guard_paged_stack_ns");
}

constexpr Scenario AGATE_LOOP[] = {
    {"coawait_resume_ns", "ns", "one co_await loop.yield() round trip on the EventLoop",
     coawaitResume},
    {"fiber_switch_ns", "ns", "one Fiber switch one way: (resume + suspend) / 2", fiberSwitch},
    {"peer_boost_fiber_switch_ns", "ns", "one boost::context::fiber switch one way (the peer)",
     boostFiberSwitch},
    {"floor_map_guard_paged_stack_ns", "ns",
     "map a fresh guard-paged, prefaulted 64 KiB stack and unmap it (what the pool avoids)",
     mapFreshStack},
    {"fiber_start_warm_pool_ns", "ns",
     "start a Fiber on a warm stack pool, run it to its end, destroy it", fiberStartWarmPool},
};

}  // namespace

std::span<const Scenario> agateLoopScenarios() { return AGATE_LOOP; }

}  // namespace agate::bench::rings
