// A loop's futex wait on a word in a MAP_SHARED mapping is woken by another process.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>

#include "agate/runtime/event_loop.h"
#include "support/watchdog.h"

namespace agate {
namespace {

using namespace std::chrono_literals;

class FutexForkTest : public ::testing::TestWithParam<Backend> {};
INSTANTIATE_TEST_SUITE_P(Backends, FutexForkTest, ::testing::Values(Backend::URING, Backend::EPOLL),
                         [](const auto& p) { return std::string(backendName(p.param)); });

TEST_P(FutexForkTest, SharedFutexWaitIsWokenByAnotherProcess) {
  void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto* word = new (mem) std::atomic<uint32_t>(0);

  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child only touches the word: it never uses the parent's loop.
    usleep(30'000);
    word->store(1, std::memory_order_release);
    _exit(futexWake(*word, 1, /*shared=*/true).ok() ? 0 : 1);
  }
  testing::Watchdog watchdog("shared futex wait", 20s, child);
  {
    EventLoop loop(LoopOptions{.backend = GetParam()});
    Result<void> r = loop.run(loop.deadline(loop.waitFutex(*word, 0, /*shared=*/true), 10s));
    EXPECT_TRUE(r.ok()) << errcName(r.code());
    EXPECT_EQ(word->load(std::memory_order_acquire), 1u);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  munmap(mem, 4096);
}

}  // namespace
}  // namespace agate
