// EventPublisher: a server's side of an event stream to one client — coalescing slots in a
// kernel event buffer the client maps read-only, rung once per batch of posts.
//
// Overview for a newcomer:
//
//   // schema:  subscribe @0 () -> (events :Events.EventStream);   (schemas/agate_events.capnp)
//   Promise<void> subscribe(SubscribeContext ctx) override {
//     auto pub = co_await client::EventPublisher::create(client_, /*slots=*/16);
//     if (!pub) co_return pub.error();                  // QUOTA_EXCEEDED: the client can't pay
//     auto results = ctx.initResults();
//     if (!results) co_return results.error();
//     (*pub)->describe(results->initEvents());          // the client's read-only handle
//     publisher_ = std::move(*pub);                     // lives as long as this client's object
//     co_return {};
//   }
//   ...
//   publisher_->post(3, Quote{price, volume});          // slot 3 := the newest quote
//
// What create() does, in order (each step undone if a later one fails or create() is cancelled
// mid-call, a create still in flight included: caps::CreatedObjects): charges the client's
// quota (ClientQuota, so the client's bank pays, through its bushel, for every page the stream
// costs: QUOTA_EXCEEDED and nothing made when it cannot), creates a Notification (with a wake
// pipe, for readers whose loop waits on descriptors) and an EventBuffer of `slots` slots,
// maps the buffer writable (the writer maps first: a read-only map seals it against writers),
// copies the cap with READ|GRANT only and moves that copy into the client's CSpace
// (transferCap to ServedClient::peer(), the process the kernel named in BUSHEL_OPENED). The
// client's handle goes out in the results (describe); the client checks it against the kernel
// before it maps anything (EventStream).
//
// Coalescing. A slot holds one value: post() overwrites it in place (a seqlock: the client never
// sees a torn value), and a client that falls behind sees the newest value of each slot once,
// with the number of posts it coalesced. post() does not ring; the first post of a loop turn
// posts a Task that rings the notification once at the end of the turn (flush() rings now). A
// ring costs no system call unless the client is parked.
//
// Ownership and memory. The kernel objects are allocated from the server's bank (or
// PublisherOptions::bank) and charged, in equal pages, to the client through its quota — the
// server keeps within what the client paid (ServiceHost's model, "Paying for state"). The
// destructor destroys both objects (the client's mapping stays valid, it just stops changing)
// and refunds the charge. Keep the publisher in the client's object: the host destroys that
// when the client hangs up or dies, so nothing outlives the client.
//
// The end of a stream. Destroying the publisher, or close(), ends the client's stream: the
// client's pending next() returns one last batch of what was posted before, then DISCONNECTED
// ("the publisher closed the event stream"). Where the mark lives: not in the shared bytes (the
// slots are the publisher's to write, the notification page any holder's, so nothing written
// there could be told from a forgery or a hostile server's lie in either direction), but in the
// kernel: destroying the buffer deletes every cap to it, the client's included, and the kernel
// then rings the notification (kernel_sim: event_buffer.h). A woken client that finds no change
// asks the kernel whether its cap still resolves (EventStream), so the end is the kernel's word
// and the publisher's only part in it is destroying what it owns. The buffer goes first, the
// notification second (the kernel would ring the client in the other order too: a buffer keeps
// its notification's bell); if the publishing process dies, its bank takes both and the
// connection ends as well.
//
// Threading: the kernel connection's loop thread. Not movable (a Task of its own may be queued).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "agate/caps/kernel_connection.h"
#include "agate/caps/mapped_event_buffer.h"
#include "agate/client/service_host.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"
#include "agate/runtime/task.h"
#include "agate_events.capnp.h"

