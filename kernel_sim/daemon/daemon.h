// KernelDaemon: agate-kernel's event loop around one Kernel.
//
// What it does. Listens on HOME/kernel.sock (SOCK_SEQPACKET, mode 0600 in a 0700 directory, and
// a flock on HOME/kernel.lock so that one daemon serves a home). Attaches processes (handshake in
// schemas/kernel.capnp), then serves each process's submission ring: every frame is decoded under
// ReadLimits into private memory (COPY_IN) and checked before one Kernel::try* call is made
// (decode -> invoke, kernel_sim/daemon/syscalls.h); the Completion goes into the process's
// completion ring, after its descriptors went over the socket. Kernel events (BUSHEL_OPENED, ...)
// go to their process the same way with call id 0. A process that dies (socket hang-up, pidfd),
// corrupts its rings or abuses the socket is killed in the model and everything held for it is
// closed; its peers get their events.
//
// Why plain epoll and not the runtime's EventLoop: every kernel call is synchronous and short, so
// the daemon has no use for coroutines or promises; what it needs is one wait over many
// descriptors (the listening socket, each process's socket and pidfd, each submission ring's
// data eventfd and, while a completion ring is full, its space eventfd) that returns which ones
// fired. epoll's ready list gives exactly that in one system call, and the doorbells' eventfd
// mode (doorbell.h) is built for it.
//
// The busy path makes no system call. A pass visits every process and drains up to BATCH frames
// from its submission ring (releases and completions are deferred and flushed once per process
// per pass: one doorbell each). While passes find work, the daemon never sleeps, and it polls
// epoll (timeout 0, for attaches and deaths) only every EPOLL_POLL_PASSES busy passes. When a
// pass finds nothing, it keeps polling the rings for Options::pollMicros, then parks: it
// announces itself on every submission doorbell (eventfd mode) and on the space doorbell of every
// full completion ring, runs one more pass (a frame that arrived before the announce is seen
// there), and only then waits in epoll_wait. A process that rings after the announce writes the
// eventfd; one that does not (the doorbell words are in memory the process can write) only delays
// itself: the wait has a backstop timeout.
//
// Threading: one thread; run() returns after requestStop() or SIGTERM / SIGINT.
#pragma once

#include <sys/socket.h>
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "agate/kernel/kernel.h"
#include "agate/runtime/message.h"
#include "agate/runtime/result.h"
#include "session.h"

namespace agate::kernel::daemon {

struct DaemonOptions {
  std::string home;                  // directory of kernel.sock, kernel.lock, kernel.pid
  uint64_t systemPages = 1u << 20;   // the system bank's limit (4 GiB of pages)
  uint64_t processPages = 1u << 16;  // each process bank's limit (256 MiB)
  // Each new process's receive limit (kernel_sim cspace.h): caps others may push into it at
  // once; the process changes its own with setReceiveLimit.
  uint32_t receiveCaps = Kernel::DEFAULT_RECEIVE_LIMIT;
  uint64_t submissionBytes = 64 * 1024;   // per process, data area of the submission ring
  uint64_t completionBytes = 256 * 1024;  // per process, data area of the completion ring
  uint32_t pollMicros = 50;               // keep polling the rings this long before parking
  // A connection that has not completed attach this long after it was accepted is refused
  // (TIMED_OUT) and closed, so a silent peer cannot hold a descriptor and an epoll entry.
  uint32_t attachTimeoutMs = 3000;
  int readyFd = -1;  // written one byte (then closed) once listening
};

class KernelDaemon {
 public:
  // Creates HOME (0700) if needed, takes HOME/kernel.lock (ALREADY_EXISTS if another daemon
  // holds it), binds HOME/kernel.sock (a stale one is replaced), writes HOME/kernel.pid; the
  // destructor removes kernel.sock and kernel.pid again.
  static Result<std::unique_ptr<KernelDaemon>> tryCreate(const DaemonOptions& options);
  ~KernelDaemon();
  KernelDaemon(const KernelDaemon&) = delete;
  KernelDaemon& operator=(const KernelDaemon&) = delete;

