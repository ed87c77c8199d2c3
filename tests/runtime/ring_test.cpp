// The ring's frame format, wrap-around and every protocol violation the consumer and producer
// detect, driven directly on a RingView so that tests can forge the control block and frames.
#include "agate/runtime/ring.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

namespace agate {
namespace {

constexpr uint64_t CAP = 256;

struct TestRing {
  alignas(64) std::byte memory[RING_CONTROL_BYTES + CAP] = {};
  RingView view;
  TestRing() {
    initRing(memory, CAP);
    view = RingView::of(memory, CAP);
  }
  RingControl& control() { return *view.control; }
  uint64_t& headerAt(uint64_t offset) { return *reinterpret_cast<uint64_t*>(view.data + offset); }
  std::vector<std::byte> snapshot() const { return {memory, memory + sizeof memory}; }
};

// Fills `n` bytes with a pattern derived from `seed`.
void fill(std::span<std::byte> s, uint32_t seed) {
  for (size_t i = 0; i < s.size(); ++i) s[i] = std::byte(static_cast<uint8_t>(seed * 31 + i));
}
bool matches(std::span<const std::byte> s, uint32_t seed) {
  for (size_t i = 0; i < s.size(); ++i)
    if (s[i] != std::byte(static_cast<uint8_t>(seed * 31 + i))) return false;
  return true;
}

// Frames of every size, some published one by one and some in deferred runs, lap after lap;
// the consumer releases some frames at once and some lazily.
template <class Sync>
void runManyLaps() {
  TestRing r;
  RingProducer<Sync> producer(r.view);
  RingConsumer<Sync> consumer(r.view);
  uint32_t sent = 0, received = 0;
  const uint64_t maxPayload = r.view.maxPayload();
  for (int round = 0; round < 20000; ++round) {
    // Sizes sweep every length up to the maximum so pad frames land at every offset.
    size_t size = (sent * 7) % (maxPayload + 1);
    Result<std::span<std::byte>> buf = producer.tryReserve(size);
    if (buf.ok()) {
      ASSERT_EQ(buf->size(), size);
      ASSERT_EQ(reinterpret_cast<uintptr_t>(buf->data()) % 8, 0u);
      fill(*buf, sent);
      producer.commit(size, static_cast<uint16_t>(sent), round % 5 < 2);
      ++sent;
      if (sent % 3 != 0) continue;  // let the ring fill up now and then
    } else {
      ASSERT_EQ(buf.code(), Errc::WOULD_BLOCK);
    }
    producer.publish();
    for (;;) {
      Result<Frame> f = consumer.tryPeek();
      if (f.code() == Errc::WOULD_BLOCK) break;
      ASSERT_TRUE(f.ok()) << errcName(f.code());
      ASSERT_EQ(f->tag, static_cast<uint16_t>(received));
      ASSERT_EQ(f->payload.size(), (received * 7) % (maxPayload + 1));
      ASSERT_TRUE(matches(f->payload, received));
      ++received;
      if (received % 4 == 0)
        consumer.release();
      else
        consumer.releaseLazily();
    }
    consumer.publishHead();
  }
  producer.publish();
  while (consumer.tryPeek().ok()) {
    ++received;
    consumer.release();
  }
  EXPECT_EQ(sent, received);
  EXPECT_GT(r.control().tail / CAP, 1000u) << "the test must wrap the ring many times";
}

TEST(Ring, FramesArriveInOrderOverManyLapsWithPadFrames) { runManyLaps<AtomicSync>(); }
TEST(Ring, PlainRingBehavesLikeTheAtomicOne) { runManyLaps<PlainSync>(); }

TEST(Ring, FullRingRefusesReserveAndKeepsContents) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  int frames = 0;
  for (;; ++frames) {
    Result<std::span<std::byte>> buf = producer.tryReserve(24);
    if (!buf) {
      EXPECT_EQ(buf.code(), Errc::WOULD_BLOCK);
      break;
    }
    fill(*buf, frames);
    producer.commit(24, 1, true);
  }
  // A ring holds capacity - 8 bytes of frames: the last 8 are the terminator behind the newest.
  EXPECT_EQ(frames, static_cast<int>((CAP - 8) / 32));
  ASSERT_TRUE(producer.tryReserve(16).ok()) << "24 bytes are left before the terminator";
  producer.commit(16, 1, true);
  auto before = r.snapshot();
  EXPECT_EQ(producer.tryReserve(0).code(), Errc::WOULD_BLOCK);
  EXPECT_EQ(producer.tryReserve(24).code(), Errc::WOULD_BLOCK);
  EXPECT_EQ(r.snapshot(), before);
  EXPECT_FALSE(producer.hasReservation());
}

TEST(Ring, OversizeMessageIsRefusedAndTheLargestFits) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  Result<std::span<std::byte>> big = producer.tryReserve(r.view.maxPayload() + 1);
  ASSERT_EQ(big.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_NE(std::strstr(big.error().detail, "capacity/2"), nullptr);
  EXPECT_FALSE(producer.hasReservation());
  ASSERT_TRUE(producer.tryReserve(r.view.maxPayload()).ok());
}

TEST(Ring, ReservedBytesAreZeroedEvenOverOldFrames) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  for (int i = 0; i < 40; ++i) {
    Result<std::span<std::byte>> buf = producer.tryReserve(100);
    ASSERT_TRUE(buf.ok());
    for (std::byte b : *buf) ASSERT_EQ(b, std::byte{0});
    std::memset(buf->data(), 0xff, buf->size());
    producer.commit(100, 0, true);
    ASSERT_TRUE(consumer.tryPeek().ok());
    consumer.release();
  }
}

