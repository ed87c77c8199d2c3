#include "agate/runtime/message.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "test_messages.capnp.h"

#include "../support/alloc_counter.h"

namespace agate {
namespace {

using test::Point;
using test::Sample;
using test::Tree;

// Heap storage standing in for a ring's reserved frame: zeroed, 8-byte aligned, with canary words
// after it so a test can prove nothing was written past the frame.
class TestFrame {
 public:
  static constexpr size_t CANARY_WORDS = 4;
  static constexpr uint64_t CANARY = 0xC0FFEE00DEADBEEFull;

  explicit TestFrame(size_t words)
      : words_(words), storage_(std::make_unique<capnp::word[]>(words + CANARY_WORDS)) {
    for (size_t i = 0; i < CANARY_WORDS; ++i)
      std::memcpy(static_cast<void*>(&storage_[words + i]), &CANARY, sizeof CANARY);
  }
  std::span<capnp::word> words() { return {storage_.get(), words_}; }
  std::span<const std::byte> bytes(size_t n) {
    return {reinterpret_cast<const std::byte*>(storage_.get()), n};
  }
  bool canaryIntact() const {
    for (size_t i = 0; i < CANARY_WORDS; ++i) {
      uint64_t v;
      std::memcpy(&v, static_cast<const void*>(&storage_[words_ + i]), sizeof v);
      if (v != CANARY) return false;
    }
    return true;
  }
  void setWord(size_t i, uint64_t v) {
    std::memcpy(static_cast<void*>(&storage_[i]), &v, sizeof v);
  }

