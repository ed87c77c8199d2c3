// agate: start, stop and look into an Agate system.
//
//   agate up [--home DIR] [--timeout S] [--kernel PATH]   start agate-kernel in the background
//            [--system-pages N] [--process-pages N]     (passed on to agate-kernel)
//            [--receive-caps N]
//   agate down [--home DIR] [--timeout S] [--force]       stop it
//   agate ps [--home DIR] [--json]                        attached processes
//   agate banks [--home DIR] [--json]                     the space bank tree
//   agate caps PID [--home DIR] [--json]                  one process's capabilities
//
// --home and --json may also come before the command (`agate --home D ps`). Usage errors print
// one "agate: ..." line and where to read more, and exit 64.
//
// Exit codes (also in --help and tools/README.md): 0 done; 1 failed; 2 no kernel is running (ps,
// banks, caps); 3 no such process (caps); 64 bad usage.
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "agate/caps/kernel_connection.h"
#include "agate/kernel/cli_checks.h"
#include "agate/kernel/cspace.h"
#include "agate/kernel/home.h"
#include "agate/runtime/event_loop.h"
#include "agate/tools/kernel_home.h"
#include "agate/tools/report.h"
#include "agate/tools/services.h"

namespace agate::tools {
namespace {

enum ExitCode : int {
  EXIT_OK = 0,
  EXIT_FAILED = 1,
  EXIT_NOT_RUNNING = 2,
  EXIT_NO_SUCH_PROCESS = 3,
  EXIT_USAGE = 64,  // sysexits.h EX_USAGE
};

constexpr const char* EXIT_CODES_FOOTER =
    "Exit codes:\n"
    "  0   done (also: `up` with a kernel already running, `down` with none running)\n"
    "  1   failed (the message says why)\n"
    "  2   no kernel is running for this home (ps, banks, caps)\n"
    "  3   no such process attached (caps)\n"
    "  64  bad usage\n"
    "Home: --home DIR, else $AGATE_HOME, else $XDG_RUNTIME_DIR/agate, else /tmp/agate-$UID.";

// The name the CLI attaches under; its own attachment is left out of ps and banks.
constexpr const char* CLI_PROCESS_NAME = "agate-cli";

std::string describe(const Error& e) {
  char buf[256];
  return e.describe(buf, sizeof(buf));
}

void fail(const std::string& message) { std::fprintf(stderr, "agate: %s\n", message.c_str()); }

std::chrono::milliseconds seconds(double s) {
  return std::chrono::milliseconds(static_cast<int64_t>(s * 1000));
}

// The longest --timeout: a day is far more than any start or stop needs, and keeps the
// milliseconds well inside int64_t.
constexpr double MAX_TIMEOUT_SECONDS = 24 * 3600;

// --timeout: a finite number of seconds in (0, MAX_TIMEOUT_SECONDS]. A check of the text, so
// "abc" gets the same message as 0 (CLI11 runs checks before converting).
CLI::Validator positiveSeconds() {
  return CLI::Validator(
      [](std::string& input) -> std::string {
        char* end = nullptr;
        const double value = std::strtod(input.c_str(), &end);
        if (input.empty() || end != input.c_str() + input.size() || !(value > 0) ||
            value > MAX_TIMEOUT_SECONDS)
          return "must be a positive number of seconds (at most " +
                 std::to_string(static_cast<int>(MAX_TIMEOUT_SECONDS)) + "), not '" + input + "'";
        return {};
      },
      "", "SECONDS");
}

struct Common {
  std::string home;  // as given; resolved with resolveKernelHome
  bool json = false;
};

// --- up / down -----------------------------------------------------------------------------------

struct UpOptions {
  Common common;
  double timeoutSeconds = 10;
  std::string kernel;  // --kernel, else $AGATE_KERNEL, else beside this executable
  // Passed on to agate-kernel as its options of the same names; 0: not given (its default).
  uint64_t systemPages = 0;
  uint64_t processPages = 0;
  std::optional<uint64_t> receiveCaps;  // 0 is a limit too

