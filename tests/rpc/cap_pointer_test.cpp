// readCapPointer / writeCapPointer: a capability pointer written into a struct's pointer field or
// an element of a list of capabilities reads back as its cap-table index; a field or element that
// is missing, null, or holds a struct is refused with a clear error, a list whose elements are
// not pointers too, and nothing is written over a non-null field or element.
#include <gtest/gtest.h>

#include <capnp/message.h>

#include "agate/rpc/cap_pointer.h"
#include "rpc_test.capnp.h"

namespace agate::rpc::test {
namespace {

TEST(CapPointer, WrittenIndexReadsBack) {
  capnp::MallocMessageBuilder message;
  CapAndValue::Builder b = message.initRoot<CapAndValue>();
  b.setValue(9);
  writeCapPointer(b, 0, 12345);
  EXPECT_TRUE(b.asReader().getCap().isCapability());
  Result<uint32_t> index = readCapPointer(b.asReader(), 0);
  ASSERT_TRUE(index.ok());
  EXPECT_EQ(*index, 12345u);
  EXPECT_EQ(b.getValue(), 9u) << "the data section is untouched";
}

TEST(CapPointer, MissingFieldNullFieldAndStructFieldAreRefused) {
  capnp::MallocMessageBuilder message;
  CapAndValue::Builder b = message.initRoot<CapAndValue>();
  EXPECT_EQ(readCapPointer(b.asReader(), 1).code(), Errc::INVALID_ARGUMENT);  // one pointer only
  EXPECT_EQ(readCapPointer(b.asReader(), 0).code(), Errc::INVALID_ARGUMENT);  // null
  b.getCap().initAs<Value>().setValue(1);
  EXPECT_EQ(readCapPointer(b.asReader(), 0).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(b.asReader().getCap().getAs<Value>().getValue(), 1u) << "state unchanged";
}

TEST(CapPointerDeathTest, WritingOverANonNullFieldAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  capnp::MallocMessageBuilder message;
  CapAndValue::Builder b = message.initRoot<CapAndValue>();
  b.getCap().initAs<Value>();
  EXPECT_DEATH(writeCapPointer(b, 0, 1), "non-null pointer field");
}

TEST(CapPointer, ListElementsReadBackTheirOwnIndices) {
  capnp::MallocMessageBuilder message;
  capnp::AnyList::Builder list =
      message.initRoot<capnp::AnyPointer>().initAsAnyList(capnp::ElementSize::POINTER, 3);
  writeCapPointer(list, 0, 7);
  writeCapPointer(list, 2, 0xfffffffe);
  capnp::AnyList::Reader r = list.asReader();
  ASSERT_EQ(readCapPointer(r, 0).value(), 7u);
  ASSERT_EQ(readCapPointer(r, 2).value(), 0xfffffffeu);
  EXPECT_EQ(readCapPointer(r, 1).code(), Errc::INVALID_ARGUMENT) << "element 1 stayed null";
  EXPECT_TRUE(r.as<capnp::List<capnp::AnyPointer>>()[0].isCapability());
}

TEST(CapPointer, GeneratedListTypesConvert) {
  capnp::MallocMessageBuilder message;
  capnp::List<capnp::AnyPointer>::Builder list = message.initRoot<capnp::AnyPointer>()
                                                     .initAsAnyList(capnp::ElementSize::POINTER, 2)
                                                     .as<capnp::List<capnp::AnyPointer>>();
  writeCapPointer(list, 1, 5);
  EXPECT_EQ(readCapPointer(list.asReader(), 1).value(), 5u);
}

TEST(CapPointer, BadListsAndElementsAreRefused) {
  capnp::MallocMessageBuilder message;
  capnp::List<capnp::AnyPointer>::Builder list = message.initRoot<capnp::AnyPointer>()
                                                     .initAsAnyList(capnp::ElementSize::POINTER, 2)
                                                     .as<capnp::List<capnp::AnyPointer>>();
  list[0].initAs<Value>().setValue(4);
  EXPECT_EQ(readCapPointer(list.asReader(), 0).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(readCapPointer(list.asReader(), 2).code(), Errc::INVALID_ARGUMENT) << "past the end";
  EXPECT_EQ(list.asReader()[0].getAs<Value>().getValue(), 4u) << "state unchanged";

  capnp::MallocMessageBuilder other;
  capnp::List<uint64_t>::Builder words =
      other.initRoot<capnp::AnyPointer>().initAs<capnp::List<uint64_t>>(2);
  words.set(0, 3);  // a capability word's bit pattern, in a list of numbers
  EXPECT_EQ(readCapPointer(words.asReader(), 0).code(), Errc::WRONG_TYPE);
}

TEST(CapPointerDeathTest, WritingIntoAListOfNumbersOrOverAnElementAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  capnp::MallocMessageBuilder message;
  capnp::List<capnp::AnyPointer>::Builder list = message.initRoot<capnp::AnyPointer>()
                                                     .initAsAnyList(capnp::ElementSize::POINTER, 2)
                                                     .as<capnp::List<capnp::AnyPointer>>();
  list[0].initAs<Value>();
  EXPECT_DEATH(writeCapPointer(list, 0, 1), "non-null list element");
  EXPECT_DEATH(writeCapPointer(list, 2, 1), "element 2 of a list of 2");
  capnp::MallocMessageBuilder other;
  capnp::List<uint64_t>::Builder words =
      other.initRoot<capnp::AnyPointer>().initAs<capnp::List<uint64_t>>(2);
  EXPECT_DEATH(writeCapPointer(words, 0, 1), "not pointers");
}

}  // namespace
}  // namespace agate::rpc::test
