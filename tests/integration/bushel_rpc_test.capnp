# The service of bushel_rpc_test: typed RPC over kernel-opened bushels, per-client state charged
# to the client, fairness, and death of either side.
@0xe1a2b3c4d5e6f708;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("busheltest");

interface Store {
  # Keeps `bytes` of state for the caller, charged to its bushel, until the Item is released.
  hold @0 (bytes :UInt32) -> (item :Item);
  # `served`: calls to ping the server has handled, all clients together, this one included.
  # `work`: microseconds the server blocks in the call first (a slow service).
  ping @1 (work :UInt32) -> (served :UInt64);
  # Never returns; counted in `hanging` until cancelled.
  hang @2 () -> ();
  # The caller's quota (`mine`: its objects' bytes; `connection`: its connection's), and the
  # whole server's state.
  stats @3 () -> (clients :UInt32, mine :UInt64, allowancePages :UInt64, totalHeld :UInt64,
                  hanging :UInt32, dropped :UInt64, connection :UInt64);
  # Breaks the store's rules: the server disconnects the caller (ServedClient::disconnect), which
  # closes its bushel in the kernel. Never answered.
  misbehave @4 () -> ();
}

interface Item {
  measure @0 () -> (bytes :UInt32);
}
