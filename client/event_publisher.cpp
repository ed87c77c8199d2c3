#include "agate/client/event_publisher.h"

#include <algorithm>
#include <utility>

#include "agate/kernel/bushel.h"
#include "agate/kernel/event_buffer.h"
#include "agate/kernel/notification.h"
#include "agate/kernel/space_bank.h"

namespace agate::client {

using caps::Cap;
using caps::Rights;

uint64_t EventPublisher::costBytes(uint32_t slots, bool wakeFd) noexcept {
  const uint64_t pages =
      kernel::EventBuffer::pagesFor(slots) + kernel::Notification::pagesFor(wakeFd);
  return pages * kernel::PAGE_BYTES + 2 * kernel::OBJECT_RECORD_BYTES;  // and the two records
}

EventPublisher::EventPublisher(caps::KernelConnection& kernel, caps::MappedEventBuffer buffer,
                               Cap<caps::EventBuffer> cap, Cap<caps::Notification> notification,
                               caps::Koid koid, Cap<caps::EventBuffer> clientHandle,
                               StateCharge charge, StateCharge chargeRest) noexcept
    : kernel_(kernel),
      buffer_(std::move(buffer)),
      cap_(cap),
      notification_(notification),
      koid_(koid),
      clientHandle_(clientHandle),
      charge_(std::move(charge)),
      chargeRest_(std::move(chargeRest)) {}

EventPublisher::~EventPublisher() {
  if (closed_) return;
  // Detached: a destructor cannot await, and each destroy is written now or queued until the
  // submission ring has room, never lost (its answer is read and dropped). Destroying the buffer
  // deletes every cap to it, the client's included, and the kernel rings its notification: the
  // client's stream ends (see the overview). The buffer first, while the notification it rings
  // still exists. The client's mapping stays valid. The charge refunds itself.
  flush();
  kernel_.destroyDetached(cap_);
  kernel_.destroyDetached(notification_);
}

Promise<void> EventPublisher::close() {
  if (closed_) co_return {};
  closed_ = true;
  flush();  // the last posts' ring (the kernel rings once more at the destroy)
  // Both go out in this turn, in this order; then both answers are awaited.
  Promise<void> buffer = kernel_.destroy(cap_);
  Promise<void> notification = kernel_.destroy(notification_);
  Status b = co_await buffer;
  Status n = co_await notification;
  if (!b) co_return b.error();
  co_return n;
}

Promise<std::unique_ptr<EventPublisher>> EventPublisher::create(ServedClient& client,
                                                                uint32_t slots,
                                                                PublisherOptions options) {
  if (slots == 0 || slots > kernel::EventBuffer::MAX_SLOTS)
    co_return Error(Errc::INVALID_ARGUMENT, "an event stream has 1 to 65536 slots");
  caps::KernelConnection& kernel = client.kernel();
  const Cap<caps::SpaceBank> bank = options.bank.valid() ? options.bank : kernel.bank();
  // The client pays first: nothing is made for a client that cannot.
  const uint64_t cost = costBytes(slots, options.wakeFd);
  constexpr uint64_t CHUNK = kernel::Bushel::MAX_STATE_GROWTH / 2 * kernel::PAGE_BYTES;
  Result<StateCharge> charge = co_await client.quota().charge(std::min(cost, CHUNK));
  if (!charge) co_return charge.error();
  Result<StateCharge> chargeRest = StateCharge();
  if (cost > CHUNK) chargeRest = co_await client.quota().charge(cost - CHUNK);
  if (!chargeRest) co_return chargeRest.error();

  // Destroys what this makes unless it gets as far as a publisher: on a failed step, and when
  // create() is itself destroyed while it waits (the client hung up mid-call and its running
  // calls were cancelled), a create still in flight included. The buffer goes first, and with it
  // the copy and the client's handle.
  caps::CreatedObjects made(kernel);
  Result<Cap<caps::Notification>> notification =
      co_await kernel.createNotification(bank, options.wakeFd, &made);
  if (!notification) co_return notification.error();
  Result<Cap<caps::EventBuffer>> buffer =
      co_await kernel.createEventBuffer(bank, slots, *notification, &made);
  if (!buffer) co_return buffer.error();
  // Writers first: once the client maps it read-only, no writable map is possible.
  Promise<caps::MappedEventBuffer> mapping = kernel.mapEventBuffer(*buffer, /*writable=*/true);
  Promise<caps::CapInfo> inspected = kernel.inspectCap(*buffer);
  Promise<Cap<caps::EventBuffer>> readOnly = kernel.copyCap(*buffer, Rights::READ | Rights::GRANT);
  Result<caps::MappedEventBuffer> mapped = co_await mapping;
  Result<caps::CapInfo> info = co_await inspected;
  Result<Cap<caps::EventBuffer>> copy = co_await readOnly;
  Error failed = !mapped ? mapped.error() : !info ? info.error() : !copy ? copy.error() : Error{};
  if (failed.code == Errc::OK) {
    // MOVE: the copy leaves this CSpace; the client's handle is its only cap with READ only.
    Result<Cap<caps::EventBuffer>> handle =
        co_await kernel.transferCap(*copy, client.peer(), caps::TransferMode::MOVE);
    if (handle) {
      // From here the publisher owns both: dropped anywhere on its way to the caller, its
      // destructor destroys them.
      std::unique_ptr<EventPublisher> publisher(
          new EventPublisher(kernel, std::move(*mapped), *buffer, *notification, info->koid,
                             *handle, std::move(*charge), std::move(*chargeRest)));
      made.keep();
      co_return publisher;
    }
    failed = handle.error();
  }
  co_return failed;  // `made` destroys both (and with the buffer, the copy)
}

void EventPublisher::describe(events::EventStream::Builder out) const {
  out.setHandle(clientHandle_.handle);
  out.setKoid(koid_);
  out.setSlots(buffer_.slots());
}

void EventPublisher::post(uint32_t slot, const EventPayload& words) noexcept {
  AGATE_REQUIRE(slot < buffer_.slots(), "post to slot %u of an event stream of %u", slot,
                buffer_.slots());
  if (closed_) return;  // nobody reads it any more
  buffer_.post(slot, words);
  ++posts_;
  if (!dirty_) {
    dirty_ = true;
    if (!flushTask_.isQueued()) kernel_.loop().post(flushTask_);
  }
}

void EventPublisher::flush() noexcept {
  if (!dirty_) return;
  dirty_ = false;
  // The doorbell's RMW orders the slot stores before the ring (event_slot.h).
  if (caps::MappedNotification* n = buffer_.notification()) n->ring();
  ++rings_;
}

}  // namespace agate::client
