#include "agate/runtime/ring.h"

#include <sched.h>

#include <bit>

namespace agate {

void initRing(std::byte* memory, uint64_t capacity) {
  AGATE_REQUIRE(std::has_single_bit(capacity) && capacity >= RING_MIN_CAPACITY &&
                    capacity <= RING_MAX_CAPACITY,
                "ring capacity %llu is not a power of two in range",
                static_cast<unsigned long long>(capacity));
  AGATE_REQUIRE(reinterpret_cast<uintptr_t>(memory) % RING_LINE == 0, "ring memory misaligned");
  std::memset(memory, 0, RING_CONTROL_BYTES);
  auto* control = reinterpret_cast<RingControl*>(memory);
  control->header = RingHeader{RING_MAGIC, RING_VERSION, RING_CONTROL_BYTES, capacity};
  // The consumer starts by polling the word at index 0: it must read "nothing published yet".
  // Every later header position is cleared by the producer (the terminator) before it is reached.
  std::memset(memory + RING_CONTROL_BYTES, 0, FRAME_HEADER_BYTES);
}

Result<uint64_t> validateRing(const std::byte* memory, size_t mappingSize) {
  if (mappingSize < RING_CONTROL_BYTES)
    return Error(Errc::PROTOCOL_ERROR, "mapping is smaller than a ring control block");
  RingHeader h;  // copied once: the creator could still be writing it
  std::memcpy(&h, memory, sizeof h);
  if (h.magic != RING_MAGIC) return Error(Errc::PROTOCOL_ERROR, "ring header has a wrong magic");
  if (h.version != RING_VERSION)
    return Error(Errc::PROTOCOL_ERROR, "ring header has an unsupported version");
  if (h.controlBytes != RING_CONTROL_BYTES)
    return Error(Errc::PROTOCOL_ERROR, "ring header has a wrong control-block size");
  if (!std::has_single_bit(h.capacity) || h.capacity < RING_MIN_CAPACITY ||
      h.capacity > RING_MAX_CAPACITY)
    return Error(Errc::PROTOCOL_ERROR, "ring capacity is not a power of two in range");
  if (RING_CONTROL_BYTES + h.capacity != mappingSize)
    return Error(Errc::PROTOCOL_ERROR, "ring capacity does not match the size of its mapping");
  return h.capacity;
}

namespace ring_detail {

Error tooLarge() {
  return Error(Errc::MESSAGE_TOO_LARGE,
               "message exceeds the largest frame of this ring (capacity/2 - 8 bytes)");
}

}  // namespace ring_detail

Result<RingSlot> RingMultiProducer::tryClaim(size_t bytes) noexcept {
  if (bytes > v_.maxPayload()) return ring_detail::tooLarge();
  uint64_t claim = claim_.load(std::memory_order_relaxed);
  for (;;) {
    // Acquire on head: the consumer's reads of the bytes we are about to claim happen-before our
    // writes to them. Local scope only, so head comes from a thread of this process.
    uint64_t head = std::atomic_ref<uint64_t>(v_.control->head).load(std::memory_order_acquire);
    if (head > claim) {  // our claim snapshot is stale: others claimed and were consumed since
      claim = claim_.load(std::memory_order_relaxed);
      continue;
    }
    AGATE_ASSERT(head % FRAME_ALIGN == 0, "misaligned head %llu in a local ring",
                 static_cast<unsigned long long>(head));
    RingSlot slot = ring_detail::planSlot(v_, claim, bytes);
    if (!slot.fits(head, v_.capacity)) return Error(Errc::WOULD_BLOCK, "ring is full");
    // acq_rel on success orders our claim after the head we checked; on failure `claim` is
    // reloaded and the plan redone.
    if (claim_.compare_exchange_weak(claim, slot.end(), std::memory_order_acq_rel,
                                     std::memory_order_relaxed)) {
      std::memset(payload(slot), 0, slot.slotPayload);
      return slot;
    }
  }
}

void RingMultiProducer::publishInOrder(const RingSlot& slot, uint64_t first) noexcept {
  std::atomic_ref<uint64_t> tail(v_.control->tail);
  // Earlier claims publish first. Acquire: the previous slot's terminator, which lies where our
  // first header goes, happens-before our store there; and the chain of releases stays intact for
  // the consumer.
  for (uint32_t spins = 0; tail.load(std::memory_order_acquire) != slot.start; ++spins) {
    if (spins < 256)
      cpuRelax();
    else
      sched_yield();  // the earlier claimer may be descheduled; on 2 CPUs spinning would starve it
  }
  // Release: this slot's payload, other headers and terminator happen-before the consumer's
  // acquire load of its first header.
  std::atomic_ref<uint64_t>(v_.wordAt(slot.start)).store(first, std::memory_order_release);
  // Release: the next claimer's acquire of the ticket orders its first header after our store.
  tail.store(slot.end(), std::memory_order_release);
}

// The rest of a slot lies inside the claim (or is its terminator, which the next claimer
// overwrites only after our ticket), so it is written before our turn comes.
void RingMultiProducer::commit(const RingSlot& slot, size_t length, uint16_t tag) noexcept {
  AGATE_REQUIRE(length <= slot.requested, "commit of %zu bytes exceeds the %llu reserved", length,
                static_cast<unsigned long long>(slot.requested));
  publishInOrder(slot, ring_detail::writeSlot<AtomicSync>(v_, slot, length, tag));
}

void RingMultiProducer::abandon(const RingSlot& slot) noexcept {
  publishInOrder(slot, ring_detail::writeAbandonedSlot<AtomicSync>(v_, slot));
}

}  // namespace agate
