// Ring: a single-consumer ring of variable-length frames in memory given to it.
//
// The ring is the data path of every Agate channel. It lives in one block of memory (anonymous
// for private/local scope, a sealed memfd for shared scope): a 512-byte control block followed by
// a data area of `capacity` bytes (a power of two, at least 64).
//
// Control block (byte offsets from the start of the mapping; one 64-byte line each, so the
// producer's and the consumer's hot words never share a line):
//     0  RingHeader   magic, version, control-block size, capacity      (immutable after init)
//    64  tail         producer's committed index, published at each publish (see below)
//   128  head         consumer's released index: bytes ever handed back (release / acquire)
//   192  dataBell     DoorbellWord the consumer parks on; the producer rings it
//   256  spaceBell    DoorbellWord producers park on when full; the consumer rings it
//   320  senders      attached-sender count | CLOSED_BIT once the last sender detached
//   384  receiver     1 while the receiver is attached | CLOSED_BIT once it detached
//   448  (reserved, zero)
//   512  data area
//
// Indices are monotonic 64-bit byte counts; the position in the data area is `index & (cap-1)`
// and the *lap* of an index is `index / capacity`. 0 <= tail - head <= capacity - 8 always holds,
// and both are multiples of 8.
//
// Frames: an 8-byte header (a little-endian 64-bit word), then the payload, padded to a multiple
// of 8. Header bits 0-31: payload length; 32-47: a user tag; 48-55: flags (PAD = 1); 56-62: the low
// seven bits of the lap of the header's own index; 63: COMMITTED, always 1. So a published header
// is never zero, and zero means "nothing published here yet". A frame never crosses the end of the
// data area: when it would, the producer first writes a PAD frame (flags = PAD) whose payload runs
// exactly to the end, and the real frame starts at position 0 — so every payload is one
// contiguous, 8-byte-aligned span, as Cap'n Proto's flat-array reader wants. The largest payload
// is capacity/2 - 8: a frame of at most half the ring always fits, wherever the tail stands, once
// the ring has drained (either before the wrap or after the pad).
//
// Publication is the header word itself (version 2; version 1 published a tail index). The
// consumer polls the header at its own head: one cache line per frame crosses between the cores,
// the line that also carries the payload of a small frame, as in a bare cache-line ping-pong. The
// producer's tail line is never on the consumer's path. For a frame (or a run of frames) the
// producer writes, in this order: the payload; a zero *terminator* word at the frame's end (where
// the next header will go); every header but the first, relaxed; then the first header, with
// release. The consumer loads the header at head with acquire: zero → nothing yet; otherwise the
// frame, its payload and the terminator behind it are all visible. The terminator is what makes
// the scheme sound with variable-length frames: the word at the consumer's next head position may
// hold stale bytes of an older lap (the middle of an old payload, which can look like anything),
// so the producer clears it before it publishes the frame in front of it, and it needs 8 bytes of
// headroom to do so (a frame is reserved only if its end + 8 is within capacity of head). The lap
// stamp is the cross-check: a non-zero header whose stamp is not that of the consumer's own head
// (a stale header of an older lap, or a forgery) poisons the consumer, it is never taken for a new
// frame. The terminator is the guarantee (an honest producer never leaves stale bytes where the
// consumer looks); the stamp, seven bits of lap, catches a producer that broke it with a header
// left from up to 127 laps before.
//
// `tail` still records the producer's committed index, stored (release) whenever frames are
// published: a producer that attaches later resumes there, the LOCAL multi-producer ring uses it
// as its commit ticket, and tools read it. The consumer never reads it. The consumer's `head` is
// published when a frame is released, or lazily (releaseLazily: at least every capacity/4 bytes,
// and whenever the caller publishes) so that a producer refreshing its view of the free space
// pulls that line rarely.
//
// Trust: the consumer never trusts the producer and vice versa. Each side keeps its own index
// privately and only *publishes* it. The producer reads the consumer's head once into a local and
// validates it (aligned, monotonic, not past the published tail). The consumer reads every frame
// header once into a local and checks it before use: committed and stamped with the lap of head,
// known flags, at most half the ring, not crossing the wrap. Any violation poisons that side with
// PROTOCOL_ERROR (sticky), and nothing is read or written out of bounds. A producer that writes a
// flood of padding cannot hold the consumer in one call: at most a ring's worth of padding is
// skipped per tryPeek. Payload bytes stay writable by the peer: a consumer must treat them as
// hostile while it reads them (validate, copy what it keeps).
//
// A producer killed mid-frame leaves no torn frame: the header, written last, is what publishes.
//
// Producers: RingProducer<Sync> is the single-producer side. It batches with commit(publish =
// false): the first header of an unpublished run is held back in the producer, and publish()
// stores it, which makes the whole run visible at once. RingMultiProducer (local scope only) lets
// several threads of one process produce into one ring:
//   * a producer claims [start, start+size) with a CAS on a claim index private to the process
//     (the claim check reads head with acquire, so claimed space is never still being read);
//   * it zeroes and fills its payload with no lock held, concurrently with other producers;
//   * it publishes in claim order: at commit it waits (spin, then yield) until tail == start
//     (acquire), writes its headers and terminator as above, then stores tail = start+size with
//     release. Waiting first matters: the previous slot's terminator lies where this slot's
//     first header goes. A frame committed shorter than its claim leaves the rest of the slot as
//     a PAD frame; an abandoned claim becomes PAD frames.
// So the consumer sees exactly the single-producer format. The cost: a producer that holds a
// claim for long delays the *commit* (not the writing) of later producers. Rule: a thread holds
// at most one outstanding reservation per ring, or it can wait on itself.
//
// Sync policies: AtomicSync accesses the shared words through std::atomic_ref with the named
// memory orders (local and shared scope); PlainSync uses plain loads and stores and no fences
// (private scope: one thread). Templates, not virtual calls: the hot path is branch-free of scope.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>

