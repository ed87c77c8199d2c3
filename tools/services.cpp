#include "agate/tools/services.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <utility>

#include "agate/runtime/fd.h"
#include "agate/tools/kernel_home.h"

namespace agate::tools {
namespace {

using Clock = std::chrono::steady_clock;

int msLeft(Clock::time_point end) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - Clock::now());
  return left.count() <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left.count(), INT_MAX));
}

// poll() until `fd` is readable or `end`; false on timeout. Retries on EINTR.
bool waitReadable(int fd, Clock::time_point end) {
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    const int n = ::poll(&p, 1, msLeft(end));
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) return false;
  }
}

// In the daemon, between fork and exec: only async-signal-safe calls. Never returns.
[[noreturn]] void execDaemon(const SystemService& service, char* const* argv, int devNull, int log,
                             int ready) {
  // Descriptors to their fixed numbers. READY_FD first may land on log or devNull's number, so
  // move every source above READY_FD before placing anything.
  const int readyHigh = ::fcntl(ready, F_DUPFD, READY_FD + 1);
  const int logHigh = ::fcntl(log, F_DUPFD, READY_FD + 1);
  const int nullHigh = ::fcntl(devNull, F_DUPFD, READY_FD + 1);
  if (readyHigh < 0 || logHigh < 0 || nullHigh < 0 || ::dup2(nullHigh, STDIN_FILENO) < 0 ||
      ::dup2(logHigh, STDOUT_FILENO) < 0 || ::dup2(logHigh, STDERR_FILENO) < 0 ||
      ::dup2(readyHigh, READY_FD) < 0)
    ::_exit(126);
  // Nothing else of the caller's: descriptors it inherited without CLOEXEC included.
  if (::syscall(SYS_close_range, READY_FD + 1, ~0u, 0) != 0) {
    for (int fd = READY_FD + 1; fd < 1024; ++fd) ::close(fd);
  }
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGCHLD}) ::sigaction(sig, &dfl, nullptr);
  ::umask(077);
  if (::chdir("/") != 0) ::_exit(126);
  ::execv(service.executable.c_str(), argv);
  const char msg[] = "agate up: cannot execute the daemon\n";
  (void)!::write(STDERR_FILENO, msg, sizeof(msg) - 1);
  ::_exit(127);
}

}  // namespace

std::vector<SystemService> systemServices(const std::string& home,
                                          const std::string& kernelExecutable,
                                          const std::vector<std::string>& kernelOptions) {
  std::vector<SystemService> services;
  std::vector<std::string> kernelArgs{"--home", home, "--ready-fd", "{ready-fd}"};
  kernelArgs.insert(kernelArgs.end(), kernelOptions.begin(), kernelOptions.end());
  services.push_back(SystemService{
      .name = "agate-kernel",
      .executable = kernelExecutable,
      .args = std::move(kernelArgs),
      .log = home + "/" + KERNEL_LOG_NAME,
  });
  return services;
}

Result<std::string> findSiblingExecutable(const char* name) {
  char self[PATH_MAX];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return Error::fromErrno(errno, "cannot read /proc/self/exe");
  std::string path(self, static_cast<size_t>(n));
  path.resize(path.rfind('/') + 1);
  path += name;
  if (::access(path.c_str(), X_OK) != 0)
    return Error(Errc::NOT_FOUND, "no executable of that name beside this one");
  return path;
}