namespace agate::client {

// One slot's value: 56 bytes, copied as they are (the reader treats them as opaque).
using EventPayload = std::array<uint64_t, caps::EVENT_SLOT_WORDS>;

// A value that fits a slot (post<T>, EventUpdate::as<T>): trivially copyable, default
// constructible, at most 56 bytes.
template <class T>
concept SlotValue = std::is_trivially_copyable_v<T> && std::is_default_constructible_v<T> &&
                    sizeof(T) <= sizeof(EventPayload);

struct PublisherOptions {
  // Allocates the buffer and its notification. Invalid (default): the server's process bank.
  caps::Cap<caps::SpaceBank> bank = {};
  // A wake pipe for readers that wait on descriptors (costs the client one page more).
  bool wakeFd = true;
};

class EventPublisher {
 public:
  // Pages (and bytes, records included) the stream costs the client for `slots` slots.
  static uint64_t costBytes(uint32_t slots, bool wakeFd) noexcept;

  // A stream of `slots` slots (1..65536) to `client`. Errors: INVALID_ARGUMENT for a slot count
  // out of range; QUOTA_EXCEEDED (the client's bank cannot pay) and the kernel's errors, with
  // nothing left behind; DISCONNECTED if the kernel went.
  static Promise<std::unique_ptr<EventPublisher>> create(ServedClient& client, uint32_t slots,
                                                         PublisherOptions options = {});
  ~EventPublisher();
  EventPublisher(const EventPublisher&) = delete;
  EventPublisher& operator=(const EventPublisher&) = delete;

  uint32_t slots() const noexcept { return buffer_.slots(); }
  caps::Koid koid() const noexcept { return koid_; }
  // Writes the client's handle (its cap, this buffer's koid and slot count) into `out`.
  void describe(events::EventStream::Builder out) const;

  // Overwrites slot `slot` (precondition: slot < slots()) and schedules the ring.
  void post(uint32_t slot, const EventPayload& words) noexcept;
  template <SlotValue T>
  void post(uint32_t slot, const T& value) noexcept {
    EventPayload words{};
    std::memcpy(words.data(), static_cast<const void*>(&value), sizeof(T));
    post(slot, words);
  }
  // Rings now for the posts made since the last ring (no-op if none).
  void flush() noexcept;
  // Ends the stream now (see the overview): destroys the buffer, then its notification, and
  // resolves once the kernel has done both (the client's cap is gone). Posts made before are
  // the client's last batch; later posts are ignored. Errors: the kernel's (DISCONNECTED if the
  // connection went, which ended the stream anyway). Idempotent: a second close resolves at once.
  // The charge stays until the publisher is destroyed (the client paid for the stream's life).
  Promise<void> close();
  bool closed() const noexcept { return closed_; }

  uint64_t posts() const noexcept { return posts_; }
  uint64_t rings() const noexcept { return rings_; }

 private:
  EventPublisher(caps::KernelConnection& kernel, caps::MappedEventBuffer buffer,
                 caps::Cap<caps::EventBuffer> cap, caps::Cap<caps::Notification> notification,
                 caps::Koid koid, caps::Cap<caps::EventBuffer> clientHandle, StateCharge charge,
                 StateCharge chargeRest) noexcept;

  caps::KernelConnection& kernel_;
  caps::MappedEventBuffer buffer_;
  caps::Cap<caps::EventBuffer> cap_;  // every right; destroyed with the publisher
  caps::Cap<caps::Notification> notification_;
  caps::Koid koid_;
  caps::Cap<caps::EventBuffer> clientHandle_;  // in the client's CSpace: meaningless here
  // What the client paid, in at most two charges (one charge grows an allowance by at most
  // Bushel::MAX_STATE_GROWTH pages; the largest stream costs a little more).
  StateCharge charge_;
  StateCharge chargeRest_;
  uint64_t posts_ = 0;
  uint64_t rings_ = 0;
  bool dirty_ = false;   // posts since the last ring
  bool closed_ = false;  // close() destroyed the kernel objects (the destructor does not again)
  MemberTask<&EventPublisher::flush> flushTask_{*this};
};

}  // namespace agate::client
