#include "agate/client/session.h"

#include <algorithm>
#include <utility>

#include "agate/client/kernel_vats.h"

namespace agate::client {

using caps::EventType;
using caps::KernelEvent;

Session::Session(caps::KernelConnection& kernel, SessionOptions options)
    : ownEvents_(std::make_unique<KernelEvents>(kernel)),
      events_(*ownEvents_),
      kernel_(kernel),
      options_(options),
      bank_(kernel.bank()) {
  events_.attach(*this);
}

Session::Session(KernelEvents& events, SessionOptions options)
    : events_(events), kernel_(events.kernel()), options_(options), bank_(kernel_.bank()) {
  events_.attach(*this);
}

Session::~Session() {
  events_.detach(*this);  // no event reaches the entries from here on
  for (auto& e : entries_) {
    if (options_.network == nullptr || !e->link) continue;
    options_.network->removeConnection(e->link->connection());
    options_.network->removeClientBushel(e->cap);
  }
  // Every connection is shut down before any is destroyed: one's exports (a proxy, a promise
  // passed on) may hold references on another.
  const Error closing(Errc::DISCONNECTED, "the session closed");
  for (auto& e : entries_)
    if (e->link) e->link->connection().shutdown(closing);
  entries_.clear();
}

Session::Entry* Session::find(caps::Koid koid) noexcept {
  for (auto& e : entries_)
    if (e->koid == koid) return e.get();
  return nullptr;
}

size_t Session::openCount() const noexcept {
  return static_cast<size_t>(
      std::count_if(entries_.begin(), entries_.end(), [](const auto& e) { return !e->closed; }));
}

void Session::closeLocally(Entry& entry, const Error& reason) noexcept {
  entry.closed = true;
  events_.releaseBushel(entry.koid);
  // No introductions from a bushel that is gone (the kernel would refuse them anyway).
  if (options_.network != nullptr) options_.network->removeClientBushel(entry.cap);
  // close() posts the connection's teardown (running calls cancelled, exports dropped). A sweep
  // queued before it may run first: the teardown's references still count then, and the
  // connection waits for the sweep its teardown causes (postWhenUnreferenced).
  if (entry.link && entry.link->connection().isOpen()) entry.link->connection().close(reason);
  postSweep();
}

void Session::postSweep() noexcept {
  if (!sweepTask_.isQueued()) kernel_.loop().post(sweepTask_);
}

void Session::sweep() noexcept {
  auto unreferenced = [](const std::unique_ptr<Entry>& e) {
    if (!e->closed) return false;
    if (!e->link) return true;
    rpc::RpcConnection& c = e->link->connection();
    return c.handleCount() == 0 && !c.sharedObjectsAlive();
  };
  // Moved out first: a connection's destruction may drop references on another (a proxy, or
  // an object shared with it), and nothing it does may find entries_ half erased. Until none
  // is left: what one frees may let another go.
  for (;;) {
    std::vector<std::unique_ptr<Entry>> doomed;
    for (auto& e : entries_)
      if (unreferenced(e)) doomed.push_back(std::move(e));
    if (doomed.empty()) return;
    std::erase(entries_, nullptr);
    for (auto& e : doomed)
      if (options_.network != nullptr && e->link)
        options_.network->removeConnection(e->link->connection());
    doomed.clear();
  }
}

Promise<OpenedBushel> Session::openBushel(std::string name, caps::Cap<caps::SpaceBank> bank) {
  if (kernelGone_.code != Errc::OK) co_return kernelGone_;
  lastServiceName_ = name;
  postSweep();  // closed bushels whose handles went since
  if (!bank.valid()) bank = bank_;
  Result<caps::Cap<caps::Bushel>> cap = co_await kernel_.openBushel(kernel_.registry(), name, bank);
  if (!cap) co_return cap.error();
  // Both go out with one doorbell at the end of this turn.
  Promise<caps::CapInfo> info = kernel_.inspectCap(*cap);
  Promise<caps::BushelRings> rings = kernel_.bushelRings(*cap);
  Result<caps::CapInfo> i = co_await info;
  Result<caps::BushelRings> r = co_await rings;
  Error failed = !i ? i.error() : !r ? r.error() : Error{};
  if (failed.code == Errc::OK) {
    rpc::RpcOptions rpcOptions = options_.rpc;
    rpcOptions.network = nullptr;
    rpcOptions.peerVat = rpc::NO_VAT;
    // A vat never connects to itself (a bushel to one's own service carries no handoffs).
    const bool joinsVat = options_.network != nullptr && r->server != kernel_.pid();
    if (joinsVat) {
      rpcOptions.network = options_.network;
      rpcOptions.peerVat = r->server;
    }
    auto link = BushelLink::tryOpen(kernel_.loop(), BushelLink::Side::CLIENT, std::move(r->request),
                                    std::move(r->reply), rpcOptions);
    if (link) {
      auto entry = std::make_unique<Entry>();
      entry->cap = *cap;
      entry->koid = i->koid;
      entry->server = r->server;
      entry->link = std::move(*link);
      Entry& e = *entries_.emplace_back(std::move(entry));
      e.link->connection().postWhenUnreferenced(&sweepTask_);
      if (options_.network != nullptr) {
        options_.network->addConnection(e.server, e.link->connection());
        if (joinsVat) options_.network->addClientBushel(e.server, e.cap);
      }
      // DISCONNECTED: the kernel closed it already (its event overtook this coroutine) or the
      // kernel connection is gone.
      if (Status claimed = events_.claimBushel(e.koid, *this); !claimed)
        closeLocally(e, claimed.error());
      co_return OpenedBushel{e.cap, e.koid, rpc::ConnectionRef(e.link->connection()), e.server};
    }
    failed = link.error();
  }
  // Nothing of ours uses the bushel: give it back (its pages return to `bank`).
  (void)co_await kernel_.deleteCap(*cap);
  co_return failed;
}

Promise<void> Session::waitForService(std::string name, Duration timeout, Duration interval) {
  lastServiceName_ = name;
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    Result<caps::Koid> found = co_await kernel_.lookupService(kernel_.registry(), name);
    if (found) co_return {};
    if (found.code() != Errc::NOT_FOUND) co_return found.error();
    if (std::chrono::steady_clock::now() >= end)
      co_return Error(Errc::TIMED_OUT, "the service did not register in time");
    Status slept = co_await kernel_.loop().sleep(interval);
    if (!slept) co_return slept.error();
  }
}

