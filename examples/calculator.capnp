# The calculator example's interface (examples/calculator.cpp), in the shape of Cap'n Proto's own
# calculator example: expressions evaluate to Value capabilities, functions are capabilities the
# server hands out (operators, defined functions) or the client passes in (its own functions).
@0xc6a7d1e3b2f40502;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("calc");

interface Calculator {
  # Evaluates `expression` and returns the result as a Value: read() it, or pass it back in a
  # later expression. Pipelining `evaluate(...).value.read()` costs one round trip.
  evaluate @0 (expression :Expression) -> (value :Value);

  struct Expression {
    union {
      literal @0 :Float64;
      # A Value this server returned earlier, passed back.
      previousResult @1 :Value;
      # A parameter of the function being defined (defFunction only).
      parameter @2 :UInt32;
      call :group {
        function @3 :Function;
        params @4 :List(Expression);
      }
    }
  }

  interface Value {
    read @0 () -> (value :Float64);
  }

  # A function whose body is `body`, taking `paramCount` parameters.
  defFunction @1 (paramCount :Int32, body :Expression) -> (func :Function);

  interface Function {
    call @0 (params :List(Float64)) -> (value :Float64);
  }

  getOperator @2 (op :Operator) -> (func :Function);

  enum Operator {
    add @0;
    subtract @1;
    multiply @2;
    divide @3;
  }
}
