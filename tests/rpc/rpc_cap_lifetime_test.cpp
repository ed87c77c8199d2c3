// Who keeps a capability alive while a message that names it is on its way. A cap-table entry
// that passes a peer's capability back to it (receiverHosted) holds a reference to the import
// until the message is sent, and a Request holds its target (import or pipelined question)
// until its Call is sent: a caller may drop its own reference at once, and the Release or
// Finish that follows never overtakes the message. A capability returned to its owner
// (receiverHosted in a Return) is pinned when the Return is read, until the Response goes, so
// a Release right behind the Return neither frees it nor lets its id name another object.
#include <gtest/gtest.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "agate/rpc/cap_pointer.h"
#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

// A server that keeps a capability its caller passed (STORE) and hands it back, letting go of
// it in the same call (TAKE: a take that clears the slot).
class Holder final : public ServerObject {
 public:
  static constexpr uint16_t STORE = 0, TAKE = 1;
  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    if (methodId == STORE) {
      Result<ReceivedCap> cap = ctx.getCap(0);
      if (!cap) return readyPromise<void>(cap.error());
      stored_ = cap->remote;
      return readyPromise<void>(Status{});
    }
    Result<CapParam::Builder> out = ctx.initResultsAs<CapParam>(16);
    if (!out) return readyPromise<void>(out.error());
    Result<uint32_t> index = ctx.addResultCap(stored_);
    if (!index) return readyPromise<void>(index.error());
    writeCapPointer(*out, 0, *index);
    stored_ = RemoteCap();  // the last reference: the Release must follow the Return
    return readyPromise<void>(Status{});
  }
  RemoteCap stored_;
};

// The client passes one of its objects to the holder, which returns it and drops its reference
// in the same call: the Return names the export, the Release follows it, and the client gets
// its own object (the connection stays open; the export is freed once the Response goes).
TEST(RpcCapLifetimeTest, ACapabilityHandedBackAndDroppedInTheSameCallReachesItsOwner) {
  Watchdog watchdog{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Holder holder;
  LocalPair pair(loop, &holder);
  RemoteCap root = pair.client().bootstrap();
  auto owned = std::make_unique<Node>(1, log);
  Node* mine = owned.get();
  ServerObject* got = nullptr;
  Errc code = Errc::OK;
  (void)loop.run([&]() -> Promise<void> {
    {
      Request store = root.newCall(NODE_INTERFACE_ID, Holder::STORE, 16);
      store.noPipelining();  // as typed stubs send a method whose results hold no capability
      Result<uint32_t> index = store.addCap(std::move(owned));
      AGATE_CO_TRY(index);
      writeCapPointer(store.initParams<CapParam>(), 0, *index);
      Result<Response> r = co_await store.send();
      AGATE_CO_TRY(r);
    }
    Result<Response> r = co_await root.newCall(NODE_INTERFACE_ID, Holder::TAKE, 16).send();
    if (!r) {
      code = r.code();
      co_return {};
    }
    // Give the Release behind the Return time to arrive while the Response is held.
    for (int i = 0; i < 10; ++i) co_await EventLoop::current()->yield();
    Result<ReceivedCap> cap = r->getCap(0);
    if (cap) got = cap->local;
    co_return {};
  }());
  EXPECT_EQ(code, Errc::OK);
  EXPECT_EQ(got, static_cast<ServerObject*>(mine));
  EXPECT_TRUE(pair.client().isOpen()) << pair.client().failure().detail;
  EXPECT_TRUE(pair.server().isOpen()) << pair.server().failure().detail;
  // Nobody holds the object any more: the client's export goes.
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; }));
  EXPECT_EQ(pair.client().stats().releasesReceived, 1u);
}