  std::vector<std::string> kernelOptions() const {
    std::vector<std::string> options;
    if (systemPages != 0)
      options.insert(options.end(), {"--system-pages", std::to_string(systemPages)});
    if (processPages != 0)
      options.insert(options.end(), {"--process-pages", std::to_string(processPages)});
    if (receiveCaps)
      options.insert(options.end(), {"--receive-caps", std::to_string(*receiveCaps)});
    return options;
  }
};

void printLogTail(const std::string& log, off_t offset) {
  const std::string tail = tailOfFile(log, offset, 20);
  if (tail.empty()) return;
  std::fprintf(stderr, "last lines of %s:\n%s", log.c_str(), tail.c_str());
}

// Attaches once and detaches: the kernel is ready when its socket takes an attach, not merely
// when it listens.
Status tryAttachOnce(const std::string& home, std::chrono::milliseconds timeout) {
  auto loop = EventLoop::tryCreate();
  if (!loop) return loop.error();
  auto conn = caps::KernelConnection::tryAttach(**loop, home, "agate-up", timeout);
  if (!conn) return conn.error();
  return {};
}

// `kernelOptions`: what this `up` would have passed on; a running kernel keeps its own settings.
int alreadyRunning(const KernelStatus& status, const HomePaths& home,
                   const std::vector<std::string>& kernelOptions) {
  std::printf("agate-kernel is already running (pid %s, home %s)\n",
              status.pid ? std::to_string(status.pid).c_str() : "unknown", home.dir.c_str());
  if (!kernelOptions.empty())
    std::printf(
        "its options are unchanged: --system-pages, --process-pages and --receive-caps apply to "
        "a kernel that `agate up` starts (`agate down` first)\n");
  return EXIT_OK;
}

// Takes the tools lock into `lock` (so that up and down never race each other; held as long as
// `lock` lives) and reads what the home holds. On failure says why and returns nothing.
std::optional<KernelStatus> lockAndProbe(const HomePaths& home, std::chrono::milliseconds timeout,
                                         std::optional<ToolsLock>& lock) {
  auto acquired = ToolsLock::tryAcquire(home, timeout);
  if (!acquired) {
    fail(home.toolsLock + ": " + describe(acquired.error()));
    return std::nullopt;
  }
  lock.emplace(std::move(*acquired));
  auto status = probeKernel(home);
  if (!status) {
    fail("cannot inspect home " + home.dir + ": " + describe(status.error()));
    return std::nullopt;
  }
  return *status;
}

// `path` made absolute (symlinks resolved); empty if it does not exist.
std::string absolutePath(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) != nullptr ? std::string(buf) : std::string();
}

int runUp(const UpOptions& o) {
  const std::string given = kernel::resolveKernelHome(o.common.home);
  const auto timeout = seconds(o.timeoutSeconds);
  if (Status st = tryMakeHome(given); !st) {
    fail("cannot use home " + given + ": " + describe(st.error()));
    return EXIT_FAILED;
  }
  // Absolute: the daemon runs in "/", and a relative home would name another directory there.
  const HomePaths home = HomePaths::of(absolutePath(given));
  std::optional<ToolsLock> lock;
  const std::optional<KernelStatus> status = lockAndProbe(home, timeout, lock);
  if (!status) return EXIT_FAILED;
  if (status->running) {
    return alreadyRunning(*status, home, o.kernelOptions());
  }
  if (status->stalePidfile || status->staleSocket) {
    if (Status st = removeStaleFiles(home); !st) {
      fail("cannot clean home " + home.dir + ": " + describe(st.error()));
      return EXIT_FAILED;
    }
    std::printf("removed%s%s left by a kernel that is no longer running\n",
                status->stalePidfile ? " kernel.pid" : "",
                status->staleSocket ? " kernel.sock" : "");
  }

  std::string kernelPath = o.kernel;
  if (kernelPath.empty()) {
    if (const char* env = std::getenv("AGATE_KERNEL"); env != nullptr && *env != '\0')
      kernelPath = env;
  }
  if (kernelPath.empty()) {
    auto sibling = findSiblingExecutable(KERNEL_EXECUTABLE_NAME);
    if (!sibling) {
      fail("agate-kernel not found beside this executable; give --kernel PATH or $AGATE_KERNEL");
      return EXIT_FAILED;
    }
    kernelPath = *sibling;
  }
  if (::access(kernelPath.c_str(), X_OK) != 0) {
    fail(kernelPath + " is not an executable file");
    return EXIT_FAILED;
  }
  kernelPath = absolutePath(kernelPath);  // exists: access() just found it

  // The kernel first: every later service attaches to it.
  const std::vector<SystemService> services =
      systemServices(home.dir, kernelPath, o.kernelOptions());
  for (size_t i = 0; i < services.size(); ++i) {
    const SystemService& service = services[i];
    const auto start = std::chrono::steady_clock::now();
    auto outcome = startDaemon(service, timeout);
    if (!outcome) {
      fail("cannot start " + service.name + ": " + describe(outcome.error()));
      return EXIT_FAILED;
    }
    if (!outcome->ready) {
      // A kernel started by hand at the same moment wins the home's lock and ours exits: that
      // is a running kernel, which is what `up` was asked for.
      if (auto now = probeKernel(home); i == 0 && outcome->exited && now && now->running) {
        return alreadyRunning(*now, home, o.kernelOptions());
      }
      if (outcome->exited)
        fail(service.name + " exited during start-up");
      else
        fail(service.name + " was not ready within " + std::to_string(o.timeoutSeconds) +
             " s; killed it (pid " + std::to_string(outcome->pid) + ")");
      printLogTail(service.log, outcome->logOffset);
      return EXIT_FAILED;
    }
    if (i == 0) {
      const auto left = timeout - std::chrono::duration_cast<std::chrono::milliseconds>(
                                      std::chrono::steady_clock::now() - start);
      if (Status st = tryAttachOnce(home.dir, std::max(left, std::chrono::milliseconds(100)));
          !st) {
        fail(service.name + " listens but refused an attach: " + describe(st.error()) +
             "; stopping it");
        const pid_t pid = outcome->pid;
        (void)stopProcess(
            pid, [&] { return isKernelProcess(pid, home.lock); }, timeout, /*force=*/true);
        (void)removeStaleFiles(home);
        printLogTail(service.log, outcome->logOffset);
        return EXIT_FAILED;
      }
    }
    std::printf("%s started (pid %d, home %s, log %s)\n", service.name.c_str(),
                static_cast<int>(outcome->pid), home.dir.c_str(), service.log.c_str());
  }
  return EXIT_OK;
}

struct DownOptions {
  Common common;
  double timeoutSeconds = 10;
  bool force = false;
};

int runDown(const DownOptions& o) {
  const HomePaths home = HomePaths::of(kernel::resolveKernelHome(o.common.home));
  const auto timeout = seconds(o.timeoutSeconds);
  if (::access(home.dir.c_str(), F_OK) != 0) {
    std::printf("agate-kernel is not running (home %s does not exist)\n", home.dir.c_str());
    return EXIT_OK;
  }
  std::optional<ToolsLock> lock;
  const std::optional<KernelStatus> status = lockAndProbe(home, timeout, lock);
  if (!status) return EXIT_FAILED;
  if (!status->running) {
    if (status->stalePidfile || status->staleSocket) {
      if (Status st = removeStaleFiles(home); !st) {
        fail("cannot clean home " + home.dir + ": " + describe(st.error()));
        return EXIT_FAILED;
      }
      std::printf("removed%s%s left by a kernel that is no longer running\n",
                  status->stalePidfile ? " kernel.pid" : "",
                  status->staleSocket ? " kernel.sock" : "");
    }
    std::printf("agate-kernel is not running (home %s)\n", home.dir.c_str());
    return EXIT_OK;
  }
  const pid_t pid = status->pid;
  if (pid == 0) {
    fail("a process holds " + home.lock + " but " + home.pidfile +
         " does not name an agate-kernel; not stopping anything");
    return EXIT_FAILED;
  }
  Status st = stopProcess(
      pid, [&] { return isKernelProcess(pid, home.lock); }, timeout, o.force);
  if (!st && st.code() != Errc::NOT_FOUND) {
    const std::string who = "agate-kernel (pid " + std::to_string(pid) + ")";
    if (st.code() == Errc::TIMED_OUT)
      fail(who + " did not exit within " + std::to_string(o.timeoutSeconds) + " s" +
           (o.force ? " even after SIGKILL" : "; `agate down --force` kills it"));
    else if (st.code() == Errc::PERMISSION_DENIED)
      fail("pid " + std::to_string(pid) + " is no longer this home's agate-kernel; not signalled");
    else
      fail("cannot stop " + who + ": " + describe(st.error()));
    return EXIT_FAILED;
  }
  if (Status clean = removeStaleFiles(home); !clean) {
    fail("agate-kernel stopped, but cleaning " + home.dir + " failed: " + describe(clean.error()));
    return EXIT_FAILED;
  }
  std::printf("agate-kernel stopped (pid %d, home %s)\n", static_cast<int>(pid), home.dir.c_str());
  return EXIT_OK;
}

// --- ps / banks / caps ---------------------------------------------------------------------------

// A short-lived attachment for one query.
class KernelQuery {
 public:
  // Attaches; on failure prints the message and sets `exitCode`.
  static std::optional<KernelQuery> tryOpen(const Common& c, int& exitCode) {
    const std::string home = kernel::resolveKernelHome(c.home);
    auto loop = EventLoop::tryCreate();
    if (!loop) {
      fail("cannot create an event loop: " + describe(loop.error()));
      exitCode = EXIT_FAILED;
      return std::nullopt;
    }
    auto conn = caps::KernelConnection::tryAttach(**loop, home, CLI_PROCESS_NAME);
    if (!conn) {
      if (conn.code() == Errc::DISCONNECTED) {
        fail("no kernel is running (home " + home + "); start one with `agate up --home " + home +
             "`");
        exitCode = EXIT_NOT_RUNNING;
      } else {
        fail("cannot attach to the kernel at " + home + ": " + describe(conn.error()));
        exitCode = EXIT_FAILED;
      }
      return std::nullopt;
    }
    return KernelQuery(std::move(*loop), std::move(*conn));
  }

