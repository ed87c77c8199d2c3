// Calls held for reply space (RpcOptions::whenReplySpaceIsFull HOLD, the default; rpc/README.md,
// "Reply space"): a call whose reply space is not free waits on the caller's side and goes out
// as Returns free the space, in the order calls were sent; later calls and calls pipelined on
// it wait behind it, a Release of its target follows it, and a Finish cancelling a call in
// flight does not wait. A held call dropped before it went sends nothing and releases its
// target; held calls on a connection that ends fail "disconnected"; the bounds that still
// refuse (maxQuestions, maxQueuedBytes, a reservation larger than the ring) refuse with state
// unchanged. A call carrying capabilities is held with its cap table unwritten (nothing
// exported) and written as it goes; one that cannot be written then fails unsent, with the held
// calls that name its answer.
#include <gtest/gtest.h>

#include <capnp/schema.capnp.h>

#include <cstring>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "agate/rpc/local_network.h"
#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

constexpr uint64_t RING = 4096;     // each direction: 4088 bytes of reply space
constexpr uint64_t PER_CALL = 128;  // RpcOptions::replyBytesPerCall
constexpr uint64_t FIT = 31;        // calls of PER_CALL the reply space holds

// How the call ended (awaited on `loop`), and the value of an ECHO's results.
struct Outcome {
  Errc code = Errc::OK;
  uint64_t value = 0;
  std::string detail;  // the error's
};
Outcome outcome(EventLoop& loop, RemotePromise& p, bool echoed = false) {
  Outcome o;
  (void)loop.run([&]() -> Promise<void> {
    Result<Response> r = co_await p;
    o.code = r.code();
    if (!r) o.detail = r.error().detail != nullptr ? r.error().detail : "";
    if (r && echoed) o.value = r->results().getAs<Value>().getValue();
    co_return {};
  }());
  return o;
}

RemotePromise record(RemoteCap& cap, uint64_t value, uint32_t reply = 0) {
  Request req = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
  req.initParams<Value>().setValue(value);
  if (reply != 0) req.reserveReply(reply);
  return req.send();
}

RemotePromise echo(RemoteCap& cap, uint64_t value) {
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(value);
  return req.send();
}

// Awaits `call` (on `loop`) and keeps the first capability of its results in `cap`.
Status firstCapOf(EventLoop& loop, RemotePromise call, std::optional<ReceivedCap>& cap) {
  return loop.run([&]() -> Promise<void> {
    Result<Response> r = co_await call;
    AGATE_CO_TRY(r);
    Result<ReceivedCap> c = r->getCap(0);
    AGATE_CO_TRY(c);
    cap.emplace(*c);
    co_return {};
  }());
}

class RpcHeldCalls : public ::testing::Test {
 protected:
  Watchdog watchdog_{"rpc_held_calls_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root{0, log};

  // hangFit, the first three calls carrying `object`: the server holds three references to it
  // (as many as a client with RpcOptions::releaseReferencesAt 2 gives).
  std::deque<RemotePromise> hangFitHolding(RemoteCap& cap, ServerObject& object) {
    std::deque<RemotePromise> hanging;
    for (uint64_t i = 0; i < FIT; ++i) {
      Request req = cap.newCall(NODE_INTERFACE_ID, HANG, 16);
      if (i < 3) writeCapPointer(req.initParams<CapParam>(), 0, req.addCap(object).value());
      hanging.push_back(req.send());
    }
    EXPECT_TRUE(runUntil(loop, [&] { return log.hanging == static_cast<int>(FIT); }));
    return hanging;
  }
  // Fills the client's reply space with FIT calls that hang in the server.
  std::deque<RemotePromise> hangFit(RemoteCap& cap) {
    std::deque<RemotePromise> hanging;
    for (uint64_t i = 0; i < FIT; ++i)
      hanging.push_back(cap.newCall(NODE_INTERFACE_ID, HANG, 16).send());
    EXPECT_TRUE(runUntil(loop, [&] { return log.hanging == static_cast<int>(FIT); }));
    return hanging;
  }
};

TEST_F(RpcHeldCalls, CallsPastTheReplySpaceWaitAndGoInTheOrderTheyWereSent) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  ASSERT_EQ(client.replyBytesAvailable() / PER_CALL, FIT);
  RemoteCap cap = client.bootstrap();
  constexpr uint64_t CALLS = 100;
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < CALLS; ++i) pending.push_back(record(cap, i));
  // Every promise is pending (none refused); the calls past the space wait here.
  for (const RemotePromise& p : pending) EXPECT_NE(p.questionId(), 0u);
  EXPECT_EQ(client.stats().callsSent, FIT);
  EXPECT_EQ(client.heldCallCount(), CALLS - FIT);
  EXPECT_EQ(client.stats().callsHeld, CALLS - FIT);
  EXPECT_EQ(client.questionCount(), CALLS);
  EXPECT_EQ(client.replyBytesReserved(), FIT * PER_CALL);
  for (RemotePromise& p : pending) EXPECT_EQ(outcome(loop, p).code, Errc::OK);
  // Served in the order sent, the reservation never past the ring.
  std::vector<uint64_t> expected(CALLS);
  for (uint64_t i = 0; i < CALLS; ++i) expected[i] = i;
  EXPECT_EQ(log.order, expected);
  EXPECT_EQ(client.heldCallCount(), 0u);
  EXPECT_EQ(client.heldMessageCount(), 0u);
  EXPECT_EQ(client.replyBytesReserved(), 0u);
  EXPECT_EQ(client.stats().callsSent, CALLS);
  EXPECT_EQ(pair.server().stats().spilledMessages, 0u) << "a Return waited for room";
  pending.clear();
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == 0; }));
}