// Gets a Node(1) from the server's root (NEXT) into `child`, and lets the NEXT call's Finish go
// out and be read (its results no longer pin the child).
Promise<void> takeChild(RemoteCap& bootstrap, RemoteCap& child) {
  {
    Result<Response> r = co_await bootstrap.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    AGATE_CO_TRY(r);
    Result<ReceivedCap> cap = r->getCap(0);
    AGATE_CO_TRY(cap);
    child = cap->remote;
  }
  for (int i = 0; i < 10; ++i) co_await EventLoop::current()->yield();
  co_return {};
}

// The same for a Call: the caller passes the server's own object back and drops its last
// reference between addCap() and send(); the Call names the export, the Release follows it.
TEST(RpcCapLifetimeTest, ACapabilityPassedBackAndDroppedBeforeSendReachesItsOwner) {
  Watchdog watchdog{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root(0, log);
  LocalPair pair(loop, &root);
  RemoteCap bootstrap = pair.client().bootstrap();
  Errc code = Errc::FAILED;
  uint64_t identified = 0;
  (void)loop.run([&]() -> Promise<void> {
    RemoteCap child;
    AGATE_CO_TRY(co_await takeChild(bootstrap, child));
    Request req = bootstrap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
    Result<uint32_t> index = req.addCap(child);
    AGATE_CO_TRY(index);
    writeCapPointer(req.initParams<CapParam>(), 0, *index);
    child = RemoteCap();  // the request still names it
    Result<Response> r = co_await req.send();
    code = r.code();
    if (r) identified = r->results().getAs<Value>().getValue();
    co_return {};
  }());
  EXPECT_EQ(code, Errc::OK);
  EXPECT_EQ(identified, 1u) << "the server sees its own object";
  EXPECT_TRUE(pair.server().isOpen()) << pair.server().failure().detail;
  // Released after the Call: the child goes once the call is done with it.
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; }));
  EXPECT_EQ(pair.client().stats().releasesSent, 1u);
}

// A request dropped unsent lets go of the capability it named: the Release goes out then.
TEST(RpcCapLifetimeTest, ARequestDroppedUnsentReleasesTheCapabilityItPassedBack) {
  Watchdog watchdog{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root(0, log);
  LocalPair pair(loop, &root);
  RemoteCap bootstrap = pair.client().bootstrap();
  RemoteCap child;
  ASSERT_TRUE(loop.run(takeChild(bootstrap, child)).ok());
  {
    Request req = bootstrap.newCall(NODE_INTERFACE_ID, IDENTIFY, 16);
    Result<uint32_t> index = req.addCap(child);
    ASSERT_TRUE(index.ok());
    writeCapPointer(req.initParams<CapParam>(), 0, *index);
    child = RemoteCap();
    EXPECT_EQ(pair.client().stats().releasesSent, 0u) << "released while a request names it";
  }  // dropped unsent
  EXPECT_EQ(pair.client().stats().releasesSent, 1u);
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; }));
  EXPECT_TRUE(pair.server().isOpen()) << pair.server().failure().detail;
}

// A Request holds its target: dropping the last reference to a pipelined capability between
// newCall() and send() (no suspension in between) keeps the question open until the Call is
// out, so the Finish follows the Call and the callee serves it.
TEST(RpcCapLifetimeTest, ARequestOnAPipelinedCapabilityDroppedBeforeSendDoesNotKillTheConnection) {
  Watchdog watchdog{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root(0, log);
  LocalPair pair(loop, &root);
  RemoteCap bootstrap = pair.client().bootstrap();
  std::optional<Request> req;
  {
    RemotePromise p = bootstrap.newCall(NODE_INTERFACE_ID, NEXT_LATER, 16).send();
    req.emplace(p.pipeline({0}).newCall(NODE_INTERFACE_ID, ECHO, 16));
  }  // p and the pipelined capability go: only the request holds the question now
  EXPECT_EQ(pair.client().stats().finishesSent, 0u) << "Finish sent while a request targets it";
  req->initParams<Value>().setValue(1);
  RemotePromise sent = req->send();
  req.reset();
  bool done = false;
  Errc code = Errc::OK;
  uint64_t value = 0;
  (void)loop.run([&]() -> Promise<void> {
    Result<Response> r = co_await sent;
    code = r.code();
    if (r) value = r->results().getAs<Value>().getValue();
    done = true;
    co_return {};
  }());
  ASSERT_TRUE(done);
  EXPECT_TRUE(pair.server().isOpen()) << "server aborted: " << pair.server().failure().detail;
  EXPECT_TRUE(pair.client().isOpen()) << "client: " << errcName(pair.client().failure().code);
  // The Finish follows the Call, which is queued on the answer by then: it does not cancel
  // NEXT_LATER (the queued call still needs its results), and the call is served.
  EXPECT_EQ(code, Errc::OK) << errcName(code);
  EXPECT_EQ(value, 2u);                                             // ECHO(1) on Node(1)
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; }));  // nobody holds Node(1)
}

