// Paged introspection (Kernel::listProcesses / listBanks / listCaps): every page size, walked by
// cursor to the end, lists exactly what a snapshot holds, in key order, once each; holes in a
// CSpace (freed slots, whole freed chunks) are skipped; banks and processes that go leave the
// listings; CSpace::nextCap agrees with a scan of the table for every start.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

// Walks a listing page by page, as the daemon does (the cursor is one past the last key).
template <class T, class Fetch, class Key>
std::vector<T> walk(Fetch fetch, Key key, uint32_t limit) {
  std::vector<T> all;
  uint64_t cursor = 0;
  for (int pages = 0; pages < 100000; ++pages) {
    Listing<T> page = fetch(cursor, limit);
    EXPECT_LE(page.entries.size(), std::max<uint32_t>(limit, 1));
    all.insert(all.end(), page.entries.begin(), page.entries.end());
    if (!page.more) return all;
    EXPECT_FALSE(page.entries.empty()) << "a page that says more follows holds something";
    cursor = key(page.entries.back()) + 1;
  }
  ADD_FAILURE() << "the listing never ended";
  return all;
}

std::vector<KernelSnapshot::Bank> banksOf(const Kernel& k, uint32_t limit) {
  return walk<KernelSnapshot::Bank>([&](uint64_t c, uint32_t l) { return k.listBanks(c, l); },
                                    [](const KernelSnapshot::Bank& b) { return b.koid; }, limit);
}

std::vector<ProcessSummary> processesOf(const Kernel& k, uint32_t limit) {
  return walk<ProcessSummary>([&](uint64_t c, uint32_t l) { return k.listProcesses(c, l); },
                              [](const ProcessSummary& p) { return uint64_t{p.pid}; }, limit);
}

std::vector<CapSummary> capsOf(const Kernel& k, ProcessId pid, uint32_t limit) {
  return walk<CapSummary>(
      [&](uint64_t c, uint32_t l) {
        auto r = k.listCaps(pid, c, l);
        EXPECT_TRUE(r.ok());
        return r.ok() ? *r : Listing<CapSummary>{};
      },
      [](const CapSummary& c) { return c.cap.handle & 0xffffffffu; }, limit);
}

// Every listing, at every page size, equals the snapshot.
void expectListingsMatchSnapshot(const Kernel& k) {
  const KernelSnapshot snap = k.snapshot();
  std::vector<KernelSnapshot::Bank> banks = snap.banks;
  std::sort(banks.begin(), banks.end(),
            [](const auto& a, const auto& b) { return a.koid < b.koid; });
  for (uint32_t limit : {0u, 1u, 2u, 3u, 7u, 64u, 100000u}) {
    EXPECT_EQ(banksOf(k, limit), banks) << "limit " << limit;
    const auto procs = processesOf(k, limit);
    ASSERT_EQ(procs.size(), snap.processes.size()) << "limit " << limit;
    for (size_t i = 0; i < procs.size(); ++i) {
      const KernelSnapshot::Proc& p = snap.processes[i];
      EXPECT_EQ(procs[i].pid, p.pid);
      EXPECT_EQ(procs[i].bank, p.bank);
      EXPECT_EQ(procs[i].caps, p.caps.size());
      const auto caps = capsOf(k, p.pid, limit);
      ASSERT_EQ(caps.size(), p.caps.size()) << "pid " << p.pid << " limit " << limit;
      for (size_t j = 0; j < caps.size(); ++j) {
        EXPECT_EQ(caps[j].cap, p.caps[j]);
        auto info = k.tryInspectCap(p.pid, Handle{caps[j].cap.handle});
        ASSERT_TRUE(info.ok());
        EXPECT_EQ(caps[j].type, info->type);
      }
    }
  }
}

