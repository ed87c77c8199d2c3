// Cap'n Proto messages built directly in a frame and read in place, safely.
//
// A ring frame carries one single-segment Cap'n Proto message with no segment table: the frame's
// payload *is* segment 0, and its first word is the root pointer. This header is the layer between
// such a frame (a plain span of memory; it knows nothing about rings) and typed Cap'n Proto code.
//
//  * FrameBuilder (producer): a capnp::MessageBuilder whose one segment is a caller-supplied,
//    zeroed, 8-byte-aligned span, typically the space a ring reserved. The message is built in
//    that memory; tryFinish() returns how many bytes to commit. A message that outgrows the frame
//    is refused with MESSAGE_TOO_LARGE (it never spills silently to the heap).
//  * FrameReader (consumer): decodes a frame under explicit limits, validates the whole message
//    eagerly, and hands out a MessageView whose getRoot<T>() reads the validated message.
//
// Why validation is eager. Cap'n Proto checks each pointer lazily, when a getter follows it, and
// reports a malformed pointer by throwing kj::Exception. Agate's business logic never catches, so
// tryDecode() walks the entire message once inside the one try/catch at the decode boundary,
// through Cap'n Proto's own schema-less getters (AnyStruct, AnyList, AnyPointer), so every pointer
// is checked and charged exactly as a typed getter would check and charge it, and turns any
// kj::Exception into PROTOCOL_ERROR. (Cap'n Proto's targetSize() is not enough: it counts nesting
// and zero-sized list elements more leniently than getters do, so a message it accepts can still
// make a getter throw.) A message that passes is structurally sound: getters on it do not throw for
// bounds, far pointers, nesting or (for one pass over the message) traversal budget. What a
// schema-less walk cannot know is whether a pointer has the kind the schema expects (a list where
// the schema says struct); a getter meeting such a mismatch still throws. MessageView::tryRead()
// runs typed reading code inside the decode boundary for callers that read untrusted messages
// against a schema, and is what servers should use. The getter walk costs more than the rest of
// decoding a small message, so tryDecode() first runs a walk over the raw words
// (FrameReader::fastAccepts) that accepts only what it proves the getter walk accepts, with
// margins on the limits, and declines anything else (far pointers, unusual lists, limits' edges),
// which the getter walk then decides: the accepted set is exactly the getter walk's. A consumer
// that reads its common messages from the raw words itself, checking every read, may take a frame
// without validating it (take(), then validate() only when it wants Cap'n Proto's readers;
// MessageReceiverOptions::validateOnDemand): what is never read needs no validation.
//
// Why COPY_IN exists. Cap'n Proto's reader loads a wire pointer, bounds-checks it, and later loads
// it again to follow it. If the frame lives in shared memory that a hostile producer can still
// write, the producer can change the pointer between the check and the use and turn a checked
// pointer into an out-of-bounds read; validation that ran a moment earlier proves nothing either.
// With ReadPolicy::COPY_IN the reader copies the frame once (one memcpy) into a private scratch
// buffer that the caller preallocated, and validates and reads only the copy, which nobody else
// can write. ReadPolicy::IN_PLACE reads the span directly and is only for memory no other party
// can write while it is being read (private memory, a read-only mapping, a trusted peer).
//
// Threading: a FrameBuilder, a FrameReader and the MessageViews it returns belong to one thread.
// Hot path: building into a frame that fits, and decoding, allocate nothing on the heap.
#pragma once

#include <capnp/any.h>
#include <capnp/message.h>
#include <kj/exception.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "agate/runtime/result.h"

