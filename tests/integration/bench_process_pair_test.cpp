// The benchmark harness's cross-process runner: forked parties, shared memory, the start barrier,
// failure propagation and the watchdog.
#include "support/process_pair.h"

#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <new>

#include "support/timing.h"

namespace agate::bench {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

// Outer watchdog: a runPair that never returned would otherwise hang the test until ctest's
// TIMEOUT; SIGALRM kills this process, and the children die with it (PR_SET_PDEATHSIG).
class ProcessPairTest : public ::testing::Test {
 protected:
  void SetUp() override { alarm(60); }
  void TearDown() override { alarm(0); }
};

struct Shared {
  std::atomic<uint64_t> fromA{0};
  std::atomic<uint64_t> fromB{0};
  std::atomic<int> pidA{0};
  std::atomic<int> pidB{0};
};

TEST_F(ProcessPairTest, PartiesRunInTwoChildrenAndWriteBackThroughSharedMemory) {
  auto mapping = SharedMapping::tryCreate(sizeof(Shared));
  ASSERT_TRUE(mapping.ok());
  auto* shared = new (mapping->data()) Shared{};
  auto placement = runPair(
      PairOptions{},
      [shared] {
        shared->fromA.store(11, std::memory_order_relaxed);
        shared->pidA.store(getpid(), std::memory_order_relaxed);
        return 0;
      },
      [shared] {
        shared->fromB.store(22, std::memory_order_relaxed);
        shared->pidB.store(getpid(), std::memory_order_relaxed);
        return 0;
      });
  ASSERT_TRUE(placement.ok());
  EXPECT_EQ(shared->fromA.load(), 11u);
  EXPECT_EQ(shared->fromB.load(), 22u);
  EXPECT_NE(shared->pidA.load(), getpid());
  EXPECT_NE(shared->pidB.load(), getpid());
  EXPECT_NE(shared->pidA.load(), shared->pidB.load());
  EXPECT_GE(placement->cpuA, 0);
  EXPECT_GE(placement->cpuB, 0);
}

TEST_F(ProcessPairTest, StartBarrierLetsNeitherPartyBeginAlone) {
  // A waits for B's mark; B marks only after seeing that A has begun. Without a barrier releasing
  // both, or with the parties run one after the other, this would never finish.
  auto mapping = SharedMapping::tryCreate(sizeof(Shared));
  ASSERT_TRUE(mapping.ok());
  auto* shared = new (mapping->data()) Shared{};
  PairOptions options;
  options.watchdog = milliseconds(10'000);
  auto placement = runPair(
      options,
      [shared] {
        shared->fromA.store(1, std::memory_order_release);
        SpinWait spin;
        while (shared->fromB.load(std::memory_order_acquire) == 0) spin.once();
        return 0;
      },
      [shared] {
        SpinWait spin;
        while (shared->fromA.load(std::memory_order_acquire) == 0) spin.once();
        shared->fromB.store(1, std::memory_order_release);
        return 0;
      });
  EXPECT_TRUE(placement.ok());
}

TEST_F(ProcessPairTest, FailingPartyFailsTheRunAndTheOtherIsKilledAtOnce) {
  PairOptions options;
  options.watchdog = milliseconds(20'000);
  const auto start = steady_clock::now();
  auto placement = runPair(
      options, [] { return 3; },
      [] {
        for (;;) pause();  // would outlive any watchdog if not killed
        return 0;
      });
  ASSERT_FALSE(placement.ok());
  EXPECT_EQ(placement.code(), Errc::FAILED);
  EXPECT_LT(steady_clock::now() - start, milliseconds(10'000));  // not the watchdog's doing
}

TEST_F(ProcessPairTest, PartyKilledBySignalFailsTheRun) {
  auto placement = runPair(
      PairOptions{}, [] { return 0; },
      [] {
        raise(SIGKILL);
        return 0;
      });
  ASSERT_FALSE(placement.ok());
  EXPECT_EQ(placement.code(), Errc::FAILED);
}

TEST_F(ProcessPairTest, WatchdogKillsPartiesThatNeverFinish) {
  PairOptions options;
  options.watchdog = milliseconds(300);
  const auto start = steady_clock::now();
  auto placement = runPair(
      options,
      [] {
        for (;;) pause();
        return 0;
      },
      [] {
        for (;;) pause();
        return 0;
      });
  const auto took = steady_clock::now() - start;
  ASSERT_FALSE(placement.ok());
  EXPECT_EQ(placement.code(), Errc::TIMED_OUT);
  EXPECT_GE(took, milliseconds(300));
  EXPECT_LT(took, milliseconds(10'000));
}

TEST_F(ProcessPairTest, PinningToACpuThatDoesNotExistFailsTheRun) {
  PairOptions options;
  options.cpuA = CPU_SETSIZE - 1;  // far beyond the CPUs of any test machine
  auto placement = runPair(
      options, [] { return 0; }, [] { return 0; });
  ASSERT_FALSE(placement.ok());
  EXPECT_EQ(placement.code(), Errc::FAILED);
}

TEST_F(ProcessPairTest, PinnedPartiesReportTheCpuTheyWerePinnedTo) {
  const int here = sched_getcpu();  // a CPU this process may certainly run on
  ASSERT_GE(here, 0);
  PairOptions options;
  options.cpuA = here;
  options.cpuB = here;
  auto placement = runPair(
      options, [] { return 0; }, [] { return 0; });
  ASSERT_TRUE(placement.ok());
  EXPECT_EQ(placement->cpuA, here);
  EXPECT_EQ(placement->cpuB, here);
}

TEST(SharedMapping, IsZeroFilledPageRoundedAndWritable) {
  auto mapping = SharedMapping::tryCreate(100);
  ASSERT_TRUE(mapping.ok());
  EXPECT_EQ(mapping->size() % static_cast<size_t>(sysconf(_SC_PAGESIZE)), 0u);
  auto* bytes = static_cast<unsigned char*>(mapping->data());
  for (size_t i = 0; i < mapping->size(); ++i) ASSERT_EQ(bytes[i], 0) << "byte " << i;
  bytes[99] = 7;
  SharedMapping moved = std::move(*mapping);
  EXPECT_EQ(mapping->data(), nullptr);
  EXPECT_EQ(static_cast<unsigned char*>(moved.data())[99], 7);
}

}  // namespace
}  // namespace agate::bench