  caps::SyncKernel sync() { return conn_->sync(); }
  caps::ProcessId pid() const { return conn_->pid(); }
  const std::string& lastErrorDetail() const { return conn_->lastErrorDetail(); }

 private:
  KernelQuery(std::unique_ptr<EventLoop> loop, std::unique_ptr<caps::KernelConnection> conn)
      : loop_(std::move(loop)), conn_(std::move(conn)) {}
  // Declared first, destroyed last: the connection's promises belong to the loop.
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<caps::KernelConnection> conn_;
};

int queryFailed(const char* what, const Error& e, const KernelQuery& s) {
  std::string message = std::string("cannot ") + what + ": " + describe(e);
  if (!s.lastErrorDetail().empty()) message += " (" + s.lastErrorDetail() + ")";
  fail(message);
  return e.code == Errc::DISCONNECTED ? EXIT_NOT_RUNNING : EXIT_FAILED;
}

// Everything but this CLI's own attachment.
std::vector<caps::ProcessInfo> othersOf(std::vector<caps::ProcessInfo> all, caps::ProcessId self) {
  std::erase_if(all, [self](const caps::ProcessInfo& p) { return p.pid == self; });
  return all;
}

int runPs(const Common& c) {
  int code = EXIT_OK;
  auto s = KernelQuery::tryOpen(c, code);
  if (!s) return code;
  auto processes = s->sync().listProcesses();
  if (!processes) return queryFailed("list processes", processes.error(), *s);
  const auto shown = othersOf(std::move(*processes), s->pid());
  std::fputs((c.json ? processesJson(shown) : processesTable(shown)).c_str(), stdout);
  return EXIT_OK;
}

int runBanks(const Common& c) {
  int code = EXIT_OK;
  auto s = KernelQuery::tryOpen(c, code);
  if (!s) return code;
  auto processes = s->sync().listProcesses();
  if (!processes) return queryFailed("list processes", processes.error(), *s);
  auto banks = s->sync().listBanks();
  if (!banks) return queryFailed("list banks", banks.error(), *s);
  // Leave out this CLI's own process bank (it has no children: the CLI allocates nothing).
  caps::Koid selfBank = 0;
  for (const caps::ProcessInfo& p : *processes)
    if (p.pid == s->pid()) selfBank = p.bank;
  std::erase_if(*banks, [selfBank](const caps::BankInfo& b) { return b.koid == selfBank; });
  const auto owners = othersOf(std::move(*processes), s->pid());
  std::fputs((c.json ? banksJson(*banks, owners) : banksTable(*banks, owners)).c_str(), stdout);
  return EXIT_OK;
}

int runCaps(const Common& c, caps::ProcessId pid) {
  int code = EXIT_OK;
  auto s = KernelQuery::tryOpen(c, code);
  if (!s) return code;
  auto entries = s->sync().listCaps(pid);
  if (!entries) {
    if (entries.code() == Errc::NOT_FOUND) {
      fail("no process " + std::to_string(pid) + " is attached (see `agate ps`)");
      return EXIT_NO_SUCH_PROCESS;
    }
    return queryFailed("list caps", entries.error(), *s);
  }
  std::fputs((c.json ? capsJson(pid, *entries) : capsTable(pid, *entries)).c_str(), stdout);
  return EXIT_OK;
}

constexpr const char* HOME_HELP =
    "kernel home directory (default: $AGATE_HOME, $XDG_RUNTIME_DIR/agate, /tmp/agate-$UID)";
constexpr const char* JSON_HELP = "print JSON for tools instead of a table";

// --home (and --json for the queries) on a command; returns the --home option.
CLI::Option* addCommon(CLI::App& cmd, Common& c, bool json) {
  CLI::Option* home = cmd.add_option("--home", c.home, HOME_HELP)->type_name("DIR");
  if (json) cmd.add_flag("--json", c.json, JSON_HELP);
  return home;
}

// Prints a usage error the way every agate message looks, with where to read more; returns 64.
int usageError(const std::string& message, const std::string& more) {
  fail(message);
  std::fprintf(stderr, "%s\n", more.c_str());
  return EXIT_USAGE;
}

std::string quoted(const std::vector<std::string>& args) {
  std::string out;
  for (const std::string& a : args) out += (out.empty() ? "'" : ", '") + a + "'";
  return out;
}

// A CLI11 parse error as an agate message. CLI11's own text ("A subcommand is required", "The
// following arguments were not expected") is replaced where it does not name what was wrong.
int parseFailed(CLI::App& app, const CLI::ParseError& e) {
  if (e.get_exit_code() == 0) return app.exit(e);  // --help: the help text, exit 0
  // The command that was selected, if any: its --help lists the options that apply.
  const std::vector<CLI::App*> selected = app.get_subcommands();
  if (selected.empty()) {
    std::string commands;
    for (const CLI::App* cmd : app.get_subcommands([](const CLI::App*) { return true; }))
      commands += (commands.empty() ? "" : ", ") + cmd->get_name();
    const std::string more = "commands: " + commands + " (`agate --help` says more)";
    if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr) {
      // require_subcommand: nothing, or something that is no command, was given.
      const std::vector<std::string> left = app.remaining();
      if (left.empty()) return usageError("no command given", more);
      const std::string& first = left.front();
      return usageError(
          (first.starts_with("-") ? "unknown option '" : "unknown command '") + first + "'", more);
    }
    return usageError(e.what(), more);
  }
  const std::string name = selected.front()->get_name();
  const std::string more = "`agate " + name + " --help` lists its options";
  if (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr) {
    const std::vector<std::string> left = app.remaining(/*recurse=*/true);
    const bool options = std::all_of(left.begin(), left.end(),
                                     [](const std::string& a) { return a.starts_with("-"); });
    return usageError(std::string(options ? "unknown option" : "unexpected argument") +
                          (left.size() > 1 ? "s " : " ") + quoted(left) + " for `agate " + name +
                          "`",
                      more);
  }
  return usageError(e.what(), more);
}