Promise<void> Session::close(caps::Koid koid) {
  Entry* e = find(koid);
  if (e == nullptr) co_return Error(Errc::NOT_FOUND, "this session holds no bushel with that koid");
  if (e->closed) {
    postSweep();
    co_return {};
  }
  closeLocally(*e, Error(Errc::DISCONNECTED, "the client closed the bushel"));
  const caps::Cap<caps::Bushel> cap = e->cap;
  Status deleted = co_await kernel_.deleteCap(cap);
  // INVALID_HANDLE: the kernel closed it first (its event may still be on its way).
  if (!deleted && deleted.code() != Errc::INVALID_HANDLE) co_return deleted.error();
  co_return {};
}

void Session::kernelEvent(KernelEvent& event) noexcept {
  // The router sends only this session's bushels' BUSHEL_CLOSED and SERVICE_GONE.
  if (event.type != EventType::BUSHEL_CLOSED && event.type != EventType::SERVICE_GONE) return;
  const char* why = event.type == EventType::SERVICE_GONE ? "the service went away"
                                                          : "the kernel closed the bushel";
  if (Entry* e = find(event.bushel); e != nullptr && !e->closed)
    closeLocally(*e, Error(Errc::DISCONNECTED, why));
}

void Session::kernelGone(const Error& why) noexcept {
  (void)why;
  kernelGone_ = Error(Errc::DISCONNECTED, "the kernel connection is gone");
  for (auto& e : entries_)
    if (!e->closed) closeLocally(*e, kernelGone_);
}

}  // namespace agate::client
