// Typed messages on channels: building in the ring, read policies, refusals that leave the ring
// unchanged, sticky protocol errors, and the awaited send/receive on both loop backends.
#include "agate/runtime/message_channel.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "support/watchdog.h"
#include "test_messages.capnp.h"

namespace agate {
namespace {

using namespace std::chrono_literals;
using testing::Watchdog;

// A channel with a typed sender and receiver attached.
struct Endpoints {
  std::unique_ptr<Channel> channel;
  std::unique_ptr<MessageSender> tx;
  std::unique_ptr<MessageReceiver> rx;

  explicit Endpoints(ChannelOptions options, MessageReceiverOptions rxOptions = {}) {
    channel = std::move(Channel::create(options).value());
    tx = std::make_unique<MessageSender>(std::move(channel->attachSender().value()));
    rx = std::make_unique<MessageReceiver>(*channel, std::move(channel->attachReceiver().value()),
                                           rxOptions);
  }
  ~Endpoints() {
    rx.reset();
    tx.reset();
  }
  RingControl& control() { return *reinterpret_cast<RingControl*>(channel->memory().data()); }
  uint64_t tail() { return std::atomic_ref<uint64_t>(control().tail).load(); }
  uint64_t head() { return std::atomic_ref<uint64_t>(control().head).load(); }
  uint32_t dataSleepers() { return std::atomic_ref<uint32_t>(control().dataBell.sleepers).load(); }
  uint32_t spaceSleepers() {
    return std::atomic_ref<uint32_t>(control().spaceBell.sleepers).load();
  }
};

ChannelOptions scoped(ChannelScope scope, uint64_t capacity = 4096) {
  return ChannelOptions{.scope = scope, .capacityBytes = capacity};
}

Status sendPoint(MessageSender& tx, int32_t x, uint16_t tag = 0) {
  Result<OutgoingMessage> msg = tx.tryStartMessage(64);
  if (!msg) return msg.error();
  msg->initRoot<test::Point>().setX(x);
  return msg->send(tag);
}

TEST(MessageChannelTest, LocalChannelCarriesATypedMessageAndItsTagInPlace) {
  Endpoints e(scoped(ChannelScope::LOCAL));
  EXPECT_EQ(e.rx->policy(), ReadPolicy::IN_PLACE);
  Result<OutgoingMessage> msg = e.tx->tryStartMessage(256);
  ASSERT_TRUE(msg.ok());
  auto sample = msg->initRoot<test::Sample>();
  sample.setId(42);
  sample.setName("hello");
  ASSERT_TRUE(msg->send(7).ok());
  EXPECT_FALSE(msg->pending());
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->tag(), 7);
  EXPECT_EQ(in->getRoot<test::Sample>().getId(), 42u);
  EXPECT_STREQ(in->getRoot<test::Sample>().getName().cStr(), "hello");
  in = Error(Errc::CANCELLED);  // drops the message: the receiver may receive again
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::WOULD_BLOCK);
}

TEST(MessageChannelTest, SendCommitsOnlyTheWordsTheMessageUsed) {
  Endpoints e(scoped(ChannelScope::LOCAL));
  ASSERT_TRUE(sendPoint(*e.tx, 1).ok());
  // Root pointer + a two-field struct: 16 bytes, plus the 8-byte frame header; not the 64 asked.
  EXPECT_EQ(e.tail(), 24u);
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->sizeInBytes(), 16u);
}

TEST(MessageChannelTest, SendWithoutRingPublishesAtOnceAndLeavesTheRingToTheSender) {
  Endpoints e(scoped(ChannelScope::SHARED));
  Result<OutgoingMessage> msg = e.tx->tryStartMessage(64);
  ASSERT_TRUE(msg.ok());
  msg->initRoot<test::Point>().setX(9);
  ASSERT_TRUE(msg->sendWithoutRing(3).ok());
  EXPECT_FALSE(msg->pending());
  EXPECT_TRUE(e.tx->sender().ringIsPending());
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok()) << "published before any ring";
  EXPECT_EQ(in->tag(), 3);
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 9);
  EXPECT_TRUE(e.tx->sender().ringPending());
  EXPECT_FALSE(e.tx->sender().ringIsPending());
}