namespace agate {

// Bytes per Cap'n Proto word; frames are whole words.
inline constexpr size_t WORD_BYTES = sizeof(capnp::word);

// Views a reserved byte span (e.g. a ring reservation) as the words a FrameBuilder builds in.
// The span must be 8-byte aligned and a whole number of words (REQUIRE: the reserving side
// guarantees both; they are not another party's data).
inline std::span<capnp::word> asFrameWords(std::span<std::byte> bytes) {
  AGATE_REQUIRE(reinterpret_cast<uintptr_t>(bytes.data()) % alignof(capnp::word) == 0 &&
                    bytes.size() % WORD_BYTES == 0,
                "frame at %p of %zu bytes is not whole aligned words",
                static_cast<void*>(bytes.data()), bytes.size());
  return {reinterpret_cast<capnp::word*>(bytes.data()), bytes.size() / WORD_BYTES};
}

// ---------------------------------------------------------------------------------------------
// Building

// A MessageBuilder whose only segment is a frame: memory the caller reserved (e.g. in a ring).
//
// Zeroing contract: every byte of `frame` must be zero when the builder is constructed (Cap'n
// Proto assumes fresh segment memory is zero and does not clear it; a ring hands out zeroed
// reservations). The builder writes only the prefix [0, usedBytes()) of the frame. After a refused
// message (MESSAGE_TOO_LARGE) or an abandoned builder, that prefix may be dirty and whoever owns
// the frame must zero it again before reusing it.
//
// Overflow: Cap'n Proto requires allocateSegment() to return memory, so when the message outgrows
// the frame the builder does get a zeroed heap segment (off the hot path), remembers the
// overflow, and tryFinish() refuses the message. The frame is then not to be committed.
//
// Not copyable or movable: Cap'n Proto's arena points into the builder.
class FrameBuilder final : public capnp::MessageBuilder {
 public:
  // `frame` must be 8-byte aligned (REQUIRE) and all zero (the caller's contract; checked in
  // debug builds). An empty frame is allowed: every message then overflows.
  explicit FrameBuilder(std::span<capnp::word> frame);
  // Resumes a message whose first `wordsUsed` words are already in `frame` (a copy of another
  // FrameBuilder's used prefix, moved to a larger frame: frames are position-independent), and
  // goes on building after them. The rest of the frame must be zero, as above; the prefix must
  // be a message this process built (Cap'n Proto trusts it as it stands).
  FrameBuilder(std::span<capnp::word> frame, size_t wordsUsed);
  ~FrameBuilder() noexcept(false) override;

  FrameBuilder(const FrameBuilder&) = delete;
  FrameBuilder& operator=(const FrameBuilder&) = delete;

  // The number of bytes to commit: the words of the frame the message uses, times 8. Fails with
  // MESSAGE_TOO_LARGE if the message did not fit in the frame (nothing may be committed then).
  // May be called more than once; the message can still be changed between calls.
  Result<size_t> tryFinish();

  // Bytes of the frame written so far (a multiple of 8). Valid whether or not the message fits:
  // after a refusal it says how much of the frame must be zeroed again.
  size_t usedBytes();

  // True once any part of the message had to be placed outside the frame.
  bool overflowed() const noexcept { return overflowed_; }

  std::span<capnp::word> frame() const noexcept { return frame_; }

 private:
  kj::ArrayPtr<capnp::word> allocateSegment(unsigned minimumSize) override;

  std::span<capnp::word> frame_;
  bool frameHandedOut_ = false;
  bool overflowed_ = false;
  // Segments given to Cap'n Proto after the frame ran out. Empty on the hot path.
  std::vector<std::unique_ptr<capnp::word[]>> overflowSegments_;
};

// ---------------------------------------------------------------------------------------------
// Reading

// Where the reader reads the frame from; see the overview.
enum class ReadPolicy : uint8_t {
  IN_PLACE,  // read the span itself: only for memory no other party can write meanwhile
  COPY_IN,   // copy once into private scratch, validate and read the copy: for shared memory
};

// Limits applied to every decoded message. The defaults are sized for ring frames (tens of KiB)
// rather than Cap'n Proto's file-sized defaults (64 MiB traversal, nesting 64):
//
//  * maxFrameBytes = 1 MiB. No Agate ring frame is near this; anything larger is a peer's error.
//  * traversalLimitWords = 64 Ki words (512 KiB). One pass over an honestly built message costs
//    its own size in words plus one, so this is 8x headroom over a 64 KiB frame. It is also the
//    bound on the CPU a hostile frame can burn before it is refused: a frame built to cost the
//    most per word of budget (many pointers to one struct whose pointers all point at an empty
//    struct) costs roughly 30 ns per word, ~2 ms at this default (bench/message_bench,
//    refuseAmplifiedFrame), against Cap'n Proto's 8 Mi words (~250 ms). Validation gets a budget
//    of this size, and so proves that one pass over the message fits it; the caller's reader then
//    gets READ_PASSES times as much, so the message can be traversed that many times in all (an
//    RPC engine decodes the envelope, a typed layer checks the content against the schema, then
//    the handler reads it) and a hostile frame can cost at most that many passes.
//  * nestingLimit = 32, counted as Cap'n Proto's getters count: one level per struct pointer, per
//    list pointer and per step into an element of a list of structs (so a recursive struct held
//    in a list costs two levels per generation). Agate's RPC envelope uses a handful; the limit
//    also bounds validation's recursion, hence the stack a hostile frame can make it use.
struct ReadLimits {
  static constexpr uint64_t READ_PASSES = 4;
  static constexpr size_t DEFAULT_MAX_FRAME_BYTES = size_t{1} << 20;
  static constexpr uint64_t DEFAULT_TRAVERSAL_LIMIT_WORDS = uint64_t{64} * 1024;
  static constexpr int DEFAULT_NESTING_LIMIT = 32;

