// RpcConnection over LOCAL channels on one loop: calls, E-order, promise pipelining (order and
// message counts), cancellation, errors down a pipeline, capabilities passed both ways, Release,
// calls from server to client, and a peer that goes away.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

Promise<uint64_t> echo(RemoteCap cap, uint64_t v) {
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(v);
  Result<Response> r = co_await req.send();
  AGATE_CO_TRY(r);
  co_return r->results().getAs<Value>().getValue();
}

Promise<uint64_t> awaitValue(RemotePromise p) {
  Result<Response> r = co_await p;
  AGATE_CO_TRY(r);
  uint64_t v = 0;
  AGATE_CO_TRY(r->tryRead<Value>([&](Value::Reader x) { v = x.getValue(); }));
  co_return v;
}

class RpcTest : public ::testing::Test {
 protected:
  Watchdog watchdog_{"rpc_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  Node root_{0, log_};
};

TEST_F(RpcTest, CallReturnsResultsReadInPlace) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  Result<uint64_t> v = loop_.run(echo(cap, 41));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 41u);
  EXPECT_EQ(pair.client().stats().callsSent, 1u);
  EXPECT_EQ(pair.server().stats().returnsSent, 1u);
  // Finish follows the Return; both tables drain.
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 0; }));
  EXPECT_EQ(pair.client().questionCount(), 0u);
  EXPECT_EQ(pair.client().stats().finishesSent, 1u);
}

TEST_F(RpcTest, QuestionIdsAreReusedAfterFinishAndReturn) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  uint32_t first = 0;
  for (int i = 0; i < 3; ++i) {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, ECHO, 16).send();
    if (i == 0) first = p.questionId();
    EXPECT_EQ(p.questionId(), first);
    Result<uint64_t> v = loop_.run(awaitValue(std::move(p)));
    ASSERT_TRUE(v.ok());
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 0; }));
  }
}

// A dropped call's id stays taken while its Finish is out and its Return (canceled) is not
// back: a new call sent meanwhile gets another id, and its own results, not the old Return.
TEST_F(RpcTest, ADroppedCallsIdIsNotReusedBeforeItsReturnArrives) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  uint32_t dropped = 0;
  {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    dropped = p.questionId();
    ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  }  // Finish goes out; the canceled Return is not read yet (the loop has not run)
  EXPECT_EQ(pair.client().questionCount(), 1u);
  Request next = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  next.initParams<Value>().setValue(5);
  RemotePromise p = next.send();
  EXPECT_NE(p.questionId(), dropped);
  Result<uint64_t> v = loop_.run(awaitValue(std::move(p)));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 5u);
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.client().questionCount() == 0 && pair.server().answerCount() == 0;
  }));
  // Both Returns came back, each to its own question.
  EXPECT_EQ(pair.client().stats().returnsReceived, 2u);
  EXPECT_TRUE(pair.client().isOpen());
}

Promise<uint64_t> holdOneResponseWhileAwaitingAnother(RemoteCap cap) {
  Request first = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  first.initParams<Value>().setValue(7);
  Result<Response> kept = co_await first.send();
  AGATE_CO_TRY(kept);
  // The connection must go on reading while `kept` lives (it is moved out of the ring).
  Request second = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  second.initParams<Value>().setValue(100);
  Result<Response> other = co_await second.send();
  AGATE_CO_TRY(other);
  co_return kept->results().getAs<Value>().getValue() * 1000 +
      other->results().getAs<Value>().getValue();
}

TEST_F(RpcTest, AHeldResponseStaysReadableAndNeverStallsTheConnection) {
  LocalPair pair(loop_, &root_);
  Result<uint64_t> v = loop_.run(holdOneResponseWhileAwaitingAnother(pair.client().bootstrap()));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 7100u);
}

TEST_F(RpcTest, RepliesAwaitedOutOfOrderAllArrive) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < 8; ++i) {
    Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.initParams<Value>().setValue(i);
    pending.push_back(req.send());
  }
  for (size_t i = pending.size(); i-- > 0;) {
    EXPECT_EQ(loop_.run(awaitValue(std::move(pending[i]))).value(), i);
  }
}

