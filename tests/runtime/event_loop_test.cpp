// EventLoop: timers, file I/O, fd readiness, cross-thread posts, futex waits, backend choice.
// Every behaviour runs on both backends (parameterized); async waits carry a deadline watchdog.
#include "agate/runtime/event_loop.h"

#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace agate {
namespace {

using namespace std::chrono_literals;

template <class T>
Result<T> runWithin(EventLoop& loop, Promise<T> p, Duration limit = 10s) {
  Result<T> r = loop.run(loop.deadline(std::move(p), limit));
  if (r.code() == Errc::TIMED_OUT) ADD_FAILURE() << "watchdog: the promise did not complete";
  return r;
}

class EventLoopTest : public ::testing::TestWithParam<Backend> {
 protected:
  LoopOptions options() const {
    LoopOptions o;
    o.backend = GetParam();
    return o;
  }
};

INSTANTIATE_TEST_SUITE_P(Backends, EventLoopTest, ::testing::Values(Backend::URING, Backend::EPOLL),
                         [](const auto& p) { return std::string(backendName(p.param)); });

TEST_P(EventLoopTest, RunsOnTheRequestedBackend) {
  EventLoop loop(options());
  EXPECT_EQ(loop.backend(), GetParam());
  EXPECT_EQ(EventLoop::current(), &loop);
}

Promise<void> sleepAndRecord(EventLoop& loop, Duration d, int id, std::vector<int>& order) {
  (void)co_await loop.sleep(d);
  order.push_back(id);
  co_return {};
}

Promise<void> all(EventLoop& loop, std::vector<int>& order) {
  Promise<void> a = sleepAndRecord(loop, 30ms, 3, order);
  Promise<void> b = sleepAndRecord(loop, 10ms, 1, order);
  Promise<void> c = sleepAndRecord(loop, 20ms, 2, order);
  AGATE_CO_TRY(co_await a);
  AGATE_CO_TRY(co_await b);
  AGATE_CO_TRY(co_await c);
  co_return {};
}

TEST_P(EventLoopTest, TimersFireInDeadlineOrderNotCreationOrder) {
  EventLoop loop(options());
  std::vector<int> order;
  auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(runWithin(loop, all(loop, order)).ok());
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 30ms);
}

TEST_P(EventLoopTest, DeadlineOnASlowSleepReportsTimedOut) {
  EventLoop loop(options());
  auto start = std::chrono::steady_clock::now();
  Result<void> r = loop.run(loop.deadline(loop.sleep(10s), 10ms));
  EXPECT_EQ(r.code(), Errc::TIMED_OUT);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

class TempFile {
 public:
  TempFile() {
    fd_ = mkstemp(path_);
    EXPECT_GE(fd_, 0) << strerror(errno);
  }
  ~TempFile() {
    close(fd_);
    unlink(path_);
  }
  int fd() const { return fd_; }

 private:
  char path_[32] = "/tmp/agate_loop_XXXXXX";
  int fd_;
};

std::span<const std::byte> bytesOf(const char* s) {
  return std::as_bytes(std::span<const char>(s, strlen(s)));
}

TEST_P(EventLoopTest, FileWriteThenReadRoundTripsAtOffsets) {
  EventLoop loop(options());
  TempFile file;
  Result<size_t> w1 = runWithin(loop, loop.write(file.fd(), bytesOf("hello "), 0));
  Result<size_t> w2 = runWithin(loop, loop.write(file.fd(), bytesOf("world"), 6));
  ASSERT_TRUE(w1.ok() && w2.ok());
  EXPECT_EQ(w1.value(), 6u);
  EXPECT_EQ(w2.value(), 5u);

  std::byte buf[32] = {};
  Result<size_t> r = runWithin(loop, loop.read(file.fd(), buf, 0));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(std::string(reinterpret_cast<char*>(buf), r.value()), "hello world");

  Result<size_t> eof = runWithin(loop, loop.read(file.fd(), buf, 11));
  ASSERT_TRUE(eof.ok());
  EXPECT_EQ(eof.value(), 0u);
}

TEST_P(EventLoopTest, ReadOfAClosedFdFailsWithEbadf) {
  EventLoop loop(options());
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  close(fds[0]);
  close(fds[1]);
  std::byte buf[8];
  Result<size_t> r = runWithin(loop, loop.read(fds[0], buf, 0));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::SYSTEM_ERROR);
  EXPECT_EQ(r.error().sysErrno, EBADF);
}

