// Messages with many capabilities: cap tables past the entries a Request or a call keeps inline
// and past the room a call's frame reserves for them (the message moves to a larger buffer), in
// params and in results, of every kind (objects of the sender, objects of the receiver passed
// back, promises), released to the last reference; and the connection's bound on a message's
// cap table (RpcOptions::maxCapsPerMessage): this side's own additions past it are refused, and a
// message from a peer with a larger bound is refused as a message (its call fails), not as a
// connection.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

using agate::testing::Watchdog;

constexpr uint32_t MANY = 40;
constexpr uint16_t REFLECT = 0;  // Mirror's one method

// REFLECT: params {pointer 0: a list of capabilities}. Results {pointer 0: the same capabilities
// passed back, in order; pointer 1: MANY new ones, even elements objects of the mirror's side
// (Node 100 + i), odd ones promises settled later by settle() (Node 200 + i)}.
class Mirror final : public ServerObject {
 public:
  explicit Mirror(Log& log) : log_(log) {}
  Promise<void> dispatch(uint64_t, uint16_t method, CallContext& ctx) override {
    if (method != REFLECT) return readyPromise<void>(Error(Errc::UNSUPPORTED, "no such method"));
    ++calls;
    paramCaps = ctx.capCount();
    std::vector<ReceivedCap> got;
    Status read = {};
    try {
      capnp::AnyList::Reader list =
          ctx.params().getAs<capnp::AnyStruct>().getPointerSection()[0].getAs<capnp::AnyList>();
      for (uint32_t i = 0; i < list.size() && read; ++i) {
        Result<ReceivedCap> cap = ctx.capAt(list, i);
        if (cap) {
          got.push_back(*cap);
        } else {
          read = cap.error();
        }
      }
    } catch (const kj::Exception&) {
      read = Error(Errc::PROTOCOL_ERROR, "params do not decode");
    }
    if (!read) return readyPromise<void>(read.error());
    return readyPromise<void>(reflect(ctx, got));
  }

  void settle() {
    for (uint32_t i = 0; i < promises.size(); ++i)
      promises[i].resolve(std::make_unique<Node>(200 + 2 * i + 1, log_));
    promises.clear();
  }

  int calls = 0;
  uint32_t paramCaps = 0;
  uint32_t freshCount = MANY;  // new capabilities in each result
  std::vector<CapPromise> promises;

 private:
  Status reflect(CallContext& ctx, const std::vector<ReceivedCap>& got) {
    // Room for the content only: the cap table gets its own when it is written.
    Result<capnp::AnyPointer::Builder> out = ctx.initResults(8 * (got.size() + freshCount) + 64);
    AGATE_TRY(out);
    capnp::AnyStruct::Builder results = out->initAsAnyStruct(0, 2);
    capnp::AnyList::Builder back = results.getPointerSection()[0].initAsAnyList(
        capnp::ElementSize::POINTER, static_cast<uint32_t>(got.size()));
    for (uint32_t i = 0; i < got.size(); ++i) {
      Result<uint32_t> index = got[i].local != nullptr ? ctx.addResultCap(*got[i].local)
                                                       : ctx.addResultCap(got[i].remote);
      AGATE_TRY(index);
      writeCapPointer(back, i, *index);
    }
    capnp::AnyList::Builder fresh =
        results.getPointerSection()[1].initAsAnyList(capnp::ElementSize::POINTER, freshCount);
    for (uint32_t i = 0; i < freshCount; ++i) {
      Result<uint32_t> index = Error(Errc::FAILED, "unset");
      if (i % 2 == 0) {
        index = ctx.addResultCap(std::make_unique<Node>(100 + i, log_));
      } else {
        promises.push_back(ctx.connection().newCapPromise());
        index = ctx.addResultCap(promises.back());
      }
      AGATE_TRY(index);
      writeCapPointer(fresh, i, *index);
    }
    return {};
  }

  Log& log_;
};