 private:
  size_t words_;
  std::unique_ptr<capnp::word[]> storage_;
};

// Wire pointer encodings (Cap'n Proto encoding spec), for hand-made hostile frames.
constexpr uint64_t structPointer(int32_t offsetWords, uint16_t dataWords, uint16_t pointers) {
  return ((uint64_t{static_cast<uint32_t>(offsetWords)} << 2) & 0xffffffffu) |
         (uint64_t{dataWords} << 32) | (uint64_t{pointers} << 48);
}
constexpr uint64_t POINTER_ELEMENTS = 6;  // list element size code for "pointer"
constexpr uint64_t listPointer(int32_t offsetWords, uint64_t elementSize, uint32_t count) {
  return 1 | ((uint64_t{static_cast<uint32_t>(offsetWords)} << 2) & 0xffffffffu) |
         (elementSize << 32) | (uint64_t{count} << 35);
}
constexpr uint64_t farPointer(uint32_t padOffsetWords, uint32_t segmentId, bool doubleFar) {
  return 2 | (uint64_t{doubleFar} << 2) | (uint64_t{padOffsetWords} << 3) |
         (uint64_t{segmentId} << 32);
}

void fillSample(Sample::Builder s) {
  s.setId(0x1122334455667788ull);
  s.setFlag(true);
  s.setName("agate");
  const uint8_t payload[] = {1, 2, 3, 4, 5};
  s.setPayload(kj::arrayPtr(payload, sizeof payload));
  auto values = s.initValues(3);
  values.set(0, 7);
  values.set(1, 11);
  values.set(2, 13);
  auto points = s.initPoints(2);
  points[0].setX(-1);
  points[0].setY(2);
  points[1].setX(30);
  points[1].setY(-40);
  auto tags = s.initTags(2);
  tags.set(0, "first");
  tags.set(1, "second");
  s.initOrigin().setX(5);
  auto tree = s.initTree();
  tree.setValue(1);
  auto children = tree.initChildren(2);
  children[0].setValue(2);
  children[1].setValue(3);
  children[1].initChildren(1)[0].setValue(4);
  s.getChoice().setLabel("chosen");
}

void expectSample(Sample::Reader s) {
  EXPECT_EQ(s.getId(), 0x1122334455667788ull);
  EXPECT_TRUE(s.getFlag());
  EXPECT_EQ(s.getName(), "agate");
  auto payload = s.getPayload();
  ASSERT_EQ(payload.size(), 5u);
  EXPECT_EQ(payload[4], 5);
  auto values = s.getValues();
  ASSERT_EQ(values.size(), 3u);
  EXPECT_EQ(values[0], 7u);
  EXPECT_EQ(values[2], 13u);
  auto points = s.getPoints();
  ASSERT_EQ(points.size(), 2u);
  EXPECT_EQ(points[0].getX(), -1);
  EXPECT_EQ(points[1].getY(), -40);
  auto tags = s.getTags();
  ASSERT_EQ(tags.size(), 2u);
  EXPECT_EQ(tags[1], "second");
  EXPECT_EQ(s.getOrigin().getX(), 5);
  auto tree = s.getTree();
  EXPECT_EQ(tree.getValue(), 1u);
  ASSERT_EQ(tree.getChildren().size(), 2u);
  EXPECT_EQ(tree.getChildren()[1].getChildren()[0].getValue(), 4u);
  ASSERT_TRUE(s.getChoice().isLabel());
  EXPECT_EQ(s.getChoice().getLabel(), "chosen");
}

// Builds fillSample() into a roomy frame; returns the committed length.
size_t buildSample(TestFrame& frame) {
  FrameBuilder builder(frame.words());
  fillSample(builder.initRoot<Sample>());
  auto used = builder.tryFinish();
  EXPECT_TRUE(used.ok());
  return used.ok() ? *used : 0;
}

// A chain of d Trees nests 2d - 1 levels deep, as Cap'n Proto's getters count: the root struct,
// then per level the children list and the struct element inside it. The deepest chain a nesting
// limit admits:
int deepestTreeChain(int nestingLimit) { return (nestingLimit + 1) / 2; }

// Builds a chain of `depth` Trees (root included) into `frame`; returns the committed length.
size_t buildTreeChain(TestFrame& frame, int depth) {
  FrameBuilder builder(frame.words());
  auto node = builder.initRoot<Tree>();
  for (int level = 1; level < depth; ++level) {
    node.setValue(static_cast<uint64_t>(level));
    node = node.initChildren(1)[0];
  }
  auto used = builder.tryFinish();
  EXPECT_TRUE(used.ok());
  return used.ok() ? *used : 0;
}

// ---------------------------------------------------------------------------------------------
// Building

TEST(FrameBuilder, BuildsInTheFrameAndReportsWholeWordsUsed) {
  TestFrame frame(256);
  FrameBuilder builder(frame.words());
  fillSample(builder.initRoot<Sample>());
  auto used = builder.tryFinish();
  ASSERT_TRUE(used.ok());
  EXPECT_GT(*used, 0u);
  EXPECT_EQ(*used % WORD_BYTES, 0u);
  EXPECT_EQ(*used, builder.usedBytes());
  EXPECT_FALSE(builder.overflowed());
  // The message lives in the frame itself: its segment 0 starts at the frame.
  auto segments = builder.getSegmentsForOutput();
  ASSERT_EQ(segments.size(), 1u);
  EXPECT_EQ(segments[0].begin(), frame.words().data());
  EXPECT_TRUE(frame.canaryIntact());
}

TEST(FrameBuilder, BuildsInAByteSpanViewedAsWords) {
  // The shape of the join with a ring: reserve bytes, build, commit tryFinish() bytes, decode.
  alignas(8) std::byte reservation[64] = {};
  FrameBuilder builder(asFrameWords(reservation));
  builder.initRoot<Point>().setY(9);
  auto used = builder.tryFinish();
  ASSERT_TRUE(used.ok());
  FrameReader reader;
  auto view = reader.tryDecode(std::span<const std::byte>(reservation, *used));
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->getRoot<Point>().getY(), 9);
}

TEST(FrameBuilder, ResumedOverACopyInALargerFrameGoesOnBuildingAfterTheWordsWritten) {
  // A message started in a small frame moves to a larger one (frames are position-independent)
  // and gets more content there: the first builder's words stay as they were, what follows lands
  // after them, and the whole decodes as one message.
  TestFrame small(16);
  FrameBuilder first(small.words());
  Sample::Builder root = first.initRoot<Sample>();
  root.setId(7);
  root.initOrigin().setX(3);
  const size_t used = first.usedBytes();
  ASSERT_FALSE(first.overflowed());

  TestFrame large(256);
  std::memcpy(static_cast<void*>(large.words().data()), small.words().data(), used);
  FrameBuilder resumed(large.words(), used / WORD_BYTES);
  EXPECT_EQ(resumed.usedBytes(), used);
  Sample::Builder again = resumed.getRoot<Sample>();
  EXPECT_EQ(again.getId(), 7u);
  EXPECT_EQ(again.getOrigin().getX(), 3);
  auto values = again.initValues(40);  // more than the small frame had room for
  for (uint32_t i = 0; i < 40; ++i) values.set(i, i * i);
  auto finished = resumed.tryFinish();
  ASSERT_TRUE(finished.ok());
  EXPECT_GT(*finished, used);
  EXPECT_FALSE(resumed.overflowed());
  EXPECT_TRUE(large.canaryIntact());

  FrameReader reader;
  auto view = reader.tryDecode(std::span<const std::byte>(
      reinterpret_cast<const std::byte*>(large.words().data()), *finished));
  ASSERT_TRUE(view.ok()) << errcName(view.code());
  Sample::Reader read = view->getRoot<Sample>();
  EXPECT_EQ(read.getId(), 7u);
  EXPECT_EQ(read.getOrigin().getX(), 3);
  ASSERT_EQ(read.getValues().size(), 40u);
  EXPECT_EQ(read.getValues()[39], 39u * 39u);
}

TEST(FrameBuilderDeathTest, ResumingMoreWordsThanTheFrameHoldsIsRefused) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TestFrame frame(4);
  EXPECT_DEATH(FrameBuilder(frame.words(), 5), "resuming 5 words of a frame of 4 words");
}

TEST(FrameBuilder, ExactSizeFrameFits) {
  TestFrame roomy(256);
  const size_t needed = buildSample(roomy);
  ASSERT_GT(needed, 0u);

  TestFrame exact(needed / WORD_BYTES);
  FrameBuilder builder(exact.words());
  fillSample(builder.initRoot<Sample>());
  auto used = builder.tryFinish();
  ASSERT_TRUE(used.ok());
  EXPECT_EQ(*used, needed);
  EXPECT_TRUE(exact.canaryIntact());
}

