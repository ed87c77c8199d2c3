# The ticker example's interface (examples/ticker.cpp): a server publishing quotes to each
# subscriber as a stream of coalescing event slots (schemas/agate_events.capnp).
@0xe2c4b0a1f7d36a59;

using Cxx = import "/capnp/c++.capnp";
using Events = import "/agate_events.capnp";
$Cxx.namespace("ticker");

interface Ticker {
  # A stream of one slot per symbol (1..64), each holding that symbol's latest quote, paid from
  # the caller's bank.
  subscribe @0 (symbols :UInt32) -> (events :Events.EventStream);
}