#include "agate/runtime/doorbell.h"
#include "agate/runtime/result.h"

namespace agate {

inline constexpr uint64_t RING_MAGIC = 0x31474e5241474141ull;  // "AAGARNG1" little-endian
inline constexpr uint32_t RING_VERSION = 2;                    // 2: header-word publication
inline constexpr size_t RING_LINE = 64;
inline constexpr size_t FRAME_HEADER_BYTES = 8;
inline constexpr size_t FRAME_ALIGN = 8;
inline constexpr uint64_t RING_MIN_CAPACITY = 64;
inline constexpr uint64_t RING_MAX_CAPACITY = uint64_t{1} << 31;  // payload length fits 32 bits
inline constexpr uint8_t FRAME_FLAG_PAD = 1;
inline constexpr uint32_t ATTACH_CLOSED_BIT = 0x8000'0000u;

// The header word's fields (see the overview).
inline constexpr unsigned FRAME_TAG_SHIFT = 32;
inline constexpr unsigned FRAME_FLAGS_SHIFT = 48;
inline constexpr unsigned FRAME_STAMP_SHIFT = 56;
inline constexpr uint8_t FRAME_STAMP_COMMITTED = 0x80;
inline constexpr uint8_t FRAME_STAMP_LAP_MASK = 0x7f;

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
// The stamp (bits 56-63) of a header published at byte index `index` of a ring whose capacity
// is 1 << lapShift: COMMITTED and the low bits of the index's lap.
constexpr uint8_t frameStamp(uint64_t index, uint32_t lapShift) {
  return static_cast<uint8_t>(FRAME_STAMP_COMMITTED | ((index >> lapShift) & FRAME_STAMP_LAP_MASK));
}
constexpr uint64_t encodeFrameHeader(uint32_t length, uint16_t tag, uint8_t flags, uint8_t stamp) {
  return uint64_t{length} | (uint64_t{tag} << FRAME_TAG_SHIFT) |
         (uint64_t{flags} << FRAME_FLAGS_SHIFT) | (uint64_t{stamp} << FRAME_STAMP_SHIFT);
}

// Writes a fresh control block (zeroed, header filled) at `memory`, which must hold
// RING_CONTROL_BYTES + capacity bytes and be 64-byte aligned, with the data area zeroed (fresh
// anonymous or memfd memory is). Call before anyone else can see it.
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
  uint32_t lapShift = 0;  // log2(capacity): index >> lapShift is the index's lap

