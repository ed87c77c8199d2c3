// Ring: a single-consumer ring of variable-length frames in memory given to it.
//
// The ring is the data path of every Agate channel. It lives in one block of memory (anonymous
// for private/local scope, a sealed memfd for shared scope): a 512-byte control block followed by
// a data area of `capacity` bytes (a power of two, at least 64).
//
// Control block (byte offsets from the start of the mapping; one 64-byte line each, so the
// producer's and the consumer's hot words never share a line):
//     0  RingHeader   magic, version, control-block size, capacity      (immutable after init)
//    64  tail         producer's published index: bytes ever committed (release / acquire)
//   128  head         consumer's published index: bytes ever released  (release / acquire)
//   192  dataBell     DoorbellWord the consumer parks on; the producer rings it
//   256  spaceBell    DoorbellWord producers park on when full; the consumer rings it
//   320  senders      attached-sender count | CLOSED_BIT once the last sender detached
//   384  receiver     1 while the receiver is attached | CLOSED_BIT once it detached
//   448  (reserved, zero)
//   512  data area
//
// Indices are monotonic 64-bit byte counts; the position in the data area is `index & (cap-1)`.
// 0 <= tail - head <= capacity always holds, and both are multiples of 8.
//
// Frames: an 8-byte header (a little-endian 64-bit word: bits 0-31 payload length, 32-47 a user
// tag, 48-63 flags), then the payload, padded to a multiple of 8. A frame never crosses the end of
// the data area: when it would, the producer first writes a PAD frame (flags = PAD) whose payload
// runs exactly to the end, and the real frame starts at position 0 — so every payload is one
// contiguous, 8-byte-aligned span, as Cap'n Proto's flat-array reader wants. The largest payload
// is capacity/2 - 8: a frame of at most half the ring always fits, wherever the tail stands, once
// the ring has drained (either before the wrap or after the pad).
//
// Trust: the consumer never trusts the producer and vice versa. Each side keeps its own index
// privately and only *publishes* it; it reads the peer's published index once into a local and
// validates it (aligned, monotonic, within capacity of its own index). The consumer reads every
// frame header once into a local and checks it before use: known flags, payload within the
// published range and before the wrap. Any violation poisons that side with PROTOCOL_ERROR
// (sticky), and nothing is read or written out of bounds. Payload bytes stay writable by the peer:
// a consumer must treat them as hostile while it reads them (validate, copy what it keeps).
//
// A producer killed mid-frame leaves no torn frame: tail moves only when a frame is complete.
//
// Producers: RingProducer<Sync> is the single-producer side. RingMultiProducer (local scope only)
// lets several threads of one process produce into one ring:
//   * a producer claims [start, start+size) with a CAS on a claim index private to the process
//     (the claim check reads head with acquire, so claimed space is never still being read);
//   * it zeroes and fills its slot with no lock held, concurrently with other producers;
//   * it publishes in claim order: at commit it waits (spin, then yield) until tail == start,
//     then stores tail = start+size with release. A frame committed shorter than its claim
//     leaves the rest of the slot as a PAD frame; an abandoned claim becomes one PAD frame.
// So the consumer sees exactly the single-producer format and needs no per-frame commit flag
// (which would force somebody to zero the ring behind the consumer). The cost: a producer that
// holds a claim for long delays the *commit* (not the writing) of later producers. Rule: a thread
// holds at most one outstanding reservation per ring, or it can wait on itself.
//
// Sync policies: AtomicSync accesses the shared words through std::atomic_ref with the named
// memory orders (local and shared scope); PlainSync uses plain loads and stores and no fences
// (private scope: one thread). Templates, not virtual calls: the hot path is branch-free of scope.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>

#include "agate/runtime/doorbell.h"
#include "agate/runtime/result.h"

namespace agate {

inline constexpr uint64_t RING_MAGIC = 0x31474e5241474141ull;  // "AAGARNG1" little-endian
inline constexpr uint32_t RING_VERSION = 1;
inline constexpr size_t RING_LINE = 64;
inline constexpr size_t FRAME_HEADER_BYTES = 8;
inline constexpr size_t FRAME_ALIGN = 8;
inline constexpr uint64_t RING_MIN_CAPACITY = 64;
inline constexpr uint64_t RING_MAX_CAPACITY = uint64_t{1} << 31;  // payload length fits 32 bits
inline constexpr uint16_t FRAME_FLAG_PAD = 1;
inline constexpr uint32_t ATTACH_CLOSED_BIT = 0x8000'0000u;

struct RingHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t controlBytes;  // offset of the data area
  uint64_t capacity;
};

