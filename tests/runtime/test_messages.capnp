# Message shapes used by the message layer's tests and fuzz harness (tests/runtime/message_test.cpp,
# tests/fuzz/). Not a wire protocol: nothing outside the tests reads these.
@0xb529679ec89b926b;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::test");

struct Point {
  x @0 :Int32;
  y @1 :Int32;
}

# A recursive shape: nesting depth is chosen by the test.
struct Tree {
  value @0 :UInt64;
  children @1 :List(Tree);
}

# One of every kind of field the tests exercise.
struct Sample {
  id @0 :UInt64;
  flag @1 :Bool;
  name @2 :Text;
  payload @3 :Data;
  values @4 :List(UInt32);
  points @5 :List(Point);
  tags @6 :List(Text);
  origin @7 :Point;
  tree @8 :Tree;
  choice :union {
    none @9 :Void;
    count @10 :UInt32;
    label @11 :Text;
  }
}
