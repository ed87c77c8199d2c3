// Private to rpc/: the word-level decoder of the common RPC frames, tried before the Cap'n Proto
// readers (inbound.cpp, RpcConnection::handleMessage).
//
// A null call is two or three small messages (Call, Return, and Finish unless the Return had
// noFinishNeeded), and reading each through Cap'n Proto's readers (getRoot, one getter per
// struct, a reader object per step) cost more than the rest of handling it. parseCommonFrame reads
// the fields RpcConnection::decode needs straight from the frame's words, in one pass, for these
// shapes only:
//
//   Call     target importedCap, or promisedAnswer with a transform of at most
//            MAX_PIPELINE_PATH steps (a List(UInt16), or null); params null or a Payload whose
//            pointers are all null (no content, no cap table)
//   Return   results null or such an empty Payload, or canceled
//   Finish, Release
//
// Every struct it steps into must be a plain struct pointer (no far pointer) whose object lies
// inside the frame and has at least the data words and pointers the schema gives it (so every
// field read is inside the object, as Cap'n Proto would read it). Anything else (another kind,
// a union member or list shape not above, params or results with content or capabilities, an
// exception, a smaller struct, any pointer it does not expect) makes it decline: it returns
// false and the caller validates the frame and reads it with Cap'n Proto, which then decides.
// It runs on frames nothing validated yet (the connection's receiver validates on demand,
// MessageReceiverOptions::validateOnDemand: private copies of the ring's frames, so no word
// changes while it reads), and checks every word it reads against the frame's end, so it never
// reads outside the frame whatever the bytes. What it does not read (pointers it does not
// follow, fields of a later schema) is never read by anyone, so it needs no validation; a call
// kept to be delivered later is written afresh from the fields read (RpcConnection::copyCall). It
// reads only, and makes no check against the connection's tables: decode's table checks (the
// same functions) run on what it returns.
//
// Equivalence: for a frame it accepts, the fields are what Cap'n Proto's getters return for the
// same frame, and params or results read as empty (null content, no capability) either way
// (tests/fuzz/rpc_fuzz_test checks both on seed and mutated frames).
#pragma once

#include <cstdint>
#include <cstring>
#include <span>

#include "agate/rpc/connection.h"
#include "pointer_words.h"

namespace agate::rpc::internal {

struct CommonFrame {
  wire::Message::Which which{};
  uint32_t id = 0;     // call: question id; return: answer id; finish: question id; release: id
  uint32_t count = 0;  // release: referenceCount
  bool targetIsAnswer = false;
  uint32_t targetId = 0;
  std::array<uint16_t, MAX_PIPELINE_PATH> path{};
  uint32_t pathLength = 0;
  uint64_t interfaceId = 0;
  uint16_t methodId = 0;
  bool noPipelining = false;  // call: noPromisePipelining
  wire::Return::Which returnKind{};
  bool noFinishNeeded = false;     // return
  bool releaseResultCaps = false;  // finish
};

class CommonFrameParser {
 public:
  explicit CommonFrameParser(std::span<const std::byte> frame) noexcept
      : bytes_(frame.data()), words_(frame.size() / sizeof(uint64_t)) {}

  bool parse(CommonFrame& f) const noexcept {
    Object message;
    if (words_ == 0 || !structAt(0, 1, 1, message)) return false;
    f.which = static_cast<wire::Message::Which>(word(message.data) & 0xffff);
    switch (f.which) {
      case wire::Message::CALL:
        return call(message.pointers, f);
      case wire::Message::RETURN:
        return ret(message.pointers, f);
      case wire::Message::FINISH: {
        Object finish;
        if (!structAt(message.pointers, 1, 0, finish)) return false;
        f.id = static_cast<uint32_t>(word(finish.data));
        f.releaseResultCaps = ((word(finish.data) >> 32) & 1) != 0;  // Finish.releaseResultCaps
        return true;
      }
      case wire::Message::RELEASE: {
        Object release;
        if (!structAt(message.pointers, 1, 0, release)) return false;
        f.id = static_cast<uint32_t>(word(release.data));
        f.count = static_cast<uint32_t>(word(release.data) >> 32);
        return true;
      }
      default:
        return false;
    }
  }

 private:
  struct Object {
    size_t data = 0;      // index of the first data word
    size_t pointers = 0;  // index of the first pointer
    uint64_t pointerCount = 0;
  };

