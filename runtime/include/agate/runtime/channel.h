// Channel: the one message-passing API of Agate, in three scopes.
//
//   PRIVATE  one thread. No atomics, no fences, no doorbells: a blocking call on an empty or full
//            private channel returns WOULD_BLOCK at once, as nothing else could change it.
//   LOCAL    threads of one process. One receiver and up to `maxSenders` senders (see ring.h for
//            the multi-producer design). Anonymous memory, FUTEX_PRIVATE_FLAG doorbells.
//   SHARED   two processes. One sender, one receiver. The ring lives in a sealed memfd: the
//            creator exports a descriptor (exportFd), the other process opens it (openShared),
//            which validates the mapping and the ring header before anything is used.
//
// Life cycle: create (or open) a Channel, attach endpoints, use them, detach (explicitly or by
// destroying the endpoint). Attach enforces the scope's user limits with ATTACH_REFUSED. The
// Channel object must outlive its endpoints. Detaching is final for the channel: when the last
// sender detaches the receiver drains what was sent and then gets DISCONNECTED; when the receiver
// detaches, senders get DISCONNECTED. A peer *process* that dies without detaching is noticed
// through watchPeer(pid) (a pidfd polled between park slices by the blocking calls).
//
// Sending is zero-copy: tryReserve(n) returns n zeroed, 8-byte-aligned bytes inside the ring
// (what a Cap'n Proto builder wants), the caller writes in place and commit(len, tag) publishes.
// Receiving is in place: tryReceive() returns a read-only view valid until release(). In shared
// scope the view stays writable by the sender's process: treat its bytes as hostile (validate
// while reading, copy what you keep).
//
// The steady-state paths (tryReserve/commit, tryReceive/release) allocate nothing and make no
// system call unless the peer announced that it sleeps.
//
// Threading: a Channel may be shared by threads (attach is thread-safe). Each endpoint belongs to
// one thread at a time. A thread holds at most one outstanding reservation per channel.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "agate/runtime/doorbell.h"
#include "agate/runtime/fd.h"
#include "agate/runtime/result.h"
#include "agate/runtime/ring.h"
#include "agate/runtime/shm.h"

namespace agate {

enum class ChannelScope : uint8_t { PRIVATE, LOCAL, SHARED };

struct ChannelOptions {
  ChannelScope scope = ChannelScope::LOCAL;
  uint64_t capacityBytes = 64 * 1024;  // data area; a power of two in [64, 2^31]
  uint32_t maxSenders = 1;             // > 1 only in LOCAL scope
  // Create an eventfd per doorbell, for event loops that wait by polling a descriptor rather
  // than a futex (Doorbell::announce(true)). LOCAL and SHARED scope only.
  bool eventfdWakeups = false;
};

class Sender;
class Receiver;

class Channel {
 public:
  // A new channel with a fresh ring. INVALID_ARGUMENT for a bad capacity or maxSenders.
  static Result<std::unique_ptr<Channel>> create(const ChannelOptions& options);
  // Opens a SHARED channel from a memfd another process exported. Refuses (INVALID_ARGUMENT) an
  // unsealed or empty memfd and (PROTOCOL_ERROR) a ring header that does not match: magic,
  // version, control-block size, capacity vs mapping size.
  // `dataEvent`/`spaceEvent`: the creator's eventfds (exportEventFds), when it made them.
  static Result<std::unique_ptr<Channel>> openShared(Fd memfd, Fd dataEvent = Fd(),
                                                     Fd spaceEvent = Fd());

  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  ~Channel();

  // A descriptor for the ring's memfd, to pass to the peer process (SHARED only).
  Result<Fd> exportFd() const;
  // Duplicates of the data-available and space-available eventfds (SHARED with eventfdWakeups).
  Result<Fd> exportDataEventFd() const;
  Result<Fd> exportSpaceEventFd() const;

  // ATTACH_REFUSED when the scope's limit is reached (a second receiver; a second sender in
  // PRIVATE or SHARED scope; more than maxSenders in LOCAL) or the side already detached for good.
  Result<Sender> attachSender();
  Result<Receiver> attachReceiver();

