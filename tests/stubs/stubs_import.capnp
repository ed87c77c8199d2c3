# Stubs across files: an interface extending, returning and taking interfaces of another file.
@0xd04f516fc9fd58ba;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::rpc::stubimport");

using Base = import "stubs_test.capnp";

interface Twice extends(Base.Counter) {
  # Calls `listener.notify(value)` twice and returns a new Adder starting at the sum of replies.
  twice @0 (listener :Base.Listener, value :Int64) -> (adder :Base.Adder);
}
