// Bushel: one client's connection to one service.
//
// Made by Kernel::tryOpenBushel, paid from a bank the client names: a request ring (client sends,
// server receives) and a reply ring (server sends, client receives), each a SHARED Channel whose
// sealed memfd the kernel creates and holds, plus the server's export table for this client
// (a placeholder: its caps come with the daemon's cap-passing). Only the two processes get the
// ring descriptors: the client through Kernel::tryBushelFds on its cap, the server in the
// BUSHEL_OPENED event (kernel_event.h). The client gets the cap; the server gets none.
//
// Server state. A server keeps per-client state (the objects it makes for that client); the
// client pays for it. The bushel carries a state allowance in pages (statePages), grown by the
// server through Kernel::tryGrowBushelState and charged to the bank that paid for the bushel, on
// the bushel itself (its chargedPages), so the pages come back when the bushel dies. The kernel
// only accounts: the server keeps its state within the allowance (client/: ClientQuota).
//
// Lifetime: a bushel dies when the last cap to it is deleted (the client's, and any copies it
// made), when its bank is destroyed (e.g. the client died and paid from its own bank), when
// its service goes, or when its server closes it (Kernel::tryCloseBushel: a server disconnecting
// a client that misbehaved). The Kernel then tells the server (BUSHEL_CLOSED, so it frees the
// client's state) and the client if it is still attached. Mappings the two processes made stay
// valid until they unmap: the kernel closes only its own descriptors and mappings.
//
// Threading: single-threaded, as the whole object model.
#pragma once

#include <memory>

#include "agate/kernel/object.h"
#include "agate/kernel/process.h"
#include "agate/runtime/channel.h"

namespace agate::kernel {

class Service;

class Bushel final : public KernelObject {
 public:
  static constexpr ObjectType TYPE = ObjectType::BUSHEL;
  // The most state pages one tryGrowBushelState call may add.
  static constexpr uint64_t MAX_STATE_GROWTH = 1024;

  // Links itself into `service`'s bushels.
  Bushel(Service& service, ProcessId client, std::unique_ptr<Channel> request,
         std::unique_ptr<Channel> reply);
  ~Bushel() override;

  ProcessId client() const noexcept { return client_; }
  ProcessId server() const noexcept { return server_; }
  Koid serviceKoid() const noexcept { return serviceKoid_; }
  // Null once the service has gone (the bushel is then about to be torn down).
  Service* service() const noexcept { return service_; }
  Channel& request() const noexcept { return *request_; }
  Channel& reply() const noexcept { return *reply_; }
  // Pages a bushel with rings of `ringBytes` each is charged (both rings' mappings).
  static uint64_t pagesFor(const Channel& request, const Channel& reply) noexcept;

  // The service is going: unlink from it.
  void detachService() noexcept;

  // Pages of server state the client has paid for (see the overview); part of chargedPages().
  uint64_t statePages() const noexcept { return statePages_; }
  // Records `pages` more, already charged to owner() (SpaceBank::chargeObject).
  void addStatePages(uint64_t pages) noexcept { statePages_ += pages; }

 private:
  void teardown() noexcept override;  // unlinks, closes and unmaps the rings

  Service* service_;  // not owning
  Koid serviceKoid_;
  ProcessId client_;
  ProcessId server_;
  std::unique_ptr<Channel> request_;
  std::unique_ptr<Channel> reply_;
  uint64_t statePages_ = 0;
};

}  // namespace agate::kernel
