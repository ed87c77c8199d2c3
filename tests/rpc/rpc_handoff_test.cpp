// Three-party handoff over a LocalNetwork (one loop, LOCAL channel pairs): vat C passes a
// capability hosted by vat A to vat B, in a call or a return; B ends up calling A directly, in
// E-order with the calls C made before; provisions end with every way a handoff can end (accept,
// unsent call, recipient, introducer or provider death) and nothing leaks; forged, replayed and
// misdirected Accepts get clear errors and change nothing. Also: a server that forwards a
// capability of another connection keeps pipelining working through it.
#include <gtest/gtest.h>

#include <capnp/schema.capnp.h>

#include <cstring>
#include <deque>
#include <functional>
#include <optional>

#include "agate/rpc/local_network.h"
#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

constexpr VatId A = 1, B = 2, C = 3, D = 4, E = 5, F = 6;

enum HandoffMethod : uint16_t {
  TAKE = 20,           // CapAndValue{cap, n}: keep the cap, send n RECORD calls on it at once
  GET_PIPELINED = 21,  // -> CapAndValue: A's NEXT_LATER child, still pipelined (not awaited)
  GET_AWAITED = 22,    // -> CapAndValue: A's NEXT child, after A returned it
  GET_AND_CLOSE = 23,  // -> CapAndValue: toA, then closes the caller's connection and returns
};

// Vat B's object: takes a capability and calls it at once, values FIRST_RECORD + i.
class Recipient final : public ServerObject {
 public:
  static constexpr uint64_t FIRST_RECORD = 1000;

  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    if (methodId != TAKE) return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    Result<ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
    uint64_t n = 0;
    Status read = ctx.tryReadParams<CapAndValue>([&](CapAndValue::Reader p) {
      cap = ctx.capAt(p, 0);
      n = p.getValue();
    });
    if (!read) return readyPromise<void>(read.error());
    if (!cap) return readyPromise<void>(cap.error());
    held = cap->remote;
    for (uint64_t i = 0; i < n; ++i) {
      Request r = held.newCall(NODE_INTERFACE_ID, RECORD, 16);
      r.initParams<Value>().setValue(FIRST_RECORD + i);
      sent.push_back(r.send());
    }
    return readyPromise<void>(Status{});
  }
  void clear() {
    sent.clear();
    held = RemoteCap();
  }

  RemoteCap held;
  std::vector<RemotePromise> sent;
};

// Vat B's object that hands out A's objects: pipelined (a forwarding proxy) or after A returned
// (a handoff when the caller has a network, else a proxy).
class Relay final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    switch (methodId) {
      case GET_PIPELINED:
        return readyPromise<void>(getPipelined(ctx));
      case GET_AWAITED:
        return getAwaited(ctx);
      case GET_AND_CLOSE:
        return readyPromise<void>(getAndClose(ctx));
      default:
        return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    }
  }
  RemoteCap toA;

 private:
  Status getPipelined(CallContext& ctx) {
    RemotePromise child = toA.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(child.pipeline({0}));
    AGATE_TRY(index);
    writeCapPointer(*out, 0, *index);
    return {};
  }
  Status getAndClose(CallContext& ctx) {
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(toA);
    AGATE_TRY(index);
    writeCapPointer(*out, 0, *index);
    ctx.connection().close(Error(Errc::FAILED, "closed by the relay"));
    return {};  // results written into a connection that is gone
  }
  Promise<void> getAwaited(CallContext& ctx) {
    Result<Response> child = co_await toA.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    AGATE_CO_TRY(child);
    Result<ReceivedCap> cap = child->getCap(0);
    AGATE_CO_TRY(cap);
    RemoteCap aChild = cap->remote;
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_CO_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(aChild);
    AGATE_CO_TRY(index);
    writeCapPointer(*out, 0, *index);
    out->setValue(7);
    co_return {};
  }
};

// Vat F's object: every call waits until open() (once opened, calls no longer wait), then returns
// CapAndValue with a new Node(1).
class Gate final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override { return wait(ctx); }
  void reset() noexcept { opened_ = false; }
  void open() {
    opened_ = true;
    std::vector<Fulfiller<void>> waiting = std::move(waiting_);
    waiting_.clear();
    for (Fulfiller<void>& f : waiting) f.fulfill(Status{});
  }
  Log log;

 private:
  Promise<void> wait(CallContext& ctx) {
    if (!opened_) {
      auto [opened, fulfiller] = newPromiseAndFulfiller<void>();
      waiting_.push_back(std::move(fulfiller));
      AGATE_CO_TRY(co_await opened);
    }
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_CO_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(std::make_unique<Node>(1, log));
    AGATE_CO_TRY(index);
    writeCapPointer(*out, 0, *index);
    co_return {};
  }
  std::vector<Fulfiller<void>> waiting_;
  bool opened_ = false;
};

Promise<uint64_t> awaitValue(RemotePromise p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  uint64_t v = 0;
  AGATE_CO_TRY(r->tryRead<Value>([&](Value::Reader x) { v = x.getValue(); }));
  co_return v;
}

Promise<uint64_t> echo(RemoteCap cap, uint64_t v) {
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(v);
  co_return co_await awaitValue(req.send());
}

RemotePromise record(const RemoteCap& cap, uint64_t v) {
  Request r = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
  r.initParams<Value>().setValue(v);
  return r.send();
}

// A TAKE call passing `cap` (a RemoteCap, or a CapPromise) to `to`, asking for `n` calls on it.
template <class Cap>
RemotePromise take(const RemoteCap& to, const Cap& cap, uint64_t n) {
  Request r = to.newCall(NODE_INTERFACE_ID, TAKE, 64);
  CapAndValue::Builder p = r.initParams<CapAndValue>();
  Result<uint32_t> index = r.addCap(cap);
  AGATE_ASSERT(index.ok(), "addCap: %s", errcName(index.code()));
  writeCapPointer(p, 0, *index);
  p.setValue(n);
  return r.send();
}

class HandoffTest : public ::testing::Test {
 protected:
  ~HandoffTest() override { closeNetwork(); }

  // By default calls reserve little reply space, so that a hundred or two fit in flight on
  // 4 KiB rings (more are held: RpcOptions::whenReplySpaceIsFull).
  void openNetwork(uint64_t ringBytes = 64 * 1024, uint32_t messagesPerTurn = 0,
                   uint32_t replyBytesPerCall = 16) {
    closeNetwork();
    net_.emplace(
        loop_,
        RpcOptions{.replyBytesPerCall = replyBytesPerCall, .messagesPerTurn = messagesPerTurn},
        ringBytes);
    net_->addVat(A, &aRoot_);
    net_->addVat(B, &recipient_);
    net_->addVat(C, nullptr);
    net_->addVat(D, &relay_);
    net_->addVat(E, &recipientE_);
    net_->addVat(F, &gate_);
  }
  void closeNetwork() {
    gate_.reset();
    recipient_.clear();
    recipientE_.clear();
    relay_.toA = RemoteCap();
    net_.reset();
  }
  RpcConnection& conn(VatId from, VatId to) { return *net_->connection(from, to).value(); }
  // C passes B a capability pipelined on `a`'s NEXT_LATER (B calls it 100 times at once), and
  // the test makes 100 more calls on B's reference while the route changes: A must see all 200
  // in B's order. Returns the NEXT_LATER call and the TAKE, still to be awaited.
  std::pair<RemotePromise, RemotePromise> passAndCallWhileTheRouteChanges(const RemoteCap& a);
  // `n` calls pipelined on D's answer, then `n` on the capability it returned (A's, handed off).
  void pipelinedThenDirectAfterAReturnHandoff(uint32_t messagesPerTurn, uint64_t n);
  RemoteCap boot(VatId from, VatId to) { return conn(from, to).bootstrap(); }
  // A child Node of A (value 1), owned by A's connection to C.
  RemoteCap childOfA() {
    Result<Response> r = loop_.run([](RemoteCap a) -> Promise<Response> {
      co_return co_await a.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    }(boot(C, A)));
    AGATE_ASSERT(r.ok(), "NEXT: %s", errcName(r.code()));
    return r->getCap(0).value().remote;
  }
  // Every promise of `sent` failed with `code`; returns the first error.
  Error expectAllFail(std::vector<RemotePromise>& sent, Errc code) {
    Error first{};
    for (RemotePromise& p : sent) {
      Result<uint64_t> r = loop_.run(awaitValue(std::move(p)));
      EXPECT_EQ(r.code(), code) << errcName(r.code());
      if (first.code == Errc::OK) first = r.error();
    }
    sent.clear();
    return first;
  }

  Watchdog watchdog_{"rpc_handoff_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log aLog_;
  Node aRoot_{0, aLog_};
  Recipient recipient_, recipientE_;
  Relay relay_;
  Gate gate_;
  std::optional<LocalNetwork> net_;
};

// C's calls made after it added A's capability to the TAKE but before it sent the TAKE come
// before the handoff too: the Provide goes as the TAKE goes, behind them, so B's Accept waits
// for them. Readers take one message per turn, so A is still reading C's calls when B's Accept
// and B's calls arrive.
TEST_F(HandoffTest, CallsMadeBetweenAddingTheCapabilityAndSendingComeFirst) {
  openNetwork(64 * 1024, /*messagesPerTurn=*/1);
  {
    RemoteCap a = boot(C, A);
    ASSERT_TRUE(loop_.run(echo(a, 1)).ok());  // C and A connected
    Request r = boot(C, B).newCall(NODE_INTERFACE_ID, TAKE, 64);
    CapAndValue::Builder p = r.initParams<CapAndValue>();
    writeCapPointer(p, 0, r.addCap(a).value());
    p.setValue(100);
    std::vector<RemotePromise> mine;
    for (uint64_t i = 0; i < 100; ++i) mine.push_back(record(a, i));
    RemotePromise taken = r.send();
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 200; })) << aLog_.order.size();
    EXPECT_EQ(conn(C, A).stats().providesSent, 1u);
    EXPECT_EQ(conn(A, B).stats().callsReceived, 100u) << "B called A directly";
    for (uint64_t i = 0; i < 200; ++i)
      ASSERT_EQ(aLog_.order[i], i < 100 ? i : Recipient::FIRST_RECORD + i - 100) << "at " << i;
    for (RemotePromise& m : mine) ASSERT_TRUE(loop_.run(awaitValue(std::move(m))).ok());
    for (RemotePromise& m : recipient_.sent) ASSERT_TRUE(loop_.run(awaitValue(std::move(m))).ok());
    recipient_.sent.clear();
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    recipient_.clear();
  }
}

TEST_F(HandoffTest, CallsBeforeAndAfterAHandoffReachTheObjectInEOrder) {
  // A roomy ring, and one so small that C's calls and its Provide spill and trickle out.
  for (uint64_t ring : {uint64_t{64 * 1024}, uint64_t{4096}}) {
    SCOPED_TRACE(ring);
    aLog_.order.clear();
    openNetwork(ring);
    {
      RemoteCap a = boot(C, A);
      RemoteCap b = boot(C, B);
      std::vector<RemotePromise> mine;
      for (uint64_t i = 0; i < 100; ++i) mine.push_back(record(a, i));  // in flight
      RemotePromise taken = take(b, a, 100);
      ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 200; })) << aLog_.order.size();
      for (uint64_t i = 0; i < 200; ++i) {
        ASSERT_EQ(aLog_.order[i], i < 100 ? i : Recipient::FIRST_RECORD + i - 100) << "at " << i;
      }
      // B calls A directly; nothing went through C.
      EXPECT_EQ(recipient_.held.connection(), &conn(B, A));
      EXPECT_EQ(conn(C, A).stats().providesSent, 1u);
      EXPECT_EQ(conn(A, B).stats().acceptsReceived, 1u);
      EXPECT_EQ(conn(A, B).stats().callsReceived, 100u);
      EXPECT_EQ(conn(C, B).stats().callsReceived, 0u) << "no call was forwarded by the vine";
      for (RemotePromise& p : mine) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
      for (RemotePromise& p : recipient_.sent)
        ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
      recipient_.sent.clear();
      ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    }
    // The Accept returned, so B released the vine and C finished the Provide: nothing is left.
    recipient_.clear();
    ASSERT_TRUE(runUntil(loop_,
                         [&] {
                           return net_->vat(A).provisionCount() == 0 &&
                                  conn(A, C).answerCount() == 0 && conn(A, B).answerCount() == 0 &&
                                  conn(C, B).exportCount() == 1 &&
                                  conn(C, A).questionCount() == 0 &&
                                  conn(B, A).questionCount() == 0 && conn(B, C).importCount() == 0;
                         }))
        << "provisions " << net_->vat(A).provisionCount() << ", A-C answers "
        << conn(A, C).answerCount() << ", C-B exports " << conn(C, B).exportCount();
  }
}

