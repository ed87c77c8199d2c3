// Promise capabilities (CapPromise, senderPromise, Resolve) over LOCAL channels on one loop:
// calls on a promise before and after it resolves keep their order, whatever it resolves to (an
// object of the sender, a capability the receiver hosts, one of a third connection) or breaks
// with; connection death with promises unsettled; and capabilities carried through forwarding
// exports in params and results, with release and death of either end.
#include <gtest/gtest.h>

#include <numeric>
#include <optional>
#include <vector>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

enum PromiserMethod : uint16_t {
  PROMISE = 20,    // -> CapParam: a new CapPromise, kept in `promises`
  KEEP = 21,       // CapParam -> (): keeps the capability in `kept`
  GIVE = 22,       // -> CapParam: the capability kept by KEEP (or `given`)
  KEEP_OURS = 23,  // CapParam -> (): keeps the object of ours passed back in `ours`
  WAIT = 24,       // -> CapParam: a new Node(7), once the test fulfills the call's entry of `gates`
  ECHO_CAP = 25,   // CapParam -> CapParam: the capability passed (our own object as itself)
};

// A server that hands out promises the test settles, and keeps capabilities it is given.
class Promiser final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t interfaceId, uint16_t methodId, CallContext& ctx) override {
    if (interfaceId != NODE_INTERFACE_ID) return readyPromise<void>(Errc::UNSUPPORTED);
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
      case KEEP: {
        Status read = ctx.tryReadParams<CapParam>([&](CapParam::Reader p) {
          Result<ReceivedCap> cap = ctx.capAt(p, 0);
          if (cap) kept = cap->remote;
        });
        return readyPromise<void>(read);
      }
      case KEEP_OURS: {
        Status read = ctx.tryReadParams<CapParam>([&](CapParam::Reader p) {
          Result<ReceivedCap> cap = ctx.capAt(p, 0);
          if (cap) ours = cap->local;
        });
        return readyPromise<void>(read);
      }
      case WAIT:
        return waitForGate(ctx);
      case ECHO_CAP:
        return readyPromise<void>(echoCap(ctx));
      case GIVE: {
        Result<CapParam::Builder> out = ctx.initResultsAs<CapParam>(16);
        if (!out) return readyPromise<void>(out.error());
        Result<uint32_t> index = ctx.addResultCap(given.isNull() ? kept : given);
        if (!index) return readyPromise<void>(index.error());
        writeCapPointer(*out, 0, *index);
        return readyPromise<void>(Status{});
      }
      default:
        return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    }
  }

  std::vector<CapPromise> promises;
  RemoteCap kept;
  RemoteCap given;
  ServerObject* ours = nullptr;
  std::vector<Fulfiller<void>> gates;
  Log* log = nullptr;  // for WAIT's nodes

 private:
  Promise<void> waitForGate(CallContext& ctx) {
    auto [opened, gate] = newPromiseAndFulfiller<void>();
    gates.push_back(std::move(gate));
    AGATE_CO_TRY(co_await opened);
    Result<CapParam::Builder> out = ctx.initResultsAs<CapParam>(16);
    AGATE_CO_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(std::make_unique<Node>(7, *log));
    AGATE_CO_TRY(index);
    writeCapPointer(*out, 0, *index);
    co_return {};
  }
  static Status echoCap(CallContext& ctx) {
    Result<ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
    AGATE_TRY(ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); }));
    AGATE_TRY(cap);
    Result<CapParam::Builder> out = ctx.initResultsAs<CapParam>(16);
    AGATE_TRY(out);
    Result<uint32_t> index =
        cap->local != nullptr ? ctx.addResultCap(*cap->local) : ctx.addResultCap(cap->remote);
    AGATE_TRY(index);
    writeCapPointer(*out, 0, *index);
    return {};
  }
};

Promise<RemoteCap> capFrom(RemoteCap cap, uint16_t method) {
  Result<Response> r = co_await cap.newCall(NODE_INTERFACE_ID, method, 16).send();
  AGATE_CO_TRY(r);
  Result<ReceivedCap> got = Error(Errc::INVALID_ARGUMENT, "no cap");
  AGATE_CO_TRY(r->tryRead<CapParam>([&](CapParam::Reader p) { got = r->capAt(p, 0); }));
  AGATE_CO_TRY(got);
  co_return got->remote;
}

RemotePromise record(const RemoteCap& cap, uint64_t v) {
  Request req = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
  req.initParams<Value>().setValue(v);
  return req.send();
}

Promise<void> awaitValueless(RemotePromise p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  co_return {};
}

Promise<void> awaitAll(std::vector<RemotePromise>& calls, std::vector<Errc>& outcomes) {
  for (RemotePromise& p : calls) {
    Result<Response> r = co_await p;
    outcomes.push_back(r ? Errc::OK : r.code());
  }
  co_return {};
}

