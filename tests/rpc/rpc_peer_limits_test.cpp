// What a peer cannot make an RpcConnection do, and the limits a connection checks for itself:
//  * a peer that sends calls and never reads its replies cannot grow this side's outbound queue
//    without end (RpcOptions::maxQueuedBytes): its connection ends OUT_OF_MEMORY, while this
//    side's own calls past the bound are refused and the connection carries on;
//  * content that passed the typed layer's schema check can still be read by the method (the
//    reader's traversal budget covers several passes, ReadLimits::READ_PASSES);
//  * a method that shuts its own connection down from its synchronous part is safe;
//  * a method that starts its results and then awaits a call back to its caller does not hold
//    the connection's other messages back (results are built in private memory);
//  * a connection whose receiver accepts frames larger than its spill buffers, or that would
//    build messages larger than them, is refused when it is made, not when such a frame comes.
#include <gtest/gtest.h>

#include <capnp/schema.capnp.h>

#include <cstring>
#include <deque>
#include <functional>

#include "agate/rpc/typed.h"
#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

// How the call ended (awaited on `loop`).
Errc outcome(EventLoop& loop, RemotePromise& p) {
  Errc code = Errc::OK;
  (void)loop.run([&]() -> Promise<void> {
    Result<Response> r = co_await p;
    code = r.code();
    co_return {};
  }());
  return code;
}

// A connection ("the victim") whose peer is driven frame by frame by the test.
class Rig {
 public:
  explicit Rig(size_t maxQueuedBytes, ServerObject* bootstrap = nullptr) {
    ChannelOptions co;
    co.scope = ChannelScope::LOCAL;
    toVictim_ = std::move(Channel::create(co).value());
    fromVictim_ = std::move(Channel::create(co).value());
    peerTx_ = std::make_unique<MessageSender>(toVictim_->attachSender().value());
    victimRx_ = std::make_unique<MessageReceiver>(*toVictim_, toVictim_->attachReceiver().value(),
                                                  rpcReceiverOptions());
    victimTx_ = std::make_unique<MessageSender>(fromVictim_->attachSender().value());
    peerRx_ = std::make_unique<MessageReceiver>(*fromVictim_, fromVictim_->attachReceiver().value(),
                                                rpcReceiverOptions());
    RpcOptions options;
    options.bootstrap = bootstrap != nullptr ? bootstrap : &root_;
    options.maxQueuedBytes = maxQueuedBytes;
    // The victim's own calls reserve little reply space, so that the queue bound, not the
    // reply space, is what refuses them (its peer here never answers).
    options.replyBytesPerCall = 16;
    victim_ = std::make_unique<RpcConnection>(*victimTx_, *victimRx_, loop_, options);
  }
  ~Rig() { victim_.reset(); }

  bool trySend(const std::function<void(wire::Message::Builder)>& fill) {
    Result<OutgoingMessage> m = peerTx_->tryStartMessage(1024);
    if (!m.ok()) return false;
    fill(m->initRoot<wire::Message>());
    return m->send().ok();
  }
  // Calls the victim's bootstrap without pipelining, as often as its ring takes them (the peer
  // never reads a reply); returns how many went.
  // `distinctIds`: a question id per call (for calls still running when the next is sent).
  int flood(uint16_t method, int calls, bool distinctIds = false) {
    int sent = 0;
    int blockedTurns = 0;
    while (sent < calls && victim_->isOpen() && blockedTurns < 200) {
      const bool ok = trySend([&](wire::Message::Builder m) {
        wire::Call::Builder c = m.initCall();
        // Else 1: freed at each Return (noFinishNeeded), reusable at once.
        c.setQuestionId(distinctIds ? static_cast<uint32_t>(sent) + 1 : 1);
        c.getTarget().setImportedCap(0);
        c.setInterfaceId(NODE_INTERFACE_ID);
        c.setMethodId(method);
        c.setNoPromisePipelining(true);
        c.initParams().getContent().initAs<Value>().setValue(1);
      });
      if (ok) {
        ++sent;
        blockedTurns = 0;
      } else {
        ++blockedTurns;
      }
      (void)loop_.run(loop_.sleep(ok ? Duration::zero() : Duration(std::chrono::microseconds(50))));
    }
    return sent;
  }

