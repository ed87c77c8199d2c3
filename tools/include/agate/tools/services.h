// The system services `agate up` starts and `agate down` stops, and how one is started as a
// proper daemon.
//
// A SystemService names an executable, its arguments, where it logs and how it says it is ready.
// systemServices() lists them in start order (today only agate-kernel; Agate's own servers are
// to be appended as they are built); `agate down` stops them in reverse. Supervision (restart on
// crash) will hang off the same list.
//
// Daemonizing (startDaemon): fork, setsid in the child, fork again so the daemon is not a session
// leader and can never acquire a controlling terminal, and let the middle process exit at once so
// the daemon is re-parented away from the caller. The daemon gets stdin from /dev/null, stdout and
// stderr appended to its log, "/" as working directory, umask 077, an empty signal mask and no
// descriptor of the caller's except its ready pipe (fd 3). It signals readiness by writing one
// byte to that pipe (agate-kernel's --ready-fd) and then closing it; a daemon that exits first
// closes it without a byte, which is how a failed start is told from a slow one.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "agate/runtime/result.h"

namespace agate::tools {

// The descriptor the daemon finds its ready pipe on.
inline constexpr int READY_FD = 3;

struct SystemService {
  std::string name;               // for people: "agate-kernel"
  std::string executable;         // absolute path
  std::vector<std::string> args;  // after argv[0]; "{ready-fd}" is replaced by READY_FD
  std::string log;                // stdout and stderr, appended
};

// What `agate up` starts, in order, for a home served by the kernel at `kernelExecutable`.
// `kernelOptions` are appended to the kernel's arguments (`agate up --process-pages N` gives
// {"--process-pages", "N"}).
std::vector<SystemService> systemServices(const std::string& home,
                                          const std::string& kernelExecutable,
                                          const std::vector<std::string>& kernelOptions);

// The executable `name` in this executable's directory (of /proc/self/exe): agate and
// agate-kernel sit side by side in the build tree. NOT_FOUND if there is none.
Result<std::string> findSiblingExecutable(const char* name);

// A daemon that started, or why it did not.
struct StartOutcome {
  pid_t pid = 0;        // the daemon's pid (0 if it never ran)
  bool ready = false;   // it wrote its ready byte in time
  bool exited = false;  // it closed the ready pipe without the byte (it failed and exited)
  off_t logOffset = 0;  // where this start's lines begin in the log
};

// Starts `service` daemonized (see above) and waits at most `timeout` for its ready byte. A
// daemon still not ready at the deadline is killed (SIGKILL) before returning. SYSTEM_ERROR when
// the log, the pipe or fork fail; otherwise the outcome says what happened.
Result<StartOutcome> startDaemon(const SystemService& service, std::chrono::milliseconds timeout);

// SIGTERM to `pid` through a pidfd (after `stillOurs()` confirms the pid is still the process we
// mean, so a reused pid is never signalled), then waits at most `timeout` for it to exit; with
// `force`, SIGKILL after the timeout and wait again as long. NOT_FOUND if it had already exited,
// TIMED_OUT if it is still alive, PERMISSION_DENIED if stillOurs() says no.
Status stopProcess(pid_t pid, const std::function<bool()>& stillOurs,
                   std::chrono::milliseconds timeout, bool force);

// The last `maxLines` lines of `path` from `offset` on ("" if unreadable).
std::string tailOfFile(const std::string& path, off_t offset, int maxLines);

}  // namespace agate::tools
