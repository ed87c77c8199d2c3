// A capability pipelined on a call's results, passed back to the same peer in a later call's
// params before the first call returned (CapDescriptor.receiverAnswer, schemas/rpc.capnp): both
// calls leave at once; the callee delivers the second once the first has returned, with its own
// object, and keeps E-order on the second call's target; the first answer's error becomes a
// broken capability; a Finish of the first answer does not cancel it while a call still needs
// it; cancelling the waiting call lets the calls behind it go; the callee's tables end empty.
// Hostile forms are in rpc_hostile_test.cpp.
#include <gtest/gtest.h>

#include <optional>
#include <vector>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

enum GateMethod : uint16_t {
  GATED_CHILD = 40,      // -> CapAndValue: a new Node(7), once open() (or fails once fail())
  USE = 41,              // CapParam -> Value: 1 for our own Node (logged), else calls ECHO on it
  MARK = 42,             // Value -> (): logs the value
  BACK_IN_RESULTS = 43,  // tries to return a capability pipelined on a call to the caller
  CHILD = 44,            // -> CapAndValue: a new Node(8), at once
  GATED_SELF = 45,       // -> CapAndValue: this server itself, once open()
  PROMISE = 46,          // -> CapAndValue: a CapPromise the test settles (`promises`)
  SELF_NOW = 47,         // -> CapAndValue: this server itself, at once
  KEEP = 48,             // CapParam -> (): keeps the capability in `kept`
  FAIL_OTHER = 49,       // fails with FAILED "another caller's error"
};

// The server: hands out children only when the test opens the gate, and logs, in one sequence,
// what USE saw and what MARK was given, so that the test sees the order of delivery.
class GateServer final : public ServerObject {
 public:
  static constexpr uint64_t USED_OWN = 1000;

  explicit GateServer(Log& log) : log_(log) {}

  Promise<void> dispatch(uint64_t interfaceId, uint16_t methodId, CallContext& ctx) override {
    if (interfaceId != NODE_INTERFACE_ID) return readyPromise<void>(Errc::UNSUPPORTED);
    switch (methodId) {
      case GATED_CHILD:
        return gatedChild(ctx);
      case USE:
        return use(ctx);
      case MARK: {
        uint64_t v = 0;
        Status read = ctx.tryReadParams<Value>([&](Value::Reader p) { v = p.getValue(); });
        if (read) events.push_back(v);
        return readyPromise<void>(read);
      }
      case BACK_IN_RESULTS:
        return readyPromise<void>(backInResults(ctx));
      case CHILD:
        return readyPromise<void>(returnCap(ctx, std::make_unique<Node>(8, log_)));
      case GATED_SELF:
        return gatedSelf(ctx);
      case SELF_NOW:
        return readyPromise<void>(returnCap(ctx, static_cast<ServerObject&>(*this)));
      case PROMISE: {
        promises.push_back(ctx.connection().newCapPromise());
        return readyPromise<void>(returnCap(ctx, promises.back()));
      }
      case KEEP: {
        Result<ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
        Status read =
            ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); });
        if (!read) return readyPromise<void>(read);
        if (!cap) return readyPromise<void>(cap.error());
        kept = cap->remote;
        return readyPromise<void>(Status{});
      }
      case FAIL_OTHER:
        return readyPromise<void>(Error(Errc::FAILED, "another caller's error"));
      default:
        return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    }
  }
  void open() { settle(Status{}); }
  void fail() { settle(Error(Errc::FAILED, "the gate broke")); }

  std::vector<uint64_t> events;
  std::vector<ServerObject*> seen;
  std::vector<CapPromise> promises;
  RemoteCap kept;

 private:
  void settle(Status outcome) {
    std::vector<Fulfiller<void>> waiting = std::move(waiting_);
    waiting_.clear();
    for (Fulfiller<void>& f : waiting) f.fulfill(outcome);
  }
  Promise<void> gatedChild(CallContext& ctx) {
    auto [opened, fulfiller] = newPromiseAndFulfiller<void>();
    waiting_.push_back(std::move(fulfiller));
    AGATE_CO_TRY(co_await opened);
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_CO_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(std::make_unique<Node>(7, log_));
    AGATE_CO_TRY(index);
    writeCapPointer(*out, 0, *index);
    co_return {};
  }
  Promise<void> use(CallContext& ctx) {
    Result<ReceivedCap> cap = Error(Errc::INVALID_ARGUMENT, "no params");
    AGATE_CO_TRY(ctx.tryReadParams<CapParam>([&](CapParam::Reader p) { cap = ctx.capAt(p, 0); }));
    AGATE_CO_TRY(cap);
    if (cap->local != nullptr) {
      seen.push_back(cap->local);
      events.push_back(USED_OWN);
      Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
      AGATE_CO_TRY(out);
      out->setValue(1);
      co_return {};
    }
    RemoteCap remote = cap->remote;
    Request r = remote.newCall(NODE_INTERFACE_ID, ECHO, 16);
    r.initParams<Value>().setValue(0);
    Result<Response> echoed = co_await r.send();
    AGATE_CO_TRY(echoed);
    Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
    AGATE_CO_TRY(out);
    out->setValue(2);
    co_return {};
  }

  template <class Cap>
  static Status returnCap(CallContext& ctx, Cap&& cap) {
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(std::forward<Cap>(cap));
    AGATE_TRY(index);
    writeCapPointer(*out, 0, *index);
    return {};
  }
  Promise<void> gatedSelf(CallContext& ctx) {
    auto [opened, fulfiller] = newPromiseAndFulfiller<void>();
    waiting_.push_back(std::move(fulfiller));
    AGATE_CO_TRY(co_await opened);
    co_return returnCap(ctx, static_cast<ServerObject&>(*this));
  }
  Status backInResults(CallContext& ctx) {
    RemotePromise p = ctx.connection().bootstrap().newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(32);
    AGATE_TRY(out);
    Result<uint32_t> index = ctx.addResultCap(p.pipeline({0}));
    AGATE_TRY(index);
    writeCapPointer(*out, 0, *index);
    return {};
  }

  Log& log_;
  std::vector<Fulfiller<void>> waiting_;
};

