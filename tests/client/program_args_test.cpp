// The command-line helpers of client/main.h: counts, mode words, the name a program attaches
// under, and runSession's checks, which answer before anything attaches.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "agate/client/main.h"

namespace agate::client {
namespace {

// argv for a command line (the strings outlive the pointers).
struct Argv {
  explicit Argv(std::vector<std::string> args) : strings(std::move(args)) {
    for (std::string& s : strings) pointers.push_back(s.data());
    pointers.push_back(nullptr);
  }
  int argc() const { return static_cast<int>(strings.size()); }
  char** argv() { return pointers.data(); }
  std::vector<std::string> strings;
  std::vector<char*> pointers;
};

TEST(ParseCountTest, TakesAWholeDecimalNumberFromOneToTheBound) {
  EXPECT_EQ(parseCount("1"), 1u);
  EXPECT_EQ(parseCount("1000"), 1000u);
  EXPECT_EQ(parseCount("007"), 7u);
  EXPECT_EQ(parseCount("4294967295"), 4294967295u);  // the default bound, UINT32_MAX
  EXPECT_EQ(parseCount("10", 10), 10u);
  for (const char* bad : {"", "0", "-5", "+5", "abc", "12x", "x12", " 12", "1.5", "4294967296",
                          "99999999999999999999999"})
    EXPECT_FALSE(parseCount(bad).has_value()) << '"' << bad << '"';
  EXPECT_FALSE(parseCount("11", 10).has_value());
  // Small bounds: a digit above the bound is past it too.
  EXPECT_FALSE(parseCount("7", 5).has_value());
  EXPECT_FALSE(parseCount("16", 5).has_value());
  EXPECT_FALSE(parseCount("99", 8).has_value());
  EXPECT_EQ(parseCount("5", 5), 5u);
  EXPECT_EQ(parseCount("1", 1), 1u);
  EXPECT_FALSE(parseCount("18446744073709551616", UINT64_MAX).has_value());  // 2^64
  EXPECT_EQ(parseCount("18446744073709551615", UINT64_MAX), UINT64_MAX);
}

TEST(TakeModeTest, TakesTheFirstArgumentThatIsNoOptionWhenItIsTheWord) {
  Argv a({"prog", "--home", "/tmp/h", "serve", "x"});
  int argc = a.argc();
  EXPECT_TRUE(takeMode(argc, a.argv(), "serve"));
  ASSERT_EQ(argc, 4);
  EXPECT_STREQ(a.argv()[1], "--home");
  EXPECT_STREQ(a.argv()[2], "/tmp/h");
  EXPECT_STREQ(a.argv()[3], "x");
  EXPECT_EQ(a.argv()[4], nullptr);

  Argv before({"prog", "serve", "--home=/tmp/h"});
  argc = before.argc();
  EXPECT_TRUE(takeMode(argc, before.argv(), "serve"));
  EXPECT_EQ(argc, 2);
  EXPECT_STREQ(before.argv()[1], "--home=/tmp/h");
}

TEST(TakeModeTest, LeavesTheCommandLineWhenTheFirstArgumentIsAnother) {
  // --home's value is not the mode, and the word later on is an argument, not the mode.
  for (std::vector<std::string> line : {std::vector<std::string>{"prog", "--home", "serve"},
                                        {"prog", "5", "serve"},
                                        {"prog", "-1", "serve"},  // "-1" is an argument
                                        {"prog"},
                                        {"prog", "--help"}}) {
    Argv a(line);
    int argc = a.argc();
    EXPECT_FALSE(takeMode(argc, a.argv(), "serve")) << line.size();
    EXPECT_EQ(argc, a.argc());
  }
}

TEST(ProgramArgsTest, TheAttachNameIsPrintableAsciiOfAtMostSixtyFourBytes) {
  Argv plain({"/usr/bin/agate-echo"});
  EXPECT_EQ(parseProgramArgs(plain.argc(), plain.argv()).attachName, "agate-echo");
  Argv accented({"/tmp/caf\xc3\xa9"});
  ProgramArgs args = parseProgramArgs(accented.argc(), accented.argv());
  EXPECT_EQ(args.program, "caf\xc3\xa9") << "messages still use the name as it is";
  EXPECT_EQ(args.attachName, "caf__");
  Argv longName({std::string(100, 'n')});
  EXPECT_EQ(parseProgramArgs(longName.argc(), longName.argv()).attachName, std::string(64, 'n'));
}

TEST(ProgramArgsTest, CountAtReadsACountOrFallsBack) {
  Argv a({"prog", "12", "x"});
  ProgramArgs args = parseProgramArgs(a.argc(), a.argv());
  EXPECT_EQ(args.countAt(0, 5), 12u);
  EXPECT_EQ(args.countAt(1, 5), 5u);
  EXPECT_EQ(args.countAt(2, 5), 5u);
}

TEST(OptionalCountTest, SaysWhatIsWrongWithTheArguments) {
  auto check = optionalCount("CALLS", 100);
  auto mistake = [&](std::vector<std::string> line) {
    Argv a(std::move(line));
    return check(parseProgramArgs(a.argc(), a.argv()));
  };
  EXPECT_EQ(mistake({"prog"}), "");
  EXPECT_EQ(mistake({"prog", "100"}), "");
  EXPECT_EQ(mistake({"prog", "abc"}), "CALLS must be a whole number from 1 to 100, not \"abc\"");
  EXPECT_EQ(mistake({"prog", "101"}), "CALLS must be a whole number from 1 to 100, not \"101\"");
  EXPECT_EQ(mistake({"prog", "1", "2"}), "unexpected argument 2");
}

// runSession answers --help and a mistake before it attaches: the home has no kernel, so an
// attach would fail with 1.
TEST(RunSessionTest, AnswersHelpAndMistakesBeforeAttaching) {
  const ProgramSpec spec{.usage = "[--home DIR] [CALLS]", .check = optionalCount("CALLS")};
  int bodies = 0;
  auto run = [&](std::vector<std::string> line) {
    line.insert(line.begin(), {"prog", "--home", "/tmp/agate-no-such-home-for-tests"});
    Argv a(std::move(line));
    return runSession(a.argc(), a.argv(), spec, [&](Session&, const ProgramArgs&) {
      ++bodies;
      return readyPromise<void>(Status{});
    });
  };
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(run({"--help"}), 0);
  EXPECT_NE(::testing::internal::GetCapturedStdout().find("usage: prog [--home DIR] [CALLS]"),
            std::string::npos);
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(run({"12x"}), 64);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("prog: CALLS must be a whole number"), std::string::npos) << err;
  EXPECT_NE(err.find("usage: prog [--home DIR] [CALLS]"), std::string::npos) << err;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(run({"12"}), 1) << "a good count goes on to attach, and there is no kernel";
  EXPECT_NE(::testing::internal::GetCapturedStderr().find("no agate-kernel listens"),
            std::string::npos);
  EXPECT_EQ(bodies, 0);
}

}  // namespace
}  // namespace agate::client
