// Capability pointers inside Cap'n Proto content, read and written without Cap'n Proto's RPC.
//
// Agate's RPC payloads carry capabilities as Cap'n Proto does: a pointer of kind OTHER whose
// upper 32 bits are an index into the payload's cap table (rpc.capnp, Payload). Cap'n Proto's
// own accessors for such pointers need its RPC runtime (ClientHook, cap tables imbued into
// readers); Agate keeps its own cap tables, so these helpers read and write the pointer word
// directly. Generated stubs (later) call them for interface-typed fields.
//
// Safety: readCapPointer is given a struct that a FrameReader validated (so its sections lie in
// the frame) and checks the pointer index against the struct's pointer count before touching the
// word; the returned index is NOT checked against a cap table (the caller does that).
#pragma once

#include <capnp/any.h>

#include <cstdint>
#include <utility>

#include "agate/runtime/result.h"

namespace agate::rpc {

// The cap-table index held by pointer field `pointerIndex` of `s`. INVALID_ARGUMENT when the
// struct has no such pointer field (an older schema) or the field is null; WRONG_TYPE when it
// holds a struct or list rather than a capability.
Result<uint32_t> readCapPointer(capnp::AnyStruct::Reader s, uint16_t pointerIndex);

// Writes a capability pointer with `capIndex` into pointer field `pointerIndex` of `s`, which
// must exist and be null (precondition: the builder's own schema says so).
void writeCapPointer(capnp::AnyStruct::Builder s, uint16_t pointerIndex, uint32_t capIndex);

// The same for element `element` of a list of capabilities (List(Foo) of an interface Foo, or
// List(Capability)): WRONG_TYPE when the list's elements are not pointers or the element holds a
// struct or list, INVALID_ARGUMENT past the list's end or for a null element. The writer requires
// a list of pointers, an element inside it and a null one. A generated List<Foo>::Reader converts
// to the AnyList it takes; Cap'n Proto 0.9.2's List<Foo>::Builder of an interface does not (take
// the field from the struct's pointer section as an AnyList instead, as typed.h does).
Result<uint32_t> readCapPointer(capnp::AnyList::Reader list, uint32_t element);
void writeCapPointer(capnp::AnyList::Builder list, uint32_t element, uint32_t capIndex);

// The same for generated struct builders and readers (Foo::Builder, Foo::Reader).
template <class B>
requires(capnp::kind<typename B::Builds>() ==
         capnp::Kind::STRUCT) void writeCapPointer(B s, uint16_t pointerIndex, uint32_t capIndex) {
  writeCapPointer(capnp::AnyStruct::Builder(std::move(s)), pointerIndex, capIndex);
}
template <class R>
requires(capnp::kind<typename R::Reads>() ==
         capnp::Kind::STRUCT) Result<uint32_t> readCapPointer(R s, uint16_t pointerIndex) {
  return readCapPointer(capnp::AnyStruct::Reader(std::move(s)), pointerIndex);
}

// And for generated list builders and readers (capnp::List<Foo>::Builder, ::Reader).
template <class B>
requires(capnp::kind<typename B::Builds>() ==
         capnp::Kind::LIST) void writeCapPointer(B list, uint32_t element, uint32_t capIndex) {
  writeCapPointer(capnp::AnyList::Builder(std::move(list)), element, capIndex);
}
template <class R>
requires(capnp::kind<typename R::Reads>() ==
         capnp::Kind::LIST) Result<uint32_t> readCapPointer(R list, uint32_t element) {
  return readCapPointer(capnp::AnyList::Reader(std::move(list)), element);
}

}  // namespace agate::rpc
