@0xb9a1c6e3f0d27a45;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("hello");

interface Greeter {
  greet @0 (name :Text) -> (text :Text);
}
