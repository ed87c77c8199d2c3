// LocalNetwork: vats in one process on one EventLoop, joined on demand by pairs of LOCAL
// channels. The VatNetwork of tests and examples (a kernel-backed one names vats by their
// bushels and connects through the registry; the RPC engine sees no difference).
//
//   LocalNetwork net(loop);
//   net.addVat(1, &aliceServer);                 // vat 1 serves aliceServer as its bootstrap
//   net.addVat(2, &bobServer);
//   RpcConnection* toBob = net.connection(1, 2).value();  // made now; vat 2's side too
//   RemoteCap bob = toBob->bootstrap();
//
// Each vat's network is a VatNetwork (vat(id)); connect() from a vat makes the pair of
// connections (one in each vat, each with the other's vat id) the first time and returns the
// same connection afterwards. Handoffs between vats use it: a vat that receives a capability
// hosted by a vat it has no connection to gets one made here.
//
// Lifetime: the network owns every connection, channel and vat. Its destructor closes every
// connection first, lets their teardown run on the loop, and only then destroys them (handoffs
// hold references across connections). Every RemoteCap/RemotePromise/Response users hold on
// its connections must be dropped before it (as for any RpcConnection).
//
// Threading: everything runs on the loop given to the constructor.
#pragma once

#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "agate/rpc/connection.h"
#include "agate/rpc/vat_network.h"
#include "agate/runtime/channel.h"

namespace agate::rpc {

class LocalNetwork {
 public:
  // `options` are used for every connection (bootstrap, network and peerVat are set per side);
  // `ringBytes` is the capacity of each direction's ring.
  explicit LocalNetwork(EventLoop& loop, RpcOptions options = {}, uint64_t ringBytes = 64 * 1024);
  ~LocalNetwork();
  LocalNetwork(const LocalNetwork&) = delete;
  LocalNetwork& operator=(const LocalNetwork&) = delete;

  // Adds vat `id` (not NO_VAT, not already added) serving `bootstrap` (not owned; may be null).
  VatNetwork& addVat(VatId id, ServerObject* bootstrap);
  // The network of vat `id` (precondition: added).
  VatNetwork& vat(VatId id);

  // The connection from vat `from` to vat `to`, made (both sides) if there is none. NOT_FOUND
  // for a vat never added, DISCONNECTED for one killed or a pair whose connection died.
  Result<RpcConnection*> connection(VatId from, VatId to);

  // While held, connect() for a pair not connected yet pends until releaseConnects() (as with
  // a network that must ask a registry); the connection that asked reads nothing meanwhile.
  // connect() for an existing pair completes at once.
  void holdConnects() noexcept { held_ = true; }
  void releaseConnects();
  size_t pendingConnects() const noexcept { return pending_.size(); }

  // While set, every vat's VatNetwork::introduce() answers false (as a network that cannot
  // introduce two vats): capabilities of a third vat are then passed as proxies.
  void refuseIntroductions(bool refuse) noexcept { refuseIntroductions_ = refuse; }

  // Closes every connection of vat `id` as if its process died: its peers see DISCONNECTED,
  // and later connects to or from it fail DISCONNECTED. Its objects are not destroyed.
  void killVat(VatId id);

  // Connection pairs made so far.
  size_t pairCount() const noexcept { return links_.size(); }

 private:
  class Vat;
  struct Link;
  Promise<RpcConnection*> connectFrom(VatId from, VatId to);
  struct Pending {
    VatId from, to;
    Fulfiller<RpcConnection*> fulfiller;
  };

  EventLoop& loop_;
  RpcOptions options_;
  uint64_t ringBytes_;
  bool held_ = false;
  bool refuseIntroductions_ = false;
  std::vector<Pending> pending_;
  std::map<VatId, std::unique_ptr<Vat>> vats_;
  std::map<std::pair<VatId, VatId>, std::unique_ptr<Link>> links_;  // key: (lower, higher) id
};

}  // namespace agate::rpc