TEST_F(RpcTest, CallsOnOneReferenceArriveInOrder) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < 50; ++i) {
    Request req = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
    req.initParams<Value>().setValue(i);
    pending.push_back(req.send());
  }
  for (RemotePromise& p : pending) {
    Result<uint64_t> r = loop_.run(awaitValue(std::move(p)));
    (void)r;
  }
  ASSERT_EQ(log_.order.size(), 50u);
  for (uint64_t i = 0; i < 50; ++i) EXPECT_EQ(log_.order[i], i);
}

// Ten dependent calls: each targets a capability inside the previous call's results. All go out
// before any Return comes back, so the chain costs about one round trip.
void runChain(EventLoop& loop, LocalPair& pair, Method method, uint64_t* value,
              uint64_t* receivedBeforeLastSend) {
  RemoteCap cap = pair.client().bootstrap();
  std::optional<RemotePromise> last;
  for (int i = 0; i < 10; ++i) {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, method, 16).send();
    cap = p.pipeline({0});
    if (i == 9) {
      *receivedBeforeLastSend = pair.client().stats().messagesReceived;
      last.emplace(std::move(p));
    }
  }
  Result<Response> r =
      loop.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(*last));
  ASSERT_TRUE(r.ok()) << errcName(r.code());
  *value = r->results().getAs<CapAndValue>().getValue();
}

TEST_F(RpcTest, PipelinedChainOfTenCompletesInOneRoundTrip) {
  LocalPair pair(loop_, &root_);
  uint64_t value = 0, received = 99;
  runChain(loop_, pair, NEXT, &value, &received);
  EXPECT_EQ(value, 10u);
  EXPECT_EQ(received, 0u) << "every call was sent before any message came back";
  EXPECT_EQ(pair.client().stats().callsSent, 10u);
  EXPECT_EQ(pair.server().stats().callsReceived, 10u);
  bool drained = runUntil(
      loop_, [&] { return pair.server().answerCount() == 0 && pair.server().exportCount() == 1; });
  ASSERT_TRUE(drained) << pair.server().answerCount() << " answers, " << pair.server().exportCount()
                       << " exports, " << pair.client().importCount() << " imports, "
                       << pair.client().questionCount() << " questions";
  EXPECT_EQ(pair.client().questionCount(), 0u);
  EXPECT_EQ(pair.client().importCount(), 0u);
  EXPECT_EQ(log_.destroyed, 10) << "every Node the chain created was released and destroyed";
  // The nine promises were dropped before their Returns: their Finishes released the nine
  // Nodes (Finish.releaseResultCaps), the last one the Release of the Response's import.
  EXPECT_EQ(pair.client().stats().finishesReleasingResults, 9u);
  EXPECT_EQ(pair.client().stats().releasesSent, 1u);
  EXPECT_EQ(pair.server().stats().resultRefsReleasedByFinish, 9u);
}

TEST_F(RpcTest, PipelinedCallsQueueUntilTheirAnswerReturnsAndRunInOrder) {
  LocalPair pair(loop_, &root_);
  uint64_t value = 0, received = 99;
  runChain(loop_, pair, NEXT_LATER, &value, &received);
  EXPECT_EQ(value, 10u);
  EXPECT_EQ(received, 0u);
  EXPECT_EQ(pair.server().stats().pipelinedCallsQueued, 9u);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().exportCount() == 1; }));
  EXPECT_EQ(log_.destroyed, 10);
  // Here the Finishes reached the answers before they returned (their calls still running).
  EXPECT_EQ(pair.server().stats().resultRefsReleasedByFinish, 9u);
  EXPECT_EQ(pair.client().stats().releasesSent, 1u);
}

TEST_F(RpcTest, PipelinedCallsOnOneAnswerKeepTheirOrder) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  RemotePromise child = cap.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
  RemoteCap promised = child.pipeline({0});
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < 20; ++i) {
    Request req = promised.newCall(NODE_INTERFACE_ID, RECORD, 16);
    req.initParams<Value>().setValue(i);
    pending.push_back(req.send());
  }
  for (RemotePromise& p : pending) (void)loop_.run(awaitValue(std::move(p)));
  ASSERT_EQ(log_.order.size(), 20u);
  for (uint64_t i = 0; i < 20; ++i) EXPECT_EQ(log_.order[i], i);
  EXPECT_EQ(pair.server().stats().pipelinedCallsQueued, 20u);
}

