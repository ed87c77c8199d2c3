// Watchdog for async and cross-process tests: aborts the test binary with a message if the scope
// is still alive after a limit, so a hang fails fast and says where. ctest's TIMEOUT stays the
// outer backstop.
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

namespace agate::testing {

class Watchdog {
 public:
  // `child`: a process to SIGKILL before aborting (0: none).
  explicit Watchdog(const char* what, std::chrono::seconds limit, pid_t child = 0)
      : thread_([this, what, limit, child] {
          std::unique_lock<std::mutex> lock(mutex_);
          if (cv_.wait_for(lock, limit, [this] { return done_; })) return;
          fprintf(stderr, "watchdog: '%s' still running after %llds; aborting\n", what,
                  static_cast<long long>(limit.count()));
          if (child > 0) kill(child, SIGKILL);
          abort();
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace agate::testing
