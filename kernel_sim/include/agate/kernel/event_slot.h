// EventSlot: the layout of an event buffer's shared memory, one coalescing slot per event
// source, written by one side (the server, or the kernel) and read by the other without a call.
//
// This header is shared by both sides and depends on nothing but the standard library. An event
// buffer is an array of `EventSlot`s (64 bytes, one cache line each) filling a region; the
// reader learns the slot count from the kernel (eventSlotCount of the mapped size), never from
// the shared bytes. Each slot is coalescing: a post overwrites the slot, so a reader that falls
// behind sees the latest value of each source, not a queue of them. A reader notices a new post
// by the slot's sequence moving past the last one it consumed (postsOf(sequence) counts posts).
//
// Torn reads are impossible: `sequence` is a seqlock, odd while the writer is storing. Memory
// ordering is that of credit_page.h (release data stores and acquire data loads, no fences, so
// ThreadSanitizer can check it):
//  * writer: sequence := s+1 (relaxed), words (release), sequence := s+2 (release).
//  * reader: s1 := sequence (acquire), words (acquire), s2 := sequence (relaxed); consistent
//    iff s1 == s2 and s1 is even.
// A reader that loads any word of a later post acquires that post's odd sequence store, so its
// re-check sees a change. One writer per slot: two writers on one slot would corrupt the
// sequence (a writer that needs that must serialise itself).
//
// Waking readers: after a post (or a batch of posts) the writer rings the event buffer's
// notification (notification.h, event_buffer.h) with the doorbell protocol; the doorbell's RMW
// on `sleepers` orders the posts before the ring, so a woken reader's re-scan sees them. A reader
// finds the changed slots by comparing each slot's sequence with the last one it consumed.
//
// Untrusted contents: the writer is another process. The reader copies a slot once into an
// EventRecord and treats the words as opaque data to validate; a writer that never finishes a
// post (stays odd) makes tryReadEvent return false after a bounded number of tries, never hang.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace agate::kernel {

inline constexpr size_t EVENT_SLOT_WORDS = 7;

// The end of an event buffer, as a hint in its notification's page: the 32-bit word at this
// offset (after the DoorbellWord) counts the event buffers bound to that notification that the
// kernel has destroyed (release increment, then a ring). Every holder of the page can write it,
// so it is only a reason to ask: a reader that sees it move asks the kernel whether its cap to
// its buffer still resolves before it believes the stream ended (client/: EventStream).
inline constexpr size_t NOTIFICATION_ENDS_OFFSET = 8;

struct alignas(64) EventSlot {
  std::atomic<uint64_t> sequence{0};  // seqlock: odd while a post is being written
  std::array<std::atomic<uint64_t>, EVENT_SLOT_WORDS> words{};
};
static_assert(sizeof(EventSlot) == 64, "one cache line per source: writers never share a line");
static_assert(std::atomic<uint64_t>::is_always_lock_free,
              "shared between processes: the atomics must be lock-free");
static_assert(std::is_standard_layout_v<EventSlot>);

// One consistent copy of a slot.
struct EventRecord {
  uint64_t sequence = 0;  // even; postsOf(sequence) posts have landed in the slot
  std::array<uint64_t, EVENT_SLOT_WORDS> words{};
};

constexpr uint64_t postsOf(uint64_t sequence) noexcept { return sequence / 2; }
// Slots in a mapped buffer of `bytes`.
constexpr size_t eventSlotCount(size_t bytes) noexcept { return bytes / sizeof(EventSlot); }

// Writer side (the only writer of this slot). Overwrites whatever the slot held.
inline void postEvent(EventSlot& slot,
                      const std::array<uint64_t, EVENT_SLOT_WORDS>& words) noexcept {
  const uint64_t s = slot.sequence.load(std::memory_order_relaxed);  // only we write it
  slot.sequence.store(s + 1, std::memory_order_relaxed);
  // Release: a reader that loads one of these words also sees the odd sequence above.
  for (size_t i = 0; i < EVENT_SLOT_WORDS; ++i)
    slot.words[i].store(words[i], std::memory_order_release);
  slot.sequence.store(s + 2, std::memory_order_release);  // publishes the word stores
}

// Reader side: a consistent copy, or false after `maxTries` attempts that all overlapped a post
// (or a writer that stopped mid-post). `out` is unchanged when it returns false.
inline bool tryReadEvent(const EventSlot& slot, EventRecord& out, int maxTries = 1024) noexcept {
  for (int t = 0; t < maxTries; ++t) {
    const uint64_t s1 = slot.sequence.load(std::memory_order_acquire);  // pairs with the last store
    if (s1 & 1) continue;
    EventRecord r;
    r.sequence = s1;
    // Acquire: pairs with the release word stores, and keeps the re-check below after them.
    for (size_t i = 0; i < EVENT_SLOT_WORDS; ++i)
      r.words[i] = slot.words[i].load(std::memory_order_acquire);
    if (slot.sequence.load(std::memory_order_relaxed) != s1) continue;
    out = r;
    return true;
  }
  return false;
}

}  // namespace agate::kernel