  static RingView of(std::byte* memory, uint64_t capacity) {
    return {reinterpret_cast<RingControl*>(memory), memory + RING_CONTROL_BYTES, capacity,
            static_cast<uint32_t>(std::countr_zero(capacity))};
  }
  uint64_t mask() const { return capacity - 1; }
  uint64_t maxPayload() const { return ringMaxPayload(capacity); }
  // The header word at byte index `index` (any lap).
  uint64_t& wordAt(uint64_t index) const {
    return *reinterpret_cast<uint64_t*>(data + (index & mask()));
  }
  uint8_t stampAt(uint64_t index) const { return frameStamp(index, lapShift); }
};

// Where a reserved frame lies: `pad` bytes of PAD frame at `start`, then the frame's header and
// `slotPayload` bytes of (zeroed) payload; `requested` is what the caller asked for. The 8 bytes
// at end() are the slot's terminator: reserved with it, and the next slot's first header.
struct RingSlot {
  uint64_t start = 0;
  uint64_t pad = 0;
  uint64_t slotPayload = 0;
  uint64_t requested = 0;
  uint64_t frameAt() const { return start + pad; }
  uint64_t end() const { return start + pad + FRAME_HEADER_BYTES + slotPayload; }
  // Whether the slot and its terminator fit in a ring whose consumer has released up to `head`.
  bool fits(uint64_t head, uint64_t capacity) const {
    return end() + FRAME_HEADER_BYTES - head <= capacity;
  }
};

namespace ring_detail {
// The slot for a frame of `bytes` (<= maxPayload) starting at `at`.
inline RingSlot planSlot(const RingView& v, uint64_t at, uint64_t bytes) {
  RingSlot s;
  s.start = at;
  s.requested = bytes;
  s.slotPayload = alignFrame(bytes);
  uint64_t need = FRAME_HEADER_BYTES + s.slotPayload;
  uint64_t toEnd = v.capacity - (at & v.mask());
  s.pad = need <= toEnd ? 0 : toEnd;  // toEnd >= 8: indices are multiples of 8
  return s;
}
inline uint64_t padHeader(const RingView& v, uint64_t at, uint64_t bytes) {
  return encodeFrameHeader(static_cast<uint32_t>(bytes - FRAME_HEADER_BYTES), 0, FRAME_FLAG_PAD,
                           v.stampAt(at));
}
// Writes a committed slot — terminator, trailing pad of a short multi-producer commit, frame
// header — except the header word at s.start (the leading pad's, or else the frame's), which it
// returns: the caller stores that word last, with release, and so publishes the slot.
template <class Sync>
uint64_t writeSlot(const RingView& v, const RingSlot& s, uint64_t length, uint16_t tag);
// The same for a slot given up: padding throughout.
template <class Sync>
uint64_t writeAbandonedSlot(const RingView& v, const RingSlot& s);
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
        tail_(Sync::loadAcquire(v.control->tail)),
        published_(tail_),
        cachedHead_(Sync::loadAcquire(v.control->head)) {
    if (tail_ % FRAME_ALIGN != 0 || cachedHead_ % FRAME_ALIGN != 0 || cachedHead_ > tail_ ||
        tail_ - cachedHead_ > v.capacity - FRAME_HEADER_BYTES)
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
  // Makes every committed frame visible: stores the held-back first header of the unpublished
  // run (release), then the tail. Returns whether anything was new.
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
  uint64_t published_ = 0;   // end of the last published frame; the last value stored to tail
  uint64_t heldAt_ = 0;      // while published_ != tail_: index of the run's first header ...
  uint64_t heldWord_ = 0;    // ... and the word to store there to publish the run
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
    return v_.data + (s.frameAt() & v_.mask()) + FRAME_HEADER_BYTES;
  }

