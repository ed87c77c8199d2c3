@0xd5a1f3c2b4e6a708;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("demo");

# Messages of agate-demo: a ping travels to the echo process, which answers with a pong.
struct Ping {
  seq @0 :UInt64;       # the sender's sequence number; the pong echoes it
  text @1 :Text;        # a short greeting, shown once to prove the bytes crossed
  last @2 :Bool;        # the sender is done: the echo process answers and exits
  parked @3 :Bool;      # the echo process parks (no spinning) while waiting for the next ping
  oneWay @4 :Bool;      # no pong, except for the last ping of the burst, which carries the count
}

struct Pong {
  seq @0 :UInt64;
  echoPid @1 :Int32;    # the echo process's pid, so the demo can show two processes talked
  text @2 :Text;
}
