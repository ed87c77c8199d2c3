// agate-calculator: Cap'n Proto's calculator example on Agate's typed RPC, as a client of the
// "calculator" service (agate-calculator-server) through agate-kernel, with promise pipelining.
//
//   agate-calculator [--home DIR] [ITERATIONS]      (default 2000, for the round-trip timing)
//
// agate::run (client/, <agate/agate.h>) attaches to the kernel and gives the program a Session;
// s.open<Calculator>("calculator") opens a bushel to the service, paid from this process's bank,
// and returns the server's bootstrap object as a typed client. Then:
//   1. evaluates a literal and reads it through the pipelined Value: one round trip;
//   2. as Cap'n Proto's own calculator client does: fetches `add` and `multiply`, evaluates
//      4 * 6, then (4 * 6) + 3 and (4 * 6) + 5 on that product, and reads both, all in one
//      round trip: the operators and the product's Value go back to the server still pipelined
//      (CapDescriptor.receiverAnswer), and the server finds its own objects in them;
//   2b. fetches `add` and `multiply` (awaited) and evaluates an expression calling `add`;
//   3. passes a function of its own (pow) inside an expression: the server calls back into the
//      client while it evaluates;
//   4. defines f(x, y) = x * 100 + y on the server and calls it;
//   5. times the chain evaluate -> read, pipelined (both calls leave at once) against awaited
//      (read sent after evaluate's answer), and prints the round trips each took.
// Exit 0 only when every result is right and the pipelined chain really went out in one trip.
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <utility>
#include <vector>

#include <agate/agate.h>
#include "calculator.agate.h"

