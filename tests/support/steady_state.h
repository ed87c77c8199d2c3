// The steady-state allocation check for hot paths that run on an EventLoop.
//
// "Allocates nothing in steady state" means: after a warm-up, running the hot path again makes no
// heap allocation. One kind of heap traffic is bounded and legitimate even then: the loop's frame
// arena growing because the number of live frames and operation nodes set a new peak. A loaded
// machine can set one after any warm-up: an io_uring operation whose promise already completed
// lives until the kernel's completion for its cancellation arrives, and a busy machine delivers
// those later (frame_arena.h). A peak is set a bounded number of times; a per-call allocation, or
// a frame leaked per call, comes back in every run.
//
// So expectNoAllocationsInSteadyState(loop, round, what) runs `round` up to `attempts` times, and
//   * fails at once when a run allocated anything other than the arena's growth, and
//   * passes on the first run that allocated nothing at all, and fails when none did.
// A quiet machine passes on the first run, as a plain before/after count would.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "agate/runtime/event_loop.h"
#include "support/alloc_counter.h"

namespace agate::testing {

// A failure is reported at the caller's line (the builtins, not std::source_location, which
// clang 14 with libstdc++ 12 lacks).
template <class Round>
void expectNoAllocationsInSteadyState(EventLoop& loop, Round&& round, const char* what,
                                      int attempts = 3, const char* file = __builtin_FILE(),
                                      int line = __builtin_LINE()) {
  std::string grown;
  for (int run = 1; run <= attempts; ++run) {
    const uint64_t heapBefore = allocationCount();
    const uint64_t arenaBefore = loop.arena().heapAllocations();
    round();
    const uint64_t heap = allocationCount() - heapBefore;
    const uint64_t arena = loop.arena().heapAllocations() - arenaBefore;
    if (::testing::Test::HasFatalFailure()) return;
    if (heap == 0) return;
    if (heap != arena) {
      ADD_FAILURE_AT(file, line) << heap << " heap allocation(s) during " << what << " (run " << run
                                 << "), of which " << arena << " grew the loop's frame arena";
      return;
    }
    grown += (grown.empty() ? "" : ", ") + std::to_string(arena);
  }
  ADD_FAILURE_AT(file, line) << "the loop's frame arena grew in every one of " << attempts
                             << " runs of " << what << " (heap blocks per run: " << grown
                             << "): a frame or node is kept per call";
}

}  // namespace agate::testing