  // Serves until stopped (SIGTERM, SIGINT). Returns the error that stopped it, if any.
  Status run();

 private:
  explicit KernelDaemon(const DaemonOptions& options);
  Status trySetUp();

  // epoll registration keys: (id << 8) | kind; ids are ProcessIds (never reused) or pending
  // connection numbers, so an event for a session that already died is recognised and ignored.
  enum class Key : uint8_t { LISTEN, SIGNAL, PENDING, SOCKET, PIDFD, SUBMIT_BELL, SPACE_BELL };
  static uint64_t key(Key kind, uint64_t id) { return (id << 8) | static_cast<uint8_t>(kind); }
  Status tryWatch(int fd, uint32_t events, uint64_t key);
  void unwatch(int fd);
  // Adds or removes EPOLLOUT on a session's socket (while its send buffer is full).
  void watchSocketWritable(Session& s, bool writable);

  void handleEvents(int timeoutMs);
  void acceptConnections();
  void attach(uint64_t pendingId);
  // Builds the session for an accepted, credential-checked connection, or says why not.
  Status tryAttach(Fd& socket, const ucred& cred, std::string name, std::unique_ptr<Session>& out,
                   std::vector<Fd>& replyFds, uint64_t& replyBank, uint64_t& replyRegistry);
  void refuse(int socket, const Error& e);
  // Refuses and closes every pending connection past its attach deadline.
  void expirePending();
  // How long the park may sleep: the backstop, or less to meet the first attach deadline.
  int parkTimeoutMs() const;

  // One pass over every session; true if any frame was served or any completion moved.
  bool servePass();
  bool serveSession(Session& s);
  void serveFrame(Session& s, std::span<const std::byte> frame);
  // Puts a completion built in scratch_ (bytes) into s's ring, or its outbox.
  void deliver(Session& s, size_t bytes, uint64_t callId, std::vector<Fd>& fds,
               Koid openedBushel = 0);
  bool withdrawOpened(Session& s, Koid bushel);
  bool flushOutbox(Session& s);
  bool tryCommit(Session& s, std::span<const std::byte> bytes, uint64_t callId,
                 std::vector<Fd>& fds);
  void deliverEvents();
  // Marks `s` for killing at the end of the pass (never inside one).
  enum class Fault : uint8_t { DEATH, ABUSE };
  void doom(Session& s, const char* reason, Fault fault = Fault::DEATH);
  void reapDoomed();
  void kill(ProcessId pid);

  bool parkAnnounce();
  void parkCancel();

  DaemonOptions options_;
  Kernel kernel_;
  Fd lock_;
  Fd listen_;
  Fd epoll_;
  Fd signals_;
  std::string socketPath_;
  std::string pidPath_;  // set once HOME/kernel.pid is written; removed by the destructor
  std::map<ProcessId, std::unique_ptr<Session>> sessions_;
  // Accepted, not yet attached, by connection number. Numbers grow with acceptance time and the
  // timeout is one constant, so the first entry always has the earliest deadline.
  struct Pending {
    Fd socket;
    std::chrono::steady_clock::time_point deadline;
  };
  std::map<uint64_t, Pending> pending_;
  uint64_t nextPending_ = 1;
  bool stop_ = false;
  uint32_t doomedCount_ = 0;  // sessions marked by doom() and not yet reaped
  // Decoding: one COPY_IN reader for every submission ring (served one frame at a time).
  std::unique_ptr<capnp::word[]> decodeScratch_;
  std::unique_ptr<FrameReader> reader_;
  // Building: completions are built here (zeroed between uses), then copied into the ring.
  std::unique_ptr<capnp::word[]> buildScratch_;
  size_t buildWords_ = 0;
};

}  // namespace agate::kernel::daemon
