#include "agate/rpc/cap_pointer.h"

#include <cstring>

#include "pointer_words.h"

namespace agate::rpc {

namespace words = internal::words;

Result<uint32_t> readCapPointer(capnp::AnyStruct::Reader s, uint16_t pointerIndex) {
  const kj::ArrayPtr<const kj::byte> data = s.getDataSection();
  const uint32_t pointers = s.getPointerSection().size();
  if (pointerIndex >= pointers)
    return Error(Errc::INVALID_ARGUMENT, "struct has no such pointer field");
  // The pointer section starts right after the data section, which is whole words in any struct
  // that has pointers (Cap'n Proto's layout).
  if (data.size() % sizeof(uint64_t) != 0)
    return Error(Errc::WRONG_TYPE, "struct's data section is not whole words");
  uint64_t word = 0;
  std::memcpy(&word, data.end() + size_t{pointerIndex} * sizeof word, sizeof word);
  if (word == 0) return Error(Errc::INVALID_ARGUMENT, "capability field is null");
  if (!words::isCapability(word))
    return Error(Errc::WRONG_TYPE, "field holds a struct or list, not a capability");
  return words::capabilityIndex(word);
}

void writeCapPointer(capnp::AnyStruct::Builder s, uint16_t pointerIndex, uint32_t capIndex) {
  kj::ArrayPtr<kj::byte> data = s.getDataSection();
  const uint32_t pointers = s.getPointerSection().size();
  AGATE_REQUIRE(pointerIndex < pointers, "pointer field %u of a struct with %u pointers",
                pointerIndex, pointers);
  AGATE_REQUIRE(data.size() % sizeof(uint64_t) == 0, "data section of %zu bytes", data.size());
  kj::byte* at = data.begin() + data.size() + size_t{pointerIndex} * sizeof(uint64_t);
  uint64_t old = 0;
  std::memcpy(&old, at, sizeof old);
  AGATE_REQUIRE(old == 0, "capability written over a non-null pointer field %u", pointerIndex);
  const uint64_t word = words::capabilityPointer(capIndex);
  std::memcpy(at, &word, sizeof word);
}

// A list of pointers reads as a list of structs of no data and one pointer (Cap'n Proto's rule
// for upgrading a list of pointers to a list of structs): its element is then a struct's field 0.
Result<uint32_t> readCapPointer(capnp::AnyList::Reader list, uint32_t element) {
  if (list.getElementSize() != capnp::ElementSize::POINTER)
    return Error(Errc::WRONG_TYPE, "list elements are not pointers");
  if (element >= list.size()) return Error(Errc::INVALID_ARGUMENT, "no such list element");
  Result<uint32_t> index = readCapPointer(list.as<capnp::List<capnp::AnyStruct>>()[element], 0);
  if (index.code() == Errc::INVALID_ARGUMENT)
    return Error(Errc::INVALID_ARGUMENT, "capability list element is null");
  if (index.code() == Errc::WRONG_TYPE)
    return Error(Errc::WRONG_TYPE, "list element holds a struct or list, not a capability");
  return index;
}

void writeCapPointer(capnp::AnyList::Builder list, uint32_t element, uint32_t capIndex) {
  AGATE_REQUIRE(list.getElementSize() == capnp::ElementSize::POINTER,
                "capability written into a list whose elements are not pointers");
  AGATE_REQUIRE(element < list.size(), "element %u of a list of %u", element, list.size());
  capnp::AnyStruct::Builder s = list.as<capnp::List<capnp::AnyStruct>>()[element];
  AGATE_REQUIRE(s.getPointerSection()[0].isNull(),
                "capability written over a non-null list element %u", element);
  writeCapPointer(s, 0, capIndex);
}

}  // namespace agate::rpc
