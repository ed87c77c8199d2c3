#include "agate/runtime/message.h"

#include <kj/string.h>

#include <algorithm>
#include <bit>
#include <cstring>

namespace agate {
namespace {

// kj::Exception carries a heap-allocated description; Error carries a static one. Map the
// description onto a fixed set of static details, so a caller can log why a frame was refused.
const char* describeMalformed(const kj::Exception& e) {
  kj::StringPtr text = e.getDescription();
  auto mentions = [&](const char* needle) { return strstr(text.cStr(), needle) != nullptr; };
  if (mentions("traversal limit"))
    return "message exceeds the traversal limit (ReadLimits::traversalLimitWords)";
  if (mentions("deeply-nested")) return "message nests deeper than ReadLimits::nestingLimit";
  if (mentions("far pointer") || mentions("FAR pointer") || mentions("double-far"))
    return "message holds a far pointer that does not resolve inside the single-segment frame";
  if (mentions("out-of-bounds")) return "message holds a pointer outside the frame";
  return "message is malformed";
}

// The raw-word walk behind FrameReader::fastAccepts. It visits exactly the pointers the getter
// walk visits (every pointer of every struct, list element and struct element reachable from the
// root, shared targets once per pointer to them), in the same order, and declines (returns
// false) at the first thing it does not prove harmless. Proof obligations, against what Cap'n
// Proto's getters check on the same path:
//  * bounds: every object a pointer designates lies inside the segment (the getters require the
//    same, or read a zero-sized object at the segment's end, which is declined here);
//  * traversal: it charges two words for the root pointer and, per pointer followed, the
//    object's words plus one (plus the tag of a struct list); the getters charge the root word
//    twice and each object's words, so they never charge more than this walk, which declines
//    past the limit;
//  * nesting: a reader holding `remaining` levels may follow a pointer when remaining > 0 and
//    hands remaining - 1 to what it reaches (one more for an element of a list of structs, and
//    the getter walk steps into element 0 of a list of primitives as a struct); this walk
//    requires remaining > 1 at each such step, one level of margin;
//  * kinds: struct, list (bytes to words, pointers, structs with a non-zero size), and a
//    capability pointer (exactly Cap'n Proto's encoding) only where allowed. Far pointers, lists
//    of bits or voids with elements, other pointer kinds and a list-of-structs tag that is not a
//    struct tag or whose elements overrun the list are declined.
class FastWalk {
 public:
  FastWalk(kj::ArrayPtr<const capnp::word> segment, const ReadLimits& limits) noexcept
      : words_(segment.begin()),
        size_(segment.size()),
        budget_(limits.traversalLimitWords),
        allowCaps_(limits.allowCapabilityPointers) {}

  bool root(int nestingLimit) noexcept {
    // Cap'n Proto charges the root pointer's word twice (the message's and the pointer's check).
    if (size_ == 0 || !charge(2)) return false;
    const uint64_t p = load(0);
    if (p == 0) return true;  // a null root reads as the default struct
    if ((p & KIND_MASK) != STRUCT) return false;
    return pointer(0, p, nestingLimit);
  }

 private:
  static constexpr uint64_t KIND_MASK = 3;
  static constexpr uint64_t STRUCT = 0, LIST = 1, OTHER = 3;
  static constexpr uint64_t CAPABILITY_LOW_WORD = OTHER;  // the rest of the low word 0
  // List element sizes (Cap'n Proto's ElementSize).
  static constexpr uint64_t VOID = 0, BIT = 1, BYTE = 2, EIGHT_BYTES = 5, POINTER = 6;