// E-order: a call that would fit waits behind one held for lack of space.
TEST_F(RpcHeldCalls, ACallThatFitsWaitsBehindAHeldOne) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::vector<RemotePromise> pending;
  pending.push_back(record(cap, 1, 3000));
  pending.push_back(record(cap, 2, 2000));  // 3000 + 2000 > 4088: held
  pending.push_back(record(cap, 3, 16));    // would fit: held behind it
  EXPECT_EQ(client.heldCallCount(), 2u);
  EXPECT_EQ(client.replyBytesReserved(), 3000u);
  for (RemotePromise& p : pending) EXPECT_EQ(outcome(loop, p).code, Errc::OK);
  EXPECT_EQ(log.order, (std::vector<uint64_t>{1, 2, 3}));
}

TEST_F(RpcHeldCalls, CallsPipelinedOnAHeldCallWaitBehindItAndReachItsResults) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  RemotePromise next = cap.newCall(NODE_INTERFACE_ID, NEXT, 0).send();  // Node(1): held
  RemoteCap child = next.pipeline({0});
  RemotePromise onChild = echo(child, 10);  // on the held call's promised answer: held too
  EXPECT_EQ(client.heldCallCount(), 2u);
  EXPECT_EQ(pair.server().stats().callsReceived, FIT);
  hanging.pop_front();  // cancelled: its Return frees space
  const Outcome o = outcome(loop, onChild, /*echoed=*/true);
  EXPECT_EQ(o.code, Errc::OK);
  EXPECT_EQ(o.value, 11u);
  EXPECT_EQ(outcome(loop, next).code, Errc::OK);
  EXPECT_EQ(client.heldCallCount(), 0u);
  hanging.clear();
}

// Cancelling a call in flight is not held behind held calls: its Finish goes at once, and the
// Return it brings frees the space the held call waits for (held behind, it would wait for ever).
TEST_F(RpcHeldCalls, CancellingACallInFlightFreesSpaceForTheHeldOnes) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  RemotePromise held = record(cap, 7);
  ASSERT_EQ(client.heldCallCount(), 1u);
  const uint64_t finishes = client.stats().finishesSent;
  hanging.pop_back();
  EXPECT_EQ(client.stats().finishesSent, finishes + 1);
  EXPECT_EQ(client.heldMessageCount(), 1u) << "the Finish was held";
  EXPECT_EQ(outcome(loop, held).code, Errc::OK);
  EXPECT_EQ(log.order, (std::vector<uint64_t>{7}));
  EXPECT_EQ(log.cancelled, 1);
  EXPECT_EQ(client.heldMessageCount(), 0u);
  hanging.clear();
  EXPECT_TRUE(runUntil(loop, [&] { return log.hanging == 0 && client.questionCount() == 1; }));
}

TEST_F(RpcHeldCalls, ADroppedHeldCallIsNeverSentAndReleasesItsTarget) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  RemotePromise next = cap.newCall(NODE_INTERFACE_ID, NEXT, 0).send();
  ASSERT_EQ(outcome(loop, next).code, Errc::OK);
  std::optional<RemoteCap> child(next.pipeline({0}));  // Node(1), made by the server
  { RemotePromise done = std::move(next); }
  std::deque<RemotePromise> hanging = hangFit(cap);
  const uint32_t questions = client.questionCount();
  std::optional<RemotePromise> dropped(record(*child, 9));
  RemotePromise behind = record(cap, 8);
  EXPECT_EQ(client.heldCallCount(), 2u);
  EXPECT_EQ(client.questionCount(), questions + 2);
  child.reset();  // the held call still holds its target: nothing is released yet
  EXPECT_EQ(log.destroyed, 0);
  dropped.reset();
  EXPECT_EQ(client.heldCallCount(), 1u);
  EXPECT_EQ(client.stats().callsCancelledHeld, 1u);
  EXPECT_EQ(client.questionCount(), questions + 1) << "its question is free at once";
  // Its target goes: the server drops the child when the Release arrives.
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; }));
  hanging.clear();
  EXPECT_EQ(outcome(loop, behind).code, Errc::OK);
  EXPECT_EQ(log.order, (std::vector<uint64_t>{8})) << "the dropped call was sent";
}