TEST(FrameBuilder, OneWordShortIsRefusedAndWritesNothingPastTheFrame) {
  TestFrame roomy(256);
  const size_t needed = buildSample(roomy);
  ASSERT_GT(needed, WORD_BYTES);

  TestFrame tight(needed / WORD_BYTES - 1);
  FrameBuilder builder(tight.words());
  fillSample(builder.initRoot<Sample>());  // still works: the overflow goes off the frame
  auto used = builder.tryFinish();
  ASSERT_FALSE(used.ok());
  EXPECT_EQ(used.code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_STRNE(used.error().detail, "");
  EXPECT_TRUE(builder.overflowed());
  EXPECT_LE(builder.usedBytes(), tight.words().size_bytes());
  EXPECT_TRUE(tight.canaryIntact());
  // Asking again does not change the verdict.
  EXPECT_EQ(builder.tryFinish().code(), Errc::MESSAGE_TOO_LARGE);
}

TEST(FrameBuilder, EmptyFrameRefusesEveryMessage) {
  TestFrame frame(0);
  FrameBuilder builder(frame.words());
  builder.initRoot<Point>().setX(1);
  EXPECT_EQ(builder.tryFinish().code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_EQ(builder.usedBytes(), 0u);
  EXPECT_TRUE(frame.canaryIntact());
}

TEST(FrameBuilder, UntouchedBuilderFinishesAsOneWordEmptyMessage) {
  TestFrame frame(4);
  FrameBuilder builder(frame.words());
  auto used = builder.tryFinish();
  ASSERT_TRUE(used.ok());
  EXPECT_EQ(*used, WORD_BYTES);  // the null root pointer

  FrameReader reader;
  auto view = reader.tryDecode(frame.bytes(*used));
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->getRoot<Point>().getX(), 0);  // a null root reads as the default struct
}

TEST(FrameBuilder, UntouchedBuilderOverEmptyFrameIsRefused) {
  TestFrame frame(0);
  FrameBuilder builder(frame.words());
  EXPECT_EQ(builder.tryFinish().code(), Errc::MESSAGE_TOO_LARGE);
}

// ---------------------------------------------------------------------------------------------
// Round trips

std::string policyName(const ::testing::TestParamInfo<ReadPolicy>& param) {
  return param.param == ReadPolicy::IN_PLACE ? "InPlace" : "CopyIn";
}

class RoundTrip : public ::testing::TestWithParam<ReadPolicy> {
 protected:
  RoundTrip() : scratch_(std::make_unique<capnp::word[]>(SCRATCH_WORDS)) {}
  std::unique_ptr<FrameReader> makeReader(ReadLimits limits = {}) {
    if (GetParam() == ReadPolicy::IN_PLACE) return std::make_unique<FrameReader>(limits);
    return std::make_unique<FrameReader>(std::span(scratch_.get(), SCRATCH_WORDS), limits);
  }
  static constexpr size_t SCRATCH_WORDS = 4096;
  std::unique_ptr<capnp::word[]> scratch_;
};

TEST_P(RoundTrip, StructsListsTextDataAndNestedStructsReadBack) {
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  auto reader = makeReader();
  EXPECT_EQ(reader->policy(), GetParam());
  auto view = reader->tryDecode(frame.bytes(used));
  ASSERT_TRUE(view.ok()) << view.error().detail;
  EXPECT_EQ(view->sizeInBytes(), used);
  expectSample(view->getRoot<Sample>());
}

TEST_P(RoundTrip, SmallStructReadsBack) {
  TestFrame frame(8);
  FrameBuilder builder(frame.words());
  auto p = builder.initRoot<Point>();
  p.setX(123);
  p.setY(-456);
  auto used = builder.tryFinish();
  ASSERT_TRUE(used.ok());
  EXPECT_EQ(*used, 2 * WORD_BYTES);  // root pointer + one data word

  auto reader = makeReader();
  auto view = reader->tryDecode(frame.bytes(*used));
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->getRoot<Point>().getX(), 123);
  EXPECT_EQ(view->getRoot<Point>().getY(), -456);
}

TEST_P(RoundTrip, NestingExactlyAtTheLimitIsAccepted) {
  TestFrame frame(1024);
  ReadLimits limits;
  limits.nestingLimit = 16;
  const size_t used = buildTreeChain(frame, deepestTreeChain(limits.nestingLimit));
  auto reader = makeReader(limits);
  auto view = reader->tryDecode(frame.bytes(used));
  ASSERT_TRUE(view.ok()) << view.error().detail;
  // The caller can walk all the way down with typed getters.
  int depth = 0;
  Status walked = view->tryRead<Tree>([&](Tree::Reader node) {
    for (depth = 1; node.hasChildren(); ++depth) node = node.getChildren()[0];
  });
  EXPECT_TRUE(walked.ok());
  EXPECT_EQ(depth, deepestTreeChain(limits.nestingLimit));
}

TEST_P(RoundTrip, ReaderIsReusableAfterARefusedFrame) {
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  auto reader = makeReader();
  EXPECT_EQ(reader->tryDecode(frame.bytes(used - WORD_BYTES)).code(), Errc::PROTOCOL_ERROR);
  auto view = reader->tryDecode(frame.bytes(used));
  ASSERT_TRUE(view.ok());
  expectSample(view->getRoot<Sample>());
}