TEST(Ring, AbandonedReservationPublishesNothing) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  ASSERT_TRUE(producer.tryReserve(40).ok());
  producer.abandon();
  EXPECT_EQ(r.control().tail, 0u);
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK);
}

TEST(Ring, UnpublishedCommitStaysInvisibleUntilPublish) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  ASSERT_TRUE(producer.tryReserve(8).ok());
  producer.commit(8, 1, false);
  ASSERT_TRUE(producer.tryReserve(8).ok());
  producer.commit(8, 2, false);
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK);
  EXPECT_TRUE(producer.publish());
  EXPECT_EQ(consumer.tryPeek()->tag, 1);
  consumer.release();
  EXPECT_EQ(consumer.tryPeek()->tag, 2);
}

TEST(Ring, ShortCommitShrinksTheFrame) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  ASSERT_TRUE(producer.tryReserve(100).ok());
  producer.commit(5, 9, true);
  EXPECT_EQ(r.control().tail, 16u);
  Result<Frame> f = consumer.tryPeek();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->payload.size(), 5u);
}

TEST(Ring, PayloadOfAnEarlierLapIsNeverTakenForAHeader) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  // Lap 0: a payload whose every word is a well-formed header for lap 1 at its own position.
  Result<std::span<std::byte>> buf = producer.tryReserve(120);
  ASSERT_TRUE(buf.ok());
  for (uint64_t at = 8; at < 128; at += 8) {
    uint64_t forged = encodeFrameHeader(8, 0xbeef, 0, r.view.stampAt(CAP + at));
    std::memcpy(buf->data() + at - 8, &forged, 8);
  }
  producer.commit(120, 1, true);
  ASSERT_TRUE(consumer.tryPeek().ok());
  consumer.release();
  for (size_t size : {size_t{112}, size_t{0}}) {  // frames at 128 and 248: lap 0 ends at 256
    ASSERT_TRUE(producer.tryReserve(size).ok());
    producer.commit(size, 2, true);
    ASSERT_TRUE(consumer.tryPeek().ok());
    consumer.release();
  }
  // Lap 1: a frame at 0..16; the consumer's next header position, 16, held a forged header.
  ASSERT_TRUE(producer.tryReserve(8).ok());
  producer.commit(8, 3, true);
  Result<Frame> f = consumer.tryPeek();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->tag, 3);
  consumer.release();
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK) << "the terminator cleared the forgery";
  EXPECT_EQ(r.headerAt(16), 0u);
  EXPECT_TRUE(consumer.status().ok());
}

TEST(Ring, DeferredRunAcrossTheWrapAppearsWholeAtPublish) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  for (size_t size : {size_t{112}, size_t{64}}) {  // 0..120, 120..192
    ASSERT_TRUE(producer.tryReserve(size).ok());
    producer.commit(size, 0, true);
    ASSERT_TRUE(consumer.tryPeek().ok());
    consumer.release();
  }
  // 192..232; a pad 232..256 and 0..40 of lap 1; 40..80.
  for (uint16_t tag = 1; tag <= 3; ++tag) {
    ASSERT_TRUE(producer.tryReserve(32).ok());
    producer.commit(32, tag, false);
  }
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK);
  EXPECT_EQ(r.headerAt(192), 0u) << "the run's first header is held back until publish()";
  EXPECT_TRUE(producer.publish());
  EXPECT_FALSE(producer.publish()) << "nothing new";
  for (uint16_t tag = 1; tag <= 3; ++tag) {
    Result<Frame> f = consumer.tryPeek();
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f->tag, tag);
    consumer.release();
  }
  EXPECT_TRUE(consumer.takeSkippedPadding());
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK);
  EXPECT_EQ(r.control().tail, CAP + 80);
}

