// EventStream: a client's side of an event stream — the read-only event buffer a server
// published (EventPublisher), checked against the kernel, mapped, and read as an async stream of
// batches of changed slots.
//
// Overview for a newcomer:
//
//   // ticker.capnp: subscribe @0 () -> (events :Events.EventStream);   (agate_events.capnp)
//   Result<EventStream> stream = co_await EventStream::subscribe(s, *ticker, ticker->subscribe());
//   // (or, for another field name: EventStream::open(s, connection, results.getFoo()))
//   for (;;) {
//     Result<EventBatch> batch = co_await stream->next();          // DISCONNECTED at the end
//     if (!batch) break;
//     for (const EventUpdate& u : batch->updates)
//       use(u.slot, u.as<Quote>(), u.coalesced);                   // newest value, posts it covers
//   }
//
// open() treats the handle as hostile: it copies the three fields out of the results at once,
// then asks the kernel what the handle names (inspectCap) and refuses, with PROTOCOL_ERROR and
// nothing mapped, a handle that names no cap, a cap that is not an EventBuffer, one with any
// right beyond READ|GRANT (WRITE: the server kept a way to write through the client's handle),
// another koid than the one claimed, a slot count other than the kernel's, or a buffer without
// a notification. A refused handle's
// cap is left where it is: it may name something the client holds for other reasons (its own
// bank), so it is never deleted. Only then is the buffer mapped read-only (mapEventBuffer
// writable=false; the mapping cannot be upgraded, see kernel_sim/README.md).
//
// next() waits, without spinning (MappedNotification::waitAsync: parked on the doorbell's futex
// word or its wake pipe), until at least one slot changed since the last batch, and returns
// every changed slot once, in slot order, with its newest value and how many posts it covers
// (a slot posted 1000 times between two batches shows up once, coalesced = 1000). The first
// batch holds every slot posted before the stream was opened. A batch's spans point into the
// stream and stay valid until the next call to next(). next() allocates nothing: the batch
// buffers are sized for every slot at open, coroutine frames come from the loop's arena.
//
// Untrusted contents. A slot is copied once under its seqlock (tryReadEvent) and its words are
// opaque data; the slot count is the kernel's. A slot whose writer is stuck mid-post (its
// sequence stays odd) is reported once in EventBatch::stuck and read again when its sequence
// moves: it never wedges the others. A sequence that goes backwards (only a hostile or broken
// server can do that) ends the stream with PROTOCOL_ERROR.
//
// The end. The stream ends in two ways, and then the pending next() — after one last batch of
// what was posted before the end, if any — and every later one return DISCONNECTED:
//  * its connection closes (the server died, unregistered or dropped the client, the bushel was
//    closed, or the kernel connection went: Session closes the connection on each). The stream
//    looks at the connection each time it wakes; a park lasts at most `PARK_SLICE`, so the end
//    is seen within that.
//  * the publisher closes it (EventPublisher::close, or the publisher destroyed) while the
//    connection lives: "the publisher closed the event stream". The mark is the kernel's, not
//    the shared memory's (EventPublisher says why): destroying the buffer deletes this
//    process's cap to it; the kernel then bumps the notification page's ends word
//    (kernel/event_slot.h) and rings. The word is only a hint (any holder of the page can
//    write it), so when it has moved and a scan finds nothing new, the stream asks the kernel
//    (inspectCap) whether its cap still resolves: INVALID_HANDLE is the end. At most one such
//    call per park slice: a hostile writer of the word costs this process one kernel call per
//    slice, never a busy loop or a false end; plain rings cost no call at all. The order in
//    which the publisher destroys its objects does not matter: a buffer whose notification went
//    first still counts its end in the page (the kernel keeps the notification's bell for it,
//    kernel_sim: notification.h), so the stream ends as promptly either way.
// tryNext() reports both ends the same way, without waiting: when the ends word moved and
// nothing is new, it sends the kernel check (the same one, within the same bound: one call per
// park slice, and never a second while one is in flight) and returns what there is; a call
// made once the loop has read the answer returns the last posts, then DISCONNECTED. A caller
// that polls must therefore let the loop run between calls (it does anyway, to hear anything).
// Cancel-safe: dropping a pending next() loses nothing (slots are consumed only when next()
// completes), and the next call starts over.
//
// Lifetimes: the KernelConnection outlives the stream. The stream holds a counted reference to
// its RpcConnection (rpc::ConnectionRef), so the Session keeps a closed bushel's connection
// while a stream from it is alive; drop streams before their Session. Destroying the stream unmaps
// the buffer and deletes its cap (one kernel call, not awaited). Move-only; not moved while next()
// is pending.
//
// Threading: the kernel connection's loop thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "agate/caps/kernel_connection.h"
#include "agate/caps/mapped_event_buffer.h"
#include "agate/client/event_publisher.h"
#include "agate/client/session.h"
#include "agate/rpc/connection.h"
#include "agate/rpc/typed.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"
#include "agate_events.capnp.h"

