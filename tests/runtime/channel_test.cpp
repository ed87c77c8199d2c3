// The Channel API in its three scopes: attach limits, detach, blocking calls, batching, and the
// shared-memory checks made when a channel is opened from a descriptor.
#include "agate/runtime/channel.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>

namespace agate {
namespace {

using namespace std::chrono_literals;

std::unique_ptr<Channel> makeChannel(ChannelScope scope, uint64_t cap = 1024,
                                     uint32_t maxSenders = 1) {
  Result<std::unique_ptr<Channel>> c = Channel::create(ChannelOptions{scope, cap, maxSenders});
  AGATE_ASSERT(c.ok(), "%s", c.error().detail);
  return std::move(*c);
}

std::span<const std::byte> bytesOf(const char* s) {
  return {reinterpret_cast<const std::byte*>(s), std::strlen(s)};
}
std::string text(const Frame& f) {
  return {reinterpret_cast<const char*>(f.payload.data()), f.payload.size()};
}

class EveryScope : public ::testing::TestWithParam<ChannelScope> {};
INSTANTIATE_TEST_SUITE_P(Channel, EveryScope,
                         ::testing::Values(ChannelScope::PRIVATE, ChannelScope::LOCAL,
                                           ChannelScope::SHARED),
                         [](const ::testing::TestParamInfo<ChannelScope>& param) {
                           switch (param.param) {
                             case ChannelScope::PRIVATE:
                               return "Private";
                             case ChannelScope::LOCAL:
                               return "Local";
                             case ChannelScope::SHARED:
                               return "Shared";
                           }
                           return "Unknown";
                         });

TEST_P(EveryScope, MessagesArriveInOrderWithTheirTags) {
  auto ch = makeChannel(GetParam());
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.trySend(bytesOf("one"), 1).ok());
  ASSERT_TRUE(tx.trySend(bytesOf("two"), 2).ok());
  Result<Frame> f = rx.tryReceive();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(text(*f), "one");
  EXPECT_EQ(f->tag, 1);
  rx.release();
  f = rx.tryReceive();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(text(*f), "two");
  EXPECT_EQ(f->tag, 2);
  rx.release();
  EXPECT_EQ(rx.tryReceive().code(), Errc::WOULD_BLOCK);
}

TEST_P(EveryScope, SecondReceiverIsRefused) {
  auto ch = makeChannel(GetParam());
  Result<Receiver> first = ch->attachReceiver();
  ASSERT_TRUE(first.ok());
  Result<Receiver> second = ch->attachReceiver();
  ASSERT_EQ(second.code(), Errc::ATTACH_REFUSED);
  EXPECT_NE(std::strstr(second.error().detail, "one receiver"), nullptr);
  // The first receiver still works.
  Sender tx = ch->attachSender().value();
  ASSERT_TRUE(tx.trySend(bytesOf("x")).ok());
  EXPECT_TRUE(first->tryReceive().ok());
}

TEST_P(EveryScope, ASenderKnowsTheLargestFrameUntilItDetaches) {
  auto ch = makeChannel(GetParam());
  Sender tx = ch->attachSender().value();
  EXPECT_EQ(tx.maxPayload(), ch->maxPayload());
  EXPECT_EQ(tx.maxPayload(), ch->capacity() / 2 - 8);
  tx.detach();
  EXPECT_EQ(tx.maxPayload(), 0u);
}

TEST_P(EveryScope, AReceiverKnowsItsRingsCapacityUntilItDetaches) {
  auto ch = makeChannel(GetParam());
  Receiver rx = ch->attachReceiver().value();
  EXPECT_EQ(rx.capacity(), ch->capacity());
  rx.detach();
  EXPECT_EQ(rx.capacity(), 0u);
}

TEST_P(EveryScope, SenderDetachGivesDisconnectedAfterTheRingDrains) {
  auto ch = makeChannel(GetParam());
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.trySend(bytesOf("last words")).ok());
  tx.detach();
  EXPECT_FALSE(tx.attached());
  Result<Frame> f = rx.tryReceive();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(text(*f), "last words");
  rx.release();
  EXPECT_EQ(rx.tryReceive().code(), Errc::DISCONNECTED);
  EXPECT_EQ(rx.receive().code(), Errc::DISCONNECTED);
  EXPECT_EQ(ch->attachSender().code(), Errc::ATTACH_REFUSED) << "detach is final";
}

