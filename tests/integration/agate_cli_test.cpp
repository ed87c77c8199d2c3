// The agate command line end to end: `agate up`/`down` daemonize and stop a real agate-kernel on
// a temporary home; `agate ps`/`banks`/`caps` show what a real client process built.
//
// Every test runs the agate executable (or, for its own options, agate-kernel) as a child (its
// stdout, stderr and exit code are what a user sees). A daemon started by `agate up` is re-parented
// away from the test, so the fixture's watchdog and teardown find it through the home's pidfile and
// kill it: no test leaves a kernel behind, even when it fails or hangs.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "agate/caps/kernel_connection.h"
#include "agate/runtime/event_loop.h"

namespace agate {
namespace {

using namespace std::chrono_literals;
using Json = nlohmann::json;

constexpr int EXIT_NOT_RUNNING = 2;
constexpr int EXIT_NO_SUCH_PROCESS = 3;
constexpr int EXIT_USAGE = 64;

struct Ran {
  int exitCode = -1;  // -1: killed (timeout) or signalled
  std::string out;
  std::string err;
};

// Runs `BINARY ARGS...` with `env` (KEY=VALUE strings; nothing inherited), capturing its output.
// Killed after `limit`.
// Runs in `cwd` when not empty.
Ran runProgram(const char* binary, const std::vector<std::string>& args,
               const std::vector<std::string>& env, std::chrono::milliseconds limit,
               const std::string& cwd) {
  Ran r;
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2 failed";
    return r;
  }
  // Built before fork: the child only makes async-signal-safe calls.
  std::vector<std::string> argStore{binary};
  argStore.insert(argStore.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argStore) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> envStore = env;
  envStore.push_back("PATH=/usr/bin:/bin");
  std::vector<char*> envp;
  for (std::string& e : envStore) envp.push_back(e.data());
  envp.push_back(nullptr);