TEST_F(HandoffTest, AnAcceptThatArrivesBeforeItsProvideWaitsForIt) {
  openNetwork();
  RemoteCap a = boot(C, A);
  RemoteCap b = boot(C, B);
  for (uint64_t i = 0; i < 10; ++i) (void)record(a, i);
  // An open frame on C->A (a Call whose params are being built) holds everything C sends there
  // after it (the Provide included) in C's spill queue, while B's Accept reaches A at once.
  std::optional<Request> open = a.newCall(NODE_INTERFACE_ID, RECORD, 16);
  Value::Builder value = open->initParams<Value>();
  RemotePromise taken = take(b, a, 20);
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, B).stats().acceptsWaited == 1; }));
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, B).stats().callsReceived == 20; }));
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 1u);
  EXPECT_EQ(aLog_.order.size(), 10u) << "B's calls wait on the Accept, the Accept on the Provide";
  value.setValue(999);
  RemotePromise last = open->send();
  open.reset();
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 31; }));
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  // C's calls before the handoff first; B's in order; C's later call anywhere after its own.
  std::vector<uint64_t> fromB;
  for (size_t i = 0; i < aLog_.order.size(); ++i) {
    if (i < 10) {
      EXPECT_EQ(aLog_.order[i], i);
    }
    if (aLog_.order[i] >= Recipient::FIRST_RECORD) fromB.push_back(aLog_.order[i]);
  }
  ASSERT_EQ(fromB.size(), 20u);
  for (uint64_t i = 0; i < 20; ++i) EXPECT_EQ(fromB[i], Recipient::FIRST_RECORD + i);
}

TEST_F(HandoffTest, AHandedOffObjectOutlivesTheIntroducersReference) {
  openNetwork();
  RemoteCap child = childOfA();  // owned by A's connection to C
  RemoteCap b = boot(C, B);
  RemotePromise taken = take(b, child, 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 1; }));
  child = RemoteCap();  // C lets go; A's connection to C releases its export
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, C).exportCount() == 1; }));
  EXPECT_EQ(aLog_.destroyed, 0) << "B still holds the child";
  Result<uint64_t> v = loop_.run(echo(recipient_.held, 5));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 6u);
  ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());  // C finishes TAKE: B drops params
  recipient_.clear();
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.destroyed == 1; }))
      << "the last reference gone, the child is destroyed";
  EXPECT_EQ(conn(A, B).exportCount(), 1u);
}

TEST_F(HandoffTest, AHandoffInAReturnLetsTheCallerCallTheHostDirectly) {
  openNetwork();
  relay_.toA = boot(D, A);
  RemoteCap relay = boot(C, D);
  RemotePromise got = relay.newCall(NODE_INTERFACE_ID, GET_AWAITED, 16).send();
  Result<Response> r =
      loop_.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(got));
  ASSERT_TRUE(r.ok()) << errcName(r.code());
  RemoteCap direct = r->getCap(0).value().remote;
  EXPECT_EQ(direct.connection(), &conn(C, A)) << "C made a connection to A and took the cap";
  EXPECT_EQ(conn(C, D).stats().returnHandoffsEmbargoed, 0u) << "nothing pipelined: no embargo";
  const uint64_t callsAtA = conn(A, C).stats().callsReceived;
  Result<uint64_t> v = loop_.run(echo(direct, 20));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 21u);
  EXPECT_EQ(conn(A, C).stats().callsReceived, callsAtA + 1);
}

// C pipelines calls on D's answer (queued at D while D awaits A); D returns A's child, handed
// off to C. D's queued calls go on to A through the vine, so C's calls made on the returned
// capability after the Return must wait for them (E-order, as in
// RpcHostileTest.ADirectCallAfterALaterReturnGoesBehindTheCallsPipelinedBeforeIt): C's Accept is
// embargoed, and its Disembargo goes through the vine, behind them, then on to A. The route
// still shortens: C's later calls go to A directly. `messagesPerTurn` 1 interleaves the readers
// most; 16 is what service hosts use.
void HandoffTest::pipelinedThenDirectAfterAReturnHandoff(uint32_t messagesPerTurn, uint64_t n) {
  openNetwork(256 * 1024, messagesPerTurn);
  relay_.toA = boot(D, A);
  {
    RemoteCap relay = boot(C, D);
    RemotePromise got = relay.newCall(NODE_INTERFACE_ID, GET_AWAITED, 16).send();
    std::vector<RemotePromise> sent;
    for (uint64_t i = 0; i < n; ++i) sent.push_back(record(got.pipeline({0}), i));
    Result<Response> r =
        loop_.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(got));
    ASSERT_TRUE(r.ok()) << errcName(r.code());
    RemoteCap direct = r->getCap(0).value().remote;
    EXPECT_EQ(direct.connection(), &conn(C, A)) << "handed off";
    EXPECT_EQ(conn(C, D).stats().returnHandoffsEmbargoed, 1u);
    for (uint64_t i = n; i < 2 * n; ++i) sent.push_back(record(direct, i));
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 2 * n; })) << aLog_.order.size();
    std::string seen;
    for (uint64_t v : aLog_.order) seen += std::to_string(v) + " ";
    for (uint64_t i = 0; i < 2 * n; ++i) ASSERT_EQ(aLog_.order[i], i) << "at " << i << ": " << seen;
    for (RemotePromise& p : sent) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
    EXPECT_EQ(conn(A, C).stats().acceptsEmbargoed, 1u);
    EXPECT_EQ(conn(D, C).stats().disembargoesReceived, 1u);
    EXPECT_EQ(conn(A, D).stats().disembargoesReceived, 1u);
    EXPECT_EQ(conn(C, A).stats().callsSent, n) << "the later calls went to A directly";
  }
}

TEST_F(HandoffTest, DirectCallsAfterAHandoffInAReturnGoBehindTheCallsPipelinedOnIt) {
  pipelinedThenDirectAfterAReturnHandoff(1, 50);
}

TEST_F(HandoffTest, DirectCallsAfterAHandoffInAReturnGoBehindTheCallsPipelinedOnItSixteenPerTurn) {
  pipelinedThenDirectAfterAReturnHandoff(16, 300);
}

// A caller that dropped its promise before the Return (Finish.releaseResultCaps) takes nothing
// of it: no connection to the host is made for a handoff in it, no Accept goes, and the
// introducer drops the vine's reference itself, which reclaims the provision. Here a call
// pipelined on the answer keeps it from being cancelled.
TEST_F(HandoffTest, AHandoffInTheReturnOfACallDroppedBeforeItIsNotTakenAndIsReclaimed) {
  openNetwork();
  relay_.toA = boot(D, A);
  net_->holdConnects();  // a connection from C to A would wait
  RemotePromise echoed = [&] {
    RemoteCap relay = boot(C, D);
    RemotePromise got = relay.newCall(NODE_INTERFACE_ID, GET_AWAITED, 16).send();
    Request req = got.pipeline({0}).newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.initParams<Value>().setValue(10);
    return req.send();
  }();  // the promise and the capability pipelined on it are gone: Finish, releasing results
  EXPECT_EQ(conn(C, D).stats().finishesReleasingResults, 1u);
  const uint32_t exports = conn(D, C).exportCount();              // before D exports the vine
  Result<uint64_t> v = loop_.run(awaitValue(std::move(echoed)));  // forwarded by D to A's child
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 11u);
  ASSERT_TRUE(runUntil(loop_,
                       [&] {
                         return net_->vat(A).provisionCount() == 0 &&
                                conn(D, C).answerCount() == 0 &&
                                conn(D, C).exportCount() == exports && aLog_.destroyed == 1;
                       }))
      << "provisions " << net_->vat(A).provisionCount() << ", D-C answers "
      << conn(D, C).answerCount() << ", D-C exports " << conn(D, C).exportCount();
  EXPECT_EQ(conn(D, C).stats().providesSent + conn(D, A).stats().providesSent, 1u);
  EXPECT_EQ(conn(D, C).stats().resultRefsReleasedByFinish, 1u);
  EXPECT_EQ(net_->pendingConnects(), 0u) << "C reached for A for results it does not take";
  EXPECT_EQ(conn(C, D).stats().releasesSent, 0u);
  EXPECT_TRUE(conn(C, D).isOpen());
}

TEST_F(HandoffTest, AServerForwardingAPipelinedCapabilityKeepsPipeliningThroughIt) {
  openNetwork();
  relay_.toA = boot(D, A);
  RemoteCap relay = boot(C, D);
  // C asks D for A's child and calls it before anything came back: D returns A's still
  // pipelined child (a forwarding export), and forwards C's call to A's promised answer.
  RemotePromise got = relay.newCall(NODE_INTERFACE_ID, GET_PIPELINED, 16).send();
  RemoteCap child = got.pipeline({0});
  Request req = child.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(41);
  RemotePromise echoed = req.send();
  EXPECT_EQ(conn(C, D).stats().messagesReceived, 0u) << "both calls went out at once";
  Result<uint64_t> v = loop_.run(awaitValue(std::move(echoed)));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 42u);
  EXPECT_EQ(conn(A, D).stats().pipelinedCallsQueued, 1u) << "D pipelined its call on A's answer";
}

TEST_F(HandoffTest, AServerForwardingAcrossConnectionsWithoutANetworkProxiesTheCapability) {
  // No VatNetwork at all: two plain pairs, C <-> D and D <-> A.
  Relay relay;
  LocalPair da(loop_, &aRoot_);
  LocalPair cd(loop_, &relay);
  relay.toA = da.client().bootstrap();
  {
    RemoteCap r = cd.client().bootstrap();
    for (HandoffMethod m : {GET_PIPELINED, GET_AWAITED}) {
      RemotePromise got = r.newCall(NODE_INTERFACE_ID, m, 16).send();
      Result<uint64_t> v = loop_.run(echo(got.pipeline({0}), 1));
      ASSERT_TRUE(v.ok()) << errcName(v.code());
      EXPECT_EQ(*v, 2u);
    }
    EXPECT_EQ(cd.server().stats().providesSent, 0u);
  }
  relay.toA = RemoteCap();
  cd.server().close(Error(Errc::DISCONNECTED, "test ends"));  // its proxies hold caps on `da`
  loop_.runUntilIdle();
}

// shutdown() tears a connection down at once, not from the loop: the proxies it exported drop
// their references on the other connection before the call returns, so an owner can shut down
// several connections that hold references on each other and then destroy them in any order.
TEST_F(HandoffTest, ShutdownDropsAConnectionsProxiesAndTheirReferencesAtOnce) {
  Relay relay;
  LocalPair da(loop_, &aRoot_);
  LocalPair cd(loop_, &relay);
  relay.toA = da.client().bootstrap();
  RemoteCap r = cd.client().bootstrap();
  RemotePromise got = r.newCall(NODE_INTERFACE_ID, GET_AWAITED, 16).send();
  RemoteCap proxied = got.pipeline({0});
  Result<uint64_t> v = loop_.run(echo(proxied, 1));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  const uint32_t imports = da.client().importCount();  // the bootstrap, and the proxy's child
  ASSERT_EQ(imports, 2u);
  cd.server().shutdown(Error(Errc::DISCONNECTED, "the relay shuts down"));
  EXPECT_FALSE(cd.server().isOpen());
  EXPECT_EQ(cd.server().failure().code, Errc::DISCONNECTED);
  EXPECT_EQ(cd.server().exportCount(), 0u);
  EXPECT_EQ(da.client().importCount(), imports - 1) << "the proxy let go of A's child already";
  Result<uint64_t> after = loop_.run(echo(proxied, 1));
  EXPECT_EQ(after.code(), Errc::DISCONNECTED) << "the relay's client sees it gone";
  relay.toA = RemoteCap();
}

TEST_F(HandoffTest, AForwardedCallCarriesItsCapabilitiesOnToTheHost) {
  openNetwork();
  relay_.toA = boot(D, A);
  RemoteCap relay = boot(C, D);
  RemotePromise got = relay.newCall(NODE_INTERFACE_ID, GET_PIPELINED, 16).send();
  RemoteCap child = got.pipeline({0});
  Log cLog;
  Node mine(5, cLog);
  Request req = child.newCall(NODE_INTERFACE_ID, IDENTIFY, 32);
  CapParam::Builder p = req.initParams<CapParam>();
  writeCapPointer(p, 0, req.addCap(mine).value());
  Result<uint64_t> v = loop_.run(awaitValue(req.send()));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 2u) << "A got C's node as a capability it does not host";
  EXPECT_TRUE(conn(C, D).isOpen());
}

// A call carrying A's capability held for reply space on C's connection to B: the Provide goes
// when the call goes, not when it is sent, and the handoff completes.
TEST_F(HandoffTest, AHeldCallCarryingAThirdPartysCapabilityProvidesItOnlyAsItGoes) {
  openNetwork(4096, /*messagesPerTurn=*/0, /*replyBytesPerCall=*/2040);  // two calls in flight
  RemoteCap a = boot(C, A);
  ASSERT_TRUE(loop_.run(echo(a, 1)).ok());
  RemoteCap b = boot(C, B);
  std::vector<RemotePromise> first;  // no params: refused by B, once they arrive
  for (int i = 0; i < 2; ++i) first.push_back(b.newCall(NODE_INTERFACE_ID, TAKE, 16).send());
  RemotePromise taken = take(b, a, 3);
  EXPECT_EQ(conn(C, B).heldCallCount(), 1u);
  EXPECT_EQ(conn(C, A).stats().providesSent, 0u) << "provided while the call was held";
  for (RemotePromise& p : first)
    EXPECT_EQ(loop_.run(awaitValue(std::move(p))).code(), Errc::INVALID_ARGUMENT);
  ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
  EXPECT_EQ(conn(C, A).stats().providesSent, 1u);
  for (RemotePromise& p : recipient_.sent) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
  recipient_.sent.clear();
  EXPECT_EQ(aLog_.order,
            (std::vector<uint64_t>{Recipient::FIRST_RECORD, Recipient::FIRST_RECORD + 1,
                                   Recipient::FIRST_RECORD + 2}));
  EXPECT_EQ(recipient_.held.connection(), &conn(B, A)) << "B calls A directly";
  recipient_.clear();
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).provisionCount() == 0; }));
}