// REFLECT on `target` with `caps` (objects of ours, or references) in a list.
template <class Cap>
Promise<Response> reflect(RemoteCap target, const std::vector<Cap>& caps) {
  // Room for the content only: the cap table gets its own when the call is sent.
  Request req = target.newCall(NODE_INTERFACE_ID, REFLECT, 8 * caps.size() + 64);
  AGATE_CO_TRY(writeCapList(req, req.params().initAsAnyStruct(0, 1), 0, caps));
  Result<Response> r = co_await req.send();
  AGATE_CO_TRY(r);
  co_return std::move(*r);
}

Promise<Response> responseOf(RemotePromise p) {
  Result<Response> got = co_await p;
  AGATE_CO_TRY(got);
  co_return std::move(*got);
}

Promise<uint64_t> echo(RemoteCap target) {
  Request req = target.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(0);
  Result<Response> r = co_await req.send();
  AGATE_CO_TRY(r);
  co_return r->results().getAs<Value>().getValue();
}

// Counts the capabilities of the last call it served.
class Counter final : public ServerObject {
 public:
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    seen = ctx.capCount();
    return readyPromise<void>(Status{});
  }
  uint32_t seen = 0;
};

class RpcManyCapsTest : public ::testing::Test {
 protected:
  Watchdog watchdog_{"rpc_many_caps_test", std::chrono::seconds(60)};
  EventLoop loop_;
  Log clientLog_, serverLog_;
  Mirror mirror_{serverLog_};
};

TEST_F(RpcManyCapsTest, FortyCapabilitiesEachWayOfEveryKindRoundTripAndAreReleased) {
  LocalPair pair(loop_, &mirror_);
  std::vector<std::unique_ptr<Node>> mine;
  for (uint32_t i = 0; i < MANY; ++i) mine.push_back(std::make_unique<Node>(i, clientLog_));
  std::vector<RemoteCap> theirs;
  {
    Result<Response> r = loop_.run(reflect(pair.client().bootstrap(), mine));
    ASSERT_TRUE(r.ok()) << errcName(r.code()) << " " << (r.error().detail ? r.error().detail : "");
    EXPECT_EQ(mirror_.paramCaps, MANY) << "the server saw the whole table (senderHosted)";
    ASSERT_EQ(r->capCount(), 2 * MANY);
    capnp::AnyStruct::Reader results = r->results().getAs<capnp::AnyStruct>();
    capnp::AnyList::Reader back = results.getPointerSection()[0].getAs<capnp::AnyList>();
    capnp::AnyList::Reader fresh = results.getPointerSection()[1].getAs<capnp::AnyList>();
    ASSERT_EQ(back.size(), MANY);
    for (uint32_t i = 0; i < MANY; ++i) {
      Result<ReceivedCap> cap = r->capAt(back, i);
      ASSERT_TRUE(cap.ok()) << i;
      EXPECT_EQ(cap->local, mine[i].get()) << "element " << i << " came back as our own object";
    }
    for (uint32_t i = 0; i < MANY; ++i) {
      Result<ReceivedCap> cap = r->capAt(fresh, i);
      ASSERT_TRUE(cap.ok()) << i;
      ASSERT_FALSE(cap->remote.isNull()) << i;
      theirs.push_back(cap->remote);
    }
  }
  // Calls on the promises wait until they are settled; all are answered by the right object.
  std::vector<Promise<uint64_t>> replies;
  for (RemoteCap& cap : theirs) replies.push_back(echo(cap));
  mirror_.settle();
  for (uint32_t i = 0; i < MANY; ++i) {
    Result<uint64_t> v = loop_.run(std::move(replies[i]));
    ASSERT_TRUE(v.ok()) << i << " " << errcName(v.code());
    EXPECT_EQ(*v, (i % 2 == 0 ? 100u : 200u) + i);
  }
  replies.clear();

  // The server's forty passed back to it in params (receiverHosted): it sees its own objects and
  // returns them again.
  {
    Result<Response> r = loop_.run(reflect(pair.client().bootstrap(), theirs));
    ASSERT_TRUE(r.ok()) << errcName(r.code());
    EXPECT_EQ(mirror_.paramCaps, MANY);
    capnp::AnyList::Reader back =
        r->results().getAs<capnp::AnyStruct>().getPointerSection()[0].getAs<capnp::AnyList>();
    for (uint32_t i = 0; i < MANY; ++i) {
      Result<ReceivedCap> cap = r->capAt(back, i);
      ASSERT_TRUE(cap.ok()) << i;
      EXPECT_TRUE(cap->remote.sameAs(theirs[i])) << "element " << i << " is the same import";
    }
  }
  mirror_.settle();
  theirs.clear();
  ASSERT_TRUE(
      runUntil(loop_,
               [&] {
                 return pair.client().importCount() == 0 && pair.server().exportCount() == 1 &&
                        pair.server().importCount() == 0 && pair.client().exportCount() == 1 &&
                        pair.server().answerCount() == 0 && pair.client().questionCount() == 0;
               }))
      << "client imports " << pair.client().importCount() << ", server exports "
      << pair.server().exportCount() << ", server imports " << pair.server().importCount()
      << ", client exports " << pair.client().exportCount();
  EXPECT_EQ(serverLog_.created, static_cast<int>(2 * MANY)) << "two calls of twenty and twenty";
  EXPECT_EQ(serverLog_.destroyed, serverLog_.created) << "every object the server made is gone";
  EXPECT_EQ(clientLog_.destroyed, 0) << "the client's own objects stay the client's";
}