struct Pipe {
  int r = -1, w = -1;
  Pipe() {
    int fds[2];
    EXPECT_EQ(pipe2(fds, O_NONBLOCK | O_CLOEXEC), 0);
    r = fds[0];
    w = fds[1];
  }
  ~Pipe() {
    close(r);
    close(w);
  }
};

Promise<uint32_t> waitThenReport(EventLoop& loop, int fd, bool& woke) {
  Result<uint32_t> r = co_await loop.waitReady(fd, POLLIN);
  woke = true;
  co_return r;
}

TEST_P(EventLoopTest, PipeBecomesReadableOnlyAfterAWrite) {
  EventLoop loop(options());
  Pipe pipe;
  bool woke = false;
  Promise<uint32_t> p = waitThenReport(loop, pipe.r, woke);
  for (int i = 0; i < 3; ++i) loop.runUntilIdle();
  EXPECT_FALSE(woke);
  ASSERT_EQ(::write(pipe.w, "x", 1), 1);
  Result<uint32_t> r = runWithin(loop, std::move(p));
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r.value() & POLLIN);
}

TEST_P(EventLoopTest, ReadOnAnEmptyNonBlockingPipeWaitsForData) {
  EventLoop loop(options());
  Pipe pipe;
  std::byte buf[8] = {};
  Promise<size_t> p = loop.read(pipe.r, buf);
  loop.runUntilIdle();
  EXPECT_FALSE(p.isReady());
  ASSERT_EQ(::write(pipe.w, "abc", 3), 3);
  Result<size_t> r = runWithin(loop, std::move(p));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 3u);
  EXPECT_EQ(std::memcmp(buf, "abc", 3), 0);
}

TEST_P(EventLoopTest, DroppedPendingReadNeverWritesIntoItsBuffer) {
  EventLoop loop(options());
  Pipe pipe;
  auto buf = std::make_unique<std::byte[]>(64);
  std::memset(buf.get(), 0xAA, 64);
  {
    Promise<size_t> p = loop.read(pipe.r, std::span<std::byte>(buf.get(), 64));
    loop.runUntilIdle();
    ASSERT_FALSE(p.isReady());
  }  // dropped: cancelled before its destructor returns
  ASSERT_EQ(::write(pipe.w, "data", 4), 4);
  for (int i = 0; i < 5; ++i) loop.runUntilIdle();
  for (int i = 0; i < 64; ++i) ASSERT_EQ(buf[i], std::byte{0xAA}) << "byte " << i;
  char out[8] = {};
  EXPECT_EQ(::read(pipe.r, out, sizeof out), 4);  // the data is still in the pipe
  buf.reset();
  loop.runUntilIdle();
}

TEST_P(EventLoopTest, DroppedReadinessWaitIsCancelledAndTheLoopStaysUsable) {
  EventLoop loop(options());
  Pipe pipe;
  { Promise<uint32_t> p = loop.waitReady(pipe.r, POLLIN); }
  loop.runUntilIdle();
  Promise<uint32_t> again = loop.waitReady(pipe.r, POLLIN);  // the fd is free to wait on again
  ASSERT_EQ(::write(pipe.w, "x", 1), 1);
  Result<uint32_t> r = runWithin(loop, std::move(again));
  ASSERT_TRUE(r.ok());
}

TEST_P(EventLoopTest, WaitReadyOnAClosedFdFailsWithEbadfAndTheLoopStaysUsable) {
  EventLoop loop(options());
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  close(fds[0]);
  close(fds[1]);
  Result<uint32_t> r = runWithin(loop, loop.waitReady(fds[0], POLLIN));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::SYSTEM_ERROR);
  EXPECT_EQ(r.error().sysErrno, EBADF);
  EXPECT_TRUE(runWithin(loop, loop.sleep(1ms)).ok());
}

TEST_P(EventLoopTest, WriteToAReadOnlyFdFailsWithEbadfAndLeavesTheFileUnchanged) {
  EventLoop loop(options());
  TempFile file;
  ASSERT_EQ(::pwrite(file.fd(), "keep", 4, 0), 4);
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", file.fd());
  int readOnly = open(path, O_RDONLY | O_CLOEXEC);
  ASSERT_GE(readOnly, 0);
  Result<size_t> r = runWithin(loop, loop.write(readOnly, bytesOf("lost"), 0));
  close(readOnly);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().sysErrno, EBADF);
  char back[5] = {};
  ASSERT_EQ(::pread(file.fd(), back, 4, 0), 4);
  EXPECT_STREQ(back, "keep");
}

