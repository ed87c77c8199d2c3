// agate-echo: the smallest typed Agate RPC service and its client, through agate-kernel.
//
//   agate-echo serve [--home DIR]           registers "echo" and serves until SIGTERM
//   agate-echo [--home DIR] [CALLS]         calls it CALLS times (default 1000)
//
// echo.capnp declares `interface Echo`; agate_generate_rpc() (cmake/AgateRpc.cmake) runs
// capnpc-c++ and capnpc-agate on it, giving echo.capnp.h (the structs) and echo.agate.h (the
// stubs). The server implements echo::stubs::Echo::Server (one per client: agate::serve makes it
// when the client's bushel opens); the client opens a bushel to "echo" and calls through
// echo::stubs::Echo::Client. Params are built in place in the request ring, results read in
// place in the reply ring. The client checks every reply and prints the median and p99 round
// trip; exit 0 only when every reply matched.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include <agate/agate.h>
#include "echo.agate.h"

namespace {

using agate::Errc;
using agate::Error;
using agate::Promise;
using agate::Result;

// One per client: `served` counts this client's calls.
class EchoServer final : public echo::stubs::Echo::Server {
 public:
  Promise<void> echo(EchoContext context) override {
    capnp::Text::Reader text = context.params().getText();
    auto results = context.initResults(text.size() + 64);
    if (!results) return agate::readyPromise<void>(results.error());
    results->setText(text);  // copied from the request frame into the reply frame
    results->setServed(served_++);
    return agate::readyPromise<void>(agate::Status{});
  }

 private:
  uint64_t served_ = 0;
};

Promise<void> callEcho(agate::Session& s, const agate::client::ProgramArgs& args) {
  const int calls = static_cast<int>(args.countAt(0, 1000));  // checked by optionalCount
  AGATE_CO_TRY(co_await s.waitForService("echo"));
  Result<echo::stubs::Echo::Client> echo = co_await s.open<echo::stubs::Echo>("echo");
  if (!echo) co_return echo.error();
  std::vector<int64_t> rtts;
  rtts.reserve(static_cast<size_t>(calls));
  for (int i = 0; i < calls; ++i) {
    const std::string text = fmt::format("message {}", i);
    const auto start = std::chrono::steady_clock::now();
    auto reply = co_await echo->echo([&](auto params) { params.setText(text); }, text.size() + 64);
    if (!reply) co_return reply.error();
    rtts.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::steady_clock::now() - start)
                       .count());
    if (std::string_view(reply->results().getText().cStr()) != text ||
        reply->results().getServed() != static_cast<uint64_t>(i))
      co_return Error(Errc::FAILED, "a reply did not match its call");
  }
  std::sort(rtts.begin(), rtts.end());
  fmt::print("agate-echo: {} typed echo call{} over a bushel to \"echo\", all replies matched\n",
             calls, calls == 1 ? "" : "s");
  fmt::print("  round trip: median {:.1f} us, p99 {:.1f} us\n", rtts[rtts.size() / 2] / 1e3,
             rtts[rtts.size() * 99 / 100] / 1e3);
  co_return {};
}

}  // namespace

int main(int argc, char** argv) {
  if (agate::client::takeMode(argc, argv, "serve"))
    return agate::serve<EchoServer>(argc, argv, "echo");
  const agate::client::ProgramSpec spec{
      .usage =
          "[--home DIR] [serve | CALLS]\n"
          "  serve        serve \"echo\" until SIGINT or SIGTERM\n"
          "  CALLS        echo calls to make and check (default 1000)",
      .check = agate::client::optionalCount("CALLS", 1'000'000'000)};
  return agate::run(argc, argv, spec, callEcho);
}