// The connection ends inside a drop: the dropped held call's Release finds the receiver gone,
// and in the failure a promise waiting on a second held call's answer lets go of it: its
// question is freed too (it is no longer held by then). Nothing is left.
TEST_F(RpcHeldCalls, AHeldCallLetGoAsTheConnectionFailsInsideADropIsFreed) {
  // Two connections of one vat on one network (to vats 1 and 2), so that a capability pipelined
  // on a call to vat 1, passed to vat 2, waits on that call's answer.
  LocalNetwork net(loop);
  VatNetwork& network = net.addVat(3, nullptr);
  LocalPair pair(loop, RpcOptions{.bootstrap = &root},
                 RpcOptions{.network = &network, .peerVat = 1}, RING);
  LocalPair other(loop, RpcOptions{}, RpcOptions{.network = &network, .peerVat = 2}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::optional<RemoteCap> child;  // an import: its last reference going sends Release at once
  (void)loop.run([&]() -> Promise<void> {
    Result<Response> r = co_await cap.newCall(NODE_INTERFACE_ID, NEXT, 0).send();
    AGATE_CO_TRY(r);
    Result<ReceivedCap> got = r->getCap(0);
    AGATE_CO_TRY(got);
    child.emplace(got->remote);
    co_return {};
  }());
  ASSERT_TRUE(child.has_value());
  std::deque<RemotePromise> hanging = hangFit(cap);
  std::optional<RemotePromise> dropped(record(*child, 9));  // held: the child's last reference
  child.reset();
  std::optional<RemotePromise> watched(cap.newCall(NODE_INTERFACE_ID, NEXT, 0).send());  // held
  // A request to vat 2 carrying the pipelined capability: a promise that waits on its answer.
  std::optional<Request> passing(other.client().bootstrap().newCall(NODE_INTERFACE_ID, ECHO, 64));
  ASSERT_TRUE(passing->addCap(watched->pipeline({0})).ok());
  watched.reset();
  ASSERT_EQ(client.heldCallCount(), 2u);
  ASSERT_EQ(client.questionCount(), FIT + 2);
  pair.serverReceiver().receiver().detach();  // the Release cannot be sent
  dropped.reset();
  EXPECT_FALSE(client.isOpen());
  EXPECT_EQ(client.heldCallCount(), 0u);
  EXPECT_EQ(client.heldMessageCount(), 0u);
  for (RemotePromise& p : hanging) EXPECT_EQ(outcome(loop, p).code, Errc::DISCONNECTED);
  hanging.clear();
  passing.reset();
  cap = RemoteCap();
  EXPECT_EQ(client.questionCount(), 0u) << "a question leaked";
  EXPECT_EQ(client.handleCount(), 0u);
}

// A held call keeps its target referenced: the Release of a reference dropped meanwhile follows
// the Call, which reaches the object.
TEST_F(RpcHeldCalls, AReleaseOfAHeldCallsTargetFollowsTheCall) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  std::optional<RemotePromise> next(cap.newCall(NODE_INTERFACE_ID, NEXT, 0).send());  // held
  std::optional<RemoteCap> child(next->pipeline({0}));
  RemotePromise onChild = echo(*child, 10);  // held behind it
  child.reset();
  next.reset();  // only the held call on the child keeps the question
  ASSERT_EQ(client.heldCallCount(), 2u);
  hanging.pop_front();  // frees space: both go
  const Outcome o = outcome(loop, onChild, /*echoed=*/true);
  EXPECT_EQ(o.code, Errc::OK);
  EXPECT_EQ(o.value, 11u);
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; })) << "the child was not released";
  hanging.clear();
}

// The client's object that gives back whatever capability it was handed (`given`).
class Giver final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override { return give(ctx); }
  RemoteCap given;
  std::function<void()> beforeReturn;  // runs once `given` is in the results

 private:
  Promise<void> give(CallContext& ctx) {
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_CO_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(given);
    AGATE_CO_TRY(index);
    writeCapPointer(*out, 0, *index);
    if (beforeReturn) beforeReturn();
    co_return {};
  }
};