TEST_P(EventLoopTest, ReadAtCurrentPositionAdvancesTheFileOffset) {
  EventLoop loop(options());
  TempFile file;
  ASSERT_EQ(::pwrite(file.fd(), "abcdef", 6, 0), 6);
  ASSERT_EQ(lseek(file.fd(), 0, SEEK_SET), 0);
  std::byte buf[3];
  ASSERT_EQ(runWithin(loop, loop.read(file.fd(), buf)).value(), 3u);
  ASSERT_EQ(runWithin(loop, loop.read(file.fd(), buf)).value(), 3u);
  EXPECT_EQ(std::memcmp(buf, "def", 3), 0);
}

TEST_P(EventLoopTest, SleepOfZeroCompletesOnTheNextTurn) {
  EventLoop loop(options());
  Promise<void> p = loop.sleep(Duration::zero());
  EXPECT_FALSE(p.isReady());
  EXPECT_TRUE(runWithin(loop, std::move(p)).ok());
}

TEST(EventLoopEpollTest, SecondConcurrentWaitOnOneFdIsRefusedAndTheFirstStillWorks) {
  EventLoop loop(LoopOptions{.backend = Backend::EPOLL});
  Pipe pipe;
  Promise<uint32_t> first = loop.waitReady(pipe.r, POLLIN);
  Result<uint32_t> second = runWithin(loop, loop.waitReady(pipe.r, POLLIN));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.error().sysErrno, EEXIST);
  ASSERT_EQ(::write(pipe.w, "x", 1), 1);
  EXPECT_TRUE(runWithin(loop, std::move(first)).ok());
}

TEST(EventLoopDeathTest, ASecondLoopOnOneThreadIsAPreconditionViolation) {
  EXPECT_DEATH(
      {
        EventLoop a;
        EventLoop b;
      },
      "already has an event loop");
}

TEST(EventLoopDeathTest, AnOperationPromiseOutlivingItsLoopIsAPreconditionViolation) {
  EXPECT_DEATH(
      {
        Pipe pipe;
        auto loop = std::make_unique<EventLoop>();
        Promise<uint32_t> p = loop->waitReady(pipe.r, POLLIN);
        loop.reset();
      },
      "outlive the loop");
}

TEST(EventLoopDeathTest, RunningTheLoopFromInsideItselfIsAPreconditionViolation) {
  EXPECT_DEATH(
      {
        EventLoop loop;
        FunctionTask nested([&loop] { loop.runUntilIdle(); });
        loop.post(nested);
        loop.runUntilIdle();
      },
      "inside the loop");
}

TEST(EventLoopDeathTest, AwaitingAPromiseTwiceIsAPreconditionViolation) {
  EXPECT_DEATH(
      {
        EventLoop loop;
        Promise<int> p = readyPromise<int>(1);
        (void)p.takeResult();
        (void)p.takeResult();
      },
      "already taken");
}

TEST(EventLoopBackendTest, SqpollLoopCancelsADroppedPendingReadBeforeItsBufferIsReused) {
  EventLoop loop(LoopOptions{.backend = Backend::URING, .sqpoll = true, .sqThreadIdleMs = 5});
  Pipe pipe;
  std::byte buf[16];
  std::memset(buf, 0x55, sizeof buf);
  {
    Promise<size_t> p = loop.read(pipe.r, buf);
    loop.runUntilIdle();
  }
  ASSERT_EQ(::write(pipe.w, "zz", 2), 2);
  loop.runUntilIdle();
  for (std::byte b : buf) ASSERT_EQ(b, std::byte{0x55});
}

class CountingTask final : public Task {
 public:
  std::atomic<int>* counter = nullptr;
  int target = 0;
  Fulfiller<void>* done = nullptr;

 private:
  void run() noexcept override {
    if (counter->fetch_add(1, std::memory_order_relaxed) + 1 == target) done->fulfill(Status{});
  }
};

// MemberTask calls its owner's (private) member function once per post; destroyed while queued,
// it leaves the run queue and never runs.
class Ticker {
  void tick() noexcept { ++ticks; }  // declared before the task that names it

 public:
  int ticks = 0;
  MemberTask<&Ticker::tick> task{*this};
};