TEST(Ring, LazyReleasePublishesHeadEveryQuarterRingOrWhenAsked) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  for (int i = 0; i < 7; ++i) {
    ASSERT_TRUE(producer.tryReserve(8).ok());
    producer.commit(8, 0, true);
  }
  for (uint64_t i = 1; i <= 4; ++i) {  // 16-byte frames: the fourth reaches CAP/4 = 64
    ASSERT_TRUE(consumer.tryPeek().ok());
    EXPECT_EQ(consumer.releaseLazily(), i == 4) << "says when it published, " << i;
    EXPECT_EQ(r.control().head, i < 4 ? 0u : 64u) << i;
  }
  ASSERT_TRUE(consumer.tryPeek().ok());
  EXPECT_FALSE(consumer.releaseLazily());
  EXPECT_EQ(r.control().head, 64u);
  EXPECT_TRUE(consumer.publishHead());
  EXPECT_EQ(r.control().head, 80u);
  EXPECT_FALSE(consumer.publishHead()) << "nothing new";
  ASSERT_TRUE(consumer.tryPeek().ok());
  consumer.release();
  EXPECT_EQ(r.control().head, 96u) << "release() publishes at once";
}

// ---- hostile producer: each violation poisons the consumer and leaves the ring unchanged ----

class HostileProducer : public ::testing::Test {
 protected:
  // Publishes one honest 16-byte frame and consumes it, so head = tail = 24.
  void SetUp() override {
    RingProducer<AtomicSync> producer(r.view);
    ASSERT_TRUE(producer.tryReserve(16).ok());
    producer.commit(16, 0, true);
    consumer = RingConsumer<AtomicSync>(r.view);
    ASSERT_TRUE(consumer.tryPeek().ok());
    consumer.release();
    ASSERT_EQ(r.control().head, 24u);
  }
  // The consumer refuses with PROTOCOL_ERROR, keeps refusing, and writes nothing.
  void expectPoisoned() {
    auto before = r.snapshot();
    Result<Frame> f = consumer.tryPeek();
    ASSERT_EQ(f.code(), Errc::PROTOCOL_ERROR);
    EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR) << "the error must stick";
    EXPECT_EQ(consumer.status().code(), Errc::PROTOCOL_ERROR);
    EXPECT_EQ(r.snapshot(), before);
    EXPECT_EQ(r.control().head, 24u);
  }
  TestRing r;
  RingConsumer<AtomicSync> consumer;
};

// A header for byte index `at` with the stamp an honest producer would give it.
uint64_t headerFor(const TestRing& r, uint64_t at, uint32_t length, uint16_t tag, uint8_t flags) {
  return encodeFrameHeader(length, tag, flags, r.view.stampAt(at));
}

TEST_F(HostileProducer, ForgedTailIsIgnoredByTheConsumer) {
  r.control().tail = 12345;  // misaligned and far beyond capacity: the consumer never reads it
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK);
  r.headerAt(24) = headerFor(r, 24, 8, 4, 0);
  Result<Frame> f = consumer.tryPeek();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->tag, 4);
  EXPECT_TRUE(consumer.status().ok());
}

TEST_F(HostileProducer, HeaderWithoutTheCommittedBitIsAProtocolError) {
  r.headerAt(24) = encodeFrameHeader(8, 0, 0, 0);
  expectPoisoned();
}

TEST_F(HostileProducer, HeaderOfTheNextLapIsAProtocolError) {
  r.headerAt(24) = headerFor(r, 24 + CAP, 8, 0, 0);
  expectPoisoned();
}

TEST_F(HostileProducer, HeaderLeftFromThePreviousLapIsAProtocolErrorNotAFrame) {
  // What a producer that forgot its terminator would leave: the consumer (lap 1, position 0)
  // finds the honest lap-0 header of the frame it already consumed.
  r.control().head = CAP;
  consumer = RingConsumer<AtomicSync>(r.view);
  ASSERT_NE(r.headerAt(0), 0u);
  auto before = r.snapshot();
  Result<Frame> f = consumer.tryPeek();
  ASSERT_EQ(f.code(), Errc::PROTOCOL_ERROR);
  EXPECT_NE(std::strstr(f.error().detail, "lap"), nullptr);
  EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(r.snapshot(), before);
}