// While calls on the server's object are held, the client returns that object to the server: as
// a proxy, not as the server's own object (which the server would call at once, ahead of the
// held calls). The server's call through the proxy reaches the object after them. What counts is
// whether calls are held as the Return goes, not as the object was added to the results.
TEST_F(RpcHeldCalls, AnObjectReturnedToItsHostWhileCallsOnItAreHeldGoesAsAProxy) {
  Giver giver;
  LocalPair pair(loop, &root, &giver, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  enum class Held { NEVER, BEFORE_ADDING, AFTER_ADDING };
  for (Held when : {Held::NEVER, Held::BEFORE_ADDING, Held::AFTER_ADDING}) {
    SCOPED_TRACE(static_cast<int>(when));
    log.order.clear();
    std::deque<RemotePromise> hanging;
    std::optional<RemotePromise> held;
    auto holdOne = [&] {  // fills the reply space (sent, not yet served), then one call is held
      for (uint64_t i = 0; i < FIT; ++i)
        hanging.push_back(cap.newCall(NODE_INTERFACE_ID, HANG, 16).send());
      held.emplace(record(cap, 1));
      EXPECT_EQ(client.heldCallCount(), 1u);
    };
    if (when == Held::BEFORE_ADDING) holdOne();
    if (when == Held::AFTER_ADDING) giver.beforeReturn = holdOne;
    giver.given = cap;
    std::optional<ReceivedCap> got;
    Status called =
        firstCapOf(loop, pair.server().bootstrap().newCall(NODE_INTERFACE_ID, NEXT, 0).send(), got);
    ASSERT_TRUE(called.ok()) << errcName(called.code());
    giver.given = RemoteCap();
    giver.beforeReturn = nullptr;
    if (when == Held::NEVER) {
      EXPECT_EQ(got->local, &root) << "its own object, called directly";
      continue;
    }
    ASSERT_EQ(got->local, nullptr) << "its own object: called ahead of the held call";
    const size_t exports = client.exportCount();  // the giver and the proxy
    RemotePromise through = record(got->remote, 2);
    ASSERT_TRUE(runUntil(loop, [&] { return log.hanging == static_cast<int>(FIT); }));
    hanging.clear();
    EXPECT_EQ(outcome(loop, *held).code, Errc::OK);
    EXPECT_EQ(outcome(loop, through).code, Errc::OK);
    EXPECT_EQ(log.order, (std::vector<uint64_t>{1, 2}));
    got.reset();
    EXPECT_TRUE(runUntil(loop, [&] { return client.exportCount() == exports - 1; }))
        << "the proxy was not released";
  }
}

// A call carrying capabilities is held like any other, its cap table written as it goes: while
// held nothing is exported (the peer cannot name what it has not been sent); dropped, it exports
// nothing and its objects go; sent, the server gets each as it should (ours to call back, its own
// object as its own, forty of ours past the entries a frame reserves room for).
TEST_F(RpcHeldCalls, ACallCarryingCapabilitiesIsHeldAndExportsThemOnlyAsItGoes) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  const uint32_t exports = client.exportCount();
  Log mine;
  auto withCap = [&](uint16_t method, auto&& add) {
    Request req = cap.newCall(NODE_INTERFACE_ID, method, 16);
    CapParam::Builder param = req.initParams<CapParam>();
    Result<uint32_t> index = add(req);
    EXPECT_TRUE(index.ok());
    writeCapPointer(param, 0, *index);
    return req.send();
  };
  RemotePromise calledBack = withCap(CALL_BACK, [&](Request& r) {
    return r.addCap(std::make_unique<Node>(7, mine));  // ECHO(5) on it: 12, +100
  });
  std::optional<RemotePromise> dropped(
      withCap(IDENTIFY, [&](Request& r) { return r.addCap(std::make_unique<Node>(9, mine)); }));
  RemotePromise own = withCap(IDENTIFY, [&](Request& r) { return r.addCap(cap); });
  std::vector<std::unique_ptr<Node>> nodes;
  std::vector<ServerObject*> objects;
  uint64_t expected = 0;
  for (uint32_t i = 0; i < 40; ++i) {
    nodes.push_back(std::make_unique<Node>(i, mine));
    objects.push_back(nodes.back().get());
    expected += 5 + i;
  }
  Request many = cap.newCall(NODE_INTERFACE_ID, CALL_BACK_ALL, 8 * 40 + 64);
  ASSERT_TRUE(writeCapList(many, many.params().initAsAnyStruct(0, 1), 0, objects).ok());
  RemotePromise all = many.send();
  EXPECT_EQ(client.heldCallCount(), 4u);
  EXPECT_EQ(client.exportCount(), exports) << "exported before the Call went";
  EXPECT_EQ(client.stats().callsHeld, 4u);
  dropped.reset();
  EXPECT_EQ(client.heldCallCount(), 3u);
  EXPECT_EQ(mine.destroyed, 1) << "the dropped call's object was kept";
  EXPECT_EQ(client.exportCount(), exports);
  hanging.clear();
  const Outcome a = outcome(loop, calledBack, /*echoed=*/true);
  EXPECT_EQ(a.code, Errc::OK) << a.detail;
  EXPECT_EQ(a.value, 112u);
  const Outcome b = outcome(loop, own, /*echoed=*/true);
  EXPECT_EQ(b.code, Errc::OK) << b.detail;
  EXPECT_EQ(b.value, 1u) << "the server did not get its own object back as its own";
  const Outcome c = outcome(loop, all, /*echoed=*/true);
  EXPECT_EQ(c.code, Errc::OK) << c.detail;
  EXPECT_EQ(c.value, expected);
  EXPECT_EQ(client.heldCallCount(), 0u);
  {  // finished: the server lets go of their params
    RemotePromise done[] = {std::move(calledBack), std::move(own), std::move(all)};
  }
  EXPECT_TRUE(runUntil(loop, [&] { return client.exportCount() == exports; }))
      << "the server's references were not released";
  EXPECT_EQ(mine.destroyed, 2) << "the called-back object is the connection's until released";
  EXPECT_EQ(client.stats().callsFailedUnsent, 0u);
}

// Gives back the capability of its params (CapParam), in CapAndValue results.
class Bouncer final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    Result<ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
    Status read = ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); });
    if (!read) return readyPromise<void>(read.error());
    if (!cap) return readyPromise<void>(cap.error());
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    if (!out) return readyPromise<void>(out.error());
    Result<uint32_t> index = ctx.addResultCap(cap->remote);
    if (!index) return readyPromise<void>(index.error());
    writeCapPointer(*out, 0, *index);
    return readyPromise<void>(Status{});
  }
};