  size_t maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
  uint64_t traversalLimitWords = DEFAULT_TRAVERSAL_LIMIT_WORDS;
  int nestingLimit = DEFAULT_NESTING_LIMIT;
  // Accept capability pointers (an index into a cap table the envelope carries; never followed
  // by the reader). Off by default: a plain frame has no cap table, so one is malformed. Agate's
  // RPC envelope (rpc/) turns it on and checks every index against the message's cap table.
  bool allowCapabilityPointers = false;
};

class FrameReader;

// A decoded, validated message. A cheap handle into its FrameReader: it and every Reader obtained
// from it stay valid until the next tryDecode() on that FrameReader or the FrameReader's
// destruction, and, with IN_PLACE, only while the source frame is unchanged and not released.
class MessageView {
 public:
  // The typed root. Does not throw for anything validation covers (bounds, far pointers, nesting,
  // and the traversal budget for ReadLimits::READ_PASSES passes over the message); see tryRead()
  // for schema mismatches.
  template <class T>
  typename T::Reader getRoot() const {
    return message_->getRoot<T>();
  }

  // Runs `fn(root)` inside the decode boundary: a kj::Exception thrown while reading (a pointer
  // whose kind does not match the schema, a traversal budget spent by re-reading) becomes
  // PROTOCOL_ERROR. `fn` must not throw anything else and returns void.
  template <class T, class Fn>
  Status tryRead(Fn&& fn) const {
    try {
      std::forward<Fn>(fn)(message_->getRoot<T>());
    } catch (const kj::Exception&) {
      return Error(Errc::PROTOCOL_ERROR, "message does not match the schema it was read with");
    }
    return {};
  }

  // The validated message's size: the frame's length in bytes.
  size_t sizeInBytes() const noexcept { return sizeBytes_; }
  // The validated frame's bytes, as read (the private copy under COPY_IN, the frame itself under
  // IN_PLACE): for keeping a message beyond the view by copying it (it is position-independent).
  std::span<const std::byte> bytes() const {
    kj::ArrayPtr<const capnp::word> segment = message_->getSegment(0);
    return {reinterpret_cast<const std::byte*>(segment.begin()), sizeBytes_};
  }

 private:
  friend class FrameReader;
  MessageView(capnp::MessageReader* message, size_t sizeBytes)
      : message_(message), sizeBytes_(sizeBytes) {}

  capnp::MessageReader* message_;  // owned by the FrameReader
  size_t sizeBytes_;
};

// Decodes single-segment frames, one at a time, under ReadLimits. Create one per consumer (e.g.
// per ring) and reuse it for every message: it holds the scratch for COPY_IN and the Cap'n Proto
// reader objects in place, so decoding allocates nothing.
//
// Not copyable or movable: Cap'n Proto's reader arena points into it.
class FrameReader {
 public:
  // IN_PLACE: no scratch needed.
  explicit FrameReader(ReadLimits limits = {});
  // COPY_IN: `scratch` is private memory the caller owns and keeps alive for the reader's life,
  // at least as large as the largest frame to accept; a larger frame is a PROTOCOL_ERROR.
  FrameReader(std::span<capnp::word> scratch, ReadLimits limits = {});
  ~FrameReader();