// The same for an import: the caller drops its last reference between newCall() and send();
// the Release follows the Call, which reaches the object.
TEST(RpcCapLifetimeTest, ARequestOnAnImportDroppedBeforeSendReachesItsTarget) {
  Watchdog watchdog{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root(0, log);
  LocalPair pair(loop, &root);
  RemoteCap bootstrap = pair.client().bootstrap();
  RemoteCap child;
  ASSERT_TRUE(loop.run(takeChild(bootstrap, child)).ok());
  std::optional<Request> req;
  req.emplace(child.newCall(NODE_INTERFACE_ID, ECHO, 16));
  child = RemoteCap();
  EXPECT_EQ(pair.client().stats().releasesSent, 0u) << "released while a request targets it";
  req->initParams<Value>().setValue(1);
  RemotePromise sent = req->send();
  req.reset();
  EXPECT_EQ(pair.client().stats().releasesSent, 1u);  // right behind the Call
  Errc code = Errc::FAILED;
  uint64_t value = 0;
  bool done = false;
  (void)loop.run([&]() -> Promise<void> {
    Result<Response> r = co_await sent;
    code = r.code();
    if (r) value = r->results().getAs<Value>().getValue();
    done = true;
    co_return {};
  }());
  ASSERT_TRUE(done);
  EXPECT_EQ(code, Errc::OK);
  EXPECT_EQ(value, 2u);  // ECHO(1) on Node(1)
  EXPECT_TRUE(pair.server().isOpen()) << "server aborted: " << pair.server().failure().detail;
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; }));
}

