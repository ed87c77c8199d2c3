// agate-echo: a typed RPC server and its client in two processes.
//
//   agate-echo [CALLS]      (default 1000)
//
// echo.capnp declares `interface Echo`; agate_generate_rpc() (cmake/AgateRpc.cmake) runs
// capnpc-c++ and capnpc-agate on it, giving echo.capnp.h (the structs) and echo.agate.h (the
// stubs). The server implements echo::stubs::Echo::Server; the client calls through
// echo::stubs::Echo::Client. Params are built in place in the request ring, results read in
// place in the reply ring.
//
// The process makes a bushel-shaped pair of SHARED channels, forks the server, and runs CALLS
// echo calls, checking every reply; it prints the median and p99 round trip. Exit 0 only when
// every reply matched and the server ended cleanly once the client hung up.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include "echo.agate.h"
#include "example_process.h"

namespace {

using agate::Errc;
using agate::Error;
using agate::EventLoop;
using agate::Promise;
using agate::examples::Bushel;
using agate::examples::BushelEnd;
using agate::rpc::RpcConnection;
using agate::rpc::RpcOptions;

constexpr const char* PROGRAM = "agate-echo";

// Runs on the server process's loop; one object serves every call.
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

// The server process: serves until the client hangs up. 0 when it ended that way.
int serve(const Bushel& bushel, pid_t client) {
  BushelEnd end(PROGRAM, bushel, BushelEnd::Side::SERVER, client);
  EventLoop loop;
  EchoServer server;
  RpcOptions options;
  options.bootstrap = &server;
  RpcConnection connection(end.tx(), end.rx(), loop, options);
  agate::Status ended = loop.run(connection.onDisconnect());
  return ended.code() == Errc::DISCONNECTED ? 0 : 3;
}

Promise<void> callEcho(echo::stubs::Echo::Client echo, int calls, std::vector<int64_t>& rtts) {
  for (int i = 0; i < calls; ++i) {
    const std::string text = fmt::format("message {}", i);
    const auto start = std::chrono::steady_clock::now();
    auto reply = co_await echo.echo([&](auto params) { params.setText(text); }, text.size() + 64);
    if (!reply) co_return reply.error();
    rtts.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::steady_clock::now() - start)
                       .count());
    if (std::string_view(reply->results().getText().cStr()) != text ||
        reply->results().getServed() != static_cast<uint64_t>(i))
      co_return Error(Errc::FAILED, "a reply did not match its call");
  }
  co_return {};
}

}  // namespace

int main(int argc, char** argv) {
  const int calls = argc > 1 ? std::max(1, std::atoi(argv[1])) : 1000;
  Bushel bushel = Bushel::create(PROGRAM);
  const pid_t parent = ::getpid();
  const pid_t server = agate::examples::forkChild(
      PROGRAM, [&] { return serve(bushel, parent); }, /*watchdogSeconds=*/60);
  ::alarm(60);  // the client's watchdog

  std::vector<int64_t> rtts;
  rtts.reserve(static_cast<size_t>(calls));
  agate::Status done;
  {
    BushelEnd end(PROGRAM, bushel, BushelEnd::Side::CLIENT, server);
    EventLoop loop;
    RpcConnection connection(end.tx(), end.rx(), loop);
    echo::stubs::Echo::Client echo(connection.bootstrap());
    done = loop.run(callEcho(std::move(echo), calls, rtts));
  }  // hanging up ends the server
  const int serverStatus = agate::examples::reap(server);
  if (!done) agate::examples::die(PROGRAM, "echo", done.error());
  if (serverStatus != 0) {
    fmt::print(stderr, "{}: the server exited with status {}\n", PROGRAM, serverStatus);
    return 1;
  }
  std::sort(rtts.begin(), rtts.end());
  fmt::print("{}: {} typed echo calls across two processes, all replies matched\n", PROGRAM, calls);
  fmt::print("  round trip: median {:.1f} us, p99 {:.1f} us\n", rtts[rtts.size() / 2] / 1e3,
             rtts[rtts.size() * 99 / 100] / 1e3);
  return 0;
}
