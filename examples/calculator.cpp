// agate-calculator: Cap'n Proto's calculator example on Agate's typed RPC, with promise
// pipelining, in two processes.
//
//   agate-calculator [ITERATIONS]      (default 2000, for the round-trip timing)
//
// calculator.capnp declares `interface Calculator` with nested Value and Function interfaces;
// agate_generate_rpc() generates calculator.agate.h. The server process implements them; the
// client process:
//   1. evaluates a literal and reads it through the pipelined Value: one round trip;
//   2. fetches the `add` and `multiply` operators and evaluates an expression calling them;
//   3. passes a function of its own (pow) inside an expression: the server calls back into the
//      client while it evaluates;
//   4. defines f(x, y) = x * 100 + y on the server and calls it;
//   5. times the chain evaluate -> read, pipelined (both calls leave at once) against awaited
//      (read sent after evaluate's answer), and prints the round trips each took.
// Exit 0 only when every result is right and the pipelined chain really went out in one trip.
#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <memory>
#include <span>
#include <vector>

#include "calculator.agate.h"
#include "example_process.h"

namespace {

using agate::Errc;
using agate::Error;
using agate::EventLoop;
using agate::Promise;
using agate::Result;
using agate::Status;
using agate::examples::Bushel;
using agate::examples::BushelEnd;
using agate::rpc::RpcConnection;
using agate::rpc::RpcOptions;
using Calculator = calc::stubs::Calculator;
using Expression = calc::Calculator::Expression;

constexpr const char* PROGRAM = "agate-calculator";
constexpr int MAX_DEPTH = 32;  // of an expression the server accepts

// ---------------------------------------------------------------------------------------------
// Server

class FunctionImpl;

// An expression decoded out of the request. Params are readable only until the server method
// first suspends, and evaluating may suspend (a call into the client), so the server decodes the
// whole expression first, checking everything, and evaluates the decoded copy.
struct Expr {
  enum class Kind { LITERAL, PARAMETER, CALL } kind = Kind::LITERAL;
  double literal = 0;
  uint32_t parameter = 0;
  FunctionImpl* local = nullptr;        // a function this server hosts (not owned)
  Calculator::Function::Client remote;  // or one the client hosts
  std::vector<Expr> params;
};

Promise<double> evaluate(const Expr& e, std::span<const double> args);

class FunctionImpl : public Calculator::Function::Server {
 public:
  virtual Promise<double> apply(std::vector<double> args) = 0;

  Promise<void> call(CallContext context) override {
    auto params = context.params().getParams();
    std::vector<double> args;
    for (double p : params) args.push_back(p);
    Result<double> value = co_await apply(std::move(args));
    if (!value) co_return value.error();
    auto results = context.initResults();
    if (!results) co_return results.error();
    results->setValue(*value);
    co_return {};
  }
};

class OperatorImpl final : public FunctionImpl {
 public:
  explicit OperatorImpl(calc::Calculator::Operator op) : op_(op) {}
  Promise<double> apply(std::vector<double> args) override {
    if (args.size() != 2) co_return Error(Errc::INVALID_ARGUMENT, "an operator takes 2 params");
    switch (op_) {
      case calc::Calculator::Operator::ADD:
        co_return args[0] + args[1];
      case calc::Calculator::Operator::SUBTRACT:
        co_return args[0] - args[1];
      case calc::Calculator::Operator::MULTIPLY:
        co_return args[0] * args[1];
      case calc::Calculator::Operator::DIVIDE:
        co_return args[0] / args[1];
    }
    co_return Error(Errc::INVALID_ARGUMENT, "unknown operator");
  }

 private:
  calc::Calculator::Operator op_;
};

class DefinedFunction final : public FunctionImpl {
 public:
  DefinedFunction(uint32_t paramCount, Expr body)
      : paramCount_(paramCount), body_(std::move(body)) {}
  Promise<double> apply(std::vector<double> args) override {
    if (args.size() != paramCount_)
      co_return Error(Errc::INVALID_ARGUMENT, "wrong number of params");
    co_return co_await evaluate(body_, args);
  }

