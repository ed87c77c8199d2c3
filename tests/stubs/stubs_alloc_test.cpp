// Typed calls through generated stubs allocate nothing in steady state, like the engine's own
// calls (tests/rpc/rpc_alloc_test.cpp): the typed layer adds a schema check and thin wrappers,
// no heap. Links the counting operator new (support/alloc_counter.h).
#include <gtest/gtest.h>

#include "rpc/rpc_harness.h"
#include "stubs_test.agate.h"
#include "support/alloc_counter.h"
#include "support/steady_state.h"
#include "support/watchdog.h"

namespace agate::rpc::typedtest {
namespace {

namespace st = agate::rpc::stubtest::stubs;
using agate::rpc::test::LocalPair;
using agate::testing::Watchdog;

class Summer final : public st::Adder::Server {
 public:
  Promise<void> add(AddContext ctx) override {
    total_ += ctx.params().getAmount();
    auto results = ctx.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setValue(total_);
    return readyPromise<void>(Status{});
  }
  Promise<void> describe(DescribeContext ctx) override {
    auto results = ctx.initResults();
    if (!results) return readyPromise<void>(results.error());
    results->setText("summer");
    return readyPromise<void>(Status{});
  }

 private:
  int64_t total_ = 0;
};

Promise<void> typedCalls(const st::Adder::Client& adder, int n) {
  for (int i = 0; i < n; ++i) {
    auto added = co_await adder.add([&](auto p) { p.setAmount(1); });
    AGATE_CO_TRY(added);
    auto described = co_await adder.describe();  // a pointer field: the schema check walks it
    AGATE_CO_TRY(described);
    AGATE_ASSERT(described->results().getText().size() == 6, "describe");
  }
  co_return {};
}

TEST(StubsAllocTest, TypedCallsAllocateNothingInSteadyState) {
  Watchdog watchdog{"stubs_alloc_test", std::chrono::seconds(50)};
  EventLoop loop;
  Summer summer;
  LocalPair pair(loop, &summer);
  st::Adder::Client adder(pair.client().bootstrap());
  ASSERT_TRUE(loop.run(typedCalls(adder, 100)).ok());
  agate::testing::expectNoAllocationsInSteadyState(
      loop, [&] { ASSERT_TRUE(loop.run(typedCalls(adder, 300)).ok()); }, "600 typed calls");
}

}  // namespace
}  // namespace agate::rpc::typedtest