std::vector<uint64_t> upTo(uint64_t n) {
  std::vector<uint64_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

class RpcPromiseTest : public ::testing::Test {
 protected:
  // Sends `n` RECORD calls numbered from `first` on `cap`.
  void recordCalls(const RemoteCap& cap, uint64_t first, uint64_t n) {
    for (uint64_t i = first; i < first + n; ++i) calls_.push_back(record(cap, i));
  }
  // Sends KEEP with `cap` (a CapPromise, a RemoteCap or one of our objects) to `target` and
  // waits for it.
  template <class Cap>
  Status keep(const RemoteCap& target, Cap& cap) {
    Request k = target.newCall(NODE_INTERFACE_ID, KEEP, 16);
    Result<uint32_t> index = k.addCap(cap);
    if (!index) return index.error();
    writeCapPointer(k.initParams<CapParam>(), 0, *index);
    return loop_.run(awaitValueless(k.send()));
  }
  std::vector<Errc> awaitCalls() {
    std::vector<Errc> outcomes;
    EXPECT_TRUE(loop_.run(awaitAll(calls_, outcomes)).ok());
    calls_.clear();
    return outcomes;
  }

  RpcPromiseTest() { promiser_.log = &log_; }
  // Two promises from the promiser; the second passed back to it while pending (so it holds
  // the promise's node as `ours`).
  std::pair<RemoteCap, RemoteCap> twoPromisesTheSecondPassedBack(RemoteCap& boot) {
    Result<RemoteCap> first = loop_.run(capFrom(boot, PROMISE));
    Result<RemoteCap> second = loop_.run(capFrom(boot, PROMISE));
    EXPECT_TRUE(first.ok() && second.ok());
    if (!first.ok() || !second.ok()) return {};
    Request k = boot.newCall(NODE_INTERFACE_ID, KEEP_OURS, 16);
    writeCapPointer(k.initParams<CapParam>(), 0, k.addCap(*second).value());
    EXPECT_TRUE(loop_.run(awaitValueless(k.send())).ok());
    EXPECT_NE(promiser_.ours, nullptr);
    return {*first, *second};
  }

  Watchdog watchdog_{"rpc_promise_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  Promiser promiser_;
  std::vector<RemotePromise> calls_;
};

TEST_F(RpcPromiseTest, CallsOnAPromiseBeforeAndAfterItResolvesKeepTheirOrder) {
  {
    LocalPair pair(loop_, &promiser_);
    RemoteCap boot = pair.client().bootstrap();
    Result<RemoteCap> promise = loop_.run(capFrom(boot, PROMISE));
    ASSERT_TRUE(promise.ok()) << errcName(promise.code());
    recordCalls(*promise, 0, 100);
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 100; }));
    EXPECT_TRUE(log_.order.empty()) << "calls wait for the promise";

    promiser_.promises[0].resolve(std::make_unique<Node>(0, log_));
    EXPECT_EQ(log_.order, upTo(100)) << "queued calls are delivered when it resolves";
    EXPECT_TRUE(promiser_.promises[0].isEmpty());
    recordCalls(*promise, 100, 50);  // sent before the client read the Resolve: through p
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
    const uint64_t callsBefore = pair.server().stats().callsReceived;
    recordCalls(*promise, 150, 50);  // to the resolution's own export
    std::vector<Errc> outcomes = awaitCalls();
    EXPECT_EQ(outcomes, std::vector<Errc>(200, Errc::OK));
    EXPECT_EQ(log_.order, upTo(200));
    EXPECT_EQ(pair.server().stats().resolvesSent, 1u);
    EXPECT_EQ(pair.server().stats().callsReceived - callsBefore, 50u);
    EXPECT_EQ(pair.client().importCount(), 3u) << "bootstrap, the promise and its resolution";

    *promise = RemoteCap();  // drops the promise's reference and, with it, its resolution
    boot = RemoteCap();
    ASSERT_TRUE(runUntil(loop_, [&] {
      return pair.server().exportCount() == 1 && pair.server().answerCount() == 0;
    }));
    EXPECT_EQ(pair.client().importCount(), 0u);
    EXPECT_EQ(pair.client().questionCount(), 0u);
    EXPECT_EQ(log_.created, log_.destroyed) << "the resolution is freed with its exports";
  }
  EXPECT_EQ(log_.created, 1);
}

TEST_F(RpcPromiseTest, CallsPipelinedOnAnAnswerThatReturnsAPromiseWaitForThePromise) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  {
    RemotePromise answer = boot.newCall(NODE_INTERFACE_ID, PROMISE, 16).send();
    RemoteCap pipelined = answer.pipeline({0});
    recordCalls(pipelined, 0, 10);
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 10; }));
    promiser_.promises[0].resolve(std::make_unique<Node>(0, log_));
    recordCalls(pipelined, 10, 10);
    EXPECT_EQ(awaitCalls(), std::vector<Errc>(20, Errc::OK));
  }
  EXPECT_EQ(log_.order, upTo(20));
  boot = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().exportCount() == 1; }));
  EXPECT_EQ(log_.created, log_.destroyed);
}