TEST_P(EventLoopTest, AMemberTaskCallsItsOwnersFunctionOncePerPost) {
  EventLoop loop(options());
  Ticker t;
  loop.post(t.task);
  EXPECT_TRUE(t.task.isQueued());
  loop.runUntilIdle();
  EXPECT_EQ(t.ticks, 1);
  loop.post(t.task);
  loop.runUntilIdle();
  EXPECT_EQ(t.ticks, 2);
  {
    auto gone = std::make_unique<Ticker>();
    loop.post(gone->task);
  }  // destroyed while queued
  loop.runUntilIdle();
  EXPECT_EQ(t.ticks, 2);
}

TEST_P(EventLoopTest, PostsFromSeveralThreadsAllRunOnTheLoopThread) {
  EventLoop loop(options());
  constexpr int THREADS = 4;
  constexpr int PER_THREAD = 2000;
  std::atomic<int> counter{0};
  auto [promise, fulfiller] = newPromiseAndFulfiller<void>();
  std::vector<CountingTask> tasks(THREADS * PER_THREAD);
  for (CountingTask& t : tasks) {
    t.counter = &counter;
    t.target = THREADS * PER_THREAD;
    t.done = &fulfiller;
  }
  std::vector<std::thread> threads;
  for (int i = 0; i < THREADS; ++i) {
    threads.emplace_back([&loop, &tasks, i] {
      for (int j = 0; j < PER_THREAD; ++j) {
        loop.postFromAnyThread(tasks[i * PER_THREAD + j]);
        if (j % 256 == 0) std::this_thread::sleep_for(100us);  // let the loop fall asleep
      }
    });
  }
  Result<void> r = runWithin(loop, std::move(promise));
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(counter.load(std::memory_order_relaxed), THREADS * PER_THREAD);
}