int run(int argc, char** argv) {
  CLI::App app{"agate: start, stop and look into an Agate system"};
  app.footer(EXIT_CODES_FOOTER);
  app.require_subcommand(1);
  // Also accepted before the command (`agate --home D ps`); merged into the command's below.
  Common before;
  CLI::Option* homeBefore =
      app.add_option("--home", before.home, std::string(HOME_HELP) + "; also after the command")
          ->type_name("DIR");
  app.add_flag("--json", before.json,
               std::string(JSON_HELP) + " (ps, banks, caps); also after the command");

  UpOptions up;
  CLI::App* upCmd = app.add_subcommand("up", "start agate-kernel in the background");
  CLI::Option* upHome = addCommon(*upCmd, up.common, false);
  upCmd
      ->add_option("--timeout", up.timeoutSeconds,
                   "seconds to wait for it to be ready (default 10)")
      ->check(positiveSeconds())
      ->type_name("SECONDS");
  upCmd
      ->add_option("--kernel", up.kernel,
                   "agate-kernel executable (default: $AGATE_KERNEL, else beside agate)")
      ->type_name("PATH");
  upCmd
      ->add_option("--system-pages", up.systemPages,
                   "agate-kernel --system-pages: pages the kernel may hand out in all "
                   "(default: agate-kernel's)")
      ->check(kernel::positiveWholeNumber(" of pages", "PAGES"))
      ->type_name("N");
  upCmd
      ->add_option("--process-pages", up.processPages,
                   "agate-kernel --process-pages: each process bank's limit, in pages "
                   "(default: agate-kernel's)")
      ->check(kernel::positiveWholeNumber(" of pages", "PAGES"))
      ->type_name("N");
  upCmd
      ->add_option("--receive-caps", up.receiveCaps,
                   "agate-kernel --receive-caps: caps other processes may push into a new "
                   "process at once (default: agate-kernel's)")
      ->check(kernel::wholeNumberUpTo(kernel::CSpace::MAX_SLOTS, " of caps", "N"))
      ->type_name("N");

  DownOptions down;
  CLI::App* downCmd = app.add_subcommand("down", "stop the running agate-kernel");
  CLI::Option* downHome = addCommon(*downCmd, down.common, false);
  downCmd
      ->add_option("--timeout", down.timeoutSeconds, "seconds to wait for it to exit (default 10)")
      ->check(positiveSeconds())
      ->type_name("SECONDS");
  downCmd->add_flag("--force", down.force, "SIGKILL it if it has not exited by the timeout");

  Common ps;
  CLI::App* psCmd =
      app.add_subcommand("ps", "list the processes attached to the kernel and what each serves");
  CLI::Option* psHome = addCommon(*psCmd, ps, true);

  Common banks;
  CLI::App* banksCmd = app.add_subcommand("banks", "show the space bank tree with used/limit");
  CLI::Option* banksHome = addCommon(*banksCmd, banks, true);

  Common capsCommon;
  uint32_t capsPid = 0;
  CLI::App* capsCmd = app.add_subcommand("caps", "list one process's capabilities");
  capsCmd->add_option("PID", capsPid, "the process's kernel pid (the PID column of `agate ps`)")
      ->required();
  CLI::Option* capsHome = addCommon(*capsCmd, capsCommon, true);

  for (CLI::App* cmd : {upCmd, downCmd, psCmd, banksCmd, capsCmd}) cmd->footer(EXIT_CODES_FOOTER);

  // CLI11 reports parse errors by exception; they stop at this boundary.
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return parseFailed(app, e);
  }

  struct Chosen {
    CLI::App* cmd;
    Common& common;
    CLI::Option* home;
    bool json;  // takes --json
  };
  const Chosen chosen[] = {{upCmd, up.common, upHome, false},
                           {downCmd, down.common, downHome, false},
                           {psCmd, ps, psHome, true},
                           {banksCmd, banks, banksHome, true},
                           {capsCmd, capsCommon, capsHome, true}};
  for (const Chosen& c : chosen) {
    if (!c.cmd->parsed()) continue;
    const std::string more = "`agate " + c.cmd->get_name() + " --help` lists its options";
    if (homeBefore->count() > 0) {
      if (c.home->count() > 0 && c.common.home != before.home)
        return usageError(
            "--home given twice, as '" + before.home + "' and '" + c.common.home + "'", more);
      c.common.home = before.home;
    }
    if (before.json) {
      if (!c.json) return usageError("--json applies to ps, banks and caps only", more);
      c.common.json = true;
    }
  }
  if (upCmd->parsed()) return runUp(up);
  if (downCmd->parsed()) return runDown(down);
  if (psCmd->parsed()) return runPs(ps);
  if (banksCmd->parsed()) return runBanks(banks);
  if (capsCmd->parsed()) return runCaps(capsCommon, capsPid);
  return EXIT_USAGE;
}

}  // namespace
}  // namespace agate::tools

int main(int argc, char** argv) { return agate::tools::run(argc, argv); }