  uint64_t word(size_t index) const noexcept {
    uint64_t v;
    std::memcpy(&v, bytes_ + index * sizeof v, sizeof v);
    return v;
  }

  // The struct that the pointer at word `at` designates, if it is a plain struct pointer to an
  // object inside the frame with at least `minData` data words and `minPointers` pointers.
  bool structAt(size_t at, uint16_t minData, uint16_t minPointers, Object& o) const noexcept {
    if (at >= words_) return false;
    const uint64_t p = word(at);
    if (!words::isStruct(p)) return false;
    const uint64_t data = words::structDataWords(p);
    const uint64_t pointers = words::structPointerCount(p);
    if (data < minData || pointers < minPointers) return false;
    const int64_t target = words::targetOf(p, at);
    if (!words::inside(target, data + pointers, words_)) return false;
    o.data = static_cast<size_t>(target);
    o.pointers = o.data + data;
    o.pointerCount = pointers;
    return true;
  }

  // Params or results that read as empty: a null pointer, or a Payload with no pointer set.
  bool emptyPayload(size_t at) const noexcept {
    if (at >= words_) return false;
    if (word(at) == 0) return true;
    Object payload;
    if (!structAt(at, 0, 0, payload)) return false;
    for (uint64_t i = 0; i < payload.pointerCount; ++i) {
      if (word(payload.pointers + i) != 0) return false;
    }
    return true;
  }

  bool call(size_t at, CommonFrame& f) const noexcept {
    Object c;
    if (!structAt(at, 2, 2, c)) return false;
    f.id = static_cast<uint32_t>(word(c.data));
    f.methodId = static_cast<uint16_t>(word(c.data) >> 32);
    f.noPipelining = ((word(c.data) >> 48) & 1) != 0;  // Call.noPromisePipelining: bit 48
    f.interfaceId = word(c.data + 1);
    if (!emptyPayload(c.pointers + 1)) return false;
    Object target;
    if (!structAt(c.pointers, 1, 1, target)) return false;
    switch (static_cast<uint16_t>(word(target.data) >> 32)) {
      case wire::MessageTarget::IMPORTED_CAP:
        f.targetIsAnswer = false;
        f.targetId = static_cast<uint32_t>(word(target.data));
        return true;
      case wire::MessageTarget::PROMISED_ANSWER: {
        Object pa;
        if (!structAt(target.pointers, 1, 1, pa)) return false;
        f.targetIsAnswer = true;
        f.targetId = static_cast<uint32_t>(word(pa.data));
        return transform(pa.pointers, f);
      }
      default:
        return false;
    }
  }

  // PromisedAnswer.transform: null (no steps) or a list of 16-bit elements inside the frame.
  bool transform(size_t at, CommonFrame& f) const noexcept {
    const uint64_t p = word(at);
    f.pathLength = 0;
    if (p == 0) return true;
    if (words::kind(p) != words::LIST_KIND || words::listElementSize(p) != words::TWO_BYTE_ELEMENTS)
      return false;
    const uint64_t count = words::listCount(p);
    if (count > MAX_PIPELINE_PATH) return false;  // decode refuses it; let it say why
    const int64_t target = words::targetOf(p, at);
    if (!words::inside(target, (count + 3) / 4, words_)) return false;
    for (uint64_t i = 0; i < count; ++i) {
      f.path[i] =
          static_cast<uint16_t>(word(static_cast<size_t>(target) + i / 4) >> (16 * (i % 4)));
    }
    f.pathLength = static_cast<uint32_t>(count);
    return true;
  }

  bool ret(size_t at, CommonFrame& f) const noexcept {
    Object r;
    if (!structAt(at, 1, 1, r)) return false;
    f.id = static_cast<uint32_t>(word(r.data));
    f.returnKind = static_cast<wire::Return::Which>(static_cast<uint16_t>(word(r.data) >> 32));
    f.noFinishNeeded = ((word(r.data) >> 48) & 1) != 0;  // Return.noFinishNeeded: bit 48
    switch (f.returnKind) {
      case wire::Return::RESULTS:
        return emptyPayload(r.pointers);
      case wire::Return::CANCELED:
        return true;
      default:
        return false;
    }
  }

  const std::byte* bytes_;
  size_t words_;
};

// Reads `frame` as one of the common shapes above; false: read it with Cap'n Proto instead.
inline bool parseCommonFrame(std::span<const std::byte> frame, CommonFrame& f) noexcept {
  return CommonFrameParser(frame).parse(f);
}

}  // namespace agate::rpc::internal
