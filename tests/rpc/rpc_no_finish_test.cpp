// Calls sent without promise pipelining (Request::noPipelining, Call.noPromisePipelining): a
// Return that carries no capability ends the call by itself (Return.noFinishNeeded), so both
// sides free their entries at the Return and no Finish is sent. Covered here over LOCAL channels
// on one loop: the two-message exchange, every kind of Return (empty, with content, exception,
// canceled, served synchronously or from a driver coroutine), results with capabilities (Finish
// as before), pipeline() refused, cancellation, a Finish crossing the Return, id reuse and peer
// death. The wire forms and hostile peers: rpc_hostile_test; the word-level forms:
// rpc_hot_path_test.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

constexpr uint64_t LATER_INTERFACE = 0x7a7e'0000'0000'0001ull;
enum LaterMethod : uint16_t { EMPTY_LATER = 0, VALUE_LATER = 1 };

// Answers after a loop turn, from its driver coroutine: empty results, or a Value of 7.
class Later final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    co_await EventLoop::current()->yield();
    if (methodId == VALUE_LATER) {
      Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
      AGATE_CO_TRY(out);
      out->setValue(7);
    }
    co_return {};
  }
};

// Awaits `p` without consuming it: the promise is still held when this returns.
Promise<uint64_t> valueOf(RemotePromise& p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  uint64_t v = 0;
  AGATE_CO_TRY(r->tryRead<Value>([&](Value::Reader x) { v = x.getValue(); }));
  co_return v;
}

Promise<void> awaitAll(std::vector<RemotePromise>& pending) {
  for (RemotePromise& p : pending) AGATE_CO_TRY(co_await p);
  co_return {};
}

class RpcNoFinishTest : public ::testing::Test {
 protected:
  RemotePromise record(const RemoteCap& cap, uint64_t v) {
    Request req = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
    req.initParams<Value>().setValue(v);
    return req.noPipelining().send();
  }

  Watchdog watchdog_{"rpc_no_finish_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  Node root_{0, log_};
};

TEST_F(RpcNoFinishTest, ANullCallIsTwoMessagesAndBothEntriesAreFreedAtItsReturn) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  for (int i = 0; i < 3; ++i) {
    // No params: the Call and the empty Return are both written as words.
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, RECORD, 0).noPipelining().send();
    EXPECT_EQ(p.questionId(), 1u) << "the id is reused without a Finish";
    EXPECT_EQ(loop_.run(valueOf(p)).value(), 0u);
    // The promise is still held, yet both entries are gone.
    EXPECT_EQ(pair.client().questionCount(), 0u);
    EXPECT_EQ(pair.server().answerCount(), 0u);
  }  // dropping a promise whose question was freed under it sends nothing
  loop_.runUntilIdle();
  EXPECT_EQ(log_.order.size(), 3u);
  EXPECT_EQ(pair.client().stats().messagesSent, 3u) << "three Calls, no Finish";
  EXPECT_EQ(pair.server().stats().messagesSent, 3u) << "three Returns";
  EXPECT_EQ(pair.client().stats().finishesSent, 0u);
  EXPECT_EQ(pair.server().stats().finishesReceived, 0u);
  EXPECT_EQ(pair.server().stats().returnsNoFinishNeeded, 3u);
  EXPECT_EQ(pair.client().handleCount(), 1u) << "only `cap`";
}

TEST_F(RpcNoFinishTest, ResultsWithContentAndExceptionsEndTheCallWithoutFinishToo) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  {
    Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.initParams<Value>().setValue(41);
    RemotePromise p = req.noPipelining().send();
    EXPECT_EQ(loop_.run(valueOf(p)).value(), 41u);  // built results, read in place
    EXPECT_EQ(pair.client().questionCount(), 0u);
    EXPECT_EQ(pair.server().answerCount(), 0u);
  }
  for (uint16_t method : {FAIL, FAIL_LATER}) {  // answered at once, and from a driver coroutine
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, method, 0).noPipelining().send();
    Result<uint64_t> r = loop_.run(valueOf(p));
    EXPECT_EQ(r.code(), Errc::FAILED);
    EXPECT_EQ(pair.client().questionCount(), 0u);
    EXPECT_EQ(pair.server().answerCount(), 0u);
  }
  loop_.runUntilIdle();
  EXPECT_EQ(pair.client().stats().finishesSent, 0u);
  EXPECT_EQ(pair.server().stats().returnsNoFinishNeeded, 3u);
}