  EventLoop loop_;
  Log log_;
  Node root_{0, log_};
  std::unique_ptr<Channel> toVictim_, fromVictim_;
  std::unique_ptr<MessageSender> peerTx_, victimTx_;
  std::unique_ptr<MessageReceiver> victimRx_, peerRx_;
  std::unique_ptr<RpcConnection> victim_;
};

TEST(RpcPeerLimits, APeerThatNeverReadsItsRepliesIsDisconnectedNotHeldWithoutBound) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  for (uint16_t method : {ECHO, FAIL, RECORD}) {  // results, an exception, an empty Return
    SCOPED_TRACE(::testing::Message() << "method " << method);
    Rig rig(64 * 1024);
    (void)rig.flood(method, 100'000);
    ASSERT_FALSE(rig.victim_->isOpen()) << "read " << rig.victim_->stats().callsReceived;
    EXPECT_EQ(rig.victim_->failure().code, Errc::OUT_OF_MEMORY);
    EXPECT_LT(rig.victim_->stats().callsReceived, 100'000u);
  }
}

// Starts 4000 bytes of results, and finishes them a while later.
class SlowResults final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override { return run(ctx); }

 private:
  static Promise<void> run(CallContext& ctx) {
    Result<capnp::AnyPointer::Builder> out = ctx.initResults(4200);
    AGATE_CO_TRY(out);
    out->initAs<capnp::Data>(4000);
    (void)co_await EventLoop::current()->sleep(std::chrono::milliseconds(100));
    co_return {};
  }
};

TEST(RpcPeerLimits, RepliesOfMethodsThatSuspendedAreBoundedWhenTheyGoOut) {
  // Results are built in private memory while the method runs: the bound applies when they go
  // out, so many suspended methods cannot queue their replies past it either.
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  SlowResults slow;
  Rig rig(16 * 1024, &slow);
  // The flood stops early if the victim already hung up (its first methods finish meanwhile).
  const int sent = rig.flood(ECHO, 300, /*distinctIds=*/true);
  ASSERT_GT(sent, 20) << "more replies than the ring and the bound hold";
  ASSERT_TRUE(runUntil(rig.loop_, [&] { return !rig.victim_->isOpen(); }))
      << rig.victim_->stats().returnsSent << " Returns sent";
  EXPECT_EQ(rig.victim_->failure().code, Errc::OUT_OF_MEMORY);
  EXPECT_LT(rig.victim_->stats().returnsSent, static_cast<uint64_t>(sent));
}

TEST(RpcPeerLimits, APeerThatReadsItsRepliesIsServedWithoutEnd) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  Rig rig(16 * 1024);
  for (int i = 0; i < 5'000; ++i) {
    ASSERT_EQ(rig.flood(ECHO, 1), 1);
    Result<IncomingMessage> in = rig.loop_.run(rig.peerRx_->receiveAsync(rig.loop_));
    ASSERT_TRUE(in.ok()) << errcName(in.code());
  }
  EXPECT_TRUE(rig.victim_->isOpen()) << "far more replies than the bound, each one read";
}

