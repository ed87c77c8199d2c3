# capnpc-agate refuses this: Both's client would have two `get` methods.
@0xe8f3a3c1d2b4a503;
interface Left { get @0 () -> (); }
interface Right { get @0 () -> (); }
interface Both extends(Left, Right) {}
