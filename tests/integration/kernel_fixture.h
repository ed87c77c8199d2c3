// A real agate-kernel for integration tests: started on a fresh temporary home, stopped (SIGTERM,
// then SIGKILL) when the fixture goes, plus the probes the leak checks need (the daemon's open
// descriptors and memfd mappings, read from /proc). The daemon's stderr goes to a log file beside
// its home (log()), so tests can check what it reported; the log is copied to the test's stderr
// when the daemon does not exit cleanly (a sanitizer report, a crash). The temporary directory
// (home and log) is removed when the fixture goes.
//
// Fork discipline: a process may create an EventLoop only if it has none, and a forked child
// inherits its parent's "current loop". Tests therefore fork their client children while the
// test process holds no loop, and each child makes its own loop and connection.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

namespace agate::testing {

class KernelProcess {
 public:
  // Starts agate-kernel (AGATE_KERNEL_BINARY) and waits until it listens. `extraArg`: one more
  // option, e.g. "--process-pages=64".
  explicit KernelProcess(const char* extraArg = nullptr) {
    char tmpl[] = "/tmp/agate-test-XXXXXX";
    const char* dir = ::mkdtemp(tmpl);
    if (dir == nullptr) {
      ADD_FAILURE() << "mkdtemp failed";
      return;
    }
    dir_ = dir;
    home_ = dir_ + "/home";
    logPath_ = dir_ + "/kernel.log";
    int ready[2];
    if (::pipe2(ready, O_CLOEXEC) != 0) {
      ADD_FAILURE() << "pipe failed";
      return;
    }
    pid_ = ::fork();
    if (pid_ == 0) {
      char readyArg[32];
      std::snprintf(readyArg, sizeof(readyArg), "--ready-fd=%d", ready[1]);
      ::fcntl(ready[1], F_SETFD, 0);  // inherited across exec
      const int logFd = ::open(logPath_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (logFd < 0 || ::dup2(logFd, STDERR_FILENO) < 0) ::_exit(126);
      const char* argv[] = {
          AGATE_KERNEL_BINARY, "--home", home_.c_str(), readyArg, extraArg, nullptr};
      ::execv(AGATE_KERNEL_BINARY, const_cast<char**>(argv));
      ::_exit(127);
    }
    ::close(ready[1]);
    pollfd pfd{ready[0], POLLIN, 0};
    char byte = 0;
    const bool up = ::poll(&pfd, 1, 10000) == 1 && ::read(ready[0], &byte, 1) == 1;
    ::close(ready[0]);
    if (!up) ADD_FAILURE() << "agate-kernel did not start";
  }
  // Stops the daemon if the test has not, and checks that it exited cleanly (status 0: no crash,
  // no sanitizer report, nothing leaked at exit under LeakSanitizer).
  ~KernelProcess() {
    if (pid_ > 0) {
      const int status = stop();
      EXPECT_EQ(status, 0) << "agate-kernel did not exit cleanly; its log:\n" << log();
    }
    // The home and the log go with the fixture (the log was shown above if it mattered).
    std::error_code ignored;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ignored);
  }
  KernelProcess(const KernelProcess&) = delete;
  KernelProcess& operator=(const KernelProcess&) = delete;

  // SIGTERM, and the daemon's exit status (-1 if it had to be killed).
  int stop() {
    if (pid_ <= 0) return status_;
    ::kill(pid_, SIGTERM);
    int status = 0;
    for (int i = 0; i < 500; ++i) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = 0;
        status_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        return status_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status, 0);
    pid_ = 0;
    status_ = -1;
    return status_;
  }

  const std::string& home() const { return home_; }
  // Everything the daemon wrote to stderr so far.
  std::string log() const {
    std::ifstream in(logPath_);
    std::string text, line;
    while (std::getline(in, line)) text += line + '\n';
    return text;
  }
  pid_t pid() const { return pid_; }

  // The daemon's open descriptors.
  int openFds() const {
    const std::string path = "/proc/" + std::to_string(pid_) + "/fd";
    DIR* d = ::opendir(path.c_str());
    if (d == nullptr) return -1;
    int n = 0;
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') ++n;
    ::closedir(d);
    return n;
  }
  // The daemon's shared-memory mappings (rings; it never maps regions).
  int memfdMappings() const {
    std::ifstream maps("/proc/" + std::to_string(pid_) + "/maps");
    int n = 0;
    for (std::string line; std::getline(maps, line);)
      if (line.find("/memfd:") != std::string::npos) ++n;
    return n;
  }

 private:
  std::string dir_;  // the temporary directory holding home_ and logPath_
  std::string home_;
  std::string logPath_;
  pid_t pid_ = 0;
  int status_ = -1;
};

// Polls `done` every millisecond until it holds or `limit` passes.
template <class F>
bool eventually(F done, std::chrono::milliseconds limit = std::chrono::milliseconds(5000)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

}  // namespace agate::testing
