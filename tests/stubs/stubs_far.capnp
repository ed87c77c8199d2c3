# An interface whose stubs a file two imports away cannot name: stubs_import.capnp holds a
# FarHolder in a struct but names no Far itself, so its header does not include this file's,
# and stubs_nested_import.capnp's pipeline through Boxed.far gets no getter for `far`.
@0xe76ce1a9d9ea3c4f;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::rpc::stubfar");

interface Far {
  ping @0 () -> ();
}

struct FarHolder {
  far @0 :Far;
}