// A request on an import dropped unsent lets go of its target: the Release goes out then.
TEST(RpcCapLifetimeTest, ARequestDroppedUnsentReleasesItsTarget) {
  Watchdog watchdog{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root(0, log);
  LocalPair pair(loop, &root);
  RemoteCap bootstrap = pair.client().bootstrap();
  RemoteCap child;
  ASSERT_TRUE(loop.run(takeChild(bootstrap, child)).ok());
  {
    Request req = child.newCall(NODE_INTERFACE_ID, ECHO, 16);
    req.initParams<Value>().setValue(1);
    child = RemoteCap();
    EXPECT_EQ(pair.client().stats().releasesSent, 0u);
  }
  EXPECT_EQ(pair.client().stats().releasesSent, 1u);
  EXPECT_TRUE(runUntil(loop, [&] { return log.destroyed == 1; }));
  EXPECT_TRUE(pair.server().isOpen()) << pair.server().failure().detail;
}

// One side of a connection driven by hand: the test plays the peer, writing its messages.
class RpcCapLifetimeRawTest : public ::testing::Test {
 protected:
  RpcCapLifetimeRawTest() {
    ChannelOptions co;
    co.scope = ChannelScope::LOCAL;
    toConn_ = std::move(Channel::create(co).value());
    fromConn_ = std::move(Channel::create(co).value());
    peerTx_ = std::make_unique<MessageSender>(toConn_->attachSender().value());
    connRx_ = std::make_unique<MessageReceiver>(*toConn_, toConn_->attachReceiver().value(),
                                                rpcReceiverOptions());
    connTx_ = std::make_unique<MessageSender>(fromConn_->attachSender().value());
    peerRx_ = std::make_unique<MessageReceiver>(*fromConn_, fromConn_->attachReceiver().value(),
                                                rpcReceiverOptions());
    RpcOptions options;
    options.bootstrap = &root_;
    conn_ = std::make_unique<RpcConnection>(*connTx_, *connRx_, loop_, options);
  }
  ~RpcCapLifetimeRawTest() override { conn_.reset(); }

  void send(const std::function<void(wire::Message::Builder)>& fill) {
    Result<OutgoingMessage> m = peerTx_->tryStartMessage(1024);
    ASSERT_TRUE(m.ok());
    fill(m->initRoot<wire::Message>());
    ASSERT_TRUE(m->send().ok());
  }
  void expectFromConn(const std::function<void(wire::Message::Reader)>& check) {
    Result<IncomingMessage> in = loop_.run(peerRx_->receiveAsync(loop_));
    ASSERT_TRUE(in.ok()) << errcName(in.code());
    ASSERT_TRUE(in->validate().ok());  // rpcReceiverOptions() validate on demand
    check(in->getRoot<wire::Message>());
  }

  Watchdog watchdog_{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  Node root_{0, log_};
  std::unique_ptr<Channel> toConn_, fromConn_;
  std::unique_ptr<MessageSender> peerTx_, connTx_;
  std::unique_ptr<MessageReceiver> connRx_, peerRx_;
  std::unique_ptr<RpcConnection> conn_;
};

// The peer returns the object it was given (receiverHosted) and releases its own reference
// right behind the Return, as it may. The object stays pinned while the Response lives: the
// caller gets it (not DISCONNECTED, and not another object that took the freed id), and it is
// freed when the Response goes.
TEST_F(RpcCapLifetimeRawTest, AReceiverHostedResultSurvivesAReleaseThatFollowsTheReturn) {
  RemoteCap peerRoot = conn_->bootstrap();
  Request req = peerRoot.newCall(NODE_INTERFACE_ID, ECHO, 16);
  auto owned = std::make_unique<Node>(7, log_);
  Node* passed = owned.get();
  ASSERT_TRUE(req.addCap(std::move(owned)).ok());
  RemotePromise p = req.send();
  uint32_t questionId = 0, exportId = 0;
  expectFromConn([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    questionId = m.getCall().getQuestionId();
    exportId = m.getCall().getParams().getCapTable()[0].getSenderHosted();
  });
  send([&](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(questionId);
    wire::Payload::Builder results = r.initResults();
    writeCapPointer(results.getContent().initAs<CapParam>(), 0, 0);
    results.initCapTable(1)[0].setReceiverHosted(exportId);
  });
  send([&](wire::Message::Builder m) {
    wire::Release::Builder r = m.initRelease();
    r.setId(exportId);
    r.setReferenceCount(1);
  });
  ASSERT_TRUE(runUntil(loop_, [&] { return conn_->stats().releasesReceived == 1; }));
  EXPECT_EQ(log_.destroyed, 0) << "the object returned to the caller was destroyed";
  // Another object exported meanwhile does not take the pinned id.
  Request other = peerRoot.newCall(NODE_INTERFACE_ID, ECHO, 16);
  auto stranger = std::make_unique<Node>(99, log_);
  ServerObject* strangerPtr = stranger.get();
  ASSERT_TRUE(other.addCap(std::move(stranger)).ok());
  RemotePromise p2 = other.send();
  uint32_t strangerId = 0;
  expectFromConn([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    strangerId = m.getCall().getParams().getCapTable()[0].getSenderHosted();
  });
  EXPECT_NE(strangerId, exportId);
  ServerObject* got = nullptr;
  Errc code = Errc::OK;
  int destroyedWhileHeld = -1;
  Status awaited = loop_.run([&]() -> Promise<void> {
    Result<Response> r = co_await p;
    AGATE_CO_TRY(r);
    Result<ReceivedCap> cap = r->getCap(0);
    if (!cap) {
      code = cap.code();
    } else {
      got = cap->local;
    }
    destroyedWhileHeld = log_.destroyed;
    co_return {};
  }());  // the Response goes: so does the last hold on the object
  ASSERT_TRUE(awaited.ok()) << errcName(awaited.code());
  EXPECT_EQ(destroyedWhileHeld, 0);
  EXPECT_EQ(code, Errc::OK);
  EXPECT_NE(got, strangerPtr) << "the caller got another object of its own";
  EXPECT_EQ(got, static_cast<ServerObject*>(passed));
  EXPECT_EQ(log_.destroyed, 1) << "the object outlived the Response";
  EXPECT_TRUE(conn_->isOpen()) << conn_->failure().detail;
}

// A Response naming one of our objects, held across the connection's end: getCap then says
// DISCONNECTED (the connection destroyed its exports), and dropping it afterwards is harmless.
TEST_F(RpcCapLifetimeRawTest, AReceiverHostedResultHeldAcrossTheConnectionsEndReadsDisconnected) {
  RemoteCap peerRoot = conn_->bootstrap();
  Request req = peerRoot.newCall(NODE_INTERFACE_ID, ECHO, 16);
  ASSERT_TRUE(req.addCap(std::make_unique<Node>(7, log_)).ok());
  RemotePromise p = req.send();
  uint32_t questionId = 0, exportId = 0;
  expectFromConn([&](wire::Message::Reader m) {
    ASSERT_EQ(m.which(), wire::Message::CALL);
    questionId = m.getCall().getQuestionId();
    exportId = m.getCall().getParams().getCapTable()[0].getSenderHosted();
  });
  send([&](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(questionId);
    wire::Payload::Builder results = r.initResults();
    writeCapPointer(results.getContent().initAs<CapParam>(), 0, 0);
    results.initCapTable(1)[0].setReceiverHosted(exportId);
  });
  std::optional<Response> held;
  Status awaited = loop_.run([&]() -> Promise<void> {
    Result<Response> r = co_await p;
    AGATE_CO_TRY(r);
    held.emplace(std::move(*r));
    co_return {};
  }());
  ASSERT_TRUE(awaited.ok()) << errcName(awaited.code());
  conn_->close(Error(Errc::DISCONNECTED, "closed"));
  (void)loop_.run(loop_.sleep(std::chrono::milliseconds(1)));  // teardown runs
  EXPECT_EQ(log_.destroyed, 1) << "the connection's exports go with it, pinned or not";
  Result<ReceivedCap> cap = held->getCap(0);
  EXPECT_EQ(cap.code(), Errc::DISCONNECTED);
  held.reset();
  EXPECT_EQ(log_.destroyed, 1);
}

// --- reference counts that cannot wrap ---------------------------------------------------------

// Method 0 returns the same borrowed object every time (one export, its count growing per
// Return); method 1 a new CapPromise (kept in `promises`) for the test to settle.
class Giver final : public ServerObject {
 public:
  explicit Giver(Log& log) : child_(41, log) {}
  Promise<void> dispatch(uint64_t, uint16_t methodId, CallContext& ctx) override {
    Result<CapAndValue::Builder> out = ctx.initResultsAs<CapAndValue>(16);
    if (!out) return readyPromise<void>(out.error());
    Result<uint32_t> index = Error(Errc::UNSUPPORTED);
    if (methodId == 1) {
      promises.push_back(ctx.connection().newCapPromise());
      index = ctx.addResultCap(promises.back());
    } else {
      index = ctx.addResultCap(child_);
    }
    if (!index) return readyPromise<void>(index.error());
    writeCapPointer(*out, 0, *index);
    return readyPromise<void>(Status{});
  }
  Node& child() { return child_; }
  std::vector<CapPromise> promises;

 private:
  Node child_;
};

Promise<Response> give(RemoteCap root, uint16_t method = 0) {
  Result<Response> r = co_await root.newCall(NODE_INTERFACE_ID, method, 16).send();
  AGATE_CO_TRY(r);
  co_return std::move(*r);
}

RemoteCap capOf(Response& r) {
  Result<ReceivedCap> cap = Error(Errc::FAILED, "no capability");
  EXPECT_TRUE(r.tryRead<CapAndValue>([&](CapAndValue::Reader v) { cap = r.capAt(v, 0); }).ok());
  return cap ? cap->remote : RemoteCap();
}

// A Giver served over a pair whose sides count with the given bounds
// (RpcOptions::releaseReferencesAt).
class RpcReferenceCountTest : public ::testing::Test {
 protected:
  void open(uint32_t serverBound, uint32_t clientBound) {
    RpcOptions serverOptions;
    serverOptions.bootstrap = &giver_;
    serverOptions.releaseReferencesAt = serverBound;
    RpcOptions clientOptions;
    clientOptions.releaseReferencesAt = clientBound;
    pair_.emplace(loop_, serverOptions, clientOptions);
    root_ = pair_->client().bootstrap();
  }
  static constexpr uint32_t DEFAULT_BOUND = uint32_t{1} << 31;

  Watchdog watchdog_{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log log_;
  Giver giver_{log_};
  std::optional<LocalPair> pair_;
  RemoteCap root_;  // dropped before the pair
};

// The client keeps one reference to the object and receives it again and again: its count of
// the peer's references goes back in Releases of all but one each time it reaches the bound.
TEST_F(RpcReferenceCountTest, AnImportReceivedAgainAndAgainIsReleasedAllButOneAtTheBound) {
  open(DEFAULT_BOUND, 4);
  Result<Response> first = loop_.run(give(root_));
  ASSERT_TRUE(first.ok());
  RemoteCap held = capOf(*first);
  first = Error(Errc::FAILED, "dropped");
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(loop_.run(give(root_)).ok());
  // 11 references: all but one went back at 4, 7 and 10.
  EXPECT_EQ(pair_->client().stats().releasesSent, 3u);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair_->server().stats().releasesReceived == 3; }));
  EXPECT_EQ(pair_->server().exportCount(), 2u) << "the object is still exported";
  Request echo = held.newCall(NODE_INTERFACE_ID, ECHO, 16);
  echo.initParams<Value>().setValue(1);
  Result<uint64_t> v = loop_.run([&]() -> Promise<uint64_t> {
    Result<Response> r = co_await echo.send();
    AGATE_CO_TRY(r);
    co_return r->results().getAs<Value>().getValue();
  }());
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 42u);
  held = RemoteCap();  // the last two go back with the last reference
  ASSERT_TRUE(runUntil(loop_, [&] { return pair_->server().exportCount() == 1; }));
  EXPECT_EQ(pair_->client().stats().releasesSent, 4u);
  EXPECT_EQ(log_.destroyed, 0) << "borrowed: the connection never owned it";
}

