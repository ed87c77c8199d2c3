// Typed Cap'n Proto messages on a Channel, blocking or awaited on an EventLoop.
//
// This header joins channel.h (bytes in a ring) and message.h (Cap'n Proto frames) so users never
// touch a frame:
//
//   MessageSender tx(std::move(sender));
//   Result<OutgoingMessage> msg = tx.tryStartMessage(256);     // or startMessage / ...Async
//   msg->initRoot<Ping>().setSeq(7);
//   Status sent = msg->send(/*tag=*/1);                         // commits the bytes used, rings
//
//   MessageReceiver rx(*channel, std::move(receiver));          // COPY_IN for SHARED scope
//   Result<IncomingMessage> in = co_await rx.receiveAsync(loop);
//   uint64_t seq = in->getRoot<Ping>().getSeq();               // valid while `in` lives
//
// Sending. MessageSender owns the Sender and the storage of one FrameBuilder; starting a message
// reserves a zeroed frame of `maxBytes` in the ring and constructs the builder in that storage
// (no heap). OutgoingMessage is a move-only handle on it. send() commits exactly the words the
// message used and rings the receiver's doorbell; a message that outgrew its frame is refused
// with MESSAGE_TOO_LARGE and the reservation is abandoned (nothing published, the ring as before).
// Dropping an unsent OutgoingMessage abandons it. One message at a time per MessageSender.
//
// Receiving. MessageReceiver owns the Receiver, a FrameReader and (COPY_IN) a scratch buffer of
// the channel's largest payload, allocated once at construction. The read policy defaults from
// the scope: COPY_IN for SHARED (the peer can still write the frame, see message.h), IN_PLACE for
// PRIVATE and LOCAL; MessageReceiverOptions::policy overrides it (e.g. a client that trusts the
// kernel process). With COPY_IN the frame is released back to the sender right after the copy,
// before the message is even validated; with IN_PLACE the IncomingMessage holds the frame and
// releases it when dropped (MessageReceiverOptions::deferReleases batches these releases). A frame
// that fails validation makes the receiver PROTOCOL_ERROR for good (it is "poisoned": every later
// receive returns the same error); nothing crashes. One IncomingMessage at a time per
// MessageReceiver (precondition, checked).
//
// Awaiting (receiveAsync, startMessageAsync). The coroutine first retries the non-blocking call
// `spinIterations` times (yielding to the loop between retries whenever it has other work or the
// call was started outside a turn: EventLoop::busyPollShouldYield; spinning never delays other
// work), then parks without blocking the loop's thread:
//   announce on the doorbell -> re-check -> await the first of
//     (a) the doorbell: loop.waitFutex(futexWord, snapshot) when the loop has a native futex wait
//         (io_uring), else the doorbell's eventfd (loop.waitReady) when the channel has one
//         (ChannelOptions::eventfdWakeups; best on the EPOLL backend), else the polled futex wait
//         (the EPOLL backend re-reads the word every LoopOptions::futexPollInterval, 1 ms);
//     (b) the watched peer's pidfd turning readable (watchPeer on the endpoint): its death is
//         seen as soon as the loop runs, and the call reports DISCONNECTED once the ring drained;
//     (c) a timer of `parkSlice`, the backstop against a wake a hostile peer withheld;
//   -> withdraw the announce -> retry.
// The announce is withdrawn on every exit, including the promise being dropped while parked
// (a guard in the coroutine frame); a dropped receive never takes a frame, because a frame is
// only taken in the same synchronous step that completes the promise. Use loop.deadline() for a
// timeout. PRIVATE channels have no doorbell: awaiting on an empty one returns WOULD_BLOCK.
//
// Threading: each object belongs to one thread (its loop's, when awaited). Steady state
// allocates nothing: frames live in the ring, builders and readers in these objects, coroutine
// frames in the loop's arena.
#pragma once

#include <capnp/message.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>

#include "agate/runtime/channel.h"
#include "agate/runtime/event_loop.h"
#include "agate/runtime/message.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"

namespace agate {

// How receiveAsync / startMessageAsync wait (see the overview).
struct AsyncWaitPolicy {
  uint32_t spinIterations = 1000;  // non-blocking retries before parking; 0: park at once
  Duration parkSlice = std::chrono::milliseconds(50);  // backstop re-check while parked
};

// One step of a busy poll on `loop`'s thread (`step` counts from 0), as the awaiting calls take
// between retries: true when the caller must `co_await loop.yield()` before it retries
// (EventLoop::busyPollShouldYield); else this paused the CPU, or every few thousand steps gave
// up the thread (the party waited for may be queued behind it on this CPU). For a coroutine that
// retries a non-blocking call in its own frame before it awaits the parking call (a reader
// loop): the spin then costs no coroutine frame per wait.
bool busyPollStep(const EventLoop& loop, uint32_t step) noexcept;

class MessageSender;
class MessageReceiver;

// A message being built in a reserved ring frame. Move-only handle; the builder lives in its
// MessageSender, which must outlive it. Dropping it unsent abandons the reservation.
class OutgoingMessage {
 public:
  OutgoingMessage(OutgoingMessage&& o) noexcept : owner_(std::exchange(o.owner_, nullptr)) {}
  OutgoingMessage& operator=(OutgoingMessage&& o) noexcept;
  OutgoingMessage(const OutgoingMessage&) = delete;
  OutgoingMessage& operator=(const OutgoingMessage&) = delete;
  ~OutgoingMessage() { abandon(); }