RemotePromise use(const RemoteCap& target, const RemoteCap& cap) {
  Request r = target.newCall(NODE_INTERFACE_ID, USE, 64);
  Result<uint32_t> index = r.addCap(cap);
  AGATE_ASSERT(index.ok(), "addCap: %s", errcName(index.code()));
  writeCapPointer(r.initParams<CapParam>(), 0, *index);
  return r.send();
}

RemotePromise mark(const RemoteCap& target, uint64_t v) {
  Request r = target.newCall(NODE_INTERFACE_ID, MARK, 16);
  r.initParams<Value>().setValue(v);
  return r.send();
}

Promise<uint64_t> valueOf(RemotePromise p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  uint64_t v = 0;
  AGATE_CO_TRY(r->tryRead<Value>([&](Value::Reader x) { v = x.getValue(); }));
  co_return v;
}

// The capability `method` on `target` returns (awaited): an import of the server's export.
Promise<RemoteCap> capFrom(RemoteCap target, uint16_t method) {
  Result<Response> r = co_await target.newCall(NODE_INTERFACE_ID, method, 16).send();
  AGATE_CO_TRY(r);
  Result<ReceivedCap> cap = r->getCap(0);
  AGATE_CO_TRY(cap);
  co_return cap->remote;
}

Promise<void> done(RemotePromise p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  co_return {};
}

class ReceiverAnswerTest : public ::testing::Test {
 protected:
  // Runs the loop until the server holds `n` calls that wait (for their params' answers, or
  // behind such a call).
  bool serverHolds(LocalPair& pair, uint64_t waiting, uint64_t behind) {
    return runUntil(loop_, [&] {
      return pair.server().stats().callsAwaitingParamAnswers == waiting &&
             pair.server().stats().callsQueuedBehind == behind;
    });
  }

  Watchdog watchdog_{"rpc_receiver_answer_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  GateServer server_{log_};
};

TEST_F(ReceiverAnswerTest, APassedBackCapabilityWaitsForItsAnswerAndArrivesAsTheServersObject) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  RemotePromise child = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  RemotePromise used = use(root, child.pipeline({0}));
  EXPECT_EQ(pair.client().stats().callsSent, 2u) << "both calls left before any answer";
  ASSERT_TRUE(serverHolds(pair, 1, 0));
  EXPECT_TRUE(server_.events.empty()) << "USE waits for the child";
  server_.open();
  Result<uint64_t> v = loop_.run(valueOf(std::move(used)));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 1u) << "the server's own object, not a reference through the client";
  ASSERT_EQ(server_.seen.size(), 1u);
  EXPECT_EQ(static_cast<Node*>(server_.seen[0])->value(), 7u);
  EXPECT_TRUE(loop_.run(done(std::move(child))).ok());
  EXPECT_TRUE(pair.server().isOpen());
}