// A client that never releases: past 2 * releaseReferencesAt - 1 references the server refuses
// to send the object again (the call fails, the connection carries on), until it releases.
TEST_F(RpcReferenceCountTest, AnObjectThePeerHoldsTooManyReferencesToIsNotSentAgain) {
  open(2, DEFAULT_BOUND);  // the server sends at most 3 references to one object
  std::vector<Response> kept;
  for (int i = 0; i < 3; ++i) {
    Result<Response> r = loop_.run(give(root_));
    ASSERT_TRUE(r.ok()) << i;
    kept.push_back(std::move(*r));
  }
  Result<Response> refused = loop_.run(give(root_));
  ASSERT_EQ(refused.code(), Errc::OUT_OF_MEMORY);
  EXPECT_NE(std::string(refused.error().detail).find("must release some first"), std::string::npos)
      << refused.error().detail;
  EXPECT_TRUE(pair_->client().isOpen());
  EXPECT_TRUE(pair_->server().isOpen());
  EXPECT_EQ(pair_->server().exportCount(), 2u);
  kept.clear();  // three references go back
  ASSERT_TRUE(runUntil(loop_, [&] { return pair_->server().exportCount() == 1; }));
  EXPECT_TRUE(loop_.run(give(root_)).ok()) << "sent again once released";
}

