# capnpc-agate refuses this: generic methods have no typed stubs.
@0xe8f3a3c1d2b4a504;
interface Maker {
  make @0 [T] (seed :T) -> (made :T);
}
