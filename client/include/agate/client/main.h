// Program entry points: a client's main and a server's main in one line each.
//
//   Promise<void> session(client::Session& s) { ... co_await s.open<Calculator>("calculator") ... }
//   int main(int argc, char** argv) { return agate::run(argc, argv, session); }
//
//   int main(int argc, char** argv) { return agate::serve<CalculatorImpl>(argc, argv,
//   "calculator"); }
//
// Both understand `--home DIR` (else kernel::resolveKernelHome(): $AGATE_HOME, ...) and --help,
// refuse an unknown --option (exit 64), make the thread's EventLoop, attach to the kernel under
// the program's name, and print an error and return 1 when anything fails (naming the home, and
// the service a client waited for). Other arguments are left to the program (ProgramArgs); a
// server takes none. Both raise the descriptor limit to its hard limit (each bushel holds
// descriptors for as long as it lives).
//
// run: one Session; returns 0 when `body` succeeded.
// serve<T>: registers `name` and serves it until SIGTERM or SIGINT (then unregisters: the
// clients' pending calls fail DISCONNECTED) or until the kernel goes; one T per client, made
// with T(ServedClient&) when T has that constructor, else T(). Prints one line once registered
// ("NAME: serving") so that scripts can wait for it. Returns 0 after a signal, 1 otherwise.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "agate/client/service_host.h"
#include "agate/client/session.h"

namespace agate::client {

// The command line minus what run/serve consumed.
struct ProgramArgs {
  std::string program;  // argv[0]'s last component
  // The name the program attaches to the kernel under: `program` with every byte a kernel name
  // may not hold (outside printable ASCII) replaced by '_', cut to 64 bytes (kernel.capnp).
  std::string attachName;
  std::string home;               // resolved kernel home
  std::vector<std::string> rest;  // every other argument, in order
  bool help = false;              // --help or -h was given
  std::string mistake;            // what is wrong with the command line ("" when nothing)

  // rest[i] as a count (parseCount), or `fallback` when there is no rest[i] or it is not one
  // (a ProgramSpec::check such as optionalCount refuses that before the program runs).
  uint64_t countAt(size_t i, uint64_t fallback) const;
};
// Takes --home DIR (or --home=DIR) and --help/-h; any other argument starting with "--" is a
// mistake (a typo must not be taken for a positional argument), as is --home without a value.
ProgramArgs parseProgramArgs(int argc, char** argv);
// For a program that parses with parseProgramArgs itself: prints the usage line (help: on
// stdout, returns 0) or the mistake and the usage line (stderr, returns 64), or returns -1 when
// the program should go on. `usage`: what follows the program's name, e.g. "[--home DIR] [N]".
int answerProgramArgs(const ProgramArgs& args, std::string_view usage = "[--home DIR]");

// What a client program says about the arguments run() leaves it (ProgramArgs::rest).
struct ProgramSpec {
  // What follows the program's name in its usage line (--help, and after a mistake).
  std::string_view usage = "[--home DIR] [ARGUMENTS...]";
  // Checked before anything attaches: what is wrong with the arguments ("" when nothing). The
  // program then prints it and the usage line on stderr and returns 64.
  std::function<std::string(const ProgramArgs&)> check;
};

// A count from the command line: all of `text` in decimal, from 1 to `max`; nullopt for
// anything else ("", "abc", "12x", "-5", "0", or past `max`).
std::optional<uint64_t> parseCount(std::string_view text, uint64_t max = UINT32_MAX);

// A ProgramSpec::check for a program that takes at most one argument, a count named `name` in
// the usage line (e.g. "CALLS"), from 1 to `max`.
std::function<std::string(const ProgramArgs&)> optionalCount(std::string name,
                                                             uint64_t max = UINT32_MAX);

// Takes a mode word off the command line for a program that is client and server in one
// binary (`prog [--home DIR] serve`): when the first argument that is neither an option nor
// --home's value is `word`, removes it from argv (argc shrinks) and returns true.
bool takeMode(int& argc, char** argv, std::string_view word);

int runSession(int argc, char** argv, std::function<Promise<void>(Session&)> body);
int runSession(int argc, char** argv,
               std::function<Promise<void>(Session&, const ProgramArgs&)> body);
int runSession(int argc, char** argv, const ProgramSpec& spec,
               std::function<Promise<void>(Session&, const ProgramArgs&)> body);
int serveService(int argc, char** argv, std::string_view name, ClientFactory factory,
                 ServiceOptions options = {});

template <class T>
int serve(int argc, char** argv, std::string_view name, ServiceOptions options = {}) {
  static_assert(std::is_base_of_v<rpc::ServerObject, T>, "serve<T>: T must be a server object");
  return serveService(
      argc, argv, name,
      [](ServedClient& client) -> std::unique_ptr<rpc::ServerObject> {
        if constexpr (std::is_constructible_v<T, ServedClient&>) {
          return std::make_unique<T>(client);
        } else {
          return std::make_unique<T>();
        }
      },
      options);
}

}  // namespace agate::client
