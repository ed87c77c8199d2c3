#include "agate/caps/mapped_event_buffer.h"

#include <errno.h>
#include <sys/mman.h>

#include <utility>

namespace agate::caps {

Result<MappedEventBuffer> MappedEventBuffer::tryMap(
    Fd fd, uint64_t bytes, uint32_t slots, bool writable,
    std::optional<MappedNotification> notification) {
  if (!fd.valid()) return Error(Errc::PROTOCOL_ERROR, "an event buffer without its descriptor");
  if (slots == 0 || uint64_t{slots} * sizeof(kernel::EventSlot) > bytes)
    return Error(Errc::PROTOCOL_ERROR, "an event buffer's slots do not fit its size");
  const int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  void* p = ::mmap(nullptr, bytes, prot, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return Error::fromErrno(errno, "mmap of an event buffer failed");
  MappedEventBuffer m;
  m.data_ = static_cast<kernel::EventSlot*>(p);
  m.size_ = bytes;
  m.slots_ = slots;
  m.writable_ = writable;
  m.fd_ = std::move(fd);
  m.notification_ = std::move(notification);
  return m;
}

MappedEventBuffer& MappedEventBuffer::operator=(MappedEventBuffer&& o) noexcept {
  if (this == &o) return *this;
  reset();
  data_ = std::exchange(o.data_, nullptr);
  size_ = std::exchange(o.size_, 0);
  slots_ = std::exchange(o.slots_, 0);
  writable_ = std::exchange(o.writable_, false);
  fd_ = std::move(o.fd_);
  notification_ = std::move(o.notification_);
  o.notification_.reset();
  return *this;
}

void MappedEventBuffer::post(uint32_t slot,
                             const std::array<uint64_t, EVENT_SLOT_WORDS>& words) noexcept {
  AGATE_REQUIRE(writable_ && slot < slots_, "post to slot %u of %u (writable %d)", slot, slots_,
                static_cast<int>(writable_));
  kernel::postEvent(data_[slot], words);
}

bool MappedEventBuffer::tryRead(uint32_t slot, EventRecord& out) const noexcept {
  AGATE_REQUIRE(slot < slots_, "read of slot %u of %u", slot, slots_);
  return kernel::tryReadEvent(data_[slot], out);
}

uint64_t MappedEventBuffer::peekSequence(uint32_t slot) const noexcept {
  AGATE_REQUIRE(slot < slots_, "peek of slot %u of %u", slot, slots_);
  // Relaxed: a hint only; a reader acts on what tryRead (acquire, seqlock-checked) returns. A
  // reader woken by a ring still sees the posts it announced: its announce RMW on the doorbell
  // word reads the ringer's RMW, which the writer made after its posts (event_slot.h).
  return data_[slot].sequence.load(std::memory_order_relaxed);
}

void MappedEventBuffer::reset() noexcept {
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  slots_ = 0;
  fd_.reset();
  notification_.reset();
}

}  // namespace agate::caps