TEST_F(RpcPromiseTest, PromiseResolvedToACapabilityTheReceiverHostsKeepsOrderWithCallsInFlight) {
  Log clientLog;
  Node clientNode(0, clientLog);
  LocalPair pair(loop_, &promiser_, &clientNode);
  RemoteCap boot = pair.client().bootstrap();
  {
    Request keep = boot.newCall(NODE_INTERFACE_ID, KEEP, 16);
    CapParam::Builder params = keep.initParams<CapParam>();
    Result<uint32_t> index = keep.addCap(clientNode);
    ASSERT_TRUE(index.ok());
    writeCapPointer(params, 0, *index);
    ASSERT_TRUE(loop_.run(awaitValueless(keep.send())).ok());
  }
  ASSERT_FALSE(promiser_.kept.isNull());
  Result<RemoteCap> promise = loop_.run(capFrom(boot, PROMISE));
  ASSERT_TRUE(promise.ok());
  recordCalls(*promise, 0, 100);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 100; }));
  promiser_.promises[0].resolve(promiser_.kept);  // the client's own object
  recordCalls(*promise, 100, 50);                 // in flight while the Resolve travels
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
  recordCalls(*promise, 150, 50);  // after: still in order behind the earlier ones
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(200, Errc::OK));
  EXPECT_EQ(clientLog.order, upTo(200));
  EXPECT_EQ(pair.client().stats().resolvesReceived, 1u);
  promiser_.kept = RemoteCap();
  *promise = RemoteCap();
  boot = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().exportCount() == 1 && pair.client().exportCount() == 1 &&
           pair.server().importCount() == 0 && pair.client().importCount() == 0;
  }));
}

TEST_F(RpcPromiseTest, RejectedPromiseFailsQueuedAndLaterCallsWithItsError) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  Result<RemoteCap> promise = loop_.run(capFrom(boot, PROMISE));
  ASSERT_TRUE(promise.ok());
  recordCalls(*promise, 0, 10);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 10; }));
  promiser_.promises[0].reject(Error(Errc::PERMISSION_DENIED, "sealed"));
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(10, Errc::PERMISSION_DENIED));
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
  const uint64_t sent = pair.client().stats().callsSent;
  recordCalls(*promise, 10, 1);
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(1, Errc::PERMISSION_DENIED));
  EXPECT_EQ(pair.client().stats().callsSent, sent) << "a broken promise fails without a Call";
  EXPECT_TRUE(log_.order.empty());
}

// The reason a broken promise import fails its calls with is its own copy: remote reasons are
// read into a ring of the connection's that later errors reuse.
TEST_F(RpcPromiseTest, ABrokenPromiseKeepsItsReasonWhateverErrorsFollow) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  Result<RemoteCap> promise = loop_.run(capFrom(boot, PROMISE));
  ASSERT_TRUE(promise.ok());
  promiser_.promises[0].reject(Error(Errc::PERMISSION_DENIED, "sealed"));
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
  for (int i = 0; i < 100; ++i) {  // more remote reasons than the ring holds
    Result<Response> r = loop_.run([](RemoteCap b) -> Promise<Response> {
      co_return co_await b.newCall(NODE_INTERFACE_ID, 99, 0).send();
    }(boot));
    ASSERT_EQ(r.code(), Errc::UNSUPPORTED);
  }
  Result<Response> r = loop_.run(
      [](RemoteCap p) -> Promise<Response> { co_return co_await record(p, 1); }(*promise));
  ASSERT_EQ(r.code(), Errc::PERMISSION_DENIED);
  EXPECT_STREQ(r.error().detail, "sealed");
}

// A promise resolved to another promise of ours that settled (passed back to us while pending)
// settles as that one did: its Resolve names the resolution, not the other promise, which the
// peer holds as a promise (it would refuse a promise resolved to a promise and end the
// connection).
TEST_F(RpcPromiseTest, APromiseResolvedToAnotherThatSettledResolvesToItsResolution) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  auto [first, second] = twoPromisesTheSecondPassedBack(boot);
  ASSERT_NE(promiser_.ours, nullptr);
  promiser_.promises[1].resolve(std::make_unique<Node>(5, log_));
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
  promiser_.promises[0].resolve(*promiser_.ours);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 2; }));
  EXPECT_TRUE(pair.client().isOpen()) << pair.client().failure().detail;
  Request req = first.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(1);
  Result<Response> r =
      loop_.run([](RemotePromise p) -> Promise<Response> { co_return co_await p; }(req.send()));
  ASSERT_TRUE(r.ok()) << errcName(r.code());
  EXPECT_EQ(r->results().getAs<Value>().getValue(), 6u);
  promiser_.ours = nullptr;
}

// The same with the other promise broken: this one breaks with its error.
TEST_F(RpcPromiseTest, APromiseResolvedToAnotherThatBrokeBreaksWithItsError) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  auto [first, second] = twoPromisesTheSecondPassedBack(boot);
  ASSERT_NE(promiser_.ours, nullptr);
  promiser_.promises[1].reject(Error(Errc::PERMISSION_DENIED, "sealed"));
  promiser_.promises[0].resolve(*promiser_.ours);
  Result<Response> r = loop_.run(
      [](RemotePromise p) -> Promise<Response> { co_return co_await p; }(record(first, 1)));
  EXPECT_EQ(r.code(), Errc::PERMISSION_DENIED);
  EXPECT_STREQ(r.error().detail, "sealed");
  EXPECT_TRUE(pair.client().isOpen()) << pair.client().failure().detail;
  EXPECT_TRUE(log_.order.empty());
  promiser_.ours = nullptr;
}