TEST_F(RpcNoFinishTest, AnswersCompletedFromTheirDriverAreFreedAndTheirIdsReused) {
  Later later;
  LocalPair pair(loop_, &later);
  RemoteCap cap = pair.client().bootstrap();
  for (int i = 0; i < 4; ++i) {
    const uint16_t method = i % 2 == 0 ? EMPTY_LATER : VALUE_LATER;
    RemotePromise p = cap.newCall(LATER_INTERFACE, method, 0).noPipelining().send();
    EXPECT_EQ(p.questionId(), 1u);
    EXPECT_EQ(loop_.run(valueOf(p)).value(), method == VALUE_LATER ? 7u : 0u);
    EXPECT_EQ(pair.server().answerCount(), 0u);
    EXPECT_EQ(pair.client().questionCount(), 0u);
  }
  loop_.runUntilIdle();
  EXPECT_EQ(pair.client().stats().finishesSent, 0u);
  EXPECT_EQ(pair.server().stats().returnsNoFinishNeeded, 4u);
}

TEST_F(RpcNoFinishTest, ResultsThatCarryACapabilityAreFinishedAsBefore) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, NEXT, 0).noPipelining().send();
    EXPECT_EQ(loop_.run(valueOf(p)).value(), 1u);
    EXPECT_EQ(pair.client().questionCount(), 1u) << "waits to send its Finish";
    EXPECT_EQ(pair.server().answerCount(), 1u);
  }
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().answerCount() == 0 && pair.client().questionCount() == 0;
  }));
  EXPECT_EQ(pair.client().stats().finishesSent, 1u);
  EXPECT_EQ(pair.server().stats().returnsNoFinishNeeded, 0u);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.destroyed == 1; })) << "the child was released";
}

TEST_F(RpcNoFinishTest, PipelineOnACallSentWithoutPipeliningIsRefusedAndSendsNothing) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  RemotePromise p = cap.newCall(NODE_INTERFACE_ID, NEXT_LATER, 0).noPipelining().send();
  EXPECT_FALSE(p.canPipeline());
  const uint64_t sent = pair.client().stats().messagesSent;
  RemoteCap child = p.pipeline({0});
  EXPECT_EQ(child.brokenError().code, Errc::INVALID_ARGUMENT);
  ASSERT_NE(child.brokenError().detail, nullptr);
  EXPECT_NE(std::strstr(child.brokenError().detail, "sent without promise pipelining"), nullptr);
  RemotePromise onChild = child.newCall(NODE_INTERFACE_ID, ECHO, 0).send();
  EXPECT_TRUE(onChild.isReady());
  Result<uint64_t> r = loop_.run(valueOf(onChild));
  EXPECT_EQ(r.code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(pair.client().stats().messagesSent, sent) << "nothing went out";
  EXPECT_EQ(loop_.run(valueOf(p)).value(), 1u) << "the call itself is unaffected";
  EXPECT_TRUE(pair.client().isOpen());
}

TEST_F(RpcNoFinishTest, DroppingThePromiseBeforeTheReturnStillCancelsTheCall) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, HANG, 0).noPipelining().send();
    ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  }
  EXPECT_EQ(pair.client().stats().finishesSent, 1u) << "the callee may be running the call";
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.cancelled == 1; }));
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().answerCount() == 0 && pair.client().questionCount() == 0;
  }));
  EXPECT_EQ(pair.server().stats().finishesIgnored, 0u);
  RemotePromise again = record(cap, 5);
  EXPECT_EQ(again.questionId(), 1u);
  EXPECT_EQ(loop_.run(valueOf(again)).value(), 0u);
  EXPECT_EQ(log_.order, std::vector<uint64_t>{5});
  EXPECT_TRUE(pair.server().isOpen());
}