TEST_F(HostileProducer, FrameLargerThanHalfTheRingIsAProtocolError) {
  r.headerAt(24) = headerFor(r, 24, CAP / 2, 0, 0);  // 24 + 136 still ends before the wrap
  expectPoisoned();
}

TEST_F(HostileProducer, HugeHeaderLengthIsAProtocolError) {
  r.headerAt(24) = headerFor(r, 24, 0xffff'ffffu, 0, 0);
  expectPoisoned();
}

TEST_F(HostileProducer, FrameCrossingTheWrapIsAProtocolError) {
  r.control().head = 200;  // a fresh consumer starting at 200 (rebuilt below)
  consumer = RingConsumer<AtomicSync>(r.view);
  r.headerAt(200) = headerFor(r, 200, 64, 0, 0);  // 200 + 8 + 64 > 256
  auto before = r.snapshot();
  EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(r.snapshot(), before);
}

TEST_F(HostileProducer, PadRunningPastTheWrapIsAProtocolError) {
  r.control().head = 200;
  consumer = RingConsumer<AtomicSync>(r.view);
  r.headerAt(200) = headerFor(r, 200, 64, 0, FRAME_FLAG_PAD);
  auto before = r.snapshot();
  EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(r.snapshot(), before);
}

TEST_F(HostileProducer, PadWithATagIsAProtocolError) {
  r.headerAt(24) = headerFor(r, 24, 8, 5, FRAME_FLAG_PAD);
  expectPoisoned();
}

TEST_F(HostileProducer, PadWithUnalignedLengthIsAProtocolError) {
  r.headerAt(24) = headerFor(r, 24, 12, 0, FRAME_FLAG_PAD);
  expectPoisoned();
}

TEST_F(HostileProducer, UnknownFrameFlagsAreAProtocolError) {
  r.headerAt(24) = headerFor(r, 24, 0, 0, 0x40);
  expectPoisoned();
}

TEST(HostileProducerFlood, PaddingIsSkippedAtMostARingsWorthPerCall) {
  TestRing r;
  // A ring full of 8-byte pads of lap 0, as a producer racing ahead of the consumer could write.
  for (uint64_t at = 0; at < CAP; at += 8)
    r.headerAt(at) = encodeFrameHeader(0, 0, FRAME_FLAG_PAD, r.view.stampAt(at));
  RingConsumer<AtomicSync> consumer(r.view);
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK) << "returns after a ring's worth";
  EXPECT_TRUE(consumer.takeSkippedPadding());
  EXPECT_EQ(r.control().head, CAP) << "the padding is handed back";
  // Back at position 0, now in lap 1: the lap-0 pad there is stale.
  EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR);
}

TEST(HostileProducerAtAttach, MisalignedHeadPoisonsTheConsumer) {
  TestRing r;
  r.control().head = 12;
  r.control().tail = 12 + 16;
  RingConsumer<AtomicSync> consumer(r.view);
  EXPECT_EQ(consumer.tryPeek().code(), Errc::PROTOCOL_ERROR);
}

// ---- hostile consumer: the producer validates the published head ----

TEST(HostileConsumer, HeadMovedBackwardsPoisonsTheProducer) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  for (int i = 0; i < 7; ++i) {  // 7 frames of 32 bytes and the terminator: full
    ASSERT_TRUE(producer.tryReserve(24).ok());
    producer.commit(24, 0, true);
  }
  ASSERT_TRUE(consumer.tryPeek().ok());
  consumer.release();  // head = 32
  ASSERT_TRUE(producer.tryReserve(24).ok()) << "the producer refreshes head to 32";
  producer.commit(24, 0, true);
  r.control().head = 0;  // moved backwards
  auto before = r.snapshot();
  Result<std::span<std::byte>> buf = producer.tryReserve(24);  // needs another refresh
  ASSERT_EQ(buf.code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(producer.tryReserve(0).code(), Errc::PROTOCOL_ERROR) << "the error must stick";
  EXPECT_EQ(r.snapshot(), before);
}

TEST(HostileConsumer, HeadBeyondPublishedTailPoisonsTheProducer) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  for (int i = 0; i < 7; ++i) {
    ASSERT_TRUE(producer.tryReserve(24).ok());
    producer.commit(24, 0, true);
  }
  r.control().head = CAP + 64;  // past tail (= 224)
  EXPECT_EQ(producer.tryReserve(24).code(), Errc::PROTOCOL_ERROR);
  r.control().head = 8;
  EXPECT_EQ(producer.tryReserve(24).code(), Errc::PROTOCOL_ERROR) << "the error must stick";
}