TEST_P(EveryScope, ReceiverDetachGivesSendersDisconnected) {
  auto ch = makeChannel(GetParam());
  Sender tx = ch->attachSender().value();
  { Receiver rx = ch->attachReceiver().value(); }  // destroyed: detached
  EXPECT_EQ(tx.tryReserve(8).code(), Errc::DISCONNECTED);
  EXPECT_EQ(tx.send(bytesOf("x")).code(), Errc::DISCONNECTED);
  EXPECT_EQ(ch->attachReceiver().code(), Errc::ATTACH_REFUSED);
}

TEST_P(EveryScope, OversizeMessageIsRefusedWithAClearDetail) {
  auto ch = makeChannel(GetParam(), 1024);
  Sender tx = ch->attachSender().value();
  EXPECT_EQ(ch->maxPayload(), 504u);
  Result<std::span<std::byte>> r = tx.tryReserve(505);
  ASSERT_EQ(r.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_NE(std::strstr(r.error().detail, "largest frame"), nullptr);
  EXPECT_TRUE(tx.tryReserve(504).ok()) << "a failed reserve leaves the sender usable";
}

TEST_P(EveryScope, FullChannelRefusesAndKeepsContents) {
  auto ch = makeChannel(GetParam(), 256);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  int sent = 0;
  while (tx.trySend(bytesOf("0123456789abcdefghijklm"), static_cast<uint16_t>(sent)).ok()) ++sent;
  EXPECT_EQ(sent, 7) << "(capacity - 8) / 32 frames: the last 8 bytes are the terminator";
  EXPECT_EQ(tx.tryReserve(24).code(), Errc::WOULD_BLOCK);
  for (int i = 0; i < sent; ++i) {
    Result<Frame> f = rx.tryReceive();
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f->tag, i);
    EXPECT_EQ(text(*f), "0123456789abcdefghijklm");
    rx.release();
  }
}

TEST_P(EveryScope, DeferredCommitsBecomeVisibleOnFlush) {
  auto ch = makeChannel(GetParam());
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  for (uint16_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(tx.tryReserve(8).ok());
    tx.commitDeferred(8, i);
  }
  EXPECT_EQ(rx.tryReceive().code(), Errc::WOULD_BLOCK);
  tx.flush();
  for (uint16_t i = 0; i < 3; ++i) {
    Result<Frame> f = rx.tryReceive();
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f->tag, i);
    rx.release();
  }
}

// commitWithoutRing publishes at once: a polling receiver takes the frames before any ring.
// Only scopes with doorbells have a ring to owe.
TEST_P(EveryScope, CommitsWithoutRingAreVisibleAtOnceAndOweOneRing) {
  auto ch = makeChannel(GetParam());
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  const bool bells = GetParam() != ChannelScope::PRIVATE;
  for (uint16_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(tx.tryReserve(8).ok());
    tx.commitWithoutRing(8, i);
    Result<Frame> f = rx.tryReceive();
    ASSERT_TRUE(f.ok()) << i;
    EXPECT_EQ(f->tag, i);
    rx.release();
  }
  EXPECT_EQ(tx.ringIsPending(), bells);
  EXPECT_EQ(tx.ringPending(), bells);
  EXPECT_FALSE(tx.ringIsPending());
  EXPECT_FALSE(tx.ringPending()) << "one ring for all three";
  EXPECT_EQ(tx.wakeCount(), 0u) << "nobody was parked: no FUTEX_WAKE";
}

TEST_P(EveryScope, AbandonedReservationIsNeverDelivered) {
  auto ch = makeChannel(GetParam());
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.tryReserve(100).ok());
  tx.abandon();
  ASSERT_TRUE(tx.trySend(bytesOf("kept"), 7).ok());
  Result<Frame> f = rx.tryReceive();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(text(*f), "kept");
}

TEST(ChannelAttach, PrivateAndSharedTakeOneSender) {
  for (ChannelScope scope : {ChannelScope::PRIVATE, ChannelScope::SHARED}) {
    auto ch = makeChannel(scope);
    Result<Sender> first = ch->attachSender();
    ASSERT_TRUE(first.ok());
    Result<Sender> second = ch->attachSender();
    ASSERT_EQ(second.code(), Errc::ATTACH_REFUSED);
    EXPECT_NE(std::strstr(second.error().detail, "one sender"), nullptr);
  }
}