// A method that adds another connection's capability to its results and then closes its own
// connection returns into a dead connection: nothing is handed off or sent, nothing leaks.
TEST_F(HandoffTest, ResultsCarryingAForeignCapabilityReturnedIntoAClosedConnectionSendNothing) {
  openNetwork();
  relay_.toA = boot(D, A);
  RemotePromise got = boot(C, D).newCall(NODE_INTERFACE_ID, GET_AND_CLOSE, 16).send();
  Result<uint64_t> r = loop_.run(awaitValue(std::move(got)));
  EXPECT_NE(r.code(), Errc::OK);
  EXPECT_EQ(conn(D, A).stats().providesSent, 0u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  EXPECT_TRUE(conn(D, A).isOpen());
  ASSERT_TRUE(loop_.run(echo(relay_.toA, 1)).ok()) << "D's connection to A carries on";
  relay_.toA = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, D).exportCount() <= 1; }))
      << "A's exports to D: " << conn(A, D).exportCount();
}

// The Provide goes as the message carrying the capability goes: a call dropped unsent sends
// none; one refused after its cap table was written (too large to send) reclaims the provision
// it made (the vine goes, C finishes the Provide).
TEST_F(HandoffTest, AnUnsentCallProvidesNothingAndARefusedOneReclaimsItsProvision) {
  openNetwork();
  RemoteCap child = childOfA();
  RemoteCap b = boot(C, B);
  const size_t exports = conn(C, B).exportCount();
  {
    Request r = b.newCall(NODE_INTERFACE_ID, TAKE, 64);
    ASSERT_TRUE(r.addCap(child).ok());
    (void)loop_.run(loop_.sleep(std::chrono::milliseconds(10)));
    EXPECT_EQ(conn(C, A).stats().providesSent, 0u);
  }
  {
    Request r = b.newCall(NODE_INTERFACE_ID, TAKE, 64);
    ASSERT_TRUE(r.addCap(child).ok());
    r.initParams<capnp::schema::Node>().setDisplayName(std::string(20 * 1024, 'x'));
    RemotePromise refused = r.send();
    EXPECT_EQ(loop_.run(awaitValue(std::move(refused))).code(), Errc::MESSAGE_TOO_LARGE);
    EXPECT_EQ(conn(C, A).stats().providesSent, 1u);
  }
  ASSERT_TRUE(runUntil(loop_,
                       [&] {
                         return net_->vat(A).provisionCount() == 0 &&
                                conn(A, C).answerCount() == 0 && conn(C, A).questionCount() == 0 &&
                                conn(C, B).exportCount() == exports;
                       }))
      << "provisions " << net_->vat(A).provisionCount() << ", A-C answers "
      << conn(A, C).answerCount() << ", C-A questions " << conn(C, A).questionCount()
      << ", C-B exports " << conn(C, B).exportCount();
  EXPECT_TRUE(conn(C, B).isOpen());
  EXPECT_EQ(conn(B, C).stats().callsReceived, 0u);
  child = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.destroyed == 1; })) << "nothing pins the child";
}

TEST_F(HandoffTest, AProvisionIsReclaimedWhenTheRecipientDiesBeforeAccepting) {
  openNetwork();
  RemoteCap child = childOfA();
  RemoteCap b = boot(C, B);
  net_->holdConnects();  // B cannot reach A yet
  RemotePromise taken = take(b, child, 3);
  ASSERT_TRUE(runUntil(
      loop_, [&] { return net_->pendingConnects() == 1 && net_->vat(A).provisionCount() == 1; }));
  net_->killVat(B);
  net_->releaseConnects();
  EXPECT_EQ(loop_.run(awaitValue(std::move(taken))).code(), Errc::DISCONNECTED);
  ASSERT_TRUE(runUntil(
      loop_, [&] { return net_->vat(A).provisionCount() == 0 && conn(A, C).answerCount() == 0; }));
  EXPECT_TRUE(conn(A, C).isOpen());
  child = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.destroyed == 1; }));
  EXPECT_TRUE(aLog_.order.empty());
}

TEST_F(HandoffTest, TheIntroducerDyingBeforeTheAcceptFailsTheRecipientsCallsDisconnected) {
  openNetwork();
  RemoteCap a = boot(C, A);
  RemoteCap b = boot(C, B);
  net_->holdConnects();
  RemotePromise taken = take(b, a, 3);
  ASSERT_TRUE(runUntil(
      loop_, [&] { return net_->pendingConnects() == 1 && net_->vat(A).provisionCount() == 1; }));
  a = RemoteCap();
  b = RemoteCap();
  { RemotePromise dropped = std::move(taken); }
  net_->killVat(C);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).provisionCount() == 0; }))
      << "A reclaimed the dead introducer's provision";
  net_->releaseConnects();  // B, still reading C's last message, now accepts
  ASSERT_TRUE(runUntil(loop_, [&] { return recipient_.sent.size() == 3; }));
  Error e = expectAllFail(recipient_.sent, Errc::DISCONNECTED);
  ASSERT_NE(e.detail, nullptr);
  EXPECT_NE(std::strstr(e.detail, "introducer"), nullptr) << e.detail;
  EXPECT_TRUE(conn(A, B).isOpen()) << "a failed Accept is not a broken connection";
  recipient_.clear();
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, B).answerCount() == 0; }));
  EXPECT_TRUE(aLog_.order.empty());
}

TEST_F(HandoffTest, TheProviderDyingFailsTheRecipientsCallsDisconnected) {
  openNetwork();
  {
    // Before B reaches A: B's connect fails, the cap is broken.
    RemoteCap a = boot(C, A);
    RemoteCap b = boot(C, B);
    net_->holdConnects();
    RemotePromise taken = take(b, a, 2);
    ASSERT_TRUE(runUntil(loop_, [&] { return net_->pendingConnects() == 1; }));
    net_->killVat(A);
    net_->releaseConnects();
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    Error e = expectAllFail(recipient_.sent, Errc::DISCONNECTED);
    EXPECT_STREQ(e.detail, "the vat is gone");
    recipient_.clear();
  }
  // After B took it: B's later calls fail at once.
  closeNetwork();
  openNetwork();
  RemoteCap a = boot(C, A);
  RemoteCap b = boot(C, B);
  ASSERT_TRUE(loop_.run(awaitValue(take(b, a, 1))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 1; }));
  RpcConnection& toA = conn(B, A);
  net_->killVat(A);
  ASSERT_TRUE(runUntil(loop_, [&] { return !toA.isOpen(); }));
  EXPECT_EQ(loop_.run(echo(recipient_.held, 1)).code(), Errc::DISCONNECTED);
  EXPECT_TRUE(conn(B, C).isOpen());
}

// A hostile vat, speaking raw rpc.capnp to A over a connection A knows as `peer`'s.
class RawVat {
 public:
  RawVat(EventLoop& loop, VatNetwork& victimNet, VatId peer, ServerObject* bootstrap)
      : loop_(loop) {
    ChannelOptions co;
    co.scope = ChannelScope::LOCAL;
    toVictim_ = std::move(Channel::create(co).value());
    fromVictim_ = std::move(Channel::create(co).value());
    tx_ = std::make_unique<MessageSender>(toVictim_->attachSender().value());
    victimRx_ = std::make_unique<MessageReceiver>(*toVictim_, toVictim_->attachReceiver().value(),
                                                  rpcReceiverOptions());
    victimTx_ = std::make_unique<MessageSender>(fromVictim_->attachSender().value());
    rx_ = std::make_unique<MessageReceiver>(*fromVictim_, fromVictim_->attachReceiver().value(),
                                            rpcReceiverOptions());
    RpcOptions o;
    o.bootstrap = bootstrap;
    o.network = &victimNet;
    o.peerVat = peer;
    victim_ = std::make_unique<RpcConnection>(*victimTx_, *victimRx_, loop, o);
  }
  ~RawVat() {
    victim_->close(Error(Errc::DISCONNECTED, "test ends"));
    loop_.runUntilIdle();
  }
  void send(const std::function<void(wire::Message::Builder)>& fill) {
    Result<OutgoingMessage> m = tx_->tryStartMessage(1024);
    ASSERT_TRUE(m.ok());
    fill(m->initRoot<wire::Message>());
    ASSERT_TRUE(m->send().ok());
  }
  void accept(uint32_t q, VatId introducer, uint64_t provisionId, bool embargo = false) {
    send([&](wire::Message::Builder m) {
      wire::Accept::Builder a = m.initAccept();
      a.setQuestionId(q);
      a.setIntroducer(introducer);
      a.setProvisionId(provisionId);
      a.setEmbargo(embargo);
    });
  }
  void provide(uint32_t q, uint32_t exportId, VatId recipient, uint64_t provisionId) {
    send([&](wire::Message::Builder m) {
      wire::Provide::Builder p = m.initProvide();
      p.setQuestionId(q);
      p.initTarget().setImportedCap(exportId);
      p.setRecipient(recipient);
      p.setProvisionId(provisionId);
    });
  }
  // Disembargo {importedCap(exportId), provide = q}.
  void disembargoProvide(uint32_t exportId, uint32_t q) {
    send([&](wire::Message::Builder m) {
      wire::Disembargo::Builder d = m.initDisembargo();
      d.initTarget().setImportedCap(exportId);
      d.initContext().setProvide(q);
    });
  }
  // A RECORD call of `value` pipelined on question `on`, path [0] (an Accept's capability).
  void recordOn(uint32_t q, uint32_t on, uint64_t value) {
    send([&](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setQuestionId(q);
      c.getTarget().initPromisedAnswer().setQuestionId(on);
      c.getTarget().getPromisedAnswer().initTransform(1).set(0, 0);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(RECORD);
      c.initParams().getContent().initAs<Value>().setValue(value);
    });
  }
  void finish(uint32_t q) {
    send([&](wire::Message::Builder m) { m.initFinish().setQuestionId(q); });
  }
  // The next message the victim sent.
  void expectNext(const std::function<void(wire::Message::Reader)>& check) {
    Result<IncomingMessage> in = loop_.run(rx_->receiveAsync(loop_));
    ASSERT_TRUE(in.ok()) << errcName(in.code());
    ASSERT_TRUE(in->validate().ok());  // rpcReceiverOptions() validate on demand
    check(in->getRoot<wire::Message>());
  }
  // The errc of the victim's next Return (for question `q`); OK for results, CANCELLED for
  // Return.canceled.
  Errc nextReturn(uint32_t q) {
    Result<IncomingMessage> in = loop_.run(rx_->receiveAsync(loop_));
    if (!in) return in.code();
    if (Status valid = in->validate(); !valid) return valid.code();
    wire::Message::Reader m = in->getRoot<wire::Message>();
    EXPECT_EQ(m.which(), wire::Message::RETURN);
    if (m.which() != wire::Message::RETURN) return Errc::PROTOCOL_ERROR;
    EXPECT_EQ(m.getReturn().getAnswerId(), q);
    switch (m.getReturn().which()) {
      case wire::Return::RESULTS:
        return Errc::OK;
      case wire::Return::CANCELED:
        return Errc::CANCELLED;
      default:
        return static_cast<Errc>(m.getReturn().getException().getErrc());
    }
  }
  bool abortedWithProtocolError() {
    if (!runUntil(loop_, [&] { return !victim_->isOpen(); })) return false;
    return victim_->failure().code == Errc::PROTOCOL_ERROR;
  }
  RpcConnection& victim() { return *victim_; }

 private:
  EventLoop& loop_;
  std::unique_ptr<Channel> toVictim_, fromVictim_;
  std::unique_ptr<MessageSender> tx_, victimTx_;
  std::unique_ptr<MessageReceiver> victimRx_, rx_;
  std::unique_ptr<RpcConnection> victim_;
};

TEST_F(HandoffTest, ForgedReplayedAndMisdirectedAcceptsGetClearErrorsAndChangeNothing) {
  openNetwork();
  RemoteCap a = boot(C, A);
  // Provision 1: C -> B, accepted.
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), a, 1))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 1; }));
  RawVat d(loop_, net_->vat(A), D, nullptr);
  d.accept(1, C, 1);  // replayed
  EXPECT_EQ(d.nextReturn(1), Errc::NOT_FOUND);
  d.accept(2, C, 0);  // forged, below C's last provision
  EXPECT_EQ(d.nextReturn(2), Errc::NOT_FOUND);
  d.accept(3, 77, 1);  // an introducer A does not know
  EXPECT_EQ(d.nextReturn(3), Errc::DISCONNECTED);
  // Provision 2: C -> E, which cannot reach A yet; D tries to take it first.
  net_->holdConnects();
  RemotePromise toE = take(boot(C, E), a, 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).provisionCount() == 1; }));
  d.accept(4, C, 2);
  EXPECT_EQ(d.nextReturn(4), Errc::PERMISSION_DENIED);
  EXPECT_EQ(net_->vat(A).provisionCount(), 1u) << "the provision stays for E";
  net_->releaseConnects();
  ASSERT_TRUE(loop_.run(awaitValue(std::move(toE))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 2; }));
  EXPECT_EQ(aLog_.order[1], Recipient::FIRST_RECORD);
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  // A forged id above C's last waits for a Provide; D's Finish ends the wait.
  d.accept(5, C, 1000);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == 1; }));
  d.send([](wire::Message::Builder m) { m.initFinish().setQuestionId(5); });
  EXPECT_EQ(d.nextReturn(5), Errc::CANCELLED);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  // D waits for (C, 3); C spends id 3 on a handoff to another provider (B's object to E) and
  // id 4 on one from A: A's Provide 4 shows that 3 will never come, so D gets NOT_FOUND.
  d.accept(6, C, 3);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == 1; }));
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, E), boot(C, B), 0))).ok());
  EXPECT_EQ(net_->vat(B).provisionCount() + conn(B, E).stats().acceptsReceived, 1u);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 1u);
  RemotePromise third = take(boot(C, B), a, 0);
  EXPECT_EQ(d.nextReturn(6), Errc::NOT_FOUND);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  EXPECT_TRUE(d.victim().isOpen()) << "failed Accepts do not break the connection";
  ASSERT_TRUE(loop_.run(awaitValue(std::move(third))).ok());
}