// The victim's own calls while the peer reads nothing: refused once the queue is full, without
// ending the connection; once the peer reads again, calls go as before.
TEST(RpcPeerLimits, OwnCallsPastTheQueueBoundAreRefusedAndTheConnectionCarriesOn) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  Rig rig(16 * 1024);
  auto& victim_ = rig.victim_;
  auto& loop_ = rig.loop_;
  auto& peerRx_ = rig.peerRx_;
  RemoteCap peer = victim_->bootstrap();
  std::vector<RemotePromise> sent;
  Errc refused = Errc::OK;
  for (int i = 0; i < 100'000 && refused == Errc::OK; ++i) {
    Request req = peer.newCall(NODE_INTERFACE_ID, ECHO, 64);
    req.initParams<Value>().setValue(static_cast<uint64_t>(i));
    sent.push_back(req.noPipelining().send());
    if (sent.back().questionId() != 0) continue;
    refused = outcome(loop_, sent.back());
    // The refused request stays refused: sending it again gives the same error, sends nothing.
    const uint32_t questions = victim_->questionCount();
    RemotePromise again = req.send();
    EXPECT_EQ(again.questionId(), 0u);
    EXPECT_EQ(outcome(loop_, again), Errc::OUT_OF_MEMORY);
    EXPECT_EQ(victim_->questionCount(), questions);
  }
  EXPECT_EQ(refused, Errc::OUT_OF_MEMORY);
  EXPECT_TRUE(victim_->isOpen());
  const size_t accepted = sent.size() - 1;
  // The peer reads every Call that was accepted (answering none), so the queue drains.
  size_t read = 0;
  while (read < accepted) {
    Result<IncomingMessage> in = loop_.run(peerRx_->receiveAsync(loop_));
    ASSERT_TRUE(in.ok()) << errcName(in.code());
    ASSERT_TRUE(in->validate().ok());  // rpcReceiverOptions() validate on demand
    ASSERT_EQ(in->getRoot<wire::Message>().which(), wire::Message::CALL);
    ++read;
  }
  Request again = peer.newCall(NODE_INTERFACE_ID, ECHO, 64);
  again.initParams<Value>().setValue(1);
  RemotePromise later = again.noPipelining().send();
  EXPECT_NE(later.questionId(), 0u) << "accepted again once the peer read";
  EXPECT_TRUE(victim_->isOpen());
  sent.clear();
}

// Sends an ECHO call of `value`, reserving `reply` bytes of reply space (0: the default).
RemotePromise echoCall(RemoteCap& cap, uint64_t value, uint32_t reply = 0) {
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(value);
  if (reply != 0) req.reserveReply(reply);
  return req.send();
}

// Whether every promise of `pending` completed successfully (awaited on `loop`).
bool allSucceed(EventLoop& loop, std::vector<RemotePromise>& pending) {
  bool ok = true;
  for (RemotePromise& p : pending) ok = outcome(loop, p) == Errc::OK && ok;
  pending.clear();
  return ok;
}

// One loop and one served object per test; each test makes its pair with the options it needs.
class RpcReplySpace : public ::testing::Test {
 protected:
  Watchdog watchdog_{"rpc_peer_limits_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root{0, log};
};

// RpcOptions::whenReplySpaceIsFull REFUSE (the default, HOLD: rpc_held_calls_test).
RpcOptions refusing() {
  RpcOptions options;
  options.whenReplySpaceIsFull = RpcOptions::WhenReplySpaceIsFull::REFUSE;
  return options;
}

TEST_F(RpcReplySpace, CallsPastTheReplyRingAreRefusedAtSendUntilReturnsFreeTheirSpace) {
  LocalPair pair(loop, &root, nullptr, refusing(), 4096);  // 4 KiB rings: 31 calls of 128 bytes
  RpcConnection& client = pair.client();
  ASSERT_EQ(client.replyBytesAvailable(), 4096u - 8);
  const uint64_t fit = client.replyBytesAvailable() / 128;
  ASSERT_EQ(fit, 31u);
  RemoteCap cap = client.bootstrap();
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < fit; ++i) pending.push_back(echoCall(cap, i));
  EXPECT_EQ(client.replyBytesReserved(), fit * 128);
  // One more would find no room for its Return: refused, nothing sent, nothing taken.
  const uint64_t sent = client.stats().callsSent;
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(fit);
  RemotePromise refused = req.send();
  EXPECT_EQ(refused.questionId(), 0u);
  Result<Response> r =
      loop.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(refused));
  ASSERT_EQ(r.code(), Errc::OUT_OF_MEMORY);
  EXPECT_NE(std::strstr(r.error().detail, "reply space"), nullptr) << r.error().detail;
  EXPECT_EQ(client.stats().callsSent, sent);
  EXPECT_EQ(client.questionCount(), fit);
  EXPECT_EQ(client.replyBytesReserved(), fit * 128);
  EXPECT_TRUE(client.isOpen());
  // The refused request stays refused: sending it again gives the same error, sends nothing.
  RemotePromise again = req.send();
  EXPECT_EQ(outcome(loop, again), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(client.stats().callsSent, sent);
  // The Returns give the space back, and calls go again.
  EXPECT_TRUE(allSucceed(loop, pending));
  EXPECT_EQ(client.replyBytesReserved(), 0u);
  pending.push_back(echoCall(cap, 1));
  EXPECT_TRUE(allSucceed(loop, pending));
  EXPECT_EQ(pair.server().stats().callsReceived, fit + 1);
}