  FrameReader(const FrameReader&) = delete;
  FrameReader& operator=(const FrameReader&) = delete;

  // Decodes and validates `frame`. With IN_PLACE the frame must be 8-byte aligned (REQUIRE; a ring
  // guarantees it) and stay unchanged while the view is used. Fails with PROTOCOL_ERROR and a
  // detail saying why when the frame is empty, not whole words, larger than the limits allow, or
  // holds a malformed message (root not a struct, pointer out of bounds, far pointer to another
  // segment, capability pointer, too deep, too much traversal). A far pointer whose landing pad
  // is inside the frame is valid Cap'n Proto and is accepted; FrameBuilder never writes one. On
  // failure the previous view is invalidated and no view is given.
  Result<MessageView> tryDecode(std::span<const std::byte> frame);

  // tryDecode() in two steps, for a caller that reads its common messages from the words itself
  // and needs Cap'n Proto's readers only for the rest (MessageReceiverOptions::validateOnDemand):
  //  * take: the length checks and, with COPY_IN, the one copy out of shared memory; returns the
  //    bytes to read (the private copy, or the frame itself under IN_PLACE), NOT validated. A
  //    caller reading them must check every read against their end (under IN_PLACE they are
  //    the frame itself: only for memory no other party writes meanwhile, as IN_PLACE itself).
  //  * validate: the validation of those bytes and the view tryDecode() would have given. Only
  //    on the bytes the last take() returned.
  // take() ends the previous view, as tryDecode() does.
  Result<std::span<const std::byte>> take(std::span<const std::byte> frame);
  Result<MessageView> validate(std::span<const std::byte> taken);

  ReadPolicy policy() const noexcept { return policy_; }
  const ReadLimits& limits() const noexcept { return limits_; }

  // The two validations tryDecode() runs, exposed for the differential test (tests/fuzz/):
  //  * fastAccepts: a walk over the raw words (no Cap'n Proto reader objects, no exceptions)
  //    that returns true only for a segment the getter walk provably accepts: every pointer
  //    lands inside the segment, the words it charges (an over-estimate of Cap'n Proto's
  //    charges) fit the traversal limit, and it nests at least one level less deep than the
  //    limit. Anything else (far pointers, lists of bits or voids, zero-sized struct elements,
  //    out-of-bounds or unknown pointers, capability pointers where not allowed) it declines,
  //    and tryDecode() then runs the getter walk, which decides. So it only makes the common
  //    frame cheaper; it never accepts more.
  //  * validateWithGetters: the walk through Cap'n Proto's getters (see tryDecode()).
  static bool fastAccepts(kj::ArrayPtr<const capnp::word> segment,
                          const ReadLimits& limits) noexcept;
  static Status validateWithGetters(kj::ArrayPtr<const capnp::word> segment,
                                    const ReadLimits& limits);

 private:
  // A MessageReader over exactly one segment, living inside the FrameReader.
  class SegmentReader final : public capnp::MessageReader {
   public:
    SegmentReader(kj::ArrayPtr<const capnp::word> segment, capnp::ReaderOptions readerOptions)
        : capnp::MessageReader(readerOptions), segment_(segment) {}
    kj::ArrayPtr<const capnp::word> getSegment(unsigned id) override {
      return id == 0 ? segment_ : nullptr;
    }

   private:
    kj::ArrayPtr<const capnp::word> segment_;
  };

  // Follow every pointer once; false on a capability pointer unless allowed; kj::Exception on
  // anything malformed.
  static bool walkStruct(capnp::AnyStruct::Reader s, bool allowCaps);
  static bool walkPointer(capnp::AnyPointer::Reader p, bool allowCaps);
  static bool walkList(capnp::AnyList::Reader list, bool allowCaps);
  static capnp::ReaderOptions readerOptions(const ReadLimits& limits);

  ReadPolicy policy_;
  ReadLimits limits_;
  std::span<capnp::word> scratch_;  // COPY_IN only; not owned
  std::optional<SegmentReader> message_;
};

}  // namespace agate