 private:
  // Waits for earlier claims, stores `first` at slot.start (release), passes the ticket on.
  void publishInOrder(const RingSlot& slot, uint64_t first) noexcept;

  RingView v_;
  alignas(RING_LINE) std::atomic<uint64_t> claim_{0};  // next unclaimed byte index
};

// The single consumer. Owned by the receiver endpoint; not thread-safe.
template <class Sync>
class RingConsumer {
 public:
  RingConsumer() = default;
  // In shared scope head may have been written by the peer: a misaligned one poisons at once
  // (every frame position must stay 8-byte aligned). Acquire: the frames a previous consumer
  // released, and the terminators behind them, are visible to this one.
  explicit RingConsumer(RingView v) noexcept
      : v_(v), head_(Sync::loadAcquire(v.control->head)), publishedHead_(head_) {
    if (head_ % FRAME_ALIGN != 0)
      poison_ = Error(Errc::PROTOCOL_ERROR, "ring head index is misaligned at attach");
  }

  // The next frame, in place. WOULD_BLOCK when none is published (or after skipping a ring's
  // worth of padding in this call); PROTOCOL_ERROR (sticky) when the producer published a
  // malformed header. The view stays valid until release(); calling tryPeek() again before
  // release() is a precondition violation.
  Result<Frame> tryPeek() noexcept;
  // Hands the peeked frame's space back to the producer: publishes head now (release).
  void release() noexcept;
  // Hands it back privately; head is published once capacity/4 bytes are unpublished, at the
  // next release(), publishHead() or skipped padding. Saves the producer pulling head's line
  // for every frame; a caller that then waits must publishHead() first. Returns whether it
  // published (the caller then rings the producers' space doorbell).
  bool releaseLazily() noexcept;
  // Publishes head if it moved since last published. Returns whether it did.
  bool publishHead() noexcept;

  bool hasFrame() const noexcept { return pending_ != 0; }
  Status status() const noexcept {
    if (poison_.code == Errc::OK) return {};
    return poison_;
  }
  // True (once) when tryPeek consumed padding and published head: the caller should ring the
  // producers' space doorbell.
  bool takeSkippedPadding() noexcept { return std::exchange(skippedPadding_, false); }

 private:
  Error fail(const char* detail) noexcept {
    poison_ = Error(Errc::PROTOCOL_ERROR, detail);
    return poison_;
  }

  RingView v_;
  uint64_t head_ = 0;           // private: start of the next unread frame
  uint64_t publishedHead_ = 0;  // last value stored to control->head
  uint64_t pending_ = 0;        // bytes of the peeked frame
  bool skippedPadding_ = false;
  Error poison_;
};

// ---- implementation of the templates ----

