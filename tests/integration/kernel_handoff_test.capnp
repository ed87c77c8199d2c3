# Interfaces of kernel_handoff_test.cpp: three processes (C, a client; A, a bank of counters;
# B, an auditor) hand a counter from A to B through C over kernel-opened bushels.
@0xb6f1d0a2c3e49785;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("kvattest");

interface Counter {
  add @0 (n :Int64) -> (total :Int64);
}

interface Bank {
  # Server A.
  open @0 () -> (counter :Counter);
  # What A saw on the bushels of process `pid` (calls, Accepts) and A's vat-wide handoff state.
  seen @1 (pid :UInt32) -> (calls :UInt64, accepts :UInt64, bushels :UInt32, provisions :UInt32);
}

interface Auditor {
  # Server B: adds 1 `times` times to `counter`, calling its host directly; the first and last
  # totals it saw.
  audit @0 (counter :Counter, times :UInt32) -> (first :Int64, last :Int64);
  # Keeps `counter` for poke (replacing any kept one).
  keep @1 (counter :Counter) -> ();
  # Adds 1 to the kept counter.
  poke @2 () -> (total :Int64);
  # B's vat: connections it opened, introductions taken, its process bank's used pages.
  vats @3 () -> (owned :UInt32, introductions :UInt64, clients :UInt32, bankUsed :UInt64);
}
