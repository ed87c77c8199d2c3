// agate-kernel: the capability kernel daemon. See daemon.h for what it does and
// schemas/kernel.capnp for the protocol its processes speak.
//
//   agate-kernel [--home DIR] [--process-pages N] [--system-pages N] [--receive-caps N]
//                [--poll-us N] [--attach-timeout-ms N] [--ready-fd FD]
//
// `--help` shows each option's default. A usage error prints one "agate-kernel: ..." line and
// exits 64 (sysexits.h EX_USAGE, as `agate` does); a failure to start or to serve exits 1.
#include <unistd.h>

#include <charconv>
#include <cstdint>
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>

#include "agate/kernel/cli_checks.h"
#include "agate/kernel/home.h"
#include "daemon.h"

namespace {

constexpr int EXIT_USAGE = 64;  // sysexits.h EX_USAGE

}  // namespace

int main(int argc, char** argv) {
  agate::kernel::daemon::DaemonOptions options;
  std::string home;
  CLI::App app{"agate-kernel: the Agate capability kernel daemon"};
  app.option_defaults()->always_capture_default();
  app.add_option("--home", home,
                 "directory of kernel.sock (default: $AGATE_HOME, $XDG_RUNTIME_DIR/agate, "
                 "/tmp/agate-$UID)")
      ->type_name("DIR");
  app.add_option("--system-pages", options.systemPages, "pages the kernel may hand out in all")
      ->check(agate::kernel::positiveWholeNumber("", "N"))
      ->type_name("N");
  app.add_option("--process-pages", options.processPages, "each process bank's limit, in pages")
      ->check(agate::kernel::positiveWholeNumber("", "N"))
      ->type_name("N");
  app.add_option("--receive-caps", options.receiveCaps,
                 "caps other processes may push into a new process at once (it may change it)")
      ->check(agate::kernel::wholeNumberUpTo(agate::kernel::CSpace::MAX_SLOTS, "", "N"))
      ->type_name("N");
  app.add_option("--poll-us", options.pollMicros,
                 "microseconds to keep polling the rings after the last call before sleeping")
      ->type_name("N");
  app.add_option("--attach-timeout-ms", options.attachTimeoutMs,
                 "milliseconds a new connection has to complete attach before it is closed")
      ->check(agate::kernel::positiveWholeNumber("", "N"))
      ->type_name("N");
  app.add_option("--ready-fd", options.readyFd,
                 "descriptor to write one byte to (then close) once the socket listens; -1: none")
      ->type_name("FD");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::string message = e.what();
    if (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr) {
      // CLI11's "The following argument was not expected" does not say it is an unknown option.
      message.clear();
      for (const std::string& arg : app.remaining())
        message +=
            (message.empty() ? "" : ", ") +
            std::string(arg.starts_with("-") ? "unknown option '" : "unexpected argument '") + arg +
            "'";
    }
    std::fprintf(stderr, "agate-kernel: %s\n`agate-kernel --help` lists its options\n",
                 message.c_str());
    return EXIT_USAGE;
  }
  options.home = agate::kernel::resolveKernelHome(home);

  auto daemon = agate::kernel::daemon::KernelDaemon::tryCreate(options);
  if (!daemon) {
    char buf[256];
    std::fprintf(stderr, "agate-kernel: %s: %s\n", options.home.c_str(),
                 daemon.error().describe(buf, sizeof(buf)));
    return 1;
  }
  if (options.readyFd < 0) {
    // Started by hand (`agate up` passes --ready-fd and says this itself): say it is up.
    std::fprintf(
        stderr,
        "agate-kernel: listening in %s (pid %d); stop with Ctrl-C or `agate down --home %s`\n",
        options.home.c_str(), static_cast<int>(::getpid()), options.home.c_str());
  }
  agate::Status st = (*daemon)->run();
  if (!st) {
    char buf[256];
    std::fprintf(stderr, "agate-kernel: %s\n", st.error().describe(buf, sizeof(buf)));
    return 1;
  }
  return 0;
}
