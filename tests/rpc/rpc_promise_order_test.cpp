// Promises of ours settled while the peer still knew them as promises: a settled promise
// passed back is still named senderPromise until its Resolve goes (else the peer reads a pending
// promise sent as a plain capability, and aborts), and a call made on a promise before the peer
// read its Resolve keeps E-order with the calls it makes on the resolution afterwards, even when
// it must wait for an answer its params name.
#include <gtest/gtest.h>

#include <optional>
#include <vector>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

enum GateMethod : uint16_t { PROMISE = 20, WAIT = 21, ECHO_CAP = 22 };

// ECHO_CAP: CapParam -> CapParam, the same capability back (as a local object when it is ours).
class Echoer final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    if (methodId != ECHO_CAP) return readyPromise<void>(Errc::UNSUPPORTED);
    Result<ReceivedCap> cap = Error(Errc::FAILED, "none");
    Status read = ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); });
    if (!read) return readyPromise<void>(read);
    if (!cap) return readyPromise<void>(cap.error());
    Result<CapParam::Builder> out = ctx.initResultsAs<CapParam>(16);
    if (!out) return readyPromise<void>(out.error());
    Result<uint32_t> index =
        cap->local != nullptr ? ctx.addResultCap(*cap->local) : ctx.addResultCap(cap->remote);
    if (!index) return readyPromise<void>(index.error());
    writeCapPointer(*out, 0, *index);
    ++echoed;
    return readyPromise<void>(Status{});
  }
  int echoed = 0;
};

class Gate final : public ServerObject {
 public:
  explicit Gate(Log& log) : log_(log) {}
  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    switch (methodId) {
      case PROMISE: {
        Result<CapParam::Builder> out = ctx.initResultsAs<CapParam>(16);
        if (!out) return readyPromise<void>(out.error());
        promises.push_back(ctx.connection().newCapPromise());
        Result<uint32_t> index = ctx.addResultCap(promises.back());
        if (!index) return readyPromise<void>(index.error());
        writeCapPointer(*out, 0, *index);
        return readyPromise<void>(Status{});
      }
      case WAIT:
        return wait(ctx);
      default:
        return readyPromise<void>(Errc::UNSUPPORTED);
    }
  }
  Promise<void> wait(CallContext& ctx) {
    auto [p, f] = newPromiseAndFulfiller<int>();
    gates.push_back(std::move(f));
    Result<int> r = co_await p;
    (void)r;
    Result<CapParam::Builder> out = ctx.initResultsAs<CapParam>(16);
    AGATE_CO_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(std::make_unique<Node>(7, log_));
    AGATE_CO_TRY(index);
    writeCapPointer(*out, 0, *index);
    co_return {};
  }
  std::vector<CapPromise> promises;
  std::vector<Fulfiller<int>> gates;
  Log& log_;
};

Promise<RemoteCap> capFrom(RemoteCap cap, uint16_t method) {
  Result<Response> r = co_await cap.newCall(NODE_INTERFACE_ID, method, 16).send();
  AGATE_CO_TRY(r);
  Result<ReceivedCap> got = Error(Errc::INVALID_ARGUMENT, "no cap");
  AGATE_CO_TRY(r->tryRead<CapParam>([&](CapParam::Reader p) { got = r->capAt(p, 0); }));
  AGATE_CO_TRY(got);
  co_return got->remote;
}

Promise<void> awaitOne(RemotePromise p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  co_return {};
}

// A call queued on a promise passes the promise itself back; the resolution returns it, so the
// Return names the promise's export before the Resolve for it has gone: as senderPromise.
TEST(RpcPromiseOrderTest, ASettledPromiseReturnedBeforeItsResolveIsStillNamedAPromise) {
  Watchdog watchdog{"rpc_promise_order_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Gate gate(log);
  LocalPair pair(loop, &gate);
  RemoteCap boot = pair.client().bootstrap();
  Result<RemoteCap> p = loop.run(capFrom(boot, PROMISE));
  ASSERT_TRUE(p.ok());
  Request req = p->newCall(NODE_INTERFACE_ID, ECHO_CAP, 16);
  Result<uint32_t> index = req.addCap(*p);
  ASSERT_TRUE(index.ok());
  writeCapPointer(req.initParams<CapParam>(), 0, *index);
  RemotePromise echoed = req.send();
  ASSERT_TRUE(runUntil(loop, [&] { return pair.server().stats().promiseCallsQueued == 1; }));
  auto echoer = std::make_unique<Echoer>();
  Echoer* e = echoer.get();
  gate.promises[0].resolve(std::move(echoer));
  EXPECT_EQ(e->echoed, 1);
  Status s = loop.run(awaitOne(std::move(echoed)));
  EXPECT_TRUE(s.ok()) << errcName(s.code()) << " " << (s.ok() ? "" : s.error().detail);
  ASSERT_TRUE(runUntil(loop, [&] { return pair.client().stats().resolvesReceived == 1; }));
  EXPECT_TRUE(pair.client().isOpen()) << pair.client().failure().detail;
  EXPECT_TRUE(pair.server().isOpen()) << pair.server().failure().detail;
  *p = RemoteCap();
  boot = RemoteCap();
}

// A call made on a promise before the Resolve was read, waiting at the callee for the answer its
// params name, is not overtaken by a call made on the resolution afterwards.
TEST(RpcPromiseOrderTest, ACallOnAPromiseWaitingForItsParamsIsNotOvertakenByCallsOnTheResolution) {
  Watchdog watchdog{"rpc_promise_order_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Gate gate(log);
  LocalPair pair(loop, &gate);
  RemoteCap boot = pair.client().bootstrap();
  Result<RemoteCap> p = loop.run(capFrom(boot, PROMISE));
  ASSERT_TRUE(p.ok());
  gate.promises[0].resolve(std::make_unique<Node>(0, log));  // Resolve is on its way
  // Before the client reads it: a slow call, then a call on p naming its answer.
  RemotePromise slow = boot.newCall(NODE_INTERFACE_ID, WAIT, 16).send();
  RemoteCap pipelined = slow.pipeline({0});
  Request x = p->newCall(NODE_INTERFACE_ID, RECORD, 16);
  ASSERT_TRUE(x.addCap(pipelined).ok());
  x.initParams<Value>().setValue(1);
  RemotePromise px = x.send();
  ASSERT_TRUE(runUntil(
      loop, [&] { return pair.client().stats().resolvesReceived == 1 && gate.gates.size() == 1; }));
  Request y = p->newCall(NODE_INTERFACE_ID, RECORD, 16);  // to the resolution, directly
  y.initParams<Value>().setValue(2);
  RemotePromise py = y.send();
  ASSERT_TRUE(runUntil(loop, [&] { return pair.server().stats().callsReceived == 4; }));
  EXPECT_TRUE(log.order.empty()) << "the call on the resolution overtook the one before it";
  gate.gates[0].fulfill(1);  // the answer x's params name returns: x, then y
  Status sx = loop.run(awaitOne(std::move(px)));
  EXPECT_TRUE(sx.ok()) << errcName(sx.code());
  Status sy = loop.run(awaitOne(std::move(py)));
  EXPECT_TRUE(sy.ok()) << errcName(sy.code());
  EXPECT_EQ(log.order, (std::vector<uint64_t>{1, 2})) << "E-order on p";
  (void)loop.run(awaitOne(std::move(slow)));
  pipelined = RemoteCap();
  *p = RemoteCap();
  boot = RemoteCap();
}

}  // namespace
}  // namespace agate::rpc::test