// Accepts for provisions that have not come yet wait, but only so many per recipient and
// introducer: a peer flooding forged provision ids fills its own allowance, not the vat's, and
// another recipient's Accept still waits for its Provide; an introducer that hands a recipient
// forged ids (here D's Accepts of C's provisions, as C could make D send) fills only the places
// for C's handoffs: D's Accept of B's provision still waits.
TEST_F(HandoffTest, WaitingAcceptsAreBoundedPerRecipientAndIntroducer) {
  openNetwork();
  RemoteCap a = boot(C, A);
  (void)loop_.run(echo(a, 0));  // C is an introducer A knows
  RemoteCap ab = boot(B, A);
  (void)loop_.run(echo(ab, 0));  // and so is B
  constexpr size_t LIMIT = VatNetwork::MAX_WAITING_ACCEPTS_PER_PEER;
  RawVat d(loop_, net_->vat(A), D, nullptr);
  for (uint32_t q = 1; q <= LIMIT; ++q) d.accept(q, C, 1000 + q);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == LIMIT; }));
  d.accept(LIMIT + 1, C, 5000);
  EXPECT_EQ(d.nextReturn(LIMIT + 1), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), LIMIT) << "the refused one left nothing behind";
  EXPECT_TRUE(d.victim().isOpen()) << "a refused Accept does not break the connection";

  d.accept(LIMIT + 3, B, 9000);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == LIMIT + 1; }))
      << "another introducer's places are D's still";

  RawVat e(loop_, net_->vat(A), E, nullptr);
  e.accept(1, C, 6000);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == LIMIT + 2; }));

  // D's Finish frees one of its places, which it can use again.
  d.send([](wire::Message::Builder m) { m.initFinish().setQuestionId(1); });
  EXPECT_EQ(d.nextReturn(1), Errc::CANCELLED);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), LIMIT + 1);
  d.accept(LIMIT + 2, C, 7000);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == LIMIT + 2; }));
}

// The recipient names the introducer: its places per introducer are also bounded in all, so
// naming every vat A knows does not multiply what it can make A hold.
TEST_F(HandoffTest, WaitingAcceptsAreBoundedInAllPerRecipient) {
  openNetwork();
  constexpr VatId G = 7;
  net_->addVat(G, nullptr);
  const VatId introducers[] = {B, C, E, F, G};
  for (VatId v : introducers) (void)loop_.run(echo(boot(v, A), 0));  // each known to A
  constexpr size_t PER = VatNetwork::MAX_WAITING_ACCEPTS_PER_PEER;
  constexpr size_t ALL = VatNetwork::MAX_WAITING_ACCEPTS_PER_RECIPIENT;
  static_assert(ALL / PER < std::size(introducers), "an introducer with places left");
  RawVat d(loop_, net_->vat(A), D, nullptr);
  uint32_t q = 0;
  for (size_t i = 0; i < ALL; ++i, ++q) d.accept(q + 1, introducers[i / PER], 1000 + q);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == ALL; }));
  d.accept(++q, G, 9000);  // G's places are free; D's in all are not
  EXPECT_EQ(d.nextReturn(q), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), ALL);
  EXPECT_TRUE(d.victim().isOpen());
}

TEST_F(HandoffTest, TheIntroducersFinishReclaimsAProvisionEvenWithCallsPipelinedOnIt) {
  openNetwork();
  RawVat d(loop_, net_->vat(A), D, &aRoot_);
  d.send([](wire::Message::Builder m) {
    wire::Provide::Builder p = m.initProvide();
    p.setQuestionId(1);
    p.initTarget().setImportedCap(0);
    p.setRecipient(B);
    p.setProvisionId(5);
  });
  d.send([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(2);
    c.getTarget().initPromisedAnswer().setQuestionId(1);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(ECHO);
  });
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).provisionCount() == 1; }));
  d.send([](wire::Message::Builder m) { m.initFinish().setQuestionId(1); });
  EXPECT_EQ(d.nextReturn(1), Errc::CANCELLED);
  EXPECT_EQ(d.nextReturn(2), Errc::CANCELLED) << "the pipelined call fails with its target";
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  EXPECT_TRUE(d.victim().isOpen());
  EXPECT_TRUE(aLog_.order.empty());
}

// Export 0 is in use even on a connection without a bootstrap object; a Provide of it would give
// an Accept nothing to return. It is refused when it arrives, and a recipient's Accept of that
// provision then waits (and ends with its own Finish) instead of reaching a missing object.
TEST_F(HandoffTest, AProvideOfABootstrapObjectTheProviderDoesNotHaveAbortsTheIntroducer) {
  openNetwork();
  RawVat d(loop_, net_->vat(A), D, nullptr);
  d.provide(1, 0, B, 5);
  EXPECT_TRUE(d.abortedWithProtocolError());
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  RawVat b(loop_, net_->vat(A), B, &aRoot_);
  b.accept(1, D, 5);
  EXPECT_EQ(b.nextReturn(1), Errc::DISCONNECTED) << "the introducer is gone";
  EXPECT_TRUE(b.victim().isOpen());
  EXPECT_TRUE(aLog_.order.empty());
}

TEST_F(HandoffTest, HostileHandoffMessagesAbortWithProtocolError) {
  openNetwork();
  RemoteCap a = boot(C, A);
  (void)loop_.run(echo(a, 0));  // A's connection to C exists and has provision ids from 0
  struct Case {
    const char* what;
    std::function<void(wire::Message::Builder)> fill;
  };
  auto provide = [](uint32_t q, uint32_t exportId, VatId recipient, uint64_t id) {
    return [=](wire::Message::Builder m) {
      wire::Provide::Builder p = m.initProvide();
      p.setQuestionId(q);
      p.initTarget().setImportedCap(exportId);
      p.setRecipient(recipient);
      p.setProvisionId(id);
    };
  };
  auto thirdParty = [](VatId host) {
    return [=](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setQuestionId(1);
      c.getTarget().setImportedCap(0);
      c.setInterfaceId(NODE_INTERFACE_ID);
      c.setMethodId(IDENTIFY);
      wire::Payload::Builder p = c.initParams();
      writeCapPointer(p.getContent().initAs<CapParam>(), 0, 0);
      wire::ThirdPartyCapDescriptor::Builder t = p.initCapTable(1)[0].initThirdPartyHosted();
      t.setVatId(host);
      t.setProvisionId(1);
      t.setVineId(1);
    };
  };
  const Case cases[] = {
      {"provide of an export that does not exist", provide(1, 9, B, 5)},
      {"provide for no recipient", provide(1, 0, NO_VAT, 5)},
      {"provide for the introducer itself", provide(1, 0, D, 5)},
      {"provide for the provider itself", provide(1, 0, A, 5)},
      {"third-party cap hosted by its sender", thirdParty(D)},
      {"third-party cap hosted by its receiver", thirdParty(A)},
      {"third-party cap hosted by no vat", thirdParty(NO_VAT)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    RawVat d(loop_, net_->vat(A), D, &aRoot_);
    d.send(c.fill);
    EXPECT_TRUE(d.abortedWithProtocolError());
    EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  }
  {
    SCOPED_TRACE("provision ids must increase");
    RawVat d(loop_, net_->vat(A), D, &aRoot_);
    d.send(provide(1, 0, B, 5));
    ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).provisionCount() == 1; }));
    d.send(provide(2, 0, B, 5));
    EXPECT_TRUE(d.abortedWithProtocolError());
    EXPECT_EQ(net_->vat(A).provisionCount(), 0u) << "the dead introducer's provision is gone";
  }
}

// ---------------------------------------------------------------------------------------------
// Embargoes: a promise passed on (a pipelined capability, or a CapPromise) whose resolution is
// handed off, so that the recipient's reference shortens to the host (rpc.capnp, "Embargoes").

// B (Recipient) calls the capability C passed as soon as it has it (100 calls), then the test
// makes 100 more calls on B's reference, one per loop turn, while the answer, the Resolve and
// the embargo are in flight: A must see all 200 in the order B made them.
void callWhileTheRouteChanges(EventLoop& loop, Recipient& recipient, uint64_t from, uint64_t to) {
  for (uint64_t i = from; i < to;) {
    if (!recipient.held.isNull()) {
      recipient.sent.push_back(record(recipient.held, Recipient::FIRST_RECORD + i));
      ++i;
    }
    (void)loop.run(loop.sleep(Duration::zero()));
  }
}

void expectInOrder(const std::vector<uint64_t>& order, size_t n) {
  ASSERT_EQ(order.size(), n);
  for (uint64_t i = 0; i < n; ++i) ASSERT_EQ(order[i], Recipient::FIRST_RECORD + i) << "at " << i;
}

std::pair<RemotePromise, RemotePromise> HandoffTest::passAndCallWhileTheRouteChanges(
    const RemoteCap& a) {
  RemotePromise child = a.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
  RemotePromise taken = take(boot(C, B), child.pipeline({0}), 100);
  callWhileTheRouteChanges(loop_, recipient_, 100, 200);
  EXPECT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 200; })) << aLog_.order.size();
  expectInOrder(aLog_.order, 200);
  return {std::move(child), std::move(taken)};
}

TEST_F(HandoffTest, CallsOnAPassedPipelinedCapabilityKeepEOrderWhenItsRouteShortensToTheHost) {
  for (uint64_t ring : {uint64_t{64 * 1024}, uint64_t{4096}}) {
    SCOPED_TRACE(ring);
    aLog_.order.clear();
    openNetwork(ring);
    {
      RemoteCap a = boot(C, A);
      auto [child, taken] = passAndCallWhileTheRouteChanges(a);
      for (RemotePromise& p : recipient_.sent)
        ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
      recipient_.sent.clear();
      // The route changed under B's reference, with an embargo: Accept{embargo} to A,
      // Disembargo B -> C -> A.
      EXPECT_EQ(conn(B, C).stats().resolvesReceived, 1u);
      EXPECT_EQ(conn(B, A).stats().acceptsSent, 1u);
      EXPECT_EQ(conn(B, C).stats().disembargoesSent, 1u);
      EXPECT_EQ(conn(C, A).stats().disembargoesSent, 1u);
      EXPECT_EQ(conn(A, C).stats().disembargoesReceived, 1u);
      EXPECT_GT(conn(A, B).stats().callsReceived, 0u) << "later calls went to A directly";
      // Now every call goes to A directly.
      const uint64_t atC = conn(C, B).stats().callsReceived;
      const uint64_t atA = conn(A, B).stats().callsReceived;
      Result<uint64_t> v = loop_.run(echo(recipient_.held, 5));
      ASSERT_TRUE(v.ok()) << errcName(v.code());
      EXPECT_EQ(*v, 6u);
      EXPECT_EQ(conn(C, B).stats().callsReceived, atC);
      EXPECT_EQ(conn(A, B).stats().callsReceived, atA + 1);
      EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
      EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
      ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
      recipient_.clear();
    }
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.destroyed == aLog_.created - 1; }))
        << "the child goes with the last reference";
    ASSERT_TRUE(runUntil(loop_, [&] {
      return conn(A, B).answerCount() == 0 && conn(A, C).answerCount() == 0 &&
             conn(C, B).exportCount() == 1 && conn(C, A).questionCount() == 0;
    }));
  }
}

// The same with calls held for reply space on every connection (2 fit in flight): B's calls
// wait at B, C's forwarded calls wait at C, and each Disembargo waits behind the held calls it
// must follow, so A still sees the 200 calls in B's order.
TEST_F(HandoffTest, EOrderHoldsAcrossTheHandoffWhileCallsAreHeldForReplySpace) {
  openNetwork(4096, 0, /*replyBytesPerCall=*/2040);
  {
    RemoteCap a = boot(C, A);
    auto [child, taken] = passAndCallWhileTheRouteChanges(a);
    EXPECT_GT(conn(B, C).stats().callsHeld, 0u) << "B's calls through C were never held";
    EXPECT_GT(conn(C, A).stats().callsHeld, 0u) << "C's forwarded calls were never held";
    EXPECT_EQ(conn(B, C).stats().disembargoesSent, 1u);
    EXPECT_EQ(conn(C, A).stats().disembargoesSent, 1u);
    EXPECT_EQ(conn(A, C).stats().disembargoesReceived, 1u);
    // B's Disembargo waited behind its held calls (sent ahead of them, it lets A deliver B's
    // direct calls first: the order breaks in the 80s).
    EXPECT_EQ(conn(B, C).stats().disembargoesHeld, 1u);
    for (RemotePromise& p : recipient_.sent) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
    recipient_.clear();
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
  }
  ASSERT_TRUE(runUntil(loop_, [&] {
    return net_->vat(A).provisionCount() == 0 && conn(A, B).answerCount() == 0 &&
           conn(A, C).answerCount() == 0 && conn(B, C).heldMessageCount() == 0 &&
           conn(C, A).heldMessageCount() == 0 && aLog_.destroyed == aLog_.created - 1;
  }));
}