TEST_P(RoundTrip, CallersReadsGetABudgetOfTheirOwnAfterValidation) {
  // One pass over a message costs its size in words plus one (the root pointer). With exactly
  // that as the limit, validation spends the whole budget; the caller's pass must still succeed,
  // which it can only if its budget is separate.
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  ReadLimits limits;
  limits.traversalLimitWords = used / WORD_BYTES + 1;
  auto reader = makeReader(limits);
  auto view = reader->tryDecode(frame.bytes(used));
  ASSERT_TRUE(view.ok()) << view.error().detail;
  EXPECT_NO_THROW((void)view->getRoot<capnp::AnyPointer>().targetSize());

  // One word less and validation itself runs out.
  limits.traversalLimitWords -= 1;
  auto tighter = makeReader(limits);
  EXPECT_EQ(tighter->tryDecode(frame.bytes(used)).code(), Errc::PROTOCOL_ERROR);
}

TEST_P(RoundTrip, CallersReaderAllowsSeveralPassesButIsBounded) {
  // A typed RPC layer checks content against its schema (a pass), then the handler reads it (a
  // pass or part of one): the caller's budget covers READ_PASSES passes, and stops the next.
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  ReadLimits limits;
  limits.traversalLimitWords = used / WORD_BYTES + 1;  // exactly one pass
  auto reader = makeReader(limits);
  auto view = reader->tryDecode(frame.bytes(used));
  ASSERT_TRUE(view.ok()) << view.error().detail;
  capnp::AnyPointer::Reader root = view->getRoot<capnp::AnyPointer>();
  // getRoot charged the root pointer once; each targetSize() walks the whole message.
  for (uint64_t pass = 1; pass < ReadLimits::READ_PASSES; ++pass)
    EXPECT_NO_THROW((void)root.targetSize()) << "pass " << pass;
  EXPECT_THROW(
      {
        (void)root.targetSize();
        (void)root.targetSize();
      },
      kj::Exception)
      << "the budget is bounded";
}

INSTANTIATE_TEST_SUITE_P(BothPolicies, RoundTrip,
                         ::testing::Values(ReadPolicy::IN_PLACE, ReadPolicy::COPY_IN), policyName);

// ---------------------------------------------------------------------------------------------
// Hostile and malformed frames: each is PROTOCOL_ERROR, with no crash and no exception escaping,
// under both policies.

class HostileFrame : public RoundTrip {
 protected:
  void expectRefused(std::span<const std::byte> bytes, ReadLimits limits = {},
                     const char* detailMentions = nullptr) {
    auto reader = makeReader(limits);
    auto view = reader->tryDecode(bytes);
    ASSERT_FALSE(view.ok());
    EXPECT_EQ(view.code(), Errc::PROTOCOL_ERROR);
    ASSERT_NE(view.error().detail, nullptr);
    if (detailMentions != nullptr) {
      EXPECT_NE(std::strstr(view.error().detail, detailMentions), nullptr)
          << "detail: " << view.error().detail;
    }
  }
};

TEST_P(HostileFrame, EmptyFrameIsRefused) {
  TestFrame frame(1);
  expectRefused(frame.bytes(0), {}, "empty");
}

TEST_P(HostileFrame, PartialWordIsRefused) {
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  expectRefused(frame.bytes(used - 3), {}, "whole number");
}

TEST_P(HostileFrame, FrameOverMaxFrameBytesIsRefused) {
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  ReadLimits limits;
  limits.maxFrameBytes = used - WORD_BYTES;
  expectRefused(frame.bytes(used), limits, "maxFrameBytes");
}

TEST_P(HostileFrame, GarbageFrameIsRefused) {
  TestFrame frame(64);
  for (size_t i = 0; i < 64; ++i) frame.setWord(i, ~uint64_t{0});
  expectRefused(frame.bytes(64 * WORD_BYTES));
}

TEST_P(HostileFrame, EveryTruncationOfAValidMessageIsRefused) {
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  for (size_t n = WORD_BYTES; n < used; n += WORD_BYTES) {
    SCOPED_TRACE(n);
    expectRefused(frame.bytes(n));
  }
}

TEST_P(HostileFrame, StructPointerPastTheEndIsRefused) {
  TestFrame frame(4);
  frame.setWord(0, structPointer(100, 1, 0));
  expectRefused(frame.bytes(4 * WORD_BYTES), {}, "outside the frame");
}

TEST_P(HostileFrame, StructPointerBeforeTheStartIsRefused) {
  TestFrame frame(4);
  frame.setWord(0, structPointer(-5, 1, 0));
  expectRefused(frame.bytes(4 * WORD_BYTES), {}, "outside the frame");
}

TEST_P(HostileFrame, ListPointerPastTheEndIsRefused) {
  TestFrame frame(4);
  frame.setWord(0, structPointer(0, 0, 1));
  frame.setWord(1, listPointer(0, POINTER_ELEMENTS, 1000));
  expectRefused(frame.bytes(4 * WORD_BYTES), {}, "outside the frame");
}

TEST_P(HostileFrame, RootThatIsNotAStructIsRefused) {
  TestFrame frame(4);
  frame.setWord(0, listPointer(0, POINTER_ELEMENTS, 1));
  expectRefused(frame.bytes(4 * WORD_BYTES), {}, "root");
}

