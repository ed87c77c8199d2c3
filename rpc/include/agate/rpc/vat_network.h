// VatNetwork: how an RpcConnection reaches vats other than its peer, for three-party handoff.
//
// A vat is one participant of the RPC graph (a process, or in tests one set of objects on a
// loop), named by a 64-bit VatId (0 = none). Each vat has one VatNetwork; every RpcConnection of
// that vat is built with `RpcOptions::network` pointing to it and `RpcOptions::peerVat` naming
// the vat at the other end (which the network authenticates: a kernel bushel knows both ends).
//
// With a network, passing a RemoteCap of connection C->A in a call (or a return) on connection
// C->B hands the capability off: A is asked to keep it for B (Provide), B is told where it lives
// (a thirdPartyHosted cap-table entry), B connects to A through its own network if it has no
// connection yet and takes it (Accept). B then calls A directly; E-order holds across the
// handoff (schemas/rpc.capnp, "Three-party handoff"; "Embargoes" for a promise that resolves
// to a handed-off capability, where the recipient's route changes).
//
//   class KernelVats final : public rpc::VatNetwork {           // an implementation
//     VatId vatId() const noexcept override { return self_; }
//     Promise<RpcConnection*> connect(VatId vat) override;     // cached; made on first use
//   };
//
// The network owns the connections it makes (connect() returns a pointer that stays valid until
// the network closes that connection; a connection it only registered, a Session's, may be freed
// by its owner once closed, so a caller that resumes later asks again rather than keep the
// pointer across the wait); it must close every connection of the vat (close()) before
// destroying any of them, because a handoff in flight holds references on two of them.
// `LocalNetwork` (local_network.h) is the in-process implementation over LOCAL channels.
//
// The base class also holds the vat's handoff state (provisions this vat keeps for others,
// Accepts waiting for their Provide): connections of one vat share it. Threading: the network and
// all its connections belong to one EventLoop thread.
#pragma once

#include <cstdint>
#include <memory>

#include "agate/runtime/promise.h"

namespace agate::rpc {

class RpcConnection;

using VatId = uint64_t;
inline constexpr VatId NO_VAT = 0;

namespace detail {
class HandoffTable;
}

class VatNetwork {
 public:
  // Accepts one recipient (one connection) may have waiting at once for the Provides of one
  // introducer (more fail OUT_OF_MEMORY): bounds what a peer can make this vat hold for
  // provisions that never come, per peer, so that one recipient flooding forged ids cannot crowd
  // out the others; and per introducer, so that an introducer that hands a recipient forged
  // provision ids (whose Accepts then wait here) uses up that recipient's places for its own
  // handoffs only, not for everyone else's. An honest recipient's Accept waits only while its
  // Provide is still on the introducer's ring.
  static constexpr size_t MAX_WAITING_ACCEPTS_PER_PEER = 16;
  // And in all, whatever their introducers (the recipient names the introducer).
  static constexpr size_t MAX_WAITING_ACCEPTS_PER_RECIPIENT = 4 * MAX_WAITING_ACCEPTS_PER_PEER;

  VatNetwork();
  virtual ~VatNetwork();
  VatNetwork(const VatNetwork&) = delete;
  VatNetwork& operator=(const VatNetwork&) = delete;

  // This vat's id (never NO_VAT).
  virtual VatId vatId() const noexcept = 0;

  // A connection from this vat to `vat`: the existing one, or a new one (its RpcOptions must
  // name this network and `vat` as peerVat). May complete at once (a ready promise) or later.
  // Errors: NOT_FOUND for a vat the network cannot reach, DISCONNECTED for one that is gone.
  // While it is pending, the connection that asked (the one that received a handoff) reads no
  // further message: that keeps the order of everything its peer sent.
  virtual Promise<RpcConnection*> connect(VatId vat) = 0;

  // Called when this vat is about to hand a capability hosted by `provider` to `recipient`
  // (before the Provide goes out): the network gives `recipient` what it needs to reach
  // `provider` (a kernel network: an introduction through the kernel). False: it cannot, and
  // the capability is passed as a proxy through this vat instead. Default: true (the recipient
  // can reach every vat, as in LocalNetwork).
  virtual bool introduce(VatId provider, VatId recipient) noexcept {
    (void)provider;
    (void)recipient;
    return true;
  }

  // Provisions this vat keeps for recipients, and Accepts waiting for their Provide (tests and
  // diagnostics: both drain when handoffs complete, are reclaimed, or their vats die).
  size_t provisionCount() const noexcept;
  size_t waitingAcceptCount() const noexcept;

  // The vat-wide handoff state (rpc/ internal).
  detail::HandoffTable& handoffs() noexcept { return *handoffs_; }

 private:
  std::unique_ptr<detail::HandoffTable> handoffs_;
};

}  // namespace agate::rpc