namespace agate::client {

// One changed slot: its newest value and how many posts it covers.
struct EventUpdate {
  uint32_t slot = 0;
  uint64_t sequence = 0;  // the slot's seqlock value (even): kernel::postsOf(sequence) posts so far
  uint64_t coalesced = 0;  // posts since this slot's previous update (>= 1)
  EventPayload words{};

  // The payload as a T (bytes copied; any bit pattern must be a valid T: the server wrote it).
  template <SlotValue T>
  T as() const noexcept {
    T value{};
    std::memcpy(static_cast<void*>(&value), words.data(), sizeof(T));  // trivially copyable
    return value;
  }
};

// What next() returns. Views into the stream, valid until its next call to next().
struct EventBatch {
  std::span<const EventUpdate> updates;  // changed slots, in slot order
  std::span<const uint32_t> stuck;       // slots whose writer was caught mid-post (reported once)
};

// The reader's bookkeeping over a mapped buffer, apart from any waiting (tested on its own):
// the last sequence consumed per slot, and the odd sequence a stuck slot was last reported at.
class EventScanner {
 public:
  EventScanner() = default;
  explicit EventScanner(uint32_t slots) : seen_(slots, 0), stuckAt_(slots, 0) {}

  // Appends to `updates` every slot of `buffer` changed since the last scan (and advances past
  // it), and to `stuck` every slot newly found stuck mid-post. PROTOCOL_ERROR if a slot's
  // sequence went backwards (nothing appended or advanced for that slot; the scan stops there).
  // Precondition: buffer.slots() == the scanner's slot count.
  Status scan(const caps::MappedEventBuffer& buffer, std::vector<EventUpdate>& updates,
              std::vector<uint32_t>& stuck);

 private:
  std::vector<uint64_t> seen_;     // even; 0 before the first post
  std::vector<uint64_t> stuckAt_;  // odd sequence last reported stuck, or 0 (never odd)
};

class EventStream {
 public:
  // The longest one park lasts: the bound on noticing the connection's end (and on a wakeup a
  // hostile holder of the notification page swallowed).
  static constexpr Duration PARK_SLICE = caps::MappedNotification::PARK_SLICE;

  EventStream() = default;
  EventStream(EventStream&& o) noexcept { *this = std::move(o); }
  EventStream& operator=(EventStream&& o) noexcept;
  EventStream(const EventStream&) = delete;
  EventStream& operator=(const EventStream&) = delete;
  ~EventStream();

  // Checks `handle` (sent by the server at the other end of `from`, see above) and maps it.
  // PROTOCOL_ERROR for a handle that fails a check; DISCONNECTED if `from` or the kernel
  // connection is gone. Reads `handle` before its first suspension (a results reader may be
  // passed straight from a response).
  static Promise<EventStream> open(Session& session, rpc::RpcConnection& from,
                                   events::EventStream::Reader handle);
  // The common case in one step: awaits `call` (a method of `target` whose results carry the
  // handle in a field named `events`) and opens the stream it returns. Errors: the call's, then
  // open()'s.
  //   auto stream = co_await EventStream::subscribe(s, *ticker, ticker->subscribe());
  template <class Client, class R>
  static Promise<EventStream> subscribe(Session& session, const Client& target,
                                        rpc::typed::TypedPromise<R> call) {
    // Counted across the wait: the caller may let go of `target` meanwhile.
    rpc::RpcConnection* conn = target.cap().connection();
    rpc::ConnectionRef from = conn != nullptr ? rpc::ConnectionRef(*conn) : rpc::ConnectionRef();
    auto response = co_await call;
    if (!response) co_return response.error();
    if (!from) co_return Error(Errc::INVALID_ARGUMENT, "subscribe on a null client");
    co_return co_await open(session, *from, response->results().getEvents());
  }

