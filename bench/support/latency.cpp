#include "support/latency.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "agate/runtime/result.h"

namespace agate::bench {

size_t SampleBuffer::bytesFor(size_t capacity) noexcept {
  return sizeof(SampleBuffer) + capacity * sizeof(uint64_t);
}

SampleBuffer* SampleBuffer::createAt(void* memory, size_t capacity) noexcept {
  AGATE_REQUIRE(reinterpret_cast<uintptr_t>(memory) % alignof(SampleBuffer) == 0,
                "sample memory %p is not aligned", memory);
  auto* buffer = new (memory) SampleBuffer(capacity);
  std::memset(buffer->data(), 0, capacity * sizeof(uint64_t));  // pre-fault every page
  return buffer;
}

std::span<uint64_t> SampleBuffer::samples() noexcept {
  const size_t n = std::min(count_.load(std::memory_order_acquire), capacity_);
  return {data(), n};
}

uint64_t nearestRank(std::span<const uint64_t> sorted, double q) noexcept {
  AGATE_REQUIRE(!sorted.empty(), "no samples");
  AGATE_REQUIRE(q > 0 && q <= 1, "quantile %f outside (0, 1]", q);
  const auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

LatencySummary summarize(std::span<uint64_t> samples) {
  LatencySummary s;
  if (samples.empty()) return s;
  std::sort(samples.begin(), samples.end());
  s.count = samples.size();
  s.min = samples.front();
  s.max = samples.back();
  s.median = nearestRank(samples, 0.5);
  s.p99 = nearestRank(samples, 0.99);
  s.p999 = nearestRank(samples, 0.999);
  double sum = 0;
  for (uint64_t v : samples) sum += static_cast<double>(v);
  s.mean = sum / static_cast<double>(samples.size());
  return s;
}

}  // namespace agate::bench