namespace ring_detail {

template <class Sync>
uint64_t writeSlot(const RingView& v, const RingSlot& s, uint64_t length, uint16_t tag) {
  // The terminator first: the consumer must find zero, not an older lap's bytes, at end().
  Sync::storeRelaxed(v.wordAt(s.end()), uint64_t{0});
  uint64_t frameAt = s.frameAt();
  uint64_t used = alignFrame(length);
  if (used < s.slotPayload) {  // only multi-producer slots: the claim cannot shrink
    uint64_t at = frameAt + FRAME_HEADER_BYTES + used;
    Sync::storeRelaxed(v.wordAt(at), padHeader(v, at, s.slotPayload - used));
  }
  uint64_t frame = encodeFrameHeader(static_cast<uint32_t>(length), tag, 0, v.stampAt(frameAt));
  if (s.pad == 0) return frame;
  Sync::storeRelaxed(v.wordAt(frameAt), frame);
  return padHeader(v, s.start, s.pad);
}

template <class Sync>
uint64_t writeAbandonedSlot(const RingView& v, const RingSlot& s) {
  Sync::storeRelaxed(v.wordAt(s.end()), uint64_t{0});
  // A leading pad (if any) ends at the wrap; the frame part never crosses it: two pad frames.
  uint64_t frame = padHeader(v, s.frameAt(), FRAME_HEADER_BYTES + s.slotPayload);
  if (s.pad == 0) return frame;
  Sync::storeRelaxed(v.wordAt(s.frameAt()), frame);
  return padHeader(v, s.start, s.pad);
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

namespace ring_detail {

// How many cache lines past a reserved frame the producer asks for ahead of writing them.
inline constexpr uint64_t PREFETCH_LINES = 4;
// How many lines past a frame the consumer asks for as it takes the frame (RingConsumer::tryPeek):
// in one sitting, calls in flight +3-7 % and chain10 +4 %, the polled round trip unchanged.
inline constexpr uint64_t READ_AHEAD_LINES = 2;

// Asks for the cache line holding `p` in a writable state (PREFETCHW on x86-64: Broadwell and
// later, a no-op on older cores). A hint only: nothing is read or written.
inline void prefetchForWrite(const std::byte* p) noexcept {
#if defined(__x86_64__)
  asm volatile("prefetchw %0" : : "m"(*reinterpret_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1);
#endif
}

}  // namespace ring_detail

template <class Sync>
Result<std::span<std::byte>> RingProducer<Sync>::tryReserve(size_t bytes) noexcept {
  if (poison_.code != Errc::OK) return poison_;
  AGATE_REQUIRE(!reserved_, "tryReserve with a reservation outstanding (%zu bytes)", bytes);
  if (bytes > v_.maxPayload()) return ring_detail::tooLarge();
  RingSlot slot = ring_detail::planSlot(v_, tail_, bytes);
  if (!slot.fits(cachedHead_, v_.capacity)) {
    if (!refreshHead()) return poison_;
    if (!slot.fits(cachedHead_, v_.capacity)) return Error(Errc::WOULD_BLOCK, "ring is full");
  }
  std::byte* payload = v_.data + (slot.frameAt() & v_.mask()) + FRAME_HEADER_BYTES;
  std::memset(payload, 0, slot.slotPayload);
  slot_ = slot;
  reserved_ = true;
  // The lines the next frames will take were last read by the consumer (a lap ago), so writing
  // them needs each line back from the consumer's core; asking for them now, while this frame is
  // built and sent, takes that wait off the next send (calls in flight +15 %, bench/ rpc).
  for (uint64_t line = 0; line < ring_detail::PREFETCH_LINES; ++line)
    ring_detail::prefetchForWrite(v_.data + ((slot.end() + line * RING_LINE) & v_.mask()));
  return std::span<std::byte>(payload, bytes);
}

template <class Sync>
void RingProducer<Sync>::commit(size_t length, uint16_t tag, bool publishNow) noexcept {
  AGATE_REQUIRE(reserved_, "commit without a reservation");
  AGATE_REQUIRE(length <= slot_.requested, "commit of %zu bytes exceeds the %llu reserved", length,
                static_cast<unsigned long long>(slot_.requested));
  RingSlot s = slot_;
  s.slotPayload = alignFrame(length);  // a single producer shrinks the slot to what is used
  uint64_t first = ring_detail::writeSlot<Sync>(v_, s, length, tag);
  if (published_ == tail_) {
    // The first frame of an unpublished run: its first header is held back; storing it is what
    // publishes the run.
    heldAt_ = s.start;
    heldWord_ = first;
  } else {
    // Behind a held header: the consumer cannot reach this one before publish().
    Sync::storeRelaxed(v_.wordAt(s.start), first);
  }
  tail_ = s.end();
  reserved_ = false;
  if (publishNow) publish();
}

template <class Sync>
bool RingProducer<Sync>::publish() noexcept {
  if (published_ == tail_) return false;
  // Release: the run's payloads, later headers and terminator happen-before a consumer's acquire
  // load of this header.
  Sync::storeRelease(v_.wordAt(heldAt_), heldWord_);
  published_ = tail_;
  // For a producer attaching later and for tools; the consumer never reads it.
  Sync::storeRelease(v_.control->tail, tail_);
  return true;
}

template <class Sync>
Result<Frame> RingConsumer<Sync>::tryPeek() noexcept {
  if (poison_.code != Errc::OK) return poison_;
  AGATE_REQUIRE(pending_ == 0, "tryPeek before the previous frame was released");
  for (uint64_t skipped = 0;;) {
    uint64_t offset = head_ & v_.mask();
    uint64_t toEnd = v_.capacity - offset;
    // The header is read exactly once; everything below works on these locals. Acquire: if it
    // is a header, the frame's payload and the terminator behind it are visible too.
    uint64_t word = Sync::loadAcquire(*reinterpret_cast<uint64_t*>(v_.data + offset));
    if (word == 0) return Error(Errc::WOULD_BLOCK, "ring is empty");
    auto stamp = static_cast<uint8_t>(word >> FRAME_STAMP_SHIFT);
    auto flags = static_cast<uint8_t>(word >> FRAME_FLAGS_SHIFT);
    auto tag = static_cast<uint16_t>(word >> FRAME_TAG_SHIFT);
    uint64_t length = word & 0xffff'ffffu;
    uint64_t frameBytes = FRAME_HEADER_BYTES + alignFrame(length);
    if (stamp != v_.stampAt(head_))
      return fail("frame header is not committed or carries another lap's stamp");
    if (frameBytes > v_.capacity / 2) return fail("frame is larger than half the ring");
    if (frameBytes > toEnd) return fail("frame crosses the end of the ring");
    if (flags == FRAME_FLAG_PAD) {
      if (tag != 0 || length % FRAME_ALIGN != 0)
        return fail("padding frame has a tag or an unaligned length");
      // Padding is consumed at once and published, so a producer waiting for space never waits
      // on padding that no later frame would release.
      head_ += frameBytes;
      publishHead();
      skippedPadding_ = true;
      skipped += frameBytes;
      if (skipped >= v_.capacity) return Error(Errc::WOULD_BLOCK, "a ring's worth of padding");
      continue;
    }
    if (flags != 0) return fail("frame header carries unknown flags");
    pending_ = frameBytes;
    // Read ahead: the lines after this frame hold the next frames when the producer is ahead (a
    // burst of calls or returns), fetched while this one is handled. A hint only; the header is
    // still read once, above, when its turn comes.
    for (uint64_t line = 0; line < ring_detail::READ_AHEAD_LINES; ++line)
      __builtin_prefetch(v_.data + ((offset + frameBytes + line * RING_LINE) & v_.mask()), 0);
    return Frame{tag, std::span<const std::byte>(v_.data + offset + FRAME_HEADER_BYTES, length)};
  }
}

template <class Sync>
void RingConsumer<Sync>::release() noexcept {
  AGATE_REQUIRE(pending_ != 0, "release without a peeked frame");
  head_ += pending_;
  pending_ = 0;
  publishHead();
}

template <class Sync>
bool RingConsumer<Sync>::releaseLazily() noexcept {
  AGATE_REQUIRE(pending_ != 0, "release without a peeked frame");
  head_ += pending_;
  pending_ = 0;
  return head_ - publishedHead_ >= v_.capacity / 4 && publishHead();
}

template <class Sync>
bool RingConsumer<Sync>::publishHead() noexcept {
  if (head_ == publishedHead_) return false;
  // Release: our reads of the frames happen-before the producer reuses their bytes.
  Sync::storeRelease(v_.control->head, head_);
  publishedHead_ = head_;
  return true;
}

}  // namespace agate
