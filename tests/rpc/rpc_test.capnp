# Test interfaces for the RPC engine, described as plain structs (the engine is untyped; the
# interface and method ids below are what typed stubs would generate).
@0xff9850e59aa83d7e;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::rpc::test");

const nodeInterfaceId :UInt64 = 0xa9e1d3c2b4f56789;

struct Value {
  value @0 :UInt64;
}

# Results of Node.next / Node.spawn: a capability in pointer field 0 and a value.
struct CapAndValue {
  cap @0 :AnyPointer;
  value @1 :UInt64;
}

# Params of Node.identify: a capability in pointer field 0.
struct CapParam {
  cap @0 :AnyPointer;
}