TEST_F(ReceiverAnswerTest, AnAnswerThatAlreadyReturnedIsUsedAtOnce) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  RemotePromise child = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().callsReceived == 1; }));
  server_.open();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().returnsSent == 1; }));
  Result<uint64_t> v = loop_.run(valueOf(use(root, child.pipeline({0}))));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 1u);
  EXPECT_EQ(pair.server().stats().callsAwaitingParamAnswers, 0u);
}

// E-order on the waiting call's target: calls made after it on the same reference are delivered
// after it, although they need nothing.
TEST_F(ReceiverAnswerTest, LaterCallsOnTheSameReferenceWaitBehindIt) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  RemotePromise child = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  RemotePromise used = use(root, child.pipeline({0}));
  RemotePromise m1 = mark(root, 1);
  RemotePromise m2 = mark(root, 2);
  ASSERT_TRUE(serverHolds(pair, 1, 2));
  EXPECT_TRUE(server_.events.empty());
  server_.open();
  ASSERT_TRUE(loop_.run(done(std::move(m2))).ok());
  EXPECT_EQ(server_.events, (std::vector<uint64_t>{GateServer::USED_OWN, 1, 2}));
  ASSERT_TRUE(loop_.run(done(std::move(used))).ok());
  ASSERT_TRUE(loop_.run(done(std::move(m1))).ok());
  // The queue is gone: a new call is served at once.
  ASSERT_TRUE(loop_.run(done(mark(root, 3))).ok());
  EXPECT_EQ(server_.events.back(), 3u);
  EXPECT_TRUE(loop_.run(done(std::move(child))).ok());
}

TEST_F(ReceiverAnswerTest, TheAnswersErrorArrivesAsABrokenCapability) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  RemotePromise child = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  RemotePromise used = use(root, child.pipeline({0}));
  RemotePromise m = mark(root, 1);
  ASSERT_TRUE(serverHolds(pair, 1, 1));
  server_.fail();
  Result<uint64_t> v = loop_.run(valueOf(std::move(used)));
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.code(), Errc::FAILED) << "the call made on the broken capability failed with it";
  EXPECT_TRUE(loop_.run(done(std::move(m))).ok());
  EXPECT_EQ(server_.events, std::vector<uint64_t>{1});
  EXPECT_EQ(loop_.run(done(std::move(child))).code(), Errc::FAILED);
  EXPECT_TRUE(pair.server().isOpen());
}

// A method keeps a capability that arrived broken with the answer's error: the text stays its
// own after the answer is finished and its slot is reused by another failed call.
TEST_F(ReceiverAnswerTest, ABrokenCapabilityKeptByAMethodKeepsItsText) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  std::optional<RemotePromise> child(root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send());
  Request keep = root.newCall(NODE_INTERFACE_ID, KEEP, 64);
  Result<uint32_t> index = keep.addCap(child->pipeline({0}));
  ASSERT_TRUE(index.ok());
  writeCapPointer(keep.initParams<CapParam>(), 0, *index);
  RemotePromise kept = keep.send();
  ASSERT_TRUE(serverHolds(pair, 1, 0));
  server_.fail();
  ASSERT_TRUE(loop_.run(done(std::move(kept))).ok());
  ASSERT_EQ(server_.kept.brokenError().code, Errc::FAILED);
  EXPECT_STREQ(server_.kept.brokenError().detail, "the gate broke");
  child.reset();  // Finish: the answer goes and its slot is free
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 0; }));
  std::vector<RemotePromise> others;  // failed answers kept for what is pipelined on them
  std::vector<RemoteCap> pipelined;
  for (int i = 0; i < 4; ++i) {
    others.push_back(root.newCall(NODE_INTERFACE_ID, FAIL_OTHER, 16).send());
    pipelined.push_back(others.back().pipeline({0}));
  }
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 4; }));
  loop_.runUntilIdle();
  EXPECT_STREQ(server_.kept.brokenError().detail, "the gate broke");
  server_.kept = RemoteCap();
}

