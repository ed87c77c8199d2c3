// A LOCAL channel under real concurrency: several sender threads, one receiver, small rings so
// that claims wrap and senders park. Run under TSan in CI.
#include <gtest/gtest.h>

#include <cstring>
#include <thread>
#include <vector>

#include "agate/runtime/channel.h"

namespace agate {
namespace {

struct Message {
  uint32_t sender;
  uint32_t seq;
};

void runSenders(uint32_t senders, uint32_t perSender, uint64_t capacity, bool shortCommits) {
  auto ch = Channel::create({ChannelScope::LOCAL, capacity, senders}).value();
  Receiver rx = ch->attachReceiver().value();
  std::vector<std::thread> threads;
  for (uint32_t s = 0; s < senders; ++s) {
    Result<Sender> tx = ch->attachSender();
    ASSERT_TRUE(tx.ok());
    threads.emplace_back([s, perSender, shortCommits, tx = std::move(*tx)]() mutable {
      for (uint32_t i = 0; i < perSender; ++i) {
        // Varying reservations; some commits shorter than reserved, some abandoned first.
        size_t reserveBytes = sizeof(Message) + ((i * 13 + s) % 5) * 8;
        if (shortCommits && i % 7 == 0) {
          if (tx.reserve(16).ok()) tx.abandon();
        }
        Result<std::span<std::byte>> buf = tx.reserve(reserveBytes);
        AGATE_ASSERT(buf.ok(), "reserve failed: %s", errcName(buf.code()));
        Message m{s, i};
        std::memcpy(buf->data(), &m, sizeof m);
        tx.commit(shortCommits ? sizeof m : reserveBytes, static_cast<uint16_t>(s));
      }
    });  // the sender detaches when its thread's lambda is destroyed
  }
  std::vector<uint32_t> next(senders, 0);
  uint64_t received = 0;
  for (;;) {
    Result<Frame> f = rx.receive();
    if (f.code() == Errc::DISCONNECTED) break;
    ASSERT_TRUE(f.ok()) << errcName(f.code());
    Message m;
    ASSERT_GE(f->payload.size(), sizeof m);
    std::memcpy(&m, f->payload.data(), sizeof m);
    ASSERT_LT(m.sender, senders);
    ASSERT_EQ(f->tag, m.sender);
    ASSERT_EQ(m.seq, next[m.sender]) << "sender " << m.sender << " out of order or duplicated";
    ++next[m.sender];
    ++received;
    rx.release();
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(received, uint64_t{senders} * perSender);
  for (uint32_t s = 0; s < senders; ++s) EXPECT_EQ(next[s], perSender);
}

TEST(LocalChannelThreads, EveryMessageOfSeveralSendersArrivesOnceAndInOrder) {
  runSenders(4, 5000, 4096, false);
}

TEST(LocalChannelThreads, ShortCommitsAndAbandonsInterleaveSafely) {
  runSenders(3, 4000, 256, true);
}

TEST(LocalChannelThreads, SingleSenderLocalChannelUnderLoad) { runSenders(1, 20000, 512, false); }

}  // namespace
}  // namespace agate
