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

// Differential test of FrameReader's two validations: `input` (cut to whole words) under several
// ReadLimits (the defaults with and without capability pointers, and a traversal budget and a
// nesting limit taken from the input, so limits' edges are met). Checks that the raw-word walk
// (fastAccepts) never accepts a segment the getter walk (validateWithGetters) refuses, and that
// tryDecode accepts exactly what the getter walk accepts. ACCEPTED when the getter walk accepts
// under the first limits.
FuzzOutcome fuzzFrameValidators(std::span<const std::byte> input);

// Lays `input` out as the producer-writable parts of a ring (control-block indices and attach
// word, data area) three ways: as one well-framed payload (so decoding is reached), as raw words,
// and as raw words folded into the ring's index range. Runs the byte-level consumer
// (Receiver::tryReceive/release) and the typed one (MessageReceiver, IN_PLACE and COPY_IN) until
// they stop, and checks: they end only with WOULD_BLOCK, PROTOCOL_ERROR (sticky) or DISCONNECTED
// (a forged senders word), every frame lies inside the data area, no more frames are served than
// the ring can hold, and both read policies accept the same messages. ACCEPTED when at least one
// message was accepted.
FuzzOutcome fuzzRingConsumer(std::span<const std::byte> input);

// Feeds `input` as a sequence of frames (repeated [u8 words][words * 8 bytes]) from a hostile
// peer into an RpcConnection serving a test object, lets the peer detach, and checks that the
// connection ends with DISCONNECTED or PROTOCOL_ERROR, leaves no call running and leaks no
// object. ACCEPTED when no frame made it abort. Its inputs have their own shape, so it is driven
// by rpc_fuzz_test (seeded with valid RPC conversations) rather than the shared FUZZ_TARGETS
// list below, and by libFuzzer as fuzz_rpc_connection.
FuzzOutcome fuzzRpcConnection(std::span<const std::byte> input);

struct FuzzTarget {
  const char* name;
  FuzzOutcome (*run)(std::span<const std::byte> input);
};

inline constexpr FuzzTarget FUZZ_TARGETS[] = {
    {"capnp_frame", fuzzCapnpFrame},
    {"frame_validators", fuzzFrameValidators},
    {"ring_consumer", fuzzRingConsumer},
};

}  // namespace agate::fuzz