TEST(MessageChannelTest, SendWithoutRingOfAMessageTooLargeForItsFramePublishesNothing) {
  Endpoints e(scoped(ChannelScope::SHARED));
  Result<OutgoingMessage> msg = e.tx->tryStartMessage(16);
  ASSERT_TRUE(msg.ok());
  msg->initRoot<test::Sample>().setName("far more than sixteen bytes of text");
  EXPECT_EQ(msg->sendWithoutRing().code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_FALSE(e.tx->sender().ringIsPending());
  EXPECT_EQ(e.tail(), 0u);
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::WOULD_BLOCK);
}

TEST(MessageChannelTest, InPlaceMessageHoldsItsFrameUntilDropped) {
  Endpoints e(scoped(ChannelScope::LOCAL));
  ASSERT_TRUE(sendPoint(*e.tx, 5).ok());
  {
    Result<IncomingMessage> in = e.rx->tryReceive();
    ASSERT_TRUE(in.ok());
    EXPECT_EQ(e.head(), 0u) << "the frame is still being read in place";
    IncomingMessage moved = std::move(*in);
    EXPECT_EQ(moved.getRoot<test::Point>().getX(), 5);
  }
  EXPECT_EQ(e.head(), e.tail());
}

TEST(MessageChannelTest, SharedChannelCopiesInAndReleasesTheFrameAtOnce) {
  Endpoints e(scoped(ChannelScope::SHARED));
  EXPECT_EQ(e.rx->policy(), ReadPolicy::COPY_IN);
  ASSERT_TRUE(sendPoint(*e.tx, 9).ok());
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(e.head(), e.tail()) << "COPY_IN gives the frame back before the message is read";
  // The sender may overwrite the ring now; the message lives in the receiver's scratch.
  std::memset(e.channel->memory().data() + RING_CONTROL_BYTES, 0xff, 64);
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 9);
}

TEST(MessageChannelTest, DeferredReleasesPublishTheHeadOnceTheRingIsFoundEmpty) {
  for (ChannelScope scope : {ChannelScope::SHARED, ChannelScope::LOCAL}) {
    Endpoints e(scoped(scope), MessageReceiverOptions{.deferReleases = true});
    for (int32_t x = 0; x < 3; ++x) ASSERT_TRUE(sendPoint(*e.tx, x).ok());
    const uint64_t sent = e.tail();
    for (int32_t x = 0; x < 3; ++x) {
      Result<IncomingMessage> in = e.rx->tryReceive();
      ASSERT_TRUE(in.ok());
      EXPECT_EQ(in->getRoot<test::Point>().getX(), x);
    }
    EXPECT_EQ(e.head(), 0u) << "three frames taken, none handed back yet";
    EXPECT_EQ(e.rx->tryReceive().code(), Errc::WOULD_BLOCK);
    EXPECT_EQ(e.head(), sent) << "an empty ring publishes every deferred release at once";
  }
}

TEST(MessageChannelTest, DeferredReleasesStillPublishEveryQuarterOfTheRing) {
  Endpoints e(scoped(ChannelScope::SHARED, 4096), MessageReceiverOptions{.deferReleases = true});
  // 24-byte frames: the 43rd one taken passes capacity/4 (1024 bytes) unpublished.
  int32_t sent = 0;
  while (sendPoint(*e.tx, sent).ok()) ++sent;
  ASSERT_GT(sent, 60);
  for (int32_t x = 0; x < 42; ++x) ASSERT_TRUE(e.rx->tryReceive().ok());
  EXPECT_EQ(e.head(), 0u);
  ASSERT_TRUE(e.rx->tryReceive().ok());
  EXPECT_EQ(e.head(), 43u * 24u) << "a sender waiting for space is not held off for long";
  EXPECT_TRUE(sendPoint(*e.tx, sent).ok()) << "the space published is usable";
}