TEST_F(RpcManyCapsTest, ACapTableLargerThanTheFramesRoomMovesItsMessageToALargerBuffer) {
  // 200 entries take 3.2 KB, more than a call's frame reserves for a cap table: the Call and the
  // Return move to spill buffers of the size they need when the table is written.
  constexpr uint32_t N = 200;
  mirror_.freshCount = 0;
  LocalPair pair(loop_, &mirror_);
  std::vector<std::unique_ptr<Node>> mine;
  for (uint32_t i = 0; i < N; ++i) mine.push_back(std::make_unique<Node>(i, clientLog_));
  for (int round = 0; round < 3; ++round) {
    const uint64_t spilled = pair.client().stats().spilledMessages;
    Result<Response> r = loop_.run(reflect(pair.client().bootstrap(), mine));
    ASSERT_TRUE(r.ok()) << errcName(r.code()) << " " << (r.error().detail ? r.error().detail : "");
    EXPECT_GT(pair.client().stats().spilledMessages, spilled) << "the Call moved";
    EXPECT_EQ(mirror_.paramCaps, N);
    ASSERT_EQ(r->capCount(), N);
    capnp::AnyList::Reader back =
        r->results().getAs<capnp::AnyStruct>().getPointerSection()[0].getAs<capnp::AnyList>();
    for (uint32_t i = 0; i < N; ++i) {
      Result<ReceivedCap> cap = r->capAt(back, i);
      ASSERT_TRUE(cap.ok()) << i;
      EXPECT_EQ(cap->local, mine[i].get()) << i;
    }
  }
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().importCount() == 0 && pair.client().exportCount() == 1 &&
           pair.server().answerCount() == 0;
  }));
}