// C passes A's object to B while C's own calls on it are held for reply space on C->A: a
// Provide would overtake them (B's calls could then reach A first), so the capability goes to
// B as a proxy through C, and B's calls follow C's.
TEST_F(HandoffTest, ACapabilityPassedWhileItsHostHoldsCallsIsProxiedAndKeepsEOrder) {
  openNetwork(4096, 0, /*replyBytesPerCall=*/2040);
  {
    RemoteCap a = boot(C, A);
    std::vector<RemotePromise> mine;
    for (uint64_t i = 0; i < 10; ++i) mine.push_back(record(a, i));
    ASSERT_GT(conn(C, A).heldCallCount(), 0u);
    RemotePromise taken = take(boot(C, B), a, 100);
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 110; })) << aLog_.order.size();
    for (uint64_t i = 0; i < 10; ++i) ASSERT_EQ(aLog_.order[i], i) << "at " << i;
    for (uint64_t i = 0; i < 100; ++i)
      ASSERT_EQ(aLog_.order[10 + i], Recipient::FIRST_RECORD + i) << "at " << 10 + i;
    EXPECT_EQ(conn(C, A).stats().providesSent, 0u) << "handed off while calls were held";
    for (RemotePromise& p : mine) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
    for (RemotePromise& p : recipient_.sent) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
    recipient_.clear();
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
  }
}

// C has maxQuestions questions open to A when it passes A's object to B: a Provide would take one
// more, past A's answer table (A would abort C), so the capability goes to B as a proxy. B's
// calls through it are refused at C's bound while it lasts, and go once C's calls return.
TEST_F(HandoffTest, ACapabilityPassedWithMaxQuestionsOpenToItsHostIsProxied) {
  openNetwork();  // 64 KiB rings: 4095 calls of 16 bytes fit in flight
  {
    RemoteCap a = boot(C, A);
    std::deque<RemotePromise> hanging;
    for (int i = 0; i < 4095; ++i) hanging.push_back(a.newCall(NODE_INTERFACE_ID, HANG, 16).send());
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.hanging == 4095; })) << aLog_.hanging;
    ASSERT_EQ(conn(C, A).questionCount(), 4095u);
    ASSERT_EQ(conn(C, A).heldCallCount(), 0u);
    RemotePromise taken = take(boot(C, B), a, 3);
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    EXPECT_EQ(conn(C, A).stats().providesSent, 0u) << "handed off past A's answer table";
    for (RemotePromise& p : recipient_.sent)
      EXPECT_EQ(loop_.run(awaitValue(std::move(p))).code(), Errc::OUT_OF_MEMORY);
    recipient_.sent.clear();
    EXPECT_TRUE(conn(A, C).isOpen() && conn(C, A).isOpen());
    hanging.clear();
    ASSERT_TRUE(runUntil(loop_, [&] { return conn(C, A).questionCount() == 0; }));
    Result<uint64_t> later = loop_.run(awaitValue(record(recipient_.held, 7)));
    EXPECT_TRUE(later.ok()) << errcName(later.code());
    EXPECT_EQ(aLog_.order, (std::vector<uint64_t>{7}));
    recipient_.clear();
  }
}

// The same bound for a promise resolved to the host's object: no Provide, the promise resolves
// to a proxy, and the recipient's calls go through the introducer.
TEST_F(HandoffTest, APromiseResolvedWithMaxQuestionsOpenToTheHostResolvesToAProxy) {
  openNetwork();  // 64 KiB rings: 4095 calls of 16 bytes fit in flight
  {
    RemoteCap a = boot(C, A);
    CapPromise later = conn(C, B).newCapPromise();
    RemotePromise taken = take(boot(C, B), later, 3);
    ASSERT_TRUE(runUntil(loop_, [&] { return conn(C, B).stats().promiseCallsQueued == 3; }));
    std::deque<RemotePromise> hanging;
    for (int i = 0; i < 4095; ++i) hanging.push_back(a.newCall(NODE_INTERFACE_ID, HANG, 16).send());
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.hanging == 4095; })) << aLog_.hanging;
    later.resolve(a);
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    EXPECT_EQ(conn(C, A).stats().providesSent, 0u) << "handed off past A's answer table";
    EXPECT_EQ(conn(C, B).stats().resolvesSent, 1u);
    for (RemotePromise& sent : recipient_.sent)  // forwarded by C, which is at the bound
      EXPECT_EQ(loop_.run(awaitValue(std::move(sent))).code(), Errc::OUT_OF_MEMORY);
    recipient_.sent.clear();
    EXPECT_TRUE(conn(A, C).isOpen() && conn(C, A).isOpen() && conn(C, B).isOpen());
    hanging.clear();
    ASSERT_TRUE(runUntil(loop_, [&] { return conn(C, A).questionCount() == 0; }));
    Result<uint64_t> after = loop_.run(awaitValue(record(recipient_.held, 7)));
    EXPECT_TRUE(after.ok()) << errcName(after.code());
    EXPECT_EQ(aLog_.order, (std::vector<uint64_t>{7}));
    EXPECT_EQ(net_->pairCount(), 2u) << "B never connected to A";
    recipient_.clear();
  }
}

// The recipient's side of the same bound: with maxQuestions questions open from B to A, B's
// Accept would pass A's answer table, so B keeps C's vine as the reference: its calls go through
// C, in order, and the provision goes once the vine is released. For a capability in a call's
// params and for a promise resolved to A's object (the embargoed Accept).
TEST_F(HandoffTest, ARecipientWithMaxQuestionsOpenToTheHostKeepsTheVine) {
  for (bool resolved : {false, true}) {
    SCOPED_TRACE(resolved ? "a promise resolved to A's capability" : "A's capability in params");
    aLog_.order.clear();
    aLog_.hanging = 0;
    openNetwork();  // 64 KiB rings: 4095 calls of 16 bytes fit in flight
    {
      RemoteCap a = boot(C, A);
      std::deque<RemotePromise> hanging;
      RemoteCap bToA = boot(B, A);
      for (int i = 0; i < 4095; ++i)
        hanging.push_back(bToA.newCall(NODE_INTERFACE_ID, HANG, 16).send());
      ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.hanging == 4095; })) << aLog_.hanging;
      ASSERT_EQ(conn(B, A).questionCount(), 4095u);
      RemotePromise taken = [&] {
        if (!resolved) return take(boot(C, B), a, 3);
        CapPromise later = conn(C, B).newCapPromise();
        RemotePromise t = take(boot(C, B), later, 3);
        EXPECT_TRUE(runUntil(loop_, [&] { return conn(C, B).stats().promiseCallsQueued == 3; }));
        later.resolve(a);
        return t;
      }();
      ASSERT_TRUE(runUntil(loop_, [&] {
        Result<RpcConnection*> toA = net_->connection(B, A);
        return !toA.ok() || !(*toA)->isOpen() || (*toA)->stats().acceptsDeclined == 1;
      }));
      ASSERT_TRUE(net_->connection(B, A).ok() && conn(B, A).isOpen()) << "A dropped B";
      ASSERT_EQ(conn(B, A).stats().acceptsDeclined, 1u);
      for (uint64_t i = 3; i < 6; ++i)
        recipient_.sent.push_back(record(recipient_.held, Recipient::FIRST_RECORD + i));
      for (RemotePromise& p : recipient_.sent) {
        Result<uint64_t> r = loop_.run(awaitValue(std::move(p)));
        EXPECT_TRUE(r.ok()) << errcName(r.code());
      }
      recipient_.sent.clear();
      ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
      EXPECT_EQ(conn(C, A).stats().providesSent, 1u) << "C could hand off: its questions are few";
      EXPECT_EQ(conn(B, A).stats().acceptsSent, 0u);
      EXPECT_EQ(conn(A, B).stats().callsReceived, 4095u) << "only the hanging calls came direct";
      EXPECT_EQ(aLog_.order.size(), 6u);
      expectInOrder(aLog_.order, 6);
      EXPECT_TRUE(conn(A, B).isOpen() && conn(B, A).isOpen() && conn(A, C).isOpen());
      EXPECT_EQ(net_->vat(A).provisionCount(), 1u) << "kept while B holds the vine";
      recipient_.clear();
      ASSERT_TRUE(runUntil(
          loop_,
          [&] { return net_->vat(A).provisionCount() == 0 && conn(B, C).importCount() == 0; }))
          << "provisions " << net_->vat(A).provisionCount();
      hanging.clear();
      ASSERT_TRUE(runUntil(loop_, [&] { return conn(B, A).questionCount() == 0; }));
    }
  }
}

// The race the embargo exists for: C still has B's earlier calls to forward (readers take one
// message per turn, so A reads C's ring slowly) when B's direct calls reach A. Without the
// embargo A would deliver B's direct calls as soon as it has the Provide and the Accept.
TEST_F(HandoffTest, AnEmbargoHoldsDirectCallsBehindThoseTheIntroducerStillForwards) {
  openNetwork(64 * 1024, /*messagesPerTurn=*/1);
  {
    net_->holdConnects();  // B has no connection to A yet: it reads the Resolve, then waits
    RemotePromise child = boot(C, A).newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
    RemotePromise taken = take(boot(C, B), child.pipeline({0}), 100);
    ASSERT_TRUE(runUntil(loop_, [&] { return net_->pendingConnects() == 1; }));
    EXPECT_EQ(conn(C, A).stats().providesSent, 1u);
    for (uint64_t i = 100; i < 200; ++i) {  // still through C: B has not taken the Resolve
      recipient_.sent.push_back(record(recipient_.held, Recipient::FIRST_RECORD + i));
    }
    net_->releaseConnects();
    while (conn(B, A).stats().acceptsSent == 0) (void)loop_.run(loop_.sleep(Duration::zero()));
    EXPECT_LT(aLog_.order.size(), 200u) << "C has not forwarded everything yet";
    for (uint64_t i = 200; i < 300; ++i) {  // directly to A, pipelined on the embargoed Accept
      recipient_.sent.push_back(record(recipient_.held, Recipient::FIRST_RECORD + i));
    }
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 300; })) << aLog_.order.size();
    expectInOrder(aLog_.order, 300);
    EXPECT_EQ(conn(A, B).stats().acceptsEmbargoed, 1u) << "the Accept waited for C's Disembargo";
    EXPECT_EQ(conn(A, B).stats().callsReceived, 100u);
    for (RemotePromise& p : recipient_.sent) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
    recipient_.clear();
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
  }
  ASSERT_TRUE(runUntil(loop_, [&] {
    return net_->vat(A).provisionCount() == 0 && conn(A, B).answerCount() == 0 &&
           conn(A, C).answerCount() == 0 && aLog_.destroyed == aLog_.created - 1;
  }));
}

TEST_F(HandoffTest, APassedPipelinedCapabilityStaysAProxyWhenTheNetworkCannotIntroduce) {
  openNetwork();
  net_->refuseIntroductions(true);
  RemoteCap a = boot(C, A);
  auto [child, taken] = passAndCallWhileTheRouteChanges(a);
  EXPECT_EQ(conn(C, B).stats().resolvesSent, 1u) << "resolved to a proxy (senderHosted)";
  EXPECT_EQ(conn(C, A).stats().providesSent, 0u);
  EXPECT_EQ(conn(B, C).stats().disembargoesSent, 0u);
  EXPECT_EQ(net_->pairCount(), 2u) << "B never connected to A: every call went through C";
  for (RemotePromise& p : recipient_.sent) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
  recipient_.sent.clear();
  ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
}

// B's call X on a promise of C's reaches C after C sent the Resolve (to A's capability) and must
// wait there for the answer its params name; B's call Y, made after it read the Resolve, goes to
// A, held there by the embargo until C's Disembargo: that must not go before X has gone on to A.
// (The answer X waits for never comes, so Y is never delivered.)
TEST_F(HandoffTest, TheEmbargoHoldsBackCallsBehindOneStillWaitingAtTheIntroducer) {
  openNetwork();
  RemoteCap child = childOfA();
  CapPromise later = conn(C, B).newCapPromise();
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), later, 0))).ok());
  RemoteCap held = recipient_.held;  // B's reference to the promise
  later.resolve(child);              // the Resolve (thirdPartyHosted) goes to B
  {
    // Made by B before it read the Resolve: through C. Q never returns (HANG at A's child).
    RemotePromise q = held.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    Request x = held.newCall(NODE_INTERFACE_ID, RECORD, 64);
    ASSERT_TRUE(x.addCap(q.pipeline({0})).ok());  // waits at C for Q's answer
    x.initParams<Value>().setValue(1);
    RemotePromise px = x.send();
    ASSERT_TRUE(runUntil(loop_, [&] {
      return conn(B, C).stats().resolvesReceived == 1 &&
             conn(C, B).stats().disembargoesReceived == 1;
    }));
    RemotePromise py = record(held, 2);  // to A, behind the embargo
    (void)runUntil(
        loop_, [] { return false; }, 50ms);
    EXPECT_EQ(aLog_.hanging, 1);
    EXPECT_TRUE(aLog_.order.empty()) << "a call made after X reached A before it";
    EXPECT_EQ(conn(C, A).stats().disembargoesSent, 0u) << "the embargo lifted with X still at C";
  }  // the calls go (Q is cancelled at A)
  held = RemoteCap();
  recipient_.clear();
}

