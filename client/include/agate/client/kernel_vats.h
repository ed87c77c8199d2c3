// KernelVats: the kernel's rpc::VatNetwork. Three-party handoff between processes whose
// connections are kernel-opened bushels: when client C passes server A's capability in a call to
// server B, B opens its own bushel to A (paid from B's bank) and calls A directly.
//
//   client::KernelEvents events(*kernel);
//   client::KernelVats vats(events);                              // vat id = kernel ProcessId
//   client::Session session(events, {.network = &vats});          // C: its bushels join the vat
//   auto host = co_await ServiceHost::create(events, "auditor", factory, {.network = &vats});
//   ...
//   vats.close();  // before the Session and the hosts go (VatNetwork's rule)
//
// Identity. A vat is a kernel process; its VatId is the ProcessId. The kernel vouches for both
// ends of every bushel (the server learns the client's in BUSHEL_OPENED, the client the
// server's from bushelFds), so each connection's peerVat is authenticated, and a provider
// checks that an Accept comes from the Provide's recipient on that basis.
//
// Authority. Naming A's vat id gives B nothing: to open a bushel to A, B needs a capability.
// When the engine hands a capability hosted by A to B, C's network introduces B to A's service
// through the kernel (introduce(): C's bushel to A -> a connect-only, non-grantable Service cap
// in B's CSpace, derived from A's registration cap so A can revoke it), and B's kernel connection
// gets an INTRODUCED event naming the cap and A's ProcessId (vouched for by the kernel). C can
// introduce only to vats it is a client of; for any other, introduce() answers false and the
// engine passes a proxy through C instead. C's rings never leave C.
//
// connect(vat) at B: the open connection to `vat` if there is one (a Session's, a host's, or
// one made here); else it waits (introductionTimeout) for the kernel's introduction to `vat`
// (C's introduce call and its RPC message race to B on different paths), checks the cap
// (inspectCap: a Service, READ only, the introduced service), opens a bushel through it
// (openBushelVia, paid from options.bank), checks that the kernel names `vat` as its server,
// and runs a connection over it, owned here and cached. The vat id comes from an untrusted cap
// table: ids that are no ProcessId fail NOT_FOUND at once, one never introduced fails NOT_FOUND
// after the timeout, and in no case does the peer's word open anything.
//
// An introduction is kept for the network's life (or until its service goes): the kernel sends
// one INTRODUCED per (recipient, service) while the recipient holds the cap, so a later
// introduction of the same pair finds the record here, not a new event.
//
// Ends. Bushels opened here close with their service (the kernel's SERVICE_GONE /
// BUSHEL_CLOSED, routed by KernelEvents): their connections fail DISCONNECTED, as do calls on
// capabilities taken through them. close() closes every connection of the vat (its own, and the
// Session's and hosts' that named this network); the destructor closes them too and releases
// the bushels it opened.
//
// Threading: the kernel connection's loop thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "agate/caps/kernel_connection.h"
#include "agate/client/bushel_link.h"
#include "agate/client/kernel_events.h"
#include "agate/rpc/connection.h"
#include "agate/rpc/vat_network.h"
#include "agate/runtime/promise.h"

namespace agate::client {

struct KernelVatsOptions {
  // Pays the bushels this vat opens to reach handed-off capabilities. Invalid: the process bank.
  caps::Cap<caps::SpaceBank> bank = {};
  // For those connections (network, peerVat and bootstrap are set here: no bootstrap).
  rpc::RpcOptions rpc = {};
  // How long connect() waits for the kernel's introduction to a vat it cannot reach yet.
  Duration introductionTimeout = std::chrono::seconds(5);
};

class KernelVats final : public rpc::VatNetwork, private KernelEventListener {
 public:
  explicit KernelVats(KernelEvents& events, KernelVatsOptions options = {});
  // Closes every connection of the vat; then destroys the ones it owns (handles on them must be
  // gone) and deletes the bushels it opened. The Session and hosts that named it must already
  // be gone or must no longer send (close() first, then destroy them, then this).
  ~KernelVats() override;
  KernelVats(const KernelVats&) = delete;
  KernelVats& operator=(const KernelVats&) = delete;

  rpc::VatId vatId() const noexcept override { return events_.kernel().pid(); }
  Promise<rpc::RpcConnection*> connect(rpc::VatId vat) override;
  bool introduce(rpc::VatId provider, rpc::VatId recipient) noexcept override;

  // Closes every connection of this vat (DISCONNECTED); later connects fail. Idempotent.
  void close() noexcept;

  // Session and ServiceHost register the connections they make with this network (peerVat set),
  // and a Session its bushel caps, which introductions are made from.
  void addConnection(rpc::VatId peer, rpc::RpcConnection& connection);
  void removeConnection(rpc::RpcConnection& connection) noexcept;
  void addClientBushel(rpc::VatId server, caps::Cap<caps::Bushel> bushel);
  void removeClientBushel(caps::Cap<caps::Bushel> bushel) noexcept;

  // Diagnostics and tests.
  size_t ownedConnections() const noexcept { return owned_.size(); }
  uint64_t introductionsSent() const noexcept { return introductionsSent_; }
  // Introductions this vat sent that the kernel refused, or received that failed the check.
  uint64_t introductionsFailed() const noexcept { return introductionsFailed_; }
  uint64_t introductionsReceived() const noexcept { return introductionsReceived_; }
  size_t knownIntroductions() const noexcept { return introduced_.size(); }

 private:
  struct Owned {
    caps::Cap<caps::Bushel> cap;
    caps::Koid koid = 0;
    rpc::VatId peer = 0;
    std::unique_ptr<BushelLink> link;
  };
  struct Introduction {
    caps::Cap<caps::Service> cap;
    caps::Koid service = 0;
  };
  struct Waiter {
    rpc::VatId vat;
    Fulfiller<void> fulfiller;
  };

  void kernelEvent(caps::KernelEvent& event) noexcept override;
  void kernelGone(const Error& why) noexcept override;

  rpc::RpcConnection* findOpen(rpc::VatId vat) const noexcept;
  Promise<rpc::RpcConnection*> open(rpc::VatId vat);
  Promise<void> establish(rpc::VatId vat, Introduction intro);
  Promise<void> waitForIntroduction(rpc::VatId vat);
  Promise<void> sendIntroduction(caps::Cap<caps::Bushel> bushel, rpc::VatId recipient);
  Promise<void> takeIntroduction(caps::Koid service, caps::ProcessId server, uint64_t handle);
  void wake(rpc::VatId vat) noexcept;
  void prune() noexcept;
  void sweepClosed() noexcept;

  KernelEvents& events_;
  KernelVatsOptions options_;
  bool closed_ = false;
  std::vector<std::pair<rpc::VatId, rpc::RpcConnection*>> registered_;  // Sessions', hosts'
  std::map<rpc::VatId, caps::Cap<caps::Bushel>> clientBushels_;  // server -> a Session's bushel
  std::map<rpc::VatId, Introduction> introduced_;                // server -> connect-only cap
  std::vector<std::unique_ptr<Owned>> owned_;
  std::vector<Waiter> waiters_;
  // Why the last establish() to a vat failed, for the connects that waited for it.
  std::map<rpc::VatId, Error> openFailures_;
  uint64_t introductionsSent_ = 0;
  uint64_t introductionsFailed_ = 0;
  uint64_t introductionsReceived_ = 0;
  std::list<Promise<void>> tasks_;  // kernel calls in flight (introductions sent and taken)
};

}  // namespace agate::client
