// agate-ticker: a server publishing events to its clients, and a client reading them as an
// async stream of coalesced batches, through agate-kernel.
//
//   agate-ticker serve [--home DIR]          registers "ticker" and serves until SIGTERM
//   agate-ticker [--home DIR] [BATCHES]      subscribes, reads BATCHES batches (default 20)
//
// ticker.capnp's subscribe returns an Events.EventStream. The server (one TickerServer per
// client) makes an EventPublisher for the caller — an event buffer the client pays for, its
// read-only cap moved to the client through the kernel — and then posts a quote into every
// symbol's slot every 100 microseconds; the posts of one loop turn cost one ring. The client
// opens the stream (the handle is checked against the kernel before it is mapped) and awaits
// batches: each holds the symbols whose quote changed, once, with the latest quote and how many
// posts it stands for. A client that reads slowly sees fewer, more coalesced updates; it never
// falls behind. Exit 0 when every quote read was well formed and the counts add up.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>

#include <agate/agate.h>
#include "ticker.agate.h"

namespace {

using agate::Errc;
using agate::Error;
using agate::Promise;
using agate::Result;
using namespace std::chrono_literals;

// One slot's value (trivially copyable, at most 56 bytes).
struct Quote {
  uint64_t tick = 0;   // the server's round, for this symbol
  double price = 0;    // a made-up price
  uint64_t check = 0;  // tick ^ CHECK: a reader can tell a well-formed quote
};
constexpr uint64_t CHECK = 0x7ac4e7ac4e7ac4e7ull;
constexpr uint32_t SYMBOLS = 8;  // the client's subscription

class TickerServer final : public ticker::stubs::Ticker::Server {
 public:
  explicit TickerServer(agate::ServedClient& client) : client_(client) {}

  Promise<void> subscribe(SubscribeContext context) override {
    const uint32_t symbols = context.params().getSymbols();
    if (symbols == 0 || symbols > 64) co_return Error(Errc::INVALID_ARGUMENT, "1 to 64 symbols");
    if (publisher_) co_return Error(Errc::ALREADY_EXISTS, "subscribed already");
    auto publisher = co_await agate::EventPublisher::create(client_, symbols);
    if (!publisher) co_return publisher.error();  // e.g. QUOTA_EXCEEDED: the client cannot pay
    auto results = context.initResults();
    if (!results) co_return results.error();
    (*publisher)->describe(results->initEvents());
    publisher_ = std::move(*publisher);
    feed_.emplace(feed());
    co_return {};
  }

 private:
  // Posts a quote into every slot each round, until this client's object goes.
  Promise<void> feed() {
    for (uint64_t tick = 1;; ++tick) {
      for (uint32_t symbol = 0; symbol < publisher_->slots(); ++symbol) {
        const double price = 100.0 + symbol + static_cast<double>(tick % 1000) / 100.0;
        publisher_->post(symbol, Quote{tick, price, tick ^ CHECK});
      }
      AGATE_CO_TRY(co_await agate::EventLoop::current()->sleep(100us));
    }
  }

  agate::ServedClient& client_;
  std::unique_ptr<agate::EventPublisher> publisher_;
  std::optional<Promise<void>> feed_;  // after publisher_: stops before it goes
};

Promise<void> watch(agate::Session& s, const agate::client::ProgramArgs& args) {
  const int batches = static_cast<int>(args.countAt(0, 20));  // checked by optionalCount
  AGATE_CO_TRY(co_await s.waitForService("ticker"));
  Result<ticker::stubs::Ticker::Client> ticker = co_await s.open<ticker::stubs::Ticker>("ticker");
  if (!ticker) co_return ticker.error();
  Result<agate::EventStream> stream = co_await agate::EventStream::subscribe(
      s, *ticker, ticker->subscribe([](auto p) { p.setSymbols(SYMBOLS); }));
  if (!stream) co_return stream.error();

  uint64_t updates = 0;
  uint64_t posts = 0;
  uint64_t lastTick[SYMBOLS] = {};
  for (int b = 0; b < batches; ++b) {
    Result<agate::EventBatch> batch = co_await stream->next(5s);
    if (!batch) co_return batch.error();
    for (const agate::EventUpdate& u : batch->updates) {
      const Quote q = u.as<Quote>();
      // Well formed, and each symbol's tick only goes up, by the posts it stands for.
      if (q.check != (q.tick ^ CHECK) || q.tick != lastTick[u.slot] + u.coalesced)
        co_return Error(Errc::FAILED, "a quote did not match its count");
      lastTick[u.slot] = q.tick;
      ++updates;
      posts += u.coalesced;
    }
    if (b < 3 || b == batches - 1)
      fmt::print("batch {}: {} symbols changed, symbol 0 at tick {} (price {:.2f})\n", b,
                 batch->updates.size(), lastTick[0], 100.0 + (lastTick[0] % 1000) / 100.0);
    (void)co_await s.loop().sleep(1ms);  // a slow reader: the server posts about 10 rounds
  }
  fmt::print("agate-ticker: {} batches, {} updates standing for {} posts, every quote matched\n",
             batches, updates, posts);
  co_return {};
}

}  // namespace

int main(int argc, char** argv) {
  if (agate::client::takeMode(argc, argv, "serve"))
    return agate::serve<TickerServer>(argc, argv, "ticker");
  const agate::client::ProgramSpec spec{
      .usage =
          "[--home DIR] [serve | BATCHES]\n"
          "  serve        serve \"ticker\" until SIGINT or SIGTERM\n"
          "  BATCHES      batches of quotes to read and check (default 20)",
      .check = agate::client::optionalCount("BATCHES", 1'000'000'000)};
  return agate::run(argc, argv, spec, watch);
}