// Provider side, no embargo: C's call X on A's child waits at A, in the child's export queue on
// A-C, for an answer its params name (receiverAnswer; Q hangs). C then passes the child to B,
// which calls it directly. C made X before it passed the capability on, so B's calls do not
// reach the child before X: B's Accept waits at A until X went on (here: C cancels X).
TEST_F(HandoffTest, AHandoffDoesNotOvertakeACallWaitingAtTheProvidersExport) {
  openNetwork();
  RemoteCap child = childOfA();
  {
    RemotePromise q = child.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    Request x = child.newCall(NODE_INTERFACE_ID, RECORD, 64);
    ASSERT_TRUE(x.addCap(q.pipeline({0})).ok());  // waits at A for Q's answer
    x.initParams<Value>().setValue(1);
    RemotePromise px = x.send();
    RemotePromise taken = take(boot(C, B), child, 3);  // B records 1000..1002 on it, directly
    (void)runUntil(
        loop_, [] { return false; }, 100ms);
    EXPECT_EQ(conn(C, A).stats().providesSent, 1u);
    EXPECT_EQ(conn(A, B).stats().acceptsReceived, 1u);
    EXPECT_EQ(aLog_.hanging, 1);
    EXPECT_TRUE(aLog_.order.empty())
        << "B's calls reached the child ahead of C's earlier call X: " << aLog_.order.size();
    EXPECT_EQ(conn(A, B).stats().acceptsBehindQueue, 1u);
    { RemotePromise cancelled = std::move(px); }  // X is cancelled at A: B's calls go on
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 3; })) << aLog_.order.size();
    EXPECT_EQ(aLog_.order, (std::vector<uint64_t>{1000, 1001, 1002}));
    EXPECT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    recipient_.clear();
  }
  child = RemoteCap();
}

// Provider side, embargo: as above, but C passes a promise it resolves to the child. B's call 2,
// made before it read the Resolve, goes through C and queues at A behind X; C's Disembargo
// {provide} lets B's embargoed Accept go on only once the queue drained, so B's call 3 (same
// reference, made after it read the Resolve, directly to A) goes behind its call 2.
TEST_F(HandoffTest, TheEmbargoAtTheProviderWaitsForForwardedCallsQueuedThere) {
  openNetwork();
  RemoteCap child = childOfA();
  CapPromise later = conn(C, B).newCapPromise();
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), later, 0))).ok());
  RemoteCap held = recipient_.held;  // B's reference to the promise
  {
    RemotePromise q = child.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    Request x = child.newCall(NODE_INTERFACE_ID, RECORD, 64);
    ASSERT_TRUE(x.addCap(q.pipeline({0})).ok());  // C's X waits at A for Q's answer
    x.initParams<Value>().setValue(1);
    RemotePromise px = x.send();
    later.resolve(child);                // Provide to A, Resolve (thirdPartyHosted) to B
    RemotePromise p2 = record(held, 2);  // B, before it read the Resolve: through C
    ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, C).stats().disembargoesReceived == 1; }));
    RemotePromise p3 = record(held, 3);  // B, after: directly to A
    (void)runUntil(
        loop_, [] { return false; }, 100ms);
    EXPECT_EQ(conn(A, B).stats().acceptsReceived, 1u);
    EXPECT_EQ(aLog_.hanging, 1);
    EXPECT_TRUE(aLog_.order.empty())
        << "B's call 3 reached the child ahead of its call 2 (and of C's X); first: "
        << (aLog_.order.empty() ? 0 : aLog_.order[0]);
    EXPECT_EQ(conn(A, B).stats().acceptsBehindQueue, 1u);
    { RemotePromise cancelled = std::move(px); }  // X is cancelled at A: B's 2, then its 3
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 2; })) << aLog_.order.size();
    EXPECT_EQ(aLog_.order, (std::vector<uint64_t>{2, 3}));
  }
  held = RemoteCap();
  recipient_.clear();
  child = RemoteCap();
}

// The introducer holds B's Disembargo back while a call waits in the promise's queue at C
// (TheEmbargoHoldsBackCallsBehindOneStillWaitingAtTheIntroducer); when that call is cancelled
// instead of delivered, the emptied queue lets the Disembargo go on to A, and B's embargoed
// calls with it.
TEST_F(HandoffTest, ACancelledCallWaitingAtTheIntroducerLetsTheDisembargoGoOn) {
  openNetwork();
  RemoteCap child = childOfA();
  CapPromise later = conn(C, B).newCapPromise();
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), later, 0))).ok());
  RemoteCap held = recipient_.held;
  later.resolve(child);
  {
    RemotePromise q = held.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    std::optional<RemotePromise> px;
    {
      Request x = held.newCall(NODE_INTERFACE_ID, RECORD, 64);
      ASSERT_TRUE(x.addCap(q.pipeline({0})).ok());  // waits at C for Q's answer
      x.initParams<Value>().setValue(1);
      px.emplace(x.send());
    }
    ASSERT_TRUE(runUntil(loop_, [&] {
      return conn(B, C).stats().resolvesReceived == 1 &&
             conn(C, B).stats().disembargoesReceived == 1;
    }));
    RemotePromise py = record(held, 2);  // to A, behind the embargo
    (void)runUntil(
        loop_, [] { return false; }, 50ms);
    ASSERT_TRUE(aLog_.order.empty());
    px.reset();  // B cancels X: C drops it from the promise's queue
    ASSERT_TRUE(runUntil(loop_, [&] { return conn(C, B).stats().finishesReceived >= 1; }));
    EXPECT_TRUE(runUntil(
        loop_, [&] { return aLog_.order.size() == 1; }, 1000ms))
        << "Y never delivered: C-A disembargoes sent " << conn(C, A).stats().disembargoesSent;
    EXPECT_EQ(conn(C, A).stats().disembargoesSent, 1u);
  }
  held = RemoteCap();
  recipient_.clear();
}

TEST_F(HandoffTest, CallsOnAPromiseResolvedToAnotherVatsCapabilityKeepEOrderAcrossTheHandoff) {
  for (bool pipelined : {false, true}) {
    SCOPED_TRACE(pipelined ? "resolved to a pipelined capability" : "resolved to an import");
    aLog_.order.clear();
    openNetwork();
    {
      RemoteCap a = boot(C, A);
      CapPromise later = conn(C, B).newCapPromise();
      RemotePromise taken = take(boot(C, B), later, 100);
      ASSERT_TRUE(runUntil(loop_, [&] { return conn(C, B).stats().promiseCallsQueued == 100; }));
      std::optional<RemotePromise> child;
      if (pipelined) {
        child.emplace(a.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send());
        later.resolve(child->pipeline({0}));
      } else {
        later.resolve(childOfA());
      }
      callWhileTheRouteChanges(loop_, recipient_, 100, 200);
      ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 200; })) << aLog_.order.size();
      expectInOrder(aLog_.order, 200);
      EXPECT_EQ(conn(C, A).stats().providesSent, 1u);
      EXPECT_EQ(conn(B, C).stats().disembargoesSent, 1u);
      EXPECT_EQ(conn(C, A).stats().disembargoesSent, 1u);
      const uint64_t atC = conn(C, B).stats().callsReceived;
      ASSERT_TRUE(loop_.run(echo(recipient_.held, 5)).ok());
      EXPECT_EQ(conn(C, B).stats().callsReceived, atC) << "B calls A directly";
      ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
      recipient_.clear();
    }
    ASSERT_TRUE(runUntil(loop_, [&] {
      return net_->vat(A).provisionCount() == 0 && conn(A, B).answerCount() == 0 &&
             conn(C, B).exportCount() == 1 && conn(C, A).questionCount() == 0;
    }));
  }
}

// A promise import is not handed off (its host would give the recipient the promise's node as a
// plain object, whose calls fail while it is pending): B passes C's promise on to E through a
// proxy, E's calls queue at C's promise export, and reach the resolution once C settles it.
TEST_F(HandoffTest, APromiseImportPassedOnIsProxiedAndItsCallsWaitForTheResolution) {
  openNetwork();
  CapPromise later = conn(C, B).newCapPromise();
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), later, 0))).ok());
  ASSERT_FALSE(recipient_.held.isNull());
  RemotePromise passed = take(boot(B, E), recipient_.held, 3);
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(C, B).stats().promiseCallsQueued == 3; }));
  EXPECT_EQ(conn(B, C).stats().providesSent, 0u) << "no handoff of a promise";
  later.resolve(std::make_unique<Node>(0, aLog_));  // aLog_: it outlives the network
  for (RemotePromise& p : recipientE_.sent) {
    Result<uint64_t> r = loop_.run(awaitValue(std::move(p)));
    EXPECT_TRUE(r.ok()) << errcName(r.code());
  }
  recipientE_.sent.clear();
  EXPECT_EQ(aLog_.order,
            (std::vector<uint64_t>{Recipient::FIRST_RECORD, Recipient::FIRST_RECORD + 1,
                                   Recipient::FIRST_RECORD + 2}));
  ASSERT_TRUE(loop_.run(awaitValue(std::move(passed))).ok());
}

TEST_F(HandoffTest, AShortenedReferenceSurvivesTheIntroducersDeath) {
  openNetwork();
  {
    RemoteCap a = boot(C, A);
    RemotePromise child = a.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
    RemotePromise taken = take(boot(C, B), child.pipeline({0}), 1);
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    // The Accept returned: the route is B -> A now.
    ASSERT_TRUE(runUntil(loop_, [&] {
      return conn(A, C).stats().disembargoesReceived == 1 &&
             conn(B, A).stats().returnsReceived == 1;
    }));
  }
  net_->killVat(C);
  loop_.runUntilIdle();
  EXPECT_EQ(net_->connection(B, C).code(), Errc::DISCONNECTED);
  Result<uint64_t> v = loop_.run(echo(recipient_.held, 5));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 6u);
  ASSERT_EQ(aLog_.order.size(), 1u);
  EXPECT_EQ(aLog_.order[0], Recipient::FIRST_RECORD);
}

TEST_F(HandoffTest, TheIntroducerDyingBeforeThePromiseResolvesFailsTheRecipientsCalls) {
  openNetwork();
  {
    RemoteCap a = boot(C, A);
    RemotePromise hanging = a.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    RemotePromise taken = take(boot(C, B), hanging.pipeline({0}), 3);
    ASSERT_TRUE(runUntil(loop_, [&] { return recipient_.sent.size() == 3; }));
    ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, C).stats().pipelinedCallsQueued == 3; }));
    net_->killVat(C);
  }
  (void)expectAllFail(recipient_.sent, Errc::DISCONNECTED);
  EXPECT_EQ(loop_.run(echo(recipient_.held, 1)).code(), Errc::DISCONNECTED);
  recipient_.clear();
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.hanging == 0; }));
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  EXPECT_TRUE(aLog_.order.empty());
}

TEST_F(HandoffTest, APromiseThatBreaksBreaksTheRecipientsReference) {
  openNetwork();
  RemoteCap a = boot(C, A);
  RemotePromise failing = a.newCall(NODE_INTERFACE_ID, FAIL_LATER, 16).send();
  RemotePromise taken = take(boot(C, B), failing.pipeline({0}), 2);
  ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(B, C).stats().resolvesReceived == 1; }));
  Error e = expectAllFail(recipient_.sent, Errc::FAILED);
  EXPECT_STREQ(e.detail, "boom later");
  Result<uint64_t> later = loop_.run(echo(recipient_.held, 1));
  EXPECT_EQ(later.code(), Errc::FAILED);
  EXPECT_EQ(conn(C, A).stats().providesSent, 0u);
  EXPECT_EQ(conn(B, C).stats().disembargoesSent, 0u);
}

TEST_F(HandoffTest, APromisedCapabilityDroppedByTheRecipientIsNeverProvided) {
  openNetwork();
  RemotePromise gated = boot(C, F).newCall(NODE_INTERFACE_ID, 0, 16).send();
  {
    // Dropped unsent: the promise export never existed.
    Request r = boot(C, B).newCall(NODE_INTERFACE_ID, TAKE, 64);
    ASSERT_TRUE(r.addCap(gated.pipeline({0})).ok());
  }
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), gated.pipeline({0}), 2))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(F, C).stats().pipelinedCallsQueued == 2; }));
  recipient_.clear();  // B drops the promise (and its calls) before it resolves
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(C, B).exportCount() == 1; }));
  gate_.open();
  Result<Response> r =
      loop_.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(gated));
  ASSERT_TRUE(r.ok()) << errcName(r.code());
  loop_.runUntilIdle();
  EXPECT_EQ(conn(C, F).stats().providesSent, 0u);
  EXPECT_EQ(conn(C, B).stats().resolvesSent, 0u);
  EXPECT_EQ(net_->vat(F).provisionCount(), 0u);
  EXPECT_EQ(conn(C, F).questionCount(), 1u) << "only the test's own question is left";
}