// The control block as it lies at the start of the ring's memory (layout above). Plain integer
// fields; every access to a mutable one goes through a Sync policy.
struct RingControl {
  alignas(RING_LINE) RingHeader header;
  alignas(RING_LINE) uint64_t tail;
  alignas(RING_LINE) uint64_t head;
  alignas(RING_LINE) DoorbellWord dataBell;
  alignas(RING_LINE) DoorbellWord spaceBell;
  alignas(RING_LINE) uint32_t senders;
  alignas(RING_LINE) uint32_t receiver;
  alignas(RING_LINE) uint64_t reserved;
};
static_assert(sizeof(RingControl) == 8 * RING_LINE, "the control block is eight cache lines");
inline constexpr size_t RING_CONTROL_BYTES = sizeof(RingControl);

constexpr uint64_t alignFrame(uint64_t n) {
  return (n + FRAME_ALIGN - 1) & ~uint64_t{FRAME_ALIGN - 1};
}
constexpr uint64_t ringMaxPayload(uint64_t capacity) { return capacity / 2 - FRAME_HEADER_BYTES; }
constexpr uint64_t encodeFrameHeader(uint32_t length, uint16_t tag, uint16_t flags) {
  return uint64_t{length} | (uint64_t{tag} << 32) | (uint64_t{flags} << 48);
}

// Writes a fresh control block (zeroed, header filled) at `memory`, which must hold
// RING_CONTROL_BYTES + capacity bytes and be 64-byte aligned. Call before anyone else can see it.
void initRing(std::byte* memory, uint64_t capacity);

// Checks a control block received from elsewhere against the size of its mapping: magic, version,
// control-block size, capacity a power of two in range, and RING_CONTROL_BYTES + capacity ==
// mappingSize. Returns the capacity, or PROTOCOL_ERROR naming what is wrong.
Result<uint64_t> validateRing(const std::byte* memory, size_t mappingSize);

// Plain accesses: one thread owns the ring.
struct PlainSync {
  template <class T>
  static T loadAcquire(T& x) noexcept {
    return x;
  }
  template <class T>
  static T loadRelaxed(T& x) noexcept {
    return x;
  }
  template <class T>
  static void storeRelease(T& x, T v) noexcept {
    x = v;
  }
  template <class T>
  static void storeRelaxed(T& x, T v) noexcept {
    x = v;
  }
};

// Atomic accesses with the memory order the name says.
struct AtomicSync {
  template <class T>
  static T loadAcquire(T& x) noexcept {
    return std::atomic_ref<T>(x).load(std::memory_order_acquire);
  }
  template <class T>
  static T loadRelaxed(T& x) noexcept {
    return std::atomic_ref<T>(x).load(std::memory_order_relaxed);
  }
  template <class T>
  static void storeRelease(T& x, T v) noexcept {
    std::atomic_ref<T>(x).store(v, std::memory_order_release);
  }
  template <class T>
  static void storeRelaxed(T& x, T v) noexcept {
    std::atomic_ref<T>(x).store(v, std::memory_order_relaxed);
  }
};

// A frame as the consumer sees it: a read-only view into the ring, valid until release().
struct Frame {
  uint16_t tag = 0;
  std::span<const std::byte> payload;
};

// A view of a ring's memory shared by the producer and consumer classes below.
struct RingView {
  RingControl* control = nullptr;
  std::byte* data = nullptr;
  uint64_t capacity = 0;

  static RingView of(std::byte* memory, uint64_t capacity) {
    return {reinterpret_cast<RingControl*>(memory), memory + RING_CONTROL_BYTES, capacity};
  }
  uint64_t mask() const { return capacity - 1; }
  uint64_t maxPayload() const { return ringMaxPayload(capacity); }
};