TEST(ChannelAttach, LocalTakesUpToMaxSenders) {
  auto ch = makeChannel(ChannelScope::LOCAL, 1024, 3);
  std::vector<Sender> senders;
  for (int i = 0; i < 3; ++i) senders.push_back(ch->attachSender().value());
  Result<Sender> fourth = ch->attachSender();
  ASSERT_EQ(fourth.code(), Errc::ATTACH_REFUSED);
  EXPECT_NE(std::strstr(fourth.error().detail, "maxSenders"), nullptr);
  senders.pop_back();  // one detaches: room for another, the channel stays open
  EXPECT_TRUE(ch->attachSender().ok());
}

TEST(ChannelAttach, ReceiverSeesDisconnectedOnlyAfterTheLastSenderDetaches) {
  auto ch = makeChannel(ChannelScope::LOCAL, 1024, 2);
  Sender a = ch->attachSender().value();
  Sender b = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  a.detach();
  EXPECT_EQ(rx.tryReceive().code(), Errc::WOULD_BLOCK);
  b.detach();
  EXPECT_EQ(rx.tryReceive().code(), Errc::DISCONNECTED);
}

TEST(ChannelCreate, BadOptionsAreRefused) {
  EXPECT_EQ(Channel::create({ChannelScope::LOCAL, 1000, 1}).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(Channel::create({ChannelScope::LOCAL, 32, 1}).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(Channel::create({ChannelScope::LOCAL, 1024, 0}).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(Channel::create({ChannelScope::SHARED, 1024, 2}).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(Channel::create({ChannelScope::PRIVATE, 1024, 2}).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(makeChannel(ChannelScope::LOCAL)->exportFd().code(), Errc::INVALID_ARGUMENT);
}

TEST(ChannelBlocking, PrivateBlockingCallsReturnAtOnce) {
  auto ch = makeChannel(ChannelScope::PRIVATE, 64);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  EXPECT_EQ(rx.receive().code(), Errc::WOULD_BLOCK);
  ASSERT_TRUE(tx.send(bytesOf("0123456789abcdefghijklm")).ok());
  ASSERT_TRUE(tx.send(bytesOf("0123456789abcde")).ok());
  EXPECT_EQ(tx.reserve(24).code(), Errc::WOULD_BLOCK);
}

TEST(ChannelBlocking, ReceiveTimesOut) {
  auto ch = makeChannel(ChannelScope::LOCAL);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(rx.receive(WaitPolicy{100, 30ms, 10ms}).code(), Errc::TIMED_OUT);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 30ms);
  EXPECT_GE(rx.parkCount(), 1u);
}

TEST(ChannelBlocking, ParkedReceiverIsWokenBySend) {
  auto ch = makeChannel(ChannelScope::LOCAL);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  std::thread sender([&] {
    std::this_thread::sleep_for(50ms);
    ASSERT_TRUE(tx.send(bytesOf("wake up")).ok());
  });
  // One long park slice: only the doorbell can end it early.
  Result<Frame> f = rx.receive(WaitPolicy{0, 10s, 10s});
  sender.join();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(text(*f), "wake up");
  EXPECT_GE(rx.parkCount(), 1u);
  EXPECT_EQ(tx.wakeCount(), 1u);
}

// A receiver parked on the doorbell sees a commitWithoutRing() only at the ring it is owed.
TEST(ChannelBlocking, AParkedReceiverWakesAtThePendingRingNotAtTheCommit) {
  auto ch = makeChannel(ChannelScope::LOCAL);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  std::atomic<bool> got{false};
  std::thread receiver([&] {
    Result<Frame> f = rx.receive(WaitPolicy{0, 10s, 10s});  // one long park slice
    EXPECT_TRUE(f.ok());
    if (f) {
      EXPECT_EQ(text(*f), "later");
    }
    got.store(true, std::memory_order_release);
  });
  while (rx.parkCount() == 0) std::this_thread::sleep_for(1ms);  // the receiver is parked
  Result<std::span<std::byte>> frame = tx.tryReserve(5);
  ASSERT_TRUE(frame.ok());
  std::memcpy(frame->data(), "later", 5);
  tx.commitWithoutRing(5);
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(got.load(std::memory_order_acquire)) << "the commit rang the doorbell";
  EXPECT_TRUE(tx.ringPending());
  receiver.join();
  EXPECT_TRUE(got.load(std::memory_order_acquire));
  EXPECT_EQ(tx.wakeCount(), 1u);
}

// A sender that filled the ring with commitWithoutRing() and then blocks for space rings what it
// owes first: else the parked receiver never drains the ring and both sleep.
TEST(ChannelBlocking, ABlockingSendOnARingFilledWithoutRingsRingsFirst) {
  auto ch = makeChannel(ChannelScope::LOCAL, 256);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  std::atomic<int> received{0};
  std::thread receiver([&] {
    for (;;) {
      Result<Frame> f = rx.receive(WaitPolicy{0, 10s, 10s});  // one long park slice
      if (!f) break;
      rx.release();
      received.fetch_add(1, std::memory_order_relaxed);
    }
  });
  while (rx.parkCount() == 0) std::this_thread::sleep_for(1ms);  // the receiver is parked
  int sent = 0;
  for (;;) {
    Result<std::span<std::byte>> frame = tx.tryReserve(8);
    if (!frame) break;
    tx.commitWithoutRing(8);
    ++sent;
  }
  ASSERT_TRUE(tx.ringIsPending());
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(tx.send(bytesOf("8 bytes."), 0, WaitPolicy{0, 10s, 10s}).ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "woken by the space, not a slice";
  tx.detach();
  receiver.join();
  EXPECT_EQ(received.load(), sent + 1);
}

// LOCAL with several senders (the multi-producer ring): each sender owes its own ring, and a
// receiver parked on the doorbell hears of the frames once the senders ring.
TEST(ChannelBlocking, SeveralSendersWithoutRingEachRingWhatTheyPublished) {
  auto ch = makeChannel(ChannelScope::LOCAL, 4096, 2);
  Sender a = ch->attachSender().value();
  Sender b = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  std::atomic<int> received{0};
  std::thread receiver([&] {
    while (received.load(std::memory_order_relaxed) < 2) {
      Result<Frame> f = rx.receive(WaitPolicy{0, 10s, 10s});  // one long park slice
      if (!f) break;
      rx.release();
      received.fetch_add(1, std::memory_order_relaxed);
    }
  });
  while (rx.parkCount() == 0) std::this_thread::sleep_for(1ms);  // the receiver is parked
  // (Commits publish in claim order, a later claim's commit waiting for the earlier ones, so
  // one thread commits each claim before the next.)
  ASSERT_TRUE(a.tryReserve(8).ok());
  a.commitWithoutRing(8, 1);
  ASSERT_TRUE(b.tryReserve(8).ok());
  b.commitWithoutRing(8, 2);
  EXPECT_TRUE(a.ringIsPending());
  EXPECT_TRUE(b.ringIsPending());
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(received.load(), 0) << "no ring yet: the parked receiver sleeps on";
  EXPECT_TRUE(b.ringPending());
  EXPECT_TRUE(a.ringPending());
  receiver.join();
  EXPECT_EQ(received.load(), 2);
}

// Moving a Sender onto one that owes a ring rings the old debt (the destination detaches
// first) and carries the source's.
TEST(ChannelBlocking, MovingOntoASenderThatOwesARingRingsItsParkedReceiver) {
  auto first = makeChannel(ChannelScope::LOCAL);
  auto second = makeChannel(ChannelScope::LOCAL);
  Sender tx = first->attachSender().value();
  Receiver rx = first->attachReceiver().value();
  std::atomic<bool> got{false};
  std::thread receiver([&] {
    Result<Frame> f = rx.receive(WaitPolicy{0, 10s, 10s});
    EXPECT_TRUE(f.ok());
    got.store(true, std::memory_order_release);
  });
  while (rx.parkCount() == 0) std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(tx.tryReserve(8).ok());
  tx.commitWithoutRing(8);
  Sender other = second->attachSender().value();
  ASSERT_TRUE(other.tryReserve(8).ok());
  other.commitWithoutRing(8);
  const auto start = std::chrono::steady_clock::now();
  tx = std::move(other);  // tx detaches from `first`, ringing what it owed there
  receiver.join();
  EXPECT_TRUE(got.load(std::memory_order_acquire));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "woken by the ring, not a slice";
  EXPECT_TRUE(tx.ringIsPending()) << "the debt on `second` moved with the endpoint";
  EXPECT_FALSE(other.ringIsPending());
}

// commit(), flush() and detach() ring what commitWithoutRing() left pending.
TEST(ChannelBlocking, CommitFlushAndDetachRingWhatWasPending) {
  auto ch = makeChannel(ChannelScope::LOCAL);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.tryReserve(8).ok());
  tx.commitWithoutRing(8);
  ASSERT_TRUE(tx.tryReserve(8).ok());
  tx.commit(8);
  EXPECT_FALSE(tx.ringIsPending()) << "commit() rang for both";
  ASSERT_TRUE(tx.tryReserve(8).ok());
  tx.commitWithoutRing(8);
  tx.flush();
  EXPECT_FALSE(tx.ringIsPending()) << "flush() rang";
  ASSERT_TRUE(tx.tryReserve(8).ok());
  tx.commitWithoutRing(8);
  Sender moved = std::move(tx);
  EXPECT_TRUE(moved.ringIsPending()) << "the debt moves with the endpoint";
  EXPECT_FALSE(tx.ringIsPending());
  moved.detach();
  EXPECT_FALSE(moved.ringIsPending());
  EXPECT_FALSE(moved.ringPending()) << "a detached sender rings nothing";
  int frames = 0;
  while (rx.tryReceive().ok()) {
    rx.release();
    ++frames;
  }
  EXPECT_EQ(frames, 4);
}

TEST(ChannelBlocking, ParkedSenderIsWokenByRelease) {
  auto ch = makeChannel(ChannelScope::LOCAL, 64);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.send(bytesOf("0123456789abcdefghijklm")).ok());  // 32 of 64 bytes
  ASSERT_TRUE(tx.send(bytesOf("0123456789abcde")).ok());  // 24 more and the terminator: full
  std::thread receiver([&] {
    std::this_thread::sleep_for(50ms);
    ASSERT_TRUE(rx.tryReceive().ok());
    rx.release();
  });
  Status s = tx.send(bytesOf("third"), 0, WaitPolicy{0, 10s, 10s});
  receiver.join();
  EXPECT_TRUE(s.ok());
  EXPECT_GE(tx.parkCount(), 1u);
}

// A sender parked on a full ring of 16-byte frames, and a receiver that frees space with
// releaseDeferred(): the sender is only woken by the flush passed in `flush` (less than a
// quarter of the ring is released before it).
constexpr size_t SMALL_RING = 256;  // a quarter is four 16-byte frames

// Fills `tx`'s ring with frames of 8 payload bytes (16 with the header); returns how many.
int fillWithSmallFrames(Sender& tx) {
  int n = 0;
  while (tx.trySend(bytesOf("8 bytes.")).ok()) ++n;
  return n;
}

// `wakesAfterFlush`: the FUTEX_WAKEs the receiver issued in all, or 0 for "at least one" (a flush
// that releases more than a quarter may ring again before the woken sender withdrew).
void expectDeferredReleaseWakesOnlyOnFlush(const std::function<void(Receiver&)>& flush,
                                           uint64_t wakesAfterFlush = 1) {
  auto ch = makeChannel(ChannelScope::LOCAL, SMALL_RING);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_GE(fillWithSmallFrames(tx), 8);
  ASSERT_EQ(tx.tryReserve(8).code(), Errc::WOULD_BLOCK);
  std::atomic<bool> sent{false};
  std::thread sender([&] {
    // One long park slice: only a doorbell ring can end it early.
    EXPECT_TRUE(tx.send(bytesOf("third"), 0, WaitPolicy{0, 10s, 10s}).ok());
    sent.store(true, std::memory_order_release);
  });
  while (tx.parkCount() == 0) std::this_thread::sleep_for(1ms);  // the sender is parked
  ASSERT_TRUE(rx.tryReceive().ok());
  rx.releaseDeferred();
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(sent.load(std::memory_order_acquire)) << "a deferred release rang the doorbell";
  EXPECT_EQ(rx.wakeCount(), 0u);
  flush(rx);
  sender.join();
  EXPECT_TRUE(sent.load(std::memory_order_acquire));
  if (wakesAfterFlush != 0) {
    EXPECT_EQ(rx.wakeCount(), wakesAfterFlush);
  } else {
    EXPECT_GE(rx.wakeCount(), 1u);
  }
}

TEST(ChannelBlocking, DeferredReleaseWakesAParkedSenderOnlyAtFlush) {
  expectDeferredReleaseWakesOnlyOnFlush([](Receiver& rx) { rx.flushReleases(); });
}

TEST(ChannelBlocking, TryReceiveOnAnEmptyRingFlushesDeferredReleases) {
  expectDeferredReleaseWakesOnlyOnFlush(
      [](Receiver& rx) {
        // Drains the ring: quarters publish as they fill, the empty ring flushes the rest.
        while (rx.tryReceive().ok()) rx.releaseDeferred();
        EXPECT_EQ(rx.tryReceive().code(), Errc::WOULD_BLOCK);
      },
      0);
}

// Deferred releases that add up to a quarter of the ring publish head and ring the space
// doorbell at once: a sender parked on a flooded ring refills it while the receiver drains the
// rest, rather than once the ring is empty.
TEST(ChannelBlocking, DeferredReleasesOfAQuarterRingWakeAParkedSenderWithoutAFlush) {
  auto ch = makeChannel(ChannelScope::LOCAL, SMALL_RING);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  const int frames = fillWithSmallFrames(tx);
  ASSERT_GE(frames, 8);
  std::atomic<bool> sent{false};
  std::thread sender([&] {
    EXPECT_TRUE(tx.send(bytesOf("third"), 0, WaitPolicy{0, 10s, 10s}).ok());
    sent.store(true, std::memory_order_release);
  });
  while (tx.parkCount() == 0) std::this_thread::sleep_for(1ms);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(rx.tryReceive().ok());
    rx.releaseDeferred();
  }
  EXPECT_EQ(rx.wakeCount(), 0u) << "three frames are less than a quarter";
  ASSERT_TRUE(rx.tryReceive().ok());
  rx.releaseDeferred();  // the fourth makes a quarter: published and rung
  sender.join();
  EXPECT_TRUE(sent.load(std::memory_order_acquire));
  EXPECT_EQ(rx.wakeCount(), 1u);
  // Nothing is left deferred: a flush now rings nothing more.
  rx.flushReleases();
  EXPECT_EQ(rx.wakeCount(), 1u);
  int received = 4;
  while (rx.tryReceive().ok()) {
    rx.release();
    ++received;
  }
  EXPECT_EQ(received, frames + 1) << "every frame, and the parked sender's, arrived once";
}

TEST(ChannelBlocking, FlushWithNothingDeferredRingsNothing) {
  auto ch = makeChannel(ChannelScope::LOCAL);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.trySend(bytesOf("one")).ok());
  ASSERT_TRUE(rx.tryReceive().ok());
  rx.release();
  rx.flushReleases();
  EXPECT_EQ(rx.wakeCount(), 0u);
}

TEST(ChannelBlocking, ParkedReceiverIsWokenByDetach) {
  auto ch = makeChannel(ChannelScope::LOCAL);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  std::thread sender([&] {
    std::this_thread::sleep_for(50ms);
    tx.detach();
  });
  Result<Frame> f = rx.receive(WaitPolicy{0, 10s, 10s});
  sender.join();
  EXPECT_EQ(f.code(), Errc::DISCONNECTED);
}

TEST(ChannelBlocking, BusyPathRingsNoDoorbell) {
  auto ch = makeChannel(ChannelScope::LOCAL);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(tx.trySend(bytesOf("busy")).ok());
    ASSERT_TRUE(rx.tryReceive().ok());
    rx.release();
  }
  EXPECT_EQ(tx.wakeCount(), 0u);
  EXPECT_EQ(rx.wakeCount(), 0u);
}

