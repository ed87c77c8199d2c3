// What the integration tests of client/ share: a Session run in the test process under a
// deadline, a forked client process with a Session of its own, reaping forked children, error text
// for failure messages, and CO_CHECK (a failed check inside a coroutine: the test fails and the
// coroutine returns an error).
#pragma once

#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include <cerrno>
#include <chrono>
#include <string>

#include <gtest/gtest.h>

#include "agate/caps/kernel_connection.h"
#include "agate/client/session.h"
#include "agate/runtime/event_loop.h"

namespace agate::client::test {

// A child's exit code, or 128 + the signal that ended it.
inline int reap(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

inline std::string describe(const Error& e) {
  char buf[256];
  return e.describe(buf, sizeof buf);
}

// Forks a client process, attached as `name`, that runs `body(session)` on a Session of its own
// and exits 0 when it succeeded (3 when it failed). It dies with the test (PR_SET_PDEATHSIG) or
// after 60 s (alarm), whichever comes first.
template <class Body>
pid_t startClient(const std::string& home, Body body, const char* name = "test-client") {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(1);
  ::alarm(60);
  EventLoop loop;
  auto kernel = caps::KernelConnection::tryAttach(loop, home, name);
  if (!kernel) ::_exit(2);
  Status done;
  {
    Session s(**kernel);
    done = loop.run(body(s));
  }
  ::_exit(done ? 0 : 3);
}

// Attaches this process as `name`, runs `body(session)` on a Session with a deadline of `limit`,
// and fails the test if it returns an error.
template <class Body>
void runSession(const std::string& home, Body body, Duration limit = std::chrono::seconds(30),
                const char* name = "session-test") {
  EventLoop loop;
  auto kernel = caps::KernelConnection::tryAttach(loop, home, name);
  ASSERT_TRUE(kernel.ok()) << describe(kernel.error());
  Status done;
  {
    Session s(**kernel);
    done = loop.run(loop.deadline(body(s), limit));
  }
  EXPECT_TRUE(done.ok()) << describe(done.error()) << " (" << (*kernel)->lastErrorDetail() << ")";
}

}  // namespace agate::client::test

// co_return an error (the test has failed) unless `cond`.
#define CO_CHECK(cond)                               \
  do {                                               \
    if (!(cond)) {                                   \
      ADD_FAILURE() << "check failed: " #cond;       \
      co_return Error(Errc::FAILED, "check failed"); \
    }                                                \
  } while (0)