// Where a reserved frame lies: `pad` bytes of PAD frame at `start`, then the frame's header and
// `slotPayload` bytes of (zeroed) payload; `requested` is what the caller asked for.
struct RingSlot {
  uint64_t start = 0;
  uint64_t pad = 0;
  uint64_t slotPayload = 0;
  uint64_t requested = 0;
  uint64_t end() const { return start + pad + FRAME_HEADER_BYTES + slotPayload; }
};

namespace ring_detail {
// Checks a frame size and computes the slot for a frame starting at `at`.
RingSlot planSlot(const RingView& v, uint64_t at, uint64_t bytes);
// Writes the pad (if any) and the frame header (and a trailing pad for a short commit).
template <class Sync>
void writeSlot(const RingView& v, const RingSlot& s, uint64_t length, uint16_t tag);
Error tooLarge();
}  // namespace ring_detail

// The single producer. Owned by one sender endpoint; not thread-safe.
template <class Sync>
class RingProducer {
 public:
  RingProducer() = default;
  // Takes up production at the published tail (a fresh ring: 0).
  // In shared scope both indices may have been written by the peer: they are validated here and
  // an impossible pair poisons the producer.
  explicit RingProducer(RingView v) noexcept
      : v_(v),
        tail_(Sync::loadRelaxed(v.control->tail)),
        published_(tail_),
        cachedHead_(Sync::loadAcquire(v.control->head)) {
    if (tail_ % FRAME_ALIGN != 0 || cachedHead_ % FRAME_ALIGN != 0 || cachedHead_ > tail_ ||
        tail_ - cachedHead_ > v.capacity)
      poison_ = Error(Errc::PROTOCOL_ERROR, "ring indices are inconsistent at attach");
  }

  // Reserves a zeroed, 8-byte-aligned span of `bytes` in place. WOULD_BLOCK when the ring lacks
  // space (nothing changes), MESSAGE_TOO_LARGE above maxPayload(), PROTOCOL_ERROR (sticky) when
  // the consumer published an impossible head.
  Result<std::span<std::byte>> tryReserve(size_t bytes) noexcept;
  // Completes the reservation with `length` <= reserved bytes. `publish`: make it (and any
  // earlier unpublished frame) visible now; otherwise it waits for publish().
  void commit(size_t length, uint16_t tag, bool publish) noexcept;
  // Drops the reservation; nothing becomes visible.
  void abandon() noexcept { reserved_ = false; }
  // Stores the private tail to the shared tail (release). Returns whether anything was new.
  bool publish() noexcept;

  bool hasReservation() const noexcept { return reserved_; }
  Status status() const noexcept {
    if (poison_.code == Errc::OK) return {};
    return poison_;
  }

 private:
  bool refreshHead() noexcept;

  RingView v_;
  uint64_t tail_ = 0;        // private: end of the last committed frame
  uint64_t published_ = 0;   // last value stored to control->tail
  uint64_t cachedHead_ = 0;  // last validated consumer index
  RingSlot slot_;
  bool reserved_ = false;
  Error poison_;
};

// Several producers of one process (local scope). Thread-safe; owned by the channel.
class RingMultiProducer {
 public:
  explicit RingMultiProducer(RingView v) noexcept : v_(v) {}

  // Claims a slot of `bytes` and zeroes its payload. Same errors as RingProducer::tryReserve.
  Result<RingSlot> tryClaim(size_t bytes) noexcept;
  // Fills in the frame and publishes it in claim order (waits for earlier claims to publish).
  void commit(const RingSlot& slot, size_t length, uint16_t tag) noexcept;
  // Publishes the slot as padding.
  void abandon(const RingSlot& slot) noexcept;
  std::byte* payload(const RingSlot& s) const noexcept {
    return v_.data + ((s.start + s.pad) & v_.mask()) + FRAME_HEADER_BYTES;
  }

 private:
  void publishInOrder(const RingSlot& slot) noexcept;
  void writePadding(uint64_t at, uint64_t bytes) noexcept;

  RingView v_;
  alignas(RING_LINE) std::atomic<uint64_t> claim_{0};  // next unclaimed byte index
};