// A call queued on a promise passes the promise itself back; the resolution returns it, so the
// Return names the promise's export before the Resolve for it has gone: as senderPromise.
TEST_F(RpcPromiseTest, ASettledPromiseReturnedBeforeItsResolveIsStillNamedAPromise) {
  EventLoop& loop = loop_;
  Promiser& gate = promiser_;
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
  gate.promises[0].resolve(std::make_unique<Promiser>());  // serves the queued ECHO_CAP at once
  Status s = loop.run(awaitValueless(std::move(echoed)));
  EXPECT_TRUE(s.ok()) << errcName(s.code()) << " " << (s.ok() ? "" : s.error().detail);
  ASSERT_TRUE(runUntil(loop, [&] { return pair.client().stats().resolvesReceived == 1; }));
  EXPECT_TRUE(pair.client().isOpen()) << pair.client().failure().detail;
  EXPECT_TRUE(pair.server().isOpen()) << pair.server().failure().detail;
  *p = RemoteCap();
  boot = RemoteCap();
}

// A call made on a promise before the Resolve was read, waiting at the callee for the answer its
// params name, is not overtaken by a call made on the resolution afterwards.
TEST_F(RpcPromiseTest, ACallOnAPromiseWaitingForItsParamsIsNotOvertakenByCallsOnTheResolution) {
  EventLoop& loop = loop_;
  Log& log = log_;
  Promiser& gate = promiser_;
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
  gate.gates[0].fulfill(Status{});  // the answer x's params name returns: x, then y
  Status sx = loop.run(awaitValueless(std::move(px)));
  EXPECT_TRUE(sx.ok()) << errcName(sx.code());
  Status sy = loop.run(awaitValueless(std::move(py)));
  EXPECT_TRUE(sy.ok()) << errcName(sy.code());
  EXPECT_EQ(log.order, (std::vector<uint64_t>{1, 2})) << "E-order on p";
  (void)loop.run(awaitValueless(std::move(slow)));
  pipelined = RemoteCap();
  *p = RemoteCap();
  boot = RemoteCap();
}

TEST_F(RpcPromiseTest, DroppingAnUnsettledPromiseBreaksItWithFailed) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  Result<RemoteCap> promise = loop_.run(capFrom(boot, PROMISE));
  ASSERT_TRUE(promise.ok());
  recordCalls(*promise, 0, 3);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 3; }));
  promiser_.promises.clear();
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(3, Errc::FAILED));
}

TEST_F(RpcPromiseTest, CallCancelledWhileQueuedOnAPromiseIsNeverDelivered) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  Result<RemoteCap> promise = loop_.run(capFrom(boot, PROMISE));
  ASSERT_TRUE(promise.ok());
  recordCalls(*promise, 0, 1);
  std::optional<RemotePromise> cancelled(record(*promise, 1));
  recordCalls(*promise, 2, 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 3; }));
  cancelled.reset();  // Finish for call 1: the server cancels it in the queue
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 2; }));
  promiser_.promises[0].resolve(std::make_unique<Node>(0, log_));
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(2, Errc::OK));
  EXPECT_EQ(log_.order, (std::vector<uint64_t>{0, 2}));
}

TEST_F(RpcPromiseTest, PromisePassedInParamsQueuesTheCalleesCallsAtTheCaller) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  {
    CapPromise later = pair.client().newCapPromise();
    {
      Request keep = boot.newCall(NODE_INTERFACE_ID, KEEP, 16);
      Result<uint32_t> index = keep.addCap(later);
      ASSERT_TRUE(index.ok());
      writeCapPointer(keep.initParams<CapParam>(), 0, *index);
      ASSERT_TRUE(loop_.run(awaitValueless(keep.send())).ok());
    }
    recordCalls(promiser_.kept, 0, 5);  // the server calls the client's promise
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().promiseCallsQueued == 5; }));
    later.resolve(std::make_unique<Node>(0, log_));
    recordCalls(promiser_.kept, 5, 5);
    EXPECT_EQ(awaitCalls(), std::vector<Errc>(10, Errc::OK));
    EXPECT_EQ(log_.order, upTo(10));
    EXPECT_EQ(pair.server().stats().resolvesReceived, 1u);
  }
  promiser_.kept = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().exportCount() == 1; }));
  EXPECT_EQ(log_.created, log_.destroyed);
}

// The client's own promise, passed back to it by the server (GIVE): an object of the client's,
// ReceivedCap::local, which is the promise's node.
Promise<ServerObject*> ownPromiseBack(RemoteCap boot) {
  Result<Response> r = co_await boot.newCall(NODE_INTERFACE_ID, GIVE, 16).send();
  AGATE_CO_TRY(r);
  Result<ReceivedCap> got = r->getCap(0);
  AGATE_CO_TRY(got);
  if (got->local == nullptr) co_return Error(Errc::FAILED, "not passed back as our own object");
  co_return got->local;
}