TEST_F(RpcManyCapsTest, AMessageBuiltAwayFromTheRingIsNeverLargerThanTheRingsLargestFrame) {
  // While a call is open in the ring, the next is built in a spill buffer: its room is bounded by
  // the ring's largest frame (32 KiB here) however large maxMessageBytes is, so one that outgrows
  // it is refused when sent, and the connection carries on.
  RpcOptions options;
  options.maxMessageBytes = 64 * 1024;
  Counter counter;
  LocalPair pair(loop_, &counter, nullptr, options, 64 * 1024);
  RemoteCap root = pair.client().bootstrap();
  Request hold = root.newCall(NODE_INTERFACE_ID, 0, 64);
  (void)hold.params();  // its frame is open in the ring
  Request big = root.newCall(NODE_INTERFACE_ID, 0, 40000);
  capnp::AnyStruct::Builder content = big.params().initAsAnyStruct(0, 1);
  content.getPointerSection()[0].initAs<capnp::Data>(35000);
  Result<Response> refused = loop_.run(responseOf(big.send()));
  EXPECT_EQ(refused.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_TRUE(pair.client().isOpen());
  Result<Response> held = loop_.run(responseOf(hold.send()));
  ASSERT_TRUE(held.ok()) << errcName(held.code());
  EXPECT_TRUE(pair.client().isOpen());
}

// Results of about 30 KB and two hundred new objects: with the cap table they outgrow the
// ring's largest frame (32 KiB here).
class Bulky final : public ServerObject {
 public:
  explicit Bulky(Log& log) : log_(log) {}
  Promise<void> dispatch(uint64_t, uint16_t, CallContext& ctx) override {
    Result<capnp::AnyPointer::Builder> out = ctx.initResults(31000);
    if (!out) return readyPromise<void>(out.error());
    capnp::AnyStruct::Builder results = out->initAsAnyStruct(0, 2);
    results.getPointerSection()[0].initAs<capnp::Data>(30000);
    capnp::AnyList::Builder list =
        results.getPointerSection()[1].initAsAnyList(capnp::ElementSize::POINTER, 200);
    for (uint32_t i = 0; i < 200; ++i) {
      Result<uint32_t> index = ctx.addResultCap(std::make_unique<Node>(i, log_));
      if (!index) return readyPromise<void>(index.error());
      writeCapPointer(list, i, *index);
    }
    return readyPromise<void>(Status{});
  }

 private:
  Log& log_;
};

TEST_F(RpcManyCapsTest,
       ResultsWhoseCapTableOutgrowsTheRingsLargestFrameFailTheCallAndExportNothing) {
  Bulky bulky(serverLog_);
  RpcOptions options;
  options.maxMessageBytes = 64 * 1024;  // more than the ring's largest frame
  LocalPair pair(loop_, &bulky, nullptr, options, 64 * 1024);
  const uint32_t exportsBefore = pair.server().exportCount();
  Result<Response> r =
      loop_.run(responseOf(pair.client().bootstrap().newCall(NODE_INTERFACE_ID, 0, 64).send()));
  EXPECT_EQ(r.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_TRUE(pair.client().isOpen());
  EXPECT_TRUE(pair.server().isOpen());
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().answerCount() == 0 && serverLog_.destroyed == serverLog_.created;
  })) << "the two hundred objects went with the refused results";
  EXPECT_EQ(serverLog_.created, 200);
  EXPECT_EQ(pair.server().exportCount(), exportsBefore) << "nothing stayed exported";
  EXPECT_EQ(pair.client().importCount(), 0u);
}

TEST_F(RpcManyCapsTest, AnswerEntriesDoNotKeepLargeTablesBeyondASmallPool) {
  // Sixty-four calls at once, each passing forty of the client's objects that the server returns
  // (its answers record the forty its results name): freed, the answer entries keep no more than
  // a few tables' worth, not one per entry.
  constexpr uint32_t CALLS = 64;
  mirror_.freshCount = 0;
  LocalPair pair(loop_, &mirror_);
  std::vector<std::unique_ptr<Node>> mine;
  for (uint32_t i = 0; i < MANY; ++i) mine.push_back(std::make_unique<Node>(i, clientLog_));
  for (int round = 0; round < 2; ++round) {
    std::vector<Promise<Response>> calls;
    for (uint32_t c = 0; c < CALLS; ++c) calls.push_back(reflect(pair.client().bootstrap(), mine));
    for (Promise<Response>& call : calls) {
      Result<Response> r = loop_.run(std::move(call));
      ASSERT_TRUE(r.ok()) << errcName(r.code());
      EXPECT_EQ(r->capCount(), MANY);
    }
    calls.clear();
    ASSERT_TRUE(runUntil(loop_, [&] { return pair.server().answerCount() == 0; }));
    EXPECT_LE(pair.server().answerEntriesRetained(), 8 * 64 + CALLS * 16)
        << "at most the pool's eight tables and sixteen entries per answer";
  }
}

