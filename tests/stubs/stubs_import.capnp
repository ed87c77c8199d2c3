# Stubs across files: an interface extending, returning and taking interfaces of another file.
@0xd04f516fc9fd58ba;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::rpc::stubimport");

using Base = import "stubs_test.capnp";
using Distant = import "stubs_far.capnp";

interface Twice extends(Base.Counter) {
  # Calls `listener.notify(value)` twice and returns a new Adder starting at the sum of replies.
  twice @0 (listener :Base.Listener, value :Int64) -> (adder :Base.Adder);
}

# A struct holding a capability of this file and, deeper, one of stubs_test.capnp and one of
# stubs_far.capnp: for the pipelines of stubs_nested_import.capnp, which imports this file only.
struct Boxed {
  direct @0 :Twice;
  inner @1 :Base.Wrapper;
  far @2 :Distant.FarHolder;
}