  template <class T>
  typename T::Builder initRoot() {
    return builder().initRoot<T>();
  }
  template <class T>
  typename T::Builder getRoot() {
    return builder().getRoot<T>();
  }
  capnp::MessageBuilder& builder();

  // Publishes the message with `tag` and wakes a parked receiver. MESSAGE_TOO_LARGE when it
  // outgrew the frame: nothing is published and the reservation is given back. Either way the
  // handle is spent afterwards.
  Status send(uint16_t tag = 0);
  // As send(), but publishes without ringing: see Sender::commitWithoutRing (the caller rings
  // with the sender's ringPending() before it waits).
  Status sendWithoutRing(uint16_t tag = 0);
  // Gives the reservation back unpublished. Idempotent.
  void abandon() noexcept;
  bool pending() const noexcept { return owner_ != nullptr; }

 private:
  friend class MessageSender;
  explicit OutgoingMessage(MessageSender* owner) noexcept : owner_(owner) {}
  MessageSender* owner_;  // not owned; null once sent, abandoned or moved from
};

// The sending end of a channel, for typed messages. Not movable (the builder's storage is
// inside); keep it in place.
class MessageSender {
 public:
  explicit MessageSender(Sender sender) noexcept : sender_(std::move(sender)) {}
  MessageSender(const MessageSender&) = delete;
  MessageSender& operator=(const MessageSender&) = delete;
  ~MessageSender();

  // Reserves a frame of up to `maxBytes` (rounded up to words) and starts a message in it.
  // Errors as Sender::tryReserve: WOULD_BLOCK (full), MESSAGE_TOO_LARGE (above the channel's
  // maxPayload), DISCONNECTED, PROTOCOL_ERROR; the ring is unchanged.
  Result<OutgoingMessage> tryStartMessage(size_t maxBytes);
  // As tryStartMessage, spinning then parking the thread while the ring is full.
  Result<OutgoingMessage> startMessage(size_t maxBytes, const WaitPolicy& policy = {});
  // As tryStartMessage, awaiting space on `loop` (see the overview).
  Promise<OutgoingMessage> startMessageAsync(EventLoop& loop, size_t maxBytes,
                                             AsyncWaitPolicy policy = {});

  Sender& sender() noexcept { return sender_; }

 private:
  friend class OutgoingMessage;
  Result<OutgoingMessage> startIn(Result<std::span<std::byte>> frame);
  Status sendBuilt(uint16_t tag, bool ring = true);
  void abandonBuilt() noexcept;

  Sender sender_;
  std::optional<FrameBuilder> builder_;  // engaged while an OutgoingMessage is pending
};

// A received message. Move-only handle; readers obtained from it are valid while it lives.
// Dropping it releases the frame (IN_PLACE) and lets its MessageReceiver receive again. It is
// validated on arrival, unless its receiver validates on demand
// (MessageReceiverOptions::validateOnDemand): then validate() must succeed before any reader.
class IncomingMessage {
 public:
  IncomingMessage(IncomingMessage&& o) noexcept
      : owner_(std::exchange(o.owner_, nullptr)), view_(o.view_), bytes_(o.bytes_), tag_(o.tag_) {}
  IncomingMessage& operator=(IncomingMessage&& o) noexcept;
  IncomingMessage(const IncomingMessage&) = delete;
  IncomingMessage& operator=(const IncomingMessage&) = delete;
  ~IncomingMessage() { reset(); }

  template <class T>
  typename T::Reader getRoot() const {
    return view().getRoot<T>();
  }
  // Reads against a schema inside the decode boundary (MessageView::tryRead): a message whose
  // pointers do not match the schema gives PROTOCOL_ERROR rather than an exception.
  template <class T, class Fn>
  Status tryRead(Fn&& fn) const {
    return view().tryRead<T>(std::forward<Fn>(fn));
  }
  uint16_t tag() const noexcept { return tag_; }
  size_t sizeInBytes() const noexcept { return bytes_.size(); }
  // The validated message (REQUIRE: validated).
  const MessageView& view() const noexcept {
    AGATE_REQUIRE(view_.has_value(), "an IncomingMessage read before validate()");
    return *view_;
  }

