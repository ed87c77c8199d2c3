// KernelEvents: the one consumer of a kernel connection's events, routing each to the part of
// the process it concerns, so that one process can be a client (Session), a server (one or more
// ServiceHosts) and a vat of a kernel VatNetwork (KernelVats) on one kernel connection.
//
//   auto kernel = caps::KernelConnection::tryAttach(loop, home, "middle").value();
//   client::KernelEvents events(*kernel);                 // takes nextEvent() from now on
//   client::Session session(events);                      // a client of other services ...
//   auto host = co_await client::ServiceHost::create(events, "middle", factory);  // ... a server
//
// KernelConnection::nextEvent has one waiter; the router is it. Its pump starts in the
// constructor and routes:
//
//   BUSHEL_OPENED  to the listener of the event's service (a ServiceHost). Opened events for a
//                  service nobody listens to yet are kept (with their ring descriptors) and
//                  delivered when one does: a host created before run() loses no client.
//   BUSHEL_CLOSED  to the listener of the event's bushel (a Session's own bushel) and to the
//                  listener of its service (the ServiceHost serving it); either may be absent.
//                  A close for a bushel nobody claims yet is remembered (an event can overtake
//                  the completion of the call that opened the bushel), and claimBushel says so.
//   SERVICE_GONE   to the listener of the bushel (the client), else remembered like a close.
//   INTRODUCED     to the introduction listener (KernelVats), if any; else dropped.
//
// When the kernel connection dies, every attached listener hears kernelGone() once, and later
// attaches hear it at once.
//
// Keys are kernel koids, which the kernel never reuses, so a stale key cannot capture another
// object's events. Remembered closes are bounded (MAX_EARLY_CLOSES, oldest forgotten first):
// they only bridge the few turns between openBushel's completion and claimBushel.
//
// Simple single-role programs need not see the router: `Session(kernel)` and
// `ServiceHost::create(kernel, ...)` make a private one (so a second Session or host on that
// connection would be a second nextEvent waiter: share one router instead).
//
// Lifetime: the router outlives its listeners; listeners detach (detach() also drops their
// keys) before they go. Threading: the kernel connection's loop thread. Listener callbacks run
// on the router's pump and must not destroy the router.
#pragma once

#include <cstddef>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "agate/caps/kernel_connection.h"
#include "agate/runtime/promise.h"
#include "agate/runtime/result.h"

namespace agate::client {

class KernelEventListener {
 public:
  // One routed event. The listener may move the descriptors out of it.
  virtual void kernelEvent(caps::KernelEvent& event) noexcept = 0;
  // The kernel connection died (`why`: DISCONNECTED or PROTOCOL_ERROR); no event follows.
  virtual void kernelGone(const Error& why) noexcept = 0;

 protected:
  ~KernelEventListener() = default;
};

class KernelEvents {
 public:
  static constexpr size_t MAX_EARLY_CLOSES = 1024;

  explicit KernelEvents(caps::KernelConnection& kernel);
  // Stops the pump. Listeners must have detached.
  ~KernelEvents();
  KernelEvents(const KernelEvents&) = delete;
  KernelEvents& operator=(const KernelEvents&) = delete;

  caps::KernelConnection& kernel() const noexcept { return kernel_; }
  // OK while the kernel connection lives; DISCONNECTED (or why it died) afterwards.
  const Error& gone() const noexcept { return gone_; }

  // Adds `listener` to those told of the kernel's death (told at once if it died already).
  void attach(KernelEventListener& listener);
  // Removes it and every key it holds. Idempotent.
  void detach(KernelEventListener& listener) noexcept;

  // Routes service `service`'s BUSHEL_OPENED and BUSHEL_CLOSED events to `listener` (attached;
  // precondition). Opened events kept for it are delivered now. ALREADY_EXISTS if another
  // listener holds the service.
  Status listenService(caps::Koid service, KernelEventListener& listener);
  void unlistenService(caps::Koid service) noexcept;

  // Routes bushel `bushel`'s client-side events (BUSHEL_CLOSED, SERVICE_GONE) to `listener`
  // (attached). DISCONNECTED when the kernel closed it already (a remembered close, consumed
  // here) or the kernel connection is gone; ALREADY_EXISTS if another listener claimed it.
  Status claimBushel(caps::Koid bushel, KernelEventListener& listener);
  void releaseBushel(caps::Koid bushel) noexcept;

  // INTRODUCED events go to `listener` (null: dropped). One at a time; INVALID_ARGUMENT if
  // another listener holds them.
  Status listenIntroductions(KernelEventListener* listener);

  // Events no listener took (diagnostics and tests).
  uint64_t unroutedEvents() const noexcept { return unrouted_; }

  // Keeps `held` until `released()` answers true, asked at each event routed and when the router
  // goes (after every Session and host on it): a ServiceHost that goes while a dropped client's
  // connection is still referred to from a Session's connection parks it here. Still not
  // released when the router goes: left to the process (a reference to it may outlive even the
  // router).
  void keepUntil(std::shared_ptr<void> held, std::function<bool()> released);
  size_t keptCount() const noexcept { return kept_.size(); }

 private:
  struct Kept {
    std::shared_ptr<void> held;
    std::function<bool()> released;
  };
  void sweepKept() noexcept;
  std::vector<Kept> kept_;
  Promise<void> pump();
  void route(caps::KernelEvent& event) noexcept;
  void remember(caps::Koid bushel) noexcept;

  caps::KernelConnection& kernel_;
  Error gone_{};
  std::vector<KernelEventListener*> listeners_;
  std::map<caps::Koid, KernelEventListener*> services_;
  std::map<caps::Koid, KernelEventListener*> bushels_;
  std::map<caps::Koid, std::vector<caps::KernelEvent>> heldOpens_;  // service -> BUSHEL_OPENED
  std::deque<caps::Koid> earlyCloses_;
  KernelEventListener* introductions_ = nullptr;
  uint64_t unrouted_ = 0;
  std::optional<Promise<void>> pump_;  // last: dropped first
};

}  // namespace agate::client
