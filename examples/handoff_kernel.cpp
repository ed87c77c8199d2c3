// agate-handoff-kernel: three-party handoff between processes, through agate-kernel. The same
// interfaces as agate-handoff (examples/handoff.capnp), one process per vat:
//
//   agate-handoff-kernel bank [--home DIR]          server A: "handoff-bank" hands out counters
//   agate-handoff-kernel auditor [--home DIR]       server B: "handoff-auditor" audits them
//   agate-handoff-kernel client [TIMES] [--home DIR]   client C
//
// C opens a counter at A and adds 5 twice without waiting, then passes the counter to B's
// audit(). C's network asks the kernel to introduce B to A's service (B gets a connect-only cap),
// A keeps the counter for B (Provide), B opens its own bushel to A, paid from B's bank, takes
// the counter (Accept) and calls it TIMES times directly, after C's two adds (E-order). C then
// reads the total: 10 + TIMES. The client exits 0 only when every result is right and no call
// went through C. The servers serve until SIGTERM (then unregister).
#include <fmt/core.h>

#include <memory>
#include <string>
#include <string_view>

#include "agate/agate.h"
#include "handoff.agate.h"
#include "handoff_objects.h"

namespace {

using agate::Errc;
using agate::Error;
using agate::EventLoop;
using agate::Promise;
using agate::Result;
using agate::Status;
using agate::client::KernelEvents;
using agate::client::KernelVats;
using agate::client::OpenedBushel;
using agate::client::ServiceOptions;
using agate::client::Session;
using agate::client::SessionOptions;
using namespace handoff::stubs;
using handoff_example::AuditorImpl;
using handoff_example::BankImpl;

struct Outcome {
  int64_t audited = 0;
  int64_t total = 0;
  uint64_t provides = 0;
  uint64_t introductions = 0;
  uint64_t callsThroughC = 0;
};

Promise<Outcome> client(Session& s, KernelVats& vats, uint32_t times) {
  AGATE_CO_TRY(co_await s.waitForService("handoff-bank"));
  AGATE_CO_TRY(co_await s.waitForService("handoff-auditor"));
  Result<OpenedBushel> toA = co_await s.openBushel("handoff-bank");
  if (!toA) co_return toA.error();
  Result<OpenedBushel> toB = co_await s.openBushel("handoff-auditor");
  if (!toB) co_return toB.error();
  Bank::Client bank(toA->connection->bootstrap());
  Auditor::Client auditor(toB->connection->bootstrap());
  auto opened = co_await bank.open();
  if (!opened) co_return opened.error();
  auto got = handoff::getCounter(*opened, opened->results());
  if (!got) co_return got.error();
  Counter::Client counter = std::move(got->remote);
  auto first = counter.add([](auto p) { p.setN(5); });
  auto second = counter.add([](auto p) { p.setN(5); });
  auto audit = co_await auditor.audit([&](auto params, auto& request) -> Status {
    params.setTimes(times);
    return handoff::setCounter(request, params, counter);
  });
  if (!audit) co_return audit.error();
  if (!co_await first || !co_await second) co_return Error(Errc::FAILED, "an add failed");
  auto read = co_await counter.add([](auto p) { p.setN(0); });
  if (!read) co_return read.error();
  co_return Outcome{audit->results().getTotal(), read->results().getTotal(),
                    toA->connection->stats().providesSent, vats.introductionsSent(),
                    toB->connection->stats().callsReceived};
}

int runClient(const agate::client::ProgramArgs& args) {
  const auto times = static_cast<uint32_t>(args.countAt(0, 100));  // checked in main
  EventLoop loop;
  auto kernel = agate::caps::KernelConnection::tryAttach(loop, args.home, args.attachName);
  if (!kernel) {
    fmt::print(stderr, "{}: attach to the kernel in {}: {}{}\n", args.program, args.home,
               agate::errcName(kernel.code()),
               kernel.code() == Errc::DISCONNECTED
                   ? fmt::format("; start one with `agate up --home {}`", args.home)
                   : std::string());
    return 1;
  }
  Result<Outcome> outcome = Error(Errc::FAILED, "not run");
  {
    KernelEvents events(**kernel);  // one router: the session and the vat share it
    KernelVats vats(events);
    SessionOptions options;
    options.network = &vats;
    Session session(events, options);
    outcome = loop.run(loop.deadline(client(session, vats, times), std::chrono::seconds(30)));
    vats.close();
  }
  if (!outcome) {
    fmt::print(stderr, "{}: {} ({})\n", args.program, agate::errcName(outcome.code()),
               outcome.error().detail != nullptr ? outcome.error().detail : "");
    return 1;
  }
  const int64_t expect = 10 + static_cast<int64_t>(times);
  fmt::print("{}: C passed A's counter to B through the kernel; B called it {} time{}\n",
             args.program, times, times == 1 ? "" : "s");
  fmt::print("  B's last total {} (C's two adds came first), final total {}\n", outcome->audited,
             outcome->total);
  fmt::print("  handoff: {} Provide from C to A, {} introduction of B to A, calls through C {}\n",
             outcome->provides, outcome->introductions, outcome->callsThroughC);
  const bool ok = outcome->audited == expect && outcome->total == expect &&
                  outcome->provides == 1 && outcome->introductions == 1 &&
                  outcome->callsThroughC == 0;
  if (!ok) {
    fmt::print(stderr, "{}: unexpected results\n", args.program);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ServiceOptions serve;
  serve.handoff = true;  // a vat of its own: it can take handed-off capabilities
  if (agate::client::takeMode(argc, argv, "bank"))
    return agate::serve<BankImpl>(argc, argv, "handoff-bank", serve);
  if (agate::client::takeMode(argc, argv, "auditor"))
    return agate::serve<AuditorImpl>(argc, argv, "handoff-auditor", serve);
  const bool client = agate::client::takeMode(argc, argv, "client");
  agate::client::ProgramArgs args = agate::client::parseProgramArgs(argc, argv);
  constexpr std::string_view USAGE =
      "[--home DIR] bank|auditor|client [TIMES]\n"
      "  bank, auditor   serve A's bank or B's auditor until SIGINT or SIGTERM\n"
      "  client          C: pass A's counter to B, which calls it TIMES times (default 100)";
  if (args.mistake.empty() && !args.help) {
    if (client) {
      args.mistake = agate::client::optionalCount("TIMES", 1'000'000)(args);
    } else {
      args.mistake =
          args.rest.empty() ? "a mode is needed" : fmt::format("unknown mode {}", args.rest[0]);
    }
  }
  if (int answered = agate::client::answerProgramArgs(args, USAGE); answered >= 0) return answered;
  return runClient(args);
}