TEST(MessageChannelTest, AMalformedFrameIsReleasedAtOnceEvenWithDeferredReleases) {
  Endpoints e(scoped(ChannelScope::SHARED), MessageReceiverOptions{.deferReleases = true});
  const uint64_t garbage[2] = {0xfffffffffffffff0ull, 0x1234};  // root: a list, out of bounds
  ASSERT_TRUE(e.tx->sender().trySend(std::as_bytes(std::span(garbage))).ok());
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(e.head(), e.tail());
}

TEST(MessageChannelTest, ReadPolicyCanBeOverriddenForATrustedPeer) {
  Endpoints e(scoped(ChannelScope::SHARED), MessageReceiverOptions{.policy = ReadPolicy::IN_PLACE});
  EXPECT_EQ(e.rx->policy(), ReadPolicy::IN_PLACE);
  Endpoints f(scoped(ChannelScope::LOCAL), MessageReceiverOptions{.policy = ReadPolicy::COPY_IN});
  EXPECT_EQ(f.rx->policy(), ReadPolicy::COPY_IN);
  ASSERT_TRUE(sendPoint(*f.tx, 3).ok());
  Result<IncomingMessage> in = f.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 3);
}

TEST(MessageChannelTest, MessageTooLargeForItsFramePublishesNothingAndLeavesTheRingAsItWas) {
  Endpoints e(scoped(ChannelScope::LOCAL));
  Result<OutgoingMessage> msg = e.tx->tryStartMessage(32);
  ASSERT_TRUE(msg.ok());
  msg->initRoot<test::Sample>().setName(std::string(200, 'x'));
  EXPECT_EQ(msg->send().code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_EQ(e.tail(), 0u);
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::WOULD_BLOCK);
  ASSERT_TRUE(sendPoint(*e.tx, 11).ok()) << "the sender works on after a refusal";
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 11);
}

TEST(MessageChannelTest, DroppedOutgoingMessageIsAbandoned) {
  Endpoints e(scoped(ChannelScope::LOCAL));
  {
    Result<OutgoingMessage> msg = e.tx->tryStartMessage(64);
    ASSERT_TRUE(msg.ok());
    msg->initRoot<test::Point>().setX(1);
  }
  EXPECT_EQ(e.tail(), 0u);
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::WOULD_BLOCK);
  ASSERT_TRUE(sendPoint(*e.tx, 2).ok());
  EXPECT_EQ(e.rx->tryReceive()->getRoot<test::Point>().getX(), 2);
}

TEST(MessageChannelTest, StartOnAFullRingIsWouldBlockAndAboveMaxPayloadIsTooLarge) {
  Endpoints e(scoped(ChannelScope::LOCAL, 256));
  EXPECT_EQ(e.tx->tryStartMessage(e.channel->maxPayload() + 8).code(), Errc::MESSAGE_TOO_LARGE);
  int sent = 0;
  while (sendPoint(*e.tx, sent).ok()) ++sent;
  EXPECT_GT(sent, 0);
  uint64_t tail = e.tail();
  EXPECT_EQ(e.tx->tryStartMessage(64).code(), Errc::WOULD_BLOCK);
  EXPECT_EQ(e.tail(), tail);
  EXPECT_EQ(e.tx->startMessage(64, WaitPolicy{.spinIterations = 10, .timeout = 1ms}).code(),
            Errc::TIMED_OUT);
}