// A pending promise that comes back as an object (ReceivedCap::local) and is passed on again is
// still a promise: the peer queues its calls at us until it settles (it used to be written
// senderHosted while pending, which the peer refuses as PROTOCOL_ERROR).
TEST_F(RpcPromiseTest, APendingPromisePassedBackAndPassedOnAgainStaysAPromise) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  CapPromise later = pair.client().newCapPromise();
  ASSERT_TRUE(keep(boot, later).ok());
  Result<ServerObject*> back = loop_.run(ownPromiseBack(boot));
  ASSERT_TRUE(back.ok()) << errcName(back.code());
  ASSERT_TRUE(keep(boot, **back).ok());  // passed on again, as an object, while the server holds it
  ASSERT_TRUE(pair.server().isOpen());
  ASSERT_TRUE(pair.client().isOpen());
  recordCalls(promiser_.kept, 0, 3);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().promiseCallsQueued == 3; }));
  later.resolve(std::make_unique<Node>(0, log_));
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(3, Errc::OK));
  EXPECT_EQ(log_.order, upTo(3));
  promiser_.kept = RemoteCap();
}

// On another connection that promise cannot queue calls (its export lives on the first): passing
// it there while pending fails the call INVALID_ARGUMENT, exports nothing, and both connections
// carry on. Once settled, it goes as the object it forwards to.
TEST_F(RpcPromiseTest, APendingPromiseOfAnotherConnectionCannotBePassedOn) {
  LocalPair pair(loop_, &promiser_);
  Promiser other;
  LocalPair pair2(loop_, &other);
  RemoteCap boot = pair.client().bootstrap();
  CapPromise later = pair.client().newCapPromise();
  ASSERT_TRUE(keep(boot, later).ok());
  Result<ServerObject*> back = loop_.run(ownPromiseBack(boot));
  ASSERT_TRUE(back.ok()) << errcName(back.code());
  const size_t exportsBefore = pair2.client().exportCount();
  RemoteCap otherBoot = pair2.client().bootstrap();
  auto keepOnOther = [&] { return keep(otherBoot, **back); };
  EXPECT_EQ(keepOnOther().code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(pair2.client().exportCount(), exportsBefore) << "nothing stays exported";
  EXPECT_TRUE(other.kept.isNull());
  EXPECT_TRUE(pair2.client().isOpen());
  EXPECT_TRUE(pair.client().isOpen());
  later.resolve(std::make_unique<Node>(0, log_));
  ASSERT_TRUE(keepOnOther().ok());
  recordCalls(other.kept, 7, 1);
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(1, Errc::OK));
  EXPECT_EQ(log_.order, std::vector<uint64_t>{7});
  other.kept = RemoteCap();
  promiser_.kept = RemoteCap();
}

// Resolving a promise to a pending promise (here itself, passed back) is refused: the promise
// breaks with INVALID_ARGUMENT, and calls queued on it fail with that, instead of looping.
TEST_F(RpcPromiseTest, APromiseResolvedToItselfBreaksWithInvalidArgument) {
  LocalPair pair(loop_, &promiser_);
  RemoteCap boot = pair.client().bootstrap();
  CapPromise later = pair.client().newCapPromise();
  ASSERT_TRUE(keep(boot, later).ok());
  Result<ServerObject*> back = loop_.run(ownPromiseBack(boot));
  ASSERT_TRUE(back.ok()) << errcName(back.code());
  recordCalls(promiser_.kept, 0, 2);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().promiseCallsQueued == 2; }));
  later.resolve(**back);
  EXPECT_TRUE(later.isEmpty());
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(2, Errc::INVALID_ARGUMENT));
  recordCalls(promiser_.kept, 2, 1);
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(1, Errc::INVALID_ARGUMENT));
  EXPECT_TRUE(pair.client().isOpen());
  EXPECT_TRUE(log_.order.empty());
  promiser_.kept = RemoteCap();
}

TEST_F(RpcPromiseTest, PromiseSettledBeforeItsMessageIsSentGoesAsItsResolution) {
  LocalPair pair(loop_, &promiser_);
  CapPromise early = pair.server().newCapPromise();
  early.resolve(std::make_unique<Node>(0, log_));
  EXPECT_TRUE(early.isEmpty());
  CapPromise other = pair.client().newCapPromise();
  {
    Request s = pair.client().bootstrap().newCall(NODE_INTERFACE_ID, KEEP, 16);
    EXPECT_EQ(s.addCap(early).code(), Errc::INVALID_ARGUMENT) << "a settled CapPromise is spent";
    CapPromise foreign = pair.server().newCapPromise();
    EXPECT_EQ(s.addCap(foreign).code(), Errc::INVALID_ARGUMENT) << "of another connection";
    // Added while pending, settled before send(): written as a plain export of the resolution.
    Result<uint32_t> index = s.addCap(other);
    ASSERT_TRUE(index.ok());
    other.resolve(std::make_unique<Node>(0, log_));
    writeCapPointer(s.initParams<CapParam>(), 0, *index);
    EXPECT_TRUE(loop_.run(awaitValueless(s.send())).ok());
  }
  EXPECT_EQ(pair.server().stats().resolvesReceived, 0u);
  EXPECT_EQ(pair.client().stats().resolvesSent, 0u);
  recordCalls(promiser_.kept, 42, 1);  // the server calls the resolution, through the export
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(1, Errc::OK));
  EXPECT_EQ(log_.order, std::vector<uint64_t>{42});
  promiser_.kept = RemoteCap();
}

