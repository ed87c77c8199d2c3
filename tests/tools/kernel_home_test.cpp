// Probing a kernel home from outside: the lock decides "running", pidfiles are parsed strictly,
// and stale files are removed only while nobody holds the lock.
#include "agate/tools/kernel_home.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>

#include "agate/tools/services.h"

namespace agate::tools {
namespace {

using namespace std::chrono_literals;

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

class KernelHomeTest : public ::testing::Test {
 protected:
  KernelHomeTest() {
    char tmpl[] = "/tmp/agate-home-test-XXXXXX";
    const char* dir = ::mkdtemp(tmpl);
    if (dir == nullptr) std::abort();
    root_ = dir;
    home_ = HomePaths::of(root_ + "/home");
  }
  ~KernelHomeTest() override {
    const std::string cmd = "rm -rf '" + root_ + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "cannot remove %s\n", root_.c_str());
  }

  void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

  // A pid that certainly names no process: a child that has exited and been reaped.
  static pid_t deadPid() {
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    int status = 0;
    ::waitpid(child, &status, 0);
    return child;
  }

  // A socket file nobody listens on, as a killed daemon leaves it.
  void makeStaleSocket() {
    const int s = ::socket(AF_UNIX, SOCK_SEQPACKET, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, home_.socket.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(s);
  }

  // Holds kernel.lock as the daemon does (a separate open file description conflicts even
  // within this process).
  Fd holdKernelLock() {
    Fd fd(::open(home_.lock.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
    EXPECT_TRUE(fd.valid());
    EXPECT_EQ(::flock(fd.get(), LOCK_EX | LOCK_NB), 0);
    return fd;
  }

  std::string root_;
  HomePaths home_;
};

TEST_F(KernelHomeTest, PathsAreTheDaemonsNames) {
  EXPECT_EQ(home_.socket, root_ + "/home/kernel.sock");
  EXPECT_EQ(home_.lock, root_ + "/home/kernel.lock");
  EXPECT_EQ(home_.pidfile, root_ + "/home/kernel.pid");
  EXPECT_EQ(home_.log, root_ + "/home/kernel.log");
}

TEST_F(KernelHomeTest, MakeHomeCreatesMissingParentsPrivately) {
  const std::string deep = root_ + "/a/b/c";
  ASSERT_TRUE(tryMakeHome(deep).ok());
  struct stat st {};
  ASSERT_EQ(::stat(deep.c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  EXPECT_TRUE(tryMakeHome(deep).ok());  // again: nothing to do
}

TEST_F(KernelHomeTest, MakeHomeRefusesAFileAndLeavesIt) {
  write(root_ + "/file", "x");
  EXPECT_EQ(tryMakeHome(root_ + "/file").code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(tryMakeHome(root_ + "/file/below").code(), Errc::SYSTEM_ERROR);
  std::ifstream f(root_ + "/file");
  std::string content;
  std::getline(f, content);
  EXPECT_EQ(content, "x");
  EXPECT_EQ(tryMakeHome("").code(), Errc::INVALID_ARGUMENT);
}

TEST_F(KernelHomeTest, PidfileParsingAcceptsOnlyOnePositivePid) {
  ASSERT_TRUE(tryMakeHome(home_.dir).ok());
  EXPECT_EQ(readPidfile(home_.pidfile).code(), Errc::NOT_FOUND);
  write(home_.pidfile, "1234\n");
  ASSERT_TRUE(readPidfile(home_.pidfile).ok());
  EXPECT_EQ(readPidfile(home_.pidfile).value(), 1234);
  write(home_.pidfile, "99");
  EXPECT_EQ(readPidfile(home_.pidfile).value(), 99);
  for (const char* bad :
       {"", "\n", "0\n", "-5\n", "12x\n", "12\n13\n", " 12\n", "99999999999\n", "abc"}) {
    write(home_.pidfile, bad);
    EXPECT_EQ(readPidfile(home_.pidfile).code(), Errc::INVALID_ARGUMENT) << "'" << bad << "'";
  }
}

TEST_F(KernelHomeTest, AMissingHomeIsNotRunningAndHasNothingStale) {
  auto s = probeKernel(home_);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->running);
  EXPECT_FALSE(s->stalePidfile);
  EXPECT_FALSE(s->staleSocket);
  EXPECT_FALSE(exists(home_.dir));  // probing creates nothing
}

TEST_F(KernelHomeTest, FilesWithoutALockHolderAreStaleAndRemoved) {
  ASSERT_TRUE(tryMakeHome(home_.dir).ok());
  write(home_.pidfile, std::to_string(deadPid()) + "\n");
  makeStaleSocket();
  write(home_.lock, "");
  auto s = probeKernel(home_);
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->running);
  EXPECT_TRUE(s->stalePidfile);
  EXPECT_TRUE(s->staleSocket);
  ASSERT_TRUE(removeStaleFiles(home_).ok());
  EXPECT_FALSE(exists(home_.pidfile));
  EXPECT_FALSE(exists(home_.socket));
  EXPECT_TRUE(exists(home_.lock));  // the daemon's lock file stays (it reuses it)
}

TEST_F(KernelHomeTest, AHeldLockMeansRunningAndItsFilesAreNeverRemoved) {
  ASSERT_TRUE(tryMakeHome(home_.dir).ok());
  Fd lock = holdKernelLock();
  // The pidfile names this test, which is not an agate-kernel: running, pid unknown.
  write(home_.pidfile, std::to_string(::getpid()) + "\n");
  makeStaleSocket();
  auto s = probeKernel(home_);
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(s->running);
  EXPECT_EQ(s->pid, 0);
  EXPECT_FALSE(s->stalePidfile);
  EXPECT_FALSE(s->staleSocket);
  ASSERT_TRUE(removeStaleFiles(home_).ok());
  EXPECT_TRUE(exists(home_.pidfile));
  EXPECT_TRUE(exists(home_.socket));
  // Probing did not take the lock away from its holder.
  Fd other(::open(home_.lock.c_str(), O_RDONLY | O_CLOEXEC));
  EXPECT_NE(::flock(other.get(), LOCK_SH | LOCK_NB), 0);
}

TEST_F(KernelHomeTest, OnlyAnAgateKernelHoldingTheLockIsTheKernel) {
  ASSERT_TRUE(tryMakeHome(home_.dir).ok());
  Fd lock = holdKernelLock();
  EXPECT_FALSE(isKernelProcess(::getpid(), home_.lock));  // holds the lock, wrong program
  EXPECT_FALSE(isKernelProcess(deadPid(), home_.lock));
  EXPECT_FALSE(isKernelProcess(0, home_.lock));
  EXPECT_FALSE(isKernelProcess(-1, home_.lock));
}

TEST_F(KernelHomeTest, ToolsLockExcludesASecondHolderUntilReleased) {
  ASSERT_TRUE(tryMakeHome(home_.dir).ok());
  {
    auto first = ToolsLock::tryAcquire(home_, 100ms);
    ASSERT_TRUE(first.ok());
    EXPECT_EQ(ToolsLock::tryAcquire(home_, 30ms).code(), Errc::TIMED_OUT);
  }
  EXPECT_TRUE(ToolsLock::tryAcquire(home_, 30ms).ok());
}

TEST_F(KernelHomeTest, TailShowsTheLastLinesAfterTheOffset) {
  ASSERT_TRUE(tryMakeHome(home_.dir).ok());
  write(home_.log, "old run\nline 1\nline 2\nline 3\nno newline");
  EXPECT_EQ(tailOfFile(home_.log, 8, 2), "line 3\nno newline\n");
  EXPECT_EQ(tailOfFile(home_.log, 8, 10), "line 1\nline 2\nline 3\nno newline\n");
  EXPECT_EQ(tailOfFile(home_.log, 0, 1), "no newline\n");
  EXPECT_EQ(tailOfFile(root_ + "/missing", 0, 5), "");
}

TEST_F(KernelHomeTest, StopRefusesAProcessThatIsNoLongerOursAndLeavesItRunning) {
  const pid_t child = ::fork();
  if (child == 0) {
    ::pause();
    ::_exit(0);
  }
  Status st = stopProcess(
      child, [] { return false; }, 1s, /*force=*/true);
  EXPECT_EQ(st.code(), Errc::PERMISSION_DENIED);
  int status = 0;
  EXPECT_EQ(::waitpid(child, &status, WNOHANG), 0);  // still running
  ::kill(child, SIGKILL);
  ::waitpid(child, &status, 0);
}

TEST_F(KernelHomeTest, StopSignalsWaitsAndForcesWhenAsked) {
  const pid_t stubborn = ::fork();
  if (stubborn == 0) {
    ::signal(SIGTERM, SIG_IGN);
    for (;;) ::pause();
  }
  // Give it time to ignore SIGTERM before we send it.
  usleep(50'000);
  EXPECT_EQ(stopProcess(
                stubborn, [] { return true; }, 100ms, /*force=*/false)
                .code(),
            Errc::TIMED_OUT);
  int status = 0;
  EXPECT_EQ(::waitpid(stubborn, &status, WNOHANG), 0);
  // pidfd readiness needs the exit, not the reaping: a zombie child counts as exited.
  EXPECT_TRUE(stopProcess(
                  stubborn, [] { return true; }, 100ms, /*force=*/true)
                  .ok());
  ASSERT_EQ(::waitpid(stubborn, &status, 0), stubborn);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  EXPECT_EQ(stopProcess(
                deadPid(), [] { return true; }, 100ms, false)
                .code(),
            Errc::NOT_FOUND);
}

}  // namespace
}  // namespace agate::tools
