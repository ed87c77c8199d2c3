#include "support/latency.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <vector>

namespace agate::bench {
namespace {

// Storage for a SampleBuffer of `capacity` samples, 8-byte aligned.
std::vector<uint64_t> storageFor(size_t capacity) {
  return std::vector<uint64_t>(SampleBuffer::bytesFor(capacity) / sizeof(uint64_t) + 1);
}

TEST(SampleBuffer, RecordsSamplesInOrder) {
  auto storage = storageFor(4);
  SampleBuffer* b = SampleBuffer::createAt(storage.data(), 4);
  EXPECT_TRUE(b->tryRecord(30));
  EXPECT_TRUE(b->tryRecord(10));
  const auto s = b->samples();
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0], 30u);
  EXPECT_EQ(s[1], 10u);
  EXPECT_FALSE(b->full());
}

TEST(SampleBuffer, FullBufferRefusesARecordAndKeepsItsSamples) {
  auto storage = storageFor(2);
  SampleBuffer* b = SampleBuffer::createAt(storage.data(), 2);
  ASSERT_TRUE(b->tryRecord(1));
  ASSERT_TRUE(b->tryRecord(2));
  EXPECT_TRUE(b->full());
  EXPECT_FALSE(b->tryRecord(3));
  const auto s = b->samples();
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0], 1u);
  EXPECT_EQ(s[1], 2u);
}

TEST(NearestRank, PicksTheSmallestSampleCoveringTheQuantile) {
  std::vector<uint64_t> sorted(1000);
  std::iota(sorted.begin(), sorted.end(), 1);  // 1..1000
  EXPECT_EQ(nearestRank(sorted, 0.5), 500u);
  EXPECT_EQ(nearestRank(sorted, 0.99), 990u);
  EXPECT_EQ(nearestRank(sorted, 0.999), 999u);
  EXPECT_EQ(nearestRank(sorted, 1.0), 1000u);
  EXPECT_EQ(nearestRank(sorted, 0.0001), 1u);
}

TEST(NearestRank, OfOneSampleIsThatSample) {
  const std::vector<uint64_t> one = {42};
  EXPECT_EQ(nearestRank(one, 0.5), 42u);
  EXPECT_EQ(nearestRank(one, 0.999), 42u);
}

TEST(NearestRankDeathTest, QuantileOutsideTheUnitIntervalIsABrokenPrecondition) {
  const std::vector<uint64_t> one = {42};
  EXPECT_DEATH((void)nearestRank(one, 0.0), "precondition violated");
  EXPECT_DEATH((void)nearestRank(one, 1.5), "precondition violated");
}

TEST(Summarize, SortsAndReportsOrderStatistics) {
  std::vector<uint64_t> samples;
  for (uint64_t v = 1000; v >= 1; --v) samples.push_back(v);  // descending 1000..1
  const LatencySummary s = summarize(samples);
  EXPECT_EQ(s.count, 1000u);
  EXPECT_EQ(s.min, 1u);
  EXPECT_EQ(s.median, 500u);
  EXPECT_EQ(s.p99, 990u);
  EXPECT_EQ(s.p999, 999u);
  EXPECT_EQ(s.max, 1000u);
  EXPECT_DOUBLE_EQ(s.mean, 500.5);
  EXPECT_TRUE(std::is_sorted(samples.begin(), samples.end()));
}

TEST(Summarize, OneOutlierMovesTheTailNotTheMedian) {
  std::vector<uint64_t> samples(999, 100);
  samples.push_back(1'000'000);
  const LatencySummary s = summarize(samples);
  EXPECT_EQ(s.median, 100u);
  EXPECT_EQ(s.p99, 100u);
  EXPECT_EQ(s.p999, 100u);  // rank 999 of 1000: still the body
  EXPECT_EQ(s.max, 1'000'000u);
}

TEST(Summarize, NoSamplesGiveAnAllZeroSummary) {
  std::vector<uint64_t> none;
  const LatencySummary s = summarize(none);
  EXPECT_EQ(s.count, 0u);
  EXPECT_EQ(s.median, 0u);
  EXPECT_EQ(s.max, 0u);
}

}  // namespace
}  // namespace agate::bench
