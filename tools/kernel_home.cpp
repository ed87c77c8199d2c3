#include "agate/tools/kernel_home.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "agate/kernel/home.h"

namespace agate::tools {
namespace {

// readlink(2) into a string; empty on failure (errno kept).
std::string readLink(const std::string& path) {
  char buf[PATH_MAX];
  const ssize_t n = ::readlink(path.c_str(), buf, sizeof(buf) - 1);
  if (n <= 0) return {};
  return std::string(buf, static_cast<size_t>(n));
}

std::string baseName(std::string path) {
  // /proc/PID/exe of a binary replaced since it started reads "/path/agate-kernel (deleted)".
  constexpr std::string_view DELETED = " (deleted)";
  if (path.size() > DELETED.size() && path.ends_with(DELETED))
    path.resize(path.size() - DELETED.size());
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// The executable name of `pid`: from /proc/PID/exe, else argv[0] of /proc/PID/cmdline.
std::string executableName(pid_t pid) {
  const std::string proc = "/proc/" + std::to_string(pid);
  std::string exe = readLink(proc + "/exe");
  if (!exe.empty()) return baseName(std::move(exe));
  Fd cmdline(::open((proc + "/cmdline").c_str(), O_RDONLY | O_CLOEXEC));
  if (!cmdline.valid()) return {};
  char buf[PATH_MAX];
  const ssize_t n = ::read(cmdline.get(), buf, sizeof(buf) - 1);
  if (n <= 0) return {};
  buf[n] = '\0';  // argv[0] ends at the first NUL
  return baseName(buf);
}

// 1: a process holds `path` locked; 0: nobody does (or the file does not exist); -1: error.
int lockHolder(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) return errno == ENOENT ? 0 : -1;
  if (::flock(fd.get(), LOCK_SH | LOCK_NB) == 0) return 0;  // released when fd closes
  return errno == EWOULDBLOCK ? 1 : -1;
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

}  // namespace

HomePaths HomePaths::of(const std::string& dir) {
  HomePaths p;
  p.dir = dir;
  p.socket = dir + "/" + kernel::KERNEL_SOCKET_NAME;
  p.lock = dir + "/" + kernel::KERNEL_LOCK_NAME;
  p.pidfile = dir + "/" + kernel::KERNEL_PID_NAME;
  p.log = dir + "/" + KERNEL_LOG_NAME;
  p.toolsLock = dir + "/" + TOOLS_LOCK_NAME;
  return p;
}

Result<pid_t> readPidfile(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) {
    if (errno == ENOENT) return Error(Errc::NOT_FOUND, "no pidfile");
    return Error::fromErrno(errno, "cannot open the pidfile");
  }
  char buf[32];
  const ssize_t n = ::read(fd.get(), buf, sizeof(buf) - 1);
  if (n < 0) return Error::fromErrno(errno, "cannot read the pidfile");
  buf[n] = '\0';
  // One decimal number, then at most a newline: anything else is not our pidfile.
  if (n == 0 || buf[0] < '0' || buf[0] > '9')
    return Error(Errc::INVALID_ARGUMENT, "the pidfile does not hold a pid");
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(buf, &end, 10);
  if (errno != 0 || value <= 0 || value > INT32_MAX || (*end != '\0' && std::strcmp(end, "\n")))
    return Error(Errc::INVALID_ARGUMENT, "the pidfile does not hold a pid");
  return static_cast<pid_t>(value);
}

bool isKernelProcess(pid_t pid, const std::string& lockPath) {
  if (pid <= 0 || executableName(pid) != KERNEL_EXECUTABLE_NAME) return false;
  // Which home it serves: the daemon keeps its kernel.lock open. Compare files, not names (the
  // home may have been given through a symlink or a relative path).
  struct stat lockSt {};
  if (::stat(lockPath.c_str(), &lockSt) != 0) return false;
  const std::string fdDir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* dir = ::opendir(fdDir.c_str());
  if (dir == nullptr) return true;  // descriptors unreadable (another uid): the name must do
  bool holds = false;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    struct stat st {};
    if (::stat((fdDir + "/" + e->d_name).c_str(), &st) == 0 && st.st_dev == lockSt.st_dev &&
        st.st_ino == lockSt.st_ino) {
      holds = true;
      break;
    }
  }
  ::closedir(dir);
  return holds;
}

Result<KernelStatus> probeKernel(const HomePaths& home) {
  KernelStatus status;
  const int held = lockHolder(home.lock);
  if (held < 0) return Error::fromErrno(errno, "cannot inspect kernel.lock");
  status.running = held == 1;
  Result<pid_t> pid = readPidfile(home.pidfile);
  if (status.running) {
    if (pid && isKernelProcess(*pid, home.lock)) status.pid = *pid;
    return status;
  }
  status.stalePidfile = pid.code() != Errc::NOT_FOUND;
  status.staleSocket = exists(home.socket);
  return status;
}

Status removeStaleFiles(const HomePaths& home) {
  const int held = lockHolder(home.lock);
  if (held < 0) return Error::fromErrno(errno, "cannot inspect kernel.lock");
  if (held == 1) return {};  // a kernel runs: its files are not stale
  if (::unlink(home.pidfile.c_str()) != 0 && errno != ENOENT)
    return Error::fromErrno(errno, "cannot remove the stale kernel.pid");
  if (::unlink(home.socket.c_str()) != 0 && errno != ENOENT)
    return Error::fromErrno(errno, "cannot remove the stale kernel.sock");
  return {};
}

Status tryMakeHome(const std::string& dir) {
  if (dir.empty()) return Error(Errc::INVALID_ARGUMENT, "the home path is empty");
  // mkdir -p, each missing component 0700.
  for (size_t at = dir.find('/', 1);; at = dir.find('/', at + 1)) {
    const std::string part = dir.substr(0, at);
    if (::mkdir(part.c_str(), 0700) != 0 && errno != EEXIST)
      return Error::fromErrno(errno, "cannot create the home directory");
    if (at == std::string::npos) break;
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return Error::fromErrno(errno, "cannot stat the home");
  if (!S_ISDIR(st.st_mode)) return Error(Errc::INVALID_ARGUMENT, "the home is not a directory");
  if (st.st_uid != ::geteuid())
    return Error(Errc::PERMISSION_DENIED, "the home directory belongs to another user");
  return {};
}

Result<ToolsLock> ToolsLock::tryAcquire(const HomePaths& home, std::chrono::milliseconds timeout) {
  Fd fd(::open(home.toolsLock.c_str(), O_CREAT | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd.valid()) return Error::fromErrno(errno, "cannot open agate.lock");
  // flock has no timed wait: poll, as another `agate up` holds it for seconds at most.
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return Error::fromErrno(errno, "cannot lock agate.lock");
    if (std::chrono::steady_clock::now() >= end)
      return Error(Errc::TIMED_OUT, "another agate up/down holds agate.lock");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return ToolsLock(std::move(fd));
}

}  // namespace agate::tools
