# capnpc-agate refuses this: the client's request form of `get` is `getRequest`.
@0xe8f3a3c1d2b4a505;
interface Getter {
  get @0 () -> ();
  getRequest @1 () -> ();
}
