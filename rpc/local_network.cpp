// LocalNetwork: in-process vats over LOCAL channel pairs (see local_network.h).
#include "agate/rpc/local_network.h"

namespace agate::rpc {

class LocalNetwork::Vat final : public VatNetwork {
 public:
  Vat(LocalNetwork& net, VatId id, ServerObject* bootstrap)
      : net_(net), id_(id), bootstrap_(bootstrap) {}
  VatId vatId() const noexcept override { return id_; }
  Promise<RpcConnection*> connect(VatId vat) override { return net_.connectFrom(id_, vat); }
  bool introduce(VatId, VatId) noexcept override { return !net_.refuseIntroductions_; }
  ServerObject* bootstrap() const noexcept { return bootstrap_; }
  bool dead = false;

 private:
  LocalNetwork& net_;
  VatId id_;
  ServerObject* bootstrap_;
};

// One pair of connections: side 0 in the lower vat, side 1 in the higher one.
struct LocalNetwork::Link {
  std::unique_ptr<Channel> up, down;  // lower -> higher, higher -> lower
  std::unique_ptr<MessageSender> tx[2];
  std::unique_ptr<MessageReceiver> rx[2];
  std::unique_ptr<RpcConnection> conn[2];
};

LocalNetwork::LocalNetwork(EventLoop& loop, RpcOptions options, uint64_t ringBytes)
    : loop_(loop), options_(options), ringBytes_(ringBytes) {}

LocalNetwork::~LocalNetwork() {
  for (auto& [key, link] : links_) {
    for (auto& c : link->conn) c->close(Error(Errc::DISCONNECTED, "the local network closed"));
  }
  pending_.clear();      // readers waiting on these are on closed connections: they just stop
  loop_.runUntilIdle();  // teardowns: owned exports (vines, proxies) drop their references
  for (auto& [key, link] : links_) {
    link->conn[0].reset();
    link->conn[1].reset();
  }
  links_.clear();
}

VatNetwork& LocalNetwork::addVat(VatId id, ServerObject* bootstrap) {
  AGATE_REQUIRE(id != NO_VAT && !vats_.contains(id), "vat %llu is 0 or added twice",
                static_cast<unsigned long long>(id));
  auto vat = std::make_unique<Vat>(*this, id, bootstrap);
  Vat& ref = *vat;
  vats_.emplace(id, std::move(vat));
  return ref;
}

VatNetwork& LocalNetwork::vat(VatId id) {
  auto it = vats_.find(id);
  AGATE_REQUIRE(it != vats_.end(), "vat %llu was not added", static_cast<unsigned long long>(id));
  return *it->second;
}

Result<RpcConnection*> LocalNetwork::connection(VatId from, VatId to) {
  auto f = vats_.find(from);
  auto t = vats_.find(to);
  if (f == vats_.end() || t == vats_.end() || from == to)
    return Error(Errc::NOT_FOUND, "no such vat on this local network");
  if (f->second->dead || t->second->dead) return Error(Errc::DISCONNECTED, "the vat is gone");
  const VatId lo = std::min(from, to), hi = std::max(from, to);
  const int side = from == lo ? 0 : 1;
  auto existing = links_.find({lo, hi});
  if (existing != links_.end()) {
    RpcConnection* c = existing->second->conn[side].get();
    if (!c->isOpen()) return c->failure();
    return c;
  }
  auto link = std::make_unique<Link>();
  ChannelOptions co;
  co.scope = ChannelScope::LOCAL;
  co.capacityBytes = ringBytes_;
  Result<std::unique_ptr<Channel>> up = Channel::create(co);
  Result<std::unique_ptr<Channel>> down = Channel::create(co);
  if (!up) return up.error();
  if (!down) return down.error();
  link->up = std::move(*up);
  link->down = std::move(*down);
  Channel* outOf[2] = {link->up.get(), link->down.get()};  // side i sends on outOf[i]
  Channel* into[2] = {link->down.get(), link->up.get()};
  for (int i = 0; i < 2; ++i) {
    Result<Sender> s = outOf[i]->attachSender();
    Result<Receiver> r = into[i]->attachReceiver();
    if (!s) return s.error();
    if (!r) return r.error();
    link->tx[i] = std::make_unique<MessageSender>(std::move(*s));
    link->rx[i] = std::make_unique<MessageReceiver>(*into[i], std::move(*r), rpcReceiverOptions());
  }
  Vat* ends[2] = {vats_.at(lo).get(), vats_.at(hi).get()};
  for (int i = 0; i < 2; ++i) {
    RpcOptions o = options_;
    o.bootstrap = ends[i]->bootstrap();
    o.network = ends[i];
    o.peerVat = ends[1 - i]->vatId();
    link->conn[i] = std::make_unique<RpcConnection>(*link->tx[i], *link->rx[i], loop_, o);
  }
  RpcConnection* c = link->conn[side].get();
  links_.emplace(std::make_pair(lo, hi), std::move(link));
  return c;
}

Promise<RpcConnection*> LocalNetwork::connectFrom(VatId from, VatId to) {
  const bool exists = links_.contains({std::min(from, to), std::max(from, to)});
  if (!held_ || exists) return readyPromise<RpcConnection*>(connection(from, to));
  auto [promise, fulfiller] = newPromiseAndFulfiller<RpcConnection*>();
  pending_.push_back({from, to, std::move(fulfiller)});
  return std::move(promise);
}

void LocalNetwork::releaseConnects() {
  held_ = false;
  std::vector<Pending> pending = std::move(pending_);
  pending_.clear();
  for (Pending& p : pending) p.fulfiller.fulfill(connection(p.from, p.to));
}

void LocalNetwork::killVat(VatId id) {
  auto it = vats_.find(id);
  AGATE_REQUIRE(it != vats_.end(), "vat %llu was not added", static_cast<unsigned long long>(id));
  it->second->dead = true;
  for (auto& [key, link] : links_) {
    if (key.first != id && key.second != id) continue;
    link->conn[key.first == id ? 0 : 1]->close(Error(Errc::DISCONNECTED, "the vat died"));
  }
}

}  // namespace agate::rpc
