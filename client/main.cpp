#include "agate/client/main.h"

#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <optional>
#include <utility>

#include "agate/client/kernel_events.h"
#include "agate/client/kernel_vats.h"
#include "agate/kernel/home.h"
#include "agate/runtime/fd.h"
#include "kernel.capnp.h"

namespace agate::client {
namespace {

// One line on stderr: "PROGRAM: WHAT: error (the kernel's detail)[; hint]". Returns 1.
int report(const ProgramArgs& args, std::string_view what, const Error& e,
           const caps::KernelConnection* kernel = nullptr, std::string_view hint = {}) {
  char buf[256];
  fmt::print(stderr, "{}: {}: {}", args.program, what, e.describe(buf, sizeof buf));
  if (kernel != nullptr && !kernel->lastErrorDetail().empty() && e.code != Errc::DISCONNECTED)
    fmt::print(stderr, " ({})", kernel->lastErrorDetail());
  if (!hint.empty()) fmt::print(stderr, "; {}", hint);
  fmt::print(stderr, "\n");
  return 1;
}

// A failed attach names the home, and how to start a kernel there when none runs.
int reportAttach(const ProgramArgs& args, const Error& e) {
  const std::string what = fmt::format("attach to the kernel in {}", args.home);
  if (e.code != Errc::DISCONNECTED) return report(args, what, e);
  return report(args, what, e, nullptr,
                fmt::format("start one with `agate up --home {}`", args.home));
}

// Every bushel a program serves or opens holds descriptors (its two rings; an event stream up to
// four more) for as long as it lives, and a descriptor-passing packet that finds the table full
// is cut short (its call fails, its client is refused): take every descriptor the hard limit
// allows, as agate-kernel does, so that the usual soft limit of 1024 is not what bounds the
// clients a server takes.
void raiseDescriptorLimit() noexcept {
  rlimit nofile{};
  if (::getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    (void)::setrlimit(RLIMIT_NOFILE, &nofile);
  }
}

// Ends the host's run() at the first SIGTERM or SIGINT (read from a signalfd on the loop).
Promise<void> stopOnSignal(EventLoop& loop, int fd, ServiceHost& host) {
  Result<uint32_t> ready = co_await loop.waitReady(fd, POLLIN);
  if (!ready) co_return ready.error();
  host.stop();
  co_return {};
}

Promise<void> serveUntilStopped(caps::KernelConnection& kernel, std::string name,
                                ClientFactory factory, ServiceOptions options, int signalFd) {
  KernelEvents events(kernel);
  std::optional<KernelVats> vats;
  if (options.handoff && options.network == nullptr) options.network = &vats.emplace(events);
  Result<std::unique_ptr<ServiceHost>> host =
      co_await ServiceHost::create(events, name, std::move(factory), options);
  if (!host) co_return host.error();
  fmt::print("{}: serving\n", name);
  std::fflush(stdout);
  Status served;
  {
    Promise<void> signals = stopOnSignal(kernel.loop(), signalFd, **host);
    served = co_await (*host)->run();
  }
  if (vats) vats->close();  // every connection of the vat, before any of them goes
  host->reset();
  co_return served;
}

}  // namespace

ProgramArgs parseProgramArgs(int argc, char** argv) {
  ProgramArgs out;
  const std::string_view argv0 = argc > 0 ? argv[0] : "agate";
  const size_t slash = argv0.rfind('/');
  out.program = std::string(slash == std::string_view::npos ? argv0 : argv0.substr(slash + 1));
  out.attachName = out.program.substr(0, wire::MAX_NAME_BYTES);
  for (char& c : out.attachName)
    if (c < 0x20 || c > 0x7e) c = '_';
  if (out.attachName.empty()) out.attachName = "agate";
  std::string home;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--home") {
      if (i + 1 == argc) {
        out.mistake = "--home needs a directory";
        break;
      }
      home = argv[++i];
    } else if (a.starts_with("--home=")) {
      home = std::string(a.substr(7));
    } else if (a == "--help" || a == "-h") {
      out.help = true;
    } else if (a.starts_with("--")) {
      if (out.mistake.empty()) out.mistake = fmt::format("unknown option {}", a);
    } else {
      out.rest.emplace_back(a);
    }
  }
  out.home = kernel::resolveKernelHome(home);
  return out;
}

int answerProgramArgs(const ProgramArgs& args, std::string_view usage) {
  constexpr std::string_view HOME_HELP =
      "  --home DIR   the kernel's home (default: $AGATE_HOME, else $XDG_RUNTIME_DIR/agate, else "
      "/tmp/agate-$UID)\n";
  if (args.help) {
    fmt::print("usage: {} {}\n{}", args.program, usage, HOME_HELP);
    return 0;
  }
  if (!args.mistake.empty()) {
    fmt::print(stderr, "{}: {}\nusage: {} {}\n{}", args.program, args.mistake, args.program, usage,
               HOME_HELP);
    return 64;
  }
  return -1;
}

