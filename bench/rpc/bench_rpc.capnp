# The peer's interface in suite `rpc` (Cap'n Proto's own RPC), and the ids Agate's side uses for
# the same two methods.
@0xb11805459d4e75d6;

interface Hop {
  null @0 () -> ();
  # An empty call and its return.
  next @1 () -> (hop :Hop);
  # A capability to the next hop (the same object): the step of a dependent chain.
}
