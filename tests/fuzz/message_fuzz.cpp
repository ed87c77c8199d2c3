// The Cap'n Proto frame fuzz target: runtime/message.h's build and read sides.
#include <capnp/any.h>

#include <cstring>
#include <memory>

#include "agate/runtime/message.h"
#include "fuzz_targets.h"
#include "test_messages.capnp.h"

namespace agate::fuzz {
namespace {

// Small limits keep each input fast; they are still far above what the seeds need.
ReadLimits fuzzLimits() {
  ReadLimits limits;
  limits.maxFrameBytes = 64 * 1024;
  limits.traversalLimitWords = 16 * 1024;
  limits.nestingLimit = 24;
  return limits;
}

// Reads every field of a Sample once, the way a server would read a request.
void readSample(test::Sample::Reader s) {
  uint64_t sink = s.getId() + s.getFlag();
  sink += s.getName().size() + s.getPayload().size();
  for (uint32_t v : s.getValues()) sink += v;
  for (auto p : s.getPoints())
    sink += static_cast<uint64_t>(p.getX()) + static_cast<uint64_t>(p.getY());
  for (auto t : s.getTags()) sink += t.size();
  sink += static_cast<uint64_t>(s.getOrigin().getY());
  auto tree = s.getTree();
  sink += tree.getValue() + tree.getChildren().size();
  switch (s.getChoice().which()) {
    case test::Sample::Choice::NONE:
      break;
    case test::Sample::Choice::COUNT:
      sink += s.getChoice().getCount();
      break;
    case test::Sample::Choice::LABEL:
      sink += s.getChoice().getLabel().size();
      break;
  }
  asm volatile("" : : "r"(sink));  // keep the reads
}

}  // namespace

FuzzOutcome fuzzCapnpFrame(std::span<const std::byte> input) {
  const ReadLimits limits = fuzzLimits();
  const size_t words = (input.size() + WORD_BYTES - 1) / WORD_BYTES;

  // An exactly sized, aligned copy, so a read one word past the frame is an ASan report.
  auto frame = std::make_unique<capnp::word[]>(words == 0 ? 1 : words);
  if (!input.empty()) std::memcpy(frame.get(), input.data(), input.size());
  std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(frame.get()), input.size());

  auto scratch = std::make_unique<capnp::word[]>(limits.maxFrameBytes / WORD_BYTES);
  FrameReader inPlace(limits);
  FrameReader copyIn(std::span(scratch.get(), limits.maxFrameBytes / WORD_BYTES), limits);

  // Read side: both policies reach the same verdict for the same bytes.
  auto a = inPlace.tryDecode(bytes);
  auto b = copyIn.tryDecode(bytes);
  AGATE_ASSERT(a.code() == b.code(), "in-place says %s, copy-in says %s", errcName(a.code()),
               errcName(b.code()));
  if (!a.ok()) {
    AGATE_ASSERT(a.code() == Errc::PROTOCOL_ERROR, "refusal is %s", errcName(a.code()));
    AGATE_ASSERT(std::strcmp(a.error().detail, b.error().detail) == 0, "details differ: %s / %s",
                 a.error().detail, b.error().detail);
    return FuzzOutcome::REFUSED;
  }

  // An accepted message: one schema-less pass must not throw (validation covered it) ...
  capnp::MessageSize size{};
  try {
    size = a->getRoot<capnp::AnyPointer>().targetSize();
  } catch (const kj::Exception& e) {
    AGATE_ASSERT(false, "a validated message threw: %s", e.getDescription().cStr());
  }
  AGATE_ASSERT(size.capCount == 0, "validated message holds %u caps", size.capCount);
  // ... and typed reading is either fine or a clean schema mismatch.
  Status typed = b->tryRead<test::Sample>(readSample);
  AGATE_ASSERT(typed.ok() || typed.code() == Errc::PROTOCOL_ERROR, "tryRead gave %s",
               errcName(typed.code()));