TEST_P(EventLoopTest, PostFromAnotherThreadWakesASleepingLoop) {
  EventLoop loop(options());
  auto [promise, fulfiller] = newPromiseAndFulfiller<void>();
  FunctionTask task([&f = fulfiller] { f.fulfill(Status{}); });
  std::thread poster([&] {
    std::this_thread::sleep_for(20ms);  // the loop is blocked in the kernel by now
    loop.postFromAnyThread(task);
  });
  auto start = std::chrono::steady_clock::now();
  Result<void> r = runWithin(loop, std::move(promise));
  poster.join();
  EXPECT_TRUE(r.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

TEST_P(EventLoopTest, FutexWaitIsWokenByAnotherThread) {
  EventLoop loop(options());
  std::atomic<uint32_t> word{0};
  Promise<void> wait = loop.waitFutex(word, 0, /*shared=*/false);
  loop.runUntilIdle();
  EXPECT_FALSE(wait.isReady());
  std::thread waker([&] {
    std::this_thread::sleep_for(10ms);
    word.store(1, std::memory_order_release);
    ASSERT_TRUE(futexWake(word, 1, false).ok());
  });
  Result<void> r = runWithin(loop, std::move(wait));
  waker.join();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(word.load(std::memory_order_acquire), 1u);
}

TEST_P(EventLoopTest, FutexWaitNoticesAValueChangeThatCameWithoutAWake) {
  // The backstop re-check (native waits) or the poll (fallback) resolves a wait whose wake the
  // kernel lost; a store without a wake stands in for that here.
  LoopOptions o = options();
  o.futexBackstopInterval = 20ms;
  EventLoop loop(o);
  std::atomic<uint32_t> word{0};
  Promise<void> wait = loop.waitFutex(word, 0, false);
  std::thread writer([&] {
    std::this_thread::sleep_for(10ms);
    word.store(2, std::memory_order_release);
  });
  Result<void> r = runWithin(loop, std::move(wait), 5s);
  writer.join();
  EXPECT_TRUE(r.ok());
}

TEST_P(EventLoopTest, FutexWaitOnAMismatchedValueReturnsAtOnce) {
  EventLoop loop(options());
  std::atomic<uint32_t> word{7};
  auto start = std::chrono::steady_clock::now();
  Result<void> r = runWithin(loop, loop.waitFutex(word, 3, false));
  EXPECT_TRUE(r.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

TEST_P(EventLoopTest, DroppedFutexWaitIsCancelledAndDoesNotFireLater) {
  EventLoop loop(options());
  std::atomic<uint32_t> word{0};
  { Promise<void> p = loop.waitFutex(word, 0, false); }
  loop.runUntilIdle();
  word.store(1, std::memory_order_release);
  (void)futexWake(word, 1, false);
  loop.runUntilIdle();
  Result<void> r = runWithin(loop, loop.sleep(5ms));  // the loop keeps working
  EXPECT_TRUE(r.ok());
}

TEST_P(EventLoopTest, YieldRunsBehindTasksAlreadyQueued) {
  EventLoop loop(options());
  std::vector<int> order;
  FunctionTask first([&] { order.push_back(1); });
  auto co = [](EventLoop& l, std::vector<int>& o) -> Promise<void> {
    co_await l.yield();
    o.push_back(2);
    co_return {};
  };
  loop.post(first);
  Promise<void> p = co(loop, order);
  ASSERT_TRUE(runWithin(loop, std::move(p)).ok());
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

// postBeforeWait: after the turn's tasks, before the loop waits and before run() returns.
TEST_P(EventLoopTest, BeforeWaitTasksRunAfterTheTurnsTasksAndBeforeRunReturns) {
  EventLoop loop(options());
  std::vector<int> order;
  FunctionTask flush([&] { order.push_back(loop.inTurn() ? 9 : -9); });
  FunctionTask later([&] { order.push_back(2); });
  auto co = [&]() -> Promise<void> {
    co_await loop.yield();
    order.push_back(1);
    loop.postBeforeWait(flush);
    loop.post(later);  // a plain task posted after it still runs first
    co_return {};
  };
  EXPECT_FALSE(loop.inTurn());
  ASSERT_TRUE(runWithin(loop, co()).ok());
  EXPECT_FALSE(flush.isQueued());
  // run() returned once its promise was ready: `later` may still wait for the next turn, but the
  // before-wait task has run, inside the turn.
  ASSERT_FALSE(order.empty());
  EXPECT_EQ(order.front(), 1);
  EXPECT_NE(std::find(order.begin(), order.end(), 9), order.end());
  loop.runUntilIdle();
  EXPECT_EQ(std::count(order.begin(), order.end(), 2), 1);
  EXPECT_EQ(std::count(order.begin(), order.end(), 9), 1) << "once per post";
}

TEST_P(EventLoopTest, BeforeWaitTasksRunBeforeTheLoopBlocks) {
  EventLoop loop(options());
  // Only the before-wait task completes `flushed`: a loop that blocked in its wait before running
  // it would sleep until runWithin's deadline, with nothing else to wake it.
  PromiseAndFulfiller<void> flushed = newPromiseAndFulfiller<void>();
  FunctionTask flush([&] { flushed.fulfiller.fulfill(Status{}); });
  auto co = [&]() -> Promise<void> {
    co_await loop.yield();
    loop.postBeforeWait(flush);
    co_return co_await std::move(flushed.promise);
  };
  EXPECT_TRUE(runWithin(loop, co(), 5s).ok()) << "it ran after the wait, not before";
}

TEST_P(EventLoopTest, ABeforeWaitTaskPostedByOneRunsInTheSameFlush) {
  EventLoop loop(options());
  int second = 0;
  FunctionTask b([&] { ++second; });
  FunctionTask a([&] { loop.postBeforeWait(b); });
  auto co = [&]() -> Promise<void> {
    co_await loop.yield();
    loop.postBeforeWait(a);
    co_return {};
  };
  ASSERT_TRUE(runWithin(loop, co()).ok());
  EXPECT_EQ(second, 1);
}

TEST_P(EventLoopTest, RunOfAReadyPromiseRunsPendingBeforeWaitTasks) {
  EventLoop loop(options());
  int flushed = 0;
  FunctionTask flush([&] { ++flushed; });
  loop.postBeforeWait(flush);  // outside any turn
  EXPECT_TRUE(loop.run(readyPromise<void>(Status{})).ok());
  EXPECT_EQ(flushed, 1) << "the thread leaves the loop: what it owed runs first";
}

TEST_P(EventLoopTest, ABeforeWaitTaskStillQueuedWhenTheLoopGoesNeverRuns) {
  int ran = 0;
  FunctionTask flush([&] { ++ran; });
  {
    EventLoop loop(options());
    loop.postBeforeWait(flush);
    EXPECT_TRUE(flush.isQueued());
  }
  EXPECT_FALSE(flush.isQueued());
  EXPECT_EQ(ran, 0);
}

TEST(EventLoopDeathTest, PostingAQueuedTaskBeforeWaitIsAPreconditionViolation) {
  EXPECT_DEATH(
      {
        EventLoop loop;
        FunctionTask t([] {});
        loop.post(t);
        loop.postBeforeWait(t);
      },
      "already queued");
}

TEST(EventLoopBackendTest, AutoFallsBackToEpollWithOneLogLineWhenUringInitFails) {
  LoopOptions o;
  o.simulateUringInitErrno = EPERM;
  ::testing::internal::CaptureStderr();
  Backend chosen;
  {
    EventLoop loop(o);
    chosen = loop.backend();
    Result<void> r = runWithin(loop, loop.sleep(1ms));
    EXPECT_TRUE(r.ok());
  }
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(chosen, Backend::EPOLL);
  EXPECT_NE(err.find("io_uring unavailable"), std::string::npos) << err;
  EXPECT_NE(err.find("falls back to epoll"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
}

TEST(EventLoopBackendTest, ForcedUringThatCannotStartIsAnErrorAndLeavesNoLoopBehind) {
  LoopOptions o;
  o.backend = Backend::URING;
  o.simulateUringInitErrno = ENOSYS;
  Result<std::unique_ptr<EventLoop>> r = EventLoop::tryCreate(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), Errc::UNSUPPORTED);
  EXPECT_EQ(r.error().sysErrno, ENOSYS);
  EXPECT_EQ(EventLoop::current(), nullptr);
  EventLoop after;  // the thread can still get a loop
  EXPECT_EQ(EventLoop::current(), &after);
}

TEST(EventLoopBackendTest, UringProbesNativeFutexWaitOnThisKernel) {
  EventLoop loop(LoopOptions{.backend = Backend::URING});
  // IORING_OP_FUTEX_WAIT arrived in Linux 6.7: from there on the probe must find it (an older
  // kernel may have it backported, so below 6.7 either answer is right).
  utsname u{};
  ASSERT_EQ(::uname(&u), 0);
  int major = 0, minor = 0;
  ASSERT_EQ(std::sscanf(u.release, "%d.%d", &major, &minor), 2) << u.release;
  if (major > 6 || (major == 6 && minor >= 7)) {
    EXPECT_TRUE(loop.hasNativeFutexWait()) << "kernel " << u.release;
  }
}

TEST(EventLoopBackendTest, SqpollLoopDoesFileIo) {
  LoopOptions o;
  o.backend = Backend::URING;
  o.sqpoll = true;
  o.sqThreadIdleMs = 5;
  EventLoop loop(o);
  TempFile file;
  Result<size_t> w = runWithin(loop, loop.write(file.fd(), bytesOf("sq"), 0));
  ASSERT_TRUE(w.ok());
  std::byte buf[4] = {};
  Result<size_t> r = runWithin(loop, loop.read(file.fd(), buf, 0));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 2u);
}

}  // namespace
}  // namespace agate

namespace agate {
namespace {

TEST(CrossThreadPromiseTest, AWorkerThreadFulfilsAPromiseTheLoopAwaits) {
  EventLoop loop;
  auto [promise, fulfiller] = loop.newCrossThreadPromise<int>();
  std::thread worker([f = std::move(fulfiller)]() mutable {
    std::this_thread::sleep_for(10ms);  // the loop sleeps in the kernel meanwhile
    f.fulfill(99);
  });
  Result<int> r = runWithin(loop, std::move(promise));
  worker.join();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r.value(), 99);
}

TEST(CrossThreadPromiseTest, FulfillerDestroyedOnAnotherThreadResolvesToCancelled) {
  EventLoop loop;
  auto [promise, fulfiller] = loop.newCrossThreadPromise<int>();
  std::thread worker(
      [f = std::move(fulfiller)]() mutable { CrossThreadFulfiller<int> gone = std::move(f); });
  Result<int> r = runWithin(loop, std::move(promise));
  worker.join();
  EXPECT_EQ(r.code(), Errc::CANCELLED);
}

TEST(CrossThreadPromiseTest, WorkerSeesCancellationAndItsLateResultIsDiscarded) {
  EventLoop loop;
  auto [promise, fulfiller] = loop.newCrossThreadPromise<std::unique_ptr<int>>();
  std::atomic<bool> dropped{false};
  std::atomic<bool> sawCancel{false};
  std::thread worker([&, f = std::move(fulfiller)]() mutable {
    while (!dropped.load(std::memory_order_acquire)) std::this_thread::yield();
    sawCancel.store(f.isCancelled(), std::memory_order_relaxed);
    f.fulfill(
        std::make_unique<int>(1));  // freed on the loop thread, never delivered (ASan: no leak)
  });
  { Promise<std::unique_ptr<int>> gone = std::move(promise); }
  dropped.store(true, std::memory_order_release);
  worker.join();
  loop.runUntilIdle();
  EXPECT_TRUE(sawCancel.load(std::memory_order_relaxed));
}

}  // namespace
}  // namespace agate