TEST_P(HostileFrame, FarPointerToAnotherSegmentIsRefused) {
  TestFrame frame(4);
  frame.setWord(0, farPointer(0, 1, false));
  expectRefused(frame.bytes(4 * WORD_BYTES), {}, "far pointer");
}

TEST_P(HostileFrame, DoubleFarPointerToAnotherSegmentIsRefused) {
  TestFrame frame(4);
  frame.setWord(0, farPointer(0, 7, true));
  expectRefused(frame.bytes(4 * WORD_BYTES), {}, "far pointer");
}

TEST_P(HostileFrame, FarPointerWithLandingPadOutsideTheFrameIsRefused) {
  TestFrame frame(4);
  frame.setWord(0, farPointer(1000, 0, false));
  expectRefused(frame.bytes(4 * WORD_BYTES), {}, "far pointer");
}

TEST_P(HostileFrame, NestingBeyondTheLimitIsRefused) {
  TestFrame frame(1024);
  ReadLimits limits;
  limits.nestingLimit = 16;
  const size_t used = buildTreeChain(frame, deepestTreeChain(limits.nestingLimit) + 1);
  expectRefused(frame.bytes(used), limits, "nestingLimit");
}

TEST_P(HostileFrame, PointerCycleIsRefused) {
  // A struct whose one pointer points back at the struct itself: infinitely deep.
  TestFrame frame(2);
  frame.setWord(0, structPointer(0, 0, 1));   // root -> struct at word 1
  frame.setWord(1, structPointer(-1, 0, 1));  // word 1 -> word 1
  expectRefused(frame.bytes(2 * WORD_BYTES), {}, "nestingLimit");
}

TEST_P(HostileFrame, ManyPointersToOneStructBeyondTheTraversalLimitAreRefused) {
  // root struct -> list of N pointers, every one pointing at the same D-word struct: the message
  // is ~N + D words but traverses N * D.
  constexpr uint32_t N = 1000;
  constexpr uint16_t D = 200;
  constexpr size_t WORDS = 2 + N + D;
  TestFrame frame(WORDS);
  frame.setWord(0, structPointer(0, 0, 1));
  frame.setWord(1, listPointer(0, POINTER_ELEMENTS, N));
  for (uint32_t i = 0; i < N; ++i)
    frame.setWord(2 + i, structPointer(static_cast<int32_t>(N - 1 - i), D, 0));
  ASSERT_GT(uint64_t{N} * D, ReadLimits::DEFAULT_TRAVERSAL_LIMIT_WORDS);
  expectRefused(frame.bytes(WORDS * WORD_BYTES), {}, "traversal");

  // The same bytes are well-formed: a large enough budget accepts them.
  ReadLimits generous;
  generous.traversalLimitWords = uint64_t{N} * D + WORDS;
  auto reader = makeReader(generous);
  EXPECT_TRUE(reader->tryDecode(frame.bytes(WORDS * WORD_BYTES)).ok());
}

TEST_P(HostileFrame, LongListOfVoidsBeyondTheTraversalLimitIsRefused) {
  // Two words claim 2^29 - 1 elements that occupy no space. Getters charge one word per element
  // of such a list, so validation must too, or a getter would throw after validation passed.
  TestFrame frame(2);
  frame.setWord(0, structPointer(0, 0, 1));
  frame.setWord(1, listPointer(0, /*VOID*/ 0, (1u << 29) - 1));
  expectRefused(frame.bytes(2 * WORD_BYTES), {}, "traversal");
}

TEST_P(HostileFrame, CapabilityPointerIsRefused) {
  TestFrame frame(2);
  frame.setWord(0, structPointer(0, 0, 1));
  frame.setWord(1, 3);  // kind 3 with index 0: a capability pointer
  expectRefused(frame.bytes(2 * WORD_BYTES), {}, "capability");
}

TEST_P(HostileFrame, CapabilityPointerIsAcceptedOnlyWhenTheLimitsAllowIt) {
  TestFrame frame(2);
  frame.setWord(0, structPointer(0, 0, 1));
  frame.setWord(1, (uint64_t{7} << 32) | 3);  // a capability pointer with index 7
  ReadLimits allow;
  allow.allowCapabilityPointers = true;
  auto reader = makeReader(allow);
  auto view = reader->tryDecode(frame.bytes(2 * WORD_BYTES));
  ASSERT_TRUE(view.ok()) << view.error().detail;
  // The reader never follows it: the pointer reads as a capability, its word unchanged.
  auto root = view->getRoot<capnp::AnyStruct>();
  EXPECT_EQ(root.getPointerSection()[0].getPointerType(), capnp::PointerType::CAPABILITY);
  // A capability inside a list of pointers is allowed (and refused by default) the same way.
  TestFrame list(3);
  list.setWord(0, structPointer(0, 0, 1));
  list.setWord(1, listPointer(0, POINTER_ELEMENTS, 1));
  list.setWord(2, 3);
  EXPECT_TRUE(makeReader(allow)->tryDecode(list.bytes(3 * WORD_BYTES)).ok());
  expectRefused(list.bytes(3 * WORD_BYTES), {}, "capability");
}

