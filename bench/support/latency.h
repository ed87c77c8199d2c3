// Latency samples and their percentiles.
//
// A benchmark records one sample per operation into a SampleBuffer whose storage was allocated
// before the measurement began, so recording never allocates and never takes a lock. The buffer
// may live in shared memory: a forked party records into it and the driver summarizes it after
// the party has exited. Percentiles are computed once, at the end, by sorting the samples.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>

namespace agate::bench {

// A fixed-capacity array of uint64_t samples placed in caller-provided memory.
// Threading: one writer (tryRecord) at a time; samples() only after the writer has finished
// (for a forked writer: after waitpid). Neither copies nor moves: it is addressed in place.
class SampleBuffer {
 public:
  // Bytes of memory createAt needs for `capacity` samples.
  static size_t bytesFor(size_t capacity) noexcept;

  // Builds an empty buffer at `memory`, which must be 8-byte aligned, hold bytesFor(capacity)
  // bytes and outlive the buffer. Touches every page, so recording never takes a page fault.
  static SampleBuffer* createAt(void* memory, size_t capacity) noexcept;

  SampleBuffer(const SampleBuffer&) = delete;
  SampleBuffer& operator=(const SampleBuffer&) = delete;

  // Appends one sample; returns false, recording nothing, when the buffer is full.
  bool tryRecord(uint64_t sample) noexcept {
    const size_t n = count_.load(std::memory_order_relaxed);  // this party is the only writer
    if (n == capacity_) return false;
    data()[n] = sample;
    // Release: a reader that sees count n+1 also sees the sample it covers.
    count_.store(n + 1, std::memory_order_release);
    return true;
  }

  bool full() const noexcept { return count_.load(std::memory_order_relaxed) == capacity_; }
  size_t capacity() const noexcept { return capacity_; }

  // The samples recorded so far. The count is read once and clamped to the capacity, since a
  // writer in another process could have left anything in shared memory.
  std::span<uint64_t> samples() noexcept;

 private:
  explicit SampleBuffer(size_t capacity) noexcept : capacity_(capacity) {}
  uint64_t* data() noexcept { return reinterpret_cast<uint64_t*>(this + 1); }

  const size_t capacity_;
  std::atomic<size_t> count_{0};
};
static_assert(sizeof(SampleBuffer) % alignof(uint64_t) == 0, "samples follow the header aligned");

// Order statistics of a set of samples. All zero when there were no samples.
struct LatencySummary {
  size_t count = 0;
  uint64_t min = 0;
  uint64_t median = 0;
  uint64_t p99 = 0;
  uint64_t p999 = 0;
  uint64_t max = 0;
  double mean = 0;
};

// The nearest-rank q-quantile of `sorted` (ascending, non-empty): the smallest sample such that at
// least a fraction q of all samples are <= it. q in (0, 1].
uint64_t nearestRank(std::span<const uint64_t> sorted, double q) noexcept;

// Sorts `samples` in place and summarizes them.
LatencySummary summarize(std::span<uint64_t> samples);

}  // namespace agate::bench