 private:
  uint32_t paramCount_;
  Expr body_;
};

class ValueImpl final : public Calculator::Value::Server {
 public:
  explicit ValueImpl(double value) : value_(value) {}
  double value() const { return value_; }
  Promise<void> read(ReadContext context) override {
    auto results = context.initResults();
    if (!results) return agate::readyPromise<void>(results.error());
    results->setValue(value_);
    return agate::readyPromise<void>(Status{});
  }

 private:
  double value_;
};

// Decodes `e` (read through `source`'s cap table). A Value passed back becomes its number (Values
// are immutable); a function becomes the local object or the client's reference.
template <class Source>
Result<Expr> decode(const Source& source, Expression::Reader e, uint32_t paramCount, int depth) {
  if (depth > MAX_DEPTH) return Error(Errc::INVALID_ARGUMENT, "expression nested too deeply");
  Expr out;
  switch (e.which()) {
    case Expression::LITERAL:
      out.literal = e.getLiteral();
      return out;
    case Expression::PREVIOUS_RESULT: {
      auto value = getPreviousResult(source, e);
      if (!value) return value.error();
      auto* mine = dynamic_cast<ValueImpl*>(value->local);
      if (mine == nullptr) return Error(Errc::INVALID_ARGUMENT, "a Value this server made");
      out.literal = mine->value();
      return out;
    }
    case Expression::PARAMETER:
      if (e.getParameter() >= paramCount)
        return Error(Errc::INVALID_ARGUMENT, "parameter index out of range");
      out.kind = Expr::Kind::PARAMETER;
      out.parameter = e.getParameter();
      return out;
    case Expression::CALL: {
      out.kind = Expr::Kind::CALL;
      auto function = getFunction(source, e.getCall());
      if (!function) return function.error();
      if (function->local != nullptr) {
        out.local = dynamic_cast<FunctionImpl*>(function->local);
        if (out.local == nullptr) return Error(Errc::INVALID_ARGUMENT, "unknown function");
      } else {
        out.remote = std::move(function->remote);
      }
      for (Expression::Reader p : e.getCall().getParams()) {
        Result<Expr> param = decode(source, p, paramCount, depth + 1);
        if (!param) return param.error();
        out.params.push_back(std::move(*param));
      }
      return out;
    }
  }
  return Error(Errc::INVALID_ARGUMENT, "unknown expression kind");
}

Promise<double> evaluate(const Expr& e, std::span<const double> args) {
  switch (e.kind) {
    case Expr::Kind::LITERAL:
      co_return e.literal;
    case Expr::Kind::PARAMETER:
      co_return args[e.parameter];  // checked against paramCount when decoded
    case Expr::Kind::CALL:
      break;
  }
  std::vector<double> values;
  for (const Expr& p : e.params) {
    Result<double> v = co_await evaluate(p, args);
    if (!v) co_return v.error();
    values.push_back(*v);
  }
  if (e.local != nullptr) co_return co_await e.local->apply(std::move(values));
  // The client's own function: a call back across the connection.
  auto reply = co_await e.remote.call([&](auto params) {
    auto list = params.initParams(static_cast<unsigned>(values.size()));
    for (unsigned i = 0; i < values.size(); ++i) list.set(i, values[i]);
  });
  if (!reply) co_return reply.error();
  co_return reply->results().getValue();
}

class CalculatorImpl final : public Calculator::Server {
 public:
  CalculatorImpl()
      : operators_{OperatorImpl(calc::Calculator::Operator::ADD),
                   OperatorImpl(calc::Calculator::Operator::SUBTRACT),
                   OperatorImpl(calc::Calculator::Operator::MULTIPLY),
                   OperatorImpl(calc::Calculator::Operator::DIVIDE)} {}