TEST_F(RpcTest, ErrorPropagatesDownAPipelineWithItsText) {
  for (Method failing : {FAIL, FAIL_LATER}) {
    LocalPair pair(loop_, &root_);
    RemoteCap cap = pair.client().bootstrap();
    RemotePromise first = cap.newCall(NODE_INTERFACE_ID, failing, 16).send();
    RemoteCap a = first.pipeline({0});
    RemotePromise second = a.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    RemoteCap b = second.pipeline({0});
    Result<uint64_t> r = loop_.run(echo(b, 1));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.code(), Errc::FAILED);
    EXPECT_STREQ(r.error().detail, failing == FAIL ? "boom" : "boom later");
    EXPECT_TRUE(pair.client().isOpen()) << "a failed call is not a broken connection";
  }
}

TEST_F(RpcTest, PipelineOnResultsWithoutACapabilityFailsThatCallOnly) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(3);
  RemotePromise p = req.send();
  RemoteCap nothing = p.pipeline({0});
  Result<uint64_t> r = loop_.run(echo(nothing, 1));
  EXPECT_EQ(r.code(), Errc::FAILED);
  EXPECT_EQ(loop_.run(awaitValue(std::move(p))).value(), 3u);
  EXPECT_TRUE(pair.server().isOpen());
}

TEST_F(RpcTest, DroppingThePromiseSendsFinishAndCancelsTheServersCall) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  }
  EXPECT_EQ(pair.client().stats().finishesSent, 1u);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.cancelled == 1; }));
  EXPECT_EQ(log_.hanging, 0);
  // The callee answers Return.canceled, after which both ids are free.
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.client().questionCount() == 0 && pair.server().answerCount() == 0;
  }));
  EXPECT_EQ(pair.server().stats().returnsSent, 1u);
  EXPECT_EQ(loop_.run(echo(cap, 7)).value(), 7u) << "the connection still works";
}

TEST_F(RpcTest, FinishDoesNotCancelACallThatPipelinedCallsWaitOn) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  RemoteCap next;
  {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
    next = p.pipeline({0});
  }
  // Only the pipelined reference keeps the question; a call through it then drops it too.
  Result<uint64_t> r = loop_.run(echo(std::move(next), 10));
  ASSERT_TRUE(r.ok()) << errcName(r.code());
  EXPECT_EQ(*r, 11u);
}

TEST_F(RpcTest, CapabilityPassedBackArrivesAsTheServersOwnObject) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  Result<Response> made = loop_.run([](RemoteCap c) -> Promise<Response> {
    co_return co_await c.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
  }(cap));
  ASSERT_TRUE(made.ok());
  Result<ReceivedCap> child = made->capAt(made->results().getAs<capnp::AnyStruct>(), 0);
  ASSERT_TRUE(child.ok());
  RemoteCap childCap = std::move(child->remote);
  ASSERT_FALSE(childCap.isNull());
  { Response drop = std::move(*made); }
  EXPECT_EQ(pair.server().exportCount(), 2u) << "the bootstrap object and the child";

  Request req = cap.newCall(NODE_INTERFACE_ID, IDENTIFY, 32);
  CapParam::Builder params = req.initParams<CapParam>();
  Result<uint32_t> index = req.addCap(childCap);
  ASSERT_TRUE(index.ok());
  writeCapPointer(params, 0, *index);
  Result<uint64_t> kind = loop_.run(awaitValue(req.send()));
  ASSERT_TRUE(kind.ok()) << errcName(kind.code());
  EXPECT_EQ(*kind, 1u);
  ASSERT_EQ(log_.identified.size(), 1u);
  EXPECT_EQ(static_cast<Node*>(log_.identified[0])->value(), 1u);

  // Dropping the last reference sends Release; the connection-owned child is destroyed.
  childCap = RemoteCap();
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.destroyed == 1; }));
  EXPECT_EQ(pair.client().stats().releasesSent, 1u);
  EXPECT_EQ(pair.server().exportCount(), 1u);
  EXPECT_EQ(pair.client().importCount(), 1u) << "only the bootstrap reference remains";
}