TEST(HostileConsumer, MisalignedHeadPoisonsTheProducer) {
  TestRing r;
  RingProducer<AtomicSync> producer(r.view);
  for (int i = 0; i < 7; ++i) {
    ASSERT_TRUE(producer.tryReserve(24).ok());
    producer.commit(24, 0, true);
  }
  r.control().head = 36;
  EXPECT_EQ(producer.tryReserve(24).code(), Errc::PROTOCOL_ERROR);
}

TEST(HostileConsumer, InconsistentIndicesAtAttachPoisonTheProducer) {
  TestRing r;
  r.control().tail = 8;
  r.control().head = 16;
  RingProducer<AtomicSync> producer(r.view);
  EXPECT_EQ(producer.tryReserve(8).code(), Errc::PROTOCOL_ERROR);
}

// ---- ring header validation ----

TEST(RingHeader, ValidHeaderIsAccepted) {
  TestRing r;
  Result<uint64_t> cap = validateRing(r.memory, sizeof r.memory);
  ASSERT_TRUE(cap.ok());
  EXPECT_EQ(*cap, CAP);
}

TEST(RingHeader, WrongMagicVersionOrSizeIsRefused) {
  TestRing r;
  r.control().header.magic ^= 1;
  EXPECT_EQ(validateRing(r.memory, sizeof r.memory).code(), Errc::PROTOCOL_ERROR);
  r.control().header.magic ^= 1;
  r.control().header.version = 1;  // tail-published frames: a peer of the old format
  EXPECT_EQ(validateRing(r.memory, sizeof r.memory).code(), Errc::PROTOCOL_ERROR);
  r.control().header.version = RING_VERSION + 1;
  EXPECT_EQ(validateRing(r.memory, sizeof r.memory).code(), Errc::PROTOCOL_ERROR);
  r.control().header.version = RING_VERSION;
  EXPECT_EQ(validateRing(r.memory, sizeof r.memory - 64).code(), Errc::PROTOCOL_ERROR);
  r.control().header.capacity = 3 * 64;
  EXPECT_EQ(validateRing(r.memory, sizeof r.memory).code(), Errc::PROTOCOL_ERROR);
  r.control().header.capacity = CAP;
  r.control().header.controlBytes = 256;
  EXPECT_EQ(validateRing(r.memory, sizeof r.memory).code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(validateRing(r.memory, 100).code(), Errc::PROTOCOL_ERROR);
}

// ---- multi-producer slots ----

TEST(RingMultiProducer, ShortCommitAndAbandonLeavePaddingTheConsumerSkips) {
  TestRing r;
  RingMultiProducer producers(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  Result<RingSlot> a = producers.tryClaim(64);
  Result<RingSlot> b = producers.tryClaim(16);
  Result<RingSlot> c = producers.tryClaim(8);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  std::memcpy(producers.payload(*a), "hello", 5);
  producers.commit(*a, 5, 1);  // 64 claimed, 8 used: the rest becomes padding
  producers.abandon(*b);
  producers.commit(*c, 8, 3);
  Result<Frame> f = consumer.tryPeek();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->tag, 1);
  EXPECT_EQ(std::memcmp(f->payload.data(), "hello", 5), 0);
  consumer.release();
  f = consumer.tryPeek();
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->tag, 3);
  consumer.release();
  EXPECT_EQ(consumer.tryPeek().code(), Errc::WOULD_BLOCK);
}

TEST(RingMultiProducer, ClaimsWrapWithPadAndRefuseWhenFull) {
  TestRing r;
  RingMultiProducer producers(r.view);
  RingConsumer<AtomicSync> consumer(r.view);
  for (uint32_t i = 0; i < 500; ++i) {
    Result<RingSlot> s = producers.tryClaim(40 + (i % 5) * 8);
    ASSERT_TRUE(s.ok());
    std::memcpy(producers.payload(*s), &i, sizeof i);
    producers.commit(*s, sizeof i, 0);
    Result<Frame> f = consumer.tryPeek();
    ASSERT_TRUE(f.ok());
    uint32_t got;
    std::memcpy(&got, f->payload.data(), sizeof got);
    ASSERT_EQ(got, i);
    consumer.release();
  }
  Result<RingSlot> claim = producers.tryClaim(56);
  while (claim.ok()) claim = producers.tryClaim(56);
  EXPECT_EQ(claim.code(), Errc::WOULD_BLOCK);
  EXPECT_EQ(producers.tryClaim(CAP).code(), Errc::MESSAGE_TOO_LARGE);
}

}  // namespace
}  // namespace agate