// The caller drops the first call's promise (Finish goes out before its Return): the answer runs
// on and stays until the call that names it was delivered, then goes.
TEST_F(ReceiverAnswerTest, AFinishedAnswerStaysForTheCallThatNamesIt) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  const size_t answersBefore = pair.server().answerCount();
  std::optional<RemotePromise> child(root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send());
  RemotePromise used = use(root, child->pipeline({0}));
  child.reset();  // the pipelined capability went with the USE call: Finish now
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().finishesReceived == 1; }));
  ASSERT_TRUE(serverHolds(pair, 1, 0));
  server_.open();
  Result<uint64_t> v = loop_.run(valueOf(std::move(used)));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 1u);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == answersBefore; }));
  EXPECT_EQ(log_.created, log_.destroyed) << "the child went with the answer";
}

// Cancelling the waiting call lets the calls behind it go at once, and its answer is let go.
TEST_F(ReceiverAnswerTest, CancellingTheWaitingCallReleasesTheCallsBehindIt) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  RemotePromise child = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  std::optional<RemotePromise> used(use(root, child.pipeline({0})));
  RemotePromise m = mark(root, 1);
  ASSERT_TRUE(serverHolds(pair, 1, 1));
  used.reset();  // Finish: the USE call is cancelled while it waits
  ASSERT_TRUE(loop_.run(done(std::move(m))).ok());
  EXPECT_EQ(server_.events, std::vector<uint64_t>{1}) << "served before the gate opened";
  server_.open();
  ASSERT_TRUE(loop_.run(done(std::move(child))).ok());
  EXPECT_TRUE(server_.seen.empty()) << "USE never ran";
}

TEST_F(ReceiverAnswerTest, AnAnswerNamedByManyCancelledCallsDoesNotKeepTheirListAfterwards) {
  constexpr int CALLS = 200;
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  const size_t retainedBefore = pair.server().answerEntriesRetained();
  {
    RemotePromise child = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
    {
      std::vector<RemotePromise> waiting;
      for (int i = 0; i < CALLS; ++i) waiting.push_back(use(root, child.pipeline({0})));
      ASSERT_TRUE(runUntil(loop_, [&] {
        return pair.server().stats().callsReceived == static_cast<uint64_t>(CALLS) + 1;
      }));
      EXPECT_EQ(pair.server().answerCount(), static_cast<uint32_t>(CALLS) + 1);
    }  // Finish for each: cancelled while they wait
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 1; }));
    server_.open();
    ASSERT_TRUE(loop_.run(done(std::move(child))).ok());
  }
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 0; }));
  // Each call's own entry keeps its one pending entry's room; the answer they all named keeps
  // no list of them.
  EXPECT_LE(pair.server().answerEntriesRetained(), retainedBefore + CALLS + 16)
      << "no answer entry keeps a list of the two hundred calls that waited on it";
}

// The client goes while calls wait: the server frees them and the answer they named.
TEST_F(ReceiverAnswerTest, TheCallersDeathFreesTheWaitingCallsAndTheirAnswer) {
  LocalPair pair(loop_, &server_);
  {
    RemoteCap root = pair.client().bootstrap();
    RemotePromise child = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
    RemotePromise used = use(root, child.pipeline({0}));
    RemotePromise m = mark(root, 1);
    ASSERT_TRUE(serverHolds(pair, 1, 1));
  }
  pair.destroyClient();
  ASSERT_TRUE(runUntil(loop_, [&] { return !pair.server().isOpen(); }));
  EXPECT_EQ(pair.server().answerCount(), 0u);
  server_.open();  // the gated call was cancelled with the connection: nothing to resume
  loop_.runUntilIdle();
  EXPECT_TRUE(server_.events.empty());
  EXPECT_EQ(log_.created, log_.destroyed);
}