// What the reservation guarantees: the replies to every call in flight fit the ring together,
// so the callee never queues one while the caller has not read (the caller here reads only
// once the callee's reader let go). The contrast: reserving less than an ECHO Return takes.
TEST(RpcReplySpacePerPair, TheRepliesToEveryCallInFlightFitTheRingWithoutWaiting) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  for (uint32_t perCall : {128u, 32u}) {
    SCOPED_TRACE(perCall);
    EventLoop loop;
    Log log;
    Node root(0, log);
    RpcOptions options;
    options.replyBytesPerCall = perCall;
    options.maxQuestions = 60;  // the request ring's worth of ECHO calls
    LocalPair pair(loop, &root, nullptr, options, 4096);
    RemoteCap cap = pair.client().bootstrap();
    std::vector<RemotePromise> pending;
    const uint64_t fit =
        std::min<uint64_t>(pair.client().replyBytesAvailable() / perCall, options.maxQuestions);
    for (uint64_t i = 0; i < fit; ++i) pending.push_back(echoCall(cap, i));
    EXPECT_TRUE(allSucceed(loop, pending));
    if (perCall == 128) {
      EXPECT_EQ(pair.server().stats().spilledMessages, 0u) << "a Return waited for room";
    } else {
      EXPECT_GT(pair.server().stats().spilledMessages, 0u);
    }
  }
}

TEST_F(RpcReplySpace, ACallReservesWhatItAsksForAndNeverMoreThanTheRingHolds) {
  LocalPair pair(loop, &root, nullptr, refusing(), 4096);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < 4; ++i) pending.push_back(echoCall(cap, i, 1000));
  EXPECT_EQ(client.replyBytesReserved(), 4000u);
  RemotePromise fifth = echoCall(cap, 4, 1000);
  EXPECT_EQ(outcome(loop, fifth), Errc::OUT_OF_MEMORY);
  EXPECT_TRUE(allSucceed(loop, pending));
  // More than the whole ring: refused even with nothing in flight.
  RemotePromise huge = echoCall(cap, 5, 4096);
  EXPECT_EQ(outcome(loop, huge), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(client.replyBytesReserved(), 0u);
  EXPECT_TRUE(runUntil(loop, [&] { return client.questionCount() == 0; }));  // Finishes out
  pending.push_back(echoCall(cap, 6, 4088));  // exactly the ring, less its free word
  EXPECT_TRUE(allSucceed(loop, pending));
}