TEST(Listing, EveryPageSizeListsWhatTheSnapshotHoldsInKeyOrder) {
  Kernel k;
  Proc a = attach(k, 5000), b = attach(k, 5000), c = attach(k, 5000);
  Handle sub = handleOf(k.tryCreateBank(a.pid, a.bank, 1000));
  (void)handleOf(k.tryCreateBank(a.pid, sub, 100));
  Handle region = handleOf(k.tryCreateRegion(b.pid, b.bank, 2));
  Handle inC = handleOf(k.tryTransferCap(b.pid, region, c.pid, TransferMode::COPY));
  (void)handleOf(k.tryCopyCap(c.pid, inC, Rights::READ, 7));
  for (int i = 0; i < 70; ++i) (void)handleOf(k.tryCopyCap(a.pid, a.bank, Rights::READ));
  expectListingsMatchSnapshot(k);
}

TEST(Listing, CapsSkipFreedSlotsAndWholeFreedChunks) {
  Kernel k;
  Proc p = attach(k, 5000);
  std::vector<Handle> caps;
  for (int i = 0; i < 700; ++i) caps.push_back(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)));
  // Keep a few, spread so that whole chunks and whole words of chunks are empty between them.
  for (size_t i = 0; i < caps.size(); ++i) {
    if (i != 3 && i != 31 && i != 32 && i != 400 && i != 699) {
      ASSERT_TRUE(k.tryDeleteCap(p.pid, caps[i]).ok());
    }
  }
  EXPECT_EQ(capsOf(k, p.pid, 1).size(), 6u) << "the bank cap and the five kept";
  expectListingsMatchSnapshot(k);
  // A cursor past every slot, and one far beyond any index: an empty last page.
  auto past = k.listCaps(p.pid, 5000, 10);
  ASSERT_TRUE(past.ok());
  EXPECT_TRUE(past->entries.empty());
  EXPECT_FALSE(past->more);
  auto far = k.listCaps(p.pid, uint64_t{1} << 40, 10);
  ASSERT_TRUE(far.ok());
  EXPECT_TRUE(far->entries.empty());
  EXPECT_FALSE(far->more);
}

TEST(Listing, BanksAndProcessesThatGoLeaveTheListings) {
  Kernel k;
  Proc a = attach(k, 5000), b = attach(k, 5000);
  Handle sub = handleOf(k.tryCreateBank(a.pid, a.bank, 1000));
  Handle subsub = handleOf(k.tryCreateBank(a.pid, sub, 100));
  (void)handleOf(k.tryCreateBank(a.pid, subsub, 10));
  (void)handleOf(k.tryCreateBank(b.pid, b.bank, 10));
  EXPECT_EQ(banksOf(k, 2).size(), 1u + 2 + 3 + 1);
  ASSERT_TRUE(k.tryDestroyObject(a.pid, sub).ok());  // and the two below it
  EXPECT_EQ(banksOf(k, 2).size(), 1u + 2 + 1);
  expectListingsMatchSnapshot(k);
  ASSERT_TRUE(k.tryKillProcess(b.pid).ok());
  EXPECT_EQ(banksOf(k, 2).size(), 1u + 1);
  EXPECT_EQ(processesOf(k, 1).size(), 1u);
  expectListingsMatchSnapshot(k);
}

