# Pipelines through structs of another file. This file names no interface itself: the header of
# stubs_import.capnp (which it imports) is included for the pipelined getter of Boxed.direct, and
# Boxed.inner.deeper.listener, an interface of stubs_test.capnp (which it does not import), gets
# one too: stubs_import's header includes stubs_test's. Boxed.far.far, of stubs_far.capnp, gets
# none: no header this one includes brings its stubs.
@0xa950163e4c6ca5f3;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::rpc::stubnested");

using Imp = import "stubs_import.capnp";

interface Box {
  box @0 () -> (b :Imp.Boxed);
}
