// Round-trip scenarios between two forked parties, shared by every suite's latency figures.
//
// Party A times round trips into a SampleBuffer placed in memory shared before fork; party B
// answers. runRoundTrips forks both (runPair), waits, and turns A's samples into the figure, its
// p99 and p99.9 (Report::addLatency), with the ratio to a floor of the same run when one is named.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>
#include <utility>

#include "support/latency.h"
#include "support/process_pair.h"
#include "support/scenario.h"
#include "support/timing.h"

namespace agate::bench {

inline uint64_t secondsToNs(double s) noexcept { return static_cast<uint64_t>(s * 1e9); }

// Samples to preallocate: enough for measureSeconds at one round trip per 500 ns, within bounds.
inline size_t sampleCapacity(const RunOptions& o) noexcept {
  return std::clamp<size_t>(static_cast<size_t>(o.measureSeconds * 2e6), 10'000, 4'000'000);
}

// Party A's measuring loop: warms up for warmupSeconds, then times each call of `roundTrip` until
// measureSeconds have passed or the buffer is full. One clock read per sample: the end of one
// round trip is the start of the next. Returns false as soon as roundTrip does (the protocol
// broke).
template <class RoundTrip>
bool recordRoundTrips(const RunOptions& o, SampleBuffer& samples, RoundTrip&& roundTrip) {
  const uint64_t warmEnd = nowNs() + secondsToNs(o.warmupSeconds);
  while (nowNs() < warmEnd) {
    if (!roundTrip()) return false;
  }
  const uint64_t end = nowNs() + secondsToNs(o.measureSeconds);
  uint64_t t0 = nowNs();
  for (;;) {
    if (!roundTrip()) return false;
    const uint64_t t1 = nowNs();
    if (!samples.tryRecord(t1 - t0) || t1 >= end) return true;
    t0 = t1;
  }
}

// A sample buffer in its own shared mapping, made before fork.
struct SharedSamples {
  SharedMapping mapping;
  SampleBuffer* buffer;

  static Result<SharedSamples> tryCreate(size_t capacity) {
    auto m = SharedMapping::tryCreate(SampleBuffer::bytesFor(capacity));
    if (!m) return m.error();
    SampleBuffer* b = SampleBuffer::createAt(m->data(), capacity);
    return SharedSamples{std::move(*m), b};
  }
};

// Runs a round-trip scenario: A records, B answers; then the summary becomes three figures named
// after the scenario, compared with `floor` (a median figure of the same run) when not empty.
inline Status runRoundTrips(const Scenario& scenario, const RunOptions& o, Report& report,
                            const std::function<int(SampleBuffer&)>& partyA,
                            const PartyBody& partyB, std::string_view floor = {}) {
  auto samples = SharedSamples::tryCreate(sampleCapacity(o));
  if (!samples) return samples.error();
  SampleBuffer& buffer = *samples->buffer;
  auto placement = runPair(
      o.pairOptions(), [&] { return partyA(buffer); }, partyB);
  if (!placement) return placement.error();
  const LatencySummary summary = summarize(buffer.samples());
  if (summary.count == 0) return Error(Errc::FAILED, "party A recorded no samples");
  report.addLatency(scenario.name, scenario.name, scenario.unit, summary, floor);
  report.addPlacement(scenario.name, {placement->cpuA, placement->cpuB});
  return {};
}

}  // namespace agate::bench