TEST_F(RpcReplySpace, ARefusedCallGivesBackTheCapabilitiesItCarried) {
  RpcOptions options;
  options.maxQuestions = 1;
  LocalPair pair(loop, &root, nullptr, options);
  RpcConnection& client = pair.client();
  RemoteCap cap = client.bootstrap();
  RemotePromise hanging = cap.newCall(NODE_INTERFACE_ID, HANG, 16).send();
  ASSERT_TRUE(runUntil(loop, [&] { return log.hanging == 1; }));
  const uint32_t exports = client.exportCount();
  Log mine;
  Request req = cap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
  ASSERT_TRUE(req.addCap(std::make_unique<Node>(7, mine)).ok());
  RemotePromise refused = req.send();
  EXPECT_EQ(outcome(loop, refused), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(client.exportCount(), exports) << "the object was not exported";
  EXPECT_EQ(mine.destroyed, 1) << "the connection did not keep it";
  { RemotePromise dropped = std::move(hanging); }  // Finish; the Return frees the question
  ASSERT_TRUE(runUntil(loop, [&] { return client.questionCount() == 0; }));
  RemotePromise again = cap.newCall(NODE_INTERFACE_ID, ECHO, 16).send();
  EXPECT_NE(again.questionId(), 0u);
  EXPECT_EQ(outcome(loop, again), Errc::OK);
}

TEST(RpcReplySpacePerPair, MaxQuestionsKeepsAnHonestCallerWithinThePeersAnswerTable) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  for (uint32_t maxQuestions : {8u, 9u}) {
    SCOPED_TRACE(maxQuestions);
    EventLoop loop;
    Log log;
    Node root(0, log);
    RpcOptions server;
    server.maxAnswers = 9;  // answer ids 0 to 8; a caller's question ids start at 1
    RpcOptions client;
    client.maxQuestions = maxQuestions;
    server.bootstrap = &root;
    LocalPair pair(loop, server, client);
    RemoteCap cap = pair.client().bootstrap();
    std::deque<RemotePromise> hanging;
    for (int i = 0; i < 9; ++i) hanging.push_back(cap.newCall(NODE_INTERFACE_ID, HANG, 16).send());
    if (maxQuestions == 8) {
      // The ninth is refused here, and both sides carry on.
      EXPECT_EQ(hanging.back().questionId(), 0u);
      ASSERT_TRUE(runUntil(loop, [&] { return log.hanging == 8; }));
      EXPECT_TRUE(pair.server().isOpen() && pair.client().isOpen());
      hanging.pop_back();   // the refused one
      hanging.pop_front();  // a running one: Finish, then its Return frees the question
      ASSERT_TRUE(runUntil(loop, [&] { return pair.client().questionCount() == 7; }))
          << pair.client().questionCount() << " questions, " << log.cancelled << " cancelled";
      hanging.push_back(cap.newCall(NODE_INTERFACE_ID, HANG, 16).send());
      EXPECT_NE(hanging.back().questionId(), 0u);
      ASSERT_TRUE(runUntil(loop, [&] { return log.hanging == 8; }));
      EXPECT_TRUE(pair.server().isOpen());
    } else {
      // The contrast: a caller whose bound is above the peer's answer table is aborted.
      ASSERT_TRUE(runUntil(loop, [&] { return !pair.server().isOpen(); }));
      EXPECT_EQ(pair.server().failure().code, Errc::PROTOCOL_ERROR);
    }
    hanging.clear();
    cap = RemoteCap();
  }
}

// A window of calls at the bound: each call sent as the oldest one's Response is dropped. The
// dropped question's Finish, queued behind the current task, goes out first, so the new call
// is not refused.
TEST_F(RpcReplySpace, AWindowOfCallsAtTheQuestionBoundSendsOneAsEachReturns) {
  RpcOptions options;
  options.maxQuestions = 4;
  LocalPair pair(loop, &root, nullptr, options);
  RemoteCap cap = pair.client().bootstrap();
  int refused = 0;
  Status done = loop.run([&]() -> Promise<void> {
    std::deque<RemotePromise> window;
    for (uint64_t i = 0; i < 4; ++i) window.push_back(echoCall(cap, i));
    for (uint64_t i = 4; i < 54; ++i) {
      {
        Result<Response> r = co_await window.front();
        AGATE_CO_TRY(r);
      }
      window.pop_front();
      window.push_back(echoCall(cap, i));
      if (window.back().questionId() == 0) ++refused;
    }
    for (RemotePromise& p : window) AGATE_CO_TRY(co_await p);
    co_return {};
  }());
  EXPECT_TRUE(done.ok()) << errcName(done.code());
  EXPECT_EQ(refused, 0);
  EXPECT_EQ(pair.server().stats().callsReceived, 54u);
}

