// Private to rpc/: Cap'n Proto pointer words read and written directly, for the word-level
// readers of frames (fast_decode.h: untrusted frames, declined on anything unexpected) and of
// this side's own results (OwnResults in connection_internal.h: trusted words, asserted), and for
// capability pointers (cap_pointer.cpp). Little-endian, as every Agate machine is.
//
// A pointer word: bits 0-1 its kind; for a struct or list, bits 2-31 the signed offset in words
// from the word after the pointer to the object. A struct pointer has its data section's size in
// words in bits 32-47 and its pointer count in bits 48-63. A list pointer has its element size
// in bits 32-34 and its element count in bits 35-63. A capability is an "other" pointer with
// bits 2-31 zero and its cap-table index in bits 32-63.
#pragma once

#include <cstddef>
#include <cstdint>

namespace agate::rpc::internal::words {

constexpr uint64_t KIND_BITS = 3;
constexpr uint64_t STRUCT_KIND = 0;
constexpr uint64_t LIST_KIND = 1;
constexpr uint64_t OTHER_KIND = 3;
constexpr uint64_t TWO_BYTE_ELEMENTS = 3;  // a list pointer's element size for UInt16

constexpr uint64_t kind(uint64_t p) noexcept { return p & KIND_BITS; }

// The word that the struct or list pointer `p`, found at word `at`, points to: negative or past
// any end when the offset says so (check it with `inside`).
constexpr int64_t targetOf(uint64_t p, size_t at) noexcept {
  return static_cast<int64_t>(at) + 1 + (static_cast<int32_t>(static_cast<uint32_t>(p)) >> 2);
}

// Whether `count` words starting at word `target` lie within `size` words, without overflow.
constexpr bool inside(int64_t target, uint64_t count, size_t size) noexcept {
  return target >= 0 && static_cast<uint64_t>(target) <= size &&
         count <= size - static_cast<uint64_t>(target);
}

// A non-null struct pointer, its sections' sizes.
constexpr bool isStruct(uint64_t p) noexcept { return p != 0 && kind(p) == STRUCT_KIND; }
constexpr uint64_t structDataWords(uint64_t p) noexcept { return (p >> 32) & 0xffff; }
constexpr uint64_t structPointerCount(uint64_t p) noexcept { return p >> 48; }

// The struct pointer to an object `offsetWords` words past the word after it.
constexpr uint64_t structPointer(uint32_t offsetWords, uint16_t dataWords,
                                 uint16_t pointers) noexcept {
  return uint64_t{offsetWords} << 2 | uint64_t{dataWords} << 32 | uint64_t{pointers} << 48;
}

// A list pointer's element size and count; the pointer to a list of 16-bit elements that starts
// right after it.
constexpr uint64_t listElementSize(uint64_t p) noexcept { return (p >> 32) & 7; }
constexpr uint64_t listCount(uint64_t p) noexcept { return p >> 35; }
constexpr uint64_t twoByteListPointer(uint64_t count) noexcept {
  return LIST_KIND | TWO_BYTE_ELEMENTS << 32 | count << 35;
}

// Capability pointers.
constexpr uint64_t CAPABILITY_MASK = 0xffff'ffffull;
constexpr bool isCapability(uint64_t p) noexcept { return (p & CAPABILITY_MASK) == OTHER_KIND; }
constexpr uint32_t capabilityIndex(uint64_t p) noexcept { return static_cast<uint32_t>(p >> 32); }
constexpr uint64_t capabilityPointer(uint32_t index) noexcept {
  return (uint64_t{index} << 32) | OTHER_KIND;
}

}  // namespace agate::rpc::internal::words
