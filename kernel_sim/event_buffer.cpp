#include "agate/kernel/event_buffer.h"

namespace agate::kernel {

static_assert(PAGE_BYTES % sizeof(EventSlot) == 0, "slots never straddle a page");

EventBuffer::EventBuffer(uint32_t slots, SealedMemfd memfd, Notification& notification)
    : KernelObject(TYPE),
      slots_(slots),
      memfd_(std::move(memfd)),
      notification_(&notification),
      bell_(notification.bell()) {
  notification.attachBuffer(*this);
}

EventBuffer::~EventBuffer() {
  AGATE_ASSERT(notification_ == nullptr, "event buffer %lu destroyed while linked",
               static_cast<unsigned long>(koid()));
}

Result<EventBufferMapping> EventBuffer::tryMap(bool writable) {
  // The notification's descriptors first: they change nothing, so a failure there leaves the
  // memfd unsealed as well.
  EventBufferMapping m;
  if (notification_) {
    auto fds = notification_->tryDuplicateFds(/*withRing=*/writable);
    if (!fds) return fds.error();
    m.notification = std::move(*fds);
    m.hasNotification = true;
  }
  auto fd = memfd_.tryDuplicate(writable);
  if (!fd) return fd.error();
  m.fd = std::move(*fd);
  m.bytes = memfd_.bytes();
  m.slots = slots_;
  m.writable = writable;
  return m;
}

void EventBuffer::teardown() noexcept {
  // The end is news too: readers see the notification's ends word move and wake, find their cap
  // to the buffer gone (the bank deleted every cap before this) and end their stream (client/:
  // EventStream). A notification destroyed first left its bell here for this.
  if (notification_) {
    notification_->bufferEnded();
    notification_->detachBuffer(*this);
  } else if (bell_) {
    bell_->countEnd();
  }
  notification_ = nullptr;
  bell_.reset();
  memfd_.reset();
}

}  // namespace agate::kernel
