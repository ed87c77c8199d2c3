// The per-message path of RpcConnection: a burst of calls already in the ring is served in one
// pass of the reader with its frames handed back together and its Returns announced by one
// doorbell ring; a Finish that follows its Return goes
// out behind the caller's next message (so the callee serves that message first); queued
// Finishes are bounded, all sent, and dropped with a connection that ends. The frames written as
// words (Finish, Release, Call without params, empty Return, with and without the bits that end
// a call at its Return) are compared word for word with Cap'n Proto's builder.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "agate/runtime/ring.h"
#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

constexpr uint64_t ANY_INTERFACE = 1;

// Serves every call with empty results, recording for each what `probe` returned when it ran.
class Recorder final : public ServerObject {
 public:
  std::function<uint64_t(CallContext&)> probe;
  std::vector<uint64_t> seen;

  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    seen.push_back(probe(ctx));
    return readyPromise<void>(Status{});
  }
};

Promise<void> nullCall(RemoteCap cap) {
  Result<Response> r = co_await cap.newCall(ANY_INTERFACE, 0, 0).send();
  AGATE_CO_TRY(r);
  co_return {};
}

Promise<void> awaitAll(std::vector<RemotePromise>& pending) {
  for (RemotePromise& p : pending) AGATE_CO_TRY(co_await p);
  co_return {};
}

class RpcHotPathTest : public ::testing::Test {
 protected:
  Watchdog watchdog_{"rpc_hot_path_test", std::chrono::seconds(60)};
  EventLoop loop_;
};

TEST_F(RpcHotPathTest, ABurstOfCallsIsServedInOnePassAndItsFramesHandedBackTogether) {
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  co.capacityBytes = 64 * 1024;
  std::unique_ptr<Channel> c2s = std::move(Channel::create(co).value());
  std::unique_ptr<Channel> s2c = std::move(Channel::create(co).value());
  MessageSender clientTx(c2s->attachSender().value());
  MessageReceiver serverRx(*c2s, c2s->attachReceiver().value(), rpcReceiverOptions());
  MessageSender serverTx(s2c->attachSender().value());
  MessageReceiver clientRx(*s2c, s2c->attachReceiver().value(), rpcReceiverOptions());
  auto* requests = reinterpret_cast<RingControl*>(c2s->memory().data());
  Recorder server;
  server.probe = [&](CallContext&) {
    return std::atomic_ref<uint64_t>(requests->head).load(std::memory_order_acquire);
  };
  {
    RpcConnection serverConn(serverTx, serverRx, loop_, {.bootstrap = &server});
    RpcConnection client(clientTx, clientRx, loop_);
    RemoteCap cap = client.bootstrap();
    std::vector<RemotePromise> pending;
    const uint64_t ringsBefore = client.stats().doorbellRings;
    uint64_t burstEnd = 0;
    // The burst is sent from a task of the loop (as any coroutine sends): each call is
    // published at once (a polling reader could take it now), and rung once, before the loop
    // waits or run() returns.
    ASSERT_TRUE(loop_
                    .run([&]() -> Promise<void> {
                      co_await loop_.yield();  // coroutines start eagerly: enter the loop
                      for (int i = 0; i < 8; ++i)
                        pending.push_back(cap.newCall(ANY_INTERFACE, 0, 0).send());
                      burstEnd = std::atomic_ref<uint64_t>(requests->tail).load();
                      EXPECT_GT(burstEnd, 0u);
                      EXPECT_TRUE(clientTx.sender().ringIsPending());
                      EXPECT_EQ(client.stats().doorbellRings, ringsBefore);
                      co_return {};
                    }())
                    .ok());
    EXPECT_FALSE(clientTx.sender().ringIsPending()) << "rung before run() returned";
    EXPECT_EQ(client.stats().doorbellRings, ringsBefore + 1);
    ASSERT_TRUE(runUntil(loop_, [&] { return server.seen.size() == 8; }));
    // Every call was dispatched while the ring's head still stood before the burst: the reader
    // took them one after another, handing the frames back only once it found the ring empty.
    EXPECT_EQ(server.seen, std::vector<uint64_t>(8, 0));
    EXPECT_EQ(std::atomic_ref<uint64_t>(requests->head).load(), burstEnd);
    EXPECT_EQ(client.stats().doorbellRings, ringsBefore + 1) << "one ring for the eight calls";
    EXPECT_TRUE(loop_.run(awaitAll(pending)).ok());
    pending.clear();
    EXPECT_EQ(serverConn.stats().doorbellRings, 1u)
        << "the eight Returns of one reader pass, one ring";
  }
}

