// EventSlot: coalescing and never-torn reads, with a real writer thread (run under TSan too).
#include "agate/kernel/event_slot.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace agate::kernel {
namespace {

// A post whose words are all derived from `n`, so a mix of two posts is detectable.
std::array<uint64_t, EVENT_SLOT_WORDS> wordsFor(uint64_t n) {
  std::array<uint64_t, EVENT_SLOT_WORDS> w{};
  for (size_t i = 0; i < EVENT_SLOT_WORDS; ++i) w[i] = n * 0x9E3779B97F4A7C15ull + i;
  return w;
}

TEST(EventSlot, ManyPostsCoalesceIntoTheLatestAndTheSequenceCountsThem) {
  EventSlot slot;
  for (uint64_t n = 1; n <= 1000; ++n) postEvent(slot, wordsFor(n));
  EventRecord r;
  ASSERT_TRUE(tryReadEvent(slot, r));
  EXPECT_EQ(postsOf(r.sequence), 1000u);
  EXPECT_EQ(r.words, wordsFor(1000));
}

TEST(EventSlot, AReaderFacingAWriterStuckMidPostGivesUpAndKeepsItsRecord) {
  EventSlot slot;
  postEvent(slot, wordsFor(3));
  slot.sequence.store(slot.sequence.load(std::memory_order_relaxed) + 1,
                      std::memory_order_relaxed);  // a writer that died mid-post
  EventRecord r;
  r.words = wordsFor(77);
  EXPECT_FALSE(tryReadEvent(slot, r, 16));
  EXPECT_EQ(r.words, wordsFor(77));
  EXPECT_EQ(r.sequence, 0u);
}

TEST(EventSlot, AReaderRacingAWriterThreadNeverSeesATornOrOlderSlotAndEndsOnTheLatest) {
  constexpr uint64_t POSTS = 100000;
  EventSlot slot;
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (uint64_t n = 1; n <= POSTS; ++n) postEvent(slot, wordsFor(n));
    done.store(true, std::memory_order_release);
  });
  uint64_t lastSeen = 0, reads = 0, torn = 0, backwards = 0;
  for (;;) {
    const bool finished = done.load(std::memory_order_acquire);
    EventRecord r;
    if (tryReadEvent(slot, r)) {
      const uint64_t n = postsOf(r.sequence);
      if (n != 0 && r.words != wordsFor(n)) ++torn;
      if (n < lastSeen) ++backwards;
      lastSeen = n;
      ++reads;
    }
    if (finished) break;
  }
  writer.join();
  EXPECT_EQ(torn, 0u);
  EXPECT_EQ(backwards, 0u);
  EXPECT_EQ(lastSeen, POSTS) << "the read after the writer finished sees its last post";
  EXPECT_GT(reads, 1u);
}

TEST(EventSlot, SlotCountComesFromTheMappedSize) {
  EXPECT_EQ(eventSlotCount(4096), 64u);
  EXPECT_EQ(eventSlotCount(63), 0u);
}

}  // namespace
}  // namespace agate::kernel