TEST_F(RpcReplySpace, ReplySpaceComesBackWhenTheConnectionEnds) {
  LocalPair pair(loop, &root);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> hanging;
  for (int i = 0; i < 3; ++i) hanging.push_back(cap.newCall(NODE_INTERFACE_ID, HANG, 16).send());
  ASSERT_TRUE(runUntil(loop, [&] { return log.hanging == 3; }));
  EXPECT_EQ(pair.client().replyBytesReserved(), 3u * 128);
  pair.destroyServer();
  for (RemotePromise& p : hanging) EXPECT_EQ(outcome(loop, p), Errc::DISCONNECTED);
  EXPECT_EQ(pair.client().replyBytesReserved(), 0u);
  hanging.clear();
  cap = RemoteCap();
  EXPECT_EQ(pair.client().questionCount(), 0u);
}

// Checks the params as the typed layer does (one pass over them), then reads them as a method
// would: a list of voids costs one word per element at each reading, a few bytes on the wire.
class ReadsTwice final : public ServerObject {
 public:
  bool threw = false;
  size_t length = 0;
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    Status shape = typed::checkAgainstSchema<capnp::schema::Node>(
        ctx.params(), ctx.capCount(), ctx.connection().maxCapsPerMessage());
    if (!shape) return readyPromise<void>(shape.error());
    try {
      length = ctx.params().getAs<capnp::schema::Node>().getNestedNodes().size();
    } catch (const kj::Exception&) {
      threw = true;  // a generated method has no try: std::terminate
    }
    return readyPromise<void>(Status{});
  }
};

TEST(RpcReadBudget, ParamsThatPassTheSchemaCheckCanBeReadByTheMethod) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  EventLoop loop;
  ReadsTwice server;
  LocalPair pair(loop, &server);
  RemoteCap root = pair.client().bootstrap();
  Request req = root.newCall(NODE_INTERFACE_ID, 0, 64);
  (void)req.params().initAs<capnp::schema::Node>();
  capnp::AnyStruct::Builder node = req.params().getAs<capnp::AnyStruct>();
  node.getPointerSection()[1].initAs<capnp::List<capnp::Void>>(40000);  // Node.nestedNodes
  RemotePromise p = req.send();
  ASSERT_TRUE(runUntil(loop, [&] { return pair.server().stats().callsReceived == 1; }));
  EXPECT_FALSE(server.threw) << "the method's read of checked params ran out of budget";
  EXPECT_EQ(server.length, 40000u);
}

// A method that shuts its own connection down (an "exit" method).
class ShutsDown final : public ServerObject {
 public:
  RpcConnection* conn = nullptr;
  bool returned = false;
  Promise<void> dispatch(uint64_t, uint16_t, CallContext&) override {
    conn->shutdown(Error(Errc::DISCONNECTED, "exit"));
    returned = true;  // this object and this call are still here
    return readyPromise<void>(Status{});
  }
};

TEST(RpcShutdown, AMethodThatShutsItsOwnConnectionDownIsSafe) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  EventLoop loop;
  ShutsDown server;
  LocalPair pair(loop, &server);
  server.conn = &pair.server();
  RemoteCap root = pair.client().bootstrap();
  RemotePromise p = root.newCall(NODE_INTERFACE_ID, 0, 16).send();
  ASSERT_TRUE(runUntil(loop, [&] { return !pair.server().isOpen(); }));
  EXPECT_TRUE(server.returned);
  EXPECT_EQ(pair.server().failure().code, Errc::DISCONNECTED);
  EXPECT_EQ(outcome(loop, p), Errc::DISCONNECTED) << "the caller hears the connection ended";
  EXPECT_EQ(pair.server().exportCount(), 0u) << "the teardown ran after the method returned";
}