  ChannelScope scope() const noexcept { return options_.scope; }
  uint64_t capacity() const noexcept { return view_.capacity; }
  // The largest payload one frame can carry: capacity/2 - 8.
  uint64_t maxPayload() const noexcept { return view_.maxPayload(); }
  // The ring's memory (control block then data), for tests and diagnostics.
  std::span<std::byte> memory() const noexcept { return memory_.bytes(); }

 private:
  friend class Sender;
  friend class Receiver;
  Channel(SharedMemory memory, const ChannelOptions& options, uint64_t capacity);

  SharedMemory memory_;
  ChannelOptions options_;
  RingView view_;
  std::unique_ptr<RingMultiProducer> multi_;  // LOCAL with maxSenders > 1
  Fd dataEvent_;                              // eventfds of the two doorbells, if any
  Fd spaceEvent_;
  std::atomic<uint32_t> endpoints_{0};  // attached endpoints of this process
};

// The sending end. Move-only; detaches when destroyed. One thread at a time.
class Sender {
 public:
  Sender() noexcept = default;
  Sender(Sender&& o) noexcept;
  Sender& operator=(Sender&& o) noexcept;
  ~Sender() { detach(); }

  // Reserves `bytes` zeroed bytes in place. WOULD_BLOCK when full (ring unchanged),
  // MESSAGE_TOO_LARGE above maxPayload(), DISCONNECTED when the receiver detached or died,
  // PROTOCOL_ERROR (sticky) when the receiver corrupted the ring.
  Result<std::span<std::byte>> tryReserve(size_t bytes) noexcept;
  // As tryReserve, but spins then parks while the ring is full; TIMED_OUT after policy.timeout.
  Result<std::span<std::byte>> reserve(size_t bytes, const WaitPolicy& policy = {}) noexcept;
  // Publishes the reserved frame with `length` (<= reserved) payload bytes and wakes a sleeping
  // receiver.
  void commit(size_t length, uint16_t tag = 0) noexcept;
  // Batching: completes the frame but lets flush() publish and ring once for several frames.
  void commitDeferred(size_t length, uint16_t tag = 0) noexcept;
  void flush() noexcept;
  // Batching that keeps latency: publishes the frame at once (a polling receiver sees it now),
  // but leaves the doorbell, the one locked instruction of a send, to ringPending(), which rings
  // once for every frame committed so far. The caller must call ringPending() before it waits
  // for anything (a parked receiver sees nothing until then); an event loop posts it as a task.
  void commitWithoutRing(size_t length, uint16_t tag = 0) noexcept;
  // Rings the data doorbell if a commitWithoutRing() published since the last ring; returns
  // whether it rang. commit(), flush() and detach() ring too, and clear what was pending, and so
  // do reserve() and MessageSender::startMessage/startMessageAsync before they wait for space.
  bool ringPending() noexcept;
  bool ringIsPending() const noexcept { return ringPending_; }
  // Gives the reservation back; nothing is published.
  void abandon() noexcept;

  // Copying conveniences over reserve/commit.
  Status trySend(std::span<const std::byte> payload, uint16_t tag = 0) noexcept;
  Status send(std::span<const std::byte> payload, uint16_t tag = 0,
              const WaitPolicy& policy = {}) noexcept;

  // Watches the receiver's process: blocking calls return DISCONNECTED once it has exited.
  Status watchPeer(pid_t pid) noexcept;
  // The watched peer's pidfd (see watchPeer), or -1: an event loop waits for it to turn readable
  // instead of polling between park slices. Owned by this endpoint.
  int peerFd() const noexcept { return peer_.get(); }
  // Polls the watched peer without waiting; once its process has exited, this endpoint reports
  // DISCONNECTED exactly as after a blocking call noticed the exit. False when none is watched.
  bool checkPeerExited() noexcept;
  // Abandons any reservation, flushes deferred frames, detaches. Idempotent.
  void detach() noexcept;

  bool attached() const noexcept { return channel_ != nullptr; }
  // The largest payload one frame can carry (Channel::maxPayload); 0 once detached.
  uint64_t maxPayload() const noexcept;
  // How often this endpoint parked waiting for space / woke a parked receiver.
  uint64_t parkCount() const noexcept { return spaceBell_.parkCount(); }
  uint64_t wakeCount() const noexcept { return dataBell_.wakeCount(); }
  // The doorbell rung when space frees up, for an event loop that waits on its futex word itself
  // (announce, tryReserve, IORING_OP_FUTEX_WAIT with the snapshot, cancel). Null in PRIVATE scope.
  Doorbell* spaceDoorbell() noexcept { return spaceBell_.bound() ? &spaceBell_ : nullptr; }

