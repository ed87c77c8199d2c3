# capnpc-agate refuses this: `dispatch` is a member the generated server declares.
@0xe8f3a3c1d2b4a502;
interface Router {
  dispatch @0 () -> ();
}