TEST(ChannelProtocol, ForgedFrameHeaderPoisonsTheReceiverForGood) {
  auto ch = makeChannel(ChannelScope::SHARED, 1024);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.trySend(bytesOf("fine")).ok());
  ASSERT_TRUE(rx.tryReceive().ok());
  rx.release();
  auto* control = reinterpret_cast<RingControl*>(ch->memory().data());
  control->tail = 12345;  // a forged tail changes nothing: the receiver polls frame headers
  EXPECT_EQ(rx.tryReceive().code(), Errc::WOULD_BLOCK);
  // The next header position (16) gets a frame longer than the ring.
  auto* next = reinterpret_cast<uint64_t*>(ch->memory().data() + RING_CONTROL_BYTES + 16);
  std::atomic_ref<uint64_t>(*next).store(encodeFrameHeader(4096, 0, 0, frameStamp(16, 10)),
                                         std::memory_order_release);
  Result<Frame> f = rx.tryReceive();
  ASSERT_EQ(f.code(), Errc::PROTOCOL_ERROR);
  EXPECT_NE(std::strstr(f.error().detail, "half the ring"), nullptr);
  // Even a sane frame afterwards does not revive the channel.
  std::atomic_ref<uint64_t>(*next).store(encodeFrameHeader(0, 0, 0, frameStamp(16, 10)),
                                         std::memory_order_release);
  EXPECT_EQ(rx.tryReceive().code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(rx.receive().code(), Errc::PROTOCOL_ERROR);
}

