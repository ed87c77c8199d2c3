// Fiber switch and start costs, beside Boost.Context's own fiber (the peer) in the same run.
#include <benchmark/benchmark.h>

#include <boost/context/fiber.hpp>

#include "agate/runtime/fiber.h"

namespace {

// Agate: resume() + the fiber's suspend(), i.e. two switches (one round trip).
void agateSwitchRoundTrip(benchmark::State& state) {
  agate::StackPool pool;
  bool stop = false;
  auto fiber = agate::Fiber::tryStart(pool, [&] {
    while (!stop && agate::Fiber::suspend().ok()) {
    }
  });
  if (!fiber.ok()) {
    state.SkipWithError("tryStart failed");
    return;
  }
  for (auto _ : state) fiber->resume();
  stop = true;
  fiber->resume();
  state.counters["ns_per_switch"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * 2,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(agateSwitchRoundTrip);

// Peer: boost::context::fiber resume() round trip (its own stack allocator, no sanitizer hooks).
void boostFiberRoundTrip(benchmark::State& state) {
  namespace ctx = boost::context;
  bool stop = false;
  ctx::fiber f{[&](ctx::fiber&& back) {
    while (!stop) back = std::move(back).resume();
    return std::move(back);
  }};
  for (auto _ : state) f = std::move(f).resume();
  stop = true;
  f = std::move(f).resume();
  state.counters["ns_per_switch"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * 2,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(boostFiberRoundTrip);

// Agate: start a fiber on a warm pool, run it to its end, destroy it (stack back to the pool).
void agateStartRunDestroyWarmPool(benchmark::State& state) {
  agate::StackPool pool;
  for (auto _ : state) {
    auto fiber = agate::Fiber::tryStart(pool, [] { return 1; });
    fiber->resume();
    benchmark::DoNotOptimize(fiber->result());
  }
}
BENCHMARK(agateStartRunDestroyWarmPool);

// Floor for the pool: mapping a fresh guard-paged stack each time (what pooling avoids).
void mapFreshGuardPagedStack(benchmark::State& state) {
  for (auto _ : state) {
    agate::StackPool pool(agate::StackPoolOptions{.prefault = true});
    auto stack = pool.tryAcquire();
    benchmark::DoNotOptimize(stack->base);
    pool.release(*stack);
  }
}
BENCHMARK(mapFreshGuardPagedStack);

}  // namespace

BENCHMARK_MAIN();
