#include "agate/runtime/result.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

namespace agate {
namespace {

Result<int> parsePositive(int v) {
  if (v <= 0) return Error(Errc::INVALID_ARGUMENT, "not positive");
  return v;
}

Status chain(int v) {
  AGATE_TRY(parsePositive(v));
  return {};
}

TEST(Result, CarriesAValueOrAnError) {
  auto good = parsePositive(3);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 3);
  auto bad = parsePositive(-1);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.code(), Errc::INVALID_ARGUMENT);
  EXPECT_STREQ(bad.error().detail, "not positive");
}

TEST(Result, TryPropagatesTheFirstError) {
  EXPECT_TRUE(chain(1).ok());
  EXPECT_EQ(chain(0).code(), Errc::INVALID_ARGUMENT);
}

TEST(Result, MovesNonCopyableValues) {
  Result<std::unique_ptr<int>> r(std::make_unique<int>(7));
  auto moved = std::move(r);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(**moved, 7);
}

TEST(Error, DescribeNamesTheCodeDetailAndErrno) {
  char buf[128];
  EXPECT_STREQ(Error(Errc::DISCONNECTED).describe(buf, sizeof buf), "disconnected");
  EXPECT_STREQ(Error(Errc::PROTOCOL_ERROR, "bad length").describe(buf, sizeof buf),
               "protocol error: bad length");
  std::string s = Error::fromErrno(ENOENT, "open").describe(buf, sizeof buf);
  EXPECT_NE(s.find("errno 2"), std::string::npos) << s;
  EXPECT_NE(s.find("open"), std::string::npos) << s;
}

TEST(ResultDeathTest, ValueOfAnErrorIsABugThatAborts) {
  auto bad = parsePositive(-1);
  EXPECT_DEATH((void)bad.value(), "wrong side");
}

TEST(AssertDeathTest, AssertPrintsTheValues) {
  int x = 41;
  EXPECT_DEATH(AGATE_ASSERT(x == 42, "x is %d", x), "x is 41");
}

}  // namespace
}  // namespace agate
