// A seeded randomized test over every object type and call: banks, regions, the registry,
// services, bushels (and introductions), notifications (with bank bindings), event buffers and
// credit pages, cap copies, deletes, revokes, transfers, receive limits, passed registry caps,
// destroys, kernel events and deaths, from 4 processes with handles that are often stale, forged
// or of the wrong type. Unlike kernel_model_test.cpp it keeps no reference model; it checks the
// rules that hold whatever the calls were:
//  * every result is OK or one of the errors the call documents, never SYSTEM_ERROR;
//  * a refused call changes no observable state (full KernelSnapshot before and after);
//  * the kernel's invariants hold;
//  * once every process has died, the system bank's usage, the object count, the pending events
//    and this process's open descriptors are back to their baseline.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "agate/kernel/kernel.h"
#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

// Small enough that quotas bind often and the descriptors stay far below any ulimit.
constexpr uint64_t SYSTEM_PAGES = 300;
constexpr uint64_t PROCESS_PAGES = 120;
constexpr int PROCESSES = 4;
constexpr int STEPS = 40000;

class KernelChurnTest : public ::testing::Test {
 protected:
  struct P {
    std::vector<Handle> handles;  // everything it was ever given; many go stale
  };

  void attachOne() {
    auto a = k_.tryAttachProcess(PROCESS_PAGES);
    if (!a) return;  // the system bank is full: fewer processes for a while
    procs_[a->pid].handles = {a->bank};
  }

