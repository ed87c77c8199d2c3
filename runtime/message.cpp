#include "agate/runtime/message.h"

#include <kj/string.h>

#include <algorithm>
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

capnp::ReaderOptions FrameReader::readerOptions() const {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = limits_.traversalLimitWords;
  options.nestingLimit = limits_.nestingLimit;
  return options;
}

Result<MessageView> FrameReader::tryDecode(std::span<const std::byte> frame) {
  message_.reset();  // the previous view ends here, whatever this frame turns out to be

  // The length is the one value of the frame the caller read before us; it is a local here.
  const size_t bytes = frame.size();
  if (bytes == 0) return Error(Errc::PROTOCOL_ERROR, "frame is empty (a message has a root)");
  if (bytes % WORD_BYTES != 0)
    return Error(Errc::PROTOCOL_ERROR, "frame length is not a whole number of 8-byte words");
  if (bytes > limits_.maxFrameBytes)
    return Error(Errc::PROTOCOL_ERROR, "frame is larger than ReadLimits::maxFrameBytes");

  const capnp::word* words;
  if (policy_ == ReadPolicy::COPY_IN) {
    if (bytes > scratch_.size_bytes())
      return Error(Errc::PROTOCOL_ERROR, "frame is larger than the reader's scratch buffer");
    // The one read of shared memory: from here on only the private copy is looked at.
    std::memcpy(scratch_.data(), frame.data(), bytes);
    words = scratch_.data();
  } else {
    AGATE_REQUIRE(reinterpret_cast<uintptr_t>(frame.data()) % alignof(capnp::word) == 0,
                  "IN_PLACE frame at %p is not 8-byte aligned",
                  static_cast<const void*>(frame.data()));
    words = reinterpret_cast<const capnp::word*>(frame.data());
  }
  kj::ArrayPtr<const capnp::word> segment(words, bytes / WORD_BYTES);

  AGATE_TRY(tryValidate(segment));
  // A fresh reader, so the caller's reads get a whole traversal budget of their own.
  message_.emplace(segment, readerOptions());
  return MessageView(&*message_, bytes);
}

Status FrameReader::tryValidate(kj::ArrayPtr<const capnp::word> segment) {
  // The reader for validation lives on the stack and is discarded with its spent budget.
  try {
    SegmentReader validator(segment, readerOptions());
    capnp::AnyPointer::Reader root = validator.getRoot<capnp::AnyPointer>();
    // Every Cap'n Proto message's root is a struct (null reads as the default struct). Checked here
    // so getRoot<T>() cannot meet a list or capability where it expects the root struct.
    const capnp::PointerType kind = root.getPointerType();
    if (kind == capnp::PointerType::NULL_) return {};
    if (kind != capnp::PointerType::STRUCT)
      return Error(Errc::PROTOCOL_ERROR, "message root is not a struct pointer");
    if (!walkStruct(root.getAs<capnp::AnyStruct>(), limits_.allowCapabilityPointers))
      return Error(Errc::PROTOCOL_ERROR, "message holds a capability pointer; frames carry none");
  } catch (const kj::Exception& e) {
    return Error(Errc::PROTOCOL_ERROR, describeMalformed(e));
  }
  return {};
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
