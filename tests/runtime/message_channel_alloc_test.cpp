// Typed messages allocate nothing in steady state: 100 000 Cap'n Proto messages sent and received
// on a LOCAL (read in place) and a SHARED (copied in) channel, and 100 000 request/response round
// trips between two coroutines that each park in receiveAsync, on both loop backends. The binary
// links the counting operator new (support/alloc_counter.h).
#include <gtest/gtest.h>

#include "agate/runtime/message_channel.h"
#include "support/alloc_counter.h"
#include "support/steady_state.h"
#include "test_messages.capnp.h"

namespace agate {
namespace {

constexpr int N = 100'000;

struct Endpoints {
  std::unique_ptr<Channel> channel;
  std::unique_ptr<MessageSender> tx;
  std::unique_ptr<MessageReceiver> rx;
  explicit Endpoints(ChannelOptions options) {
    channel = std::move(Channel::create(options).value());
    tx = std::make_unique<MessageSender>(std::move(channel->attachSender().value()));
    rx = std::make_unique<MessageReceiver>(*channel, std::move(channel->attachReceiver().value()));
  }
  ~Endpoints() {
    rx.reset();
    tx.reset();
  }
};

// Sends `n` Sample messages (a text, a list, a nested struct) and reads each back.
uint64_t exchange(Endpoints& e, int n) {
  uint64_t sum = 0;
  for (int i = 0; i < n; ++i) {
    Result<OutgoingMessage> msg = e.tx->tryStartMessage(256);
    AGATE_ASSERT(msg.ok(), "start %d", i);
    auto sample = msg->initRoot<test::Sample>();
    sample.setId(static_cast<uint64_t>(i));
    sample.setName("steady");
    sample.initValues(4).set(3, 7);
    sample.initOrigin().setY(2);
    AGATE_ASSERT(msg->send(1).ok(), "send %d", i);
    Result<IncomingMessage> in = e.rx->tryReceive();
    AGATE_ASSERT(in.ok(), "receive %d", i);
    auto got = in->getRoot<test::Sample>();
    sum += got.getId() + got.getValues()[3] + static_cast<uint64_t>(got.getOrigin().getY());
  }
  return sum;
}

class TypedSyncAllocTest : public ::testing::TestWithParam<ChannelScope> {};
INSTANTIATE_TEST_SUITE_P(Scopes, TypedSyncAllocTest,
                         ::testing::Values(ChannelScope::LOCAL, ChannelScope::SHARED),
                         [](const auto& p) {
                           return p.param == ChannelScope::LOCAL ? "LOCAL" : "SHARED";
                         });

TEST_P(TypedSyncAllocTest, HundredThousandTypedMessagesAllocateNothingInSteadyState) {
  Endpoints e(ChannelOptions{.scope = GetParam(), .capacityBytes = 64 * 1024});
  exchange(e, 1000);  // warm-up
  uint64_t before = testing::allocationCount();
  uint64_t sum = exchange(e, N);
  uint64_t after = testing::allocationCount();
  EXPECT_EQ(sum, uint64_t{N} * (N - 1) / 2 + uint64_t{N} * 9);
  EXPECT_EQ(after - before, 0u) << "heap allocations during " << N << " typed messages";
}

// The echo side: answers each request with its value + 1; ends on a negative value.
Promise<void> echo(EventLoop& loop, MessageReceiver& rx, MessageSender& tx, AsyncWaitPolicy wait) {
  for (;;) {
    int32_t x = 0;
    {
      Result<IncomingMessage> in = co_await rx.receiveAsync(loop, wait);
      if (!in) co_return in.error();
      x = in->getRoot<test::Point>().getX();
    }
    if (x < 0) co_return {};
    Result<OutgoingMessage> out = tx.tryStartMessage(64);
    if (!out) co_return out.error();
    out->initRoot<test::Point>().setX(x + 1);
    AGATE_CO_TRY(out->send());
  }
}

Promise<int64_t> ping(EventLoop& loop, MessageSender& tx, MessageReceiver& rx, int n,
                      AsyncWaitPolicy wait) {
  int64_t sum = 0;
  for (int i = 0; i <= n; ++i) {
    Result<OutgoingMessage> out = tx.tryStartMessage(64);
    if (!out) co_return out.error();
    out->initRoot<test::Point>().setX(i == n ? -1 : i);
    AGATE_CO_TRY(out->send());
    if (i == n) break;
    Result<IncomingMessage> in = co_await rx.receiveAsync(loop, wait);
    if (!in) co_return in.error();
    sum += in->getRoot<test::Point>().getX();
  }
  co_return sum;
}

struct AsyncCase {
  Backend backend;
  bool eventfd;
};
class TypedAsyncAllocTest : public ::testing::TestWithParam<AsyncCase> {};
INSTANTIATE_TEST_SUITE_P(Backends, TypedAsyncAllocTest,
                         ::testing::Values(AsyncCase{Backend::URING, false},
                                           AsyncCase{Backend::EPOLL, true}),
                         [](const auto& p) {
                           return std::string(backendName(p.param.backend)) +
                                  (p.param.eventfd ? "_eventfd" : "_futex");
                         });

int64_t roundTrips(EventLoop& loop, Endpoints& requests, Endpoints& replies, int n) {
  // No spinning: both coroutines share the loop, so every receive parks on its doorbell.
  AsyncWaitPolicy wait{.spinIterations = 0};
  Promise<void> server = echo(loop, *requests.rx, *replies.tx, wait);
  Result<int64_t> sum = loop.run(ping(loop, *requests.tx, *replies.rx, n, wait));
  AGATE_ASSERT(loop.run(std::move(server)).ok(), "echo failed");
  AGATE_ASSERT(sum.ok(), "ping failed");
  return *sum;
}

TEST_P(TypedAsyncAllocTest, HundredThousandAwaitedRoundTripsAllocateNothingInSteadyState) {
  ChannelOptions options{.scope = ChannelScope::SHARED, .eventfdWakeups = GetParam().eventfd};
  Endpoints requests(options);
  Endpoints replies(options);
  EventLoop loop(LoopOptions{.backend = GetParam().backend});
  roundTrips(loop, requests, replies, 1000);  // warm-up fills the frame arena
  testing::expectNoAllocationsInSteadyState(
      loop,
      [&] {
        int64_t sum = roundTrips(loop, requests, replies, N);
        ASSERT_EQ(sum, int64_t{N} * (N + 1) / 2);
      },
      "100000 awaited round trips");
}

}  // namespace
}  // namespace agate