TEST_F(HandoffTest, TheIntroducerDyingBeforeTheRecipientTakesTheResolutionFreesEverything) {
  openNetwork();
  {
    RemotePromise gated = boot(C, F).newCall(NODE_INTERFACE_ID, 0, 16).send();
    RemotePromise taken = take(boot(C, B), gated.pipeline({0}), 2);
    ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    net_->holdConnects();  // B cannot reach F yet: the Resolve waits in B's reader
    gate_.open();
    ASSERT_TRUE(runUntil(
        loop_, [&] { return net_->pendingConnects() == 1 && net_->vat(F).provisionCount() == 1; }));
  }
  net_->killVat(C);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(F).provisionCount() == 0; }));
  net_->releaseConnects();
  loop_.runUntilIdle();
  // B's calls made through C were delivered (or failed with C); later ones fail DISCONNECTED.
  for (RemotePromise& p : recipient_.sent) {
    Result<uint64_t> v = loop_.run(awaitValue(std::move(p)));
    EXPECT_TRUE(v.ok() || v.code() == Errc::DISCONNECTED) << errcName(v.code());
  }
  recipient_.sent.clear();
  EXPECT_EQ(loop_.run(echo(recipient_.held, 1)).code(), Errc::DISCONNECTED);
  recipient_.clear();
  ASSERT_TRUE(runUntil(loop_, [&] { return gate_.log.destroyed == gate_.log.created; }));
  EXPECT_EQ(net_->vat(F).waitingAcceptCount(), 0u);
}

TEST_F(HandoffTest, TheHostDyingBreaksTheRecipientsPromisedReferenceAndNothingElse) {
  for (bool beforeTheResolve : {true, false}) {
    SCOPED_TRACE(beforeTheResolve ? "before the answer returned" : "while B connects to it");
    openNetwork();
    {
      RemotePromise gated = boot(C, F).newCall(NODE_INTERFACE_ID, 0, 16).send();
      RemotePromise taken = take(boot(C, B), gated.pipeline({0}), 2);
      ASSERT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
      if (!beforeTheResolve) {
        net_->holdConnects();
        gate_.open();
        ASSERT_TRUE(runUntil(loop_, [&] { return net_->pendingConnects() == 1; }));
      }
      net_->killVat(F);
      net_->releaseConnects();
      EXPECT_EQ(loop_.run(awaitValue(std::move(gated))).code(),
                beforeTheResolve ? Errc::DISCONNECTED : Errc::OK);
    }
    ASSERT_TRUE(runUntil(loop_, [&] { return conn(B, C).stats().resolvesReceived == 1; }));
    loop_.runUntilIdle();
    // B's calls made before went through C to F: failed with F, or served before it died.
    for (RemotePromise& p : recipient_.sent) {
      EXPECT_EQ(loop_.run(awaitValue(std::move(p))).code(),
                beforeTheResolve ? Errc::DISCONNECTED : Errc::OK);
    }
    recipient_.sent.clear();
    EXPECT_EQ(loop_.run(echo(recipient_.held, 1)).code(), Errc::DISCONNECTED);
    EXPECT_EQ(conn(B, C).stats().disembargoesSent, beforeTheResolve ? 0u : 1u);
    recipient_.clear();
    ASSERT_TRUE(runUntil(loop_, [&] {
      return conn(C, B).exportCount() == 1 && conn(C, B).answerCount() == 0 &&
             conn(B, C).importCount() == 0;
    }));
    EXPECT_TRUE(conn(C, B).isOpen());
    EXPECT_EQ(gate_.log.destroyed, gate_.log.created);
  }
}

TEST_F(HandoffTest, AResolveCrossingTheRecipientsReleaseGivesTheVineBackAtOnce) {
  openNetwork();
  RawVat c(loop_, net_->vat(B), C, &aRoot_);  // B's connection to a raw introducer C
  c.send([](wire::Message::Builder m) {
    wire::Call::Builder call = m.initCall();
    call.setQuestionId(1);
    call.getTarget().setImportedCap(0);
    call.setInterfaceId(NODE_INTERFACE_ID);
    call.setMethodId(HANG);
    call.initParams().initCapTable(1)[0].setSenderPromise(3);
  });
  ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.hanging == 1; }));
  c.finish(1);  // B drops the call and the promise with it: Release(3)
  EXPECT_EQ(c.nextReturn(1), Errc::CANCELLED);
  c.expectNext([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 3u);
  });
  c.send([](wire::Message::Builder m) {  // crossing it
    wire::Resolve::Builder r = m.initResolve();
    r.setPromiseId(3);
    wire::ThirdPartyCapDescriptor::Builder t = r.initCap().initThirdPartyHosted();
    t.setVatId(A);
    t.setProvisionId(1);
    t.setVineId(4);
  });
  c.expectNext([](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RELEASE);
    EXPECT_EQ(m.getRelease().getId(), 4u);
    EXPECT_EQ(m.getRelease().getReferenceCount(), 1u);
  });
  EXPECT_EQ(c.victim().stats().disembargoesSent, 0u);
  EXPECT_EQ(c.victim().stats().acceptsSent, 0u);
  EXPECT_TRUE(c.victim().isOpen());
}

// The introducer's side, with a raw recipient: C takes one Disembargo {accept} per Resolve it
// sent; a second one is hostile, and aborts only the recipient's connection.
TEST_F(HandoffTest, ASecondDisembargoFromTheRecipientAbortsOnlyItsConnection) {
  openNetwork();
  constexpr VatId RAW = 77;
  RawVat b(loop_, net_->vat(C), RAW, nullptr);  // C's connection to a raw recipient
  RemotePromise gated = boot(C, F).newCall(NODE_INTERFACE_ID, 0, 16).send();
  RemotePromise taken = take(b.victim().bootstrap(), gated.pipeline({0}), 0);
  uint32_t promise = 0;
  b.expectNext([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    auto caps = m.getCall().getParams().getCapTable();
    ASSERT_EQ(caps.size(), 1u);
    ASSERT_EQ(caps[0].which(), wire::CapDescriptor::SENDER_PROMISE);
    promise = caps[0].getSenderPromise();
  });
  gate_.open();
  b.expectNext([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RESOLVE);
    EXPECT_EQ(m.getResolve().getPromiseId(), promise);
    ASSERT_EQ(m.getResolve().getCap().which(), wire::CapDescriptor::THIRD_PARTY_HOSTED);
    EXPECT_EQ(m.getResolve().getCap().getThirdPartyHosted().getVatId(), F);
  });
  EXPECT_EQ(net_->vat(F).provisionCount(), 1u);
  auto disembargo = [&](wire::Message::Builder m) {
    wire::Disembargo::Builder d = m.initDisembargo();
    d.initTarget().setImportedCap(promise);
    d.initContext().setAccept();
  };
  b.send(disembargo);
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(F, C).stats().disembargoesReceived == 1; }));
  EXPECT_TRUE(b.victim().isOpen());
  b.send(disembargo);
  EXPECT_TRUE(b.abortedWithProtocolError());
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(F).provisionCount() == 0; }))
      << "the recipient's death reclaims the provision";
  EXPECT_TRUE(conn(C, F).isOpen());
  EXPECT_EQ(loop_.run(awaitValue(std::move(taken))).code(), Errc::PROTOCOL_ERROR);
  ASSERT_TRUE(
      loop_.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(gated)).ok());
}

// The introducer's side of a handoff in a Return, with a raw recipient: D takes one Disembargo
// {accept} through the vine (the recipient pipelined calls on the answer) and passes it on to
// the host; a second one is hostile, and aborts only the recipient's connection.
TEST_F(HandoffTest, ASecondDisembargoThroughAVineAbortsOnlyTheRecipientsConnection) {
  openNetwork();
  relay_.toA = boot(D, A);
  constexpr VatId RAW = 77;
  RawVat b(loop_, net_->vat(D), RAW, &relay_);  // D's connection to a raw recipient
  b.send([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(GET_AWAITED);
  });
  uint32_t vine = 0;
  b.expectNext([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::RETURN);
    auto caps = m.getReturn().getResults().getCapTable();
    ASSERT_EQ(caps.size(), 1u);
    ASSERT_EQ(caps[0].which(), wire::CapDescriptor::THIRD_PARTY_HOSTED);
    EXPECT_EQ(caps[0].getThirdPartyHosted().getVatId(), A);
    vine = caps[0].getThirdPartyHosted().getVineId();
  });
  auto disembargo = [&](wire::Message::Builder m) {
    wire::Disembargo::Builder d = m.initDisembargo();
    d.initTarget().setImportedCap(vine);
    d.initContext().setAccept();
  };
  b.send(disembargo);
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, D).stats().disembargoesReceived == 1; }));
  EXPECT_TRUE(b.victim().isOpen());
  b.send(disembargo);
  EXPECT_TRUE(b.abortedWithProtocolError());
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).provisionCount() == 0; }))
      << "the recipient's death reclaims the provision";
  EXPECT_TRUE(conn(D, A).isOpen());
}

// The provider's side, driven by raw vats: D introduces (Provide, then Disembargo), E accepts.
class EmbargoTest : public HandoffTest {
 protected:
  void SetUp() override {
    openNetwork();
    d_.emplace(loop_, net_->vat(A), D, &aRoot_);
    e_.emplace(loop_, net_->vat(A), E, nullptr);
  }
  void TearDown() override {
    e_.reset();
    d_.reset();
  }
  std::optional<RawVat> d_, e_;
};

// One Accept waits per provision behind the introducer's queued calls: a second Accept for the
// same provision gets NOT_FOUND, and the first still waits, its provision kept.
TEST_F(EmbargoTest, ASecondAcceptForAProvisionWaitingBehindQueuedCallsGetsNotFound) {
  d_->send([](wire::Message::Builder m) {  // question 1: hangs
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(1);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(HANG);
  });
  d_->send([](wire::Message::Builder m) {  // question 2: waits at export 0 for answer 1
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(2);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(RECORD);
    wire::Payload::Builder params = c.initParams();
    writeCapPointer(params.getContent().initAs<CapParam>(), 0, 0);
    wire::PromisedAnswer::Builder pa = params.initCapTable(1)[0].initReceiverAnswer();
    pa.setQuestionId(1);
    pa.initTransform(1).set(0, 0);
  });
  d_->provide(3, 0, E, 5);
  e_->accept(1, D, 5);
  ASSERT_TRUE(runUntil(loop_, [&] { return e_->victim().stats().acceptsBehindQueue == 1; }));
  e_->accept(2, D, 5);
  EXPECT_EQ(e_->nextReturn(2), Errc::NOT_FOUND);
  EXPECT_EQ(e_->victim().stats().acceptsBehindQueue, 1u);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 1u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 1u);
  EXPECT_TRUE(e_->victim().isOpen());
  EXPECT_TRUE(aLog_.order.empty());
}

TEST_F(EmbargoTest, AnEmbargoedAcceptWaitsForTheIntroducersDisembargo) {
  d_->provide(1, 0, E, 5);
  e_->accept(1, D, 5, /*embargo=*/true);
  e_->recordOn(2, 1, 7);  // queued on the Accept
  ASSERT_TRUE(runUntil(loop_, [&] { return e_->victim().stats().acceptsEmbargoed == 1; }));
  loop_.runUntilIdle();
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 1u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 1u);
  EXPECT_TRUE(aLog_.order.empty()) << "the embargo holds the recipient's call";
  d_->send([](wire::Message::Builder m) {  // the introducer's forwarded call goes first
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(2);
    c.getTarget().setImportedCap(0);
    c.setInterfaceId(NODE_INTERFACE_ID);
    c.setMethodId(RECORD);
    c.initParams().getContent().initAs<Value>().setValue(6);
  });
  d_->disembargoProvide(0, 1);
  EXPECT_EQ(e_->nextReturn(1), Errc::OK);
  EXPECT_EQ(e_->nextReturn(2), Errc::OK);
  EXPECT_EQ(d_->nextReturn(2), Errc::OK);
  EXPECT_EQ(d_->nextReturn(1), Errc::OK) << "the Provide returns once accepted";
  EXPECT_EQ(aLog_.order, (std::vector<uint64_t>{6, 7}));
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
}

TEST_F(EmbargoTest, ADisembargoBeforeTheAcceptLetsItCompleteAtOnce) {
  d_->provide(1, 0, E, 5);
  d_->disembargoProvide(0, 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return d_->victim().stats().disembargoesReceived == 1; }));
  e_->accept(1, D, 5, /*embargo=*/true);
  EXPECT_EQ(e_->nextReturn(1), Errc::OK);
  EXPECT_EQ(d_->nextReturn(1), Errc::OK);
  EXPECT_EQ(e_->victim().stats().acceptsEmbargoed, 0u);
}

TEST_F(EmbargoTest, AnAcceptWithoutEmbargoIsNotHeldAndALaterDisembargoIsIgnored) {
  d_->provide(1, 0, E, 5);
  e_->accept(1, D, 5);
  EXPECT_EQ(e_->nextReturn(1), Errc::OK);
  EXPECT_EQ(d_->nextReturn(1), Errc::OK);
  d_->disembargoProvide(0, 1);  // the Provide's answer lives until its Finish
  ASSERT_TRUE(runUntil(loop_, [&] { return d_->victim().stats().disembargoesReceived == 1; }));
  EXPECT_TRUE(d_->victim().isOpen());
}

TEST_F(EmbargoTest, TheIntroducersFinishFailsAWaitingEmbargoedAcceptNotFound) {
  d_->provide(1, 0, E, 5);
  e_->accept(1, D, 5, true);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == 1; }));
  d_->finish(1);
  EXPECT_EQ(d_->nextReturn(1), Errc::CANCELLED);
  EXPECT_EQ(e_->nextReturn(1), Errc::NOT_FOUND);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  EXPECT_TRUE(e_->victim().isOpen());
}

TEST_F(EmbargoTest, TheIntroducersDeathFailsAWaitingEmbargoedAcceptDisconnected) {
  d_->provide(1, 0, E, 5);
  e_->accept(1, D, 5, true);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == 1; }));
  d_.reset();
  EXPECT_EQ(e_->nextReturn(1), Errc::DISCONNECTED);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
}