TEST_F(RpcPromiseTest, ConnectionDeathWithPromisesUnsettledFailsCallsDisconnectedAndLeaksNothing) {
  {
    LocalPair pair(loop_, &promiser_);
    RemoteCap boot = pair.client().bootstrap();
    Result<RemoteCap> a = loop_.run(capFrom(boot, PROMISE));
    Result<RemoteCap> b = loop_.run(capFrom(boot, PROMISE));
    ASSERT_TRUE(a.ok() && b.ok());
    recordCalls(*a, 0, 5);
    recordCalls(*b, 5, 5);
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 10; }));
    pair.server().close(Error(Errc::DISCONNECTED, "server going away"));
    EXPECT_EQ(awaitCalls(), std::vector<Errc>(10, Errc::DISCONNECTED));
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 0; }));
    EXPECT_EQ(pair.server().exportCount(), 0u);
    // Settling after the death delivers nothing and sends nothing.
    promiser_.promises[0].resolve(std::make_unique<Node>(0, log_));
    promiser_.promises.clear();
    EXPECT_TRUE(log_.order.empty());
    EXPECT_EQ(pair.server().stats().resolvesSent, 0u);
    recordCalls(*a, 10, 1);
    EXPECT_EQ(awaitCalls(), std::vector<Errc>(1, Errc::DISCONNECTED));
  }
  EXPECT_EQ(log_.created, log_.destroyed);
}

TEST_F(RpcPromiseTest, PromiseResolvedToACapabilityOfAnotherConnectionForwardsInOrder) {
  Log farLog;
  Node far(0, farLog);
  LocalPair toFar(loop_, &far);
  {
    LocalPair pair(loop_, &promiser_);
    RemoteCap boot = pair.client().bootstrap();
    Result<RemoteCap> promise = loop_.run(capFrom(boot, PROMISE));
    ASSERT_TRUE(promise.ok());
    recordCalls(*promise, 0, 50);
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 50; }));
    promiser_.promises[0].resolve(toFar.client().bootstrap());
    recordCalls(*promise, 50, 25);
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
    recordCalls(*promise, 75, 25);
    EXPECT_EQ(awaitCalls(), std::vector<Errc>(100, Errc::OK));
    EXPECT_EQ(farLog.order, upTo(100));
    *promise = RemoteCap();
    boot = RemoteCap();
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().exportCount() == 1; }));
    EXPECT_EQ(toFar.client().importCount(), 0u) << "the proxy's import is released with it";
  }
}

// --- forwarding exports carry capabilities ---------------------------------------------------

// Vat V (the middle) holds A's bootstrap on its connection to A and hands it to client C in
// results: without a VatNetwork it goes as a proxy (a forwarding export of V).
class ForwardingTest : public RpcPromiseTest {
 protected:
  ForwardingTest() {
    toA_ = std::make_unique<LocalPair>(loop_, &a_);
    promiser_.given = toA_->client().bootstrap();
    toC_ = std::make_unique<LocalPair>(loop_, &promiser_, &c_);
  }
  ~ForwardingTest() override {
    toC_.reset();
    promiser_.given = RemoteCap();
    toA_.reset();
  }
  RemoteCap proxy() {
    Result<RemoteCap> cap = loop_.run(capFrom(toC_->client().bootstrap(), GIVE));
    EXPECT_TRUE(cap.ok());
    return cap ? *cap : RemoteCap();
  }

  Log aLog_, cLog_;
  Node a_{0, aLog_};
  Node c_{7, cLog_};
  std::unique_ptr<LocalPair> toA_;  // V (client) -> A (server)
  std::unique_ptr<LocalPair> toC_;  // C (client) -> V (server)
};

Promise<uint64_t> callBackThrough(RemoteCap target, ServerObject& mine) {
  Request req = target.newCall(NODE_INTERFACE_ID, CALL_BACK, 16);
  CapParam::Builder params = req.initParams<CapParam>();
  Result<uint32_t> index = req.addCap(mine);
  AGATE_CO_TRY(index);
  writeCapPointer(params, 0, *index);
  Result<Response> r = co_await req.send();
  AGATE_CO_TRY(r);
  co_return r->results().getAs<Value>().getValue();
}

TEST_F(ForwardingTest, CapabilityInParamsIsCarriedThroughAProxy) {
  RemoteCap p = proxy();
  Result<uint64_t> v = loop_.run(callBackThrough(p, c_));
  ASSERT_TRUE(v.ok()) << errcName(v.code()) << " " << (v.error().detail ? v.error().detail : "");
  EXPECT_EQ(*v, 5u + 7u + 100u) << "A called C's node back through two proxies of V";
  p = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] {
    return toC_->server().exportCount() == 1 && toA_->server().importCount() == 0 &&
           toA_->client().exportCount() == 1 && toC_->client().exportCount() == 1;
  })) << "V's proxies and their imports are released";
}