  ProcessId anyPid() {
    auto it = procs_.begin();
    std::advance(it, pick(procs_.size()));
    // Now and then a process that is not attached.
    return pick(50) == 0 ? it->first + 1000 : it->first;
  }
  size_t pick(size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng_); }
  Handle anyHandle(ProcessId pid) {
    auto it = procs_.find(pid);
    if (it == procs_.end() || it->second.handles.empty() || pick(20) == 0)
      return Handle{rng_()};  // forged
    return it->second.handles[pick(it->second.handles.size())];
  }
  // Mostly a live cap of type `t` (so calls get past the handle checks), else anyHandle().
  Handle pickOf(ProcessId pid, ObjectType t) {
    auto it = procs_.find(pid);
    if (it == procs_.end() || pick(5) == 0) return anyHandle(pid);
    std::vector<Handle> live;
    for (Handle h : it->second.handles) {
      auto info = k_.tryInspectCap(pid, h);
      if (info && info->type == t) live.push_back(h);
    }
    return live.empty() ? anyHandle(pid) : live[pick(live.size())];
  }
  // Drops handles that no longer resolve (most of them: a few stale ones stay useful).
  void prune() {
    for (auto& entry : procs_) {
      const ProcessId pid = entry.first;
      std::erase_if(entry.second.handles,
                    [&](Handle h) { return !k_.tryInspectCap(pid, h).ok() && pick(8) != 0; });
    }
  }
  Rights anyRights() { return static_cast<Rights>(rng_() & static_cast<uint32_t>(Rights::ALL)); }
  std::string anyName() { return "svc" + std::to_string(pick(4)); }
  void keep(ProcessId pid, Handle h) {
    auto it = procs_.find(pid);
    if (it != procs_.end() && it->second.handles.size() < 256) it->second.handles.push_back(h);
  }

  // Runs one call; checks its outcome class and, on refusal (sampled), that nothing changed.
  template <class Fn>
  void call(const char* name, bool checkUnchanged, Fn&& fn) {
    KernelSnapshot before;
    if (checkUnchanged) before = k_.snapshot();
    const Errc e = fn();
    ++outcomes_[{name, e}];
    ASSERT_NE(e, Errc::SYSTEM_ERROR) << name;
    ASSERT_TRUE(e == Errc::OK || e == Errc::INVALID_HANDLE || e == Errc::WRONG_TYPE ||
                e == Errc::PERMISSION_DENIED || e == Errc::QUOTA_EXCEEDED || e == Errc::NOT_FOUND ||
                e == Errc::ALREADY_EXISTS || e == Errc::INVALID_ARGUMENT)
        << name << ": " << errcName(e);
    if (checkUnchanged && e != Errc::OK) {
      ASSERT_TRUE(k_.snapshot() == before)
          << name << " refused with " << errcName(e) << " but changed state";
    }
  }

  template <class R>
  Errc keepHandle(ProcessId pid, R&& r) {
    if (r) keep(pid, *r);
    return r.code();
  }

  void step(bool checkUnchanged) {
    const ProcessId pid = anyPid();
    const ProcessId other = anyPid();
    const Handle h = anyHandle(pid);
    const Handle bank = pickOf(pid, ObjectType::BANK);
    const Handle notification = pickOf(pid, ObjectType::NOTIFICATION);
    const Handle registry = pickOf(pid, ObjectType::REGISTRY);
    switch (pick(27)) {
      case 0:
        return call("bank", checkUnchanged,
                    [&] { return keepHandle(pid, k_.tryCreateBank(pid, bank, pick(60))); });
      case 1:
        return call("region", checkUnchanged, [&] {
          return keepHandle(pid, k_.tryCreateRegion(pid, bank, pick(6)));  // 0 is invalid
        });
      case 2:
        return call("notification", checkUnchanged, [&] {
          return keepHandle(pid, k_.tryCreateNotification(pid, bank, pick(4) == 0));
        });
      case 3:
        return call("evbuffer", checkUnchanged, [&] {
          const uint32_t slots = pick(10) == 0 ? 0 : static_cast<uint32_t>(1 + pick(130));
          return keepHandle(pid, k_.tryCreateEventBuffer(pid, bank, slots, notification));
        });
      case 4:
        if (pick(4) != 0) return;  // the daemon grants it rarely
        return call("registry", checkUnchanged,
                    [&] { return keepHandle(pid, k_.tryGrantRegistry(pid, anyRights())); });
      case 5:
        return call("register", checkUnchanged, [&] {
          return keepHandle(pid, k_.tryRegisterService(pid, registry, anyName(), bank));
        });
      case 6:
        return call("open", checkUnchanged, [&] {
          auto r = k_.tryOpenBushel(pid, registry, anyName(), bank);
          if (r) bushels_.push_back(k_.tryInspectCap(pid, *r)->koid);
          return keepHandle(pid, std::move(r));
        });
      case 7:
        return call("fds", checkUnchanged, [&] {
          switch (pick(5)) {
            case 0:
              return k_.tryBushelFds(pid, pickOf(pid, ObjectType::BUSHEL)).code();
            case 1:
              return k_.tryNotificationFds(pid, notification).code();
            case 2:
              return k_.tryMapEventBuffer(pid, pickOf(pid, ObjectType::EVENT_BUFFER), pick(2) == 0)
                  .code();
            case 3:
              return k_.tryMapRegion(pid, pickOf(pid, ObjectType::REGION), pick(2) == 0).code();
            default:
              return k_.tryMapBankCredit(pid, bank).code();
          }
        });
      case 8:
        return call("signal", checkUnchanged,
                    [&] { return k_.trySignal(pid, notification).code(); });
      case 9:
        return call("bind", checkUnchanged, [&] {
          return pick(3) == 0 ? k_.tryUnbindBankNotification(pid, bank, notification).code()
                              : k_.tryBindBankNotification(pid, bank, notification).code();
        });
      case 10:
      case 11:
        return call("copy", checkUnchanged, [&] {
          return keepHandle(pid, k_.tryCopyCap(pid, h, anyRights(), pick(4) == 0 ? rng_() : 0));
        });
      case 12:
        return call("transfer", checkUnchanged, [&] {
          auto r = k_.tryTransferCap(pid, h, other,
                                     pick(2) == 0 ? TransferMode::MOVE : TransferMode::COPY);
          if (r) keep(other, *r);
          return r.code();
        });
      case 13:
      case 14:
        return call("delete", checkUnchanged, [&] { return k_.tryDeleteCap(pid, h).code(); });
      case 15:
        return call("revoke", checkUnchanged, [&] { return k_.tryRevokeCap(pid, h).code(); });
      case 16:
      case 17:
        return call("destroy", checkUnchanged, [&] { return k_.tryDestroyObject(pid, h).code(); });
      case 18:
        return call("limit", checkUnchanged,
                    [&] { return k_.trySetBankLimit(pid, bank, pick(200)).code(); });
      case 19:
        return call("lookup", checkUnchanged,
                    [&] { return k_.tryLookupService(pid, registry, anyName()).code(); });
      case 20:
        (void)k_.takeEvents(pid);  // the daemon delivers (and closes) what is queued
        return;
      case 21:
        return call("introduce", checkUnchanged, [&] {
          return keepHandle(other, k_.tryIntroduce(pid, pickOf(pid, ObjectType::BUSHEL), other));
        });
      case 22:
        return call("open-via", checkUnchanged, [&] {
          return keepHandle(pid, k_.tryOpenBushelVia(pid, pickOf(pid, ObjectType::SERVICE), bank));
        });
      case 23:
        // A bushel opened at some point (often closed since, or another service's), any koid,
        // or one the picked service has open now (servers die often, taking their services).
        return call("close-bushel", checkUnchanged, [&] {
          const Handle service = pickOf(pid, ObjectType::SERVICE);
          Koid koid =
              bushels_.empty() || pick(5) == 0 ? rng_() % 4096 : bushels_[pick(bushels_.size())];
          const Process* proc = k_.findProcess(pid);
          if (proc != nullptr && pick(2) == 0) {
            auto cap = proc->cspace().lookup(service, Rights::NONE, ObjectType::SERVICE);
            if (cap && !cap->as<Service>().bushels().empty()) {
              const auto& open = cap->as<Service>().bushels();
              koid = open[pick(open.size())]->koid();
            }
          }
          return k_.tryCloseBushel(pid, service, koid).code();
        });
      case 24:
        // Mostly generous limits (transfers and introductions must still succeed often), some
        // tight, some out of range.
        return call("receive-limit", checkUnchanged, [&] {
          const uint32_t limit = pick(10) == 0  ? CSpace::MAX_SLOTS + 1 + pick(3)
                                 : pick(3) == 0 ? static_cast<uint32_t>(pick(4))
                                                : static_cast<uint32_t>(16 + pick(200));
          return k_.trySetReceiveLimit(pid, limit).code();
        });
      case 25:
        return call("pass-registry", checkUnchanged, [&] {
          auto r = k_.tryPassRegistry(pid, registry, other, anyRights());
          if (r) keep(other, *r);
          return r.code();
        });
      default:
        if (pick(8) != 0) return;
        if (procs_.count(pid)) {
          ASSERT_TRUE(k_.tryKillProcess(pid).ok());
          procs_.erase(pid);
          ++deaths_;
        }
        while (procs_.size() < PROCESSES) {
          const size_t n = procs_.size();
          attachOne();
          if (procs_.size() == n) break;
        }
        return;
    }
  }

  Kernel k_{Kernel::Options{.systemPages = SYSTEM_PAGES}};
  std::map<ProcessId, P> procs_;
  std::mt19937_64 rng_{0xc0ffee};
  int deaths_ = 0;
  std::map<std::pair<std::string, Errc>, int> outcomes_;
  std::vector<Koid> bushels_;  // every bushel opened by name, for close-bushel
};