  const pid_t child = ::fork();
  if (child == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::dup2(err[1], STDERR_FILENO);
    if (!cwd.empty() && ::chdir(cwd.c_str()) != 0) ::_exit(126);
    ::execve(binary, argv.data(), envp.data());
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  const auto end = std::chrono::steady_clock::now() + limit;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open = 2;
  while (open > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left.count() <= 0 || ::poll(fds, 2, static_cast<int>(left.count())) <= 0) {
      ADD_FAILURE() << binary << " " << (args.empty() ? "" : args[0]) << " still running after "
                    << limit.count() << " ms";
      ::kill(child, SIGKILL);
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[4096];
      const ssize_t n = ::read(fds[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open;
        continue;
      }
      (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(n));
    }
  }
  for (pollfd& p : fds)
    if (p.fd >= 0) ::close(p.fd);
  int status = 0;
  ::waitpid(child, &status, 0);
  r.exitCode = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

Ran runAgate(const std::vector<std::string>& args, const std::vector<std::string>& env = {},
             std::chrono::milliseconds limit = 20s, const std::string& cwd = {}) {
  return runProgram(AGATE_CLI_BINARY, args, env, limit, cwd);
}

std::string readFile(const std::string& path) {
  std::ifstream f(path);
  std::string content;
  char chunk[4096];
  while (f.read(chunk, sizeof chunk) || f.gcount() > 0)
    content.append(chunk, static_cast<size_t>(f.gcount()));
  return content;
}

Json parseJson(const std::string& text) {
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << "not JSON: " << text;
  return j;
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// Running: exists and is not a zombie (a daemon is re-parented to an init that may reap late).
bool alive(pid_t pid) {
  if (pid <= 0 || ::kill(pid, 0) != 0) return false;
  const std::string stat = readFile("/proc/" + std::to_string(pid) + "/stat");
  const size_t paren = stat.rfind(')');  // the command name may hold blanks and parentheses
  return paren == std::string::npos || paren + 2 >= stat.size() || stat[paren + 2] != 'Z';
}

pid_t pidInFile(const std::string& path) {
  return static_cast<pid_t>(std::atoi(readFile(path).c_str()));
}

// The executable of `pid`, by name.
std::string exeName(pid_t pid) {
  char buf[4096];
  const ssize_t n = ::readlink(("/proc/" + std::to_string(pid) + "/exe").c_str(), buf, sizeof(buf));
  if (n <= 0) return {};
  std::string s(buf, static_cast<size_t>(n));
  return s.substr(s.rfind('/') + 1);
}

bool waitGone(pid_t pid, std::chrono::milliseconds limit = 5s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (alive(pid) && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(5ms);
  return !alive(pid);
}

// Kills whatever agate-kernel serves `home` (through its pidfile), if any.
void killKernelOf(const std::string& home) {
  const pid_t pid = pidInFile(home + "/kernel.pid");
  if (pid > 0 && exeName(pid) == "agate-kernel") {
    ::kill(pid, SIGKILL);
    waitGone(pid);
  }
}

// Aborts the test binary after `limit`, first killing the home's kernel and `extra` (a client).
class KernelWatchdog {
 public:
  KernelWatchdog(std::string home, std::chrono::seconds limit)
      : thread_([this, home = std::move(home), limit] {
          std::unique_lock<std::mutex> lock(mutex_);
          if (cv_.wait_for(lock, limit, [this] { return done_; })) return;
          std::fprintf(stderr, "watchdog: agate CLI test still running after %llds; aborting\n",
                       static_cast<long long>(limit.count()));
          killKernelOf(home);
          if (const pid_t p = extra_.load(std::memory_order_relaxed); p > 0) ::kill(p, SIGKILL);
          std::abort();
        }) {}
  ~KernelWatchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  // Relaxed: the watchdog only needs some recent value; kill of a stale pid is harmless here
  // because the test reaps that child only after clearing it.
  void alsoKill(pid_t pid) { extra_.store(pid, std::memory_order_relaxed); }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::atomic<pid_t> extra_{0};
  std::thread thread_;
};

class AgateCliTest : public ::testing::Test {
 protected:
  AgateCliTest() {
    char tmpl[] = "/tmp/agate-cli-test-XXXXXX";
    const char* dir = ::mkdtemp(tmpl);
    if (dir == nullptr) std::abort();
    root_ = dir;
    home_ = root_ + "/home";
    watchdog_ = std::make_unique<KernelWatchdog>(home_, 60s);
  }
  ~AgateCliTest() override {
    killKernelOf(home_);
    watchdog_.reset();
    std::string cmd = "rm -rf '" + root_ + "'";
    if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", root_.c_str());
  }

  Ran agate(std::vector<std::string> args) {
    args.push_back("--home");
    args.push_back(home_);
    return runAgate(args);
  }
  std::string path(const char* name) const { return home_ + "/" + name; }
  pid_t kernelPid() const { return pidInFile(path("kernel.pid")); }

  // Writes an executable shell script under the test's root; returns its path.
  std::string script(const char* name, const char* body) {
    const std::string p = root_ + "/" + name;
    std::ofstream(p) << "#!/bin/sh\n" << body << "\n";
    ::chmod(p.c_str(), 0700);
    return p;
  }

  std::string root_;
  std::string home_;
  std::unique_ptr<KernelWatchdog> watchdog_;
};

// --- up / down -----------------------------------------------------------------------------------

TEST_F(AgateCliTest, UpStartsADaemonizedKernelAndDownStopsIt) {
  Ran up = agate({"up"});
  ASSERT_EQ(up.exitCode, 0) << up.out << up.err;
  EXPECT_NE(up.out.find("agate-kernel started"), std::string::npos) << up.out;
  const pid_t pid = kernelPid();
  ASSERT_TRUE(alive(pid));
  EXPECT_EQ(exeName(pid), "agate-kernel");
  EXPECT_TRUE(exists(path("kernel.sock")));
  EXPECT_TRUE(exists(path("kernel.log")));
  // Daemonized: its own session, not a child of the test, stdin from /dev/null.
  EXPECT_NE(::getsid(pid), ::getsid(0));
  EXPECT_NE(::getsid(pid), pid);  // not a session leader: it can never get a terminal
  EXPECT_NE(::getpgid(pid), ::getpgid(0));
  char stdinLink[256] = {};
  ASSERT_GT(::readlink(("/proc/" + std::to_string(pid) + "/fd/0").c_str(), stdinLink,
                       sizeof(stdinLink) - 1),
            0);
  EXPECT_STREQ(stdinLink, "/dev/null");
  char stdoutLink[4096] = {};
  ASSERT_GT(::readlink(("/proc/" + std::to_string(pid) + "/fd/1").c_str(), stdoutLink,
                       sizeof(stdoutLink) - 1),
            0);
  EXPECT_NE(std::string(stdoutLink).find("kernel.log"), std::string::npos) << stdoutLink;

  Ran down = agate({"down"});
  ASSERT_EQ(down.exitCode, 0) << down.out << down.err;
  EXPECT_NE(down.out.find("agate-kernel stopped"), std::string::npos) << down.out;
  EXPECT_TRUE(waitGone(pid));
  EXPECT_FALSE(exists(path("kernel.pid")));
  EXPECT_FALSE(exists(path("kernel.sock")));
}

TEST_F(AgateCliTest, UpWithAKernelRunningSaysSoAndKeepsIt) {
  ASSERT_EQ(agate({"up"}).exitCode, 0);
  const pid_t pid = kernelPid();
  Ran again = agate({"up"});
  EXPECT_EQ(again.exitCode, 0) << again.err;
  EXPECT_NE(again.out.find("already running (pid " + std::to_string(pid)), std::string::npos)
      << again.out;
  EXPECT_EQ(kernelPid(), pid);
  EXPECT_TRUE(alive(pid));
}

TEST_F(AgateCliTest, ConcurrentUpsStartExactlyOneKernel) {
  Ran a, b;
  std::thread other([&] { b = agate({"up"}); });
  a = agate({"up"});
  other.join();
  EXPECT_EQ(a.exitCode, 0) << a.err;
  EXPECT_EQ(b.exitCode, 0) << b.err;
  const int started =
      (a.out.find("started") != std::string::npos) + (b.out.find("started") != std::string::npos);
  const int already = (a.out.find("already running") != std::string::npos) +
                      (b.out.find("already running") != std::string::npos);
  EXPECT_EQ(started, 1) << a.out << b.out;
  EXPECT_EQ(already, 1) << a.out << b.out;
  EXPECT_TRUE(alive(kernelPid()));
}

TEST_F(AgateCliTest, ARelativeHomeNamesTheSameDirectoryForTheDaemon) {
  Ran up = runAgate({"up", "--home", "home"}, {}, 20s, root_);
  ASSERT_EQ(up.exitCode, 0) << up.out << up.err;
  EXPECT_TRUE(exists(path("kernel.sock")));
  EXPECT_TRUE(alive(kernelPid()));
  EXPECT_EQ(runAgate({"ps", "--home", "home"}, {}, 20s, root_).exitCode, 0);
  EXPECT_EQ(runAgate({"down", "--home", "home"}, {}, 20s, root_).exitCode, 0);
  EXPECT_FALSE(exists(path("kernel.sock")));
}

TEST_F(AgateCliTest, UpWithTheHomeLockHeldElsewhereStartsNothing) {
  ASSERT_EQ(::mkdir(home_.c_str(), 0700), 0);
  const int lock = ::open(path("kernel.lock").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  ASSERT_GE(lock, 0);
  ASSERT_EQ(::flock(lock, LOCK_EX | LOCK_NB), 0);  // as a kernel started by hand would
  Ran up = agate({"up"});
  EXPECT_EQ(up.exitCode, 0) << up.err;
  EXPECT_NE(up.out.find("already running (pid unknown"), std::string::npos) << up.out;
  EXPECT_FALSE(exists(path("kernel.pid")));
  EXPECT_FALSE(exists(path("kernel.log")));  // no daemon was started
  Ran down = agate({"down"});
  EXPECT_EQ(down.exitCode, 1);  // it will not stop what it cannot identify
  ::close(lock);
}

TEST_F(AgateCliTest, DownWithNoKernelSaysSoAndSucceeds) {
  Ran noHome = agate({"down"});
  EXPECT_EQ(noHome.exitCode, 0) << noHome.err;
  EXPECT_NE(noHome.out.find("not running"), std::string::npos) << noHome.out;
  EXPECT_FALSE(exists(home_));  // down creates nothing

  ASSERT_EQ(agate({"up"}).exitCode, 0);
  ASSERT_EQ(agate({"down"}).exitCode, 0);
  Ran twice = agate({"down"});
  EXPECT_EQ(twice.exitCode, 0) << twice.err;
  EXPECT_NE(twice.out.find("not running"), std::string::npos) << twice.out;
}

TEST_F(AgateCliTest, UpReplacesTheStalePidfileAndSocketOfAKilledKernel) {
  ASSERT_EQ(agate({"up"}).exitCode, 0);
  const pid_t dead = kernelPid();
  ::kill(dead, SIGKILL);  // no clean-up: kernel.pid and kernel.sock stay
  ASSERT_TRUE(waitGone(dead));
  ASSERT_TRUE(exists(path("kernel.pid")));
  ASSERT_TRUE(exists(path("kernel.sock")));
  Ran ps = agate({"ps"});  // a socket nobody listens on: not running
  EXPECT_EQ(ps.exitCode, EXIT_NOT_RUNNING) << ps.err;
  EXPECT_NE(ps.err.find("no kernel is running"), std::string::npos) << ps.err;
  // The hint starts a kernel in the home asked about, not the default one.
  EXPECT_NE(ps.err.find("start one with `agate up --home " + home_ + "`"), std::string::npos)
      << ps.err;

  Ran up = agate({"up"});
  ASSERT_EQ(up.exitCode, 0) << up.out << up.err;
  EXPECT_NE(up.out.find("removed kernel.pid kernel.sock"), std::string::npos) << up.out;
  const pid_t pid = kernelPid();
  EXPECT_NE(pid, dead);
  EXPECT_TRUE(alive(pid));
  EXPECT_EQ(runAgate({"ps", "--home", home_}).exitCode, 0);
}

TEST_F(AgateCliTest, AStalePidfileNamingAnotherLiveProgramIsNeitherBelievedNorSignalled) {
  ASSERT_EQ(::mkdir(home_.c_str(), 0700), 0);
  // The pid of a live process that is not a kernel (this test), and no kernel.lock holder.
  std::ofstream(path("kernel.pid")) << ::getpid() << "\n";
  Ran down = agate({"down"});
  EXPECT_EQ(down.exitCode, 0) << down.err;
  EXPECT_NE(down.out.find("removed kernel.pid"), std::string::npos) << down.out;
  EXPECT_FALSE(exists(path("kernel.pid")));

  std::ofstream(path("kernel.pid")) << ::getpid() << "\n";
  Ran up = agate({"up"});
  ASSERT_EQ(up.exitCode, 0) << up.out << up.err;
  EXPECT_NE(kernelPid(), ::getpid());
  EXPECT_EQ(exeName(kernelPid()), "agate-kernel");
}

TEST_F(AgateCliTest, DownRefusesWhenThePidfileOfARunningKernelNamesAnotherProgram) {
  ASSERT_EQ(agate({"up"}).exitCode, 0);
  const pid_t pid = kernelPid();
  std::ofstream(path("kernel.pid")) << ::getpid() << "\n";  // this test is not the kernel
  Ran down = agate({"down"});
  EXPECT_EQ(down.exitCode, 1);
  EXPECT_NE(down.err.find("does not name an agate-kernel"), std::string::npos) << down.err;
  EXPECT_TRUE(alive(pid));  // nothing was stopped, and the test itself was not signalled
  EXPECT_TRUE(exists(path("kernel.sock")));
  std::ofstream(path("kernel.pid")) << pid << "\n";
  EXPECT_EQ(agate({"down"}).exitCode, 0);
  EXPECT_TRUE(waitGone(pid));
}

TEST_F(AgateCliTest, UpReportsAKernelThatExitsDuringStartUpWithItsLog) {
  const std::string failing = script("agate-kernel", "echo kernel-failure-marker >&2\nexit 3");
  Ran up = agate({"up", "--kernel", failing});
  EXPECT_EQ(up.exitCode, 1);
  EXPECT_NE(up.err.find("exited during start-up"), std::string::npos) << up.err;
  EXPECT_NE(up.err.find("kernel-failure-marker"), std::string::npos) << up.err;
  EXPECT_FALSE(exists(path("kernel.pid")));
  EXPECT_EQ(agate({"ps"}).exitCode, EXIT_NOT_RUNNING);
}

TEST_F(AgateCliTest, UpKillsAKernelThatIsNotReadyInTime) {
  const std::string hung = script("agate-kernel", "exec sleep 30");
  Ran up = agate({"up", "--kernel", hung, "--timeout", "0.5"});
  EXPECT_EQ(up.exitCode, 1);
  EXPECT_NE(up.err.find("was not ready within"), std::string::npos) << up.err;
  // "killed it (pid N)": the daemon's pid, which must be gone.
  const size_t at = up.err.find("(pid ");
  ASSERT_NE(at, std::string::npos) << up.err;
  const pid_t pid = static_cast<pid_t>(std::atoi(up.err.c_str() + at + 5));
  ASSERT_GT(pid, 0) << up.err;
  EXPECT_TRUE(waitGone(pid));
  EXPECT_FALSE(exists(path("kernel.pid")));
}

TEST_F(AgateCliTest, UpRefusesAKernelPathThatIsNotExecutable) {
  Ran up = agate({"up", "--kernel", root_ + "/no-such-kernel"});
  EXPECT_EQ(up.exitCode, 1);
  EXPECT_NE(up.err.find("is not an executable file"), std::string::npos) << up.err;
  EXPECT_FALSE(exists(path("kernel.pid")));
}

// --- not running, usage --------------------------------------------------------------------------

TEST_F(AgateCliTest, QueriesWithoutAKernelFailWithExitCodeTwoAndOneLine) {
  for (std::vector<std::string> args :
       {std::vector<std::string>{"ps"}, {"banks"}, {"caps", "1"}, {"ps", "--json"}}) {
    Ran r = agate(args);
    EXPECT_EQ(r.exitCode, EXIT_NOT_RUNNING) << args[0] << ": " << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_NE(r.err.find("no kernel is running"), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

TEST_F(AgateCliTest, BadUsageExitsWith64AndHelpDocumentsExitCodes) {
  // Every usage error is one "agate: ..." line and a pointer to more, on stderr only.
  for (std::vector<std::string> args : {std::vector<std::string>{"frobnicate"},
                                        {"caps"} /* PID missing */,
                                        {"caps", "x"},
                                        {"up", "--home"} /* its value missing */,
                                        {"ps", "extra"}}) {
    Ran r = runAgate(args);
    EXPECT_EQ(r.exitCode, EXIT_USAGE) << args[0] << ": " << r.err;
    EXPECT_TRUE(r.err.starts_with("agate: ")) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 2) << r.err;
    EXPECT_NE(r.err.find("--help"), std::string::npos) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
  Ran help = runAgate({"--help"});
  EXPECT_EQ(help.exitCode, 0);
  EXPECT_NE(help.out.find("Exit codes"), std::string::npos) << help.out;
  EXPECT_NE(help.out.find("no kernel is running"), std::string::npos) << help.out;
}

TEST_F(AgateCliTest, AnUnknownCommandOrOptionIsNamedWithTheListOfCommands) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  for (const Case& c : {Case{{"foo"}, "agate: unknown command 'foo'\n"},
                        Case{{"--bogus"}, "agate: unknown option '--bogus'\n"},
                        Case{{"--bogus", "foo"}, "agate: unknown option '--bogus'\n"},
                        Case{{}, "agate: no command given\n"}}) {
    Ran r = runAgate(c.args);
    EXPECT_EQ(r.exitCode, EXIT_USAGE) << r.err;
    EXPECT_TRUE(r.err.starts_with(c.message)) << r.err;
    EXPECT_NE(r.err.find("commands: up, down, ps, banks, caps"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("agate --help"), std::string::npos) << r.err;
  }
  // After a command: the option is named with that command, and its help is pointed to.
  Ran r = agate({"ps", "--bogus"});
  EXPECT_EQ(r.exitCode, EXIT_USAGE) << r.err;  // not 2: nothing was attempted
  EXPECT_TRUE(r.err.starts_with("agate: unknown option '--bogus' for `agate ps`\n")) << r.err;
  EXPECT_NE(r.err.find("`agate ps --help`"), std::string::npos) << r.err;
}

TEST_F(AgateCliTest, ATimeoutThatIsNotAPositiveNumberOfSecondsIsRefusedPlainly) {
  for (const char* command : {"up", "down"}) {
    for (const char* bad : {"0", "abc", "-1", "nan", "inf", "1e300", "86401", "5s", ""}) {
      Ran r = agate({command, "--timeout", bad});
      EXPECT_EQ(r.exitCode, EXIT_USAGE) << command << " --timeout '" << bad << "': " << r.err;
      EXPECT_TRUE(r.err.starts_with("agate: --timeout: must be a positive number of seconds"))
          << r.err;
      EXPECT_LT(r.err.size(), 200u) << r.err;  // no bound printed as a 300-digit number
      EXPECT_FALSE(exists(home_)) << "a refused `" << command << "` touched the home";
    }
  }
  Ran up = agate({"up", "--timeout", "86400"});  // the largest accepted
  EXPECT_EQ(up.exitCode, 0) << up.err;
  EXPECT_EQ(agate({"down", "--timeout", "5.5"}).exitCode,
            0);  // fractional; room on a loaded machine
}

TEST_F(AgateCliTest, HomeMayComeBeforeTheCommand) {
  Ran up = runAgate({"--home", home_, "up"});
  ASSERT_EQ(up.exitCode, 0) << up.out << up.err;
  const pid_t pid = kernelPid();
  EXPECT_TRUE(alive(pid));
  Ran ps = runAgate({"--home", home_, "--json", "ps"});
  EXPECT_EQ(ps.exitCode, 0) << ps.err;
  EXPECT_TRUE(parseJson(ps.out)["processes"].is_array()) << ps.out;
  // The same home on both sides is the same home; two different ones are refused.
  EXPECT_EQ(runAgate({"--home", home_, "banks", "--home", home_}).exitCode, 0);
  Ran twice = runAgate({"--home", root_ + "/other", "ps", "--home", home_});
  EXPECT_EQ(twice.exitCode, EXIT_USAGE);
  EXPECT_TRUE(twice.err.starts_with("agate: --home given twice")) << twice.err;
  Ran json = runAgate({"--json", "down", "--home", home_});
  EXPECT_EQ(json.exitCode, EXIT_USAGE);
  EXPECT_TRUE(json.err.starts_with("agate: --json applies to ps, banks and caps only")) << json.err;
  EXPECT_TRUE(alive(pid)) << "a refused down stopped the kernel";
  EXPECT_FALSE(exists(root_ + "/other"));
  Ran down = runAgate({"--home", home_, "down"});
  EXPECT_EQ(down.exitCode, 0) << down.err;
  EXPECT_TRUE(waitGone(pid));
}

TEST_F(AgateCliTest, UpRefusesReceiveLimitsOutsideTheKernelsRange) {
  for (const char* bad : {"-1", "abc", "1.5", "1048577", "99999999999999999999999"}) {
    Ran r = agate({"up", "--receive-caps", bad});
    EXPECT_EQ(r.exitCode, EXIT_USAGE) << bad << ": " << r.err;
    EXPECT_TRUE(r.err.starts_with(
        "agate: --receive-caps: must be a whole number from 0 to 1048576 of caps"))
        << r.err;
    EXPECT_FALSE(exists(home_));
  }
}

TEST_F(AgateCliTest, UpRefusesPageCountsThatAreNotPositiveIntegers) {
  for (const char* option : {"--system-pages", "--process-pages"}) {
    for (const char* bad : {"0", "-5", "abc", "1.5", "99999999999999999999999"}) {
      Ran r = agate({"up", option, bad});
      EXPECT_EQ(r.exitCode, EXIT_USAGE) << option << " " << bad << ": " << r.err;
      EXPECT_TRUE(r.err.starts_with(std::string("agate: ") + option +
                                    ": must be a positive whole number of pages"))
          << r.err;
      EXPECT_FALSE(exists(home_));
    }
  }
}

// --- agate-kernel's own command line -------------------------------------------------------------

Ran runKernel(const std::vector<std::string>& args) {
  return runProgram(AGATE_KERNEL_BINARY, args, {}, 20s, {});
}

TEST_F(AgateCliTest, KernelUsageErrorsExitWith64AndOneMessage) {
  for (std::vector<std::string> args : {std::vector<std::string>{"--bogus"},
                                        {"--process-pages", "0"},
                                        {"--system-pages", "abc"},
                                        {"--attach-timeout-ms", "-1"},
                                        {"--receive-caps", "-1"},
                                        {"--receive-caps", "1048577"},
                                        {"extra"}}) {
    args.insert(args.end(), {"--home", home_});
    Ran r = runKernel(args);
    EXPECT_EQ(r.exitCode, EXIT_USAGE) << args[0] << ": " << r.err;
    EXPECT_TRUE(r.err.starts_with("agate-kernel: ")) << r.err;
    EXPECT_NE(r.err.find("agate-kernel --help"), std::string::npos) << r.err;
    EXPECT_LT(r.err.size(), 200u) << r.err;
    EXPECT_FALSE(exists(home_)) << args[0] << ": a refused kernel created its home";
  }
  EXPECT_TRUE(runKernel({"--bogus", "--home", home_})
                  .err.starts_with("agate-kernel: unknown option '--bogus'\n"));
  EXPECT_TRUE(
      runKernel({"--process-pages", "0", "--home", home_})
          .err.starts_with("agate-kernel: --process-pages: must be a positive whole number"));
  EXPECT_TRUE(runKernel({"--receive-caps", "x", "--home", home_})
                  .err.starts_with("agate-kernel: --receive-caps: must be a whole number from 0 "
                                   "to 1048576, not 'x'"));
}

TEST_F(AgateCliTest, KernelHelpShowsEachOptionsDefault) {
  Ran help = runKernel({"--help"});
  ASSERT_EQ(help.exitCode, 0) << help.err;
  auto lineOf = [&](const std::string& option) {
    const size_t at = help.out.find(option + " ");
    if (at == std::string::npos) return std::string();
    return help.out.substr(at, help.out.find('\n', at) - at);
  };
  // DaemonOptions' defaults (kernel_sim/daemon/daemon.h).
  EXPECT_NE(lineOf("--system-pages").find("N=1048576"), std::string::npos) << help.out;
  EXPECT_NE(lineOf("--process-pages").find("N=65536"), std::string::npos) << help.out;
  EXPECT_NE(lineOf("--receive-caps").find("N=1024"), std::string::npos) << help.out;
  EXPECT_NE(lineOf("--poll-us").find("N=50"), std::string::npos) << help.out;
  EXPECT_NE(lineOf("--attach-timeout-ms").find("N=3000"), std::string::npos) << help.out;
  EXPECT_NE(lineOf("--ready-fd").find("FD=-1"), std::string::npos) << help.out;
}

// --- ps / banks / caps against a real client -----------------------------------------------------

// What the client child built, sent to the test through a pipe.
struct ClientReport {
  uint32_t pid = 0;  // kernel ProcessId
  uint64_t processBank = 0;
  uint64_t childBank = 0;  // koid
  uint64_t childUsed = 0;  // as the client reads its credit
  uint64_t childLimit = 0;
  uint64_t region = 0;  // koid
  uint32_t caps = 0;
};

constexpr uint64_t CHILD_LIMIT = 37;
constexpr uint64_t REGION_PAGES = 3;

// In the child: attach as "cli-test-client", build a child bank with a region in it and
// `copies` READ copies of the region cap, register service "cli-test-service", report, and stay
// attached until the test closes `hold`.
[[noreturn]] void clientMain(const std::string& home, int report, int hold, int copies) {
  EventLoop loop;
  auto c = caps::KernelConnection::tryAttach(loop, home, "cli-test-client");
  if (!c) ::_exit(10);
  caps::SyncKernel k = (*c)->sync();
  auto bank = k.createBank((*c)->bank(), CHILD_LIMIT);
  if (!bank) ::_exit(11);
  auto region = k.createRegion(*bank, REGION_PAGES);
  if (!region) ::_exit(12);
  for (int i = 0; i < copies; ++i)
    if (!k.copyCap(*region, caps::Rights::READ)) ::_exit(15);
  if (!k.registerService((*c)->registry(), "cli-test-service", (*c)->bank())) ::_exit(16);
  auto bankInfo = k.inspectCap(*bank);
  auto regionInfo = k.inspectCap(*region);
  auto credit = k.readBank(*bank);
  auto processBank = k.inspectCap((*c)->bank());
  if (!bankInfo || !regionInfo || !credit || !processBank) ::_exit(13);
  ClientReport r{.pid = (*c)->pid(),
                 .processBank = processBank->koid,
                 .childBank = bankInfo->koid,
                 .childUsed = credit->used,
                 .childLimit = credit->limit,
                 .region = regionInfo->koid,
                 .caps = 0};
  if (::write(report, &r, sizeof(r)) != sizeof(r)) ::_exit(14);
  char byte;
  (void)!::read(hold, &byte, 1);  // EOF: the test is done
  ::_exit(0);
}

class AgateCliClientTest : public AgateCliTest {
 protected:
  void SetUp() override {
    Ran up = agate(upArgs_);
    ASSERT_EQ(up.exitCode, 0) << up.out << up.err;
    int report[2], hold[2];
    ASSERT_EQ(::pipe2(report, O_CLOEXEC), 0);
    ASSERT_EQ(::pipe2(hold, O_CLOEXEC), 0);
    // This process holds no EventLoop: the child makes its own.
    client_ = ::fork();
    ASSERT_GE(client_, 0);
    if (client_ == 0) {
      ::close(hold[1]);
      clientMain(home_, report[1], hold[0], copies_);
    }
    watchdog_->alsoKill(client_);
    ::close(report[1]);
    ::close(hold[0]);
    hold_ = hold[1];
    pollfd p{report[0], POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 10000), 1) << "the client did not report";
    ASSERT_EQ(::read(report[0], &report_, sizeof(report_)), static_cast<ssize_t>(sizeof(report_)))
        << "the client failed before reporting";
    ::close(report[0]);
  }
  void TearDown() override {
    if (hold_ >= 0) ::close(hold_);
    if (client_ > 0) {
      int status = 0;
      ::waitpid(client_, &status, 0);
      watchdog_->alsoKill(0);
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
    }
  }

  pid_t client_ = 0;
  int hold_ = -1;
  int copies_ = 0;                         // extra region caps the client makes (set before SetUp)
  std::vector<std::string> upArgs_{"up"};  // how the kernel is started (set before SetUp)
  ClientReport report_;
};

// A kernel started with page limits other than agate-kernel's defaults.
class AgateCliPageLimitsTest : public AgateCliClientTest {
 protected:
  static constexpr uint64_t SYSTEM_PAGES = 5000;
  static constexpr uint64_t PROCESS_PAGES = 300;
  static constexpr uint64_t RECEIVE_CAPS = 7;
  AgateCliPageLimitsTest() {
    upArgs_ = {"up",
               "--system-pages",
               std::to_string(SYSTEM_PAGES),
               "--process-pages",
               std::to_string(PROCESS_PAGES),
               "--receive-caps",
               std::to_string(RECEIVE_CAPS)};
  }
};

// A client with more caps than one completion frame holds (about 2700 entries of 48 bytes in
// a 128 KiB frame): the CLI must fetch every page.
class AgateCliManyCapsTest : public AgateCliClientTest {
 protected:
  static constexpr int COPIES = 3000;
  AgateCliManyCapsTest() { copies_ = COPIES; }
};

TEST_F(AgateCliClientTest, PsListsTheAttachedClient) {
  Ran table = agate({"ps"});
  ASSERT_EQ(table.exitCode, 0) << table.err;
  EXPECT_NE(table.out.find("cli-test-client"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("NAME"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("SERVICES"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("cli-test-service"), std::string::npos) << table.out;
  EXPECT_EQ(table.out.find("agate-cli"), std::string::npos)
      << "the CLI lists itself: " << table.out;

  Ran json = agate({"ps", "--json"});
  ASSERT_EQ(json.exitCode, 0) << json.err;
  Json j = parseJson(json.out);
  ASSERT_TRUE(j["processes"].is_array()) << json.out;
  ASSERT_EQ(j["processes"].size(), 1u) << json.out;
  const Json& p = j["processes"][0];
  EXPECT_EQ(p["name"], "cli-test-client");
  EXPECT_EQ(p["pid"], report_.pid);
  EXPECT_EQ(p["os_pid"], client_);
  EXPECT_EQ(p["uid"], ::getuid());
  EXPECT_EQ(p["bank"], report_.processBank);
  EXPECT_GE(p["caps"].get<uint64_t>(), 5u);  // its bank, registry, child bank, region, service
  EXPECT_EQ(p["services"], Json::parse(R"(["cli-test-service"])"));
  EXPECT_EQ(p["service_count"], 1);
}

TEST_F(AgateCliClientTest, BanksShowsTheClientsChildBankWithItsUsedAndLimit) {
  ASSERT_EQ(report_.childLimit, CHILD_LIMIT);
  ASSERT_GE(report_.childUsed, REGION_PAGES);

  Ran json = agate({"banks", "--json"});
  ASSERT_EQ(json.exitCode, 0) << json.err;
  Json j = parseJson(json.out);
  EXPECT_EQ(j["page_bytes"], 4096);
  const Json* child = nullptr;
  const Json* parent = nullptr;
  for (const Json& b : j["banks"]) {
    if (b["koid"] == report_.childBank) child = &b;
    if (b["koid"] == report_.processBank) parent = &b;
  }
  ASSERT_NE(child, nullptr) << json.out;
  ASSERT_NE(parent, nullptr) << json.out;
  EXPECT_EQ((*child)["parent"], report_.processBank);
  EXPECT_EQ((*child)["used_pages"], report_.childUsed);
  EXPECT_EQ((*child)["limit_pages"], CHILD_LIMIT);
  EXPECT_EQ((*child)["depth"], (*parent)["depth"].get<int>() + 1);
  EXPECT_TRUE((*child)["owner_pid"].is_null());
  EXPECT_EQ((*parent)["owner_pid"], report_.pid);
  EXPECT_GE((*parent)["used_pages"].get<uint64_t>(), report_.childUsed);

  // The table: the child's line is indented deeper than its parent's and shows used and limit.
  Ran table = agate({"banks"});
  ASSERT_EQ(table.exitCode, 0) << table.err;
  auto lineOf = [&](uint64_t koid) -> std::string {
    size_t at = 0;
    const std::string k = std::to_string(koid);
    while ((at = table.out.find('\n', at)) != std::string::npos) {
      ++at;
      const size_t first = table.out.find_first_not_of(' ', at);
      if (table.out.compare(first, k.size() + 1, k + " ") == 0)
        return table.out.substr(at, table.out.find('\n', at) - at);
    }
    return {};
  };
  const std::string childLine = lineOf(report_.childBank);
  const std::string parentLine = lineOf(report_.processBank);
  ASSERT_FALSE(childLine.empty()) << table.out;
  ASSERT_FALSE(parentLine.empty()) << table.out;
  EXPECT_GT(childLine.find_first_not_of(' '), parentLine.find_first_not_of(' ')) << table.out;
  EXPECT_NE(childLine.find(" " + std::to_string(report_.childUsed) + " "), std::string::npos)
      << childLine;
  EXPECT_NE(childLine.find(" " + std::to_string(CHILD_LIMIT) + " "), std::string::npos)
      << childLine;
  EXPECT_NE(parentLine.find("cli-test-client"), std::string::npos) << parentLine;
}

// A process's command line, its arguments joined by single spaces (and one after the last).
std::string commandLineOf(pid_t pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/cmdline";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  std::string line;
  char buffer[4096];
  ssize_t n = 0;
  while ((n = ::read(fd, buffer, sizeof buffer)) > 0) line.append(buffer, static_cast<size_t>(n));
  ::close(fd);
  std::replace(line.begin(), line.end(), '\0', ' ');
  return line;
}

TEST_F(AgateCliPageLimitsTest, UpPassesItsLimitsToTheKernel) {
  const std::string kernelLine = commandLineOf(kernelPid());
  EXPECT_NE(kernelLine.find(" --receive-caps 7 "), std::string::npos) << kernelLine;

  Ran json = agate({"banks", "--json"});
  ASSERT_EQ(json.exitCode, 0) << json.err;
  Json j = parseJson(json.out);
  const Json* system = nullptr;
  const Json* process = nullptr;
  for (const Json& b : j["banks"]) {
    if (b["parent"] == 0) system = &b;
    if (b["koid"] == report_.processBank) process = &b;
  }
  ASSERT_NE(system, nullptr) << json.out;
  ASSERT_NE(process, nullptr) << json.out;
  EXPECT_EQ((*system)["limit_pages"], SYSTEM_PAGES);
  EXPECT_EQ((*process)["limit_pages"], PROCESS_PAGES);

  // A running kernel keeps its limits, and `up` says so.
  Ran again = agate({"up", "--process-pages", "400"});
  EXPECT_EQ(again.exitCode, 0) << again.err;
  EXPECT_NE(again.out.find("already running"), std::string::npos) << again.out;
  EXPECT_NE(again.out.find("options are unchanged"), std::string::npos) << again.out;
  Ran plain = agate({"up"});
  EXPECT_EQ(plain.out.find("options are unchanged"), std::string::npos) << plain.out;
}

TEST_F(AgateCliClientTest, CapsShowsTheClientsCSpace) {
  Ran json = agate({"caps", std::to_string(report_.pid), "--json"});
  ASSERT_EQ(json.exitCode, 0) << json.err;
  Json j = parseJson(json.out);
  EXPECT_EQ(j["pid"], report_.pid);
  bool region = false, child = false, own = false;
  for (const Json& c : j["caps"]) {
    EXPECT_TRUE(c["slot"].is_number() && c["generation"].is_number() && c["handle"].is_number());
    EXPECT_EQ(c["handle"].get<uint64_t>(),
              (c["generation"].get<uint64_t>() << 32) | c["slot"].get<uint64_t>());
    if (c["object"] == report_.region) {
      region = true;
      EXPECT_EQ(c["type"], "region");
      const auto rights = c["rights"].get<std::vector<std::string>>();
      EXPECT_NE(std::find(rights.begin(), rights.end(), "read"), rights.end());
      EXPECT_NE(std::find(rights.begin(), rights.end(), "write"), rights.end());
    }
    if (c["object"] == report_.childBank) {
      child = true;
      EXPECT_EQ(c["type"], "bank");
    }
    if (c["object"] == report_.processBank) own = true;
  }
  EXPECT_TRUE(region && child && own) << json.out;

  Ran table = agate({"caps", std::to_string(report_.pid)});
  ASSERT_EQ(table.exitCode, 0) << table.err;
  EXPECT_NE(table.out.find("region"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("registry"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find(" " + std::to_string(report_.region)), std::string::npos) << table.out;
}

TEST_F(AgateCliManyCapsTest, CapsListsEveryCapAcrossPages) {
  Ran json = agate({"caps", std::to_string(report_.pid), "--json"});
  ASSERT_EQ(json.exitCode, 0) << json.err;
  Json j = parseJson(json.out);
  size_t regionCaps = 0;
  std::set<uint64_t> slots;
  for (const Json& c : j["caps"]) {
    if (c["object"] == report_.region) ++regionCaps;
    slots.insert(c["slot"].get<uint64_t>());
  }
  EXPECT_EQ(regionCaps, size_t{COPIES} + 1);  // the copies and the original
  EXPECT_EQ(slots.size(), j["caps"].size()) << "no cap listed twice";
  Ran table = agate({"caps", std::to_string(report_.pid)});
  ASSERT_EQ(table.exitCode, 0) << table.err;
  EXPECT_GT(std::count(table.out.begin(), table.out.end(), '\n'), COPIES);
}

TEST_F(AgateCliClientTest, CapsOfAProcessThatIsNotAttachedExitsWithThree) {
  Ran r = agate({"caps", "999999"});
  EXPECT_EQ(r.exitCode, EXIT_NO_SUCH_PROCESS);
  EXPECT_NE(r.err.find("no process 999999"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty());
}

TEST_F(AgateCliClientTest, HomeComesFromAgateHomeWhenNotGiven) {
  Ran r = runAgate({"ps", "--json"}, {"AGATE_HOME=" + home_});
  ASSERT_EQ(r.exitCode, 0) << r.err;
  EXPECT_NE(r.out.find("cli-test-client"), std::string::npos) << r.out;
  Ran elsewhere = runAgate({"ps"}, {"AGATE_HOME=" + root_ + "/elsewhere"});
  EXPECT_EQ(elsewhere.exitCode, EXIT_NOT_RUNNING);
}

}  // namespace
}  // namespace agate
