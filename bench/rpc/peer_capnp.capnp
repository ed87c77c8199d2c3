# The interface suite `rpc` measures on its peer, Cap'n Proto's own RPC (EzRpc over a Unix socket),
# shaped like the calls Agate's figures make: an empty call, and a call whose result carries a
# capability so that ten dependent calls can be pipelined.
@0xd3a8e3c1f0b74a51;

interface PeerBench {
  # An empty call and its return.
  null @0 () -> ();

  # Returns `value + 1` and a capability to call next (this same object): the target of the next
  # call in a chain, usable before this call returns (promise pipelining).
  step @1 (value :UInt64) -> (next :PeerBench, value :UInt64);

  # Ends the server's process once the return is sent.
  stop @2 () -> ();
}