// A promise that resolves to an object the peer holds as many references to as are counted: the
// Resolve carries the reason instead, so the peer's promise does not wait for ever.
TEST_F(RpcReferenceCountTest, APromiseResolvedToAnObjectHeldTooOftenBreaksWithTheReason) {
  open(2, DEFAULT_BOUND);  // the server sends at most 3 references to one object
  std::vector<Response> kept;
  for (int i = 0; i < 3; ++i) kept.push_back(std::move(loop_.run(give(root_)).value()));
  Result<Response> promised = loop_.run(give(root_, 1));
  ASSERT_TRUE(promised.ok());
  RemoteCap promise = capOf(*promised);
  giver_.promises.at(0).resolve(giver_.child());
  ASSERT_TRUE(runUntil(loop_, [&] { return pair_->client().stats().resolvesReceived == 1; }));
  Result<Response> call = loop_.run(give(promise));
  ASSERT_EQ(call.code(), Errc::OUT_OF_MEMORY);
  EXPECT_NE(std::string(call.error().detail).find("must release some first"), std::string::npos)
      << call.error().detail;
  EXPECT_TRUE(pair_->server().isOpen());
  promise = RemoteCap();
  promised = Error(Errc::FAILED, "dropped");
  kept.clear();
  ASSERT_TRUE(runUntil(loop_, [&] { return pair_->server().exportCount() == 1; }));
}