namespace {

using agate::Errc;
using agate::Error;
using agate::Promise;
using agate::Result;
using agate::Status;
using agate::rpc::RpcConnection;
using Calculator = calc::stubs::Calculator;
using Expression = calc::Calculator::Expression;

constexpr const char* PROGRAM = "agate-calculator";

// A function the client hosts and passes to the server inside an expression.
class PowFunction final : public Calculator::Function::Server {
 public:
  Promise<void> call(CallContext context) override {
    auto params = context.params().getParams();
    if (params.size() != 2)
      return agate::readyPromise<void>(Error(Errc::INVALID_ARGUMENT, "pow takes 2 params"));
    const double value = std::pow(params[0], params[1]);
    auto results = context.initResults();
    if (!results) return agate::readyPromise<void>(results.error());
    results->setValue(value);
    ++calls;
    return agate::readyPromise<void>(Status{});
  }
  int calls = 0;
};

Status expect(double got, double want, const char* what) {
  if (std::fabs(got - want) > 1e-9) {
    fmt::print(stderr, "{}: {} = {}, expected {}\n", PROGRAM, what, got, want);
    return Error(Errc::FAILED, "wrong result");
  }
  fmt::print("  {} = {}\n", what, got);
  return {};
}

// Builds call(function, literal a, literal b) into `e`.
template <class Request>
Status buildCall(Request& request, Expression::Builder e,
                 agate::rpc::typed::CapArg<Calculator::Function> function, double a, double b) {
  auto call = e.initCall();
  AGATE_TRY(setFunction(request, call, std::move(function)));
  auto params = call.initParams(2);
  params[0].setLiteral(a);
  params[1].setLiteral(b);
  return {};
}

Promise<Calculator::Function::Client> fetchOperator(Calculator::Client calculator,
                                                    calc::Calculator::Operator op) {
  auto r = co_await calculator.getOperator([&](auto params) { params.setOp(op); });
  if (!r) co_return r.error();
  auto func = getFunc(*r, r->results());
  if (!func) co_return func.error();
  co_return func->remote;
}

// evaluate(x) -> read(), pipelined: both calls leave before any answer. Checks that they did.
Promise<double> pipelinedChain(Calculator::Client calculator, RpcConnection& connection, double x,
                               int& roundTrips) {
  const uint64_t returnsBefore = connection.stats().returnsReceived;
  const uint64_t callsBefore = connection.stats().callsSent;
  // The evaluate promise stays alive until the read answered: dropping it (and the Value)
  // would send Finish and could cancel the evaluate the read is queued on.
  auto evaluated = calculator.evaluate([&](auto params) { params.initExpression().setLiteral(x); });
  auto read = evaluated.getValue().read();
  if (connection.stats().callsSent - callsBefore != 2 ||
      connection.stats().returnsReceived != returnsBefore)
    co_return Error(Errc::FAILED, "the pipelined call waited for the first answer");
  ++roundTrips;
  auto r = co_await read;
  if (!r) co_return r.error();
  co_return r->results().getValue();
}

// The same chain awaited: read() is sent only once evaluate's answer (the Value) is back.
Promise<double> awaitedChain(Calculator::Client calculator, double x, int& roundTrips) {
  Calculator::Value::Client value;
  {
    ++roundTrips;
    auto evaluated =
        co_await calculator.evaluate([&](auto params) { params.initExpression().setLiteral(x); });
    if (!evaluated) co_return evaluated.error();
    auto v = getValue(*evaluated, evaluated->results());
    if (!v) co_return v.error();
    value = std::move(v->remote);
  }
  ++roundTrips;
  auto r = co_await value.read();
  if (!r) co_return r.error();
  co_return r->results().getValue();
}

Promise<void> session(agate::Session& s, const agate::client::ProgramArgs& args, PowFunction& pow) {
  const int iterations = static_cast<int>(args.countAt(0, 2000));  // checked by optionalCount
  // The server may still be starting (README line 1 starts it just before this client).
  AGATE_CO_TRY(co_await s.waitForService("calculator"));
  // A bushel to "calculator", paid from this process's bank; its bootstrap object, typed.
  Result<Calculator::Client> opened = co_await s.open<Calculator>("calculator");
  if (!opened) co_return opened.error();
  Calculator::Client calculator = std::move(*opened);
  RpcConnection& connection = *calculator.cap().connection();
  fmt::print("{}: Cap'n Proto's calculator, over a bushel agate-kernel opened to \"calculator\"\n",
             PROGRAM);

  // 1. A literal, read through the pipelined Value.
  int trips = 0;
  Result<double> literal = co_await pipelinedChain(calculator, connection, 123, trips);
  if (!literal) co_return literal.error();
  AGATE_CO_TRY(expect(*literal, 123, "evaluate(123).value.read()"));

  // 2. Everything pipelined: seven calls, one round trip.
  {
    const uint64_t returnsBefore = connection.stats().returnsReceived;
    const uint64_t callsBefore = connection.stats().callsSent;
    auto addOp =
        calculator.getOperator([](auto params) { params.setOp(calc::Calculator::Operator::ADD); });
    auto multiplyOp = calculator.getOperator(
        [](auto params) { params.setOp(calc::Calculator::Operator::MULTIPLY); });
    auto product = calculator.evaluate([&](auto params, auto& request) {
      return buildCall(request, params.initExpression(), multiplyOp.getFunc(), 4, 6);
    });
    auto plus = [&](double addend) {
      return calculator.evaluate([&, addend](auto params, auto& request) -> Status {
        auto call = params.initExpression().initCall();
        AGATE_TRY(setFunction(request, call, addOp.getFunc()));
        auto operands = call.initParams(2);
        AGATE_TRY(setPreviousResult(request, operands[0], product.getValue()));
        operands[1].setLiteral(addend);
        return {};
      });
    };
    auto plus3 = plus(3);
    auto plus5 = plus(5);
    auto read3 = plus3.getValue().read();
    auto read5 = plus5.getValue().read();
    const uint64_t sent = connection.stats().callsSent - callsBefore;
    if (sent != 7 || connection.stats().returnsReceived != returnsBefore)
      co_return Error(Errc::FAILED, "a pipelined call waited for an answer");
    auto r3 = co_await read3;
    if (!r3) co_return r3.error();
    AGATE_CO_TRY(expect(r3->results().getValue(), 27, "(4 * 6) + 3"));
    auto r5 = co_await read5;
    if (!r5) co_return r5.error();
    AGATE_CO_TRY(expect(r5->results().getValue(), 29, "(4 * 6) + 5"));
    fmt::print("  {} calls in 1 round trip: operators and a Value passed back still pipelined\n",
               sent);
  }

  // 2b. Operators the server hosts, fetched first, passed back inside an expression.
  Result<Calculator::Function::Client> add =
      co_await fetchOperator(calculator, calc::Calculator::Operator::ADD);
  if (!add) co_return add.error();
  Result<Calculator::Function::Client> multiply =
      co_await fetchOperator(calculator, calc::Calculator::Operator::MULTIPLY);
  if (!multiply) co_return multiply.error();
  {
    auto r = co_await calculator
                 .evaluate([&](auto params, auto& request) {
                   return buildCall(request, params.initExpression(), *add, 123, 45);
                 })
                 .getValue()
                 .read();
    if (!r) co_return r.error();
    AGATE_CO_TRY(expect(r->results().getValue(), 168, "add(123, 45)"));
  }

  // 3. A function the client hosts: the server calls back into this process.
  {
    auto r = co_await calculator
                 .evaluate([&](auto params, auto& request) {
                   return buildCall(request, params.initExpression(), pow, 2, 10);
                 })
                 .getValue()
                 .read();
    if (!r) co_return r.error();
    AGATE_CO_TRY(expect(r->results().getValue(), 1024, "pow(2, 10), pow hosted by the client"));
    if (pow.calls != 1) co_return Error(Errc::FAILED, "the server did not call the client's pow");
  }

  // 4. f(x, y) = x * 100 + y, defined on the server.
  Calculator::Function::Client f;
  {
    auto defined = co_await calculator.defFunction([&](auto params, auto& request) -> Status {
      params.setParamCount(2);
      auto sum = params.initBody().initCall();
      AGATE_TRY(setFunction(request, sum, *add));
      auto sumParams = sum.initParams(2);
      auto product = sumParams[0].initCall();
      AGATE_TRY(setFunction(request, product, *multiply));
      auto productParams = product.initParams(2);
      productParams[0].setParameter(0);
      productParams[1].setLiteral(100);
      sumParams[1].setParameter(1);
      return {};
    });
    if (!defined) co_return defined.error();
    auto func = getFunc(*defined, defined->results());
    if (!func) co_return func.error();
    f = std::move(func->remote);
  }
  {
    auto r = co_await calculator
                 .evaluate([&](auto params, auto& request) {
                   return buildCall(request, params.initExpression(), f, 12, 34);
                 })
                 .getValue()
                 .read();
    if (!r) co_return r.error();
    AGATE_CO_TRY(expect(r->results().getValue(), 1234, "f(12, 34) with f(x, y) = x * 100 + y"));
  }

  // 5. The chain evaluate -> read, pipelined and awaited.
  std::vector<int64_t> pipelined, awaited;
  int pipelinedTrips = 0, awaitedTrips = 0;
  for (int i = 0; i < iterations; ++i) {
    int trips1 = 0, trips2 = 0;
    auto t0 = std::chrono::steady_clock::now();
    Result<double> a = co_await pipelinedChain(calculator, connection, i, trips1);
    auto t1 = std::chrono::steady_clock::now();
    Result<double> b = co_await awaitedChain(calculator, i, trips2);
    auto t2 = std::chrono::steady_clock::now();
    if (!a) co_return a.error();
    if (!b) co_return b.error();
    if (*a != i || *b != i) co_return Error(Errc::FAILED, "a chain read the wrong value");
    pipelined.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
    awaited.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(t2 - t1).count());
    pipelinedTrips = trips1;
    awaitedTrips = trips2;
  }
  std::sort(pipelined.begin(), pipelined.end());
  std::sort(awaited.begin(), awaited.end());
  fmt::print("  evaluate -> read, {} times each (medians):\n", iterations);
  fmt::print("    pipelined: 2 calls in {} round trip,  {:.1f} us\n", pipelinedTrips,
             pipelined[pipelined.size() / 2] / 1e3);
  fmt::print("    awaited:   2 calls in {} round trips, {:.1f} us\n", awaitedTrips,
             awaited[awaited.size() / 2] / 1e3);
  co_return {};
}

}  // namespace

int main(int argc, char** argv) {
  PowFunction pow;  // exported to the server by reference: outlives the session's bushels
  const agate::client::ProgramSpec spec{
      .usage =
          "[--home DIR] [ITERATIONS]\n"
          "  ITERATIONS   timed rounds of each evaluation (default 2000)",
      .check = agate::client::optionalCount("ITERATIONS", 1'000'000'000)};
  return agate::run(argc, argv, spec,
                    [&](agate::Session& s, const agate::client::ProgramArgs& args) {
                      return session(s, args, pow);
                    });
}
