// agate-kernel through its real socket and rings, driven by agate::caps: attach, bank tree
// accounting, refusals that change nothing, revoke, batched calls beyond a ring's worth, and the
// kernel's own death.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include <gtest/gtest.h>

#include "../support/watchdog.h"
#include "agate/caps/kernel_connection.h"
#include "kernel_fixture.h"

namespace agate::caps {
namespace {

using agate::testing::KernelProcess;
using agate::testing::Watchdog;
using std::chrono::seconds;

struct Client {
  explicit Client(const KernelProcess& kernel, const char* name = "test") {
    auto c = KernelConnection::tryAttach(loop, kernel.home(), name);
    EXPECT_TRUE(c.ok()) << errcName(c.code());
    if (c) conn = std::move(*c);
  }
  SyncKernel sync() { return conn->sync(); }
  EventLoop loop;
  std::unique_ptr<KernelConnection> conn;
};

// The value of a call that must succeed (a default value, and a test failure, if it did not).
template <class T>
T get(Result<T> r) {
  if (!r.ok()) {
    ADD_FAILURE() << "call failed: " << errcName(r.code());
    return T{};
  }
  return std::move(r).value();
}

BankInfo findBank(const std::vector<BankInfo>& banks, Koid koid) {
  auto it =
      std::find_if(banks.begin(), banks.end(), [&](const BankInfo& b) { return b.koid == koid; });
  return it == banks.end() ? BankInfo{} : *it;
}

TEST(KernelDaemon, AttachTakesPidAndUidFromTheSocketCredentials) {
  Watchdog dog("attach", seconds(30));
  KernelProcess kernel;
  Client c(kernel, "attach-test");
  ASSERT_TRUE(c.conn);
  EXPECT_TRUE(c.conn->bank().valid());
  EXPECT_TRUE(c.conn->registry().valid());
  EXPECT_EQ(c.conn->kernelPid(), kernel.pid());
  auto procs = c.sync().listProcesses();
  ASSERT_TRUE(procs.ok());
  ASSERT_EQ(procs->size(), 1u);
  EXPECT_EQ((*procs)[0].pid, c.conn->pid());
  EXPECT_EQ((*procs)[0].osPid, ::getpid());
  EXPECT_EQ((*procs)[0].uid, ::geteuid());
  EXPECT_EQ((*procs)[0].name, "attach-test");
  auto bank = c.sync().inspectCap(c.conn->bank());
  ASSERT_TRUE(bank.ok());
  EXPECT_EQ(bank->type, ObjectType::BANK);
  EXPECT_EQ((*procs)[0].bank, bank->koid);
}

TEST(KernelDaemon, AttachToAHomeWithoutKernelIsDisconnected) {
  EventLoop loop;
  auto c = KernelConnection::tryAttach(loop, "/tmp/agate-no-such-home-for-tests", "x");
  EXPECT_EQ(c.code(), Errc::DISCONNECTED);
}

TEST(KernelDaemon, AttachRefusesAnEmptyOrOverlongName) {
  KernelProcess kernel;
  EventLoop loop;
  EXPECT_EQ(KernelConnection::tryAttach(loop, kernel.home(), "").code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(KernelConnection::tryAttach(loop, kernel.home(), std::string(65, 'n')).code(),
            Errc::INVALID_ARGUMENT);
}

TEST(KernelDaemon, BankTreeChargesEveryAncestorAndDestroyRefundsIt) {
  Watchdog dog("bank tree", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  const BankCredit before = get(s.readBank(c.conn->bank()));
  auto child = s.createBank(c.conn->bank(), 100);
  ASSERT_TRUE(child.ok());
  auto grandchild = s.createBank(*child, 50);
  ASSERT_TRUE(grandchild.ok());
  auto region = s.createRegion(*grandchild, 10);
  ASSERT_TRUE(region.ok());

  const BankCredit g = get(s.readBank(*grandchild));
  const BankCredit ch = get(s.readBank(*child));
  const BankCredit p = get(s.readBank(c.conn->bank()));
  EXPECT_EQ(g.limit, 50u);
  EXPECT_GE(g.used, 10u);  // the region's pages and the grandchild's record page
  EXPECT_GE(ch.used, g.used);
  EXPECT_GT(p.used, before.used);

  // Over the tightest limit: refused, nothing charged anywhere.
  const auto banksBefore = get(s.listBanks());
  EXPECT_EQ(s.createRegion(*grandchild, 45).code(), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(s.createRegion(*child, 200).code(), Errc::QUOTA_EXCEEDED);
  const auto banksAfter = get(s.listBanks());
  ASSERT_EQ(banksBefore.size(), banksAfter.size());
  for (size_t i = 0; i < banksBefore.size(); ++i) {
    EXPECT_EQ(banksBefore[i].koid, banksAfter[i].koid);
    EXPECT_EQ(banksBefore[i].used, banksAfter[i].used);
  }
  // The tree, parents first, as the CLI shows it.
  const Koid childKoid = s.inspectCap(*child)->koid;
  const Koid grandKoid = s.inspectCap(*grandchild)->koid;
  EXPECT_EQ(findBank(banksAfter, grandKoid).parent, childKoid);
  EXPECT_EQ(findBank(banksAfter, grandKoid).used, g.used);

  ASSERT_TRUE(s.destroy(*child).ok());
  EXPECT_EQ(s.readBank(c.conn->bank())->used, before.used);
  EXPECT_EQ(s.readBank(*grandchild).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.inspectCap(*region).code(), Errc::INVALID_HANDLE);
}

TEST(KernelDaemon, RefusedCallsReportTheKernelsErrorAndChangeNothing) {
  Watchdog dog("refusals", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  auto bank = s.createBank(c.conn->bank(), 20);
  ASSERT_TRUE(bank.ok());
  auto readOnly = s.copyCap(*bank, Rights::READ);
  ASSERT_TRUE(readOnly.ok());
  const auto caps = get(s.listCaps(c.conn->pid()));
  const auto banks = get(s.listBanks());

  EXPECT_EQ(s.createBank(*readOnly, 5).code(), Errc::PERMISSION_DENIED);
  EXPECT_FALSE(c.conn->lastErrorDetail().empty());
  EXPECT_EQ(s.copyCap(*readOnly, Rights::ALL).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.createRegion(Cap<SpaceBank>{0xdead00000007ull}, 1).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.createRegion(capAs<SpaceBank>(c.conn->registry()), 1).code(), Errc::WRONG_TYPE);
  EXPECT_EQ(s.setBankLimit(c.conn->bank(), 1).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.destroy(c.conn->bank()).code(), Errc::PERMISSION_DENIED);
  EXPECT_EQ(s.listCaps(9999).code(), Errc::NOT_FOUND);
  EXPECT_EQ(s.transferCap(*bank, 9999, TransferMode::COPY).code(), Errc::NOT_FOUND);

  const auto capsAfter = get(s.listCaps(c.conn->pid()));
  ASSERT_EQ(caps.size(), capsAfter.size());
  for (size_t i = 0; i < caps.size(); ++i) {
    EXPECT_EQ(caps[i].handle, capsAfter[i].handle);
    EXPECT_EQ(caps[i].rights, capsAfter[i].rights);
  }
  const auto banksAfter = get(s.listBanks());
  ASSERT_EQ(banks.size(), banksAfter.size());
  for (size_t i = 0; i < banks.size(); ++i) EXPECT_EQ(banks[i].used, banksAfter[i].used);
}

TEST(KernelDaemon, RevokeDeletesEveryDerivedCapTransitively) {
  Watchdog dog("revoke", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  auto s = c.sync();
  auto bank = s.createBank(c.conn->bank(), 20);
  ASSERT_TRUE(bank.ok());
  auto copy = s.copyCap(*bank, Rights::READ | Rights::GRANT | Rights::CREATE_CHILD);
  ASSERT_TRUE(copy.ok());
  auto copyOfCopy = s.copyCap(*copy, Rights::READ, /*badge=*/7);
  ASSERT_TRUE(copyOfCopy.ok());
  auto info = s.inspectCap(*copyOfCopy);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->badge, 7u);
  EXPECT_EQ(info->rights, Rights::READ);

  auto revoked = s.revokeCap(*bank);
  ASSERT_TRUE(revoked.ok());
  EXPECT_EQ(*revoked, 2u);
  EXPECT_EQ(s.inspectCap(*copy).code(), Errc::INVALID_HANDLE);
  EXPECT_EQ(s.inspectCap(*copyOfCopy).code(), Errc::INVALID_HANDLE);
  EXPECT_TRUE(s.readBank(*bank).ok());  // the revoked cap itself stays
  EXPECT_TRUE(s.deleteCap(*bank).ok());
  EXPECT_EQ(s.deleteCap(*bank).code(), Errc::INVALID_HANDLE);
}

// Several thousand calls in flight at once: more than the submission ring holds, so some wait
// for space; every one completes with its own answer.
Promise<void> manyCopies(KernelConnection& c, int n, int& ok, int& distinct) {
  std::vector<Promise<Cap<SpaceBank>>> calls;
  calls.reserve(n);
  for (int i = 0; i < n; ++i) calls.push_back(c.copyCap(c.bank(), Rights::READ, 0));
  std::vector<uint64_t> handles;
  for (auto& p : calls) {
    Result<Cap<SpaceBank>> r = co_await p;
    if (r) {
      ++ok;
      handles.push_back(r->handle);
    }
  }
  std::sort(handles.begin(), handles.end());
  distinct = static_cast<int>(std::unique(handles.begin(), handles.end()) - handles.begin());
  co_return {};
}

TEST(KernelDaemon, BatchedCallsBeyondTheRingsCapacityAllComplete) {
  Watchdog dog("batched", seconds(60));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  int ok = 0;
  int distinct = 0;
  constexpr int N = 3000;  // ~80 bytes a frame: more than a 64 KiB ring holds
  ASSERT_TRUE(c.loop.run(manyCopies(*c.conn, N, ok, distinct)).ok());
  EXPECT_EQ(ok, N);
  EXPECT_EQ(distinct, N);
  auto procs = c.sync().listProcesses();
  ASSERT_TRUE(procs.ok());
  ASSERT_EQ(procs->size(), 1u);
  EXPECT_EQ((*procs)[0].caps, uint32_t{N} + 2);  // the copies, the bank, the registry
  // 3002 caps do not fit in one completion frame: refused, and the connection carries on.
  EXPECT_EQ(c.sync().listCaps(c.conn->pid()).code(), Errc::MESSAGE_TOO_LARGE);
  EXPECT_TRUE(c.sync().readBank(c.conn->bank()).ok());
}

TEST(KernelDaemon, CallsFailDisconnectedOnceTheKernelDies) {
  Watchdog dog("kernel death", seconds(30));
  KernelProcess kernel;
  Client c(kernel);
  ASSERT_TRUE(c.conn);
  ASSERT_TRUE(c.sync().readBank(c.conn->bank()).ok());
  ::kill(kernel.pid(), SIGKILL);
  kernel.stop();
  EXPECT_EQ(c.sync().readBank(c.conn->bank()).code(), Errc::DISCONNECTED);
  EXPECT_EQ(c.sync().createBank(c.conn->bank(), 1).code(), Errc::DISCONNECTED);
  EXPECT_EQ(c.conn->state(), Errc::DISCONNECTED);
}

TEST(KernelDaemon, SecondDaemonOnTheSameHomeRefusesToStart) {
  KernelProcess kernel;
  const std::string cmd =
      std::string(AGATE_KERNEL_BINARY) + " --home " + kernel.home() + " 2>/dev/null";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  EventLoop loop;
  EXPECT_TRUE(KernelConnection::tryAttach(loop, kernel.home(), "still-served").ok());
}

}  // namespace
}  // namespace agate::caps