  // The next batch (see above); TIMED_OUT after `timeout` with nothing changed, DISCONNECTED at
  // the end, PROTOCOL_ERROR if the server broke the slots' protocol (the stream ends).
  // One call at a time.
  Promise<EventBatch> next(Duration timeout = std::chrono::hours(24 * 365));
  // The changes there are now, without waiting (empty spans when none); errors and the end as
  // for next(). The publisher's end takes a kernel check to confirm: tryNext() sends it and a
  // later call, once the loop has run and the kernel answered, returns the end (see above).
  Result<EventBatch> tryNext();

  bool valid() const noexcept { return kernel_ != nullptr; }
  uint32_t slots() const noexcept { return buffer_.slots(); }
  caps::Koid koid() const noexcept { return koid_; }
  // The stream's cap in this process (READ, maybe GRANT); deleted with the stream.
  caps::Cap<caps::EventBuffer> cap() const noexcept { return cap_; }
  // Batches delivered so far.
  uint64_t batches() const noexcept { return batches_; }
  // Kernel calls made to learn whether the publisher closed the stream (see the end, above).
  uint64_t endChecks() const noexcept { return endChecks_; }
  // The longest one park of next() lasts (default PARK_SLICE): a ring wakes it at once; the
  // slice bounds how late the end of the connection (or a swallowed wakeup) is noticed.
  void setParkSlice(Duration slice) noexcept { parkSlice_ = slice; }

 private:
  // Scans into the batch buffers; true if there is something to return (a change, a newly
  // stuck slot, or the end), or if the kernel should be asked whether the stream ended
  // (checkEnd_: the ends word moved and nothing is new, at most once per park slice).
  bool collect() noexcept;
  // Sends the kernel the question whether this process's cap to the buffer still resolves
  // (probe_), unless one is in flight already.
  void startCheck();
  // Takes the kernel's answer: ends the stream if the cap no longer resolves (the publisher
  // destroyed the buffer; one last scan first) or if the kernel connection is gone.
  void settleCheck(Result<caps::CapInfo> info) noexcept;
  // Settles a check tryNext() sent if the kernel has answered it.
  void takeAnsweredCheck() noexcept;
  Result<EventBatch> deliver() noexcept;
  void release() noexcept;

  caps::KernelConnection* kernel_ = nullptr;  // not owned; null: empty or moved from
  rpc::ConnectionRef from_;                   // counted: the session keeps it while we do
  caps::Cap<caps::EventBuffer> cap_;
  caps::Koid koid_ = 0;
  caps::MappedEventBuffer buffer_;
  EventScanner scanner_;
  std::vector<EventUpdate> updates_;
  std::vector<uint32_t> stuck_;
  Error ended_{};  // DISCONNECTED or PROTOCOL_ERROR once the stream ended
  uint64_t batches_ = 0;
  Duration parkSlice_ = PARK_SLICE;
  uint32_t ends_ = 0;       // the notification's ends word when last looked at
  bool checkOwed_ = false;  // the ends word moved since the last check of the cap
  bool checkEnd_ = false;   // collect() asks next() or tryNext() to check the cap now
  // The check in flight, sent by tryNext() (next() awaits its own from its frame), and the ends
  // word when it was sent: a move seen after that is owed another check.
  std::optional<Promise<caps::CapInfo>> probe_;
  uint32_t probedEnds_ = 0;
  std::chrono::steady_clock::time_point lastCheck_{};
  uint64_t endChecks_ = 0;
};

}  // namespace agate::client