 private:
  friend class Channel;
  enum class Mode : uint8_t { PLAIN, SINGLE, MULTI };
  explicit Sender(Channel* channel) noexcept;
  void ringData() noexcept;

  Channel* channel_ = nullptr;  // not owned; the Channel outlives its endpoints
  Mode mode_ = Mode::PLAIN;
  RingProducer<PlainSync> plain_;
  RingProducer<AtomicSync> single_;
  RingSlot slot_;  // MULTI: the outstanding claim
  bool claimed_ = false;
  Doorbell dataBell_;         // rung after publishing
  Doorbell spaceBell_;        // parked on while full
  bool ringPending_ = false;  // published by commitWithoutRing(), not rung yet
  Fd peer_;                   // pidfd of the receiver's process, if watched
  bool peerDead_ = false;
};

// The receiving end. Move-only; detaches when destroyed. One thread at a time.
class Receiver {
 public:
  Receiver() noexcept = default;
  Receiver(Receiver&& o) noexcept;
  Receiver& operator=(Receiver&& o) noexcept;
  ~Receiver() { detach(); }

  // The next frame, in place, valid until release(). WOULD_BLOCK when empty, DISCONNECTED when
  // every sender detached (or the watched peer died) and the ring is drained, PROTOCOL_ERROR
  // (sticky) when the sender wrote something malformed.
  Result<Frame> tryReceive() noexcept;
  // As tryReceive, but spins then parks while empty; TIMED_OUT after policy.timeout.
  Result<Frame> receive(const WaitPolicy& policy = {}) noexcept;
  // Returns the received frame's space to the senders and wakes one that sleeps.
  void release() noexcept;
  // Batching: returns the frame's space without ringing the space doorbell (saving its locked
  // instruction) and publishes the ring's head only every capacity/4 bytes (so a sender checking
  // for space pulls that cache line once per batch, not per frame), ringing the space doorbell
  // then (a sender parked on a full ring refills it while the rest drains); flushReleases()
  // publishes and rings for the rest. Senders may not see the space of the last partial quarter
  // until the flush, so flush before waiting on anything else. tryReceive() flushes by itself
  // when it finds the ring empty, and so do receive() before it parks and detach().
  void releaseDeferred() noexcept;
  void flushReleases() noexcept;

  Status watchPeer(pid_t pid) noexcept;
  // The watched peer's pidfd (see watchPeer), or -1: an event loop waits for it to turn readable
  // instead of polling between park slices. Owned by this endpoint.
  int peerFd() const noexcept { return peer_.get(); }
  // Polls the watched peer without waiting; once its process has exited, this endpoint reports
  // DISCONNECTED exactly as after a blocking call noticed the exit. False when none is watched.
  bool checkPeerExited() noexcept;
  void detach() noexcept;

  bool attached() const noexcept { return channel_ != nullptr; }
  // The ring's data area in bytes (Channel::capacity); 0 once detached.
  uint64_t capacity() const noexcept;
  // How often this endpoint actually parked on its futex / woke a parked sender.
  uint64_t parkCount() const noexcept { return dataBell_.parkCount(); }
  uint64_t wakeCount() const noexcept { return spaceBell_.wakeCount(); }
  // The doorbell rung when frames arrive or senders detach, for an event loop that waits on its
  // futex word itself (announce, tryReceive, IORING_OP_FUTEX_WAIT, cancel). Null in PRIVATE scope.
  Doorbell* dataDoorbell() noexcept { return dataBell_.bound() ? &dataBell_ : nullptr; }

 private:
  friend class Channel;
  explicit Receiver(Channel* channel) noexcept;
  bool sendersGone() noexcept;

  Channel* channel_ = nullptr;  // not owned
  bool plain_ = true;
  RingConsumer<PlainSync> plainRing_;
  RingConsumer<AtomicSync> atomicRing_;
  Doorbell dataBell_;   // parked on while empty
  Doorbell spaceBell_;  // rung after release
  Fd peer_;
  bool peerDead_ = false;
  bool releasesDeferred_ = false;  // releaseDeferred() ran since the last space doorbell ring
};

}  // namespace agate