// Dropping the last reference to an import sends its Release at once, even outside the loop.
TEST_F(RpcTest, AReferenceLetGoOfOutsideTheLoopIsReleasedAtOnce) {
  Node root(0, log_);
  LocalPair pair(loop_, &root);
  RemoteCap bootstrap = pair.client().bootstrap();
  Result<RemoteCap> child = loop_.run([&]() -> Promise<RemoteCap> {
    Result<Response> r = co_await bootstrap.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    AGATE_CO_TRY(r);
    Result<ReceivedCap> cap = r->getCap(0);
    AGATE_CO_TRY(cap);
    co_return cap->remote;
  }());
  ASSERT_TRUE(child.ok());
  const uint64_t before = pair.client().stats().releasesSent;
  child = Error(Errc::CANCELLED);  // drops the only reference, outside any turn
  EXPECT_EQ(pair.client().stats().releasesSent, before + 1);
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.destroyed == 1; }));
}

TEST_F(RpcTest, ServerCallsAnObjectTheClientPassedIn) {
  Log clientLog;
  Node clientObject(1000, clientLog);
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  Request req = cap.newCall(NODE_INTERFACE_ID, CALL_BACK, 32);
  CapParam::Builder params = req.initParams<CapParam>();
  Result<uint32_t> index = req.addCap(clientObject);
  ASSERT_TRUE(index.ok());
  writeCapPointer(params, 0, *index);
  Result<uint64_t> v = loop_.run(awaitValue(req.send()));
  ASSERT_TRUE(v.ok()) << errcName(v.code());
  EXPECT_EQ(*v, 1105u);
  EXPECT_EQ(pair.server().stats().callsSent, 1u);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().exportCount() == 1; }))
      << "the server released the client's object after the call";
  EXPECT_EQ(clientLog.destroyed, 0) << "a borrowed export is never destroyed by the connection";
}

TEST_F(RpcTest, ServerErrorArrivesAsTheSameErrc) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  Result<uint64_t> r = loop_.run(awaitValue(cap.newCall(NODE_INTERFACE_ID, 99, 16).send()));
  EXPECT_EQ(r.code(), Errc::UNSUPPORTED);
  EXPECT_STREQ(r.error().detail, "no such method");
}

// A reason longer than the wire carries (120 bytes) is cut, and the connection carries on (the
// cut once wrote a Text that was not NUL-terminated: the reader failed and calls hung).
class LongWinded final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext&) override {
    return readyPromise<void>(Error(Errc::FAILED, reason.c_str()));
  }
  const std::string reason = std::string(100, 'a') + std::string(100, 'b');
};

TEST_F(RpcTest, AReasonLongerThanTheWireCarriesArrivesCut) {
  LongWinded server;
  LocalPair pair(loop_, &server);
  RemoteCap cap = pair.client().bootstrap();
  for (int i = 0; i < 2; ++i) {
    Result<uint64_t> r = loop_.run(awaitValue(cap.newCall(NODE_INTERFACE_ID, ECHO, 16).send()));
    ASSERT_EQ(r.code(), Errc::FAILED);
    EXPECT_EQ(std::string(r.error().detail), server.reason.substr(0, 120));
  }
  EXPECT_TRUE(pair.client().isOpen());
  EXPECT_TRUE(pair.server().isOpen());
}

// A method (not a coroutine) that reads its params as a struct without tryReadParams: Cap'n
// Proto throws when they are something else.
class CarelessReader final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    const uint64_t v = ctx.params().getAs<Value>().getValue();  // throws on a list
    Result<Value::Builder> out = ctx.initResultsAs<Value>(16);
    if (!out) return readyPromise<void>(out.error());
    out->setValue(v + 1);
    return readyPromise<void>(Status{});
  }
};

