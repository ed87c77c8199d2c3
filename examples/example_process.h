// What the RPC examples share: a bushel-shaped pair of SHARED channels (requests one way, replies
// the other) between a parent and a forked child, each end opened from the exported descriptors
// as a process that did not create the channels would, with each side watching the other's pid.
//
// The kernel daemon will hand out bushels; until then an example makes its own.
//
// Watchdogs: the child dies with its parent (PR_SET_PDEATHSIG) and both arm alarm(), so a hung
// example ends by itself (its ctest registration has a TIMEOUT as well).
#pragma once

#include <fmt/core.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <utility>

#include "agate/rpc/connection.h"
#include "agate/runtime/channel.h"
#include "agate/runtime/message_channel.h"

namespace agate::examples {

[[noreturn]] inline void die(const char* program, const char* what, const Error& e) {
  char buf[256];
  fmt::print(stderr, "{}: {}: {}\n", program, what, e.describe(buf, sizeof buf));
  std::exit(1);
}

template <class T>
T check(const char* program, Result<T> r, const char* what) {
  if (!r.ok()) die(program, what, r.error());
  return std::move(r).value();
}

// The two channels, created by the parent before fork; both processes open them from the fds.
struct Bushel {
  std::unique_ptr<Channel> requests, replies;
  Fd requestsFd, repliesFd;

  static Bushel create(const char* program, uint64_t capacityBytes = 64 * 1024) {
    ChannelOptions co;
    co.scope = ChannelScope::SHARED;
    co.capacityBytes = capacityBytes;
    Bushel b;
    b.requests = check(program, Channel::create(co), "create the request channel");
    b.replies = check(program, Channel::create(co), "create the reply channel");
    b.requestsFd = check(program, b.requests->exportFd(), "export the request channel");
    b.repliesFd = check(program, b.replies->exportFd(), "export the reply channel");
    return b;
  }
};

// One process's end: the client sends requests and receives replies, the server the reverse.
// Not movable (MessageReceiver stays in place); keep it where it was made, and destroy the
// RpcConnection on it first.
class BushelEnd {
 public:
  enum class Side { CLIENT, SERVER };
  BushelEnd(const char* program, const Bushel& b, Side side, pid_t peer) {
    const bool client = side == Side::CLIENT;
    out_ =
        check(program, Channel::openShared(Fd(::dup((client ? b.requestsFd : b.repliesFd).get()))),
              "open the outbound channel");
    in_ =
        check(program, Channel::openShared(Fd(::dup((client ? b.repliesFd : b.requestsFd).get()))),
              "open the inbound channel");
    Sender s = check(program, out_->attachSender(), "attach the sender");
    Receiver r = check(program, in_->attachReceiver(), "attach the receiver");
    if (!s.watchPeer(peer).ok() || !r.watchPeer(peer).ok())
      die(program, "watch the peer", Error(Errc::SYSTEM_ERROR, "pidfd"));
    tx_ = std::make_unique<MessageSender>(std::move(s));
    rx_ = std::make_unique<MessageReceiver>(*in_, std::move(r), rpc::rpcReceiverOptions());
  }
  MessageSender& tx() { return *tx_; }
  MessageReceiver& rx() { return *rx_; }

 private:
  std::unique_ptr<Channel> out_, in_;
  std::unique_ptr<MessageSender> tx_;
  std::unique_ptr<MessageReceiver> rx_;
};

// Runs `body` in a forked child that dies with its parent; returns the child's pid.
template <class Body>
pid_t forkChild(const char* program, Body&& body, unsigned watchdogSeconds) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) die(program, "fork", Error::fromErrno(errno, "fork"));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);  // the parent died before prctl took effect
    ::alarm(watchdogSeconds);
    ::_exit(body());
  }
  return pid;
}

// The child's exit status, or 128 + the signal that ended it.
inline int reap(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace agate::examples