TEST_P(HostileFrame, FarPointerLandingInsideTheFrameIsValidCapnProto) {
  // Pins the documented behaviour: a single-far pointer into segment 0 with a sound landing pad
  // is well-formed Cap'n Proto and is read (FrameBuilder itself never writes one).
  TestFrame frame(3);
  frame.setWord(0, farPointer(1, 0, false));  // landing pad at word 1
  frame.setWord(1, structPointer(0, 1, 0));   // pad -> Point at word 2
  frame.setWord(2, 7);                        // x = 7, y = 0
  auto reader = makeReader();
  auto view = reader->tryDecode(frame.bytes(3 * WORD_BYTES));
  ASSERT_TRUE(view.ok()) << view.error().detail;
  EXPECT_EQ(view->getRoot<Point>().getX(), 7);
}

TEST_P(HostileFrame, SchemaMismatchIsCaughtByTryRead) {
  // A valid message whose root is a Tree, read as a Sample: Sample's first pointer (name, Text)
  // meets Tree's children (a list of structs). Validation cannot know the schema; tryRead turns
  // the getter's exception into PROTOCOL_ERROR.
  TestFrame frame(64);
  const size_t used = buildTreeChain(frame, 3);
  auto reader = makeReader();
  auto view = reader->tryDecode(frame.bytes(used));
  ASSERT_TRUE(view.ok());
  bool reachedEnd = false;
  Status st = view->tryRead<Sample>([&](Sample::Reader s) {
    (void)s.getName();
    reachedEnd = true;
  });
  EXPECT_EQ(st.code(), Errc::PROTOCOL_ERROR);
  EXPECT_FALSE(reachedEnd);
  // Plain getRoot<T>() readers do throw here; that is what tryRead is for.
  EXPECT_THROW((void)view->getRoot<Sample>().getName(), kj::Exception);
}

// ---------------------------------------------------------------------------------------------
// The raw-word walk (FrameReader::fastAccepts): it accepts common frames without the getter walk,
// and declines everything it does not prove the getter walk accepts, which then decides. Each
// decline below is a frame the getter walk refuses, or accepts only at a limit's edge.

kj::ArrayPtr<const capnp::word> segmentOf(TestFrame& frame, size_t bytes) {
  return {frame.words().data(), bytes / WORD_BYTES};
}

TEST(FastWalk, AcceptsWellFormedFramesTheGetterWalkAccepts) {
  TestFrame sample(256);
  const size_t sampleBytes = buildSample(sample);
  EXPECT_TRUE(FrameReader::fastAccepts(segmentOf(sample, sampleBytes), {}));
  EXPECT_TRUE(FrameReader::validateWithGetters(segmentOf(sample, sampleBytes), {}).ok());

  TestFrame tree(1024);
  ReadLimits limits;
  limits.nestingLimit = 16;
  // One generation less than the limit admits: inside the walk's margin.
  const size_t treeBytes = buildTreeChain(tree, deepestTreeChain(limits.nestingLimit) - 1);
  EXPECT_TRUE(FrameReader::fastAccepts(segmentOf(tree, treeBytes), limits));

  TestFrame empty(1);  // a null root reads as the default struct
  EXPECT_TRUE(FrameReader::fastAccepts(segmentOf(empty, WORD_BYTES), {}));

  TestFrame caps(3);  // capability pointers, when the limits allow them
  caps.setWord(0, structPointer(0, 0, 2));
  caps.setWord(1, (uint64_t{7} << 32) | 3);
  caps.setWord(2, 3);
  ReadLimits allow;
  allow.allowCapabilityPointers = true;
  EXPECT_TRUE(FrameReader::fastAccepts(segmentOf(caps, 3 * WORD_BYTES), allow));
  EXPECT_FALSE(FrameReader::fastAccepts(segmentOf(caps, 3 * WORD_BYTES), {}));
}