TEST(ChannelProtocol, ForgedHeadPoisonsTheSenderForGood) {
  auto ch = makeChannel(ChannelScope::SHARED, 64);
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  ASSERT_TRUE(tx.trySend(bytesOf("0123456789abcdefghijklm")).ok());
  ASSERT_TRUE(tx.trySend(bytesOf("0123456789abcde")).ok());
  auto* control = reinterpret_cast<RingControl*>(ch->memory().data());
  control->head = 1 << 20;  // beyond the published tail
  EXPECT_EQ(tx.tryReserve(8).code(), Errc::PROTOCOL_ERROR);
  control->head = 32;
  EXPECT_EQ(tx.reserve(8).code(), Errc::PROTOCOL_ERROR);
}

TEST(ChannelDoorbells, EventLoopsCanReachTheFutexWords) {
  auto local = makeChannel(ChannelScope::LOCAL);
  Receiver rx = local->attachReceiver().value();
  Sender tx = local->attachSender().value();
  Doorbell* data = rx.dataDoorbell();
  Doorbell* space = tx.spaceDoorbell();
  ASSERT_NE(data, nullptr);
  ASSERT_NE(space, nullptr);
  EXPECT_FALSE(data->processShared());
  auto* control = reinterpret_cast<RingControl*>(local->memory().data());
  EXPECT_EQ(data->futexWord(), &control->dataBell.seq);
  EXPECT_EQ(space->futexWord(), &control->spaceBell.seq);
  auto shared = makeChannel(ChannelScope::SHARED);
  Receiver sharedRx = shared->attachReceiver().value();
  Doorbell* sharedBell = sharedRx.dataDoorbell();
  ASSERT_NE(sharedBell, nullptr);
  EXPECT_TRUE(sharedBell->processShared());
  auto priv = makeChannel(ChannelScope::PRIVATE);
  EXPECT_EQ(priv->attachReceiver().value().dataDoorbell(), nullptr);
}