TEST_F(RpcNoFinishTest, AFinishCrossingTheReturnIsIgnoredAndTheIdIsReusedAfterwards) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  constexpr int ROUNDS = 50;
  for (int i = 0; i < ROUNDS; ++i) {
    // Dropped before the callee read the Call: the Finish follows the Call on the ring, and
    // reaches the callee after it answered (noFinishNeeded) and freed the answer.
    { RemotePromise dropped = record(cap, static_cast<uint64_t>(i)); }
    ASSERT_EQ(pair.client().stats().finishesSent, static_cast<uint64_t>(i + 1));
    ASSERT_TRUE(runUntil(loop_, [&] {
      return pair.client().questionCount() == 0 &&
             pair.server().stats().finishesIgnored == static_cast<uint64_t>(i + 1);
    }));
    EXPECT_EQ(pair.server().answerCount(), 0u);
  }
  EXPECT_EQ(log_.order.size(), static_cast<size_t>(ROUNDS)) << "each call was served";
  EXPECT_EQ(pair.server().stats().returnsNoFinishNeeded, static_cast<uint64_t>(ROUNDS));
  // Crossings mixed with calls that are awaited, all on the same few ids.
  std::vector<RemotePromise> kept;
  for (int i = 0; i < 8; ++i) {
    { RemotePromise dropped = record(cap, 100); }
    kept.push_back(record(cap, 200));
  }
  ASSERT_TRUE(loop_.run(awaitAll(kept)).ok());
  kept.clear();
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.client().questionCount() == 0 && pair.server().answerCount() == 0;
  }));
  EXPECT_EQ(pair.server().stats().finishesIgnored, static_cast<uint64_t>(ROUNDS + 8));
  RemotePromise last = record(cap, 1);
  EXPECT_LE(last.questionId(), 16u) << "an id freed before (at most 16 were live at once)";
  EXPECT_TRUE(loop_.run(valueOf(last)).ok());
  EXPECT_TRUE(pair.server().isOpen());
  EXPECT_TRUE(pair.client().isOpen());
}

TEST_F(RpcNoFinishTest, ManyCallsInFlightAreAllAnsweredAndFreedWithoutFinish) {
  LocalPair pair(loop_, &root_, nullptr, {}, 256 * 1024);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> pending;
  for (int i = 0; i < 150; ++i) pending.push_back(record(cap, static_cast<uint64_t>(i)));
  ASSERT_TRUE(loop_.run(awaitAll(pending)).ok());
  EXPECT_EQ(pair.client().questionCount(), 0u) << "freed at their Returns, promises still held";
  EXPECT_EQ(pair.server().answerCount(), 0u);
  pending.clear();
  loop_.runUntilIdle();
  EXPECT_EQ(pair.client().stats().finishesSent, 0u);
  ASSERT_EQ(log_.order.size(), 150u);
  for (uint64_t i = 0; i < 150; ++i) EXPECT_EQ(log_.order[i], i) << "E-order";
}

TEST_F(RpcNoFinishTest, ACallForwardedThroughAProxyGoesOnWithoutPipelining) {
  // X holds A's bootstrap and passes it to C (no VatNetwork: X exports a forwarding proxy); C
  // calls it back (CALL_BACK: ECHO(5) on the cap, plus 100), through X, to A.
  Log farLog;
  Node far(0, farLog);
  LocalPair xa(loop_, &far);    // X is the client, A the server
  LocalPair xc(loop_, &root_);  // X is the client, C the server
  RemoteCap a = xa.client().bootstrap();
  RemoteCap c = xc.client().bootstrap();
  for (int i = 0; i < 3; ++i) {
    Request req = c.newCall(NODE_INTERFACE_ID, CALL_BACK, 16);
    CapParam::Builder params = req.initParams<CapParam>();
    Result<uint32_t> index = req.addCap(a);
    ASSERT_TRUE(index.ok());
    writeCapPointer(params, 0, *index);
    RemotePromise p = req.send();
    EXPECT_EQ(loop_.run(valueOf(p)).value(), 105u);
  }
  ASSERT_TRUE(runUntil(loop_, [&] { return xa.server().answerCount() == 0; }));
  EXPECT_EQ(xa.server().stats().callsReceived, 3u);
  EXPECT_EQ(xa.server().stats().returnsNoFinishNeeded, 3u) << "the forwarded ECHOs";
  EXPECT_EQ(xa.client().stats().finishesSent, 0u);
  EXPECT_EQ(xa.client().questionCount(), 0u);
  a = RemoteCap();
  c = RemoteCap();
  xc.client().close(Error(Errc::DISCONNECTED, "test ends"));  // its proxies hold caps on `xa`
  loop_.runUntilIdle();
}