TEST_F(RpcTest, AMethodThatThrowsReadingItsParamsFailsItsCallNotTheConnection) {
  CarelessReader server;
  LocalPair pair(loop_, &server);
  RemoteCap cap = pair.client().bootstrap();
  Request bad = cap.newCall(NODE_INTERFACE_ID, ECHO, 64);
  bad.params().initAs<capnp::List<uint64_t>>(3);  // a list where the method reads a struct
  Result<uint64_t> r = loop_.run(awaitValue(bad.send()));
  ASSERT_EQ(r.code(), Errc::PROTOCOL_ERROR);
  EXPECT_NE(std::string(r.error().detail).find("the method threw"), std::string::npos)
      << r.error().detail;
  EXPECT_TRUE(pair.server().isOpen());
  Request good = cap.newCall(NODE_INTERFACE_ID, ECHO, 64);
  good.initParams<Value>().setValue(6);
  EXPECT_EQ(loop_.run(awaitValue(good.send())).value(), 7u) << "the connection carries on";
}

TEST_F(RpcTest, ResultsTooLargeForAFrameFailTheCallNotTheConnection) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  Request req = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
  // Params larger than the connection's largest message: refused at send, nothing sent.
  auto data = req.params().initAs<capnp::Data>(64 * 1024);
  std::memset(data.begin(), 1, data.size());
  Result<uint64_t> r = loop_.run(awaitValue(req.send()));
  EXPECT_EQ(r.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_EQ(pair.client().stats().callsSent, 0u);
  EXPECT_EQ(pair.client().questionCount(), 0u);
  EXPECT_EQ(loop_.run(echo(cap, 2)).value(), 2u);
}

TEST_F(RpcTest, ABackloggedRingSpillsMessagesAndSendsThemInOrder) {
  // A small ring: many calls in flight overflow it and queue in spill buffers (each reserving
  // less reply space than by default, so that 200 fit the small reply ring).
  RpcOptions options;
  options.replyBytesPerCall = 16;
  LocalPair pair(loop_, &root_, nullptr, options, 4096);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> pending;
  for (uint64_t i = 0; i < 200; ++i) {
    Request req = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
    req.initParams<Value>().setValue(i);
    pending.push_back(req.send());
  }
  EXPECT_GT(pair.client().stats().spilledMessages, 0u);
  for (RemotePromise& p : pending) ASSERT_TRUE(loop_.run(awaitValue(std::move(p))).ok());
  ASSERT_EQ(log_.order.size(), 200u);
  for (uint64_t i = 0; i < 200; ++i) ASSERT_EQ(log_.order[i], i);
}

TEST_F(RpcTest, PeerGoingAwayFailsPendingCallsDisconnected) {
  LocalPair pair(loop_, &root_);
  RemoteCap cap = pair.client().bootstrap();
  RemotePromise hanging = cap.newCall(NODE_INTERFACE_ID, HANG, 16).send();
  ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
  pair.destroyServer();
  EXPECT_EQ(log_.cancelled, 1) << "the server's running call was cancelled";
  Result<uint64_t> r = loop_.run(awaitValue(std::move(hanging)));
  EXPECT_EQ(r.code(), Errc::DISCONNECTED);
  EXPECT_FALSE(pair.client().isOpen());
  // Later calls fail at once, without touching the dead channel.
  EXPECT_EQ(loop_.run(echo(cap, 1)).code(), Errc::DISCONNECTED);
}

TEST_F(RpcTest, ClientGoingAwayDropsItsStateOnTheServer) {
  LocalPair pair(loop_, &root_);
  {
    RemoteCap cap = pair.client().bootstrap();
    Result<Response> made = loop_.run([](RemoteCap c) -> Promise<Response> {
      co_return co_await c.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    }(cap));
    ASSERT_TRUE(made.ok());
    Result<ReceivedCap> child = made->getCap(0);
    ASSERT_TRUE(child.ok());
    RemoteCap keep = std::move(child->remote);
    { Response drop = std::move(*made); }
    RemotePromise hanging = keep.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    ASSERT_TRUE(runUntil(loop_, [&] { return log_.hanging == 1; }));
    // The client vanishes with a call running and an export held: abandon the handles first
    // (they must not outlive the connection), without letting them send anything.
    pair.client().close(Error(Errc::DISCONNECTED, "client exits"));
  }
  pair.destroyClient();
  bool ended = false;
  loop_.spawn([](RpcConnection& s, bool& flag) -> Promise<void> {
    Status st = co_await s.onDisconnect();
    flag = st.code() == Errc::DISCONNECTED;
    co_return {};
  }(pair.server(), ended));
  ASSERT_TRUE(runUntil(loop_, [&] { return ended; }));
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().exportCount() == 0; }))
      << "a dead connection keeps no exports, not even the bootstrap entry";
  EXPECT_EQ(log_.cancelled, 1);
  EXPECT_EQ(log_.destroyed, 1) << "the child the client held was destroyed";
  EXPECT_EQ(pair.server().answerCount(), 0u);
}