  // Build side: copy the message into a frame of the input's size. A copy duplicates objects a
  // hostile message shares, so it may not fit: then it must be refused, never spill silently.
  auto source = inPlace.tryDecode(bytes);  // fresh traversal budget for the copy
  AGATE_ASSERT(source.ok(), "second decode of the same bytes failed");
  const size_t outWords = words + 1;
  auto out = std::make_unique<capnp::word[]>(outWords);
  size_t built = 0;
  bool fits = false;
  {
    FrameBuilder builder(std::span(out.get(), outWords));
    try {
      builder.getRoot<capnp::AnyPointer>().set(source->getRoot<capnp::AnyPointer>());
    } catch (const kj::Exception& e) {
      AGATE_ASSERT(false, "copying a validated message threw: %s", e.getDescription().cStr());
    }
    auto finished = builder.tryFinish();
    AGATE_ASSERT(finished.ok() != builder.overflowed(), "tryFinish %s but overflowed=%d",
                 errcName(finished.code()), builder.overflowed());
    AGATE_ASSERT(builder.usedBytes() <= outWords * WORD_BYTES, "used %zu of %zu bytes",
                 builder.usedBytes(), outWords * WORD_BYTES);
    if (finished.ok()) {
      fits = true;
      built = *finished;
    } else {
      AGATE_ASSERT(finished.code() == Errc::MESSAGE_TOO_LARGE, "refusal is %s",
                   errcName(finished.code()));
    }
  }
  if (!fits) return FuzzOutcome::ACCEPTED;

  // What the builder committed decodes, and equals what was copied.
  ReadLimits checkLimits = limits;
  checkLimits.maxFrameBytes = outWords * WORD_BYTES;
  FrameReader check(checkLimits);
  auto copy = check.tryDecode(std::span(reinterpret_cast<const std::byte*>(out.get()), built));
  AGATE_ASSERT(copy.ok(), "a built frame of %zu bytes was refused: %s", built,
               copy.ok() ? "" : copy.error().detail);
  auto original = inPlace.tryDecode(bytes);
  AGATE_ASSERT(original.ok(), "third decode of the same bytes failed");
  try {
    auto eq = original->getRoot<capnp::AnyPointer>().equals(copy->getRoot<capnp::AnyPointer>());
    AGATE_ASSERT(eq == capnp::Equality::EQUAL, "the copy differs from the original (%d)",
                 static_cast<int>(eq));
  } catch (const kj::Exception& e) {
    AGATE_ASSERT(false, "comparing validated messages threw: %s", e.getDescription().cStr());
  }
  return FuzzOutcome::ACCEPTED;
}

FuzzOutcome fuzzFrameValidators(std::span<const std::byte> input) {
  const size_t words = input.size() / WORD_BYTES;
  // An exactly sized, aligned copy, so a read one word past the segment is an ASan report.
  auto frame = std::make_unique<capnp::word[]>(words == 0 ? 1 : words);
  if (words > 0) std::memcpy(frame.get(), input.data(), words * WORD_BYTES);
  const kj::ArrayPtr<const capnp::word> segment(frame.get(), words);
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(frame.get()),
                                         words * WORD_BYTES);

  uint64_t shape = 0;  // limits taken from the input's last bytes
  if (!input.empty()) {
    std::memcpy(&shape, input.data() + input.size() - std::min<size_t>(input.size(), 8),
                std::min<size_t>(input.size(), 8));
  }
  ReadLimits limits[4] = {fuzzLimits(), fuzzLimits(), fuzzLimits(), fuzzLimits()};
  limits[1].allowCapabilityPointers = true;
  limits[2].allowCapabilityPointers = true;
  limits[2].traversalLimitWords = shape % (4 * words + 8);
  limits[3].nestingLimit = static_cast<int>(shape % 12);
  limits[3].allowCapabilityPointers = (shape & 0x100) != 0;

  bool accepted = false;
  auto scratch = std::make_unique<capnp::word[]>(words == 0 ? 1 : words);
  for (size_t i = 0; i < std::size(limits); ++i) {
    const bool fast = FrameReader::fastAccepts(segment, limits[i]);
    const Status generic = FrameReader::validateWithGetters(segment, limits[i]);
    AGATE_ASSERT(!fast || generic.ok(),
                 "the raw-word walk accepted a segment the getter walk refuses (limits %zu: %s)", i,
                 generic.ok() ? "" : generic.error().detail);
    if (words > 0 && i == 0) {  // the whole decode once (refusals throw: costly under TSan)
      FrameReader copyIn(std::span(scratch.get(), words), limits[i]);
      const bool decoded = copyIn.tryDecode(bytes).ok();
      AGATE_ASSERT(decoded == generic.ok(), "tryDecode and the getter walk disagree (limits %zu)",
                   i);
    }
    if (i == 0) accepted = generic.ok();
  }
  return accepted ? FuzzOutcome::ACCEPTED : FuzzOutcome::REFUSED;
}

}  // namespace agate::fuzz