TEST(MessageChannelTest, MalformedFrameIsAProtocolErrorThatSticks) {
  Endpoints e(scoped(ChannelScope::SHARED));
  const uint64_t garbage[2] = {0xfffffffffffffff0ull, 0x1234};  // root: a list, out of bounds
  ASSERT_TRUE(e.tx->sender().trySend(std::as_bytes(std::span(garbage))).ok());
  ASSERT_TRUE(sendPoint(*e.tx, 1).ok());
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::PROTOCOL_ERROR);
  EXPECT_TRUE(e.rx->poisoned());
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::PROTOCOL_ERROR) << "the valid frame is not served";
  EXPECT_EQ(e.rx->receive(WaitPolicy{.timeout = 1ms}).code(), Errc::PROTOCOL_ERROR);
  EventLoop loop;
  EXPECT_EQ(loop.run(e.rx->receiveAsync(loop)).code(), Errc::PROTOCOL_ERROR);
}

TEST(MessageChannelTest, MessagesArriveValidatedUnlessValidatedOnDemand) {
  Endpoints plain(scoped(ChannelScope::SHARED));
  ASSERT_TRUE(sendPoint(*plain.tx, 3).ok());
  Result<IncomingMessage> in = plain.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_TRUE(in->validated());
  EXPECT_TRUE(in->validate().ok()) << "validating again is a no-op";
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 3);
}

TEST(MessageChannelTest, OnDemandAMessageIsHandedOverAsItsPrivateCopyAndValidatedWhenAsked) {
  Endpoints e(scoped(ChannelScope::SHARED), MessageReceiverOptions{.validateOnDemand = true});
  ASSERT_TRUE(sendPoint(*e.tx, 9).ok());
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_FALSE(in->validated());
  EXPECT_EQ(e.head(), e.tail()) << "COPY_IN gives the frame back before anything is read";
  // The bytes are the receiver's private copy: the ring's frame may be overwritten meanwhile.
  const std::span<const std::byte> bytes = in->bytes();
  const std::byte* frame = e.channel->memory().data() + RING_CONTROL_BYTES;
  EXPECT_TRUE(bytes.data() < frame || bytes.data() >= frame + e.channel->memory().size());
  std::memset(e.channel->memory().data() + RING_CONTROL_BYTES, 0xff, 64);
  EXPECT_EQ(in->sizeInBytes(), bytes.size());
  ASSERT_TRUE(in->validate().ok());
  EXPECT_TRUE(in->validated());
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 9);
  EXPECT_EQ(in->view().bytes().data(), bytes.data()) << "the view reads the same copy";
}

TEST(MessageChannelTest, OnDemandAMalformedFrameIsRefusedWhenValidatedAndTheErrorSticks) {
  for (ChannelScope scope : {ChannelScope::SHARED, ChannelScope::LOCAL}) {
    Endpoints e(scoped(scope), MessageReceiverOptions{.validateOnDemand = true});
    const uint64_t garbage[2] = {0xfffffffffffffff0ull, 0x1234};  // root: a list, out of bounds
    ASSERT_TRUE(e.tx->sender().trySend(std::as_bytes(std::span(garbage))).ok());
    const uint64_t garbageEnd = e.tail();
    ASSERT_TRUE(sendPoint(*e.tx, 1).ok());
    {
      Result<IncomingMessage> in = e.rx->tryReceive();
      ASSERT_TRUE(in.ok()) << "handed over unread";
      EXPECT_EQ(in->bytes().size(), sizeof garbage);
      EXPECT_EQ(std::memcmp(in->bytes().data(), garbage, sizeof garbage), 0);
      EXPECT_EQ(in->validate().code(), Errc::PROTOCOL_ERROR);
      EXPECT_FALSE(in->validated());
      EXPECT_EQ(in->validate().code(), Errc::PROTOCOL_ERROR) << "and again";
      EXPECT_TRUE(e.rx->poisoned());
    }
    EXPECT_EQ(e.rx->tryReceive().code(), Errc::PROTOCOL_ERROR) << "the valid frame is not served";
    EXPECT_EQ(e.head(), garbageEnd) << "the refused frame went back to the sender";
  }
}