TEST(FastWalk, DeclinesOutOfBoundsFarUnknownAndUnsupportedPointers) {
  struct Case {
    const char* what;
    std::vector<uint64_t> words;
  };
  const std::vector<Case> cases = {
      {"empty segment", {}},
      {"root past the end", {structPointer(100, 1, 0), 0}},
      {"root before the start", {structPointer(-5, 1, 0), 0}},
      {"zero-sized struct past the end", {structPointer(0, 0, 1), structPointer(5, 0, 0)}},
      {"root is a list", {listPointer(0, POINTER_ELEMENTS, 1), 0}},
      {"list past the end", {structPointer(0, 0, 1), listPointer(0, POINTER_ELEMENTS, 1000)}},
      {"far pointer", {farPointer(1, 0, false), structPointer(0, 1, 0), 7}},
      {"double-far pointer", {farPointer(0, 7, true), 0}},
      {"other pointer that is not a capability", {structPointer(0, 0, 1), 3 | (1u << 2)}},
      {"list of bits", {structPointer(0, 0, 1), listPointer(0, /*BIT*/ 1, 3), 0}},
      {"list of voids", {structPointer(0, 0, 1), listPointer(0, /*VOID*/ 0, 3)}},
      {"struct list whose tag is a list pointer",
       {structPointer(0, 0, 1), listPointer(0, 7, 1), listPointer(0, 2, 1), 0}},
      {"struct list of zero-sized elements",
       {structPointer(0, 0, 1), listPointer(0, 7, 0), structPointer(5, 0, 0)}},
      {"struct list whose elements overrun it",
       {structPointer(0, 0, 1), listPointer(0, 7, 1), structPointer(2, 1, 0), 0}},
      {"cycle", {structPointer(0, 0, 1), structPointer(-1, 0, 1)}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    TestFrame frame(c.words.size() + 1);
    for (size_t i = 0; i < c.words.size(); ++i) frame.setWord(i, c.words[i]);
    const size_t bytes = c.words.size() * WORD_BYTES;
    EXPECT_FALSE(FrameReader::fastAccepts(segmentOf(frame, bytes), {}));
  }
}

TEST(FastWalk, DeclinesAtTheEdgeOfTheLimitsAndTheGetterWalkDecides) {
  // Nesting exactly at the limit (an odd limit: a chain of d Trees nests 2d - 1 levels): the
  // getter walk accepts, the raw walk keeps a level of margin.
  TestFrame tree(1024);
  ReadLimits nesting;
  nesting.nestingLimit = 15;
  const size_t treeBytes = buildTreeChain(tree, deepestTreeChain(nesting.nestingLimit));
  EXPECT_FALSE(FrameReader::fastAccepts(segmentOf(tree, treeBytes), nesting));
  EXPECT_TRUE(FrameReader::validateWithGetters(segmentOf(tree, treeBytes), nesting).ok());
  FrameReader reader(nesting);
  EXPECT_TRUE(reader.tryDecode(tree.bytes(treeBytes)).ok());

  // A traversal budget of exactly one pass: the getter walk fits it, the raw walk over-counts.
  TestFrame sample(256);
  const size_t sampleBytes = buildSample(sample);
  ReadLimits budget;
  budget.traversalLimitWords = sampleBytes / WORD_BYTES + 1;
  EXPECT_FALSE(FrameReader::fastAccepts(segmentOf(sample, sampleBytes), budget));
  EXPECT_TRUE(FrameReader::validateWithGetters(segmentOf(sample, sampleBytes), budget).ok());

  // Many pointers to one struct: the charges add up per pointer, as the getters' do.
  constexpr uint32_t N = 100;
  constexpr uint16_t D = 50;
  constexpr size_t WORDS = 2 + N + D;
  TestFrame shared(WORDS);
  shared.setWord(0, structPointer(0, 0, 1));
  shared.setWord(1, listPointer(0, POINTER_ELEMENTS, N));
  for (uint32_t i = 0; i < N; ++i)
    shared.setWord(2 + i, structPointer(static_cast<int32_t>(N - 1 - i), D, 0));
  ReadLimits tight;
  tight.traversalLimitWords = uint64_t{N} * D;  // below N * D plus the list: refused by both
  EXPECT_FALSE(FrameReader::fastAccepts(segmentOf(shared, WORDS * WORD_BYTES), tight));
  EXPECT_FALSE(FrameReader::validateWithGetters(segmentOf(shared, WORDS * WORD_BYTES), tight).ok());
  ReadLimits roomy;
  roomy.traversalLimitWords = uint64_t{N} * (D + 1) + 2 * WORDS;
  EXPECT_TRUE(FrameReader::fastAccepts(segmentOf(shared, WORDS * WORD_BYTES), roomy));

  // A null root under a budget below the two words Cap'n Proto charges for it.
  TestFrame empty(1);
  ReadLimits one;
  one.traversalLimitWords = 1;
  EXPECT_FALSE(FrameReader::fastAccepts(segmentOf(empty, WORD_BYTES), one));
}

TEST(FrameReaderCopyIn, FrameLargerThanScratchIsRefused) {
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  const size_t scratchWords = used / WORD_BYTES - 1;
  auto smallScratch = std::make_unique<capnp::word[]>(scratchWords);
  std::memset(static_cast<void*>(smallScratch.get()), 0x5A, scratchWords * WORD_BYTES);
  FrameReader reader(std::span(smallScratch.get(), scratchWords));
  auto view = reader.tryDecode(frame.bytes(used));
  EXPECT_EQ(view.code(), Errc::PROTOCOL_ERROR);
  EXPECT_NE(std::strstr(view.error().detail, "scratch"), nullptr);
  // Refused before the copy: the scratch is untouched.
  const auto* bytes = reinterpret_cast<const unsigned char*>(smallScratch.get());
  for (size_t i = 0; i < scratchWords * WORD_BYTES; ++i) ASSERT_EQ(bytes[i], 0x5A) << i;
}

INSTANTIATE_TEST_SUITE_P(BothPolicies, HostileFrame,
                         ::testing::Values(ReadPolicy::IN_PLACE, ReadPolicy::COPY_IN), policyName);

// ---------------------------------------------------------------------------------------------
// COPY_IN isolation

TEST(FrameReaderCopyIn, ReadsStayStableWhenTheSourceIsOverwrittenAfterDecode) {
  TestFrame frame(256);
  const size_t used = buildSample(frame);
  auto scratch = std::make_unique<capnp::word[]>(256);
  FrameReader reader(std::span(scratch.get(), 256));
  auto view = reader.tryDecode(frame.bytes(used));
  ASSERT_TRUE(view.ok());
  // The hostile producer rewrites the whole frame after publishing it.
  std::memset(static_cast<void*>(frame.words().data()), 0xA5, used);
  expectSample(view->getRoot<Sample>());
}

TEST(MessageView, BytesAreTheValidatedFrameForInPlaceAndTheCopyForCopyIn) {
  TestFrame frame(8);
  FrameBuilder builder(frame.words());
  builder.initRoot<Point>().setX(5);
  auto used = builder.tryFinish();
  ASSERT_TRUE(used.ok());
  FrameReader inPlace;
  auto a = inPlace.tryDecode(frame.bytes(*used));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->bytes().data(), frame.bytes(*used).data());
  EXPECT_EQ(a->bytes().size(), *used);
  auto scratch = std::make_unique<capnp::word[]>(8);
  FrameReader copyIn(std::span(scratch.get(), 8));
  auto b = copyIn.tryDecode(frame.bytes(*used));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(static_cast<const void*>(b->bytes().data()), static_cast<const void*>(scratch.get()));
  EXPECT_EQ(std::memcmp(b->bytes().data(), frame.bytes(*used).data(), *used), 0);
}