TEST_F(KernelChurnTest, RandomCallsOnEveryObjectTypeKeepTheRulesAndDeathsReclaimEverything) {
  const size_t fdsBefore = countOpenFds();
  for (int i = 0; i < PROCESSES; ++i) attachOne();
  for (int i = 0; i < STEPS; ++i) {
    // Every refusal is checked early on (where a bug shows first), then every 8th step.
    ASSERT_NO_FATAL_FAILURE(step(i < 3000 || i % 8 == 0)) << "step " << i;
    if (i < 3000 || i % 16 == 0) k_.verifyInvariants();
    if (procs_.empty()) attachOne();
    if (i % 200 == 0) prune();
  }
  for (auto& [key, n] : outcomes_)
    std::printf("%-13s %-18s %d\n", key.first.c_str(), errcName(key.second), n);
  EXPECT_GT(deaths_, 30);
  // The walk reached the interesting successes, not just refusals.
  for (const char* name :
       {"bank", "region", "notification", "evbuffer", "registry", "register", "open", "fds",
        "signal", "bind", "copy", "transfer", "delete", "revoke", "destroy", "limit", "lookup"})
    EXPECT_GT((outcomes_[{name, Errc::OK}]), 5) << name;
  const int quotaRefusals = outcomes_[{"evbuffer", Errc::QUOTA_EXCEEDED}] +
                            outcomes_[{"notification", Errc::QUOTA_EXCEEDED}];
  EXPECT_GT(quotaRefusals, 5);
  EXPECT_GT((outcomes_[{"introduce", Errc::OK}]), 0);
  EXPECT_GT((outcomes_[{"open-via", Errc::OK}]), 0);
  EXPECT_GT((outcomes_[{"close-bushel", Errc::OK}]), 0);
  EXPECT_GT((outcomes_[{"receive-limit", Errc::OK}]), 0);
  EXPECT_GT((outcomes_[{"receive-limit", Errc::INVALID_ARGUMENT}]), 0);
  EXPECT_GT((outcomes_[{"pass-registry", Errc::OK}]), 0);
  EXPECT_GT((outcomes_[{"transfer", Errc::QUOTA_EXCEEDED}]) +
                (outcomes_[{"pass-registry", Errc::QUOTA_EXCEEDED}]) +
                (outcomes_[{"introduce", Errc::QUOTA_EXCEEDED}]),
            0)
      << "a push past a receive limit";
  EXPECT_GT((outcomes_[{"bind", Errc::ALREADY_EXISTS}]), 0);

  std::vector<ProcessId> pids;
  for (auto& [pid, p] : procs_) pids.push_back(pid);
  for (ProcessId pid : pids) ASSERT_TRUE(k_.tryKillProcess(pid).ok());
  k_.verifyInvariants();
  EXPECT_EQ(k_.systemBank().used(), 0u);
  EXPECT_EQ(k_.objectCount(), 0u);
  EXPECT_EQ(k_.snapshot().pendingEvents, 0u);
  EXPECT_EQ(k_.registry().names().size(), 0u);
  EXPECT_EQ(countOpenFds(), fdsBefore) << "every memfd, pipe and ring was closed";
}

}  // namespace
}  // namespace agate::kernel::test