// CALL_BACK_ALL through `target` with params {list of [c, d]} (nested: {list of structs, each
// {list of one cap}}): the host calls each capability back, through the proxies.
Promise<uint64_t> callBackAllThrough(RemoteCap target, ServerObject& c, ServerObject& d,
                                     bool nested) {
  Request req = target.newCall(NODE_INTERFACE_ID, CALL_BACK_ALL, 256);
  capnp::AnyStruct::Builder params = req.params().initAsAnyStruct(0, 1);
  ServerObject* objects[] = {&c, &d};
  if (nested) {
    capnp::List<capnp::AnyStruct>::Builder holders =
        params.getPointerSection()[0].initAsListOfAnyStruct(0, 1, 2);
    for (uint32_t i = 0; i < 2; ++i) {
      capnp::AnyList::Builder one =
          holders[i].getPointerSection()[0].initAsAnyList(capnp::ElementSize::POINTER, 1);
      Result<uint32_t> index = req.addCap(*objects[i]);
      AGATE_CO_TRY(index);
      writeCapPointer(one, 0, *index);
    }
  } else {
    AGATE_CO_TRY(writeCapList(req, params, 0, objects));
  }
  Result<Response> r = co_await req.send();
  AGATE_CO_TRY(r);
  co_return r->results().getAs<Value>().getValue();
}

TEST_F(ForwardingTest, ListsOfCapabilitiesInParamsAreCarriedThroughAProxy) {
  Node d(20, cLog_);
  for (bool nested : {false, true}) {
    SCOPED_TRACE(nested ? "a list of structs holding lists of capabilities" : "a flat list");
    RemoteCap p = proxy();
    Result<uint64_t> v = loop_.run(callBackAllThrough(p, c_, d, nested));
    ASSERT_TRUE(v.ok()) << errcName(v.code()) << " " << (v.error().detail ? v.error().detail : "");
    EXPECT_EQ(*v, (5u + 7u) + (5u + 20u)) << "A called both of C's nodes back through V";
    p = RemoteCap();
    ASSERT_TRUE(runUntil(loop_, [&] {
      return toC_->server().exportCount() == 1 && toA_->server().importCount() == 0 &&
             toC_->client().exportCount() == 1;
    })) << "V's proxies and their imports are released";
  }
}

// CALL_BACK_ALL through `target` with params {list of `objects`}.
Promise<uint64_t> callBackListThrough(RemoteCap target, const std::vector<ServerObject*>& objects) {
  Request req = target.newCall(NODE_INTERFACE_ID, CALL_BACK_ALL, 8 * objects.size() + 64);
  AGATE_CO_TRY(writeCapList(req, req.params().initAsAnyStruct(0, 1), 0, objects));
  Result<Response> r = co_await req.send();
  AGATE_CO_TRY(r);
  co_return r->results().getAs<Value>().getValue();
}

TEST_F(ForwardingTest, AListOfFortyCapabilitiesIsCarriedThroughAProxy) {
  // V copies the call with its forty capabilities onto its connection to A (each one a proxy of
  // C's object), past the entries a call keeps inline and the room its frame reserves for them.
  std::vector<std::unique_ptr<Node>> nodes;
  std::vector<ServerObject*> objects;
  uint64_t expected = 0;
  for (uint32_t i = 0; i < 40; ++i) {
    nodes.push_back(std::make_unique<Node>(i, cLog_));
    objects.push_back(nodes.back().get());
    expected += 5 + i;
  }
  RemoteCap p = proxy();
  Result<uint64_t> v = loop_.run(callBackListThrough(p, objects));
  ASSERT_TRUE(v.ok()) << errcName(v.code()) << " " << (v.error().detail ? v.error().detail : "");
  EXPECT_EQ(*v, expected) << "A called each of C's forty nodes back through V";
  p = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] {
    return toC_->server().exportCount() == 1 && toA_->server().importCount() == 0 &&
           toC_->client().exportCount() == 1 && toA_->client().exportCount() == 1;
  })) << "V's proxies and their imports are released";
}

Promise<uint64_t> echoOnNext(RemoteCap target) {
  Result<Response> r = co_await target.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
  AGATE_CO_TRY(r);
  Result<ReceivedCap> next = Error(Errc::INVALID_ARGUMENT, "no cap");
  AGATE_CO_TRY(r->tryRead<CapAndValue>([&](CapAndValue::Reader x) { next = r->capAt(x, 0); }));
  AGATE_CO_TRY(next);
  RemoteCap child = next->remote;
  Request req = child.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(10);
  Result<Response> e = co_await req.send();
  AGATE_CO_TRY(e);
  co_return e->results().getAs<Value>().getValue();
}

TEST_F(ForwardingTest, CapabilityInResultsIsCarriedThroughAProxyAndReleasedWithIt) {
  RemoteCap p = proxy();
  Result<uint64_t> v = loop_.run(echoOnNext(p));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 11u) << "A's child node (value 1) answered through V's proxy";
  p = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] {
    return toC_->server().exportCount() == 1 && toA_->server().exportCount() == 1;
  }));
  EXPECT_EQ(aLog_.created, 2);
  EXPECT_EQ(aLog_.destroyed, 1) << "A's child is freed once C and V let go";
}