TEST_F(RpcManyCapsTest, ThisSidesOwnAdditionPastTheBoundIsRefusedAndTheTableIsUnchanged) {
  RpcOptions options;
  options.maxCapsPerMessage = MANY;
  LocalPair pair(loop_, &mirror_, nullptr, options);
  ASSERT_EQ(pair.client().maxCapsPerMessage(), MANY);
  std::vector<std::unique_ptr<Node>> mine;
  for (uint32_t i = 0; i <= MANY; ++i) mine.push_back(std::make_unique<Node>(i, clientLog_));
  RemoteCap root = pair.client().bootstrap();
  Request req = root.newCall(NODE_INTERFACE_ID, REFLECT, 8 * MANY + 64);
  capnp::AnyList::Builder list =
      req.params().initAsAnyStruct(0, 1).getPointerSection()[0].initAsAnyList(
          capnp::ElementSize::POINTER, MANY);
  for (uint32_t i = 0; i < MANY; ++i) {
    Result<uint32_t> index = req.addCap(*mine[i]);
    ASSERT_TRUE(index.ok()) << i;
    EXPECT_EQ(*index, i);
    writeCapPointer(list, i, *index);
  }
  // Past the bound, every kind of addition fails the same way.
  Result<uint32_t> past = req.addCap(*mine[MANY]);
  EXPECT_EQ(past.code(), Errc::OUT_OF_MEMORY);
  EXPECT_NE(std::string(past.error().detail).find("maxCapsPerMessage"), std::string::npos);
  EXPECT_EQ(req.addCap(root).code(), Errc::OUT_OF_MEMORY);
  int dropped = clientLog_.destroyed;
  EXPECT_EQ(req.addCap(std::make_unique<Node>(99, clientLog_)).code(), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(clientLog_.destroyed, dropped + 1) << "the refused object was dropped, not kept";
  CapPromise promise = pair.client().newCapPromise();
  EXPECT_EQ(req.addCap(promise).code(), Errc::OUT_OF_MEMORY);
  promise.reject(Error(Errc::FAILED, "unused"));
  // The table is as it was: the call carries exactly the first forty.
  Result<Response> r = loop_.run(responseOf(req.send()));
  // The results would carry eighty: the server's own addition past its bound fails the call.
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::OUT_OF_MEMORY);
  EXPECT_EQ(mirror_.paramCaps, MANY) << "the call arrived with its forty capabilities";
  EXPECT_TRUE(pair.client().isOpen());
  EXPECT_TRUE(pair.server().isOpen());
  mirror_.promises.clear();
  ASSERT_TRUE(runUntil(loop_, [&] {
    return pair.server().importCount() == 0 && pair.client().exportCount() == 1 &&
           pair.server().exportCount() == 1;
  }));
}

// A client and a server, each with its own bound on a message's cap table.
struct TwoBounds : LocalPair {
  TwoBounds(EventLoop& loop, ServerObject& bootstrap, uint32_t clientBound, uint32_t serverBound)
      : LocalPair(loop, bounded(&bootstrap, serverBound), bounded(nullptr, clientBound)) {}
  static RpcOptions bounded(ServerObject* bootstrap, uint32_t bound) {
    RpcOptions o;
    o.bootstrap = bootstrap;
    o.maxCapsPerMessage = bound;
    return o;
  }
};

