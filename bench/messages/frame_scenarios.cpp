// Suite `messages`: building and decoding one single-segment Cap'n Proto frame, in process
// (Google Benchmark through support/in_process.h). Each scenario runs at 32 B (a test::Tree with
// no children) and 1 KiB (a test::Sample whose payload fills the frame); decoding reads two fields.
#include <sched.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include <benchmark/benchmark.h>
#include <capnp/message.h>

#include "agate/runtime/message.h"
#include "messages/messages.h"
#include "support/in_process.h"
#include "test_messages.capnp.h"

namespace agate::bench::messages {

namespace {

constexpr size_t FRAME_WORDS = 512;

// Builds the message of exactly `bytes` bytes (32 or 1024) into `frame`, which must be zero.
// Returns the bytes used, or 0 if the frame was refused.
size_t buildMessage(std::span<capnp::word> frame, size_t bytes, size_t sampleBase) {
  FrameBuilder builder(frame);
  if (bytes == 32) {
    // root pointer + Tree (1 data word, 1 pointer) + the empty children list's tag word
    builder.initRoot<test::Tree>().initChildren(0);
  } else {
    auto s = builder.initRoot<test::Sample>();
    s.setId(1);
    s.initPayload(static_cast<unsigned>(bytes - sampleBase));
  }
  auto used = builder.tryFinish();
  return used ? *used : 0;
}

// Bytes of a Sample with only its id set: the 1 KiB message's payload fills the rest.
size_t sampleBaseBytes() {
  auto probe = std::make_unique<capnp::word[]>(FRAME_WORDS);
  FrameBuilder empty(std::span(probe.get(), FRAME_WORDS));
  empty.initRoot<test::Sample>().setId(1);
  auto used = empty.tryFinish();
  return used ? *used : 0;
}

// A frame holding a message of exactly `bytes` bytes.
struct BenchFrame {
  std::unique_ptr<capnp::word[]> words = std::make_unique<capnp::word[]>(FRAME_WORDS);
  size_t used = 0;