TEST(MessageChannelTest, OnDemandLengthChecksStillRefuseAFrameAtOnce) {
  Endpoints e(scoped(ChannelScope::SHARED), MessageReceiverOptions{.validateOnDemand = true});
  const std::byte odd[12] = {};  // not a whole number of words
  ASSERT_TRUE(e.tx->sender().trySend(std::span(odd)).ok());
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::PROTOCOL_ERROR);
  EXPECT_TRUE(e.rx->poisoned());
  EXPECT_EQ(e.head(), e.tail());
}

TEST(MessageChannelDeathTest, ReadingAMessageBeforeItIsValidatedIsABug) {
  Endpoints e(scoped(ChannelScope::SHARED), MessageReceiverOptions{.validateOnDemand = true});
  ASSERT_TRUE(sendPoint(*e.tx, 9).ok());
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_DEATH((void)in->getRoot<test::Point>(), "read before validate");
}

TEST(MessageChannelTest, ReceiveReportsEmptyTimeoutAndDisconnect) {
  Endpoints e(scoped(ChannelScope::LOCAL));
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::WOULD_BLOCK);
  EXPECT_EQ(e.rx->receive(WaitPolicy{.spinIterations = 10, .timeout = 2ms}).code(),
            Errc::TIMED_OUT);
  ASSERT_TRUE(sendPoint(*e.tx, 4).ok());
  e.tx->sender().detach();
  EXPECT_EQ(e.rx->receive()->getRoot<test::Point>().getX(), 4) << "drained before disconnect";
  EXPECT_EQ(e.rx->tryReceive().code(), Errc::DISCONNECTED);
}

// ---- awaited ----

struct AsyncCase {
  Backend backend;
  bool eventfd;
};

class MessageChannelAsyncTest : public ::testing::TestWithParam<AsyncCase> {
 protected:
  ChannelOptions options(ChannelScope scope = ChannelScope::SHARED, uint64_t capacity = 4096) {
    return ChannelOptions{
        .scope = scope, .capacityBytes = capacity, .eventfdWakeups = GetParam().eventfd};
  }
  LoopOptions loopOptions() { return LoopOptions{.backend = GetParam().backend}; }
};

INSTANTIATE_TEST_SUITE_P(
    BackendsAndWakeups, MessageChannelAsyncTest,
    ::testing::Values(AsyncCase{Backend::URING, false}, AsyncCase{Backend::URING, true},
                      AsyncCase{Backend::EPOLL, false}, AsyncCase{Backend::EPOLL, true}),
    [](const auto& p) {
      return std::string(backendName(p.param.backend)) + (p.param.eventfd ? "_eventfd" : "_futex");
    });

Promise<void> sendPointLater(EventLoop& loop, MessageSender& tx, int32_t x, Duration after) {
  AGATE_CO_TRY(co_await loop.sleep(after));
  co_return sendPoint(tx, x);
}

Promise<int32_t> receivePoint(EventLoop& loop, MessageReceiver& rx, AsyncWaitPolicy policy) {
  Result<IncomingMessage> in = co_await rx.receiveAsync(loop, policy);
  if (!in) co_return in.error();
  co_return in->getRoot<test::Point>().getX();
}

TEST_P(MessageChannelAsyncTest, ParkedReceiveWakesWhenAMessageArrives) {
  Watchdog dog("ParkedReceiveWakesWhenAMessageArrives", 20s);
  Endpoints e(options());
  EventLoop loop(loopOptions());
  loop.spawn(sendPointLater(loop, *e.tx, 77, 5ms));
  Result<int32_t> x = loop.run(receivePoint(loop, *e.rx, AsyncWaitPolicy{.spinIterations = 0}));
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 77);
  EXPECT_EQ(e.dataSleepers(), 0u) << "the announce was withdrawn";
}

// A sender that runs on the same loop after one yield.
Promise<void> sendPointAfterYield(EventLoop& loop, MessageSender& tx, int32_t x) {
  co_await loop.yield();
  co_return sendPoint(tx, x);
}