  // The frame's bytes as read (the private copy under COPY_IN, the frame itself under
  // IN_PLACE), validated or not: for a reader of the words that checks every read against their
  // end and reads each word once (see FrameReader::take).
  std::span<const std::byte> bytes() const noexcept { return bytes_; }
  bool validated() const noexcept { return view_.has_value(); }
  // Validates the message (once; later calls return at once). PROTOCOL_ERROR for a malformed
  // one, as the receive would have given without validateOnDemand, and the receiver is poisoned.
  Status validate();

 private:
  friend class MessageReceiver;
  IncomingMessage(MessageReceiver* owner, std::optional<MessageView> view,
                  std::span<const std::byte> bytes, uint16_t tag) noexcept
      : owner_(owner), view_(view), bytes_(bytes), tag_(tag) {}
  void reset() noexcept;

  MessageReceiver* owner_;  // not owned; null once dropped or moved from
  std::optional<MessageView> view_;
  std::span<const std::byte> bytes_;
  uint16_t tag_;
};

struct MessageReceiverOptions {
  // Unset: COPY_IN for SHARED scope, IN_PLACE otherwise.
  std::optional<ReadPolicy> policy = std::nullopt;
  ReadLimits limits = {};
  // Hand frames back with Receiver::releaseDeferred rather than release (channel.h): the ring's
  // head is published at least every capacity/4 bytes and whenever a receive finds the ring empty
  // (so before every wait of receive() and receiveAsync()), which saves a locked instruction and
  // a cache-line transfer per message. A user that waits on anything else while the ring still
  // holds messages calls receiver().flushReleases() first, or senders may see it fuller than it
  // is meanwhile. A frame refused as malformed is released at once (with
  // validateOnDemand under IN_PLACE, when its IncomingMessage is dropped).
  bool deferReleases = false;
  // Hand each message over before validating it: IncomingMessage::bytes() holds it (the private
  // copy under COPY_IN) and IncomingMessage::validate() validates it when the holder wants Cap'n
  // Proto's readers. For a holder that reads its common messages from the words itself, checking
  // every read against their end (Agate's RPC engine, rpc/fast_decode.h): the part of a message
  // it never reads costs no validation. Under IN_PLACE the bytes are the ring frame: only for
  // memory no other party can write meanwhile, as IN_PLACE itself.
  bool validateOnDemand = false;
};

// The receiving end of a channel, for typed messages. Not movable (the Cap'n Proto reader lives
// inside); keep it in place. `channel` must outlive it.
class MessageReceiver {
 public:
  MessageReceiver(const Channel& channel, Receiver receiver, MessageReceiverOptions options = {});
  MessageReceiver(const MessageReceiver&) = delete;
  MessageReceiver& operator=(const MessageReceiver&) = delete;
  ~MessageReceiver();

  // The next message. WOULD_BLOCK when empty, DISCONNECTED when the senders are gone and the
  // ring drained, PROTOCOL_ERROR (sticky) for a malformed frame or ring.
  Result<IncomingMessage> tryReceive();
  // As tryReceive, spinning then parking the thread while empty; TIMED_OUT after policy.timeout.
  Result<IncomingMessage> receive(const WaitPolicy& policy = {});
  // As tryReceive, awaiting a message on `loop` (see the overview).
  Promise<IncomingMessage> receiveAsync(EventLoop& loop, AsyncWaitPolicy policy = {});

  ReadPolicy policy() const noexcept { return reader_->policy(); }
  const ReadLimits& limits() const noexcept { return reader_->limits(); }
  // The sticky error, once a frame or the ring was malformed.
  bool poisoned() const noexcept { return poison_.code != Errc::OK; }
  Receiver& receiver() noexcept { return receiver_; }
  // How many times a receive found the ring empty (each try of a spin counts): a reader parked
  // on its doorbell adds nothing, however busy other readers of its loop are.
  uint64_t emptyReads() const noexcept { return emptyReads_; }

 private:
  friend class IncomingMessage;
  Result<IncomingMessage> decode(Result<Frame> frame);
  Status validate(IncomingMessage& message);
  void finishMessage() noexcept;
  void releaseFrame() noexcept;  // release() or releaseDeferred(), as the options say

  Receiver receiver_;
  std::unique_ptr<capnp::word[]> scratch_;  // COPY_IN only; sized to the channel's maxPayload
  std::optional<FrameReader> reader_;
  Error poison_;
  bool outstanding_ = false;       // an IncomingMessage is alive
  bool holdsFrame_ = false;        // IN_PLACE: the ring frame is still held for it
  bool deferReleases_ = false;     // MessageReceiverOptions::deferReleases
  bool validateOnDemand_ = false;  // MessageReceiverOptions::validateOnDemand
  uint64_t emptyReads_ = 0;
};

}  // namespace agate
