// The kernel home seen from outside: is an agate-kernel serving it, which process is it, and what
// did a dead one leave behind.
//
// A home (agate/kernel/home.h) holds kernel.sock, kernel.lock and kernel.pid, written by
// agate-kernel, plus what the tools add: kernel.log (the daemon's stdout and stderr when `agate up`
// started it) and agate.lock (held by `agate up` and `agate down` while they work, so two of them
// never start or stop a kernel for the same home at once).
//
// The truth about "running" is kernel.lock: the daemon holds an exclusive flock on it for its whole
// life and the OS drops the lock when it dies, however it dies. The pidfile only says WHICH
// process that is, and is believed only after checking that the process is an agate-kernel that
// holds this home's kernel.lock open (a pid in a stale pidfile may have been reused by anything).
// A socket or pidfile left while nobody holds the lock is stale.
//
// Probing the lock takes a shared flock for an instant: a daemon starting at that very instant
// finds the lock busy and refuses to start ("another agate-kernel serves this home"). `agate up`
// and `agate down` serialize on agate.lock, so only a kernel started by hand can meet that race.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>

#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate::tools {

inline constexpr const char* KERNEL_EXECUTABLE_NAME = "agate-kernel";
inline constexpr const char* KERNEL_LOG_NAME = "kernel.log";
inline constexpr const char* TOOLS_LOCK_NAME = "agate.lock";

// The paths of one home. `dir` is as given (resolveKernelHome), not canonicalized.
struct HomePaths {
  std::string dir;
  std::string socket;
  std::string lock;
  std::string pidfile;
  std::string log;
  std::string toolsLock;

  static HomePaths of(const std::string& dir);
};

// What probeKernel found.
struct KernelStatus {
  bool running = false;       // a process holds kernel.lock
  pid_t pid = 0;              // its pid when running and the pidfile names it; 0: unknown
  bool stalePidfile = false;  // not running, and kernel.pid exists
  bool staleSocket = false;   // not running, and kernel.sock exists
};

// Looks at the home without changing anything. A missing home reads as "not running".
// SYSTEM_ERROR when the home exists but cannot be inspected (permissions).
Result<KernelStatus> probeKernel(const HomePaths& home);

// Removes kernel.pid and kernel.sock when no kernel holds kernel.lock. Never touches a running
// kernel's files: it re-checks the lock first and does nothing if it is held.
Status removeStaleFiles(const HomePaths& home);

// The pid written in `path`: NOT_FOUND if there is no file, INVALID_ARGUMENT if it does not hold
// one decimal number in 1..INT32_MAX followed by at most a newline.
Result<pid_t> readPidfile(const std::string& path);

// True when `pid` runs an executable named agate-kernel and (when its descriptors can be read)
// holds `lockPath` open. Reads /proc/PID/exe (or argv[0] from /proc/PID/cmdline when exe cannot
// be read) and /proc/PID/fd.
bool isKernelProcess(pid_t pid, const std::string& lockPath);

// Creates `dir` and missing parents (mode 0700) and checks that it is a directory owned by this
// user, as the daemon will.
Status tryMakeHome(const std::string& dir);

// An exclusive flock on the home's agate.lock, held while the value lives. Waits at most
// `timeout` for another `agate up`/`agate down` to finish (TIMED_OUT).
class ToolsLock {
 public:
  static Result<ToolsLock> tryAcquire(const HomePaths& home, std::chrono::milliseconds timeout);

 private:
  explicit ToolsLock(Fd fd) noexcept : fd_(std::move(fd)) {}
  Fd fd_;  // the lock goes with the descriptor
};

}  // namespace agate::tools