TEST_F(EmbargoTest, TheRecipientsFinishOrDeathFreesAWaitingEmbargoedAccept) {
  d_->provide(1, 0, E, 5);
  e_->accept(1, D, 5, true);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == 1; }));
  e_->finish(1);
  EXPECT_EQ(e_->nextReturn(1), Errc::CANCELLED);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 1u) << "the provision stays for the introducer";
  d_->disembargoProvide(0, 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return d_->victim().stats().disembargoesReceived == 1; }));
  e_->accept(2, D, 5, true);  // the provision was disembargoed: taken at once
  EXPECT_EQ(e_->nextReturn(2), Errc::OK);
  d_->provide(2, 0, E, 6);
  e_->accept(3, D, 6, true);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == 1; }));
  e_.reset();
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), 0u);
  EXPECT_EQ(net_->vat(A).provisionCount(), 1u);
  d_->finish(2);
  ASSERT_TRUE(runUntil(loop_, [&] { return net_->vat(A).provisionCount() == 0; }));
}

TEST_F(EmbargoTest, OneEmbargoedAcceptPerProvisionAndTheirWaitIsBoundedPerRecipient) {
  d_->provide(1, 0, E, 1);
  e_->accept(1, D, 1, true);
  e_->accept(2, D, 1, true);
  EXPECT_EQ(e_->nextReturn(2), Errc::NOT_FOUND);
  constexpr uint32_t LIMIT = VatNetwork::MAX_WAITING_ACCEPTS_PER_PEER;
  for (uint32_t i = 2; i <= LIMIT + 1; ++i) {
    d_->provide(i, 0, E, i);
    e_->accept(i + 1, D, i, true);
  }
  EXPECT_EQ(e_->nextReturn(LIMIT + 2), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(net_->vat(A).waitingAcceptCount(), LIMIT);
  EXPECT_EQ(net_->vat(A).provisionCount(), LIMIT + 1) << "the refused Accept left its provision";
  EXPECT_TRUE(e_->victim().isOpen());
}

TEST_F(EmbargoTest, HostileDisembargoesAbortWithProtocolError) {
  // Each case provides under a provision id of its own: the network remembers the highest it
  // took from C, and a repeated one is refused as a replay before the case reaches its point.
  struct Case {
    const char* what;
    std::function<void(RawVat&, uint64_t provision)> fill;
  };
  auto disembargo = [](uint32_t exportId, uint32_t q) {
    return [=](RawVat& v, uint64_t) { v.disembargoProvide(exportId, q); };
  };
  const Case cases[] = {
      {"provide of no answer", disembargo(0, 9)},
      {"provide naming a call",
       [](RawVat& v, uint64_t) {
         v.send([](wire::Message::Builder m) {
           wire::Call::Builder c = m.initCall();
           c.setQuestionId(1);
           c.getTarget().setImportedCap(0);
           c.setInterfaceId(NODE_INTERFACE_ID);
           c.setMethodId(HANG);
         });
         v.disembargoProvide(0, 1);
       }},
      {"provide of another export",
       [](RawVat& v, uint64_t provision) {
         v.provide(1, 0, E, provision);
         v.disembargoProvide(3, 1);
       }},
      {"second disembargo",
       [](RawVat& v, uint64_t provision) {
         v.provide(1, 0, E, provision);
         v.disembargoProvide(0, 1);
         v.disembargoProvide(0, 1);
       }},
      {"provide after its finish",
       [](RawVat& v, uint64_t provision) {
         v.provide(1, 0, E, provision);
         v.finish(1);
         v.disembargoProvide(0, 1);
       }},
      {"accept of an export that is no promise",
       [](RawVat& v, uint64_t) {
         v.send([](wire::Message::Builder m) {
           wire::Disembargo::Builder d = m.initDisembargo();
           d.initTarget().setImportedCap(0);
           d.initContext().setAccept();
         });
       }},
      {"provide of a promised answer (refused), then a disembargo naming no export",
       [](RawVat& v, uint64_t provision) {
         v.send([](wire::Message::Builder m) {  // question 7: a live answer to name
           wire::Call::Builder c = m.initCall();
           c.setQuestionId(7);
           c.getTarget().setImportedCap(0);
           c.setInterfaceId(NODE_INTERFACE_ID);
           c.setMethodId(HANG);
         });
         v.send([&](wire::Message::Builder m) {
           wire::Provide::Builder p = m.initProvide();
           p.setQuestionId(1);
           p.initTarget().initPromisedAnswer().setQuestionId(7);
           p.setRecipient(E);
           p.setProvisionId(provision);
         });
         v.disembargoProvide(0xffffffffu, 1);
       }},
      {"a promised answer target",
       [](RawVat& v, uint64_t provision) {
         v.provide(1, 0, E, provision);
         v.send([](wire::Message::Builder m) {
           wire::Disembargo::Builder d = m.initDisembargo();
           d.initTarget().initPromisedAnswer().setQuestionId(1);
           d.initContext().setProvide(1);
         });
       }},
      {"receiver loopback",
       [](RawVat& v, uint64_t) {
         v.send([](wire::Message::Builder m) {
           wire::Disembargo::Builder d = m.initDisembargo();
           d.initTarget().setImportedCap(0);
           d.initContext().setReceiverLoopback(1);
         });
       }},
  };
  uint64_t provision = 5;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    RawVat v(loop_, net_->vat(A), C, &aRoot_);
    c.fill(v, ++provision);
    EXPECT_TRUE(v.abortedWithProtocolError());
    const std::string why = v.victim().failure().detail;
    EXPECT_EQ(why.find("a replay"), std::string::npos) << why;
    EXPECT_EQ(net_->vat(A).provisionCount(), 0u);
  }
  loop_.runUntilIdle();
  EXPECT_EQ(aLog_.hanging, 0);
}

// Accepts waiting behind the introducer's queued call do not count against the bound on
// Accepts waiting for their Provide (MAX_WAITING_ACCEPTS_PER_PEER, 16): each has its provision.
// C passes A's child to B 17 times while one of its calls waits at A; all 17 complete.
TEST_F(HandoffTest, SeventeenHandoffsBehindOneQueuedCallAllComplete) {
  openNetwork();
  RemoteCap child = childOfA();
  std::vector<RemoteCap> kept;
  std::vector<RemotePromise> bSent;
  {
    RemotePromise q = child.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    Request x = child.newCall(NODE_INTERFACE_ID, RECORD, 64);
    ASSERT_TRUE(x.addCap(q.pipeline({0})).ok());  // waits at A for Q's answer
    x.initParams<Value>().setValue(1);
    RemotePromise px = x.send();
    for (int i = 0; i < 17; ++i) {
      ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), child, 1))).ok());
      kept.push_back(recipient_.held);
      for (RemotePromise& p : recipient_.sent) bSent.push_back(std::move(p));
      recipient_.sent.clear();
    }
    (void)runUntil(
        loop_, [] { return false; }, 100ms);
    EXPECT_EQ(conn(A, B).stats().acceptsReceived, 17u);
    EXPECT_EQ(conn(A, B).stats().acceptsBehindQueue, 17u);
    { RemotePromise cancelled = std::move(px); }  // X cancelled: B's calls go on
    EXPECT_TRUE(runUntil(
        loop_, [&] { return aLog_.order.size() == 17; }, 1000ms))
        << aLog_.order.size();
    int failed = 0;
    for (RemotePromise& p : bSent) {
      Result<uint64_t> r = loop_.run(awaitValue(std::move(p)));
      if (!r.ok()) {
        ++failed;
        ADD_FAILURE() << "B's call failed: " << errcName(r.code());
      }
    }
    EXPECT_EQ(failed, 0);
  }
  kept.clear();
  recipient_.clear();
  child = RemoteCap();
}

// An object shared is watched once (sharedObjectsAlive), however often it is handed off.
TEST_F(HandoffTest, AnObjectHandedOffManyTimesIsWatchedOnce) {
  openNetwork();
  RemoteCap child = childOfA();
  for (int i = 0; i < 300; ++i) {
    ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), child, 0))).ok());
    recipient_.clear();
  }
  (void)runUntil(
      loop_, [] { return false; }, 50ms);
  EXPECT_EQ(conn(A, B).stats().acceptsReceived, 300u);
  EXPECT_EQ(conn(A, C).sharedObjectsWatched(), 1u);
  child = RemoteCap();
}

// An Accept waiting behind a queued call ends when the introducer's connection to the provider
// dies, or when the recipient's connection to the introducer dies (the vine goes and the
// introducer reclaims the provision): B's calls fail, they do not hang.
TEST_F(HandoffTest, AnAcceptBehindQueuedCallsEndsWhenTheIntroducerOrTheVineGoes) {
  for (int variant = 0; variant < 2; ++variant) {
    SCOPED_TRACE(variant == 0 ? "C-A closed" : "B-C closed");
    aLog_.order.clear();
    openNetwork();
    RemoteCap child = childOfA();
    RemotePromise q = child.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    std::optional<RemotePromise> pxo;
    {
      Request x = child.newCall(NODE_INTERFACE_ID, RECORD, 64);
      ASSERT_TRUE(x.addCap(q.pipeline({0})).ok());
      x.initParams<Value>().setValue(1);
      pxo.emplace(x.send());
    }
    RemotePromise px = std::move(*pxo);
    pxo.reset();
    ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), child, 2))).ok());
    (void)runUntil(
        loop_, [] { return false; }, 50ms);
    ASSERT_EQ(conn(A, B).stats().acceptsBehindQueue, 1u);
    if (variant == 0) {
      conn(C, A).close(Error(Errc::FAILED, "test"));
    } else {
      conn(B, C).close(Error(Errc::FAILED, "test"));
    }
    for (RemotePromise& p : recipient_.sent) {
      Result<uint64_t> r = loop_.run(loop_.deadline(awaitValue(std::move(p)), 2s));
      EXPECT_NE(r.code(), Errc::TIMED_OUT) << "B's call hangs";
      EXPECT_FALSE(r.ok());
    }
    recipient_.clear();
    EXPECT_TRUE(runUntil(loop_, [&] { return net_->vat(A).waitingAcceptCount() == 0; }));
    EXPECT_TRUE(aLog_.order.empty());
    { RemotePromise a = std::move(px), b = std::move(q); }
    child = RemoteCap();
    closeNetwork();
  }
}

// As AHandoffDoesNotOvertakeACallWaitingAtTheProvidersExport, with X delivered (Q returns)
// rather than cancelled: B's calls follow it.
TEST_F(HandoffTest, AHandoffGoesBehindACallDeliveredOnceItsParamsAnswerReturned) {
  openNetwork(64 * 1024, 1);
  RemoteCap child = childOfA();
  {
    RemotePromise q = child.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
    std::optional<RemotePromise> px;
    {
      Request x = child.newCall(NODE_INTERFACE_ID, RECORD, 64);
      ASSERT_TRUE(x.addCap(q.pipeline({0})).ok());
      x.initParams<Value>().setValue(1);
      px.emplace(x.send());
    }
    RemotePromise taken = take(boot(C, B), child, 3);
    ASSERT_TRUE(runUntil(loop_, [&] { return aLog_.order.size() == 4; })) << aLog_.order.size();
    EXPECT_EQ(aLog_.order, (std::vector<uint64_t>{1, 1000, 1001, 1002}));
    EXPECT_TRUE(loop_.run(awaitValue(std::move(*px))).ok());
    EXPECT_TRUE(loop_.run(awaitValue(std::move(taken))).ok());
    recipient_.clear();
  }
  child = RemoteCap();
}

// sharedObjectsAlive() watches the objects a connection owned, not those that only passed
// through it: B relays A's child (owned by A's connection to C) to E and lets go of it, and A's
// connection to B then reports nothing shared (a ServedClient B is not kept for C's object).
TEST_F(HandoffTest, SharedObjectsAliveIgnoresObjectsOnlyRelayed) {
  openNetwork();
  RemoteCap child = childOfA();
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(C, B), child, 0))).ok());
  RemoteCap atB = recipient_.held;
  ASSERT_EQ(atB.connection(), &conn(B, A));
  recipient_.clear();
  {
    // A plain import of the same export of A-B (SELF returns the node: the export is found by
    // object), which B can hand off.
    Result<Response> r = loop_.run([](RemoteCap c) -> Promise<Response> {
      co_return co_await c.newCall(NODE_INTERFACE_ID, SELF, 16).send();
    }(atB));
    ASSERT_TRUE(r.ok()) << errcName(r.code());
    atB = r->getCap(0).value().remote;
  }
  ASSERT_TRUE(loop_.run(awaitValue(take(boot(B, E), atB, 0))).ok());  // B hands it to E
  ASSERT_EQ(conn(A, E).stats().acceptsReceived, 1u);
  atB = RemoteCap();
  (void)runUntil(
      loop_, [] { return false; }, 50ms);
  // B let go of every reference: A-B exports nothing but its bootstrap.
  ASSERT_TRUE(runUntil(loop_, [&] { return conn(A, B).exportCount() == 1; }))
      << conn(A, B).exportCount();
  EXPECT_FALSE(conn(A, B).sharedObjectsAlive());
  EXPECT_TRUE(conn(A, C).sharedObjectsAlive()) << "C's connection owned it, and it lives";
  recipientE_.clear();
  child = RemoteCap();
}

}  // namespace
}  // namespace agate::rpc::test
