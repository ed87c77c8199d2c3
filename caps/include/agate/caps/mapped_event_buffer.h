// MappedEventBuffer: this process's view of a kernel EventBuffer, owned: the slots (MAP_SHARED,
// writable only for the writer's view) and, while the buffer has one, its notification.
//
// Made by KernelConnection::mapEventBuffer. The slot count is the kernel's (never read from the
// shared bytes). The writer (READ|WRITE cap, mapped before any reader: "writers first", see
// kernel_sim/include/agate/kernel/event_buffer.h) posts into its slots and then rings the
// notification once per batch; a reader (READ cap) gets a read-only mapping it cannot upgrade
// and waits on the notification, then compares each slot's sequence with the last it consumed
// (kernel/event_slot.h: coalescing seqlocked slots, never a torn read).
//
// Threading: one thread. Move-only; unmaps and closes everything when destroyed.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>

#include "agate/caps/mapped_notification.h"
#include "agate/kernel/event_slot.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"

namespace agate::caps {

using kernel::EVENT_SLOT_WORDS;
using kernel::EventRecord;

class MappedEventBuffer {
 public:
  MappedEventBuffer() noexcept = default;
  // Maps `bytes` of `fd` shared (writable if `writable`). PROTOCOL_ERROR if `slots` does not fit
  // in `bytes`; SYSTEM_ERROR if mmap refuses.
  static Result<MappedEventBuffer> tryMap(Fd fd, uint64_t bytes, uint32_t slots, bool writable,
                                          std::optional<MappedNotification> notification);
  MappedEventBuffer(MappedEventBuffer&& o) noexcept { *this = std::move(o); }
  MappedEventBuffer& operator=(MappedEventBuffer&& o) noexcept;
  MappedEventBuffer(const MappedEventBuffer&) = delete;
  MappedEventBuffer& operator=(const MappedEventBuffer&) = delete;
  ~MappedEventBuffer() { reset(); }

  uint32_t slots() const noexcept { return slots_; }
  bool writable() const noexcept { return writable_; }
  int fd() const noexcept { return fd_.get(); }
  // The buffer's notification, or null (the kernel had none for it: it was destroyed).
  MappedNotification* notification() noexcept { return notification_ ? &*notification_ : nullptr; }

  // Writer: overwrites slot `slot` (precondition: writable(), slot < slots(); one writer per
  // slot). Does not ring: ring notification() once after a batch of posts.
  void post(uint32_t slot, const std::array<uint64_t, EVENT_SLOT_WORDS>& words) noexcept;
  // Reader: a consistent copy of slot `slot` (precondition: slot < slots()), or false if every
  // try overlapped a post (a writer stuck mid-post).
  bool tryRead(uint32_t slot, EventRecord& out) const noexcept;
  // Reader: slot `slot`'s sequence as it is now (precondition: slot < slots()), a hint of
  // whether it changed; only tryRead gives a consistent value.
  uint64_t peekSequence(uint32_t slot) const noexcept;

 private:
  void reset() noexcept;

  kernel::EventSlot* data_ = nullptr;
  size_t size_ = 0;
  uint32_t slots_ = 0;
  bool writable_ = false;
  Fd fd_;
  std::optional<MappedNotification> notification_;
};

}  // namespace agate::caps