Result<StartOutcome> startDaemon(const SystemService& service, std::chrono::milliseconds timeout) {
  StartOutcome outcome;
  Fd log(::open(service.log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!log.valid()) return Error::fromErrno(errno, "cannot open the daemon's log");
  Fd devNull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (!devNull.valid()) return Error::fromErrno(errno, "cannot open /dev/null");

  // A header line, so the tail shown after a failure is this start's and a reader of the log
  // sees where each run begins.
  struct stat st {};
  if (::fstat(log.get(), &st) != 0) return Error::fromErrno(errno, "cannot stat the daemon's log");
  outcome.logOffset = st.st_size;
  char header[160];
  const time_t now = ::time(nullptr);
  tm local{};
  char when[64] = "?";
  if (::localtime_r(&now, &local) != nullptr)
    std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S %z", &local);
  const int headerLen = std::snprintf(
      header, sizeof(header), "--- agate up: starting %s at %s ---\n", service.name.c_str(), when);
  if (headerLen > 0)
    (void)!::write(log.get(), header, std::min<size_t>(headerLen, sizeof(header) - 1));

  // argv, built before fork: the child only makes async-signal-safe calls.
  std::vector<std::string> args;
  args.push_back(service.executable);
  for (const std::string& a : service.args)
    args.push_back(a == "{ready-fd}" ? std::to_string(READY_FD) : a);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int readyPipe[2];
  if (::pipe2(readyPipe, O_CLOEXEC) != 0) return Error::fromErrno(errno, "pipe2 failed");
  Fd readyRead(readyPipe[0]);
  Fd readyWrite(readyPipe[1]);
  // The middle process reports the daemon's pid here before it exits.
  int pidPipe[2];
  if (::pipe2(pidPipe, O_CLOEXEC) != 0) return Error::fromErrno(errno, "pipe2 failed");
  Fd pidRead(pidPipe[0]);
  Fd pidWrite(pidPipe[1]);

  const pid_t middle = ::fork();
  if (middle < 0) return Error::fromErrno(errno, "fork failed");
  if (middle == 0) {
    if (::setsid() < 0) ::_exit(126);
    const pid_t daemon = ::fork();
    if (daemon < 0) ::_exit(126);
    if (daemon > 0) {
      (void)!::write(pidWrite.get(), &daemon, sizeof(daemon));
      ::_exit(0);
    }
    execDaemon(service, argv.data(), devNull.get(), log.get(), readyWrite.get());
  }
  readyWrite.reset();
  pidWrite.reset();
  int status = 0;
  while (::waitpid(middle, &status, 0) < 0 && errno == EINTR) {
  }
  pid_t daemon = 0;
  if (::read(pidRead.get(), &daemon, sizeof(daemon)) != sizeof(daemon) || daemon <= 0)
    return Error(Errc::SYSTEM_ERROR, "the daemon could not be forked");
  outcome.pid = daemon;
  // Pins the daemon for the kill below. It is not our child (the middle process exited), so its
  // pid could be reused once it dies; if it already died, its ready pipe reads EOF and the
  // pidfd is never used.
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, daemon, 0)));

  const auto end = Clock::now() + timeout;
  if (!waitReadable(readyRead.get(), end)) {
    // Alive but not ready in time: a daemon nobody waits for any more must not linger. Wait
    // (briefly) for the kill to land, so the caller sees the home free when this returns.
    if (pidfd.valid() && ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0) == 0)
      (void)waitReadable(pidfd.get(), Clock::now() + std::chrono::seconds(5));
    return outcome;
  }
  char byte = 0;
  ssize_t n;
  while ((n = ::read(readyRead.get(), &byte, 1)) < 0 && errno == EINTR) {
  }
  outcome.ready = n == 1;
  outcome.exited = n == 0;
  return outcome;
}

Status stopProcess(pid_t pid, const std::function<bool()>& stillOurs,
                   std::chrono::milliseconds timeout, bool force) {
  Fd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd.valid()) {
    if (errno == ESRCH) return Error(Errc::NOT_FOUND, "the process has already exited");
    return Error::fromErrno(errno, "pidfd_open failed");
  }
  // Checked after the pidfd pins the process: if the pid is ours now, the pidfd names it (a pid
  // reused before pidfd_open fails this check; one reused after it is not the pidfd's process).
  if (!stillOurs()) return Error(Errc::PERMISSION_DENIED, "the pid belongs to another program");
  auto signalAndWait = [&](int sig) -> Status {
    if (::syscall(SYS_pidfd_send_signal, pidfd.get(), sig, nullptr, 0) != 0) {
      if (errno == ESRCH) return {};  // exited in between
      return Error::fromErrno(errno, "pidfd_send_signal failed");
    }
    // A pidfd polls readable when the process has exited.
    if (!waitReadable(pidfd.get(), Clock::now() + timeout))
      return Error(Errc::TIMED_OUT, "the process did not exit in time");
    return {};
  };
  Status st = signalAndWait(SIGTERM);
  if (st.code() == Errc::TIMED_OUT && force) st = signalAndWait(SIGKILL);
  return st;
}

std::string tailOfFile(const std::string& path, off_t offset, int maxLines) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return {};
  if (::lseek(fd.get(), offset, SEEK_SET) < 0) return {};
  std::deque<std::string> lines;
  std::string current;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd.get(), buf, sizeof(buf))) > 0) {
    for (ssize_t i = 0; i < n; ++i) {
      current.push_back(buf[i]);
      if (buf[i] != '\n') continue;
      lines.push_back(std::move(current));
      current.clear();
      if (static_cast<int>(lines.size()) > maxLines) lines.pop_front();
    }
  }
  if (!current.empty()) {
    lines.push_back(current + "\n");
    if (static_cast<int>(lines.size()) > maxLines) lines.pop_front();
  }
  std::string out;
  for (const std::string& l : lines) out += l;
  return out;
}

}  // namespace agate::tools
