# The echo example's interface (examples/echo.cpp): the smallest typed Agate RPC service.
@0xc6a7d1e3b2f40501;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("echo");

interface Echo {
  # Returns `text` unchanged, and how many calls this server answered before it.
  echo @0 (text :Text) -> (text :Text, served :UInt64);
}
