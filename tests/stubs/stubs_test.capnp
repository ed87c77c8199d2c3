# Interfaces the typed-stub tests call through generated code (capnpc-agate).
@0xd04f516fc9fd58b9;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::rpc::stubtest");

# A base interface: Adder extends it, so its method is reached through Adder's client and served
# by Adder's server.
interface Counter {
  get @0 () -> (value :Int64);
}

interface Adder extends(Counter) {
  add @0 (amount :Int64) -> (value :Int64);
  # Fails with FAILED and `reason`.
  fail @1 (reason :Text) -> ();
  # A new Adder starting at `start`: a capability result, for pipelining.
  spawn @2 (start :Int64) -> (child :Adder, start :Int64);
  # Whether `other` is one of this server's own objects (a capability passed back), and its value.
  inspect @3 (other :Adder) -> (mine :Bool, value :Int64);
  # Calls `listener.notify(value)` on the caller's object and returns its reply.
  callBack @4 (listener :Listener, value :Int64) -> (reply :Int64);
  # Declared but not implemented by the test server.
  unimplemented @5 () -> ();
  # Takes a Holder (a capability inside a union) and returns its listener's notify(7) reply.
  notifyHeld @6 (holder :Holder) -> (reply :Int64);
  # A text result (the tests send a malformed one from an untyped server).
  describe @7 () -> (text :Text);
  # A child returned as a promise capability, resolved when the test says so.
  spawnLater @8 () -> (child :Adder);
}

# A diamond: NamedAdder reaches Counter through both Adder and Named.
interface Named extends(Counter) {
  name @0 () -> (name :Text);
}

interface NamedAdder extends(Adder, Named) {}

interface Listener {
  notify @0 (value :Int64) -> (reply :Int64);
}

struct Holder {
  union {
    nothing @0 :Void;
    listener @1 :Listener;
  }
}

# Nested declarations: a nested interface and an explicit (named) param struct.
interface Outer {
  interface Inner {
    ping @0 Ping -> Ping;
  }
  struct Ping {
    count @0 :UInt32;
  }
  inner @0 () -> (inner :Inner);
}
