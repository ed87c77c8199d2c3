// agate-kernel: the capability kernel daemon. See daemon.h for what it does and
// schemas/kernel.capnp for the protocol its processes speak.
//
//   agate-kernel [--home DIR] [--process-pages N] [--system-pages N] [--poll-us N]
//                [--attach-timeout-ms N] [--ready-fd FD]
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>

#include "agate/kernel/home.h"
#include "daemon.h"

int main(int argc, char** argv) {
  agate::kernel::daemon::DaemonOptions options;
  std::string home;
  CLI::App app{"agate-kernel: the Agate capability kernel daemon"};
  app.add_option("--home", home,
                 "directory of kernel.sock (default: $AGATE_HOME, $XDG_RUNTIME_DIR/agate, "
                 "/tmp/agate-$UID)");
  app.add_option("--system-pages", options.systemPages, "pages the kernel may hand out in all")
      ->check(CLI::PositiveNumber);
  app.add_option("--process-pages", options.processPages, "each process bank's limit, in pages")
      ->check(CLI::PositiveNumber);
  app.add_option("--poll-us", options.pollMicros,
                 "microseconds to keep polling the rings after the last call before sleeping");
  app.add_option("--attach-timeout-ms", options.attachTimeoutMs,
                 "milliseconds a new connection has to complete attach before it is closed")
      ->check(CLI::PositiveNumber);
  app.add_option("--ready-fd", options.readyFd,
                 "descriptor to write one byte to (then close) once the socket listens");
  CLI11_PARSE(app, argc, argv);
  options.home = agate::kernel::resolveKernelHome(home);

  auto daemon = agate::kernel::daemon::KernelDaemon::tryCreate(options);
  if (!daemon) {
    char buf[256];
    std::fprintf(stderr, "agate-kernel: %s: %s\n", options.home.c_str(),
                 daemon.error().describe(buf, sizeof(buf)));
    return 1;
  }
  agate::Status st = (*daemon)->run();
  if (!st) {
    char buf[256];
    std::fprintf(stderr, "agate-kernel: %s\n", st.error().describe(buf, sizeof(buf)));
    return 1;
  }
  return 0;
}