TEST(ChannelDoorbells, EventfdWaiterIsSignalledAndTheBusyPathWritesNoEventfd) {
  auto ch = Channel::create({ChannelScope::LOCAL, 1024, 1, true}).value();
  Sender tx = ch->attachSender().value();
  Receiver rx = ch->attachReceiver().value();
  Doorbell* bell = rx.dataDoorbell();
  ASSERT_NE(bell, nullptr);
  ASSERT_NE(bell->eventFd(), -1);
  pollfd p{bell->eventFd(), POLLIN, 0};
  ASSERT_TRUE(tx.trySend(bytesOf("unannounced")).ok());
  EXPECT_EQ(::poll(&p, 1, 0), 0) << "nobody announced: no eventfd write";
  ASSERT_TRUE(rx.tryReceive().ok());
  rx.release();
  // An event loop's wait: announce via eventfd, re-check, poll the descriptor.
  bell->announce(true);
  EXPECT_EQ(rx.tryReceive().code(), Errc::WOULD_BLOCK);
  std::thread sender([&] { ASSERT_TRUE(tx.trySend(bytesOf("announced")).ok()); });
  EXPECT_EQ(::poll(&p, 1, 5000), 1);
  sender.join();
  uint64_t count = 0;
  EXPECT_EQ(::read(bell->eventFd(), &count, sizeof count), 8);
  EXPECT_EQ(count, 1u);
  bell->cancel(true);
  Result<Frame> f = rx.tryReceive();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(text(*f), "announced");
  EXPECT_EQ(rx.parkCount(), 0u) << "an eventfd waiter never enters FUTEX_WAIT";
}

