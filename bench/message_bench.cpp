// Decoding a frame with runtime/message.h: what eager validation costs, and what COPY_IN adds to
// IN_PLACE. Rough, in-process figures (Google Benchmark); each scenario runs at 32 B and 1 KiB.
//   floor: memcpy of the frame (the copy COPY_IN makes)
//   peer:  Cap'n Proto's own lazy reader (no eager validation) reading the same two fields
#include <benchmark/benchmark.h>
#include <capnp/message.h>

#include <cstring>
#include <memory>

#include "agate/runtime/message.h"
#include "test_messages.capnp.h"

namespace agate {
namespace {

constexpr size_t FRAME_WORDS = 512;

// A frame holding a message of exactly `bytes` bytes (32 or 1024).
struct BenchFrame {
  std::unique_ptr<capnp::word[]> words = std::make_unique<capnp::word[]>(FRAME_WORDS);
  size_t used = 0;

  explicit BenchFrame(size_t bytes) {
    FrameBuilder builder(std::span(words.get(), FRAME_WORDS));
    if (bytes == 32) {
      // root pointer + Tree (1 data word, 1 pointer) + the empty children list's tag word
      builder.initRoot<test::Tree>().initChildren(0);
    } else {
      // A Sample whose payload fills the frame up to `bytes`: measure the empty one first.
      size_t base;
      {
        auto probe = std::make_unique<capnp::word[]>(FRAME_WORDS);
        FrameBuilder empty(std::span(probe.get(), FRAME_WORDS));
        empty.initRoot<test::Sample>().setId(1);
        base = empty.tryFinish().value();
      }
      auto s = builder.initRoot<test::Sample>();
      s.setId(1);
      s.initPayload(static_cast<unsigned>(bytes - base));
    }
    used = builder.tryFinish().value();
    if (used != bytes) std::abort();
  }
  std::span<const std::byte> span() const {
    return {reinterpret_cast<const std::byte*>(words.get()), used};
  }
};

uint64_t readFields(const MessageView& view, size_t bytes) {
  if (bytes == 32) return view.getRoot<test::Tree>().getChildren().size();
  auto s = view.getRoot<test::Sample>();
  return s.getId() + s.getPayload().size();
}

// Floor: copying the frame once.
void memcpyFloor(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  BenchFrame frame(bytes);
  auto scratch = std::make_unique<capnp::word[]>(FRAME_WORDS);
  for (auto _ : state) {
    std::memcpy(static_cast<void*>(scratch.get()), frame.words.get(), bytes);
    benchmark::DoNotOptimize(scratch.get());
    benchmark::ClobberMemory();
  }
}

// Agate IN_PLACE: validate the whole message, then read two fields.
void decodeInPlace(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  BenchFrame frame(bytes);
  FrameReader reader;
  for (auto _ : state) {
    auto view = reader.tryDecode(frame.span());
    benchmark::DoNotOptimize(readFields(view.value(), bytes));
  }
}

// Agate COPY_IN: copy into scratch, validate the copy, then read two fields.
void decodeCopyIn(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  BenchFrame frame(bytes);
  auto scratch = std::make_unique<capnp::word[]>(FRAME_WORDS);
  FrameReader reader(std::span(scratch.get(), FRAME_WORDS));
  for (auto _ : state) {
    auto view = reader.tryDecode(frame.span());
    benchmark::DoNotOptimize(readFields(view.value(), bytes));
  }
}

// Peer: Cap'n Proto's lazy SegmentArrayMessageReader, no eager validation, same two fields.
void capnpLazyPeer(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  BenchFrame frame(bytes);
  for (auto _ : state) {
    kj::ArrayPtr<const capnp::word> segment(frame.words.get(), bytes / WORD_BYTES);
    capnp::SegmentArrayMessageReader message(kj::arrayPtr(&segment, 1));
    uint64_t v;
    if (bytes == 32) {
      v = message.getRoot<test::Tree>().getChildren().size();
    } else {
      auto s = message.getRoot<test::Sample>();
      v = s.getId() + s.getPayload().size();
    }
    benchmark::DoNotOptimize(v);
  }
}

// Agate IN_PLACE, a hostile ~10 KiB frame built to cost the most per word of traversal budget:
// 1000 pointers to one struct S whose 200 pointers all point at an empty struct. Validation
// refuses it once the default budget is spent; this is the worst a frame can make it work.
void refuseAmplifiedFrame(benchmark::State& state) {
  constexpr uint32_t N = 1000;
  constexpr uint32_t P = 200;
  constexpr size_t WORDS = 2 + N + P;
  auto words = std::make_unique<uint64_t[]>(WORDS);
  words[0] = uint64_t{1} << 48;                              // root -> struct: 1 pointer
  words[1] = 1 | (uint64_t{6} << 32) | (uint64_t{N} << 35);  // -> list of N pointers
  for (uint32_t i = 0; i < N; ++i)                           // each -> S at word 2 + N
    words[2 + i] = (uint64_t{N - 1 - i} << 2) | (uint64_t{P} << 48);
  for (uint32_t j = 0; j < P; ++j)                                  // S's pointers -> empty struct
    words[2 + N + j] = (uint64_t{0xffffffffu} << 2) & 0xffffffffu;  // offset -1: zero-sized
  FrameReader reader;
  std::span<const std::byte> frame(reinterpret_cast<const std::byte*>(words.get()),
                                   WORDS * WORD_BYTES);
  for (auto _ : state) {
    auto view = reader.tryDecode(frame);
    if (view.ok()) std::abort();
  }
}

BENCHMARK(memcpyFloor)->Arg(32)->Arg(1024);
BENCHMARK(decodeInPlace)->Arg(32)->Arg(1024);
BENCHMARK(decodeCopyIn)->Arg(32)->Arg(1024);
BENCHMARK(capnpLazyPeer)->Arg(32)->Arg(1024);
BENCHMARK(refuseAmplifiedFrame);

}  // namespace
}  // namespace agate

BENCHMARK_MAIN();