// A pending promise of another connection cannot be passed on (its calls must queue at its own
// export): a call carrying one is refused at send(), held or not, with nothing held or sent.
TEST_F(RpcHeldCalls, ACallCarryingAnotherConnectionsPendingPromiseIsRefusedHeldOrNot) {
  Bouncer bouncer;
  LocalPair pair(loop, &root, nullptr, {}, RING);
  LocalPair other(loop, &bouncer, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  // The promise, sent to the bouncer and received back: the client's own (pending) node.
  CapPromise later = other.client().newCapPromise();
  std::optional<ReceivedCap> back;
  Request bounce = other.client().bootstrap().newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
  writeCapPointer(bounce.initParams<CapParam>(), 0, bounce.addCap(later).value());
  Status bounced = firstCapOf(loop, bounce.send(), back);
  ASSERT_TRUE(bounced.ok()) << errcName(bounced.code());
  ASSERT_NE(back->local, nullptr);
  auto passOn = [&] {
    Request req = cap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
    writeCapPointer(req.initParams<CapParam>(), 0, req.addCap(*back->local).value());
    return req.send();
  };
  for (bool holding : {false, true}) {
    SCOPED_TRACE(holding ? "held" : "not held");
    std::deque<RemotePromise> hanging;
    if (holding) hanging = hangFit(cap);
    const uint32_t questions = client.questionCount();
    const uint32_t exports = client.exportCount();
    RemotePromise refused = passOn();
    EXPECT_EQ(refused.questionId(), 0u);
    const Outcome o = outcome(loop, refused);
    EXPECT_EQ(o.code, Errc::INVALID_ARGUMENT);
    EXPECT_NE(o.detail.find("pending promise of another connection"), std::string::npos)
        << o.detail;
    EXPECT_EQ(client.heldCallCount(), 0u);
    EXPECT_EQ(client.questionCount(), questions);
    EXPECT_EQ(client.exportCount(), exports);
    EXPECT_TRUE(client.isOpen());
  }
  back.reset();
  later.reject(Error(Errc::FAILED, "not needed"));
}

// A held call whose cap table cannot be written as it goes (the peer already holds as many
// references to the object as this side counts: RpcOptions::releaseReferencesAt) fails here,
// unsent, and so do the held calls naming its answer (pipelined on it, or passing a capability
// pipelined on it): the peer never saw it. Calls behind them go; the connection carries on.
TEST_F(RpcHeldCalls, AHeldCallWhoseCapTableCannotBeWrittenFailsUnsentWithWhatNamesItsAnswer) {
  LocalPair pair(loop, RpcOptions{.bootstrap = &root}, RpcOptions{.releaseReferencesAt = 2}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  Log mine;
  Node object(1, mine);
  std::deque<RemotePromise> hanging = hangFitHolding(cap, object);
  const uint32_t questions = client.questionCount();
  Request req = cap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
  writeCapPointer(req.initParams<CapParam>(), 0, req.addCap(object).value());
  RemotePromise failing = req.send();  // held: a fourth reference is refused as it goes
  RemotePromise onIt = echo(*std::make_unique<RemoteCap>(failing.pipeline({0})), 1);
  Request passing = cap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
  writeCapPointer(passing.initParams<CapParam>(), 0, passing.addCap(failing.pipeline({0})).value());
  RemotePromise passed = passing.send();
  RemotePromise after = record(cap, 5);
  ASSERT_EQ(client.heldCallCount(), 4u);
  // Made now, sent once it failed: refused at send() (the peer never saw what they name).
  Request early = failing.pipeline({0}).newCall(NODE_INTERFACE_ID, ECHO, 0);
  Request earlyPassing = cap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);  // no frame open
  ASSERT_TRUE(earlyPassing.addCap(failing.pipeline({0})).ok());
  hanging.pop_back();  // frees the space of one call
  for (RemotePromise* p : {&failing, &onIt, &passed}) {
    const Outcome o = outcome(loop, *p);
    EXPECT_EQ(o.code, Errc::OUT_OF_MEMORY);
    EXPECT_NE(o.detail.find("releaseReferencesAt"), std::string::npos) << o.detail;
  }
  EXPECT_EQ(outcome(loop, after).code, Errc::OK);
  EXPECT_EQ(log.order, (std::vector<uint64_t>{5}));
  EXPECT_EQ(client.stats().callsFailedUnsent, 3u);
  for (Request* r : {&early, &earlyPassing}) {
    RemotePromise refused = r->send();
    EXPECT_EQ(refused.questionId(), 0u);
    const Outcome o = outcome(loop, refused);
    EXPECT_EQ(o.code, Errc::OUT_OF_MEMORY);
    EXPECT_NE(o.detail.find("releaseReferencesAt"), std::string::npos) << o.detail;
  }
  EXPECT_EQ(pair.server().stats().callsReceived, FIT + 1) << "a failed call was sent";
  EXPECT_TRUE(client.isOpen());
  EXPECT_EQ(client.heldCallCount(), 0u);
  // A capability pipelined on the failed call fails here with its error.
  RemotePromise later = echo(*std::make_unique<RemoteCap>(failing.pipeline({0})), 2);
  EXPECT_EQ(outcome(loop, later).code, Errc::OUT_OF_MEMORY);
  {
    RemotePromise done[] = {std::move(failing), std::move(onIt), std::move(passed),
                            std::move(after), std::move(later)};
  }
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == questions - 1; }))
      << "a failed call's question leaked: " << client.questionCount();
  hanging.clear();
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == 0; }));
}

// A promise passed to another vat that waits on a held call's answer breaks when that call
// fails unsent, and lets go of the question (which is then freed) rather than waiting for this
// connection to end.
TEST_F(RpcHeldCalls, APromiseWaitingOnACallThatFailsUnsentBreaksAndLetsItGo) {
  LocalNetwork net(loop);
  VatNetwork& network = net.addVat(3, nullptr);
  LocalPair pair(loop, RpcOptions{.bootstrap = &root},
                 RpcOptions{.releaseReferencesAt = 2, .network = &network, .peerVat = 1}, RING);
  LocalPair other(loop, RpcOptions{}, RpcOptions{.network = &network, .peerVat = 2}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  Log mine;
  Node object(1, mine);
  std::deque<RemotePromise> hanging = hangFitHolding(cap, object);
  std::optional<RemotePromise> failing;
  {
    Request req = cap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
    writeCapPointer(req.initParams<CapParam>(), 0, req.addCap(object).value());
    failing.emplace(req.send());  // held: a fourth reference is refused as it goes
  }
  // A request to vat 2 carrying the capability pipelined on it: a promise waiting on its answer.
  Request passing = other.client().bootstrap().newCall(NODE_INTERFACE_ID, ECHO, 16);
  ASSERT_TRUE(passing.addCap(failing->pipeline({0})).ok());
  hanging.pop_back();
  EXPECT_EQ(outcome(loop, *failing).code, Errc::OUT_OF_MEMORY);
  failing.reset();
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == FIT - 1; }))
      << "the promise kept the failed question: " << client.questionCount();
  EXPECT_EQ(client.stats().callsFailedUnsent, 1u);
  EXPECT_TRUE(client.isOpen());
  hanging.clear();
}

