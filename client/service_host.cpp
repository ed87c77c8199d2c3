#include "agate/client/service_host.h"

#include <algorithm>
#include <utility>

#include "agate/client/kernel_vats.h"
#include "agate/kernel/bushel.h"
#include "agate/kernel/space_bank.h"

namespace agate::client {

using caps::EventType;
using caps::KernelEvent;

// --- StateCharge, ClientQuota ---

StateCharge& StateCharge::operator=(StateCharge&& o) noexcept {
  if (this != &o) {
    reset();
    quota_ = std::exchange(o.quota_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void StateCharge::reset() noexcept {
  if (ClientQuota* q = std::exchange(quota_, nullptr)) q->refund(std::exchange(bytes_, 0));
}

ClientQuota::~ClientQuota() {
  AGATE_ASSERT(!growing_, "client quota of bushel %lu destroyed while it asks the kernel",
               static_cast<unsigned long>(bushel_));
  AGATE_ASSERT(used_ == 0, "client quota of bushel %lu destroyed with %lu bytes still charged",
               static_cast<unsigned long>(bushel_), static_cast<unsigned long>(used_));
}

uint64_t ClientQuota::allowanceBytes() const noexcept { return pages_ * kernel::PAGE_BYTES; }

void ClientQuota::refund(uint64_t bytes) noexcept {
  AGATE_ASSERT(bytes <= used_, "refunding %lu bytes of %lu charged",
               static_cast<unsigned long>(bytes), static_cast<unsigned long>(used_));
  used_ -= bytes;
}

size_t ClientQuota::available() const noexcept { return allowanceBytes() - used_; }

bool ClientQuota::take(size_t bytes) noexcept {
  if (bytes > available()) return false;
  used_ += bytes;
  connection_ += bytes;
  return true;
}

void ClientQuota::give(size_t bytes) noexcept {
  AGATE_ASSERT(bytes <= connection_, "the connection gives back %zu bytes of %lu it took", bytes,
               static_cast<unsigned long>(connection_));
  connection_ -= bytes;
  refund(bytes);
}

Promise<void> ClientQuota::grow(size_t bytes) { return makeRoom(bytes); }

// Loops: another charge may take what a growth granted while this one waited for the kernel,
// and what is missing may be more than one growth.
Promise<void> ClientQuota::makeRoom(uint64_t bytes) {
  while (bytes > available()) {
    if (growing_) {
      // One kernel call at a time: several asking at once would each be granted a growth.
      auto [grown, waiter] = newPromiseAndFulfiller<void>();
      growthWaiters_.push_back(std::move(waiter));
      Status woken = co_await grown;
      if (!woken) co_return woken.error();  // the quota went (its users go first: not expected)
      continue;
    }
    const uint64_t missing =
        std::min<uint64_t>((bytes - available() + kernel::PAGE_BYTES - 1) / kernel::PAGE_BYTES,
                           kernel::Bushel::MAX_STATE_GROWTH);
    const uint64_t ask =
        std::max(std::min(growthPages_, kernel::Bushel::MAX_STATE_GROWTH), missing);
    growing_ = true;
    struct Done {  // the call is over, or this coroutine was dropped while it waited
      ClientQuota& quota;
      ~Done() { quota.growthDone(); }
    } done{*this};
    Result<uint64_t> granted = co_await kernel_.growBushelState(service_, bushel_, ask);
    // A bank that cannot pay a whole growth may still pay what is missing.
    if (granted.code() == Errc::QUOTA_EXCEEDED && ask > missing)
      granted = co_await kernel_.growBushelState(service_, bushel_, missing);
    if (!granted) {
      if (granted.code() == Errc::QUOTA_EXCEEDED)
        co_return Error(Errc::QUOTA_EXCEEDED, "the client's bank cannot pay for more server state");
      co_return granted.error();
    }
    pages_ = std::max(pages_, *granted);
  }
  co_return {};
}

void ClientQuota::growthDone() noexcept {
  growing_ = false;
  std::vector<Fulfiller<void>> waiters = std::move(growthWaiters_);
  growthWaiters_.clear();
  for (Fulfiller<void>& w : waiters) w.fulfill(Status{});
}

Promise<StateCharge> ClientQuota::charge(uint64_t bytes) {
  if (bytes == 0) co_return Error(Errc::INVALID_ARGUMENT, "a state charge of 0 bytes");
  // Sizes often come from the client (count x size): one larger than a growth may be can never be
  // paid, and refusing it first keeps used_ + bytes from wrapping.
  if (bytes > kernel::Bushel::MAX_STATE_GROWTH * kernel::PAGE_BYTES)
    co_return Error(Errc::INVALID_ARGUMENT, "a state charge larger than one growth may be");
  // Loop: the connection may take what the growth granted while this charge waited for it. The
  // connection's floor stays free.
  while (bytes + floorLeft() > available()) {
    Status room = co_await makeRoom(bytes + floorLeft());
    if (!room) co_return room.error();
  }
  used_ += bytes;
  co_return StateCharge(this, bytes);
}

// --- ServedClient ---

ServedClient::~ServedClient() {
  shutDown();
  link_.reset();
}

void ServedClient::shutDown() noexcept {
  watcher_.reset();
  // Once only: a retired client may be destroyed later, by the router, when the network is gone.
  if (network_ != nullptr && link_) network_->removeConnection(link_->connection());
  network_ = nullptr;
  // Shut down first: running calls are cancelled, nothing dispatches to the bootstrap object any
  // more, and the objects the connection owns go (refunding their charges), with the references
  // they held elsewhere. The bootstrap object may hold references into the connection, so it
  // goes before the connection does.
  if (link_)
    link_->connection().shutdown(Error(Errc::DISCONNECTED, "the server dropped the client"));
  bootstrap_.reset();
}

bool ServedClient::referenced() noexcept {
  // Another connection refers to this client's connection (a capability of the client passed
  // on: a proxy holds it), or shares an object the client's connection exported (passed on by
  // a Forwarder, or handed off): such an object may hold a charge on this client's quota, or a
  // reference to this client, so both stay until it goes.
  return link_ &&
         (link_->connection().handleCount() != 0 || link_->connection().sharedObjectsAlive());
}

void ServedClient::disconnect(Error reason) noexcept {
  // The host's watcher sees the connection end and drops the client, then closes its bushel.
  if (connected()) link_->connection().close(reason);
}

// --- ServiceHost ---

ServiceHost::ServiceHost(std::unique_ptr<KernelEvents> ownEvents, KernelEvents& events,
                         std::string name, ClientFactory factory, ServiceOptions options,
                         caps::Cap<caps::Service> service, caps::Koid serviceKoid)
    : ownEvents_(std::move(ownEvents)),
      events_(events),
      kernel_(events.kernel()),
      name_(std::move(name)),
      factory_(std::move(factory)),
      options_(options),
      service_(service),
      serviceKoid_(serviceKoid) {
  options_.rpc.messagesPerTurn = options_.messagesPerTurn;
  events_.attach(*this);
}

ServiceHost::~ServiceHost() {
  // Destroyed without stop() (never run, or its run() dropped): the service goes from the
  // registry all the same, so no new client opens a bushel nobody serves, and the kernel closes
  // those opened meanwhile (their clients are told).
  if (service_.valid() && events_.gone().code == Errc::OK) kernel_.destroyDetached(service_);
  events_.detach(*this);
  closer_.reset();  // pending closes are cancelled: the process is going, or the service is
  while (!clients_.empty()) {
    retire(std::move(clients_.back()));
    clients_.pop_back();
  }
  sweepRetired();
  // Still referred to from another connection that outlives this host (a Session's, holding a
  // capability of one of its clients, proxied): the router keeps it until that goes (a host
  // with a router of its own: the router goes next, and leaves it to the process).
  for (auto& c : retired_) {
    ServedClient* client = c.get();
    client->connection().postWhenUnreferenced(nullptr);  // reapTask_ goes with the host
    events_.keepUntil(std::shared_ptr<ServedClient>(std::move(c)),
                      [client] { return !client->referenced(); });
  }
  retired_.clear();
}

// A dropped client goes at once, or, while another connection still refers to its connection
// (a capability of the client this server passed on: a proxy holds it), once nothing does: the
// connection posts reapTask_ when its last handle drops, and reap() sweeps. (An object of the
// client's shared elsewhere that goes later is noticed at the host's next event.)
void ServiceHost::retire(std::unique_ptr<ServedClient> client) noexcept {
  client->shutDown();
  if (!client->referenced()) return;
  client->connection().postWhenUnreferenced(&reapTask_);
  retired_.push_back(std::move(client));
}

void ServiceHost::sweepRetired() noexcept {
  std::erase_if(retired_, [](const auto& c) { return !c->referenced(); });
}

Promise<std::unique_ptr<ServiceHost>> ServiceHost::create(caps::KernelConnection& kernel,
                                                          std::string name, ClientFactory factory,
                                                          ServiceOptions options) {
  auto own = std::make_unique<KernelEvents>(kernel);
  KernelEvents& events = *own;
  return make(std::move(own), events, std::move(name), std::move(factory), options);
}

Promise<std::unique_ptr<ServiceHost>> ServiceHost::create(KernelEvents& events, std::string name,
                                                          ClientFactory factory,
                                                          ServiceOptions options) {
  return make(nullptr, events, std::move(name), std::move(factory), options);
}

Promise<std::unique_ptr<ServiceHost>> ServiceHost::make(std::unique_ptr<KernelEvents> ownEvents,
                                                        KernelEvents& events, std::string name,
                                                        ClientFactory factory,
                                                        ServiceOptions options) {
  AGATE_REQUIRE(factory != nullptr, "ServiceHost::create without a client factory");
  caps::KernelConnection& kernel = events.kernel();
  const caps::Cap<caps::SpaceBank> bank = options.bank.valid() ? options.bank : kernel.bank();
  Result<caps::Cap<caps::Service>> service =
      co_await kernel.registerService(kernel.registry(), name, bank);
  if (!service) co_return service.error();
  Result<caps::CapInfo> info = co_await kernel.inspectCap(*service);
  if (!info) co_return info.error();
  co_return std::unique_ptr<ServiceHost>(new ServiceHost(std::move(ownEvents), events,
                                                         std::move(name), std::move(factory),
                                                         options, *service, info->koid));
}

ServedClient* ServiceHost::findClient(caps::Koid koid) noexcept {
  for (auto& c : clients_)
    if (c->bushel() == koid) return c.get();
  return nullptr;
}

Promise<void> ServiceHost::run() {
  AGATE_REQUIRE(!stopped_.has_value(), "ServiceHost::run() while it runs");
  AGATE_REQUIRE(service_.valid(), "ServiceHost::run() after the service was unregistered");
  auto [stopped, fulfiller] = newPromiseAndFulfiller<void>();
  stopped_.emplace(std::move(fulfiller));
  if (events_.gone().code != Errc::OK) {
    stopped_->fulfill(events_.gone());
  } else {
    // Clients that came before run() are accepted here (the router kept them).
    Status listening = events_.listenService(serviceKoid_, *this);
    if (!listening) stopped_->fulfill(listening.error());
  }
  Status why = co_await stopped;
  events_.unlistenService(serviceKoid_);
  stopped_.reset();
  Status unregistered;
  if (why) {
    // Unregister first, so that a client seeing its connection end finds the name gone: the
    // kernel closes every bushel and tells the clients. Clients are served meanwhile.
    unregistered = co_await kernel_.destroy(service_);
    service_ = {};
  }
  while (!clients_.empty()) {
    retire(std::move(clients_.back()));
    clients_.pop_back();
    ++dropped_;
  }
  sweepRetired();
  if (!why) co_return why.error();  // the kernel went: nothing to unregister from
  co_return unregistered;
}

void ServiceHost::stop() noexcept {
  if (stopped_ && !stopped_->isFulfilled()) stopped_->fulfill(Status{});
}

void ServiceHost::kernelEvent(KernelEvent& event) noexcept {
  // The router sends this service's BUSHEL_OPENED and BUSHEL_CLOSED only.
  if (event.service != serviceKoid_) return;
  if (event.type == EventType::BUSHEL_OPENED) {
    accept(event);
  } else if (event.type == EventType::BUSHEL_CLOSED) {
    drop(event.bushel);
  }
  if (!retired_.empty()) sweepRetired();  // one kept for a shared object that went meanwhile
}

void ServiceHost::kernelGone(const Error& why) noexcept {
  (void)why;
  if (stopped_ && !stopped_->isFulfilled())
    stopped_->fulfill(Error(Errc::DISCONNECTED, "the kernel connection is gone"));
}

void ServiceHost::accept(KernelEvent& event) {
  if (event.error.code != Errc::OK) {
    // The rings never reached this process (its descriptor table was full): the client cannot
    // be served, so its bushel is closed and it is told, as for rings that cannot be opened.
    ++refused_;
    closeBushel(event.bushel);
    return;
  }
  auto client = std::make_unique<ServedClient>(
      kernel_, service_, event.bushel, event.peer, options_.stateGrowthPages,
      options_.chargeConnections ? options_.connectionFloorBytes : 0);
  client->bootstrap_ = factory_(*client);
  rpc::RpcOptions rpcOptions = options_.rpc;
  rpcOptions.sharedBootstrap = client->bootstrap_;  // null: the client's calls to it fail
  rpcOptions.network = nullptr;
  rpcOptions.peerVat = rpc::NO_VAT;
  if (options_.chargeConnections) rpcOptions.budget = &client->quota();
  // The client's identity comes from the kernel (never from the client): the peer vat a
  // provider checks an Accept against. A process's bushel to its own service joins no vat.
  const bool joinsVat = options_.network != nullptr && event.peer != kernel_.pid();
  if (joinsVat) {
    rpcOptions.network = options_.network;
    rpcOptions.peerVat = event.peer;
  }
  auto link = BushelLink::tryOpen(kernel_.loop(), BushelLink::Side::SERVER,
                                  std::move(event.request), std::move(event.reply), rpcOptions);
  if (!link) {
    // Rings the kernel made but this process cannot open: nothing can be served on them, so
    // the bushel is closed and the client told (its calls would find no reader).
    ++refused_;
    closeBushel(event.bushel);
    return;
  }
  client->link_ = std::move(*link);
  if (joinsVat) {
    client->network_ = options_.network;
    options_.network->addConnection(event.peer, client->link_->connection());
  }
  ServedClient& c = *clients_.emplace_back(std::move(client));
  c.watcher_.emplace(watch(c));
  ++opened_;
}

Promise<void> ServiceHost::watch(ServedClient& client) {
  (void)co_await client.connection().onDisconnect();
  // The client detached or broke the protocol: drop it, from a Task (not from inside this
  // coroutine, which the drop destroys).
  if (!reapTask_.isQueued()) kernel_.loop().post(reapTask_);
  co_return {};
}

void ServiceHost::drop(caps::Koid koid) noexcept {
  auto it = std::find_if(clients_.begin(), clients_.end(),
                         [&](const auto& c) { return c->bushel() == koid; });
  // The kernel closed it: nothing left to close (if a close is queued, it would be NOT_FOUND).
  std::erase(closing_, koid);
  if (it == clients_.end()) return;  // dropped already (its connection failed first)
  std::unique_ptr<ServedClient> client = std::move(*it);
  clients_.erase(it);
  ++dropped_;
  retire(std::move(client));
  sweepRetired();
}

void ServiceHost::reap() noexcept {
  // A client whose connection failed (it detached, broke the protocol, or was disconnected) is
  // dropped here, and its bushel closed in the kernel (see the overview).
  std::vector<caps::Koid> failed;
  for (auto& c : clients_) {
    if (c->connected()) continue;
    failed.push_back(c->bushel());
    retire(std::move(c));
  }
  std::erase(clients_, nullptr);
  sweepRetired();
  dropped_ += failed.size();
  for (caps::Koid koid : failed) closeBushel(koid);
}

void ServiceHost::closeBushel(caps::Koid koid) {
  if (!service_.valid()) return;  // unregistered: the kernel closed every bushel already
  closing_.push_back(koid);
  if (closerRunning_) return;
  closer_.reset();  // a finished closer, never the running one
  closer_.emplace(closeQueued());
}

Promise<void> ServiceHost::closeQueued() {
  closerRunning_ = true;
  while (!closing_.empty() && service_.valid()) {
    const caps::Koid koid = closing_.front();
    closing_.pop_front();
    Status closed = co_await kernel_.closeBushel(service_, koid);
    // NOT_FOUND: the client hung up or died first; anything else: the kernel connection is gone
    // (and with this process's service, every bushel of it).
    if (closed) ++closed_;
  }
  closerRunning_ = false;
  co_return {};
}

}  // namespace agate::client
