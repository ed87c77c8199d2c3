// The objects of the handoff examples (agate-handoff over a LocalNetwork, agate-handoff-kernel
// through agate-kernel): A's Bank hands out Counters, B's Auditor calls the Counter it is given.
// The same servers run over both networks; only how the vats are joined differs.
#pragma once

#include <cstdint>
#include <memory>

#include "agate/rpc/connection.h"
#include "handoff.agate.h"

namespace handoff_example {

using agate::Promise;
using agate::Result;
using agate::Status;
using namespace handoff::stubs;

class CounterImpl final : public Counter::Server {
 public:
  Promise<void> add(AddContext context) override {
    total_ += context.params().getN();
    auto results = context.initResults();
    if (!results) return agate::readyPromise<void>(results.error());
    results->setTotal(total_);
    return agate::readyPromise<void>(Status{});
  }

 private:
  int64_t total_ = 0;
};

// Server A: hands out counters.
class BankImpl final : public Bank::Server {
 public:
  Promise<void> open(OpenContext context) override {
    auto results = context.initResults();
    if (!results) return agate::readyPromise<void>(results.error());
    // Owned by the connection from now on; a handoff shares it with the recipient's.
    return agate::readyPromise<void>(
        handoff::setCounter(context, *results, std::make_unique<CounterImpl>()));
  }
};

// Server B: calls the counter it is given TIMES times.
class AuditorImpl final : public Auditor::Server {
 public:
  Promise<void> audit(AuditContext context) override {
    Result<agate::rpc::typed::Received<Counter>> counter =
        handoff::getCounter(context, context.params());
    if (!counter) return agate::readyPromise<void>(counter.error());
    const uint32_t times = context.params().getTimes();
    // The counter is hosted by A: this vat reached A itself and calls it there.
    connection = counter->remote.cap().connection();
    return run(std::move(counter->remote), times, context);
  }
  agate::rpc::RpcConnection* connection = nullptr;  // the one the counter's calls went out on

 private:
  static Promise<void> run(Counter::Client counter, uint32_t times, AuditContext context) {
    int64_t total = 0;
    for (uint32_t i = 0; i < times; ++i) {
      auto added = co_await counter.add([](auto params) { params.setN(1); });
      if (!added) co_return added.error();
      total = added->results().getTotal();
    }
    auto results = context.initResults();
    if (!results) co_return results.error();
    results->setTotal(total);
    co_return {};
  }
};

}  // namespace handoff_example
