#include "agate/client/kernel_vats.h"

#include <algorithm>
#include <limits>
#include <utility>

namespace agate::client {

using caps::EventType;
using caps::KernelEvent;
using rpc::RpcConnection;
using rpc::VatId;

KernelVats::KernelVats(KernelEvents& events, KernelVatsOptions options)
    : events_(events), options_(options) {
  if (!options_.bank.valid()) options_.bank = events_.kernel().bank();
  events_.attach(*this);
  Status listening = events_.listenIntroductions(this);
  AGATE_REQUIRE(listening.ok(), "a second KernelVats on one KernelEvents");
}

KernelVats::~KernelVats() {
  (void)events_.listenIntroductions(nullptr);
  events_.detach(*this);
  close();
  tasks_.clear();  // kernel calls in flight are dropped (their results no longer matter)
  // The owned connections go after every one of them was shut down (handoffs in flight and
  // promises passed on hold references across them; shutting down drops those). Their bushels
  // are deleted with the process or by the kernel's own teardown: deleting caps needs the loop.
  for (auto& o : owned_)
    if (o->link)
      o->link->connection().shutdown(Error(Errc::DISCONNECTED, "the vat network closed"));
  owned_.clear();
}

void KernelVats::close() noexcept {
  closed_ = true;
  const Error why(Errc::DISCONNECTED, "the vat network closed");
  for (auto& [peer, c] : registered_)
    if (c->isOpen()) c->close(why);
  for (auto& o : owned_)
    if (o->link && o->link->connection().isOpen()) o->link->connection().close(why);
  std::vector<Waiter> waiters = std::move(waiters_);
  waiters_.clear();
  for (Waiter& w : waiters)
    if (!w.fulfiller.isCancelled()) w.fulfiller.fulfill(Status{});
}

void KernelVats::addConnection(VatId peer, RpcConnection& connection) {
  removeConnection(connection);
  registered_.emplace_back(peer, &connection);
  if (closed_ && connection.isOpen())
    connection.close(Error(Errc::DISCONNECTED, "the vat network closed"));
}

void KernelVats::removeConnection(RpcConnection& connection) noexcept {
  std::erase_if(registered_, [&](const auto& r) { return r.second == &connection; });
}

void KernelVats::addClientBushel(VatId server, caps::Cap<caps::Bushel> bushel) {
  clientBushels_.try_emplace(server, bushel);  // the first bushel to a server serves
}

void KernelVats::removeClientBushel(caps::Cap<caps::Bushel> bushel) noexcept {
  std::erase_if(clientBushels_, [&](const auto& kv) { return kv.second.handle == bushel.handle; });
}

RpcConnection* KernelVats::findOpen(VatId vat) const noexcept {
  for (const auto& [peer, c] : registered_)
    if (peer == vat && c->isOpen()) return c;
  for (const auto& o : owned_)
    if (o->peer == vat && o->link && o->link->connection().isOpen()) return &o->link->connection();
  return nullptr;
}

void KernelVats::prune() noexcept {
  tasks_.remove_if([](const Promise<void>& p) { return p.isReady(); });
  std::erase_if(waiters_, [](const Waiter& w) { return w.fulfiller.isCancelled(); });
  sweepClosed();
}

// Connections this vat opened that closed and that nothing refers to any more go now: their
// rings are unmapped, their descriptors closed, and their bushels deleted (back to the bank).
// Kept until then, they would pile up with every hand-off a provider hangs up on.
void KernelVats::sweepClosed() noexcept {
  for (auto it = owned_.begin(); it != owned_.end();) {
    Owned& o = **it;
    if (!o.link || o.link->connection().isOpen() || o.link->connection().handleCount() != 0) {
      ++it;
      continue;
    }
    const caps::Cap<caps::Bushel> cap = o.cap;
    std::unique_ptr<Owned> gone = std::move(*it);
    it = owned_.erase(it);
    gone->link->connection().shutdown(Error(Errc::DISCONNECTED, "the connection closed"));
    gone.reset();
    if (!closed_ && events_.gone().code == Errc::OK)
      tasks_.push_back(events_.kernel().deleteCap(cap));
  }
}

// --- The introducer ---

bool KernelVats::introduce(VatId provider, VatId recipient) noexcept {
  prune();
  if (closed_ || recipient > std::numeric_limits<caps::ProcessId>::max()) return false;
  auto bushel = clientBushels_.find(provider);
  if (bushel == clientBushels_.end()) return false;  // no authority to pass on: proxy instead
  ++introductionsSent_;
  tasks_.push_back(sendIntroduction(bushel->second, recipient));
  return true;
}

Promise<void> KernelVats::sendIntroduction(caps::Cap<caps::Bushel> bushel, VatId recipient) {
  Result<caps::Cap<caps::Service>> sent =
      co_await events_.kernel().introduce(bushel, static_cast<caps::ProcessId>(recipient));
  // A refusal leaves the recipient without a way to the provider: its connect() times out
  // and the capability it was given is broken (its calls fail); nothing else depends on it.
  if (!sent) ++introductionsFailed_;
  co_return {};
}

// --- The recipient ---

void KernelVats::kernelEvent(KernelEvent& event) noexcept {
  switch (event.type) {
    case EventType::INTRODUCED:
      ++introductionsReceived_;
      prune();
      tasks_.push_back(takeIntroduction(event.service, event.peer, event.cap));
      return;
    case EventType::BUSHEL_CLOSED:
    case EventType::SERVICE_GONE:
      for (auto& o : owned_) {
        if (!o->link || o->koid != event.bushel) continue;
        if (o->link->connection().isOpen())
          o->link->connection().close(
              Error(Errc::DISCONNECTED, event.type == EventType::SERVICE_GONE
                                            ? "the service went away"
                                            : "the kernel closed the bushel"));
        events_.releaseBushel(o->koid);
      }
      sweepClosed();
      // A service that went took its introductions with it (the kernel deleted the caps). A
      // bushel that merely closed leaves the introduction usable for the next open.
      if (event.type == EventType::SERVICE_GONE)
        std::erase_if(introduced_,
                      [&](const auto& kv) { return kv.second.service == event.service; });
      return;
    case EventType::BUSHEL_OPENED:
      return;  // never routed here
  }
}

void KernelVats::kernelGone(const Error& why) noexcept {
  (void)why;
  close();
}

Promise<void> KernelVats::takeIntroduction(caps::Koid service, caps::ProcessId server,
                                           uint64_t handle) {
  // The event comes from the kernel, but the cap is checked as any cap arriving from elsewhere:
  // a Service, connect-only, the one the event names.
  const caps::Cap<caps::Service> cap{handle};
  Result<caps::CapInfo> info = co_await events_.kernel().inspectCap(cap);
  if (!info || info->type != caps::ObjectType::SERVICE || info->koid != service ||
      !hasRights(info->rights, caps::Rights::READ) || server == 0 ||
      server == events_.kernel().pid()) {
    ++introductionsFailed_;
    co_return {};
  }
  introduced_.try_emplace(server, Introduction{cap, service});
  wake(server);
  co_return {};
}

void KernelVats::wake(VatId vat) noexcept {
  for (Waiter& w : waiters_)
    if (w.vat == vat && !w.fulfiller.isCancelled() && !w.fulfiller.isFulfilled())
      w.fulfiller.fulfill(Status{});
  std::erase_if(waiters_, [](const Waiter& w) {
    return w.fulfiller.isCancelled() || w.fulfiller.isFulfilled();
  });
}

Promise<void> KernelVats::waitForIntroduction(VatId vat) {
  auto [promise, fulfiller] = newPromiseAndFulfiller<void>();
  waiters_.push_back({vat, std::move(fulfiller)});
  return std::move(promise);
}

Promise<RpcConnection*> KernelVats::connect(VatId vat) {
  if (closed_)
    return readyPromise<RpcConnection*>(events_.gone().code != Errc::OK
                                            ? events_.gone()
                                            : Error(Errc::DISCONNECTED, "the vat network closed"));
  // A vat id from a cap table is untrusted: only a kernel ProcessId other than ours names one.
  if (vat == rpc::NO_VAT || vat > std::numeric_limits<caps::ProcessId>::max())
    return readyPromise<RpcConnection*>(
        Error(Errc::NOT_FOUND, "a vat id that is no kernel process id"));
  if (vat == vatId())
    return readyPromise<RpcConnection*>(Error(Errc::INVALID_ARGUMENT, "a connection to itself"));
  if (RpcConnection* c = findOpen(vat)) return readyPromise<RpcConnection*>(c);
  return open(vat);
}

// Waits for the kernel's introduction to `vat`, then for a connection to it. The kernel work of
// opening one (establish) runs as a task of this network, not of the connect: a connect that is
// dropped midway (its caller's connection ended) cannot strand the opening, which other
// connects wait for, nor orphan the bushel it opens.
Promise<RpcConnection*> KernelVats::open(VatId vat) {
  EventLoop& loop = events_.kernel().loop();
  const auto end = std::chrono::steady_clock::now() + options_.introductionTimeout;
  bool started = false;  // an opening this connect waited for
  for (;;) {
    if (closed_) co_return Error(Errc::DISCONNECTED, "the vat network closed");
    if (RpcConnection* c = findOpen(vat)) co_return c;
    const bool opening = std::any_of(owned_.begin(), owned_.end(),
                                     [&](const auto& o) { return o->peer == vat && !o->link; });
    if (opening) {
      started = true;
      prune();
      AGATE_CO_TRY(co_await waitForIntroduction(vat));  // woken when the opening ends
      continue;
    }
    if (started) {  // the opening this connect waited for ended, without an open connection
      if (auto failed = openFailures_.find(vat); failed != openFailures_.end())
        co_return failed->second;
      co_return Error(Errc::DISCONNECTED, "the connection to that vat closed as it opened");
    }
    if (auto intro = introduced_.find(vat); intro != introduced_.end()) {
      openFailures_.erase(vat);
      tasks_.push_back(establish(vat, intro->second));  // runs up to its first kernel call
      continue;
    }
    // Wait for the kernel's introduction.
    const auto now = std::chrono::steady_clock::now();
    if (now >= end)
      co_return Error(Errc::NOT_FOUND, "no introduction to that vat arrived from the kernel");
    prune();
    Status woken = co_await loop.deadline(waitForIntroduction(vat), end - now);
    if (!woken && woken.code() != Errc::TIMED_OUT) co_return woken.error();
  }
}

// Opens a bushel to `vat` through its introduction and links it; a placeholder entry (no link
// yet) makes connects to `vat` wait meanwhile. Every end wakes them: linked, failed (the reason
// kept in openFailures_), or dropped with the network (close()).
Promise<void> KernelVats::establish(VatId vat, Introduction intro) {
  EventLoop& loop = events_.kernel().loop();
  owned_.push_back(std::make_unique<Owned>());
  Owned* entry = owned_.back().get();
  entry->peer = vat;
  struct Ending {
    KernelVats& vats;
    Owned* entry;
    VatId vat;
    bool linked = false;
    ~Ending() {
      if (!linked) std::erase_if(vats.owned_, [&](const auto& o) { return o.get() == entry; });
      vats.wake(vat);
    }
  } ending{*this, entry, vat};
  auto fail = [&](const Error& why, bool forgetIntroduction) {
    openFailures_[vat] = why;
    if (forgetIntroduction) introduced_.erase(vat);
  };

  caps::KernelConnection& kernel = events_.kernel();
  Result<caps::Cap<caps::Bushel>> bushel = co_await kernel.openBushelVia(intro.cap, options_.bank);
  // INVALID_HANDLE: the introduction was revoked or its service went (the kernel deleted it).
  if (!bushel) {
    fail(bushel.error(), bushel.code() == Errc::INVALID_HANDLE);
    co_return {};
  }
  Promise<caps::CapInfo> infoCall = kernel.inspectCap(*bushel);
  Promise<caps::BushelRings> ringsCall = kernel.bushelRings(*bushel);
  Result<caps::CapInfo> info = co_await infoCall;
  Result<caps::BushelRings> rings = co_await ringsCall;
  Error failed = !info ? info.error() : !rings ? rings.error() : Error{};
  if (failed.code == Errc::OK && rings->server != vat)
    failed = Error(Errc::PERMISSION_DENIED, "the introduced service is not served by that vat");
  std::unique_ptr<BushelLink> link;
  if (failed.code == Errc::OK) {
    rpc::RpcOptions rpcOptions = options_.rpc;
    rpcOptions.bootstrap = nullptr;
    rpcOptions.network = this;
    rpcOptions.peerVat = vat;
    auto made = BushelLink::tryOpen(loop, BushelLink::Side::CLIENT, std::move(rings->request),
                                    std::move(rings->reply), rpcOptions);
    if (made) {
      link = std::move(*made);
    } else {
      failed = made.error();
    }
  }
  if (failed.code == Errc::OK && closed_)
    failed = Error(Errc::DISCONNECTED, "the vat network closed");
  if (failed.code == Errc::OK) {
    entry->cap = *bushel;
    entry->koid = info->koid;
    entry->link = std::move(link);
    ending.linked = true;
    if (Status claimed = events_.claimBushel(entry->koid, *this); !claimed)
      entry->link->connection().close(claimed.error());
    co_return {};
  }
  link.reset();
  fail(failed, false);
  (void)co_await kernel.deleteCap(*bushel);  // its pages go back to our bank
  co_return {};
}

}  // namespace agate::client