// A held call carrying capabilities and no params content: what its cap table adds as it goes
// is bounded at send() (params included), so it either fits a frame of the ring when it goes, or
// is refused at once (MESSAGE_TOO_LARGE, nothing held), never failing later or ending the
// connection. Sizes around the spill buffers' size classes, and one too large for a 4 KiB ring.
TEST_F(RpcHeldCalls, HeldCallsWithCapabilitiesAndNoContentFitWhenTheyGoOrAreRefusedAtOnce) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  Log mine;
  Node object(1, mine);
  for (uint32_t n : {1u, 3u, 11u, 27u, 59u, 100u, 122u}) {
    SCOPED_TRACE(n);
    std::deque<RemotePromise> hanging = hangFit(cap);
    Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 0);
    for (uint32_t i = 0; i < n; ++i) ASSERT_TRUE(req.addCap(object).ok());
    RemotePromise p = req.send();
    if (n == 122) {
      EXPECT_EQ(p.questionId(), 0u);
      EXPECT_EQ(outcome(loop, p).code, Errc::MESSAGE_TOO_LARGE);
      EXPECT_EQ(client.heldCallCount(), 0u);
    } else {
      EXPECT_EQ(client.heldCallCount(), 1u);
    }
    hanging.clear();
    if (n != 122) {
      const Outcome o = outcome(loop, p);
      EXPECT_EQ(o.code, Errc::OK) << o.detail;
    }
    EXPECT_TRUE(client.isOpen());
    EXPECT_EQ(client.stats().callsFailedUnsent, 0u);
  }
}

// Dropping the last of a long chain of held calls, each pipelined on the one before, drops
// them all (one by one, not recursively).
TEST_F(RpcHeldCalls, DroppingAChainOfPipelinedHeldCallsDropsThemAll) {
  RpcOptions options;
  options.maxQuestions = 4095;
  LocalPair pair(loop, &root, nullptr, options, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  const uint32_t questions = client.questionCount();
  {
    std::deque<RemotePromise> chain;
    RemoteCap at = cap;
    for (int i = 0; i < 3000; ++i) {
      chain.push_back(at.newCall(NODE_INTERFACE_ID, NEXT, 0).send());
      at = chain.back().pipeline({0});
    }
    EXPECT_EQ(client.heldCallCount(), 3000u);
    while (chain.size() > 1) chain.pop_front();  // the pipelined references keep them
    EXPECT_EQ(client.heldCallCount(), 3000u);
    at = RemoteCap();
  }
  EXPECT_EQ(client.heldCallCount(), 0u);
  EXPECT_EQ(client.heldMessageCount(), 0u);
  EXPECT_EQ(client.questionCount(), questions);
  EXPECT_EQ(client.stats().callsCancelledHeld, 3000u);
  hanging.clear();
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == 0; }));
  EXPECT_EQ(pair.server().stats().callsReceived, FIT);
}

// A held call dropped while nothing is in flight: those behind it go without waiting for a
// Return that will not come.
TEST_F(RpcHeldCalls, DroppingTheCallAtTheFrontLetsThoseBehindItGo) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  RemotePromise big = record(cap, 1, 4000);
  std::optional<RemotePromise> front(record(cap, 2, 4000));  // held: no room beside `big`
  RemotePromise behind = record(cap, 3, 16);
  EXPECT_EQ(outcome(loop, big).code, Errc::OK);  // its Return frees the space
  // `front` went once `big` returned; drop a fresh held one instead, with nothing in flight.
  EXPECT_EQ(outcome(loop, *front).code, Errc::OK);
  EXPECT_EQ(outcome(loop, behind).code, Errc::OK);
  RemotePromise hang = cap.newCall(NODE_INTERFACE_ID, HANG, 16).reserveReply(4000).send();
  std::optional<RemotePromise> second(record(cap, 4, 4000));
  RemotePromise third = record(cap, 5, 16);
  ASSERT_EQ(client.heldCallCount(), 2u);
  second.reset();  // `third` would fit beside `hang`: it goes now
  EXPECT_EQ(outcome(loop, third).code, Errc::OK);
  EXPECT_EQ(log.order, (std::vector<uint64_t>{1, 2, 3, 5}));
  EXPECT_EQ(client.heldCallCount(), 0u);
}

TEST_F(RpcHeldCalls, HeldCallsFailDisconnectedWhenTheConnectionEndsAndNothingLeaks) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  std::vector<RemotePromise> held;
  for (uint64_t i = 0; i < 5; ++i) held.push_back(record(cap, i));
  RemotePromise next = cap.newCall(NODE_INTERFACE_ID, NEXT, 0).send();
  RemoteCap child = next.pipeline({0});
  held.push_back(echo(child, 1));
  held.push_back(std::move(next));
  ASSERT_EQ(client.heldCallCount(), 7u);
  pair.destroyServer();
  for (RemotePromise& p : held) EXPECT_EQ(outcome(loop, p).code, Errc::DISCONNECTED);
  for (RemotePromise& p : hanging) EXPECT_EQ(outcome(loop, p).code, Errc::DISCONNECTED);
  EXPECT_EQ(client.heldCallCount(), 0u);
  EXPECT_EQ(client.heldMessageCount(), 0u);
  EXPECT_EQ(client.replyBytesReserved(), 0u);
  held.clear();
  hanging.clear();
  child = RemoteCap();
  cap = RemoteCap();
  EXPECT_EQ(client.questionCount(), 0u);
  EXPECT_TRUE(runUntil(loop, [&] { return client.exportCount() == 0; }))  // after teardown
      << client.exportCount();
  EXPECT_EQ(client.handleCount(), 0u);
}