  Promise<void> evaluate(EvaluateContext context) override {
    Result<Expr> expr = decode(context, context.params().getExpression(), 0, 0);
    if (!expr) co_return expr.error();
    Result<double> value = co_await ::evaluate(*expr, {});
    if (!value) co_return value.error();
    auto results = context.initResults();
    if (!results) co_return results.error();
    // The Value is owned by the connection: released when the client drops its last reference.
    co_return setValue(context, *results, std::make_unique<ValueImpl>(*value));
  }

  Promise<void> defFunction(DefFunctionContext context) override {
    const int32_t paramCount = context.params().getParamCount();
    if (paramCount < 0) co_return Error(Errc::INVALID_ARGUMENT, "negative paramCount");
    Result<Expr> body =
        decode(context, context.params().getBody(), static_cast<uint32_t>(paramCount), 0);
    if (!body) co_return body.error();
    defined_.push_back(
        std::make_unique<DefinedFunction>(static_cast<uint32_t>(paramCount), std::move(*body)));
    auto results = context.initResults();
    if (!results) co_return results.error();
    co_return setFunc(context, *results, *defined_.back());  // stays owned by the calculator
  }

  Promise<void> getOperator(GetOperatorContext context) override {
    const auto op = static_cast<size_t>(context.params().getOp());
    if (op >= operators_.size()) co_return Error(Errc::INVALID_ARGUMENT, "unknown operator");
    auto results = context.initResults();
    if (!results) co_return results.error();
    co_return setFunc(context, *results, operators_[op]);
  }

  // Defined functions may hold the client's references; they go before the connection does.
  void dropDefinitions() { defined_.clear(); }

 private:
  std::array<OperatorImpl, 4> operators_;
  std::vector<std::unique_ptr<DefinedFunction>> defined_;
};

int serve(const Bushel& bushel, pid_t client) {
  BushelEnd end(PROGRAM, bushel, BushelEnd::Side::SERVER, client);
  EventLoop loop;
  CalculatorImpl calculator;
  RpcOptions options;
  options.bootstrap = &calculator;
  RpcConnection connection(end.tx(), end.rx(), loop, options);
  Status ended = loop.run(connection.onDisconnect());
  calculator.dropDefinitions();
  return ended.code() == Errc::DISCONNECTED ? 0 : 3;
}

// ---------------------------------------------------------------------------------------------
// Client

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

Promise<void> runClient(Calculator::Client calculator, RpcConnection& connection, PowFunction& pow,
                        int iterations) {
  fmt::print("{}: Cap'n Proto's calculator, on Agate typed RPC across two processes\n", PROGRAM);

  // 1. A literal, read through the pipelined Value.
  int trips = 0;
  Result<double> literal = co_await pipelinedChain(calculator, connection, 123, trips);
  if (!literal) co_return literal.error();
  AGATE_CO_TRY(expect(*literal, 123, "evaluate(123).value.read()"));

  // 2. Operators the server hosts, passed back inside an expression.
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
  const int iterations = argc > 1 ? std::max(1, std::atoi(argv[1])) : 2000;
  Bushel bushel = Bushel::create(PROGRAM);
  const pid_t parent = ::getpid();
  const pid_t server = agate::examples::forkChild(
      PROGRAM, [&] { return serve(bushel, parent); }, /*watchdogSeconds=*/60);
  ::alarm(60);  // the client's watchdog

  Status done;
  {
    BushelEnd end(PROGRAM, bushel, BushelEnd::Side::CLIENT, server);
    EventLoop loop;
    PowFunction pow;  // exported to the server by reference: outlives the connection
    RpcConnection connection(end.tx(), end.rx(), loop);
    Calculator::Client calculator(connection.bootstrap());
    done = loop.run(runClient(std::move(calculator), connection, pow, iterations));
  }  // hanging up ends the server
  const int serverStatus = agate::examples::reap(server);
  if (!done) agate::examples::die(PROGRAM, "calculator", done.error());
  if (serverStatus != 0) {
    fmt::print(stderr, "{}: the server exited with status {}\n", PROGRAM, serverStatus);
    return 1;
  }
  return 0;
}
