# The service of event_stream_test: a ticker that publishes coalescing events to each client
# (client/: EventPublisher, EventStream), and hands out hostile stream handles on request.
@0xd3c1e5a7b9f20461;

using Cxx = import "/capnp/c++.capnp";
using Events = import "/agate_events.capnp";
$Cxx.namespace("streamtest");

interface Ticker {
  # A new stream of `slots` slots to the caller, paid from its bank; it becomes the one `post`
  # writes to.
  subscribe @0 (slots :UInt32) -> (events :Events.EventStream);
  # Posts `times` values first, first+1, ... into `slot`, in one loop turn (one ring).
  post @1 (slot :UInt32, first :UInt64, times :UInt32) -> ();
  # A handle that must be refused.
  hostile @2 (kind :Hostile) -> (events :Events.EventStream);
  # Publishers alive (all clients), and the caller's latest publisher's posts and rings.
  stats @3 () -> (publishers :UInt32, posts :UInt64, rings :UInt64);

  # Ends the caller's latest stream while the connection lives: destroys its publisher (drop) or
  # closes it and keeps it (close).
  unsubscribe @4 (how :End) -> ();
  # A stream made by hand, as a hostile publisher would: a read-only handle to a real event
  # buffer whose notification the server keeps rights to. It becomes the one `abuse` acts on.
  rawStream @5 (slots :UInt32) -> (events :Events.EventStream);
  # Acts on the raw stream for `ms` milliseconds without posting: rings its notification through
  # the kernel and its own ring end (storm), or bumps the page's ends word and rings (fakeEnd);
  # or destroys the notification and then the buffer (wrongOrder); or destroys only the
  # notification (dropNotification); or posts `ms` into slot 0 without ringing and destroys the
  # buffer (dropBuffer).
  abuse @6 (how :Abuse, ms :UInt32) -> ();

  enum End {
    drop @0;
    close @1;
  }
  enum Abuse {
    storm @0;
    wrongOrder @1;
    fakeEnd @2;
    dropNotification @3;
    dropBuffer @4;
  }

  enum Hostile {
    notAnEventBuffer @0;  # a read-only region
    writable @1;          # the event buffer with every right
    wrongKoid @2;         # a real read-only handle, another koid claimed
    noSuchHandle @3;      # a handle that names nothing
    wrongSlots @4;        # a real read-only handle, another slot count claimed
  }
}