// RpcOptions::maxHoldTime: a call held past it fails here, unsent, with TIMED_OUT, and so do the
// held calls that name its answer; the connection carries on, and calls held later go in order
// once space frees.
TEST_F(RpcHeldCalls, ACallHeldPastMaxHoldTimeFailsUnsentWithWhatNamesItsAnswer) {
  LocalPair pair(loop, RpcOptions{.bootstrap = &root}, RpcOptions{.maxHoldTime = 50ms}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  const auto heldAt = std::chrono::steady_clock::now();
  RemotePromise next = cap.newCall(NODE_INTERFACE_ID, NEXT, 0).send();  // held
  (void)loop.run(loop.sleep(20ms));
  // Held later: it fails with `next`, as it reaches the front, not for its own time.
  RemotePromise onIt = echo(*std::make_unique<RemoteCap>(next.pipeline({0})), 1);
  ASSERT_EQ(client.heldCallCount(), 2u);
  const Outcome o = outcome(loop, next);
  EXPECT_EQ(o.code, Errc::TIMED_OUT);
  EXPECT_NE(o.detail.find("maxHoldTime"), std::string::npos) << o.detail;
  EXPECT_GE(std::chrono::steady_clock::now() - heldAt, 50ms) << "failed before its time";
  EXPECT_EQ(outcome(loop, onIt).code, Errc::TIMED_OUT);
  EXPECT_EQ(client.stats().callsTimedOutHeld, 1u);
  EXPECT_EQ(client.stats().callsFailedUnsent, 2u);
  EXPECT_EQ(client.heldCallCount(), 0u);
  EXPECT_EQ(pair.server().stats().callsReceived, FIT) << "a call that timed out was sent";
  EXPECT_TRUE(client.isOpen());
  RemotePromise a = record(cap, 1);
  RemotePromise b = record(cap, 2);
  ASSERT_EQ(client.heldCallCount(), 2u);
  hanging.pop_front();
  hanging.pop_front();
  EXPECT_EQ(outcome(loop, a).code, Errc::OK);
  EXPECT_EQ(outcome(loop, b).code, Errc::OK);
  EXPECT_EQ(log.order, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(client.stats().callsTimedOutHeld, 1u);
  { RemotePromise done[] = {std::move(next), std::move(onIt), std::move(a), std::move(b)}; }
  hanging.clear();
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == 0; }));
}

// Each held call has its own time: the one held later is still held when the first times out,
// and times out in turn.
TEST_F(RpcHeldCalls, EachHeldCallIsTimedFromWhenItWasHeld) {
  LocalPair pair(loop, RpcOptions{.bootstrap = &root}, RpcOptions{.maxHoldTime = 60ms}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  RemotePromise first = record(cap, 1);
  (void)loop.run(loop.sleep(40ms));
  RemotePromise second = record(cap, 2);
  EXPECT_EQ(outcome(loop, first).code, Errc::TIMED_OUT);
  EXPECT_EQ(client.heldCallCount(), 1u) << "the second call timed out with the first";
  EXPECT_EQ(outcome(loop, second).code, Errc::TIMED_OUT);
  EXPECT_EQ(client.stats().callsTimedOutHeld, 2u);
  EXPECT_TRUE(log.order.empty());
  { RemotePromise done[] = {std::move(first), std::move(second)}; }
  hanging.clear();
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == 0; }));
}

TEST(RpcHeldCallsDeathTest, ANegativeMaxHoldTimeIsRefusedWhenTheConnectionIsMade) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        EventLoop loop;
        LocalPair pair(loop, RpcOptions{}, RpcOptions{.maxHoldTime = -1ms}, RING);
      },
      "maxHoldTime is negative");
}

TEST_F(RpcHeldCalls, MaxQuestionsStillRefusesCallsPastItHeldOnesIncluded) {
  RpcOptions options;
  options.maxQuestions = FIT + 3;
  LocalPair pair(loop, &root, nullptr, options, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < FIT + 3; ++i) pending.push_back(record(cap, i));
  EXPECT_EQ(client.heldCallCount(), 3u);
  RemotePromise refused = record(cap, 99);
  EXPECT_EQ(refused.questionId(), 0u);
  const Outcome o = outcome(loop, refused);
  EXPECT_EQ(o.code, Errc::OUT_OF_MEMORY);
  EXPECT_NE(o.detail.find("maxQuestions"), std::string::npos) << o.detail;
  EXPECT_EQ(client.heldCallCount(), 3u);
  EXPECT_EQ(client.questionCount(), FIT + 3);
  for (RemotePromise& p : pending) EXPECT_EQ(outcome(loop, p).code, Errc::OK);
  EXPECT_EQ(log.order.size(), FIT + 3);
}

