# Agate's event streams in typed interfaces: how a server hands a client the event buffer it
# publishes into (client/: EventPublisher on the server, EventStream on the client).
#
# A method that subscribes returns an EventStream in its results:
#
#   using Events = import "/agate_events.capnp";
#   interface Ticker { subscribe @0 () -> (events :Events.EventStream); }
#
# (generate with CAPNPC_IMPORT_DIRS naming Agate's schemas/ folder, link agate::schemas_events).
@0xb81ba6b414ffdfd9;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("agate::events");

# A read-only capability to a kernel EventBuffer, given to the receiving process through the
# kernel (transferCap) before this struct was sent. Every field is a claim of the sender: the
# receiver checks each against the kernel (inspectCap, mapEventBuffer) before it maps anything,
# and refuses the stream (PROTOCOL_ERROR) when one does not hold. The handle is meaningful only
# in the receiving process's CSpace; the receiver deletes that cap when it drops the stream. A
# server's death or the bushel's close ends the stream (the receiver learns it from its
# connection), and so does the publisher destroying the buffer (the kernel deletes the
# receiver's cap, which the receiver asks the kernel about), never anything written in the
# buffer.
struct EventStream {
  handle @0 :UInt64;  # the cap, in the receiver's CSpace: type EventBuffer, READ (and GRANT) only
  koid @1 :UInt64;    # the event buffer's kernel object id, as inspectCap reports it
  slots @2 :UInt32;   # its slot count, as the kernel's mapping reports it
}