// A process's entry names the services it serves, sorted, the first SERVICES_LISTED of them,
// with the count of all; a service destroyed, or its server's death, takes it out.
TEST(Listing, ProcessesNameTheServicesTheyServeSortedAndCounted) {
  Kernel k;
  Proc a = attach(k), b = attach(k);
  Handle registry = handleOf(k.tryGrantRegistry(a.pid, Rights::ALL));
  std::vector<Handle> services;
  for (const char* name :
       {"kappa", "alpha", "juliet", "bravo", "india", "charlie", "hotel", "delta", "golf", "echo"})
    services.push_back(handleOf(k.tryRegisterService(a.pid, registry, name, a.bank)));
  auto entryOf = [&](ProcessId pid) {
    for (const ProcessSummary& p : processesOf(k, 0))
      if (p.pid == pid) return p;
    ADD_FAILURE() << "no entry for process " << pid;
    return ProcessSummary{};
  };
  ProcessSummary pa = entryOf(a.pid);
  EXPECT_EQ(pa.serviceCount, 10u);
  EXPECT_EQ(pa.services, (std::vector<std::string>{"alpha", "bravo", "charlie", "delta", "echo",
                                                   "golf", "hotel", "india"}));
  EXPECT_TRUE(entryOf(b.pid).services.empty());
  EXPECT_EQ(entryOf(b.pid).serviceCount, 0u);

  ASSERT_TRUE(k.tryDestroyObject(a.pid, services[1]).ok());  // "alpha" unregistered
  pa = entryOf(a.pid);
  EXPECT_EQ(pa.serviceCount, 9u);
  EXPECT_EQ(pa.services.front(), "bravo");
  EXPECT_EQ(pa.services.back(), "juliet");

  // b registers a name a gave up; a's death takes all of a's away.
  Handle registryB = handleOf(k.tryGrantRegistry(b.pid, Rights::ALL));
  (void)handleOf(k.tryRegisterService(b.pid, registryB, "alpha", b.bank));
  ASSERT_TRUE(k.tryKillProcess(a.pid).ok());
  const std::vector<ProcessSummary> left = processesOf(k, 1);
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].services, std::vector<std::string>{"alpha"});
  EXPECT_EQ(left[0].serviceCount, 1u);
}

TEST(Listing, RefusalsAndCursorsOutOfRange) {
  Kernel k;
  Proc a = attach(k);
  EXPECT_REFUSED_UNCHANGED(k, k.listCaps(a.pid + 1, 0, 10), Errc::NOT_FOUND);
  auto none = k.listProcesses(uint64_t{UINT32_MAX} + 1, 10);
  EXPECT_TRUE(none.entries.empty());
  EXPECT_FALSE(none.more);
  auto fromA = k.listProcesses(a.pid, 10);
  ASSERT_EQ(fromA.entries.size(), 1u);
  EXPECT_EQ(k.listProcesses(a.pid + 1, 10).entries.size(), 0u);
  EXPECT_TRUE(k.listBanks(UINT64_MAX, 10).entries.empty());
}

TEST(Listing, NextCapAgreesWithAScanForEveryStart) {
  Kernel k;
  Proc p = attach(k, 50000);
  std::mt19937_64 rng(20261206);
  std::vector<Handle> held;
  const CSpace& cspace = k.findProcess(p.pid)->cspace();
  for (int round = 0; round < 6; ++round) {
    // Grow past several words of chunks (64 chunks = 2048 slots), then free at random, in
    // runs, so that single slots, chunks and words of chunks are empty.
    for (int i = 0; i < 1500; ++i)
      held.push_back(handleOf(k.tryCopyCap(p.pid, p.bank, Rights::READ)));
    const size_t run = 1 + rng() % 300;
    for (size_t i = rng() % held.size(), n = 0; n < run && i < held.size(); ++n) {
      ASSERT_TRUE(k.tryDeleteCap(p.pid, held[i]).ok());
      held.erase(held.begin() + static_cast<long>(i));
    }
    for (size_t i = 0; i < held.size();) {
      if (rng() % 3 == 0) {
        ASSERT_TRUE(k.tryDeleteCap(p.pid, held[i]).ok());
        held.erase(held.begin() + static_cast<long>(i));
      } else {
        ++i;
      }
    }
    std::vector<uint32_t> occupied;
    cspace.forEachCap([&](const Slot& s) { occupied.push_back(s.index); });
    for (uint32_t from = 0; from <= cspace.capacity() + 1; ++from) {
      auto want = std::lower_bound(occupied.begin(), occupied.end(), from);
      const Slot* got = cspace.nextCap(from);
      if (want == occupied.end()) {
        ASSERT_EQ(got, nullptr) << "from " << from;
      } else {
        ASSERT_NE(got, nullptr) << "from " << from;
        ASSERT_EQ(got->index, *want) << "from " << from;
      }
    }
    k.verifyInvariants();
  }
}

}  // namespace
}  // namespace agate::kernel::test
