// Session: the daemon's side of one attached process.
//
// Owns everything the daemon holds for the process besides its kernel_sim state: the socket it
// attached on, a pidfd on its OS process, its submission ring (the daemon receives) and its
// completion ring (the daemon sends), and completions that did not fit in the completion ring yet
// (the outbox). Destroying a Session closes every one of those descriptors and unmaps both rings;
// the daemon removes them from its epoll set first (the process holds duplicates of the rings'
// eventfds, so closing ours would not remove them from epoll by itself).
//
// Backpressure: while the outbox is not empty the daemon takes no new submission from this
// process, so the outbox holds at most one call's completion plus the events other processes'
// calls produced for it. Those are bounded by the bushels open at once (paid for by their
// clients' banks), not by bushels ever opened: a bushel that dies before its BUSHEL_OPENED was
// delivered withdraws that event (and its descriptors) instead of queueing BUSHEL_CLOSED. The
// outbox fills when the completion ring is full or when the socket cannot take a completion's
// descriptors yet.
//
// Threading: the daemon's one thread.
#pragma once

#include <sys/types.h>

#include <capnp/common.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "agate/kernel/kernel.h"
#include "agate/runtime/channel.h"
#include "agate/runtime/fd.h"

namespace agate::kernel::daemon {

// A completion built but not yet in the ring, with the descriptors that go before it.
struct PendingCompletion {
  std::vector<uint64_t> words;  // the message's words (a plain copy: capnp::word is not copyable)
  size_t bytes = 0;
  uint64_t callId = 0;
  std::vector<Fd> fds;
  // A BUSHEL_OPENED event (the bushel's koid), so that the bushel's death before delivery can
  // withdraw it together with its ring descriptors (KernelDaemon::deliverEvents).
  Koid openedBushel = 0;
};

struct Session {
  ProcessId pid = 0;
  pid_t osPid = 0;
  uid_t uid = 0;
  std::string name;
  Fd socket;
  Fd pidfd;
  std::unique_ptr<Channel> submissionRing;
  std::unique_ptr<Channel> completionRing;
  Receiver submissions;  // declared after their channels: detached before the channels go
  Sender completions;
  // Their doorbells (never null once attached; owned by the endpoints): the daemon parks on the
  // submission ring's data doorbell and, while the outbox waits, the completion ring's space one.
  Doorbell* submitBell = nullptr;
  Doorbell* spaceBell = nullptr;
  std::deque<PendingCompletion> outbox;
  bool needsFlush = false;  // completions committed deferred since the last flush
  bool doomed = false;      // to be killed at the end of the current pass
  // The socket's send buffer was full: descriptors wait with their completions in the outbox
  // until epoll reports the socket writable (EPOLLOUT is watched only meanwhile).
  bool socketFull = false;
  const char* doomReason = "";
  // Doorbells announced by the current park (withdrawn after it).
  bool submitAnnounced = false;
  bool spaceAnnounced = false;

  ~Session() {
    // Endpoints detach before their channels unmap.
    submissions.detach();
    completions.detach();
  }
};

}  // namespace agate::kernel::daemon