// The named answer returns at once while the call that names it still waits (behind an earlier
// waiting call): the entry is resolved then, so the caller's Finish frees the answer and the
// caller may reuse its id at once (the callee once kept the answer and took the reuse for a
// PROTOCOL_ERROR).
TEST_F(ReceiverAnswerTest, AnAnswerNamedByAWaitingCallIsFreedAtItsFinishAndItsIdReused) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  Result<RemoteCap> other = loop_.run(capFrom(root, CHILD));
  ASSERT_TRUE(other.ok()) << errcName(other.code());
  const uint64_t finishesBefore = pair.server().stats().finishesReceived;
  RemotePromise gated = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  RemotePromise first = use(root, gated.pipeline({0}));  // waits for the gate
  // Another object's answer, returned at once, named by a call that waits behind `first`.
  std::optional<RemotePromise> quick(other->newCall(NODE_INTERFACE_ID, NEXT, 16).send());
  RemotePromise second = use(root, quick->pipeline({0}));
  ASSERT_TRUE(serverHolds(pair, 1, 1));
  ASSERT_TRUE(loop_.run(done(std::move(*quick))).ok());
  quick.reset();
  // Its Finish went out: the question's id is the next one the client hands out.
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().questionCount() == 3; }));
  ASSERT_TRUE(runUntil(
      loop_, [&] { return pair.server().stats().finishesReceived >= finishesBefore + 1; }));
  const uint64_t callsBefore = pair.server().stats().callsReceived;
  RemotePromise reusing = mark(root, 9);  // takes the freed id
  ASSERT_TRUE(
      runUntil(loop_, [&] { return pair.server().stats().callsReceived == callsBefore + 1; }));
  EXPECT_TRUE(pair.server().isOpen()) << "the id was free at the callee too";
  server_.open();
  EXPECT_EQ(loop_.run(valueOf(std::move(first))).value(), 1u);
  EXPECT_EQ(loop_.run(valueOf(std::move(second))).value(), 1u);
  ASSERT_TRUE(loop_.run(done(std::move(reusing))).ok());
  EXPECT_EQ(server_.events, (std::vector<uint64_t>{GateServer::USED_OWN, GateServer::USED_OWN, 9}));
  EXPECT_TRUE(loop_.run(done(std::move(gated))).ok());
}

// A call pipelined on an answer (P, on T) and a later call on the object T returns (X, naming
// P's answer): when T returns, P is older than X and does not wait behind it, so neither waits
// for the other.
TEST_F(ReceiverAnswerTest, AnOlderPipelinedCallDoesNotWaitBehindTheCallThatNamesIt) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  // The server as a capability it returned (one export, whichever call returns it again).
  Result<RemoteCap> selfRef = loop_.run(capFrom(root, SELF_NOW));
  ASSERT_TRUE(selfRef.ok()) << errcName(selfRef.code());
  RemotePromise self = root.newCall(NODE_INTERFACE_ID, GATED_SELF, 16).send();            // T
  RemotePromise child = self.pipeline({0}).newCall(NODE_INTERFACE_ID, CHILD, 16).send();  // P
  RemotePromise used = use(*selfRef, child.pipeline({0}));  // X: on T's object, names P
  ASSERT_TRUE(serverHolds(pair, 1, 0));
  server_.open();
  Result<uint64_t> v = loop_.run(valueOf(std::move(used)));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 1u);
  EXPECT_TRUE(loop_.run(done(std::move(child))).ok());
  EXPECT_TRUE(loop_.run(done(std::move(self))).ok());
}

