# capnpc-agate refuses this: generic interfaces have no typed stubs.
@0xe8f3a3c1d2b4a501;
interface Box(T) {
  get @0 () -> (value :T);
}