// A message sent while the loop is not running (no turn will follow to ring for it) is rung at
// once: the peer may be parked, and this thread may go on to wait for anything.
TEST_F(RpcHotPathTest, ACallSentOutsideTheLoopIsRungAtOnce) {
  Recorder server;
  server.probe = [](CallContext&) { return uint64_t{0}; };
  LocalPair pair(loop_, &server);
  RemoteCap cap = pair.client().bootstrap();
  const uint64_t before = pair.client().stats().doorbellRings;
  RemotePromise p = cap.newCall(ANY_INTERFACE, 0, 0).send();
  EXPECT_EQ(pair.client().stats().doorbellRings, before + 1);
  RemotePromise q = cap.newCall(ANY_INTERFACE, 0, 0).send();
  EXPECT_EQ(pair.client().stats().doorbellRings, before + 2);
  std::vector<RemotePromise> pending;
  pending.push_back(std::move(p));
  pending.push_back(std::move(q));
  EXPECT_TRUE(loop_.run(awaitAll(pending)).ok());
}

TEST_F(RpcHotPathTest, AFinishAfterItsReturnGoesOutBehindTheCallersNextCall) {
  Recorder server;
  server.probe = [](CallContext& ctx) { return ctx.connection().stats().finishesReceived; };
  LocalPair pair(loop_, &server);
  RemoteCap cap = pair.client().bootstrap();
  uint64_t finishesSentBetween = ~uint64_t{0};
  auto twoCalls = [&]() -> Promise<void> {
    AGATE_CO_TRY(co_await nullCall(cap));  // its promise is gone: the Finish is queued
    finishesSentBetween = pair.client().stats().finishesSent;
    AGATE_CO_TRY(co_await nullCall(cap));
    co_return {};
  };
  ASSERT_TRUE(loop_.run(twoCalls()).ok());
  EXPECT_EQ(finishesSentBetween, 0u);
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().answerCount() == 0 && pair.client().questionCount() == 0;
  }));
  EXPECT_EQ(server.seen, (std::vector<uint64_t>{0, 0}))
      << "the second call reached the server ahead of the first call's Finish";
  EXPECT_EQ(pair.client().stats().finishesSent, 2u);
  EXPECT_EQ(pair.server().stats().finishesReceived, 2u);
}

TEST_F(RpcHotPathTest, MoreFinishesThanTheQueueHoldsAllGoOutAndFreeTheirIds) {
  Recorder server;
  server.probe = [](CallContext&) { return 0; };
  LocalPair pair(loop_, &server, nullptr, {}, 256 * 1024);
  RemoteCap cap = pair.client().bootstrap();
  std::vector<RemotePromise> pending;
  for (int i = 0; i < 150; ++i) pending.push_back(cap.newCall(ANY_INTERFACE, 0, 0).send());
  ASSERT_TRUE(loop_.run(awaitAll(pending)).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return server.seen.size() == 150; }));
  pending.clear();  // 150 returned questions finished in one step: the queue overflows twice
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().answerCount() == 0 && pair.client().questionCount() == 0;
  }));
  EXPECT_EQ(pair.client().stats().finishesSent, 150u);
  EXPECT_EQ(pair.server().stats().finishesReceived, 150u);
  EXPECT_TRUE(pair.server().isOpen());
  EXPECT_TRUE(loop_.run(nullCall(cap)).ok()) << "ids freed by the Finishes are usable again";
}

