// Steady-state calls allocate nothing: after a warm-up (tables, spill and response pools, the
// loop's frame arena reach their working size), awaited calls and calls in flight make no heap
// allocation at all. Links the counting operator new (support/alloc_counter.h).
#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <vector>

#include "rpc_harness.h"
#include "support/alloc_counter.h"
#include "support/steady_state.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::expectNoAllocationsInSteadyState;
using agate::testing::Watchdog;

Promise<void> awaitedCalls(RemoteCap& cap, int n, bool noPipelining = false) {
  for (int i = 0; i < n; ++i) {
    Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.initParams<Value>().setValue(static_cast<uint64_t>(i));
    if (noPipelining) req.noPipelining();
    Result<Response> r = co_await req.send();
    AGATE_CO_TRY(r);
    AGATE_ASSERT(r->results().getAs<Value>().getValue() == static_cast<uint64_t>(i), "echo");
  }
  co_return {};
}

Promise<void> callsInFlight(RemoteCap& cap, int rounds, std::vector<RemotePromise>& slots,
                            bool noPipelining = false) {
  for (int round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < slots.capacity(); ++i) {
      Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
      req.initParams<Value>().setValue(i);
      if (noPipelining) req.noPipelining();
      slots.push_back(req.send());
    }
    for (RemotePromise& p : slots) {
      Result<Response> r = co_await p;
      AGATE_CO_TRY(r);
    }
    slots.clear();
  }
  co_return {};
}

// Chains of ten calls, each pipelined on the capability the previous one returns (the server's
// own object, borrowed): the export is released after every chain and made again by the next.
Promise<void> pipelinedChains(RemoteCap& root, int chains) {
  for (int c = 0; c < chains; ++c) {
    {
      RemoteCap cap = root;
      std::optional<RemotePromise> last;
      for (int i = 0; i < 10; ++i) {
        RemotePromise p = cap.newCall(NODE_INTERFACE_ID, SELF, 0).send();
        cap = p.pipeline({0});
        if (i == 9) last.emplace(std::move(p));
      }
      Result<Response> r = co_await *last;
      AGATE_CO_TRY(r);
      AGATE_ASSERT(r->results().getAs<CapAndValue>().getValue() == 0, "chain %d", c);
    }
    // The chain's references are dropped: a call behind their Release makes sure the server
    // freed the export before the next chain makes it again.
    Request req = root.newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.initParams<Value>().setValue(1);
    AGATE_CO_TRY(co_await req.send());
  }
  co_return {};
}

class RpcAllocTest : public ::testing::Test {
 protected:
  Watchdog watchdog_{"rpc_alloc_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  Node root_{0, log_};
};

TEST_F(RpcAllocTest, AwaitedCallAllocatesNothingInSteadyState) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  ASSERT_TRUE(loop_.run(awaitedCalls(cap, 500)).ok());
  expectNoAllocationsInSteadyState(
      loop_, [&] { ASSERT_TRUE(loop_.run(awaitedCalls(cap, 2000)).ok()); }, "2000 calls");
}

TEST_F(RpcAllocTest, CallsInFlightAllocateNothingInSteadyState) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> slots;
  slots.reserve(32);
  ASSERT_TRUE(loop_.run(callsInFlight(cap, 50, slots)).ok());
  expectNoAllocationsInSteadyState(
      loop_, [&] { ASSERT_TRUE(loop_.run(callsInFlight(cap, 100, slots)).ok()); }, "3200 calls");
}

// Sent without promise pipelining: no Finish, entries freed at the Return, ids reused at once.
TEST_F(RpcAllocTest, CallsWithoutPipeliningAllocateNothingInSteadyState) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> slots;
  slots.reserve(32);
  ASSERT_TRUE(loop_.run(awaitedCalls(cap, 500, true)).ok());
  ASSERT_TRUE(loop_.run(callsInFlight(cap, 50, slots, true)).ok());
  expectNoAllocationsInSteadyState(
      loop_,
      [&] {
        ASSERT_TRUE(loop_.run(awaitedCalls(cap, 2000, true)).ok());
        ASSERT_TRUE(loop_.run(callsInFlight(cap, 100, slots, true)).ok());
      },
      "5200 calls");
  EXPECT_EQ(pair.client().stats().finishesSent, 0u);
}

TEST_F(RpcAllocTest, PipelinedChainsOnAReleasedAndReexportedObjectAllocateNothingInSteadyState) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  ASSERT_TRUE(loop_.run(pipelinedChains(cap, 50)).ok());
  expectNoAllocationsInSteadyState(
      loop_, [&] { ASSERT_TRUE(loop_.run(pipelinedChains(cap, 200)).ok()); },
      "200 chains of ten calls");
}

// Answers any call with a result of `count` references to itself, after checking that the
// params carried `count` capabilities.
class Many final : public ServerObject {
 public:
  explicit Many(uint32_t count) : count_(count) {}
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    if (ctx.capCount() != count_) return readyPromise<void>(Error(Errc::FAILED, "params"));
    Result<capnp::AnyPointer::Builder> out = ctx.initResults(8 * count_ + 64);
    if (!out) return readyPromise<void>(out.error());
    capnp::AnyList::Builder list = out->initAsAnyStruct(0, 1).getPointerSection()[0].initAsAnyList(
        capnp::ElementSize::POINTER, count_);
    for (uint32_t i = 0; i < count_; ++i) {
      Result<uint32_t> index = ctx.addResultCap(*this);
      if (!index) return readyPromise<void>(index.error());
      writeCapPointer(list, i, *index);
    }
    return readyPromise<void>(Status{});
  }

 private:
  uint32_t count_;
};

Promise<void> manyCapCalls(RemoteCap& cap, std::vector<std::unique_ptr<Node>>& objects, int n) {
  for (int c = 0; c < n; ++c) {
    Request req = cap.newCall(NODE_INTERFACE_ID, 0, 8 * objects.size() + 64);
    AGATE_CO_TRY(writeCapList(req, req.params().initAsAnyStruct(0, 1), 0, objects));
    Result<Response> r = co_await req.send();
    AGATE_CO_TRY(r);
    AGATE_ASSERT(r->capCount() == objects.size(), "call %d", c);
  }
  co_return {};
}

TEST_F(RpcAllocTest, CallsWithManyCapabilitiesEachWayAllocateNothingInSteadyState) {
  // A hundred capabilities in the params (the client's objects) and a hundred in the results: cap
  // tables in pooled blocks, messages moved to larger buffers, the decoder's scratch, all reused.
  constexpr uint32_t N = 100;
  Many many(N);
  LocalPair pair(loop_, &many);
  std::vector<std::unique_ptr<Node>> objects;
  for (uint32_t i = 0; i < N; ++i) objects.push_back(std::make_unique<Node>(i, log_));
  RemoteCap cap = pair.client().bootstrap();
  ASSERT_TRUE(loop_.run(manyCapCalls(cap, objects, 50)).ok());
  expectNoAllocationsInSteadyState(
      loop_, [&] { ASSERT_TRUE(loop_.run(manyCapCalls(cap, objects, 200)).ok()); },
      "200 calls of 100 + 100 capabilities");
}

}  // namespace
}  // namespace agate::rpc::test
