// EventBuffer: bounded shared memory of coalescing event slots, written by a server and read by
// its clients without a kernel call, plus the Notification the writer rings when a slot changes.
//
// Layout and protocol: event_slot.h (header-only, shared by both sides): `slots()` EventSlots
// of 64 bytes, one per event source, each a seqlock; the writer overwrites a slot, a reader sees
// the newest value of each slot, never a torn one. The slot count comes from the kernel
// (EventBufferMapping::slots), never from the shared bytes.
//
// Memory. A SealedMemfd (sealed_memory.h) of pagesFor(slots) pages, charged with the record to
// the bank named at creation. The kernel never maps it.
//
// Rights (a cap to an event buffer):
//  * READ|WRITE: Kernel::tryMapEventBuffer(.., writable=true) — the writer's descriptor, plus the
//    notification's descriptors with its ring end (the writer rings it after posting).
//  * READ: tryMapEventBuffer(.., writable=false) — a read-only descriptor, plus the
//    notification's page and wake end (to wait). Read-only is guaranteed as for regions
//    ("writers first", see region.h): the first read-only descriptor write-seals the memfd for
//    every holder, and a writable map is refused from then on. So the server maps its writable
//    view before it hands out a READ cap.
//  * GRANT, DESTROY as for every object. It stays (charged to its bank) when its last cap goes.
//
// The notification is named at creation (WRITE on it: the buffer's writers will ring it) and may
// live in another bank. If it is destroyed first, the buffer carries on without one (mappings
// then come with no notification descriptors), but keeps the notification's bell
// (NotificationBell: its page and the kernel's ringer) for its own end.
//
// The end. Destroying the buffer deletes every cap to it (the readers' included); then the kernel
// counts the end in its notification's page (NOTIFICATION_ENDS_OFFSET, event_slot.h) and rings
// it, so that readers, parked or not, look, and learn the end from the kernel (their cap no
// longer resolves) rather than from anything in the shared bytes, which the writer controls.
// It does so whichever of the two a publisher destroys first: a buffer whose notification went
// before it counts its end through the bell it kept, in the page its readers still map. Mappings
// stay valid until their holders unmap.
//
// Threading: single-threaded, as the whole object model.
#pragma once

#include <cstdint>
#include <memory>

#include "agate/kernel/event_slot.h"
#include "agate/kernel/notification.h"
#include "agate/kernel/object.h"
#include "agate/kernel/sealed_memory.h"
#include "agate/kernel/space_bank.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

// What a holder needs to use an event buffer. Owned by the caller.
struct EventBufferMapping {
  Fd fd;               // the slots' memfd; map `bytes` MAP_SHARED (PROT_READ unless writable)
  uint64_t bytes = 0;  // whole pages
  uint32_t slots = 0;  // EventSlots at offset 0; the rest of the last page is unused
  bool writable = false;
  bool hasNotification = false;  // false once the notification was destroyed
  NotificationFds notification;  // ring end only for the writer
};

class EventBuffer final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::EVENT_BUFFER;
  static constexpr uint32_t MAX_SLOTS = 1u << 16;  // 4 MiB of slots

  // Pages for `slots` slots (1..MAX_SLOTS, checked by the caller).
  static constexpr uint64_t pagesFor(uint32_t slots) noexcept {
    return (uint64_t{slots} * sizeof(EventSlot) + PAGE_BYTES - 1) / PAGE_BYTES;
  }

  // Links itself to `notification` as one of its buffers.
  EventBuffer(uint32_t slots, SealedMemfd memfd, Notification& notification);
  ~EventBuffer() override;

  uint32_t slots() const noexcept { return slots_; }
  uint64_t pages() const noexcept { return pagesFor(slots_); }
  bool writeSealed() const noexcept { return memfd_.writeSealed(); }
  // Null once the notification was destroyed.
  Notification* notification() const noexcept { return notification_; }

  // Descriptors for a holder (see the rights above). PERMISSION_DENIED for a writable map once
  // write-sealed, or for a read-only one a writer blocked; SYSTEM_ERROR if a descriptor cannot be
  // made. Every failure leaves the buffer (and its seals) as they were.
  Result<EventBufferMapping> tryMap(bool writable);

  // Called by the notification as it is destroyed (the buffer keeps its bell).
  void notificationGone() noexcept { notification_ = nullptr; }
  // The bell the buffer's end is counted in: its notification's, kept after that one went.
  const std::shared_ptr<NotificationBell>& bell() const noexcept { return bell_; }

 private:
  void teardown() noexcept override;

  uint32_t slots_;
  SealedMemfd memfd_;
  Notification* notification_;              // not owned; linked both ways (see notificationGone)
  std::shared_ptr<NotificationBell> bell_;  // shared with the notification; null after teardown
};

}  // namespace agate::kernel
