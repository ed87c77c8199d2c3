// EventScanner: the reader's side of an event stream over a real shared mapping (a memfd mapped
// writable for the writer and read-only for the reader, as the kernel hands them out): changed
// slots once each, coalescing counts, a writer stuck mid-post, a rewound sequence, garbage words.
#include "agate/client/event_stream.h"

#include <sys/mman.h>
#include <unistd.h>

#include <optional>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace agate::client {
namespace {

constexpr uint32_t SLOTS = 8;
constexpr size_t BYTES = 4096;

// A writer's and a reader's view of one buffer, and a raw view to write what no honest writer
// would (an odd sequence left behind, a sequence going backwards).
class EventScannerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Fd fd(::memfd_create("event-scanner-test", MFD_CLOEXEC));
    ASSERT_TRUE(fd.valid());
    ASSERT_EQ(::ftruncate(fd.get(), BYTES), 0);
    Fd readerFd(::dup(fd.get()));
    void* raw = ::mmap(nullptr, BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    ASSERT_NE(raw, MAP_FAILED);
    raw_ = static_cast<kernel::EventSlot*>(raw);
    auto writer = caps::MappedEventBuffer::tryMap(std::move(fd), BYTES, SLOTS, true, std::nullopt);
    auto reader =
        caps::MappedEventBuffer::tryMap(std::move(readerFd), BYTES, SLOTS, false, std::nullopt);
    ASSERT_TRUE(writer.ok() && reader.ok());
    writer_ = std::move(*writer);
    reader_ = std::move(*reader);
  }
  void TearDown() override { ::munmap(raw_, BYTES); }

  Status scan() {
    updates_.clear();
    stuck_.clear();
    return scanner_.scan(reader_, updates_, stuck_);
  }
  static EventPayload payload(uint64_t first) {
    EventPayload p{};
    for (size_t i = 0; i < p.size(); ++i) p[i] = first + i;
    return p;
  }

  kernel::EventSlot* raw_ = nullptr;
  caps::MappedEventBuffer writer_;
  caps::MappedEventBuffer reader_;
  EventScanner scanner_{SLOTS};
  std::vector<EventUpdate> updates_;
  std::vector<uint32_t> stuck_;
};

TEST_F(EventScannerTest, AnUntouchedBufferHasNoChanges) {
  ASSERT_TRUE(scan().ok());
  EXPECT_TRUE(updates_.empty());
  EXPECT_TRUE(stuck_.empty());
}

TEST_F(EventScannerTest, EachChangedSlotShowsOnceInSlotOrderWithItsNewestValue) {
  writer_.post(5, payload(50));
  writer_.post(1, payload(10));
  writer_.post(5, payload(51));
  ASSERT_TRUE(scan().ok());
  ASSERT_EQ(updates_.size(), 2u);
  EXPECT_EQ(updates_[0].slot, 1u);
  EXPECT_EQ(updates_[0].coalesced, 1u);
  EXPECT_EQ(updates_[0].words, payload(10));
  EXPECT_EQ(updates_[1].slot, 5u);
  EXPECT_EQ(updates_[1].coalesced, 2u);
  EXPECT_EQ(updates_[1].words, payload(51));
  EXPECT_EQ(updates_[1].sequence, 4u);
  // Consumed: nothing until the next post.
  ASSERT_TRUE(scan().ok());
  EXPECT_TRUE(updates_.empty());
}

TEST_F(EventScannerTest, AThousandPostsBetweenScansCoalesceIntoOneUpdateWithTheirCount) {
  writer_.post(3, payload(0));
  ASSERT_TRUE(scan().ok());
  for (uint64_t i = 1; i <= 1000; ++i) writer_.post(3, payload(i));
  ASSERT_TRUE(scan().ok());
  ASSERT_EQ(updates_.size(), 1u);
  EXPECT_EQ(updates_[0].coalesced, 1000u);
  EXPECT_EQ(updates_[0].words, payload(1000));
  EXPECT_EQ(kernel::postsOf(updates_[0].sequence), 1001u);
}