// A Response holds its inbound frame until the reader reads on, then is copied out if still held;
// empty results keep nothing of the frame, so holding one costs no copy.
TEST_F(RpcHotPathTest, AHeldResponseIsCopiedOutOnceUnlessItsResultsAreEmpty) {
  Log log;
  Node root(0, log);
  LocalPair pair(loop_, &root);
  RemoteCap cap = pair.client().bootstrap();
  auto holdThenCall = [&](uint16_t method) -> Promise<uint32_t> {
    Request req = cap.newCall(NODE_INTERFACE_ID, method, 16);
    req.initParams<Value>().setValue(3);
    Result<Response> held = co_await req.send();
    AGATE_CO_TRY(held);
    for (int i = 0; i < 3; ++i) {  // the reader reads on while `held` lives
      Request next = cap.newCall(NODE_INTERFACE_ID, RECORD, 16);
      next.initParams<Value>().setValue(1);
      AGATE_CO_TRY(co_await next.send());
    }
    uint64_t v = 0;
    AGATE_CO_TRY(held->tryRead<Value>([&](Value::Reader r) { v = r.getValue(); }));
    co_return static_cast<uint32_t>(v + held->capCount());
  };
  EXPECT_EQ(loop_.run(holdThenCall(RECORD)).value(), 0u) << "empty: reads as empty";
  EXPECT_EQ(pair.client().stats().responsesCopied, 0u);
  EXPECT_EQ(loop_.run(holdThenCall(ECHO)).value(), 3u) << "copied out, still readable";
  EXPECT_EQ(pair.client().stats().responsesCopied, 1u);
}

// The words of a message built by Cap'n Proto's own builder.
std::vector<uint64_t> builtWords(const std::function<void(wire::Message::Builder)>& fill) {
  auto frame = std::make_unique<capnp::word[]>(64);  // value-initialised: zero
  FrameBuilder b(std::span(frame.get(), 64));
  fill(b.initRoot<wire::Message>());
  const size_t used = b.tryFinish().value();
  std::vector<uint64_t> out(used / WORD_BYTES);
  std::memcpy(out.data(), frame.get(), used);
  return out;
}