TEST_F(RpcManyCapsTest, ACallPastTheServersBoundIsRefusedAndTheConnectionCarriesOn) {
  // The client allows more than the server: its 41 capabilities are sent, the server refuses the
  // call (MESSAGE_TOO_LARGE) without running it, gives every reference back, and serves the
  // next call, which carries as many as it takes.
  std::vector<std::unique_ptr<Node>> mine;
  for (uint32_t i = 0; i <= MANY; ++i) mine.push_back(std::make_unique<Node>(i, clientLog_));
  TwoBounds pair(loop_, mirror_, RpcOptions{}.maxCapsPerMessage, MANY);
  mirror_.freshCount = 0;  // its results pass back what it got, within its own bound
  const uint32_t exportsBefore = pair.client().exportCount();
  Result<Response> r = loop_.run(reflect(pair.client().bootstrap(), mine));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_NE(std::string(r.error().detail).find("maxCapsPerMessage"), std::string::npos);
  EXPECT_EQ(mirror_.calls, 0) << "the call never reached the object";
  EXPECT_TRUE(pair.server().isOpen());
  EXPECT_TRUE(pair.client().isOpen());
  EXPECT_EQ(pair.server().stats().messagesRefused, 1u);
  EXPECT_EQ(pair.server().importCount(), 0u);
  ASSERT_TRUE(runUntil(loop_, [&] { return pair.client().exportCount() == exportsBefore; }))
      << "the server released the 41 objects it was sent";
  EXPECT_EQ(pair.client().stats().releasesReceived, MANY + 1);

  mine.pop_back();  // exactly the server's bound
  Result<Response> served = loop_.run(reflect(pair.client().bootstrap(), mine));
  ASSERT_TRUE(served.ok()) << errcName(served.code());
  EXPECT_EQ(mirror_.paramCaps, MANY);
  EXPECT_EQ(pair.server().stats().messagesRefused, 1u);
}

TEST_F(RpcManyCapsTest, ResultsPastTheClientsBoundFailTheCallAndTheConnectionCarriesOn) {
  // The server allows more than the client: results of 20 capabilities passed back and 40 new
  // ones (objects and promises) fail the client's call (MESSAGE_TOO_LARGE); the client gives
  // every reference back, so the server's new objects go, and the connection serves on.
  std::vector<std::unique_ptr<Node>> mine;
  for (uint32_t i = 0; i < 20; ++i) mine.push_back(std::make_unique<Node>(i, clientLog_));
  TwoBounds pair(loop_, mirror_, MANY, RpcOptions{}.maxCapsPerMessage);
  const int serverObjectsBefore = serverLog_.destroyed;
  RemotePromise p = [&] {
    Request req = pair.client().bootstrap().newCall(NODE_INTERFACE_ID, REFLECT, 8 * 20 + 64);
    EXPECT_TRUE(writeCapList(req, req.params().initAsAnyStruct(0, 1), 0, mine).ok());
    return req.send();
  }();
  Result<Response> r = loop_.run(responseOf(std::move(p)));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_EQ(mirror_.calls, 1);
  EXPECT_EQ(pair.client().stats().messagesRefused, 1u);
  EXPECT_TRUE(pair.client().isOpen());
  EXPECT_TRUE(pair.server().isOpen());
  EXPECT_EQ(pair.client().importCount(), 0u);
  mirror_.settle();  // the promises it sent resolve: the client holds none of them
  ASSERT_TRUE(runUntil(
      loop_, [&] { return pair.server().exportCount() == 1 && pair.client().exportCount() == 1; }))
      << "server exports " << pair.server().exportCount() << ", client exports "
      << pair.client().exportCount();
  EXPECT_EQ(serverLog_.destroyed - serverObjectsBefore, static_cast<int>(MANY))
      << "the server's new objects went, and what its promises resolved to";
  EXPECT_EQ(pair.client().importCount(), 0u);

  // Fewer new capabilities: the results fit the client's bound and are taken.
  mirror_.freshCount = MANY - 20;
  Result<Response> served = loop_.run(reflect(pair.client().bootstrap(), mine));
  ASSERT_TRUE(served.ok()) << errcName(served.code());
  EXPECT_EQ(served->capCount(), MANY);
  EXPECT_EQ(pair.client().stats().messagesRefused, 1u);
  mirror_.promises.clear();  // the server connection's, dropped before it
}