// The rings of a connection whose two sides run on two threads: the server's ends are taken
// here, to be moved into the server thread; the client attaches its own.
struct CrossThreadRings {
  std::unique_ptr<Channel> c2s = makeLocal();
  std::unique_ptr<Channel> s2c = makeLocal();
  Receiver serverIn = std::move(c2s->attachReceiver().value());
  Sender serverOut = std::move(s2c->attachSender().value());

  static std::unique_ptr<Channel> makeLocal() {
    ChannelOptions co;
    co.scope = ChannelScope::LOCAL;
    return std::move(Channel::create(co).value());
  }
};

// The two sides on two threads, each with its own loop: the rings are the only thing shared.
// `parkAtOnce`: both readers park on their doorbell without spinning, with a park slice far
// longer than the watchdog, so every message must be announced by a doorbell ring (the rings
// of a burst are batched: RpcConnection::ringPeer); a lost one hangs the test.
void twoThreads(EventLoop& loop_, bool parkAtOnce) {
  AsyncWaitPolicy wait;
  if (parkAtOnce) {
    wait.spinIterations = 0;
    wait.parkSlice = std::chrono::hours(1);
  }
  CrossThreadRings rings;
  int serverEnd = -1;
  std::thread server([&] {
    EventLoop loop;
    Log log;
    Node root(0, log);
    MessageSender tx(std::move(rings.serverOut));
    MessageReceiver rx(*rings.c2s, std::move(rings.serverIn), rpcReceiverOptions());
    RpcOptions options;
    options.bootstrap = &root;
    options.wait = wait;
    RpcConnection conn(tx, rx, loop, options);
    Status st = loop.run(conn.onDisconnect());
    serverEnd = static_cast<int>(st.code());
  });
  {
    MessageSender tx(rings.c2s->attachSender().value());
    MessageReceiver rx(*rings.s2c, rings.s2c->attachReceiver().value(), rpcReceiverOptions());
    RpcConnection conn(tx, rx, loop_, RpcOptions{.wait = wait});
    RemoteCap root = conn.bootstrap();
    for (uint64_t i = 0; i < 200; ++i) ASSERT_EQ(loop_.run(echo(root, i)).value(), i);
    if (parkAtOnce) {
      // A call made while both sides are surely parked (no reader's turn is running to ring for
      // it): only the connection's ring task announces it.
      for (uint64_t i = 0; i < 3; ++i) {
        (void)loop_.run(loop_.sleep(std::chrono::milliseconds(20)));
        ASSERT_EQ(loop_.run(echo(root, i)).value(), i);
      }
    }
    (void)loop_.run(loop_.sleep(1ms));  // the last echo's Finish, queued, goes out first
    const RpcStats before = conn.stats();
    std::optional<RemotePromise> last;  // held here: its Finish goes after the counts below
    auto chain = [](EventLoop& loop, RemoteCap cap,
                    std::optional<RemotePromise>& end) -> Promise<Response> {
      co_await loop.yield();  // on into a turn of the loop, as a served call would be
      for (int i = 0; i < 10; ++i) {
        RemotePromise p = cap.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
        cap = p.pipeline({0});
        if (i == 9) end.emplace(std::move(p));
      }
      co_return co_await *end;
    };
    Result<Response> r = loop_.run(chain(loop_, root, last));
    ASSERT_TRUE(r.ok()) << errcName(r.code());
    EXPECT_EQ(r->results().getAs<CapAndValue>().getValue(), 10u);
    // The ten calls and the Finishes of the nine promises dropped before their Returns went out
    // in one turn: one ring announced them all. Those nine released the Returns' references
    // (Finish.releaseResultCaps): no Release follows.
    EXPECT_EQ(conn.stats().finishesReleasingResults - before.finishesReleasingResults, 9u);
    EXPECT_EQ(conn.stats().releasesSent, before.releasesSent);
    EXPECT_EQ(conn.stats().messagesSent - before.messagesSent, 19u);
    EXPECT_EQ(conn.stats().doorbellRings - before.doorbellRings, 1u);
    last.reset();
  }  // the client's connection closes; the server thread sees DISCONNECTED
  server.join();
  EXPECT_EQ(serverEnd, static_cast<int>(Errc::DISCONNECTED));
}

