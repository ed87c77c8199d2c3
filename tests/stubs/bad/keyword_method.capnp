# capnpc-agate refuses this: `delete` cannot be a C++ member function name.
@0xe8f3a3c1d2b4a506;
interface Store {
  delete @0 (key :Text) -> ();
}