TEST(ChannelDoorbells, SharedEventfdsTravelWithTheMemfd) {
  auto ch = Channel::create({ChannelScope::SHARED, 1024, 1, true}).value();
  Result<std::unique_ptr<Channel>> peer = Channel::openShared(
      ch->exportFd().value(), ch->exportDataEventFd().value(), ch->exportSpaceEventFd().value());
  ASSERT_TRUE(peer.ok());
  Receiver rx = (*peer)->attachReceiver().value();
  Sender tx = ch->attachSender().value();
  rx.dataDoorbell()->announce(true);
  ASSERT_TRUE(tx.trySend(bytesOf("x")).ok());
  pollfd p{rx.dataDoorbell()->eventFd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 5000), 1);
  rx.dataDoorbell()->cancel(true);
  EXPECT_EQ(makeChannel(ChannelScope::SHARED)->exportDataEventFd().code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(Channel::create({ChannelScope::PRIVATE, 1024, 1, true}).code(), Errc::INVALID_ARGUMENT);
}

// ---- opening a shared channel from a descriptor ----

TEST(ChannelOpenShared, ExportedChannelOpensAndCarriesMessages) {
  auto ch = makeChannel(ChannelScope::SHARED, 4096);
  Result<Fd> fd = ch->exportFd();
  ASSERT_TRUE(fd.ok());
  Result<std::unique_ptr<Channel>> peer = Channel::openShared(std::move(*fd));
  ASSERT_TRUE(peer.ok());
  EXPECT_EQ((*peer)->capacity(), 4096u);
  Sender tx = ch->attachSender().value();
  Result<Sender> second = (*peer)->attachSender();
  EXPECT_EQ(second.code(), Errc::ATTACH_REFUSED) << "the sender limit holds across mappings";
  Receiver rx = (*peer)->attachReceiver().value();
  ASSERT_TRUE(tx.trySend(bytesOf("across")).ok());
  Result<Frame> f = rx.tryReceive();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(text(*f), "across");
}

