// Fuzz targets: functions that take arbitrary bytes and must neither crash, nor let an exception
// escape, nor break an invariant (checked with AGATE_ASSERT, which aborts and so is reported by
// libFuzzer and by the randomized gtest alike).
//
// Each target is driven two ways (see README.md): by libFuzzer (clang, -DAGATE_FUZZ=ON), and by a
// seeded randomized gtest that runs in every CI build. A new decoder (e.g. the ring's frame
// header) adds one function here and one row to FUZZ_TARGETS.
#pragma once

#include <cstddef>
#include <span>

namespace agate::fuzz {

// What a target made of one input; the randomized test checks that both occur often, so the
// inputs really reach the code past the first checks.
enum class FuzzOutcome { ACCEPTED, REFUSED };

// Decodes `input` as a single-segment Cap'n Proto frame under both read policies and checks that
// they agree; reads an accepted message against the test schema and through AnyPointer; copies it
// into a FrameBuilder and checks the copy decodes and equals the original.
FuzzOutcome fuzzCapnpFrame(std::span<const std::byte> input);

struct FuzzTarget {
  const char* name;
  FuzzOutcome (*run)(std::span<const std::byte> input);
};

inline constexpr FuzzTarget FUZZ_TARGETS[] = {
    {"capnp_frame", fuzzCapnpFrame},
};

}  // namespace agate::fuzz