  uint64_t load(size_t index) const noexcept {
    uint64_t v;
    std::memcpy(&v, words_ + index, sizeof v);
    return v;
  }
  bool charge(uint64_t words) noexcept {
    if (words > budget_) return false;
    budget_ -= words;
    return true;
  }
  // Where the object of `words` words that pointer `p` at word `at` designates begins, if it
  // lies inside the segment: the target is at + 1 + the signed 30-bit offset in bits 2..31.
  bool locate(size_t at, uint64_t p, uint64_t words, size_t& target) const noexcept {
    const int64_t offset = static_cast<int32_t>(static_cast<uint32_t>(p)) >> 2;
    const int64_t t = static_cast<int64_t>(at) + 1 + offset;
    if (t < 0 || static_cast<uint64_t>(t) > size_ || words > size_ - static_cast<uint64_t>(t))
      return false;
    target = static_cast<size_t>(t);
    return true;
  }
  // The pointer section of a struct at `target`, read by a reader holding `remaining` levels.
  bool pointers(size_t first, uint64_t count, int remaining) noexcept {
    for (uint64_t i = 0; i < count; ++i) {
      const uint64_t p = load(first + i);
      if (p != 0 && !pointer(first + i, p, remaining)) return false;
    }
    return true;
  }
  bool pointer(size_t at, uint64_t p, int remaining) noexcept {
    if ((p & 0xffff'ffffu) == CAPABILITY_LOW_WORD) return allowCaps_;
    if (remaining <= 1) return false;
    switch (p & KIND_MASK) {
      case STRUCT: {
        const uint64_t data = (p >> 32) & 0xffff;
        const uint64_t count = p >> 48;
        size_t target = 0;
        if (!locate(at, p, data + count, target) || !charge(data + count + 1)) return false;
        return pointers(target + data, count, remaining - 1);
      }
      case LIST: {
        const uint64_t elementSize = (p >> 32) & 7;
        const uint64_t count = p >> 35;  // elements, or words for a list of structs
        size_t target = 0;
        if (elementSize == VOID || elementSize == BIT) {
          return count == 0 && locate(at, p, 0, target) && charge(1);
        }
        if (elementSize <= EIGHT_BYTES) {
          const uint64_t bytes = count << (elementSize - BYTE);
          const uint64_t words = (bytes + WORD_BYTES - 1) / WORD_BYTES;
          if (!locate(at, p, words, target) || !charge(words + 1)) return false;
          return count == 0 || remaining - 1 > 1;  // the walk reads element 0 as a struct
        }
        if (elementSize == POINTER) {
          if (!locate(at, p, count, target) || !charge(count + 1)) return false;
          return pointers(target, count, remaining - 1);
        }
        // A list of structs: a tag word shaped as a struct pointer whose offset field is the
        // element count, then the elements.
        if (!locate(at, p, count + 1, target) || !charge(count + 2)) return false;
        const uint64_t tag = load(target);
        if ((tag & KIND_MASK) != STRUCT) return false;
        const uint64_t elements = (tag & 0xffff'ffffu) >> 2;
        const uint64_t data = (tag >> 32) & 0xffff;
        const uint64_t perElement = data + (tag >> 48);
        if (elements == 0) return true;
        if (perElement == 0 || elements * perElement > count || remaining - 1 <= 1) return false;
        for (uint64_t e = 0; e < elements; ++e) {
          if (!pointers(target + 1 + e * perElement + data, tag >> 48, remaining - 2)) return false;
        }
        return true;
      }
      default:  // FAR, or OTHER that is not a capability
        return false;
    }
  }

  const capnp::word* words_;
  size_t size_;
  uint64_t budget_;
  bool allowCaps_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// FrameBuilder

FrameBuilder::FrameBuilder(std::span<capnp::word> frame) : frame_(frame) {
  AGATE_REQUIRE(reinterpret_cast<uintptr_t>(frame.data()) % alignof(capnp::word) == 0,
                "frame at %p is not 8-byte aligned", static_cast<void*>(frame.data()));
#ifndef NDEBUG
  // The zeroing contract is the caller's; a dirty frame would corrupt messages silently.
  const auto* bytes = reinterpret_cast<const unsigned char*>(frame.data());
  AGATE_REQUIRE(
      std::all_of(bytes, bytes + frame.size_bytes(), [](unsigned char b) { return b == 0; }),
      "frame of %zu bytes is not zeroed", frame.size_bytes());
#endif
}

namespace {

// The one segment a resumed FrameBuilder starts with (Cap'n Proto reads the array only while
// the builder is constructed).
struct ResumedSegment {
  capnp::MessageBuilder::SegmentInit init;
  kj::ArrayPtr<capnp::MessageBuilder::SegmentInit> array() { return kj::arrayPtr(&init, 1); }
};

}  // namespace

FrameBuilder::FrameBuilder(std::span<capnp::word> frame, size_t wordsUsed)
    : capnp::MessageBuilder(
          ResumedSegment{{kj::arrayPtr(frame.data(), frame.size()), wordsUsed}}.array()),
      frame_(frame),
      frameHandedOut_(true) {
  AGATE_REQUIRE(reinterpret_cast<uintptr_t>(frame.data()) % alignof(capnp::word) == 0,
                "frame at %p is not 8-byte aligned", static_cast<void*>(frame.data()));
  AGATE_REQUIRE(wordsUsed >= 1 && wordsUsed <= frame.size(),
                "resuming %zu words of a frame of %zu words", wordsUsed, frame.size());
#ifndef NDEBUG
  const auto* bytes = reinterpret_cast<const unsigned char*>(frame.data() + wordsUsed);
  const size_t rest = (frame.size() - wordsUsed) * sizeof(capnp::word);
  AGATE_REQUIRE(std::all_of(bytes, bytes + rest, [](unsigned char b) { return b == 0; }),
                "frame of %zu bytes is not zeroed past its first %zu words", frame.size_bytes(),
                wordsUsed);
#endif
}

FrameBuilder::~FrameBuilder() noexcept(false) = default;

kj::ArrayPtr<capnp::word> FrameBuilder::allocateSegment(unsigned minimumSize) {
  if (!frameHandedOut_ && minimumSize <= frame_.size()) {
    frameHandedOut_ = true;
    return kj::arrayPtr(frame_.data(), frame_.size());
  }
  // Off the hot path: the message no longer fits. Cap'n Proto needs real, zeroed memory to carry
  // on building; tryFinish() refuses the message afterwards. The first call can land here too
  // (an empty frame): the frame then never becomes a segment and usedBytes() stays 0.
  overflowed_ = true;
  const size_t words = std::max<size_t>(minimumSize, 1024);
  overflowSegments_.push_back(std::make_unique<capnp::word[]>(words));  // value-initialised: zero
  return kj::arrayPtr(overflowSegments_.back().get(), words);
}

size_t FrameBuilder::usedBytes() {
  if (!frameHandedOut_) return 0;
  // Segment 0 is the frame; its used prefix is the only part the builder has written.
  auto segments = getSegmentsForOutput();
  AGATE_ASSERT(segments.size() >= 1 && segments[0].begin() == frame_.data(),
               "segment 0 is not the frame (%zu segments)", segments.size());
  return segments[0].size() * WORD_BYTES;
}

Result<size_t> FrameBuilder::tryFinish() {
  if (overflowed_)
    return Error(Errc::MESSAGE_TOO_LARGE,
                 "message outgrew its frame; the frame must not be committed");
  if (!frameHandedOut_) {
    // Nothing was ever built: Cap'n Proto would allocate the root on first use. Give the message
    // its (null) root pointer now so that what is committed is a valid, empty message.
    (void)getRoot<capnp::AnyPointer>();
    if (overflowed_)
      return Error(Errc::MESSAGE_TOO_LARGE, "frame is too small for even an empty message");
  }
  return usedBytes();
}

// ---------------------------------------------------------------------------------------------
// FrameReader

FrameReader::FrameReader(ReadLimits limits) : policy_(ReadPolicy::IN_PLACE), limits_(limits) {}

FrameReader::FrameReader(std::span<capnp::word> scratch, ReadLimits limits)
    : policy_(ReadPolicy::COPY_IN), limits_(limits), scratch_(scratch) {
  AGATE_REQUIRE(!scratch.empty(), "COPY_IN needs scratch memory");
  AGATE_REQUIRE(reinterpret_cast<uintptr_t>(scratch.data()) % alignof(capnp::word) == 0,
                "scratch at %p is not 8-byte aligned", static_cast<void*>(scratch.data()));
}

FrameReader::~FrameReader() = default;

capnp::ReaderOptions FrameReader::readerOptions(const ReadLimits& limits) {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = limits.traversalLimitWords;
  options.nestingLimit = limits.nestingLimit;
  return options;
}

Result<MessageView> FrameReader::tryDecode(std::span<const std::byte> frame) {
  Result<std::span<const std::byte>> taken = take(frame);
  if (!taken) return taken.error();
  return validate(*taken);
}

Result<std::span<const std::byte>> FrameReader::take(std::span<const std::byte> frame) {
  message_.reset();  // the previous view ends here, whatever this frame turns out to be

  // The length is the one value of the frame the caller read before us; it is a local here.
  const size_t bytes = frame.size();
  if (bytes == 0) return Error(Errc::PROTOCOL_ERROR, "frame is empty (a message has a root)");
  if (bytes % WORD_BYTES != 0)
    return Error(Errc::PROTOCOL_ERROR, "frame length is not a whole number of 8-byte words");
  if (bytes > limits_.maxFrameBytes)
    return Error(Errc::PROTOCOL_ERROR, "frame is larger than ReadLimits::maxFrameBytes");

  if (policy_ == ReadPolicy::COPY_IN) {
    if (bytes > scratch_.size_bytes())
      return Error(Errc::PROTOCOL_ERROR, "frame is larger than the reader's scratch buffer");
    // The one read of shared memory: from here on only the private copy is looked at.
    std::memcpy(scratch_.data(), frame.data(), bytes);
    return std::span<const std::byte>(reinterpret_cast<const std::byte*>(scratch_.data()), bytes);
  }
  AGATE_REQUIRE(reinterpret_cast<uintptr_t>(frame.data()) % alignof(capnp::word) == 0,
                "IN_PLACE frame at %p is not 8-byte aligned",
                static_cast<const void*>(frame.data()));
  return frame;
}

Result<MessageView> FrameReader::validate(std::span<const std::byte> taken) {
  const size_t bytes = taken.size();
  kj::ArrayPtr<const capnp::word> segment(reinterpret_cast<const capnp::word*>(taken.data()),
                                          bytes / WORD_BYTES);
  if (!fastAccepts(segment, limits_)) AGATE_TRY(validateWithGetters(segment, limits_));
  // A fresh reader, so the caller's reads get a traversal budget of their own: validation showed
  // one pass fits traversalLimitWords, and the caller may make READ_PASSES of them.
  capnp::ReaderOptions options = readerOptions(limits_);
  options.traversalLimitInWords = limits_.traversalLimitWords > UINT64_MAX / ReadLimits::READ_PASSES
                                      ? UINT64_MAX
                                      : limits_.traversalLimitWords * ReadLimits::READ_PASSES;
  message_.emplace(segment, options);
  return MessageView(&*message_, bytes);
}

Status FrameReader::validateWithGetters(kj::ArrayPtr<const capnp::word> segment,
                                        const ReadLimits& limits) {
  // The reader for validation lives on the stack and is discarded with its spent budget.
  try {
    SegmentReader validator(segment, readerOptions(limits));
    capnp::AnyPointer::Reader root = validator.getRoot<capnp::AnyPointer>();
    // Every Cap'n Proto message's root is a struct (null reads as the default struct). Checked here
    // so getRoot<T>() cannot meet a list or capability where it expects the root struct.
    const capnp::PointerType kind = root.getPointerType();
    if (kind == capnp::PointerType::NULL_) return {};
    if (kind != capnp::PointerType::STRUCT)
      return Error(Errc::PROTOCOL_ERROR, "message root is not a struct pointer");
    if (!walkStruct(root.getAs<capnp::AnyStruct>(), limits.allowCapabilityPointers))
      return Error(Errc::PROTOCOL_ERROR, "message holds a capability pointer; frames carry none");
  } catch (const kj::Exception& e) {
    return Error(Errc::PROTOCOL_ERROR, describeMalformed(e));
  }
  return {};
}

bool FrameReader::fastAccepts(kj::ArrayPtr<const capnp::word> segment,
                              const ReadLimits& limits) noexcept {
  static_assert(std::endian::native == std::endian::little, "raw words are read little-endian");
  return FastWalk(segment, limits).root(limits.nestingLimit);
}

// The walk goes through Cap'n Proto's own getters (AnyStruct, AnyList, AnyPointer), the same code
// paths typed getters take, so it is charged exactly what one typed pass over the message is: the
// same bounds checks, the same traversal charges (including the per-element charge for lists of
// zero-sized elements, which Cap'n Proto's targetSize() skips), and the same nesting steps (a
// struct-list element counts one level, which targetSize() also skips). Recursion depth is bounded
// by the nesting limit: Cap'n Proto throws before a getter goes deeper.
bool FrameReader::walkStruct(capnp::AnyStruct::Reader s, bool allowCaps) {
  for (capnp::AnyPointer::Reader p : s.getPointerSection()) {
    if (!walkPointer(p, allowCaps)) return false;
  }
  return true;
}

bool FrameReader::walkPointer(capnp::AnyPointer::Reader p, bool allowCaps) {
  switch (p.getPointerType()) {
    case capnp::PointerType::NULL_:
      return true;
    case capnp::PointerType::STRUCT:
      return walkStruct(p.getAs<capnp::AnyStruct>(), allowCaps);
    case capnp::PointerType::LIST:
      return walkList(p.getAs<capnp::AnyList>(), allowCaps);
    case capnp::PointerType::CAPABILITY:
      // A capability pointer is only an index into a cap table that the message carries
      // beside its content (Agate's RPC envelope does). Without one (allowCapabilityPointers
      // off, the default) it is an attack or a bug. Either way nothing is dereferenced.
      return allowCaps;
  }
  return false;
}

bool FrameReader::walkList(capnp::AnyList::Reader list, bool allowCaps) {
  if (list.size() == 0) return true;
  auto structs = list.as<capnp::List<capnp::AnyStruct>>();
  switch (list.getElementSize()) {
    case capnp::ElementSize::INLINE_COMPOSITE:
      for (capnp::AnyStruct::Reader element : structs) {
        if (!walkStruct(element, allowCaps)) return false;
      }
      return true;
    case capnp::ElementSize::POINTER:
      for (capnp::AnyPointer::Reader element : list.as<capnp::List<capnp::AnyPointer>>()) {
        if (!walkPointer(element, allowCaps)) return false;
      }
      return true;
    default:
      // A list of primitives may be read as a list of structs (a schema upgrade); step into one
      // element as such a getter would, so its nesting step is checked here too.
      (void)structs[0];
      return true;
  }
}

}  // namespace agate