TEST_F(ForwardingTest, UpstreamDeathBreaksTheProxyWithDisconnected) {
  RemoteCap p = proxy();
  Result<uint64_t> v = loop_.run(echoOnNext(p));
  ASSERT_TRUE(v.ok());
  toA_->server().close(Error(Errc::DISCONNECTED, "A went away"));
  ASSERT_TRUE(runUntil(loop_, [&] { return !toA_->client().isOpen(); }));
  recordCalls(p, 0, 2);
  EXPECT_EQ(awaitCalls(), std::vector<Errc>(2, Errc::DISCONNECTED));
  p = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] { return toC_->server().exportCount() == 1; }));
}

TEST_F(ForwardingTest, DownstreamDeathReleasesTheProxysImports) {
  RemoteCap p = proxy();
  Result<uint64_t> v = loop_.run(callBackThrough(p, c_));
  ASSERT_TRUE(v.ok());
  p = RemoteCap();
  toC_->server().close(Error(Errc::DISCONNECTED, "C went away"));
  ASSERT_TRUE(runUntil(loop_, [&] { return toA_->server().importCount() == 0; }));
  EXPECT_EQ(toA_->client().exportCount(), 1u);
  EXPECT_EQ(toA_->client().importCount(), 1u) << "only V's own reference to A's bootstrap";
}

// --- errors that come from another connection --------------------------------------------------

// Fails every call with `text`: an upstream whose errors a proxy relays.
class Failer final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext&) override {
    return readyPromise<void>(Error(Errc::FAILED, text));
  }
  const char* text = "first upstream error";
};

Promise<std::string> failureText(RemoteCap cap) {
  Result<Response> r = co_await cap.newCall(NODE_INTERFACE_ID, ECHO, 16).send();
  if (r) co_return std::string("(no error)");
  co_return std::string(r.error().detail);
}

// A fails a ring's worth of calls with another text (another caller's, which V's connection to
// A copies into the slots of its ring of reasons), then V's connection to A goes (ASan: nothing
// reads it afterwards).
void churnAndDropUpstream(EventLoop& loop, Failer& a, std::unique_ptr<LocalPair>& toA) {
  a.text = "another caller's error";
  RemoteCap direct = toA->client().bootstrap();
  for (size_t i = 0; i < RpcConnection::REMOTE_REASON_SLOTS; ++i)
    ASSERT_EQ(loop.run(failureText(direct)).value(), "another caller's error");
  direct = RemoteCap();
  ASSERT_TRUE(runUntil(loop, [&] { return toA->client().handleCount() == 0; }));
  toA.reset();
}

TEST_F(RpcPromiseTest, AnAnswerFailedWithAnUpstreamErrorKeepsItsOwnCopyOfTheText) {
  Failer a;
  auto toA = std::make_unique<LocalPair>(loop_, &a);
  promiser_.given = toA->client().bootstrap();
  LocalPair toC(loop_, &promiser_);
  Result<RemoteCap> proxy = loop_.run(capFrom(toC.client().bootstrap(), GIVE));
  ASSERT_TRUE(proxy.ok());
  promiser_.given = RemoteCap();
  // C calls through V's proxy and keeps a capability pipelined on the call, so V keeps the
  // answer, failed with A's error, for the calls made on it.
  RemotePromise failed = proxy->newCall(NODE_INTERFACE_ID, ECHO, 16).send();
  RemoteCap pipelined = failed.pipeline({});
  { RemotePromise drop = std::move(failed); }
  ASSERT_TRUE(runUntil(loop_, [&] { return toC.client().stats().returnsReceived >= 2; }));
  *proxy = RemoteCap();
  EXPECT_EQ(loop_.run(failureText(pipelined)).value(), "first upstream error");
  churnAndDropUpstream(loop_, a, toA);
  EXPECT_EQ(loop_.run(failureText(pipelined)).value(), "first upstream error");
  pipelined = RemoteCap();
}

TEST_F(RpcPromiseTest, APromiseRejectedWithAnUpstreamErrorKeepsItsOwnCopyOfTheText) {
  Failer a;
  auto toA = std::make_unique<LocalPair>(loop_, &a);
  LocalPair toC(loop_, &promiser_);
  Result<RemoteCap> promised = loop_.run(capFrom(toC.client().bootstrap(), PROMISE));
  ASSERT_TRUE(promised.ok());
  Status upstream = loop_.run(
      awaitValueless(toA->client().bootstrap().newCall(NODE_INTERFACE_ID, ECHO, 16).send()));
  ASSERT_EQ(upstream.code(), Errc::FAILED);
  // C's call is on its way to V's promise when V rejects it with A's error, as it came, and
  // V's connection to A goes before V reads the call (ASan: the promise reads nothing of it).
  RemotePromise inFlight = promised->newCall(NODE_INTERFACE_ID, ECHO, 16).send();
  promiser_.promises.at(0).reject(upstream.error());
  toA.reset();
  Status failed = loop_.run(awaitValueless(std::move(inFlight)));
  ASSERT_EQ(failed.code(), Errc::FAILED);
  EXPECT_STREQ(failed.error().detail, "first upstream error");
  EXPECT_EQ(loop_.run(failureText(*promised)).value(), "first upstream error");
  *promised = RemoteCap();
}

}  // namespace
}  // namespace agate::rpc::test