// A promise export settles while a call on it still waits for an answer its params name: the
// Resolve waits until that call (and those behind it) were delivered, so a call the peer makes
// on the resolution cannot overtake them.
TEST_F(ReceiverAnswerTest, APromisesResolveWaitsForTheCallsStillQueuedOnIt) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  Result<RemoteCap> got = loop_.run(capFrom(root, PROMISE));
  ASSERT_TRUE(got.ok()) << errcName(got.code());
  RemoteCap promise = *got;
  RemotePromise gated = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  RemotePromise x = use(promise, gated.pipeline({0}));
  RemotePromise y = mark(promise, 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 2; }));
  server_.promises.back().resolve(static_cast<ServerObject&>(server_));
  loop_.runUntilIdle();
  EXPECT_EQ(pair.server().stats().resolvesSent, 0u) << "X and Y still wait";
  RemotePromise z = mark(promise, 2);  // still on the promise: queued behind X and Y
  server_.open();
  ASSERT_TRUE(loop_.run(done(std::move(z))).ok());
  EXPECT_EQ(server_.events, (std::vector<uint64_t>{GateServer::USED_OWN, 1, 2}));
  EXPECT_TRUE(loop_.run(done(std::move(x))).ok());
  EXPECT_TRUE(loop_.run(done(std::move(y))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
  ASSERT_TRUE(loop_.run(done(mark(promise, 3))).ok());  // now straight to the resolution
  EXPECT_EQ(server_.events.back(), 3u);
  EXPECT_TRUE(loop_.run(done(std::move(gated))).ok());
}

// The same, but the call waiting on the settled promise is cancelled instead of delivered: the
// Resolve goes out then (the queue it waited for is empty).
TEST_F(ReceiverAnswerTest, APromisesResolveGoesOutWhenTheLastCallWaitingOnItIsCancelled) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  Result<RemoteCap> got = loop_.run(capFrom(root, PROMISE));
  ASSERT_TRUE(got.ok()) << errcName(got.code());
  RemoteCap promise = *got;
  RemotePromise gated = root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send();
  std::optional<RemotePromise> x(use(promise, gated.pipeline({0})));
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().promiseCallsQueued == 1; }));
  server_.promises.back().resolve(static_cast<ServerObject&>(server_));
  loop_.runUntilIdle();
  EXPECT_EQ(pair.server().stats().resolvesSent, 0u);
  x.reset();  // Finish: X is cancelled while it waits
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().stats().resolvesReceived == 1; }));
  ASSERT_TRUE(loop_.run(done(mark(promise, 4))).ok());
  EXPECT_EQ(server_.events, std::vector<uint64_t>{4});
  server_.open();
  EXPECT_TRUE(loop_.run(done(std::move(gated))).ok());
}

// An answer finished while calls pipelined on it wait is kept for them; once they are all
// cancelled too, nothing needs it: it is cancelled as its Finish asked.
TEST_F(ReceiverAnswerTest, AFinishedAnswerKeptForPipelinedCallsIsCancelledWithThem) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  const size_t answersBefore = pair.server().answerCount();
  std::optional<RemotePromise> gated(root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send());
  std::optional<RemotePromise> echoed(
      gated->pipeline({0}).newCall(NODE_INTERFACE_ID, ECHO, 16).send());
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().pipelinedCallsQueued == 1; }));
  gated.reset();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().finishesReceived == 1; }));
  EXPECT_EQ(pair.server().answerCount(), answersBefore + 2) << "kept for the pipelined call";
  echoed.reset();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == answersBefore; }));
  server_.open();
  loop_.runUntilIdle();
  EXPECT_EQ(log_.created, log_.destroyed);
}

// The named answer got its Finish while a call waited for it; once that call is cancelled too,
// nothing needs the answer: it is cancelled as its Finish asked.
TEST_F(ReceiverAnswerTest, AFinishedAnswerIsCancelledOnceNoWaitingCallNamesIt) {
  LocalPair pair(loop_, &server_);
  RemoteCap root = pair.client().bootstrap();
  const size_t answersBefore = pair.server().answerCount();
  std::optional<RemotePromise> gated(root.newCall(NODE_INTERFACE_ID, GATED_CHILD, 16).send());
  std::optional<RemotePromise> used(use(root, gated->pipeline({0})));
  ASSERT_TRUE(serverHolds(pair, 1, 0));
  gated.reset();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().stats().finishesReceived == 1; }));
  EXPECT_EQ(pair.server().answerCount(), answersBefore + 2) << "kept for the waiting call";
  used.reset();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == answersBefore; }));
  server_.open();  // nothing is left to resume
  loop_.runUntilIdle();
  EXPECT_TRUE(server_.events.empty());
  EXPECT_EQ(log_.created, log_.destroyed);
}

// In a call's results a capability pipelined on the peer's own question cannot go back (only a
// call's params carry receiverAnswer): addResultCap says so, and the call fails with it.
TEST_F(ReceiverAnswerTest, APipelinedCapabilityOfTheSameConnectionCannotGoInResults) {
  Node clientRoot(0, log_);
  LocalPair pair(loop_, &server_, &clientRoot);
  RemoteCap root = pair.client().bootstrap();
  Status r = loop_.run(done(root.newCall(NODE_INTERFACE_ID, BACK_IN_RESULTS, 16).send()));
  EXPECT_EQ(r.code(), Errc::INVALID_ARGUMENT);
  EXPECT_TRUE(pair.server().isOpen());
  EXPECT_TRUE(pair.client().isOpen());
}

}  // namespace
}  // namespace agate::rpc::test