// Hands out a capability of another connection (X's import of A): X exports a proxy for it.
class Handout final : public ServerObject {
 public:
  explicit Handout(RemoteCap target) : target_(std::move(target)) {}
  void drop() { target_ = RemoteCap(); }
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    if (!out) return readyPromise<void>(out.error());
    Result<uint32_t> index = ctx.addResultCap(target_);
    if (!index) return readyPromise<void>(index.error());
    writeCapPointer(*out, 0, *index);
    return readyPromise<void>(Status{});
  }

 private:
  RemoteCap target_;
};

// C calls, without pipelining, X's proxy for A's object: X relays to A and answers C with
// noFinishNeeded, freeing the answer at once. Whatever the relay held on X's connection to A
// (the forwarded call's promise) is let go of with the Return, not when C next reuses the id:
// X may then close its connection to A while its connection to C lives on.
TEST_F(RpcNoFinishTest, ARelayAnsweredWithoutFinishLetsGoOfTheForwardedCallAtItsReturn) {
  Log farLog;
  Node far(0, farLog);
  auto xa = std::make_unique<LocalPair>(loop_, &far);  // X is the client, A the server
  Handout handout(xa->client().bootstrap());
  LocalPair cx(loop_, &handout);  // C is the client, X the server
  Result<RemoteCap> proxy = loop_.run([&]() -> Promise<RemoteCap> {
    Result<Response> r = co_await cx.client().bootstrap().newCall(NODE_INTERFACE_ID, 0, 0).send();
    AGATE_CO_TRY(r);
    Result<ReceivedCap> cap = r->getCap(0);
    AGATE_CO_TRY(cap);
    co_return cap->remote;
  }());
  ASSERT_TRUE(proxy.ok()) << errcName(proxy.code());
  for (uint64_t i = 0; i < 3; ++i) {
    Request req = proxy->newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.noPipelining();
    req.initParams<Value>().setValue(i);
    RemotePromise p = req.send();
    EXPECT_EQ(loop_.run(valueOf(p)).value(), i);
  }
  EXPECT_EQ(cx.server().stats().returnsNoFinishNeeded, 3u) << "X answered C without Finish";
  ASSERT_TRUE(runUntil(loop_, [&] { return xa->server().answerCount() == 0; }));
  EXPECT_EQ(xa->client().handleCount(), 2u)
      << "the Handout's and the proxy's references to A; no relay holds a forwarded call";
  // C lets go of the proxy; X drops its own reference; X closes its connection to A while C's
  // connection lives (ids freed at those Returns are never reused).
  proxy = Error(Errc::CANCELLED);
  handout.drop();
  ASSERT_TRUE(runUntil(loop_, [&] { return xa->client().handleCount() == 0; }));
  xa.reset();
  EXPECT_TRUE(cx.client().isOpen());
  EXPECT_TRUE(cx.server().isOpen());
}

TEST_F(RpcNoFinishTest, PeerDeathFailsPendingCallsWithoutPipeliningDisconnected) {
  auto pair = std::make_unique<LocalPair>(loop_, &root_);
  RemoteCap cap = pair->client().bootstrap();
  std::vector<RemotePromise> pending;
  for (int i = 0; i < 3; ++i) {
    pending.push_back(cap.newCall(NODE_INTERFACE_ID, HANG, 0).noPipelining().send());
  }
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 3; }));
  pair->destroyServer();
  for (RemotePromise& p : pending) {
    Result<uint64_t> r = loop_.run(valueOf(p));
    EXPECT_EQ(r.code(), Errc::DISCONNECTED);
  }
  EXPECT_EQ(log_.cancelled, 3);
  pending.clear();
  EXPECT_EQ(pair->client().questionCount(), 0u);
  EXPECT_EQ(pair->client().stats().finishesSent, 0u) << "nothing is sent on a dead connection";
  cap = RemoteCap();
  pair.reset();
}

}  // namespace
}  // namespace agate::rpc::test
