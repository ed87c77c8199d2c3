// agate-calculator-server: Cap'n Proto's calculator example as an Agate service, registered as
// "calculator" with agate-kernel; agate-calculator is its client.
//
//   agate-calculator-server [--home DIR]      (`agate up` first; stop it with SIGTERM)
//
// calculator.capnp declares `interface Calculator` with nested Value and Function interfaces;
// agate_generate_rpc() generates calculator.agate.h. agate::serve (client/, <agate/agate.h>)
// registers the name, and for each client that opens a bushel to it makes one CalculatorImpl and
// one RPC connection over that bushel's rings. What the server holds for a client (the Values
// it returns, the functions it defines) is charged to that client's bank through the bushel
// (agate::ClientQuota): a client that hoards Values gets QUOTA_EXCEEDED, the others carry on.
#include <array>
#include <cmath>
#include <memory>
#include <span>
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
using Calculator = calc::stubs::Calculator;
using Expression = calc::Calculator::Expression;

constexpr int MAX_DEPTH = 32;  // of an expression the server accepts
// What a client is charged for each object it makes the server hold: the object and the
// connection's export entry for it.
constexpr uint64_t EXPORT_ENTRY_BYTES = 64;

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
  DefinedFunction(uint32_t paramCount, Expr body, agate::StateCharge charge)
      : paramCount_(paramCount), body_(std::move(body)), charge_(std::move(charge)) {}
  Promise<double> apply(std::vector<double> args) override {
    if (args.size() != paramCount_)
      co_return Error(Errc::INVALID_ARGUMENT, "wrong number of params");
    co_return co_await evaluate(body_, args);
  }

 private:
  uint32_t paramCount_;
  Expr body_;
  agate::StateCharge charge_;
};

class ValueImpl final : public Calculator::Value::Server {
 public:
  ValueImpl(double value, agate::StateCharge charge) : value_(value), charge_(std::move(charge)) {}
  double value() const { return value_; }
  Promise<void> read(ReadContext context) override {
    auto results = context.initResults();
    if (!results) return agate::readyPromise<void>(results.error());
    results->setValue(value_);
    return agate::readyPromise<void>(Status{});
  }

 private:
  double value_;
  agate::StateCharge charge_;  // paid by the client this Value was made for
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

constexpr uint64_t VALUE_BYTES = sizeof(ValueImpl) + EXPORT_ENTRY_BYTES;
constexpr uint64_t FUNCTION_BYTES = sizeof(DefinedFunction) + EXPORT_ENTRY_BYTES;

// One per client (agate::serve makes it when the client's bushel opens and drops it when the
// bushel closes): what it holds for that client is that client's state, charged to its bank.
class CalculatorImpl final : public Calculator::Server {
 public:
  explicit CalculatorImpl(agate::ServedClient& client)
      : client_(client),
        operators_{OperatorImpl(calc::Calculator::Operator::ADD),
                   OperatorImpl(calc::Calculator::Operator::SUBTRACT),
                   OperatorImpl(calc::Calculator::Operator::MULTIPLY),
                   OperatorImpl(calc::Calculator::Operator::DIVIDE)} {}

  Promise<void> evaluate(EvaluateContext context) override {
    Result<Expr> expr = decode(context, context.params().getExpression(), 0, 0);
    if (!expr) co_return expr.error();
    Result<double> value = co_await ::evaluate(*expr, {});
    if (!value) co_return value.error();
    // The client pays for the Value it makes this server hold (QUOTA_EXCEEDED when its bank
    // cannot): a client that keeps every Value runs out of its own quota, not of ours.
    Result<agate::StateCharge> charge = co_await client_.quota().charge(VALUE_BYTES);
    if (!charge) co_return charge.error();
    auto results = context.initResults();
    if (!results) co_return results.error();
    // The Value is owned by the connection: released when the client drops its last reference.
    co_return setValue(context, *results, std::make_unique<ValueImpl>(*value, std::move(*charge)));
  }

  Promise<void> defFunction(DefFunctionContext context) override {
    const int32_t paramCount = context.params().getParamCount();
    if (paramCount < 0) co_return Error(Errc::INVALID_ARGUMENT, "negative paramCount");
    Result<Expr> body =
        decode(context, context.params().getBody(), static_cast<uint32_t>(paramCount), 0);
    if (!body) co_return body.error();
    Result<agate::StateCharge> charge = co_await client_.quota().charge(FUNCTION_BYTES);
    if (!charge) co_return charge.error();
    defined_.push_back(std::make_unique<DefinedFunction>(static_cast<uint32_t>(paramCount),
                                                         std::move(*body), std::move(*charge)));
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

 private:
  agate::ServedClient& client_;
  std::array<OperatorImpl, 4> operators_;
  // Defined functions may hold the client's references: they go with this object, which the
  // host destroys after closing the connection and before destroying it.
  std::vector<std::unique_ptr<DefinedFunction>> defined_;
};

}  // namespace

int main(int argc, char** argv) { return agate::serve<CalculatorImpl>(argc, argv, "calculator"); }