TEST(ChannelOpenShared, UnsealedMemfdIsRefused) {
  Fd fd(::memfd_create("unsealed", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_TRUE(fd.valid());
  ASSERT_EQ(::ftruncate(fd.get(), RING_CONTROL_BYTES + 1024), 0);
  Result<std::unique_ptr<Channel>> ch = Channel::openShared(std::move(fd));
  ASSERT_EQ(ch.code(), Errc::INVALID_ARGUMENT);
  EXPECT_NE(std::strstr(ch.error().detail, "sealed"), nullptr);
}

TEST(ChannelOpenShared, PartlySealedMemfdIsRefused) {
  Fd fd(::memfd_create("half-sealed", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_EQ(::ftruncate(fd.get(), RING_CONTROL_BYTES + 1024), 0);
  ASSERT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_GROW), 0);  // shrink still possible
  EXPECT_EQ(Channel::openShared(std::move(fd)).code(), Errc::INVALID_ARGUMENT);
}

TEST(ChannelOpenShared, NonMemfdDescriptorIsRefused) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  Fd keep(p[1]);
  EXPECT_EQ(Channel::openShared(Fd(p[0])).code(), Errc::INVALID_ARGUMENT);
}

TEST(ChannelOpenShared, WrongHeaderIsRefused) {
  auto corrupt = [](auto edit) {
    Result<SharedMemory> mem = SharedMemory::createShared(RING_CONTROL_BYTES + 1024, "t");
    AGATE_ASSERT(mem.ok(), "createShared");
    initRing(mem->data(), 1024);
    edit(*reinterpret_cast<RingControl*>(mem->data()));
    return Channel::openShared(mem->duplicateFd().value()).code();
  };
  EXPECT_EQ(corrupt([](RingControl&) {}), Errc::OK);
  EXPECT_EQ(corrupt([](RingControl& c) { c.header.magic = 0; }), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(corrupt([](RingControl& c) { c.header.version = 99; }), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(corrupt([](RingControl& c) { c.header.capacity = 2048; }), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(corrupt([](RingControl& c) { c.header.capacity = 512; }), Errc::PROTOCOL_ERROR);
}

TEST(SharedMemory, CreatedMemfdCarriesAllSeals) {
  Result<SharedMemory> mem = SharedMemory::createShared(4096, "t");
  ASSERT_TRUE(mem.ok());
  int seals = ::fcntl(mem->fd(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL),
            F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL);
  EXPECT_NE(::ftruncate(mem->fd(), 100), 0) << "a sealed memfd cannot shrink";
}

TEST(SharedMemory, OpenChecksTheExpectedSize) {
  Result<SharedMemory> mem = SharedMemory::createShared(8192, "t");
  ASSERT_TRUE(mem.ok());
  EXPECT_EQ(SharedMemory::openShared(mem->duplicateFd().value(), 4096).code(),
            Errc::INVALID_ARGUMENT);
  Result<SharedMemory> same = SharedMemory::openShared(mem->duplicateFd().value(), 8192);
  ASSERT_TRUE(same.ok());
  mem->data()[100] = std::byte{42};
  EXPECT_EQ(same->data()[100], std::byte{42}) << "both mappings show the same memory";
}

}  // namespace
}  // namespace agate