// postWhenUnreferenced: the owner's task is posted when a closed connection has no handle left
// (at the close itself, or when the last handle drops after it), and never while it is open.
TEST(RpcCapLifetimeTest, TheUnreferencedTaskIsPostedOnceAClosedConnectionHasNoHandleLeft) {
  Watchdog watchdog{"rpc_cap_lifetime_test", std::chrono::seconds(60)};
  EventLoop loop;
  Log log;
  Node root(0, log);
  int posted = 0;
  FunctionTask task([&] { ++posted; });
  {
    LocalPair pair(loop, &root);
    pair.client().postWhenUnreferenced(&task);
    RemoteCap cap = pair.client().bootstrap();
    ConnectionRef ref(pair.client());
    EXPECT_EQ(pair.client().handleCount(), 2u) << "a ConnectionRef counts as a handle";
    ConnectionRef copy = ref;
    EXPECT_EQ(pair.client().handleCount(), 3u);
    copy.reset();
    cap = RemoteCap();
    loop.runUntilIdle();
    EXPECT_EQ(posted, 0) << "open: nothing posted";
    ref.reset();  // the last handle, on an open connection
    loop.runUntilIdle();
    EXPECT_EQ(posted, 0) << "open: nothing posted";
    cap = pair.client().bootstrap();
    pair.client().close(Error(Errc::DISCONNECTED, "closed"));
    loop.runUntilIdle();
    EXPECT_EQ(posted, 0) << "closed, but a handle is left";
    cap = RemoteCap();
    loop.runUntilIdle();
    EXPECT_EQ(posted, 1) << "the last handle dropped after the close";
    pair.client().postWhenUnreferenced(nullptr);
  }
  {
    LocalPair pair(loop, &root);
    pair.client().postWhenUnreferenced(&task);
    pair.client().close(Error(Errc::DISCONNECTED, "closed"));
    loop.runUntilIdle();
    EXPECT_EQ(posted, 2) << "closed with no handle";
    pair.client().postWhenUnreferenced(nullptr);
  }
}

}  // namespace
}  // namespace agate::rpc::test