// Starts its results, then calls its caller back over the same connection before filling them.
class ResultsThenCallBack final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    Result<ReceivedCap> cap = ctx.getCap(0);
    if (!cap) return readyPromise<void>(cap.error());
    return run(ctx, cap->remote);
  }

 private:
  static Promise<void> run(CallContext& ctx, RemoteCap target) {
    Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
    AGATE_CO_TRY(out);
    Request req = target.newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.initParams<Value>().setValue(5);
    Result<Response> r = co_await req.send();
    AGATE_CO_TRY(r);
    out->setValue(r->results().getAs<Value>().getValue() + 100);
    co_return {};
  }
};

TEST(RpcResults, ResultsStartedBeforeACallBackToTheCallerDoNotHoldItBack) {
  Watchdog watchdog{"rpc_peer_limits_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  ResultsThenCallBack server;
  LocalPair pair(loop, &server);
  Node callback(1, log);
  RemoteCap root = pair.client().bootstrap();
  Request req = root.newCall(NODE_INTERFACE_ID, 0, 16);
  ASSERT_TRUE(req.addCap(callback).ok());
  RemotePromise p = req.send();
  bool done = false;
  uint64_t value = 0;
  // Named, so the coroutine's captures outlive spawn().
  auto awaitResult = [&]() -> Promise<void> {
    Result<Response> r = co_await p;
    if (r) value = r->results().getAs<Value>().getValue();
    done = true;
    co_return {};
  };
  loop.spawn(awaitResult());
  EXPECT_TRUE(runUntil(
      loop, [&] { return done; }, std::chrono::milliseconds(3000)))
      << "the call back to the caller waited behind the results";
  EXPECT_EQ(value, 106u) << "ECHO(5) on a node of value 1, plus 100";
  pair.client().close(Error(Errc::DISCONNECTED, "end"));
  (void)loop.run(loop.sleep(std::chrono::milliseconds(1)));
}

TEST(RpcLimitsDeathTest, ALimitAboveTheLargestSpillBufferIsRefusedWhenTheConnectionIsMade) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EventLoop loop;
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  auto in = std::move(Channel::create(co).value());
  auto out = std::move(Channel::create(co).value());
  MessageSender tx(out->attachSender().value());
  MessageReceiverOptions big;
  big.limits.maxFrameBytes = 8u << 20;
  MessageReceiver bigRx(*in, in->attachReceiver().value(), rpcReceiverOptions(big));
  EXPECT_DEATH(RpcConnection(tx, bigRx, loop, RpcOptions{}), "above the largest spill buffer");
  auto other = std::move(Channel::create(co).value());
  MessageReceiver rx(*other, other->attachReceiver().value(), rpcReceiverOptions());
  RpcOptions huge;
  huge.maxMessageBytes = 8u << 20;
  EXPECT_DEATH(RpcConnection(tx, rx, loop, huge), "above the largest spill buffer");
  RpcOptions small;
  small.maxQueuedBytes = small.maxMessageBytes - 8;
  EXPECT_DEATH(RpcConnection(tx, rx, loop, small), "one message must fit the queue");
  RpcOptions noQuestions;
  noQuestions.maxQuestions = 0;
  EXPECT_DEATH(RpcConnection(tx, rx, loop, noQuestions), "maxQuestions is 0");
  RpcOptions tinyReply;
  tinyReply.replyBytesPerCall = 8;
  EXPECT_DEATH(RpcConnection(tx, rx, loop, tinyReply), "below a frame header and a word");
  RpcOptions smallestReply;  // the least allowed is taken
  smallestReply.replyBytesPerCall = 16;
  RpcConnection taken(tx, rx, loop, smallestReply);
  EXPECT_EQ(taken.replyBytesAvailable(), 64u * 1024 - 8);
}

}  // namespace
}  // namespace agate::rpc::test
