// One agate-kernel for a benchmark: started from `binary` on a fresh temporary home, stopped
// (SIGTERM) on destruction, its temporary directory removed. Used by the suites that measure
// through a real daemon (kernel, rpc). Start it while the process holds no EventLoop (it forks).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include "agate/runtime/result.h"

namespace agate::bench {

class Daemon {
 public:
  // `pollMicros`: the daemon's --poll-us (how long it spins on the rings before it parks).
  static Result<std::unique_ptr<Daemon>> tryStart(const char* binary, uint32_t pollMicros) {
    auto d = std::unique_ptr<Daemon>(new Daemon());
    char tmpl[] = "/tmp/agate-bench-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return Error::fromErrno(errno, "mkdtemp failed");
    d->dir_ = tmpl;
    d->home_ = d->dir_ + "/home";
    int ready[2];
    if (::pipe2(ready, O_CLOEXEC) != 0) return Error::fromErrno(errno, "pipe failed");
    const std::string poll = "--poll-us=" + std::to_string(pollMicros);
    const std::string readyArg = "--ready-fd=" + std::to_string(ready[1]);
    d->pid_ = ::fork();
    if (d->pid_ == 0) {
      ::fcntl(ready[1], F_SETFD, 0);
      const char* argv[] = {binary,       "--home",         d->home_.c_str(),
                            poll.c_str(), readyArg.c_str(), nullptr};
      ::execv(binary, const_cast<char**>(argv));
      ::_exit(127);
    }
    ::close(ready[1]);
    pollfd pfd{ready[0], POLLIN, 0};
    char byte = 0;
    const bool up = ::poll(&pfd, 1, 10000) == 1 && ::read(ready[0], &byte, 1) == 1;
    ::close(ready[0]);
    if (!up) return Error(Errc::FAILED, "agate-kernel did not start");
    return d;
  }
  ~Daemon() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      ::waitpid(pid_, nullptr, 0);
    }
    std::error_code ignored;  // the whole directory: the home keeps kernel.lock after a clean exit
    std::filesystem::remove_all(dir_, ignored);
  }
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;
  const std::string& home() const { return home_; }

 private:
  Daemon() = default;
  std::string dir_;
  std::string home_;
  pid_t pid_ = 0;
};

}  // namespace agate::bench