TEST_F(RpcHotPathTest, FinishAndReleaseAreWrittenWordForWordAsCapnProtosBuilderWritesThem) {
  // The client's peer is the test: it reads the Call, returns a capability (senderHosted 5),
  // then reads the Release and the Finish the client writes directly into the ring; then a
  // Finish with releaseResultCaps, for a promise dropped before its Return.
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  co.capacityBytes = 64 * 1024;
  std::unique_ptr<Channel> c2s = std::move(Channel::create(co).value());
  std::unique_ptr<Channel> s2c = std::move(Channel::create(co).value());
  MessageSender clientTx(c2s->attachSender().value());
  MessageReceiver clientRx(*s2c, s2c->attachReceiver().value(), rpcReceiverOptions());
  Receiver peerRx = c2s->attachReceiver().value();
  Sender peerTx = s2c->attachSender().value();
  auto nextFrame = [&]() -> std::vector<uint64_t> {
    Result<Frame> f = peerRx.tryReceive();
    if (!f) return {};
    std::vector<uint64_t> out(f->payload.size() / WORD_BYTES);
    std::memcpy(out.data(), f->payload.data(), f->payload.size());
    peerRx.release();
    return out;
  };
  RpcConnection client(clientTx, clientRx, loop_);
  {
    RemoteCap cap = client.bootstrap();
    std::vector<RemotePromise> call;
    call.push_back(cap.newCall(ANY_INTERFACE, 0, 0).send());
    ASSERT_FALSE(nextFrame().empty());  // the Call, question 1
    const std::vector<uint64_t> ret = builtWords([](wire::Message::Builder m) {
      wire::Return::Builder r = m.initReturn();
      r.setAnswerId(1);
      r.initResults().initCapTable(1)[0].setSenderHosted(5);
    });
    ASSERT_TRUE(peerTx.trySend(std::as_bytes(std::span(ret))).ok());
    ASSERT_TRUE(loop_.run(awaitAll(call)).ok());  // its Response (import 5) is dropped: Release
  }                                               // the promise goes: the Finish is queued
  ASSERT_TRUE(runUntil(loop_, [&] { return client.stats().finishesSent == 1; }));
  EXPECT_EQ(nextFrame(), builtWords([](wire::Message::Builder m) {
              wire::Release::Builder r = m.initRelease();
              r.setId(5);
              r.setReferenceCount(1);
            }));
  EXPECT_EQ(nextFrame(),
            builtWords([](wire::Message::Builder m) { m.initFinish().setQuestionId(1); }));
  EXPECT_EQ(client.stats().releasesSent, 1u);
  // A promise dropped before its Return: its Finish goes at once, with releaseResultCaps, and
  // the Return's capability that follows is not taken (no Release for it).
  {
    RemoteCap cap = client.bootstrap();
    RemotePromise dropped = cap.newCall(ANY_INTERFACE, 0, 0).send();
    ASSERT_FALSE(nextFrame().empty());  // the Call, question 1 again (freed by its Finish)
  }
  EXPECT_EQ(nextFrame(), builtWords([](wire::Message::Builder m) {
              wire::Finish::Builder f = m.initFinish();
              f.setQuestionId(1);
              f.setReleaseResultCaps(true);
            }));
  EXPECT_EQ(client.stats().finishesReleasingResults, 1u);
  const std::vector<uint64_t> late = builtWords([](wire::Message::Builder m) {
    wire::Return::Builder r = m.initReturn();
    r.setAnswerId(1);
    r.initResults().initCapTable(1)[0].setSenderHosted(5);
  });
  ASSERT_TRUE(peerTx.trySend(std::as_bytes(std::span(late))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return client.stats().returnsReceived == 2; }));
  (void)loop_.run(loop_.sleep(1ms));  // any Release it caused would be out by now
  EXPECT_TRUE(nextFrame().empty()) << "the released Return's capability was released again";
  EXPECT_EQ(client.stats().releasesSent, 1u);
  EXPECT_EQ(client.stats().finishesSent, 2u);
  EXPECT_TRUE(client.isOpen());
}