// The single consumer. Owned by the receiver endpoint; not thread-safe.
template <class Sync>
class RingConsumer {
 public:
  RingConsumer() = default;
  // In shared scope head may have been written by the peer: a misaligned one poisons at once
  // (every frame position must stay 8-byte aligned).
  explicit RingConsumer(RingView v) noexcept
      : v_(v), head_(Sync::loadRelaxed(v.control->head)), cachedTail_(head_) {
    if (head_ % FRAME_ALIGN != 0)
      poison_ = Error(Errc::PROTOCOL_ERROR, "ring head index is misaligned at attach");
  }

  // The next frame, in place. WOULD_BLOCK when none is published; PROTOCOL_ERROR (sticky) when
  // the producer published an impossible tail or a malformed frame. The view stays valid until
  // release(); calling tryPeek() again before release() is a precondition violation.
  Result<Frame> tryPeek() noexcept;
  // Hands the peeked frame's space back to the producer (release store of head).
  void release() noexcept;

  bool hasFrame() const noexcept { return pending_ != 0; }
  Status status() const noexcept {
    if (poison_.code == Errc::OK) return {};
    return poison_;
  }
  // Re-reads the published tail; true when frames (or padding) are waiting. Poisons on a bad tail.
  bool refreshTail() noexcept;
  // True (once) when tryPeek consumed padding and published head: the caller should ring the
  // producers' space doorbell.
  bool takeSkippedPadding() noexcept { return std::exchange(skippedPadding_, false); }

 private:
  Error fail(const char* detail) noexcept {
    poison_ = Error(Errc::PROTOCOL_ERROR, detail);
    return poison_;
  }

  RingView v_;
  uint64_t head_ = 0;        // private: start of the next unread frame
  uint64_t cachedTail_ = 0;  // last validated producer index
  uint64_t pending_ = 0;     // bytes of the peeked frame
  bool skippedPadding_ = false;
  Error poison_;
};

// ---- implementation of the templates ----

namespace ring_detail {

template <class Sync>
void writeSlot(const RingView& v, const RingSlot& s, uint64_t length, uint16_t tag) {
  auto put = [&](uint64_t index, uint64_t word) {
    Sync::storeRelaxed(*reinterpret_cast<uint64_t*>(v.data + (index & v.mask())), word);
  };
  if (s.pad != 0)
    put(s.start,
        encodeFrameHeader(static_cast<uint32_t>(s.pad - FRAME_HEADER_BYTES), 0, FRAME_FLAG_PAD));
  uint64_t frameAt = s.start + s.pad;
  put(frameAt, encodeFrameHeader(static_cast<uint32_t>(length), tag, 0));
  uint64_t used = alignFrame(length);
  if (used < s.slotPayload)  // only multi-producer slots: the claim cannot shrink
    put(frameAt + FRAME_HEADER_BYTES + used,
        encodeFrameHeader(static_cast<uint32_t>(s.slotPayload - used - FRAME_HEADER_BYTES), 0,
                          FRAME_FLAG_PAD));
}

}  // namespace ring_detail

template <class Sync>
bool RingProducer<Sync>::refreshHead() noexcept {
  uint64_t head = Sync::loadAcquire(v_.control->head);  // read once; untrusted
  if (head < cachedHead_ || head > published_ || head % FRAME_ALIGN != 0) {
    poison_ = Error(Errc::PROTOCOL_ERROR,
                    "receiver published a head index that is misaligned, moved backwards or "
                    "passed the published tail");
    return false;
  }
  cachedHead_ = head;
  return true;
}

template <class Sync>
Result<std::span<std::byte>> RingProducer<Sync>::tryReserve(size_t bytes) noexcept {
  if (poison_.code != Errc::OK) return poison_;
  AGATE_REQUIRE(!reserved_, "tryReserve with a reservation outstanding (%zu bytes)", bytes);
  if (bytes > v_.maxPayload()) return ring_detail::tooLarge();
  RingSlot slot = ring_detail::planSlot(v_, tail_, bytes);
  if (slot.end() - cachedHead_ > v_.capacity) {
    if (!refreshHead()) return poison_;
    if (slot.end() - cachedHead_ > v_.capacity) return Error(Errc::WOULD_BLOCK, "ring is full");
  }
  std::byte* payload = v_.data + ((slot.start + slot.pad) & v_.mask()) + FRAME_HEADER_BYTES;
  std::memset(payload, 0, slot.slotPayload);
  slot_ = slot;
  reserved_ = true;
  return std::span<std::byte>(payload, bytes);
}

