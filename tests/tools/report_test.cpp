// agate ps / banks / caps output from plain structs: table layout and JSON fields.
#include "agate/tools/report.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

namespace agate::tools {
namespace {

using caps::BankInfo;
using caps::CapEntry;
using caps::ObjectType;
using caps::ProcessInfo;
using caps::Rights;
using Json = nlohmann::json;

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

Json parse(const std::string& text) {
  Json j = Json::parse(text, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << text;
  return j;
}

const std::vector<ProcessInfo> PROCESSES = {
    {.pid = 1,
     .osPid = 4242,
     .uid = 1000,
     .name = "server",
     .bank = 10,
     .caps = 3,
     .services = {"calc", "store"},
     .serviceCount = 2},
    {.pid = 12, .osPid = 77, .uid = 1000, .name = "a-long-client-name", .bank = 11, .caps = 12},
};

// system(1) -> process banks 10, 11 -> 20 under 10, 21 under 20; 30 under 11.
const std::vector<BankInfo> BANKS = {
    {.koid = 1, .parent = 0, .used = 60, .limit = 1000, .ownPages = 2, .objects = 3, .caps = 1},
    {.koid = 10, .parent = 1, .used = 40, .limit = 64, .ownPages = 1, .objects = 2, .caps = 1},
    {.koid = 11, .parent = 1, .used = 18, .limit = 64, .ownPages = 1, .objects = 1, .caps = 1},
    {.koid = 20, .parent = 10, .used = 30, .limit = 37, .ownPages = 3, .objects = 1, .caps = 2},
    {.koid = 21, .parent = 20, .used = 5, .limit = 8, .ownPages = 5, .objects = 1, .caps = 1},
    {.koid = 30, .parent = 11, .used = 0, .limit = 0, .ownPages = 0, .objects = 0, .caps = 1},
};

TEST(RightsTest, LettersShowEachRightInBitOrderAndDashesForMissingOnes) {
  EXPECT_EQ(rightsLetters(Rights::ALL), "rwgacld");
  EXPECT_EQ(rightsLetters(Rights::NONE), "-------");
  EXPECT_EQ(rightsLetters(Rights::READ | Rights::GRANT | Rights::DESTROY), "r-g---d");
  EXPECT_EQ(rightsLetters(static_cast<Rights>(1u << 20 | 1u)), "r------?");
}

TEST(RightsTest, NamesListOnlyTheRightsPresent) {
  EXPECT_EQ(rightNames(Rights::READ | Rights::SET_LIMIT),
            (std::vector<std::string>{"read", "set_limit"}));
  EXPECT_TRUE(rightNames(Rights::NONE).empty());
  EXPECT_EQ(rightNames(Rights::ALL).size(), 7u);
}

TEST(ProcessesReportTest, TableAlignsColumnsUnderTheirHeaders) {
  const auto l = lines(processesTable(PROCESSES));
  ASSERT_EQ(l.size(), 3u);
  EXPECT_EQ(l[0], "PID  OS PID   UID  NAME                BANK  CAPS  SERVICES");
  EXPECT_EQ(l[1], "  1    4242  1000  server                10     3  calc,store");
  EXPECT_EQ(l[2], " 12      77  1000  a-long-client-name    11    12  -");
}

TEST(ProcessesReportTest, ServicesBeyondThoseListedAreCounted) {
  std::vector<ProcessInfo> many = {
      {.pid = 3, .name = "busy", .services = {"a", "b"}, .serviceCount = 12}};
  const auto l = lines(processesTable(many));
  ASSERT_EQ(l.size(), 2u);
  EXPECT_TRUE(l[1].ends_with("a,b +10")) << l[1];
  Json j = parse(processesJson(many));
  EXPECT_EQ(j["processes"][0]["services"], Json::parse(R"(["a", "b"])"));
  EXPECT_EQ(j["processes"][0]["service_count"], 12);
}

TEST(ProcessesReportTest, EmptyListPrintsOnlyTheHeaderAndAnEmptyJsonArray) {
  EXPECT_EQ(lines(processesTable({})).size(), 1u);
  EXPECT_EQ(parse(processesJson({})), Json::parse(R"({"processes": []})"));
}

TEST(ProcessesReportTest, JsonHasTheDocumentedFields) {
  Json j = parse(processesJson(PROCESSES));
  ASSERT_EQ(j["processes"].size(), 2u);
  EXPECT_EQ(j["processes"][1], Json::parse(R"({"pid": 12, "os_pid": 77, "uid": 1000,
      "name": "a-long-client-name", "bank": 11, "caps": 12, "services": [],
      "service_count": 0})"));
  EXPECT_EQ(j["processes"][0]["services"], Json::parse(R"(["calc", "store"])"));
  EXPECT_EQ(j["processes"][0]["service_count"], 2);
}

TEST(ProcessesReportTest, JsonEscapesNamesAndNeverThrowsOnInvalidUtf8) {
  std::vector<ProcessInfo> odd = {{.pid = 1, .name = "quote\" back\\ \xff"}};
  const std::string text = processesJson(odd);
  Json j = parse(text);
  EXPECT_EQ(j["processes"][0]["name"].get<std::string>().substr(0, 12), "quote\" back\\");
}

TEST(BanksReportTest, TableIndentsEachBankUnderItsParentWithOwners) {
  const auto l = lines(banksTable(BANKS, PROCESSES));
  ASSERT_EQ(l.size(), 8u);  // header, six banks, footnote
  EXPECT_EQ(l[0].substr(0, 10), "BANK      ");
  // Tree order, two spaces per level.
  const std::vector<std::string> firstCells = {"1", "  10", "    20", "      21", "  11", "    30"};
  for (size_t i = 0; i < firstCells.size(); ++i)
    EXPECT_EQ(l[i + 1].substr(0, firstCells[i].size() + 1), firstCells[i] + " ") << l[i + 1];
  EXPECT_NE(l[1].find("system"), std::string::npos) << l[1];
  EXPECT_NE(l[2].find("pid 1 (server)"), std::string::npos) << l[2];
  EXPECT_NE(l[5].find("pid 12 (a-long-client-name)"), std::string::npos) << l[5];
  EXPECT_EQ(l[3].find("pid"), std::string::npos) << l[3];
  // Bank 20 in full: used, limit, use%, own, objects, caps, no owner and no trailing blanks.
  EXPECT_EQ(l[3], "    20      30     37  81%    3        1     2");
  // A zero limit with nothing used reads 0%.
  EXPECT_EQ(l[6], "    30       0      0   0%    0        0     1");
  EXPECT_NE(l[7].find("pages of 4096 bytes"), std::string::npos);
}

TEST(BanksReportTest, JsonListsBanksInTreeOrderWithDepthAndOwner) {
  Json j = parse(banksJson(BANKS, PROCESSES));
  EXPECT_EQ(j["page_bytes"], 4096);
  const auto& banks = j["banks"];
  ASSERT_EQ(banks.size(), 6u);
  std::vector<uint64_t> order;
  for (const Json& b : banks) order.push_back(b["koid"]);
  EXPECT_EQ(order, (std::vector<uint64_t>{1, 10, 20, 21, 11, 30}));
  EXPECT_EQ(banks[2], Json::parse(R"({"koid": 20, "parent": 10, "depth": 2, "used_pages": 30,
      "limit_pages": 37, "own_pages": 3, "objects": 1, "caps": 2, "owner_pid": null})"));
  EXPECT_EQ(banks[1]["owner_pid"], 1);
  EXPECT_EQ(banks[0]["depth"], 0);
}

TEST(BanksReportTest, OrphansAndParentCyclesAreShownOnceAsRoots) {
  const std::vector<BankInfo> odd = {
      {.koid = 5, .parent = 99},  // parent absent
      {.koid = 7, .parent = 8},   // 7 <-> 8: a cycle no root reaches
      {.koid = 8, .parent = 7},
      {.koid = 9, .parent = 9},  // its own parent
  };
  Json j = parse(banksJson(odd, {}));
  std::vector<std::pair<uint64_t, int>> got;
  for (const Json& b : j["banks"]) got.emplace_back(b["koid"], b["depth"]);
  EXPECT_EQ(got, (std::vector<std::pair<uint64_t, int>>{{5, 0}, {9, 0}, {7, 0}, {8, 1}}));
  EXPECT_EQ(lines(banksTable(odd, {})).size(), 6u);
}

const std::vector<CapEntry> CAPS = {
    {.handle = (1ull << 32) | 0, .koid = 10, .type = ObjectType::BANK, .rights = Rights::ALL},
    {.handle = (3ull << 32) | 4,
     .koid = 44,
     .type = ObjectType::REGION,
     .rights = Rights::READ,
     .badge = 9,
     .parentHandle = (1ull << 32) | 2,
     .parentPid = 12},
    {.handle = (1ull << 32) | 5,
     .koid = 45,
     .type = ObjectType::REGION,
     .rights = Rights::READ | Rights::WRITE,
     .parentHandle = (3ull << 32) | 4,
     .parentPid = 1},
};

TEST(CapsReportTest, TableShowsSlotGenerationTypeRightsBadgeObjectAndDerivation) {
  const auto l = lines(capsTable(1, CAPS));
  ASSERT_EQ(l.size(), 5u);
  EXPECT_EQ(l[0], "process 1: 3 caps");
  EXPECT_EQ(l[1], "SLOT  GEN  TYPE    RIGHTS   BADGE  OBJECT  DERIVED FROM");
  EXPECT_EQ(l[2], "   0    1  bank    rwgacld      0      10  -");
  EXPECT_EQ(l[3], "   4    3  region  r------      9      44  pid 12 slot 2");
  EXPECT_EQ(l[4], "   5    1  region  rw-----      0      45  slot 4");
}

TEST(CapsReportTest, JsonSplitsTheHandleAndNamesRights) {
  Json j = parse(capsJson(1, CAPS));
  EXPECT_EQ(j["pid"], 1);
  ASSERT_EQ(j["caps"].size(), 3u);
  EXPECT_EQ(j["caps"][1], Json::parse(R"({"slot": 4, "generation": 3, "handle": 12884901892,
      "type": "region", "rights": ["read"], "rights_mask": 1, "badge": 9, "object": 44,
      "parent_pid": 12, "parent_handle": 4294967298})"));
  EXPECT_TRUE(j["caps"][0]["parent_pid"].is_null());
  EXPECT_TRUE(j["caps"][0]["parent_handle"].is_null());
  EXPECT_EQ(j["caps"][0]["rights"].size(), 7u);
}

}  // namespace
}  // namespace agate::tools