TEST_F(RpcHotPathTest, CallsWithoutParamsAreWrittenWordForWordAsCapnProtosBuilderWritesThem) {
  // The client's peer is the test: it reads the Calls the client writes without a builder (on
  // the bootstrap, and pipelined with paths of 0, 1 and 5 steps) and compares each with the
  // same Call built by Cap'n Proto; a call with params goes through the builder.
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  co.capacityBytes = 64 * 1024;
  std::unique_ptr<Channel> c2s = std::move(Channel::create(co).value());
  std::unique_ptr<Channel> s2c = std::move(Channel::create(co).value());
  MessageSender clientTx(c2s->attachSender().value());
  MessageReceiver clientRx(*s2c, s2c->attachReceiver().value(), rpcReceiverOptions());
  Receiver peerRx = c2s->attachReceiver().value();
  RpcConnection client(clientTx, clientRx, loop_);
  auto nextFrame = [&]() -> std::vector<uint64_t> {
    Result<Frame> f = peerRx.tryReceive();
    if (!f) return {};
    std::vector<uint64_t> out(f->payload.size() / WORD_BYTES);
    std::memcpy(out.data(), f->payload.data(), f->payload.size());
    peerRx.release();
    return out;
  };
  auto expected = [](uint32_t q, uint16_t method, std::optional<uint32_t> onAnswer,
                     std::vector<uint16_t> path, bool noPipelining = false) {
    return builtWords([&](wire::Message::Builder m) {
      wire::Call::Builder c = m.initCall();
      c.setInterfaceId(0x1234'5678'9abc'def0ull);
      c.setMethodId(method);
      if (noPipelining) c.setNoPromisePipelining(true);
      wire::MessageTarget::Builder t = c.initTarget();
      if (!onAnswer) {
        t.setImportedCap(0);
      } else {
        wire::PromisedAnswer::Builder pa = t.initPromisedAnswer();
        pa.setQuestionId(*onAnswer);
        auto transform = pa.initTransform(static_cast<uint32_t>(path.size()));
        for (size_t i = 0; i < path.size(); ++i) transform.set(static_cast<uint32_t>(i), path[i]);
      }
      c.setQuestionId(q);
    });
  };
  constexpr uint64_t IFACE = 0x1234'5678'9abc'def0ull;
  RemoteCap cap = client.bootstrap();
  RemotePromise first = cap.newCall(IFACE, 3, 0).send();
  EXPECT_EQ(nextFrame(), expected(1, 3, std::nullopt, {}));
  RemotePromise onEmpty = first.pipeline({}).newCall(IFACE, 4, 0).send();
  EXPECT_EQ(nextFrame(), expected(2, 4, 1u, {}));
  RemotePromise onOne = first.pipeline({2}).newCall(IFACE, 5, 0).send();
  EXPECT_EQ(nextFrame(), expected(3, 5, 1u, {2}));
  RemotePromise onFive = first.pipeline({1, 0, 7, 65535, 3}).newCall(IFACE, 65535, 0).send();
  EXPECT_EQ(nextFrame(), expected(4, 65535, 1u, {1, 0, 7, 65535, 3}));
  // Sent without promise pipelining: the same words with Call.noPromisePipelining set.
  RemotePromise bare = cap.newCall(IFACE, 7, 0).noPipelining().send();
  EXPECT_EQ(nextFrame(), expected(5, 7, std::nullopt, {}, true));
  RemotePromise onOneBare = first.pipeline({2, 9}).newCall(IFACE, 8, 0).noPipelining().send();
  EXPECT_EQ(nextFrame(), expected(6, 8, 1u, {2, 9}, true));
  Request withParams = cap.newCall(IFACE, 6, 0);
  withParams.params().initAsAnyStruct(1, 0);
  RemotePromise built = withParams.send();
  const std::vector<uint64_t> builtFrame = nextFrame();
  EXPECT_GT(builtFrame.size(), expected(7, 6, std::nullopt, {}).size());
  EXPECT_EQ(client.stats().callsSent, 7u);
  EXPECT_TRUE(client.isOpen());
}

TEST_F(RpcHotPathTest, ACallIsBuiltOnlyWhenItsParamsOrCapabilitiesNeedIt) {
  Recorder server;
  server.probe = [](CallContext& ctx) { return ctx.capCount(); };
  LocalPair pair(loop_, &server);
  RemoteCap cap = pair.client().bootstrap();
  {
    // Dropped unsent before anything was built: nothing was reserved, nothing goes out.
    Request dropped = cap.newCall(ANY_INTERFACE, 0, 0);
  }
  EXPECT_EQ(pair.client().stats().messagesSent, 0u);
  // A capability and no params: the Call is built at send() (its cap table needs the builder).
  Request withCap = cap.newCall(ANY_INTERFACE, 0, 0);
  Recorder other;
  ASSERT_TRUE(withCap.addCap(other).ok());
  std::vector<RemotePromise> pending;
  pending.push_back(withCap.send());
  ASSERT_TRUE(loop_.run(awaitAll(pending)).ok());
  pending.clear();
  EXPECT_EQ(server.seen, std::vector<uint64_t>{1});
  EXPECT_EQ(pair.client().stats().spilledMessages, 0u) << "built in its ring frame";
}

TEST_F(RpcHotPathTest, AnEmptyReturnIsWrittenWordForWordAsCapnProtosBuilderWritesIt) {
  // The server's peer is the test: it sends a Call to a server that builds no results, and
  // reads the Return the server writes directly into the ring.
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  co.capacityBytes = 64 * 1024;
  std::unique_ptr<Channel> c2s = std::move(Channel::create(co).value());
  std::unique_ptr<Channel> s2c = std::move(Channel::create(co).value());
  MessageReceiver serverRx(*c2s, c2s->attachReceiver().value(), rpcReceiverOptions());
  MessageSender serverTx(s2c->attachSender().value());
  Sender peerTx = c2s->attachSender().value();
  Receiver peerRx = s2c->attachReceiver().value();
  Recorder server;
  server.probe = [](CallContext&) { return 0; };
  RpcConnection conn(serverTx, serverRx, loop_, {.bootstrap = &server});
  const std::vector<uint64_t> call = builtWords([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(7);
    c.initTarget().setImportedCap(0);
    c.setInterfaceId(ANY_INTERFACE);
    c.initParams();
  });
  ASSERT_TRUE(peerTx.trySend(std::as_bytes(std::span(call))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return conn.stats().returnsSent == 1; }));
  Result<Frame> f = peerRx.tryReceive();
  ASSERT_TRUE(f.ok());
  std::vector<uint64_t> ret(f->payload.size() / WORD_BYTES);
  std::memcpy(ret.data(), f->payload.data(), f->payload.size());
  peerRx.release();
  EXPECT_EQ(ret, builtWords([](wire::Message::Builder m) {
              wire::Return::Builder r = m.initReturn();
              r.setAnswerId(7);
              r.initResults();
            }));
  EXPECT_EQ(conn.answerCount(), 1u) << "waits for its Finish";
  // A Call sent without promise pipelining: the Return says no Finish is needed, and the
  // answer is gone as it is written.
  const std::vector<uint64_t> bareCall = builtWords([](wire::Message::Builder m) {
    wire::Call::Builder c = m.initCall();
    c.setQuestionId(8);
    c.initTarget().setImportedCap(0);
    c.setInterfaceId(ANY_INTERFACE);
    c.setNoPromisePipelining(true);
  });
  ASSERT_TRUE(peerTx.trySend(std::as_bytes(std::span(bareCall))).ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return conn.stats().returnsSent == 2; }));
  EXPECT_EQ(conn.answerCount(), 1u) << "only answer 7";
  f = peerRx.tryReceive();
  ASSERT_TRUE(f.ok());
  ret.assign(f->payload.size() / WORD_BYTES, 0);
  std::memcpy(ret.data(), f->payload.data(), f->payload.size());
  peerRx.release();
  EXPECT_EQ(ret, builtWords([](wire::Message::Builder m) {
              wire::Return::Builder r = m.initReturn();
              r.setAnswerId(8);
              r.setNoFinishNeeded(true);
              r.initResults();
            }));
  EXPECT_EQ(server.seen.size(), 2u);
  EXPECT_TRUE(conn.isOpen());
}

TEST_F(RpcHotPathTest, FinishesQueuedWhenTheConnectionEndsAreDroppedAndTheirIdsFreed) {
  Recorder server;
  server.probe = [](CallContext&) { return 0; };
  LocalPair pair(loop_, &server);
  RemoteCap cap = pair.client().bootstrap();
  // run() returns as soon as the call is done: the Finish task is still queued.
  ASSERT_TRUE(loop_.run(nullCall(cap)).ok());
  EXPECT_EQ(pair.client().questionCount(), 1u) << "the question lives until its Finish is out";
  pair.client().close(Error(Errc::DISCONNECTED, "closed by the test"));
  EXPECT_EQ(pair.client().questionCount(), 0u);
  loop_.runUntilIdle();
  EXPECT_EQ(pair.client().stats().finishesSent, 0u);
}

}  // namespace
}  // namespace agate::rpc::test