// Records how many capabilities each call's params carried.

TEST_F(RpcManyCapsTest, ATableAtTheProtocolsLimitIsBuiltSentAndTaken) {
  // The largest bound a connection may have: the table grows through the pool's blocks to the
  // end, and the message (a quarter MiB of cap table) goes out and is read.
  RpcOptions options;
  options.maxCapsPerMessage = CAPS_PER_MESSAGE_LIMIT;
  options.maxMessageBytes = 400 * 1024;  // within the ring's largest frame
  // Lists of that many capabilities, read element by element, need a larger reading budget.
  MessageReceiverOptions receiver;
  receiver.limits.traversalLimitWords = 2ull * CAPS_PER_MESSAGE_LIMIT * CAPS_PER_MESSAGE_LIMIT;
  Counter counter;
  LocalPair pair(loop_, &counter, nullptr, options, 1024 * 1024, receiver);
  RemoteCap root = pair.client().bootstrap();
  Request req = root.newCall(NODE_INTERFACE_ID, 0, 64);
  for (uint32_t i = 0; i < CAPS_PER_MESSAGE_LIMIT; ++i) {
    Result<uint32_t> index = req.addCap(RemoteCap());  // a null entry
    ASSERT_TRUE(index.ok()) << i;
  }
  EXPECT_EQ(req.addCap(RemoteCap()).code(), Errc::OUT_OF_MEMORY);
  Result<Response> r = loop_.run(responseOf(req.send()));
  ASSERT_TRUE(r.ok()) << errcName(r.code()) << " " << (r.error().detail ? r.error().detail : "");
  EXPECT_EQ(counter.seen, CAPS_PER_MESSAGE_LIMIT);
}

TEST_F(RpcManyCapsTest, ATablePastTheProtocolsLimitAbortsRatherThanBeingRefused) {
  // No peer may send more than CAPS_PER_MESSAGE_LIMIT entries, whatever its bound: a table past
  // the bound is refused as a message, one past the limit ends the connection before any entry
  // is taken or released.
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  co.capacityBytes = 1024 * 1024;
  auto in = std::move(Channel::create(co).value());
  auto out = std::move(Channel::create(co).value());
  MessageSender attacker(in->attachSender().value());
  MessageReceiverOptions receiver;  // a budget that reads the whole table (see above)
  receiver.limits.traversalLimitWords = 2ull * CAPS_PER_MESSAGE_LIMIT * CAPS_PER_MESSAGE_LIMIT;
  MessageReceiver rx(*in, in->attachReceiver().value(), rpcReceiverOptions(receiver));
  MessageSender tx(out->attachSender().value());
  RpcOptions options;
  options.bootstrap = &mirror_;
  options.maxMessageBytes = 400 * 1024;
  RpcConnection victim(tx, rx, loop_, options);
  Result<OutgoingMessage> m = attacker.tryStartMessage(24 * (CAPS_PER_MESSAGE_LIMIT + 1) + 1024);
  ASSERT_TRUE(m.ok());
  wire::Call::Builder c = m->initRoot<wire::Message>().initCall();
  c.setQuestionId(1);
  c.getTarget().setImportedCap(0);
  c.setInterfaceId(NODE_INTERFACE_ID);
  c.setMethodId(REFLECT);
  auto t = c.initParams().initCapTable(CAPS_PER_MESSAGE_LIMIT + 1);
  for (uint32_t i = 0; i <= CAPS_PER_MESSAGE_LIMIT; ++i) t[i].setSenderHosted(5);
  ASSERT_TRUE(m->send().ok());
  ASSERT_TRUE(runUntil(loop_, [&] { return !victim.isOpen(); }));
  EXPECT_EQ(victim.failure().code, Errc::PROTOCOL_ERROR);
  EXPECT_EQ(victim.stats().messagesRefused, 0u);
  EXPECT_EQ(victim.stats().releasesSent, 0u);
  EXPECT_EQ(mirror_.calls, 0);
}

