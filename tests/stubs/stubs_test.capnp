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
  # Calls `notify(value)` on every listener of the list, in order, and returns the replies' sum.
  notifyAll @9 (listeners :List(Listener), value :Int64) -> (sum :Int64);
  # A new Adder per start value: a list of capabilities in the results.
  spawnMany @10 (starts :List(Int64)) -> (children :List(Adder));
  # notify(value) on the listeners of the holder's `many` member.
  notifyHeldMany @11 (holder :Holder, value :Int64) -> (sum :Int64);
}

# A diamond: NamedAdder reaches Counter through both Adder and Named.
interface Named extends(Counter) {
  name @0 () -> (name :Text);
}

interface NamedAdder extends(Adder, Named) {}

interface Listener {
  notify @0 (value :Int64) -> (reply :Int64);
}

# Capabilities inside structs and groups of the results, for the pipelines of nested structs.
interface Nest {
  # After a loop turn: `w.deeper` holds a listener replying value * 10, `g.g.listener` one
  # replying value * 20, `chain` is `depth` links (each the `next` of the one before), link k
  # holding a listener replying value * (k + 1), and `pair.first` a listener replying value * 30.
  # Fails with FAILED for a depth above 16.
  make @0 (depth :UInt32) -> Made;
  # How many links `chain` has (a recursive struct in params).
  count @1 (chain :Chain) -> (links :UInt32);
  # After a loop turn, a chain `depth` links long (1 to 16) as the results themselves, link k's
  # listener replying value * (k + 1): results whose type is reached again through a field.
  walk @2 (depth :UInt32) -> Chain;
}

struct Made {
  w @0 :Wrapper;
  g @1 :Grouped;
  chain @2 :Chain;
  pair :group {
    first @3 :Listener;
    second @4 :Chain;
  }
}

struct Chain {
  next @0 :Chain;
  listener @1 :Listener;
}

struct Holder {
  union {
    nothing @0 :Void;
    listener @1 :Listener;
    many @2 :List(Listener);
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

# Results of every shape, for the plugin's choice of Call.noPromisePipelining: a method whose
# results can hold no capability is sent without pipelining (its Return needs no Finish), one
# whose results can hold one, anywhere, keeps it.
interface Shapes {
  # No capability can be reached:
  empty @0 () -> ();
  plain @1 () -> (a :Int64, t :Text, d :Data, l :List(Int32), p :Plain);
  recursive @2 () -> (tree :Tree);
  nestedLists @3 () -> (l :List(List(Plain)));
  plainUnion @4 () -> (c :Choice);
  # One can:
  direct @5 () -> (listener :Listener);
  inStruct @6 () -> (w :Wrapper);
  inList @7 () -> (l :List(Listener));
  inStructList @8 () -> (l :List(Holder));
  inGroup @9 () -> (g :Grouped);
  recursiveWithCap @10 () -> (tree :CapTree);
  anyPointer @11 () -> (p :AnyPointer);
  anyStruct @12 () -> (s :AnyStruct);
  anyList @13 () -> (l :AnyList);
  capability @14 () -> (c :Capability);
  inUnion @15 () -> (h :Holder);
  # Mutually recursive structs: asked about the one with the capability first, then the one
  # that only reaches it through the other, then a pair that reaches none.
  mutualWithCap @16 () -> (n :MutualNode);
  mutualThroughOther @17 () -> (c :MutualChild);
  mutualPlain @18 () -> (a :PlainA);
}

struct MutualNode {
  child @0 :MutualChild;
  cap @1 :Listener;
}

struct MutualChild {
  parent @0 :MutualNode;
}

struct PlainA {
  b @0 :PlainB;
}

struct PlainB {
  a @0 :PlainA;
  x @1 :Int32;
}

struct Plain {
  x @0 :Int32;
  name @1 :Text;
}

struct Tree {
  value @0 :Int32;
  children @1 :List(Tree);
}

struct Choice {
  union {
    number @0 :Int64;
    text @1 :Text;
    plain @2 :Plain;
  }
}

struct Wrapper {
  inner @0 :Plain;
  deeper @1 :Holder;
}

struct Grouped {
  g :group {
    x @0 :Int32;
    listener @1 :Listener;
  }
}

struct CapTree {
  children @0 :List(CapTree);
  leaf @1 :Listener;
}

# A streaming method (`-> stream`): generated as an ordinary call whose results are Cap'n Proto's
# StreamResult, from a file this schema does not import.
interface Sink {
  write @0 (value :Int64) -> stream;
  total @1 () -> (sum :Int64);
}
