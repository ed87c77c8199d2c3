// agate-handoff: three-party handoff. A client (vat C) gets a Counter from server A's Bank,
// passes it to server B's Auditor, and B calls the Counter on A directly: not through C.
//
//   agate-handoff [TIMES]      (default 100: how many calls B makes on the counter)
//
// The three vats live in one process on one loop, joined by a LocalNetwork (pairs of LOCAL
// channels made on demand); a kernel-backed VatNetwork joins processes the same way. Steps:
//   1. C opens a counter at A and adds 5 twice, without waiting (the calls are in flight);
//      (a counter still pipelined on open() would be passed as a proxy through C instead: A
//      cannot provide an object it has not returned yet)
//   2. C passes the counter to B's audit(): A is told to keep it for B (Provide), B connects to
//      A and takes it (Accept), and B's calls go straight to A, after C's two (E-order);
//   3. C reads the total: 10 + TIMES. The program checks the order and that C forwarded no call.
// Exit 0 only when every result is right.
#include <fmt/core.h>

#include <charconv>
#include <memory>
#include <string_view>

#include "agate/rpc/local_network.h"
#include "handoff.agate.h"
#include "handoff_objects.h"

namespace {

using agate::Errc;
using agate::Error;
using agate::EventLoop;
using agate::Promise;
using agate::Result;
using agate::Status;
using agate::rpc::LocalNetwork;
using agate::rpc::RpcConnection;
using agate::rpc::VatId;
using namespace handoff::stubs;
using handoff_example::AuditorImpl;
using handoff_example::BankImpl;

constexpr const char* PROGRAM = "agate-handoff";
constexpr VatId VAT_A = 1, VAT_B = 2, VAT_C = 3;

Promise<int64_t> client(LocalNetwork& net, uint32_t times, int64_t& auditedTotal) {
  Bank::Client bank(net.connection(VAT_C, VAT_A).value()->bootstrap());
  Auditor::Client auditor(net.connection(VAT_C, VAT_B).value()->bootstrap());
  // 1. A counter at A; two calls in flight on it.
  auto opened = co_await bank.open();
  if (!opened) co_return opened.error();
  auto got = handoff::getCounter(*opened, opened->results());
  if (!got) co_return got.error();
  Counter::Client counter = std::move(got->remote);
  auto first = counter.add([](auto p) { p.setN(5); });
  auto second = counter.add([](auto p) { p.setN(5); });
  // 2. Hand it to B (B's calls reach A after these two).
  auto audited = auditor.audit([&](auto params, auto& request) -> Status {
    params.setTimes(times);
    return handoff::setCounter(request, params, counter);
  });
  auto audit = co_await audited;
  if (!audit) co_return audit.error();
  auditedTotal = audit->results().getTotal();
  if (!co_await first || !co_await second) co_return Error(Errc::FAILED, "an add failed");
  // 3. The total, read by C on its own reference.
  auto read = co_await counter.add([](auto p) { p.setN(0); });
  if (!read) co_return read.error();
  co_return read->results().getTotal();
}

}  // namespace

// TIMES from the command line (default 100), or 0 after printing the usage (`exit` says how).
uint32_t parseTimes(int argc, char** argv, int& exit) {
  constexpr std::string_view USAGE =
      "usage: {} [TIMES]\n  TIMES   calls B makes on A's counter, 1 to 1000000 (default 100)\n";
  const std::string_view arg = argc > 1 ? argv[1] : "";
  if (arg == "--help" || arg == "-h") {
    fmt::print(fmt::runtime(USAGE), PROGRAM);
    exit = 0;
    return 0;
  }
  if (argc == 1) return 100;
  uint32_t times = 0;
  auto [end, ec] = std::from_chars(arg.data(), arg.data() + arg.size(), times);
  if (argc > 2 || ec != std::errc() || end != arg.data() + arg.size() || times == 0 ||
      times > 1'000'000) {
    fmt::print(
        stderr, "{}: {}\n", PROGRAM,
        argc > 2 ? fmt::format("unexpected argument {}", argv[2])
                 : fmt::format("TIMES must be a whole number from 1 to 1000000, not \"{}\"", arg));
    fmt::print(stderr, fmt::runtime(USAGE), PROGRAM);
    exit = 64;
    return 0;
  }
  return times;
}

int main(int argc, char** argv) {
  int exit = 0;
  const uint32_t times = parseTimes(argc, argv, exit);
  if (times == 0) return exit;
  EventLoop loop;
  BankImpl bank;
  AuditorImpl auditor;
  int64_t audited = 0;
  Result<int64_t> total = Error(Errc::FAILED, "not run");
  uint64_t provides = 0, accepts = 0, callsAtC = 0, callsAtAFromB = 0;
  bool direct = false;
  {
    LocalNetwork net(loop);
    net.addVat(VAT_A, &bank);
    net.addVat(VAT_B, &auditor);
    net.addVat(VAT_C, nullptr);
    total = loop.run(client(net, times, audited));
    if (total) {
      RpcConnection* bToA = net.connection(VAT_B, VAT_A).value();
      direct = auditor.connection == bToA;
      provides = net.connection(VAT_C, VAT_A).value()->stats().providesSent;
      accepts = net.connection(VAT_A, VAT_B).value()->stats().acceptsReceived;
      callsAtAFromB = net.connection(VAT_A, VAT_B).value()->stats().callsReceived;
      callsAtC = net.connection(VAT_C, VAT_B).value()->stats().callsReceived;
    }
  }
  if (!total) {
    fmt::print(stderr, "{}: {} ({})\n", PROGRAM, agate::errcName(total.code()),
               total.error().detail != nullptr ? total.error().detail : "");
    return 1;
  }
  fmt::print("{}: C passed A's counter to B; B called it {} time{}\n", PROGRAM, times,
             times == 1 ? "" : "s");
  fmt::print("  B's last total {} (C's two adds came first), final total {}\n", audited, *total);
  fmt::print(
      "  handoff: {} Provide from C to A, {} Accept from B at A; B->A calls {}, calls "
      "through C {}\n",
      provides, accepts, callsAtAFromB, callsAtC);
  const bool ok = direct && audited == 10 + static_cast<int64_t>(times) &&
                  *total == 10 + static_cast<int64_t>(times) && provides == 1 && accepts == 1 &&
                  callsAtAFromB == times && callsAtC == 0;
  if (!ok) {
    fmt::print(stderr, "{}: unexpected results\n", PROGRAM);
    return 1;
  }
  return 0;
}
