#include "support/report.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>

namespace agate::bench {
namespace {

MachineInfo testMachine() {
  MachineInfo m;
  m.cpus = 2;
  m.cpuModel = "Test \"CPU\"";
  m.kernel = "6.0";
  return m;
}

Figure figure(std::string name, double value, std::string ratioTo = {}) {
  return Figure{.name = std::move(name),
                .value = value,
                .unit = "ns",
                .scenario = "s",
                .samples = 0,
                .ratioTo = std::move(ratioTo)};
}

TEST(JsonString, EscapesQuotesBackslashesAndControlCharacters) {
  EXPECT_EQ(jsonString("plain"), "\"plain\"");
  EXPECT_EQ(jsonString("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(jsonString("line\nnext\ttab"), "\"line\\nnext\\ttab\"");
  EXPECT_EQ(jsonString(std::string_view("\x01", 1)), "\"\\u0001\"");
}

TEST(JsonNumber, WritesFiniteValuesExactlyAndNonFiniteAsNull) {
  EXPECT_EQ(jsonNumber(21034), "21034");
  EXPECT_EQ(jsonNumber(0.5), "0.5");
  EXPECT_EQ(std::stod(jsonNumber(16731234.920251194)), 16731234.920251194);
  EXPECT_EQ(jsonNumber(std::numeric_limits<double>::quiet_NaN()), "null");
  EXPECT_EQ(jsonNumber(std::numeric_limits<double>::infinity()), "null");
}

TEST(Report, AddLatencyAddsMedianAndBothTails) {
  Report r("rings", false, testMachine());
  LatencySummary s;
  s.count = 1000;
  s.median = 200;
  s.p99 = 600;
  s.p999 = 9000;
  r.addLatency("floor_x_ns", "floor_x_ns", "ns", s);
  ASSERT_EQ(r.figures().size(), 3u);
  EXPECT_EQ(r.find("floor_x_ns")->value, 200);
  EXPECT_EQ(r.find("floor_x_ns_p99")->value, 600);
  EXPECT_EQ(r.find("floor_x_ns_p999")->value, 9000);
  EXPECT_EQ(r.find("floor_x_ns_p999")->samples, 1000u);
  EXPECT_EQ(r.find("floor_x_ns_p50"), nullptr);
}

TEST(Report, AddLatencyComparesEachPartWithTheFloorsPartOfTheSameSuffix) {
  Report r("rings", false, testMachine());
  LatencySummary floor{.count = 10, .min = 1, .median = 100, .p99 = 200, .p999 = 1000};
  LatencySummary agate{.count = 10, .min = 1, .median = 150, .p99 = 300, .p999 = 500};
  r.addLatency("floor_x_ns", "floor_x_ns", "ns", floor);
  r.addLatency("agate_x_ns", "agate_x_ns", "ns", agate, "floor_x_ns");
  EXPECT_EQ(r.find("floor_x_ns")->ratioTo, "");
  EXPECT_EQ(r.find("agate_x_ns")->ratioTo, "floor_x_ns");
  EXPECT_EQ(r.find("agate_x_ns_p99")->ratioTo, "floor_x_ns_p99");
  EXPECT_EQ(r.find("agate_x_ns_p999")->ratioTo, "floor_x_ns_p999");
  EXPECT_DOUBLE_EQ(*r.ratioOf(*r.find("agate_x_ns")), 1.5);
  EXPECT_DOUBLE_EQ(*r.ratioOf(*r.find("agate_x_ns_p99")), 1.5);
  EXPECT_DOUBLE_EQ(*r.ratioOf(*r.find("agate_x_ns_p999")), 0.5);
}

TEST(Report, RatioDividesByTheNamedFigureOfTheSameRun) {
  Report r("rings", false, testMachine());
  r.add(figure("floor_ns", 200));
  r.add(figure("agate_ns", 300, "floor_ns"));
  r.add(figure("orphan_ns", 300, "absent_ns"));
  r.add(figure("zero_ns", 0));
  r.add(figure("over_zero_ns", 5, "zero_ns"));
  EXPECT_DOUBLE_EQ(*r.ratioOf(*r.find("agate_ns")), 1.5);
  EXPECT_FALSE(r.ratioOf(*r.find("floor_ns")).has_value());
  EXPECT_FALSE(r.ratioOf(*r.find("orphan_ns")).has_value());
  EXPECT_FALSE(r.ratioOf(*r.find("over_zero_ns")).has_value());
}

TEST(ReportDeathTest, AddingAFigureTwiceIsABug) {
  Report r("rings", false, testMachine());
  r.add(figure("floor_ns", 200));
  EXPECT_DEATH(r.add(figure("floor_ns", 300)), "floor_ns added twice");
}

TEST(Report, JsonCarriesSuiteFiguresRatiosPlacementsAndFailures) {
  Report r("rings", true, testMachine());
  r.add(figure("floor_ns", 200));
  r.add(figure("agate_ns", 300, "floor_ns"));
  r.addPlacement("floor_ns", {0, 1});
  r.setPinned(1, 0);
  r.addFailure("broken_ns", Error(Errc::TIMED_OUT, "watchdog"));
  const std::string j = r.toJson();
  EXPECT_NE(j.find("\"suite\": \"rings\""), std::string::npos) << j;
  EXPECT_NE(j.find("\"quick\": true"), std::string::npos) << j;
  EXPECT_NE(j.find("\"cpu_model\": \"Test \\\"CPU\\\"\""), std::string::npos) << j;
  EXPECT_NE(j.find("{\"name\": \"floor_ns\", \"value\": 200, \"unit\": \"ns\""), std::string::npos)
      << j;
  EXPECT_NE(j.find("\"ratio_to\": \"floor_ns\", \"ratio\": 1.5"), std::string::npos) << j;
  EXPECT_NE(j.find("{\"scenario\": \"floor_ns\", \"cpus\": [0, 1]}"), std::string::npos) << j;
  EXPECT_NE(j.find("\"error\": \"timed out: watchdog\""), std::string::npos) << j;
  EXPECT_NE(j.find("\"pinned\": [1, 0]"), std::string::npos) << j;
  EXPECT_TRUE(r.hasFailures());
}

TEST(Report, JsonSaysNothingWasPinnedByDefault) {
  Report r("rings", false, testMachine());
  EXPECT_NE(r.toJson().find("\"pinned\": null"), std::string::npos) << r.toJson();
}

TEST(Report, WriteJsonReplacesTheFileWhole) {
  Report r("rings", false, testMachine());
  r.add(figure("floor_ns", 200));
  const std::string path = ::testing::TempDir() + "report_test_out.json";
  {
    std::ofstream old(path);
    old << "stale content that is longer than nothing";
  }
  ASSERT_TRUE(r.writeJson(path).ok());
  std::ifstream in(path);
  std::stringstream got;
  got << in.rdbuf();
  EXPECT_EQ(got.str(), r.toJson());
  EXPECT_FALSE(std::ifstream(path + ".tmp").good());
  std::remove(path.c_str());
}

TEST(Report, WriteJsonIntoAMissingDirectoryFailsAndCreatesNothing) {
  Report r("rings", false, testMachine());
  const std::string path = ::testing::TempDir() + "no_such_dir_for_bench/out.json";
  const Status s = r.writeJson(path);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Errc::SYSTEM_ERROR);
  EXPECT_FALSE(std::ifstream(path).good());
  EXPECT_FALSE(std::ifstream(path + ".tmp").good());
}

}  // namespace
}  // namespace agate::bench
