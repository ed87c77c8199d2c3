// readCapPointer / writeCapPointer: a capability pointer written into a struct's pointer field
// reads back as its cap-table index; a field that is missing, null, or holds a struct is refused
// with a clear error and nothing is written over a non-null field.
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

}  // namespace
}  // namespace agate::rpc::test