template <class Sync>
void RingProducer<Sync>::commit(size_t length, uint16_t tag, bool publishNow) noexcept {
  AGATE_REQUIRE(reserved_, "commit without a reservation");
  AGATE_REQUIRE(length <= slot_.requested, "commit of %zu bytes exceeds the %llu reserved", length,
                static_cast<unsigned long long>(slot_.requested));
  RingSlot s = slot_;
  s.slotPayload = alignFrame(length);  // a single producer shrinks the slot to what is used
  ring_detail::writeSlot<Sync>(v_, s, length, tag);
  tail_ = s.end();
  reserved_ = false;
  if (publishNow) publish();
}

template <class Sync>
bool RingProducer<Sync>::publish() noexcept {
  if (published_ == tail_) return false;
  // Release: the frame bytes written above happen-before a consumer's acquire load of tail.
  Sync::storeRelease(v_.control->tail, tail_);
  published_ = tail_;
  return true;
}

template <class Sync>
bool RingConsumer<Sync>::refreshTail() noexcept {
  if (poison_.code != Errc::OK) return false;
  uint64_t tail = Sync::loadAcquire(v_.control->tail);  // read once; untrusted
  if (tail < cachedTail_ || tail % FRAME_ALIGN != 0 || tail - head_ > v_.capacity) {
    (void)fail(
        "sender published a tail index that is misaligned, moved backwards or runs more than "
        "the capacity ahead of head");
    return false;
  }
  cachedTail_ = tail;
  return tail != head_;
}

template <class Sync>
Result<Frame> RingConsumer<Sync>::tryPeek() noexcept {
  if (poison_.code != Errc::OK) return poison_;
  AGATE_REQUIRE(pending_ == 0, "tryPeek before the previous frame was released");
  for (;;) {
    if (head_ == cachedTail_ && !refreshTail()) {
      if (poison_.code != Errc::OK) return poison_;
      return Error(Errc::WOULD_BLOCK, "ring is empty");
    }
    // Both indices are validated: 8 <= available <= capacity, both multiples of 8.
    uint64_t available = cachedTail_ - head_;
    uint64_t offset = head_ & v_.mask();
    uint64_t toEnd = v_.capacity - offset;
    // The header is read exactly once; everything below works on these locals.
    uint64_t word = Sync::loadRelaxed(*reinterpret_cast<uint64_t*>(v_.data + offset));
    uint64_t length = word & 0xffff'ffffu;
    auto tag = static_cast<uint16_t>(word >> 32);
    auto flags = static_cast<uint16_t>(word >> 48);
    uint64_t frameBytes = FRAME_HEADER_BYTES + alignFrame(length);
    if (flags == FRAME_FLAG_PAD) {
      if (tag != 0 || length % FRAME_ALIGN != 0)
        return fail("padding frame has a tag or an unaligned length");
      if (frameBytes > toEnd) return fail("padding frame runs past the end of the ring");
      if (frameBytes > available) return fail("padding frame runs past the published tail");
      // Padding is consumed at once and published, so a producer waiting for space never waits
      // on padding that no later frame would release.
      head_ += frameBytes;
      Sync::storeRelease(v_.control->head, head_);
      skippedPadding_ = true;
      continue;
    }
    if (flags != 0) return fail("frame header carries unknown flags");
    if (frameBytes > toEnd) return fail("frame crosses the end of the ring");
    if (frameBytes > available) return fail("frame runs past the published tail");
    pending_ = frameBytes;
    return Frame{tag, std::span<const std::byte>(v_.data + offset + FRAME_HEADER_BYTES, length)};
  }
}

template <class Sync>
void RingConsumer<Sync>::release() noexcept {
  AGATE_REQUIRE(pending_ != 0, "release without a peeked frame");
  head_ += pending_;
  pending_ = 0;
  // Release: our reads of the frame happen-before the producer reuses its bytes.
  Sync::storeRelease(v_.control->head, head_);
}

}  // namespace agate