TEST_F(RpcHeldCalls, HeldBytesAreBoundedByMaxQueuedBytes) {
  RpcOptions options;
  options.maxMessageBytes = 1024;
  options.maxQueuedBytes = 1024;
  LocalPair pair(loop, &root, nullptr, options, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  std::vector<RemotePromise> held;
  std::optional<RemotePromise> refused;
  for (int i = 0; i < 1000; ++i) {
    Request req = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
    req.initParams<Value>().setValue(static_cast<uint64_t>(i));
    RemotePromise p = req.send();
    if (p.questionId() == 0) {
      refused.emplace(std::move(p));
      RemotePromise again = req.send();  // refused for good: the same error, nothing held
      EXPECT_EQ(again.questionId(), 0u);
      EXPECT_EQ(outcome(loop, again).code, Errc::OUT_OF_MEMORY);
      break;
    }
    held.push_back(std::move(p));
  }
  ASSERT_GT(held.size(), 0u);
  ASSERT_TRUE(refused.has_value()) << "never refused";
  const Outcome o = outcome(loop, *refused);
  EXPECT_EQ(o.code, Errc::OUT_OF_MEMORY);
  EXPECT_NE(o.detail.find("wait for reply space"), std::string::npos) << o.detail;
  EXPECT_EQ(client.heldCallCount(), held.size());
  EXPECT_TRUE(client.isOpen());
  hanging.clear();
  for (RemotePromise& p : held) EXPECT_EQ(outcome(loop, p).code, Errc::OK);
  EXPECT_EQ(log.order.size(), held.size());
}

// The same bound for calls with no params (sent as a handful of words, never built).
TEST_F(RpcHeldCalls, HeldBytesOfEmptyCallsAreBoundedByMaxQueuedBytes) {
  RpcOptions options;
  options.maxMessageBytes = 1024;
  options.maxQueuedBytes = 1024;
  LocalPair pair(loop, &root, nullptr, options, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  std::vector<RemotePromise> held;
  std::optional<RemotePromise> refused;
  for (int i = 0; i < 1000 && !refused; ++i) {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, ECHO, 0).send();
    if (p.questionId() == 0) {
      refused.emplace(std::move(p));
    } else {
      held.push_back(std::move(p));
    }
  }
  ASSERT_TRUE(refused.has_value()) << "never refused";
  const Outcome o = outcome(loop, *refused);
  EXPECT_EQ(o.code, Errc::OUT_OF_MEMORY);
  EXPECT_NE(o.detail.find("wait for reply space"), std::string::npos) << o.detail;
  EXPECT_EQ(client.heldCallCount(), held.size());
  EXPECT_EQ(client.questionCount(), FIT + held.size());
  hanging.clear();
  for (RemotePromise& p : held) EXPECT_EQ(outcome(loop, p).code, Errc::OK);
}

// A call that would be held but whose params outgrew RpcOptions::maxMessageBytes is refused
// with MESSAGE_TOO_LARGE, nothing held.
TEST_F(RpcHeldCalls, ACallTooLargeToSendIsRefusedRatherThanHeld) {
  RpcOptions options;
  options.maxMessageBytes = 1024;
  LocalPair pair(loop, &root, nullptr, options, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::deque<RemotePromise> hanging = hangFit(cap);
  const uint32_t questions = client.questionCount();
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 64);
  req.initParams<capnp::schema::Node>().setDisplayName(std::string(3000, 'x'));
  RemotePromise refused = req.send();
  EXPECT_EQ(refused.questionId(), 0u);
  EXPECT_EQ(outcome(loop, refused).code, Errc::MESSAGE_TOO_LARGE);
  RemotePromise again = req.send();  // refused for good: the same error, nothing sent or held
  EXPECT_EQ(again.questionId(), 0u);
  EXPECT_EQ(outcome(loop, again).code, Errc::MESSAGE_TOO_LARGE);
  EXPECT_EQ(client.heldCallCount(), 0u);
  EXPECT_EQ(client.heldMessageCount(), 0u);
  EXPECT_EQ(client.questionCount(), questions);
  RemotePromise after = record(cap, 4);  // held, and goes once space frees
  EXPECT_EQ(client.heldCallCount(), 1u);
  hanging.clear();
  EXPECT_EQ(outcome(loop, after).code, Errc::OK);
  EXPECT_EQ(log.order, (std::vector<uint64_t>{4}));
}

TEST_F(RpcHeldCalls, ACallReservingMoreThanTheRingIsRefusedEvenWhenCallsAreHeld) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  RemotePromise huge = record(cap, 1, RING);
  EXPECT_EQ(huge.questionId(), 0u);
  EXPECT_EQ(outcome(loop, huge).code, Errc::OUT_OF_MEMORY);
  EXPECT_EQ(client.heldCallCount(), 0u);
  EXPECT_EQ(client.questionCount(), 0u);
}

// A window of calls far wider than the reply space: every call goes, none refused, and the
// caller never reserves more than the ring.
TEST_F(RpcHeldCalls, AWindowWiderThanTheReplySpaceIsNeverRefused) {
  LocalPair pair(loop, &root, nullptr, {}, RING);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  uint64_t mostReserved = 0;
  Status done = loop.run([&]() -> Promise<void> {
    std::deque<RemotePromise> window;
    for (uint64_t i = 0; i < 200; ++i) window.push_back(echo(cap, i));
    for (uint64_t i = 200; i < 2000; ++i) {
      mostReserved = std::max(mostReserved, client.replyBytesReserved());
      {
        Result<Response> r = co_await window.front();
        AGATE_CO_TRY(r);
        if (r->results().getAs<Value>().getValue() != i - 200)
          co_return Error(Errc::FAILED, "out of order");
      }
      window.pop_front();
      window.push_back(echo(cap, i));
      if (window.back().questionId() == 0) co_return Error(Errc::FAILED, "refused");
    }
    for (RemotePromise& p : window) AGATE_CO_TRY(co_await p);
    co_return {};
  }());
  EXPECT_TRUE(done.ok()) << errcName(done.code()) << " " << (done.ok() ? "" : done.error().detail);
  EXPECT_LE(mostReserved, client.replyBytesAvailable());
  EXPECT_EQ(pair.server().stats().callsReceived, 2000u);
  EXPECT_GT(client.stats().callsHeld, 0u);
}

}  // namespace
}  // namespace agate::rpc::test