TEST_F(RpcTest, ConnectionsOnTwoThreadsServeCallsAndPipelines) { twoThreads(loop_, false); }

TEST_F(RpcTest, ConnectionsOnTwoThreadsThatOnlyParkHearOfEveryMessage) { twoThreads(loop_, true); }

// Counts the calls it serves, readable from another thread.
class CountingServer final : public ServerObject {
 public:
  std::atomic<int> calls{0};
  Promise<void> dispatch(uint64_t, uint16_t, CallContext&) override {
    calls.fetch_add(1, std::memory_order_release);
    return readyPromise<void>(Status{});
  }
};

// A call sent by a coroutine whose run() ends right after it (the loop's thread then waits
// outside the loop), and one sent outside any run(): the peer, parked with a park slice far
// longer than the watchdog, must hear of both while this thread is away from its loop.
TEST_F(RpcTest, ACallSentJustBeforeTheThreadLeavesItsLoopReachesAParkedPeer) {
  AsyncWaitPolicy wait{.spinIterations = 0, .parkSlice = std::chrono::hours(1)};
  CrossThreadRings rings;
  CountingServer counter;
  std::atomic<bool> serverParked{false};
  std::thread server([&] {
    EventLoop loop;
    MessageSender tx(std::move(rings.serverOut));
    MessageReceiver rx(*rings.c2s, std::move(rings.serverIn), rpcReceiverOptions());
    RpcConnection conn(tx, rx, loop, RpcOptions{.bootstrap = &counter, .wait = wait});
    serverParked.store(true, std::memory_order_release);
    (void)loop.run(conn.onDisconnect());
  });
  auto waitForCalls = [&](int n) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (counter.calls.load(std::memory_order_acquire) < n &&
           std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return counter.calls.load(std::memory_order_acquire) >= n;
  };
  {
    MessageSender tx(rings.c2s->attachSender().value());
    MessageReceiver rx(*rings.s2c, rings.s2c->attachReceiver().value(), rpcReceiverOptions());
    RpcConnection conn(tx, rx, loop_, RpcOptions{.wait = wait});
    RemoteCap root = conn.bootstrap();
    while (!serverParked.load(std::memory_order_acquire)) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the server's reader parks
    std::optional<RemotePromise> first;
    ASSERT_TRUE(loop_
                    .run([&]() -> Promise<void> {
                      co_await loop_.yield();  // inside a turn of the loop
                      first.emplace(root.newCall(NODE_INTERFACE_ID, ECHO, 0).send());
                      co_return {};
                    }())
                    .ok());
    EXPECT_TRUE(waitForCalls(1)) << "the call sent at the end of run() was never announced";
    RemotePromise second = root.newCall(NODE_INTERFACE_ID, ECHO, 0).send();  // outside run()
    EXPECT_TRUE(waitForCalls(2)) << "the call sent outside the loop was never announced";
    EXPECT_TRUE(
        loop_.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(*first))
            .ok());
    EXPECT_TRUE(
        loop_.run([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(second))
            .ok());
    first.reset();
  }  // the client's connection closes; the server thread sees DISCONNECTED
  server.join();
}

TEST_F(RpcTest, CallsOnANullCapabilityFailWithoutAConnection) {
  RemoteCap none;
  Request req = none.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(1);  // building still works
  RemotePromise p = req.send();
  EXPECT_EQ(loop_.run(awaitValue(std::move(p))).code(), Errc::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace agate::rpc::test