TEST(FrameReaderInPlace, ReadsTheSourceItself) {
  // The converse, showing the test above is meaningful: IN_PLACE sees later writes to the frame.
  TestFrame frame(8);
  FrameBuilder builder(frame.words());
  builder.initRoot<Point>().setX(1);
  auto used = builder.tryFinish();
  ASSERT_TRUE(used.ok());
  FrameReader reader;
  auto view = reader.tryDecode(frame.bytes(*used));
  ASSERT_TRUE(view.ok());
  frame.setWord(1, 2);  // the Point's data word
  EXPECT_EQ(view->getRoot<Point>().getX(), 2);
}

// ---------------------------------------------------------------------------------------------
// Broken preconditions are bugs in the caller: they abort with a message, never return an error.

TEST(MessagePreconditionsDeathTest, MisalignedInPlaceFrameAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TestFrame frame(4);
  FrameReader reader;
  auto misaligned = std::span(reinterpret_cast<const std::byte*>(frame.words().data()) + 4, 8);
  EXPECT_DEATH((void)reader.tryDecode(misaligned), "not 8-byte aligned");
}

TEST(MessagePreconditionsDeathTest, MisalignedBuilderFrameAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto storage = std::make_unique<uint64_t[]>(4);
  auto* bytes = reinterpret_cast<std::byte*>(storage.get()) + 4;
  std::span<capnp::word> misaligned(reinterpret_cast<capnp::word*>(bytes), 2);
  EXPECT_DEATH(FrameBuilder builder(misaligned), "not 8-byte aligned");
}

TEST(MessagePreconditionsDeathTest, PartialWordByteSpanAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  alignas(8) std::byte reservation[12] = {};
  EXPECT_DEATH((void)asFrameWords(reservation), "not whole aligned words");
}

#ifndef NDEBUG
TEST(MessagePreconditionsDeathTest, DirtyBuilderFrameAbortsInDebugBuilds) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TestFrame frame(4);
  frame.setWord(3, 1);
  EXPECT_DEATH(FrameBuilder builder(frame.words()), "not zeroed");
}
#endif

// ---------------------------------------------------------------------------------------------
// The hot path allocates nothing

TEST(MessageHotPath, BuildFinishDecodeAndReadAllocateNothingInSteadyState) {
  TestFrame frame(256);
  auto scratch = std::make_unique<capnp::word[]>(256);
  FrameReader inPlace;
  FrameReader copyIn(std::span(scratch.get(), 256));

  auto oneMessage = [&](uint64_t i) {
    std::memset(static_cast<void*>(frame.words().data()), 0,
                frame.words().size_bytes());  // the ring's re-zeroing
    FrameBuilder builder(frame.words());
    fillSample(builder.initRoot<Sample>());
    builder.getRoot<Sample>().setId(i);
    auto used = builder.tryFinish();
    ASSERT_TRUE(used.ok());
    for (FrameReader* reader : {&inPlace, &copyIn}) {
      auto view = reader->tryDecode(frame.bytes(*used));
      ASSERT_TRUE(view.ok());
      auto s = view->getRoot<Sample>();
      ASSERT_EQ(s.getId(), i);
      ASSERT_EQ(s.getTree().getChildren()[1].getChildren()[0].getValue(), 4u);
    }
  };
  oneMessage(0);  // warm-up: first-use initialisation inside KJ is not per message

  // The count sees allocations inside Cap'n Proto and KJ too (alloc_counter.cpp replaces the
  // global operator new).
  const uint64_t before = testing::allocationCount();
  for (uint64_t i = 1; i <= 100; ++i) oneMessage(i);
  EXPECT_EQ(testing::allocationCount() - before, 0u);
}

TEST(MessageHotPath, CountingHookSeesAnOverflowAllocation) {
  // Shows the hook above can fail: the overflow path does allocate.
  TestFrame frame(2);
  const uint64_t before = testing::allocationCount();
  {
    FrameBuilder builder(frame.words());
    fillSample(builder.initRoot<Sample>());
    EXPECT_EQ(builder.tryFinish().code(), Errc::MESSAGE_TOO_LARGE);
  }
  EXPECT_GT(testing::allocationCount() - before, 0u);
}

}  // namespace
}  // namespace agate