TEST_P(MessageChannelAsyncTest, SpinningReceiveYieldsToQueuedTasksOnItsLoop) {
  // A spin budget of a billion retries would take seconds if the spin held the loop's thread;
  // the message comes from a task queued on the same loop, so it only arrives if the spin yields.
  Watchdog dog("SpinningReceiveYieldsToQueuedTasksOnItsLoop", 20s);
  Endpoints e(options());
  EventLoop loop(loopOptions());
  loop.spawn(sendPointAfterYield(loop, *e.tx, 55));
  const auto start = std::chrono::steady_clock::now();
  Result<int32_t> x =
      loop.run(receivePoint(loop, *e.rx, AsyncWaitPolicy{.spinIterations = 1'000'000'000}));
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 55);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "the spin starved the sender";
  EXPECT_EQ(e.dataSleepers(), 0u) << "it never needed to park";
}

// Receives one message, then starts waiting for the next (spinning) before returning the first.
Promise<int32_t> receiveThenSpinForTheNext(EventLoop& loop, MessageReceiver& rx,
                                           Fulfiller<int32_t>& first, AsyncWaitPolicy policy) {
  int32_t x = 0;
  {
    Result<IncomingMessage> in = co_await rx.receiveAsync(loop, policy);
    if (!in) co_return in.error();
    x = in->getRoot<test::Point>().getX();
  }  // the frame goes back before the next receive
  first.fulfill(x);
  co_return co_await receivePoint(loop, rx, policy);  // nothing will come: spins, then parks
}

TEST_P(MessageChannelAsyncTest, RunReturnsWhileAnotherCoroutineSpinsOnTheLoop) {
  // A pump-like coroutine fulfils what run() waits for and goes straight back to spinning on
  // an empty ring; run() must get control back at once, not after a billion retries.
  Watchdog dog("RunReturnsWhileAnotherCoroutineSpinsOnTheLoop", 20s);
  Endpoints e(options());
  EventLoop loop(loopOptions());
  ASSERT_TRUE(sendPoint(*e.tx, 9).ok());
  auto [first, fulfiller] = newPromiseAndFulfiller<int32_t>();
  Promise<int32_t> pump = receiveThenSpinForTheNext(
      loop, *e.rx, fulfiller, AsyncWaitPolicy{.spinIterations = 1'000'000'000});
  const auto start = std::chrono::steady_clock::now();
  Result<int32_t> x = loop.run(std::move(first));
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 9);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "the spin held run() back";
}

TEST_P(MessageChannelAsyncTest, ReceiveOfAWaitingMessageCompletesWithoutParking) {
  Endpoints e(options());
  EventLoop loop(loopOptions());
  ASSERT_TRUE(sendPoint(*e.tx, 8).ok());
  Promise<int32_t> p = receivePoint(loop, *e.rx, {});
  ASSERT_TRUE(p.isReady()) << "eager: no trip through the loop";
  EXPECT_EQ(p.takeResult().value(), 8);
}

TEST_P(MessageChannelAsyncTest, DroppedParkedReceiveTakesNoFrameAndWithdrawsItsAnnounce) {
  Watchdog dog("DroppedParkedReceive", 20s);
  Endpoints e(options());
  EventLoop loop(loopOptions());
  {
    Promise<IncomingMessage> parked =
        e.rx->receiveAsync(loop, AsyncWaitPolicy{.spinIterations = 0});
    loop.runUntilIdle();
    EXPECT_FALSE(parked.isReady());
    EXPECT_NE(e.dataSleepers(), 0u) << "parked receivers announce on the doorbell";
  }
  EXPECT_EQ(e.dataSleepers(), 0u);
  ASSERT_TRUE(sendPoint(*e.tx, 21).ok());
  loop.runUntilIdle();  // let cancelled waits complete; none of them may take the frame
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 21);
}

TEST_P(MessageChannelAsyncTest, ParkedReceiveReportsDisconnectWhenTheSenderDetaches) {
  Watchdog dog("ParkedReceiveReportsDisconnect", 20s);
  Endpoints e(options());
  EventLoop loop(loopOptions());
  Promise<int32_t> p = receivePoint(loop, *e.rx, AsyncWaitPolicy{.spinIterations = 0});
  loop.runUntilIdle();
  EXPECT_FALSE(p.isReady());
  e.tx->sender().detach();
  EXPECT_EQ(loop.run(std::move(p)).code(), Errc::DISCONNECTED);
  EXPECT_EQ(e.dataSleepers(), 0u);
}

TEST_P(MessageChannelAsyncTest, DeadlineCancelsAParkedReceive) {
  Watchdog dog("DeadlineCancelsAParkedReceive", 20s);
  Endpoints e(options());
  EventLoop loop(loopOptions());
  EXPECT_EQ(loop.run(loop.deadline(e.rx->receiveAsync(loop), 3ms)).code(), Errc::TIMED_OUT);
  EXPECT_EQ(e.dataSleepers(), 0u);
}

Promise<int32_t> drainLater(EventLoop& loop, MessageReceiver& rx, Duration after) {
  AGATE_CO_TRY(co_await loop.sleep(after));
  int32_t n = 0;
  while (rx.tryReceive().ok()) ++n;
  co_return n;
}

Promise<void> sendWhenSpace(EventLoop& loop, MessageSender& tx, int32_t x) {
  Result<OutgoingMessage> msg = co_await tx.startMessageAsync(loop, 64, {.spinIterations = 0});
  if (!msg) co_return msg.error();
  msg->initRoot<test::Point>().setX(x);
  co_return msg->send();
}

TEST_P(MessageChannelAsyncTest, AwaitedSendWaitsForSpaceOnAFullRing) {
  Watchdog dog("AwaitedSendWaitsForSpace", 20s);
  Endpoints e(options(ChannelScope::SHARED, 256));
  int32_t sent = 0;
  while (sendPoint(*e.tx, sent).ok()) ++sent;
  EventLoop loop(loopOptions());
  Promise<void> send = sendWhenSpace(loop, *e.tx, 1000);
  loop.runUntilIdle();
  EXPECT_FALSE(send.isReady());
  EXPECT_NE(e.spaceSleepers(), 0u);
  Promise<int32_t> drained = drainLater(loop, *e.rx, 2ms);
  ASSERT_TRUE(loop.run(std::move(send)).ok());
  EXPECT_EQ(loop.run(std::move(drained)).value(), sent);
  EXPECT_EQ(e.spaceSleepers(), 0u);
  Result<IncomingMessage> in = e.rx->tryReceive();
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 1000);
}

TEST_P(MessageChannelAsyncTest, AwaitedSendReportsDisconnectWhenTheReceiverDetaches) {
  Watchdog dog("AwaitedSendReportsDisconnect", 20s);
  Endpoints e(options(ChannelScope::SHARED, 256));
  while (sendPoint(*e.tx, 0).ok()) {
  }
  EventLoop loop(loopOptions());
  Promise<void> send = sendWhenSpace(loop, *e.tx, 1);
  loop.runUntilIdle();
  e.rx->receiver().detach();
  EXPECT_EQ(loop.run(std::move(send)).code(), Errc::DISCONNECTED);
  EXPECT_EQ(e.spaceSleepers(), 0u);
}

TEST(MessageChannelAsyncPrivateTest, AwaitedReceiveOnAnEmptyPrivateChannelIsWouldBlock) {
  Endpoints e(scoped(ChannelScope::PRIVATE));
  EventLoop loop;
  EXPECT_EQ(loop.run(e.rx->receiveAsync(loop)).code(), Errc::WOULD_BLOCK);
  ASSERT_TRUE(sendPoint(*e.tx, 6).ok());
  Result<IncomingMessage> in = loop.run(e.rx->receiveAsync(loop));
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->getRoot<test::Point>().getX(), 6);
}

}  // namespace
}  // namespace agate