// A connection's two ends with nothing behind them, for the checks made when it is constructed.
std::unique_ptr<Channel> localChannel() {
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  return std::move(Channel::create(co).value());
}
struct BareEnds {
  EventLoop loop;
  std::unique_ptr<Channel> in = localChannel(), out = localChannel();
  MessageSender tx{out->attachSender().value()};
  MessageReceiver rx{*in, in->attachReceiver().value(), rpcReceiverOptions()};
};

TEST(RpcManyCapsDeathTest, ABoundOutsideTheProtocolsLimitIsRefusedWhenTheConnectionIsMade) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  BareEnds e;
  RpcOptions none;
  none.maxCapsPerMessage = 0;
  EXPECT_DEATH(RpcConnection(e.tx, e.rx, e.loop, none), "maxCapsPerMessage 0 is outside");
  RpcOptions huge;
  huge.maxCapsPerMessage = CAPS_PER_MESSAGE_LIMIT + 1;
  EXPECT_DEATH(RpcConnection(e.tx, e.rx, e.loop, huge), "is outside 1..16384");
}

TEST(RpcManyCapsDeathTest, ABoundWhoseListsTheReceiversBudgetCannotReadIsRefused) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  BareEnds e;
  // The default budget (64 Ki words, four passes) reads lists of 313 capabilities element by
  // element (twice 313 squared, with the size read each time, within three passes), not 314.
  RpcOptions largest;
  largest.maxCapsPerMessage = 313;
  { RpcConnection fits(e.tx, e.rx, e.loop, largest); }
  RpcOptions beyond;
  beyond.maxCapsPerMessage = 314;
  EXPECT_DEATH(RpcConnection(e.tx, e.rx, e.loop, beyond), "raise ReadLimits::traversalLimitWords");
}

TEST_F(RpcManyCapsTest,
       ACallWhoseCapTableOutgrowsTheRingsLargestFrameIsRefusedAndTheConnectionLives) {
  // A 64 KiB ring carries frames of up to 32 KiB; maxMessageBytes allows more. A call filled
  // close to the frame's room, then given 200 capabilities, would be moved out of its frame and
  // could never be sent: it is refused, the connection carries on.
  RpcOptions options;
  options.maxMessageBytes = 64 * 1024;
  Counter counter;
  LocalPair pair(loop_, &counter, nullptr, options, 64 * 1024);
  RemoteCap root = pair.client().bootstrap();
  Request req = root.newCall(NODE_INTERFACE_ID, 0, 31000);
  capnp::Data::Builder bulk =
      req.params().initAsAnyStruct(0, 1).getPointerSection()[0].initAs<capnp::Data>(30000);
  std::memset(bulk.begin(), 7, bulk.size());
  for (uint32_t i = 0; i < 200; ++i) ASSERT_TRUE(req.addCap(RemoteCap()).ok()) << i;
  RemotePromise sent = req.send();
  Result<Response> r = loop_.run(responseOf(std::move(sent)));
  EXPECT_EQ(r.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_TRUE(pair.client().isOpen());
  EXPECT_EQ(counter.seen, 0u);
  // The next call goes.
  Request small = root.newCall(NODE_INTERFACE_ID, 0, 64);
  ASSERT_TRUE(small.addCap(RemoteCap()).ok());
  Result<Response> next = loop_.run(responseOf(small.send()));
  ASSERT_TRUE(next.ok()) << errcName(next.code());
  EXPECT_EQ(counter.seen, 1u);
}

}  // namespace
}  // namespace agate::rpc::test