TEST_F(EventScannerTest, AStuckWriterIsReportedOnceAndDoesNotHideTheOtherSlots) {
  writer_.post(2, payload(20));
  ASSERT_TRUE(scan().ok());
  // The writer of slot 2 starts a post and never finishes it; slot 6 carries on.
  raw_[2].sequence.store(3, std::memory_order_release);
  writer_.post(6, payload(60));
  ASSERT_TRUE(scan().ok());
  ASSERT_EQ(stuck_.size(), 1u);
  EXPECT_EQ(stuck_[0], 2u);
  ASSERT_EQ(updates_.size(), 1u);
  EXPECT_EQ(updates_[0].slot, 6u);
  // Reported once: a scan with nothing new finds nothing (the reader would park, not spin).
  ASSERT_TRUE(scan().ok());
  EXPECT_TRUE(stuck_.empty());
  EXPECT_TRUE(updates_.empty());
  // The writer finishes: the slot is read again, counting the post.
  raw_[2].words[0].store(99, std::memory_order_release);
  raw_[2].sequence.store(4, std::memory_order_release);
  ASSERT_TRUE(scan().ok());
  ASSERT_EQ(updates_.size(), 1u);
  EXPECT_EQ(updates_[0].slot, 2u);
  EXPECT_EQ(updates_[0].coalesced, 1u);
  EXPECT_EQ(updates_[0].words[0], 99u);
}

TEST_F(EventScannerTest, ASequenceGoingBackwardsIsAProtocolErrorAndTheSlotKeepsItsPlace) {
  for (int i = 0; i < 3; ++i) writer_.post(4, payload(i));
  ASSERT_TRUE(scan().ok());
  raw_[4].sequence.store(2, std::memory_order_release);  // 3 posts became 1
  Status s = scan();
  EXPECT_EQ(s.code(), Errc::PROTOCOL_ERROR);
  EXPECT_TRUE(updates_.empty());
  // Put back where the reader left it, the slot is unchanged, not new.
  raw_[4].sequence.store(6, std::memory_order_release);
  ASSERT_TRUE(scan().ok());
  EXPECT_TRUE(updates_.empty());
}

TEST_F(EventScannerTest, GarbageWordsAndHugeSequencesAreCopiedAsOpaqueBytes) {
  for (uint32_t slot = 0; slot < SLOTS; ++slot) {
    raw_[slot].sequence.store(~uint64_t{1}, std::memory_order_release);  // even, near the top
    for (auto& w : raw_[slot].words) w.store(~uint64_t{0}, std::memory_order_release);
  }
  ASSERT_TRUE(scan().ok());
  ASSERT_EQ(updates_.size(), SLOTS);
  for (const EventUpdate& u : updates_) {
    EXPECT_EQ(u.coalesced, kernel::postsOf(~uint64_t{1}));
    EXPECT_EQ(u.words[6], ~uint64_t{0});
  }
}

TEST_F(EventScannerTest, ATypedValueRoundTripsThroughASlot) {
  struct Quote {
    double price;
    uint32_t volume;
  };
  EventPayload words{};
  const Quote q{101.5, 7};
  std::memcpy(words.data(), &q, sizeof q);
  writer_.post(0, words);
  ASSERT_TRUE(scan().ok());
  ASSERT_EQ(updates_.size(), 1u);
  EXPECT_EQ(updates_[0].as<Quote>().price, 101.5);
  EXPECT_EQ(updates_[0].as<Quote>().volume, 7u);
}

TEST_F(EventScannerTest, AReaderRacingAWriterSeesOnlyWholePostsAndCountsEveryOne) {
  constexpr uint64_t POSTS = 20000;
  std::thread writer([&] {
    for (uint64_t i = 1; i <= POSTS; ++i) writer_.post(7, payload(i * 100));
  });
  uint64_t counted = 0;
  while (counted < POSTS) {
    ASSERT_TRUE(scan().ok());
    for (const EventUpdate& u : updates_) {
      const uint64_t first = u.words[0];
      for (size_t i = 0; i < u.words.size(); ++i) ASSERT_EQ(u.words[i], first + i) << "torn";
      counted += u.coalesced;
    }
  }
  writer.join();
  EXPECT_EQ(counted, POSTS);
}

}  // namespace
}  // namespace agate::client