  explicit BenchFrame(size_t bytes)
      : used(buildMessage(std::span(words.get(), FRAME_WORDS), bytes, sampleBaseBytes())) {}
  std::span<const std::byte> span() const {
    return {reinterpret_cast<const std::byte*>(words.get()), used};
  }
};

uint64_t readFields(const MessageView& view, size_t bytes) {
  if (bytes == 32) return view.getRoot<test::Tree>().getChildren().size();
  auto s = view.getRoot<test::Sample>();
  return s.getId() + s.getPayload().size();
}

Status addFigure(const Scenario& scenario, Report& report, Result<double> ns,
                 std::string_view ratioTo) {
  if (!ns) return ns.error();
  report.add(Figure{.name = std::string(scenario.name),
                    .value = *ns,
                    .unit = std::string(scenario.unit),
                    .scenario = std::string(scenario.name),
                    .samples = 0,
                    .ratioTo = std::string(ratioTo)});
  report.addPlacement(scenario.name, {sched_getcpu()});
  return {};
}

// Floor: one memcpy of the frame (the copy COPY_IN makes).
template <size_t BYTES>
Status memcpyFloor(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addFigure(scenario, report,
                   measureInProcess(scenario.name, o,
                                    [](benchmark::State& state) {
                                      BenchFrame frame(BYTES);
                                      auto scratch = std::make_unique<capnp::word[]>(FRAME_WORDS);
                                      for (auto _ : state) {
                                        std::memcpy(static_cast<void*>(scratch.get()),
                                                    frame.words.get(), BYTES);
                                        benchmark::DoNotOptimize(scratch.get());
                                        benchmark::ClobberMemory();
                                      }
                                    }),
                   {});
}

// Agate: zero the frame (as a ring reservation is), build the message in it, tryFinish().
template <size_t BYTES>
Status build(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addFigure(scenario, report,
                   measureInProcess(scenario.name, o,
                                    [](benchmark::State& state) {
                                      auto words = std::make_unique<capnp::word[]>(FRAME_WORDS);
                                      const size_t base = sampleBaseBytes();
                                      for (auto _ : state) {
                                        std::memset(static_cast<void*>(words.get()), 0, BYTES);
                                        const size_t used =
                                            buildMessage(std::span(words.get(), BYTES / WORD_BYTES),
                                                         BYTES, base);
                                        if (used != BYTES) {
                                          state.SkipWithError("the message did not fit");
                                          return;
                                        }
                                        benchmark::DoNotOptimize(words.get());
                                      }
                                    }),
                   {});
}

// Agate IN_PLACE: validate the whole message, then read two fields.
template <size_t BYTES>
Status decodeInPlace(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addFigure(scenario, report,
                   measureInProcess(scenario.name, o,
                                    [](benchmark::State& state) {
                                      BenchFrame frame(BYTES);
                                      FrameReader reader;
                                      for (auto _ : state) {
                                        auto view = reader.tryDecode(frame.span());
                                        if (!view) {
                                          state.SkipWithError("decode failed");
                                          return;
                                        }
                                        benchmark::DoNotOptimize(readFields(*view, BYTES));
                                      }
                                    }),
                   BYTES == 32 ? "peer_capnp_lazy_32b_ns" : "peer_capnp_lazy_1k_ns");
}

// Agate COPY_IN: copy into private scratch, validate the copy, then read two fields.
template <size_t BYTES>
Status decodeCopyIn(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addFigure(scenario, report,
                   measureInProcess(scenario.name, o,
                                    [](benchmark::State& state) {
                                      BenchFrame frame(BYTES);
                                      auto scratch = std::make_unique<capnp::word[]>(FRAME_WORDS);
                                      FrameReader reader(std::span(scratch.get(), FRAME_WORDS));
                                      for (auto _ : state) {
                                        auto view = reader.tryDecode(frame.span());
                                        if (!view) {
                                          state.SkipWithError("decode failed");
                                          return;
                                        }
                                        benchmark::DoNotOptimize(readFields(*view, BYTES));
                                      }
                                    }),
                   BYTES == 32 ? "decode_in_place_32b_ns" : "decode_in_place_1k_ns");
}

// Peer: Cap'n Proto's lazy SegmentArrayMessageReader, no eager validation, same two fields.
template <size_t BYTES>
Status capnpLazyPeer(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addFigure(
      scenario, report,
      measureInProcess(scenario.name, o,
                       [](benchmark::State& state) {
                         BenchFrame frame(BYTES);
                         for (auto _ : state) {
                           kj::ArrayPtr<const capnp::word> segment(frame.words.get(),
                                                                   BYTES / WORD_BYTES);
                           capnp::SegmentArrayMessageReader message(kj::arrayPtr(&segment, 1));
                           uint64_t v;
                           if constexpr (BYTES == 32) {
                             v = message.getRoot<test::Tree>().getChildren().size();
                           } else {
                             auto s = message.getRoot<test::Sample>();
                             v = s.getId() + s.getPayload().size();
                           }
                           benchmark::DoNotOptimize(v);
                         }
                       }),
      {});
}

// Agate IN_PLACE refusing a hostile ~10 KiB frame built to cost the most per word of traversal
// budget: 1000 pointers to one struct S whose 200 pointers all point at an empty struct.
// Validation refuses it once the default budget is spent: the most CPU one frame can cost.
Status refuseAmplifiedFrame(const Scenario& scenario, const RunOptions& o, Report& report) {
  return addFigure(
      scenario, report,
      measureInProcess(scenario.name, o,
                       [](benchmark::State& state) {
                         constexpr uint32_t N = 1000;
                         constexpr uint32_t P = 200;
                         constexpr size_t WORDS = 2 + N + P;
                         auto words = std::make_unique<uint64_t[]>(WORDS);
                         words[0] = uint64_t{1} << 48;  // root -> struct: 1 pointer
                         words[1] = 1 | (uint64_t{6} << 32) | (uint64_t{N} << 35);  // N pointers
                         for (uint32_t i = 0; i < N; ++i)  // each -> S at word 2 + N
                           words[2 + i] = (uint64_t{N - 1 - i} << 2) | (uint64_t{P} << 48);
                         for (uint32_t j = 0; j < P; ++j)  // S's pointers -> empty struct
                           words[2 + N + j] = (uint64_t{0xffffffffu} << 2) & 0xffffffffu;
                         FrameReader reader;
                         std::span<const std::byte> frame(
                             reinterpret_cast<const std::byte*>(words.get()), WORDS * WORD_BYTES);
                         for (auto _ : state) {
                           auto view = reader.tryDecode(frame);
                           if (view.ok()) {
                             state.SkipWithError("the hostile frame was accepted");
                             return;
                           }
                         }
                       }),
      {});
}

// Peers and floors first, so that Agate's figures can name them in ratioTo.
constexpr Scenario FRAME_SCENARIOS[] = {
    {"floor_memcpy_32b_ns", "ns", "memcpy of a 32-byte frame (the copy COPY_IN makes)",
     memcpyFloor<32>},
    {"floor_memcpy_1k_ns", "ns", "memcpy of a 1 KiB frame", memcpyFloor<1024>},
    {"peer_capnp_lazy_32b_ns", "ns",
     "Cap'n Proto's lazy reader over a 32-byte frame, two fields read, no eager validation",
     capnpLazyPeer<32>},
    {"peer_capnp_lazy_1k_ns", "ns", "the same over a 1 KiB frame", capnpLazyPeer<1024>},
    {"build_32b_ns", "ns", "zero a frame, build a 32-byte message in it with FrameBuilder, finish",
     build<32>},
    {"build_1k_ns", "ns", "the same for a 1 KiB message", build<1024>},
    {"decode_in_place_32b_ns", "ns",
     "FrameReader IN_PLACE: validate a 32-byte frame eagerly, read two fields", decodeInPlace<32>},
    {"decode_in_place_1k_ns", "ns", "the same for a 1 KiB frame", decodeInPlace<1024>},
    {"decode_copy_in_32b_ns", "ns",
     "FrameReader COPY_IN: copy a 32-byte frame to scratch, validate the copy, read two fields",
     decodeCopyIn<32>},
    {"decode_copy_in_1k_ns", "ns", "the same for a 1 KiB frame", decodeCopyIn<1024>},
    {"refuse_amplified_frame_ns", "ns",
     "IN_PLACE refusal of a hostile 10 KiB frame that spends the whole traversal budget",
     refuseAmplifiedFrame},
};

}  // namespace

std::span<const Scenario> frameScenarios() { return FRAME_SCENARIOS; }

}  // namespace agate::bench::messages
