# The three-party handoff example's interfaces (examples/handoff.cpp): a client passes a
# capability it got from one server to another server, which then calls the first directly.
@0xd3a4b2c1e0f95a17;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("handoff");

interface Counter {
  # A running total.
  add @0 (n :Int64) -> (total :Int64);
}

interface Bank {
  # Server A: hands out counters it hosts.
  open @0 () -> (counter :Counter);
}

interface Auditor {
  # Server B: adds 1 to `counter` `times` times (calling the counter's host directly) and
  # returns the last total it saw.
  audit @0 (counter :Counter, times :UInt32) -> (total :Int64);
}