std::optional<uint64_t> parseCount(std::string_view text, uint64_t max) {
  if (text.empty() || text.size() > 20) return std::nullopt;
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    const uint64_t digit = static_cast<uint64_t>(c - '0');
    if (digit > max || value > (max - digit) / 10) return std::nullopt;  // value*10+digit > max
    value = value * 10 + digit;
  }
  if (value == 0) return std::nullopt;
  return value;
}

uint64_t ProgramArgs::countAt(size_t i, uint64_t fallback) const {
  if (i >= rest.size()) return fallback;
  return parseCount(rest[i]).value_or(fallback);
}

std::function<std::string(const ProgramArgs&)> optionalCount(std::string name, uint64_t max) {
  return [name = std::move(name), max](const ProgramArgs& args) -> std::string {
    if (args.rest.size() > 1) return fmt::format("unexpected argument {}", args.rest[1]);
    if (!args.rest.empty() && !parseCount(args.rest[0], max))
      return fmt::format("{} must be a whole number from 1 to {}, not \"{}\"", name, max,
                         args.rest[0]);
    return "";
  };
}

bool takeMode(int& argc, char** argv, std::string_view word) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--home") {
      ++i;  // its value
      continue;
    }
    // Options as parseProgramArgs takes them: "--..." and -h; "-5" is an argument.
    if (a.starts_with("--") || a == "-h") continue;
    if (a != word) return false;
    for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
    argv[--argc] = nullptr;
    return true;
  }
  return false;
}

int runSession(int argc, char** argv,
               std::function<Promise<void>(Session&, const ProgramArgs&)> body) {
  return runSession(argc, argv, ProgramSpec{}, std::move(body));
}

int runSession(int argc, char** argv, const ProgramSpec& spec,
               std::function<Promise<void>(Session&, const ProgramArgs&)> body) {
  ProgramArgs args = parseProgramArgs(argc, argv);
  if (args.mistake.empty() && !args.help && spec.check) args.mistake = spec.check(args);
  if (int answered = answerProgramArgs(args, spec.usage); answered >= 0) return answered;
  raiseDescriptorLimit();
  EventLoop loop;
  auto kernel = caps::KernelConnection::tryAttach(loop, args.home, args.attachName);
  if (!kernel) return reportAttach(args, kernel.error());
  Status done;
  std::string service;
  {
    Session session(**kernel);
    done = loop.run(body(session, args));
    service = session.lastServiceName();
  }
  if (!done) {
    if (!service.empty() && (done.code() == Errc::NOT_FOUND || done.code() == Errc::TIMED_OUT)) {
      // The kernel's own detail would say the same again ("no service by that name").
      return report(args, "session", done.error(), nullptr,
                    fmt::format("no service \"{}\" is registered in {}: is its server running?",
                                service, args.home));
    }
    return report(args, "session", done.error(), kernel->get());
  }
  return 0;
}

int runSession(int argc, char** argv, std::function<Promise<void>(Session&)> body) {
  return runSession(argc, argv,
                    [&](Session& s, const ProgramArgs&) -> Promise<void> { return body(s); });
}

int serveService(int argc, char** argv, std::string_view name, ClientFactory factory,
                 ServiceOptions options) {
  const ProgramArgs args = parseProgramArgs(argc, argv);
  if (int answered = answerProgramArgs(args); answered >= 0) return answered;
  raiseDescriptorLimit();
  if (!args.rest.empty()) {
    fmt::print(stderr, "{}: unexpected argument {} (a server takes only --home)\n", args.program,
               args.rest.front());
    return 64;
  }
  // SIGTERM and SIGINT arrive on a signalfd the loop waits on (blocked for normal delivery).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &signals, nullptr) != 0)
    return report(args, "block SIGTERM/SIGINT", Error::fromErrno(errno, "sigprocmask"));
  Fd signalFd(::signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!signalFd.valid()) return report(args, "signalfd", Error::fromErrno(errno, "signalfd"));

  EventLoop loop;
  auto kernel = caps::KernelConnection::tryAttach(loop, args.home, args.attachName);
  if (!kernel) return reportAttach(args, kernel.error());
  Status served = loop.run(
      serveUntilStopped(**kernel, std::string(name), std::move(factory), options, signalFd.get()));
  if (!served) {
    std::string hint;
    if (served.code() == Errc::ALREADY_EXISTS)
      hint = fmt::format("another process serves \"{}\" in {} (see `agate ps --home {}`)", name,
                         args.home, args.home);
    return report(args, fmt::format("serve \"{}\"", name), served.error(), kernel->get(), hint);
  }
  return 0;
}

}  // namespace agate::client
