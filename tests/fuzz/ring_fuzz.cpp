// The ring consumer on memory a hostile producer laid out: see fuzz_targets.h.
#include <atomic>
#include <bit>
#include <cstring>
#include <memory>

#include "agate/runtime/channel.h"
#include "agate/runtime/message_channel.h"
#include "fuzz_targets.h"

namespace agate::fuzz {
namespace {

constexpr uint64_t CAPACITY = 512;  // small, so inputs cover the wrap and the whole data area
constexpr uint32_t LAP_SHIFT = std::countr_zero(CAPACITY);
// Each served frame advances the consumer by at least one 8-byte header, and a header is taken
// only with the stamp of the consumer's lap, which nothing rewrites here: once the consumer is a
// whole lap on, every stamp it meets is stale. A consumer that serves more follows a cycle.
constexpr int MAX_FRAMES = CAPACITY / FRAME_HEADER_BYTES + 1;

// The producer-writable parts of a ring: the control block's index and attach words and the data
// area. The header line (magic, capacity) is checked once when a SHARED ring is opened and is not
// re-read by the consumer; the receiver's own attach word and the doorbells are left alone (a
// forged doorbell only costs wakeups, see doorbell.h). The consumer ignores `tail` (it polls the
// frame headers), so a forged tail must change nothing: it is forged anyway.
struct Layout {
  uint64_t tail = 0;
  uint64_t head = 0;
  uint32_t senders = 1;
  std::byte data[CAPACITY] = {};
};

uint64_t wordAt(std::span<const std::byte> in, size_t i) {
  uint64_t w = 0;
  if (in.size() >= (i + 1) * 8) std::memcpy(&w, in.data() + i * 8, 8);
  return w;
}

// The input as the payload of one well-formed frame, placed so that the tail sometimes wraps
// (a PAD frame first): reaches the message decoder with ring framing that is right.
Layout framed(std::span<const std::byte> in) {
  Layout l;
  const uint64_t length = std::min<uint64_t>(in.size(), CAPACITY / 2 - FRAME_HEADER_BYTES);
  const uint64_t slot = FRAME_HEADER_BYTES + alignFrame(length);
  uint64_t start = (in.size() * 40) % CAPACITY;  // a multiple of 8
  l.head = start;
  if (start + slot > CAPACITY) {  // pad to the end, then the frame at 0 (of the next lap)
    const uint64_t pad = CAPACITY - start;
    const uint64_t padHeader = encodeFrameHeader(static_cast<uint32_t>(pad - FRAME_HEADER_BYTES), 0,
                                                 FRAME_FLAG_PAD, frameStamp(start, LAP_SHIFT));
    std::memcpy(l.data + start, &padHeader, 8);
    start = CAPACITY;
  }
  const uint64_t at = start % CAPACITY;
  const uint64_t header =
      encodeFrameHeader(static_cast<uint32_t>(length), 0x77, 0, frameStamp(start, LAP_SHIFT));
  std::memcpy(l.data + at, &header, 8);
  if (length > 0)
    std::memcpy(l.data + at + FRAME_HEADER_BYTES, in.data(), length);  // data() may be null
  l.tail = start + slot;
  return l;
}

// The input as raw ring memory: words 0-2 are tail, head and the senders word, the rest fills
// the data area (repeated). Run twice: with those words as given, and folded into range: head
// aligned, and three words in four stamped with the lap the consumer would expect there (the
// words before head's position belong to the next lap), so the checks after the stamp's are
// reached; the fourth keeps its input stamp, usually a stale or forged one.
Layout raw(std::span<const std::byte> in, bool fold) {
  Layout l;
  l.tail = wordAt(in, 0);
  l.head = wordAt(in, 1);
  l.senders = static_cast<uint32_t>(wordAt(in, 2));
  std::span<const std::byte> body = in.size() > 24 ? in.subspan(24) : in;
  for (size_t i = 0; i < CAPACITY && !body.empty(); ++i) l.data[i] = body[i % body.size()];
  if (fold) {
    l.head = (l.head % (4 * CAPACITY)) & ~uint64_t{FRAME_ALIGN - 1};
    l.tail = l.head + (l.tail % (CAPACITY + 16));
    l.senders = 1 | (l.senders & ATTACH_CLOSED_BIT);
    const uint64_t headLap = l.head & ~(CAPACITY - 1);
    for (uint64_t at = 0; at < CAPACITY; at += FRAME_HEADER_BYTES) {
      if ((at / FRAME_HEADER_BYTES) % 4 == 3) continue;
      const uint64_t index = headLap + at + (at < l.head % CAPACITY ? CAPACITY : 0);
      l.data[at + FRAME_HEADER_BYTES - 1] = std::byte{frameStamp(index, LAP_SHIFT)};
    }
  }
  return l;
}

std::unique_ptr<Channel> channelWith(const Layout& l) {
  Result<std::unique_ptr<Channel>> c =
      Channel::create(ChannelOptions{.scope = ChannelScope::LOCAL, .capacityBytes = CAPACITY});
  AGATE_ASSERT(c.ok(), "channel for the ring fuzz target: %s", errcName(c.code()));
  std::byte* memory = (*c)->memory().data();
  auto* control = reinterpret_cast<RingControl*>(memory);
  control->tail = l.tail;
  control->head = l.head;
  control->senders = l.senders;
  std::memcpy(memory + RING_CONTROL_BYTES, l.data, CAPACITY);
  return std::move(*c);
}

void checkEnding(Errc code) {
  AGATE_ASSERT(
      code == Errc::WOULD_BLOCK || code == Errc::PROTOCOL_ERROR || code == Errc::DISCONNECTED,
      "the ring consumer ended with %s", errcName(code));
}

// The byte-level consumer: every frame served lies inside the data area, 8-byte aligned.
void consumeFrames(const Layout& l) {
  std::unique_ptr<Channel> channel = channelWith(l);
  Receiver rx = std::move(channel->attachReceiver().value());
  const std::byte* data = channel->memory().data() + RING_CONTROL_BYTES;
  for (int served = 0;; ++served) {
    Result<Frame> f = rx.tryReceive();
    if (!f) {
      checkEnding(f.code());
      if (f.code() == Errc::PROTOCOL_ERROR)
        AGATE_ASSERT(rx.tryReceive().code() == Errc::PROTOCOL_ERROR, "poison did not stick");
      return;
    }
    AGATE_ASSERT(served < MAX_FRAMES, "the consumer served more frames than the ring can hold");
    const std::byte* p = f->payload.data();
    AGATE_ASSERT(p >= data && p + f->payload.size() <= data + CAPACITY,
                 "a frame of %zu bytes lies outside the data area", f->payload.size());
    AGATE_ASSERT(reinterpret_cast<uintptr_t>(p) % FRAME_ALIGN == 0, "a misaligned frame");
    rx.release();
  }
}

// The typed consumer under one read policy; returns how many messages it accepted.
int consumeMessages(const Layout& l, ReadPolicy policy) {
  std::unique_ptr<Channel> channel = channelWith(l);
  int accepted = 0;
  {
    MessageReceiver rx(*channel, std::move(channel->attachReceiver().value()),
                       MessageReceiverOptions{.policy = policy});
    for (;;) {
      Result<IncomingMessage> in = rx.tryReceive();
      if (!in) {
        checkEnding(in.code());
        AGATE_ASSERT(in.code() != Errc::PROTOCOL_ERROR || rx.tryReceive().code() == in.code(),
                     "poison did not stick");
        break;
      }
      AGATE_ASSERT(++accepted <= MAX_FRAMES, "the consumer served more messages than fit");
      // Structurally valid: a schema-less read of the root cannot throw.
      (void)in->view().getRoot<capnp::AnyPointer>().isNull();
    }
  }
  return accepted;
}

}  // namespace

FuzzOutcome fuzzRingConsumer(std::span<const std::byte> input) {
  const Layout layouts[] = {framed(input), raw(input, false), raw(input, true)};
  for (const Layout& l : layouts) consumeFrames(l);
  int inPlace = 0;
  int copied = 0;
  for (const Layout& l : layouts) {
    inPlace += consumeMessages(l, ReadPolicy::IN_PLACE);
    copied += consumeMessages(l, ReadPolicy::COPY_IN);
  }
  // Nothing writes the ring while it is read here, so both policies see the same messages.
  AGATE_ASSERT(inPlace == copied, "IN_PLACE accepted %d messages, COPY_IN %d", inPlace, copied);
  return inPlace > 0 ? FuzzOutcome::ACCEPTED : FuzzOutcome::REFUSED;
}

}  // namespace agate::fuzz
