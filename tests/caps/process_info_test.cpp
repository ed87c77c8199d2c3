// decodeProcessInfo: one entry of the kernel's process listing, as the kernel sent it (untrusted:
// a services list past the schema's bound is cut to it, and the count never falls below it).
#include <capnp/message.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "agate/caps/process_info.h"

namespace agate::caps {
namespace {

// An entry of process 7 naming `services` services and claiming `count` in all, built in `m`.
wire::ProcessInfo::Reader entry(capnp::MallocMessageBuilder& m, unsigned services, uint32_t count) {
  auto p = m.initRoot<wire::ProcessInfo>();
  p.setPid(7);
  p.setOsPid(4242);
  p.setUid(1000);
  p.setName("server");
  p.setBank(12);
  p.setCaps(5);
  auto list = p.initServices(services);
  for (unsigned i = 0; i < services; ++i) list.set(i, "svc" + std::to_string(i));
  p.setServiceCount(count);
  return p.asReader();
}

TEST(ProcessInfoDecode, AnEntryWithinTheBoundsIsTakenAsSent) {
  capnp::MallocMessageBuilder m;
  ProcessInfo info = decodeProcessInfo(entry(m, 2, 5));
  EXPECT_EQ(info.pid, 7u);
  EXPECT_EQ(info.osPid, 4242);
  EXPECT_EQ(info.name, "server");
  EXPECT_EQ(info.bank, 12u);
  EXPECT_EQ(info.caps, 5u);
  EXPECT_EQ(info.services, (std::vector<std::string>{"svc0", "svc1"}));
  EXPECT_EQ(info.serviceCount, 5u);
}

TEST(ProcessInfoDecode, AServicesListPastTheBoundIsCutAndTheCountNeverFallsBelowIt) {
  capnp::MallocMessageBuilder m;
  // More names than the schema allows, and a count lower than what is listed.
  ProcessInfo info = decodeProcessInfo(entry(m, wire::MAX_SERVICES_LISTED + 12, 1));
  ASSERT_EQ(info.services.size(), wire::MAX_SERVICES_LISTED);
  EXPECT_EQ(info.services.front(), "svc0");
  EXPECT_EQ(info.services.back(), "svc" + std::to_string(wire::MAX_SERVICES_LISTED - 1));
  EXPECT_EQ(info.serviceCount, wire::MAX_SERVICES_LISTED);
  EXPECT_EQ(info.pid, 7u) << "the rest of the entry is kept";
}

TEST(ProcessInfoDecode, AnOldKernelsEntryWithoutServicesHasNone) {
  capnp::MallocMessageBuilder m;
  m.initRoot<wire::ProcessInfo>().setPid(3);
  ProcessInfo info = decodeProcessInfo(m.getRoot<wire::ProcessInfo>().asReader());
  EXPECT_EQ(info.pid, 3u);
  EXPECT_TRUE(info.services.empty());
  EXPECT_EQ(info.serviceCount, 0u);
}

}  // namespace
}  // namespace agate::caps
